"""The atlas build: every cell exactly once, outputs readable by their tools, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from builder.build import build
from builder.grid import cell_centers, cell_count, plan_shards, shard_cells
from builder.publish import exclusive
from catalog.cli import main
from catalog.errors import AtlasBusyError, InvalidArgumentError, UnknownResolutionError
from catalog.manifest import read_manifest, validate_dataset
from catalog.tables import embedding_matrix
from tests.data.faults import crash_on_shard_write
from tests.data.toy_encoder import load as load_toy

TOY = "tests.data.toy_encoder:load"


def _read(dataset, res):
    """A resolution as a plain Parquet reader sees it: cells, their centres, embeddings."""
    table = pq.read_table(dataset / "data" / f"res={res}")
    cells = table.column("cell").to_numpy()
    lat, lon = cell_centers(cells)
    return cells, lat, lon, embedding_matrix(table.column("embedding")).astype(np.float32)


@pytest.fixture(scope="module")
def toy_atlas(tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas")
    summary = build(TOY, resolutions="0-2", output=out, device="cpu", precision="float32", progress=False,
                    formats="parquet,zarr")
    return out, summary


def test_every_cell_exactly_once_at_its_centre(toy_atlas) -> None:
    out, summary = toy_atlas
    dataset = out / "toy"
    assert summary.dataset == dataset and summary.cells == {r: cell_count(r) for r in (0, 1, 2)}
    enc = load_toy(device="cpu")
    for res in (0, 1, 2):
        cells, lat, lon, emb = _read(dataset, res)
        assert len(cells) == 2 + 120 * 7**res == len(np.unique(cells))
        assert (np.diff(cells.astype(np.int64)) > 0).all()  # sorted by cell
        exp_lat, exp_lon = cell_centers(cells)
        np.testing.assert_array_equal(lat, exp_lat)
        np.testing.assert_array_equal(lon, exp_lon)
        np.testing.assert_array_equal(emb, enc.encode(lat=exp_lat, lon=exp_lon))


def test_manifest_stac_zarr_and_index(toy_atlas) -> None:
    import faiss
    import xarray as xr

    out, _ = toy_atlas
    dataset = out / "toy"
    manifest = read_manifest(dataset)
    assert manifest["provenance"]["model"] == "toy" and manifest["precision"] == "float32"
    assert manifest["resolutions"]["2"]["cells"] == 5882
    assert {"encode", "write", "zarr", "index"} <= set(manifest["timings_s"])
    assert manifest["software"]["h3"] and manifest["build"]["resolutions"] == [0, 1, 2]
    assert all(len(rec["sha256"]) == 64 and rec["bytes"] > 0 for rec in manifest["files"])
    stac = json.loads((dataset / "collection.json").read_text())
    assert stac["type"] == "Collection" and stac["summaries"]["h3:resolution"] == [0, 1, 2]
    assert stac["assets"]["zarr-res2"]["href"] == "./zarr/res=2.zarr"

    ds = xr.open_zarr(dataset / manifest["resolutions"]["2"]["zarr"])
    assert ds.cell_ids.attrs == {"grid_name": "h3", "level": 2}
    cells, _, _, emb = _read(dataset, 2)
    np.testing.assert_array_equal(ds.cell_ids.values, cells)
    np.testing.assert_array_equal(ds.embedding.values, emb)

    info = manifest["resolutions"]["1"]["index"]
    assert info["exact"] and info["recall_at_10"] == 1.0
    index = faiss.read_index(str(dataset / info["path"]))
    cells, _, _, emb = _read(dataset, 1)
    assert index.ntotal == len(cells)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    scores, found = index.search(unit[:5], 1)
    # the toy's embeddings span a plane, so several cells share a direction: the best hit is
    # any cell pointing exactly where the query does
    rows = np.searchsorted(cells, found[:, 0].astype(np.uint64))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    np.testing.assert_allclose(unit[rows], unit[:5], atol=1e-3)


def test_validate_names_missing_extra_and_altered_files(toy_atlas, tmp_path, capsys) -> None:
    import shutil

    out, _ = toy_atlas
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(["validate", str(copy)]) == 0
    assert "ok" in capsys.readouterr().out
    dataset = copy / "toy"
    shard = dataset / "data/res=1/part-all.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    (dataset / "zarr/res=0.zarr/.zattrs").unlink()
    (dataset / "data/res=2/stray.parquet").write_bytes(b"x")
    (dataset / "blocks/res=0/part-all.blocks").unlink()
    problems = validate_dataset(dataset)
    assert "altered file (sha256 differs): data/res=1/part-all.parquet" in problems
    assert "missing file: zarr/res=0.zarr/.zattrs" in problems
    assert "missing file: blocks/res=0/part-all.blocks" in problems
    assert "extra file: data/res=2/stray.parquet" in problems
    assert main(["validate", str(copy)]) == 1
    assert "altered file" in capsys.readouterr().out


def test_validate_checks_what_the_index_holds(toy_atlas, tmp_path) -> None:
    """An index file swapped in with its manifest record updated still fails: its header
    names the wrong number of vectors."""
    import json
    import shutil

    from catalog.manifest import file_record

    shutil.copytree(toy_atlas[0], tmp_path / "copy")
    dataset = tmp_path / "copy" / "toy"
    shutil.copyfile(dataset / "index/res=0.faiss", dataset / "index/res=1.faiss")
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["files"] = [file_record(dataset, r["path"]) if r["path"] == "index/res=1.faiss" else r
                         for r in manifest["files"]]
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    (problem,) = validate_dataset(dataset)
    assert problem.startswith("index/res=1.faiss is not the index its manifest describes (IxM2 header says d=4, "
                              "ntotal=122") and "expected d=4, ntotal=842" in problem


@pytest.mark.parametrize(("precision", "tolerance", "dtype"),
                         [("float16", 2e-3, "fixed_size_list<element: halffloat>[4]"), ("int8", 1e-2, "fixed_size_binary[4]")])
def test_reduced_precision(tmp_path, precision, tolerance, dtype) -> None:
    build(TOY, resolutions=1, output=tmp_path, device="cpu", precision=precision, progress=False)
    dataset = tmp_path / "toy"
    table = pq.read_table(dataset / "data/res=1")
    assert str(table.schema.field("embedding").type) == dtype
    _, lat, lon, stored = _read(dataset, 1)
    manifest = read_manifest(dataset)
    if precision == "int8":
        q = manifest["quantization"]
        stored = stored * np.array(q["scale"], np.float32) + np.array(q["offset"], np.float32)
        assert json.loads(table.schema.metadata[b"hexatlas.quantization"]) == q
    exact = load_toy(device="cpu").encode(lat=lat, lon=lon)
    assert np.abs(stored - exact).max() < tolerance * np.abs(exact).max()


def test_encode_calls_take_the_encoders_whole_batch(monkeypatch) -> None:
    """A batch larger than the encode chunk (a GPU's --batch-size) reaches the encoder whole."""
    from builder.encode import ENCODE_CHUNK, encode_stored

    encoder, sizes = load_toy(device="cpu"), []
    real = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda **kw: sizes.append(len(kw["lat"])) or real(**kw))
    n = 3 * ENCODE_CHUNK + 5
    lat, lon = np.zeros(n), np.linspace(-179, 179, n)
    encoder.batch_size = 2 * ENCODE_CHUNK
    stored = encode_stored(encoder, lat, lon, "float16", None)
    assert sizes == [2 * ENCODE_CHUNK, ENCODE_CHUNK + 5]
    np.testing.assert_array_equal(stored, real(lat=lat, lon=lon).astype(np.float16))
    sizes.clear()
    encoder.batch_size = 4096  # a CPU's: the chunk stays the progress bar's step
    encode_stored(encoder, lat, lon, "float16", None)
    assert sizes == [ENCODE_CHUNK] * 3 + [5]


def test_refuses_to_clobber_and_resumes_only_same_arguments(tmp_path) -> None:
    build(TOY, resolutions="0", output=tmp_path, device="cpu", progress=False)
    with pytest.raises(InvalidArgumentError, match="already holds a finished toy dataset.*--overwrite"):
        build(TOY, resolutions="0", output=tmp_path, device="cpu", progress=False)
    summary = build(TOY, resolutions="1", output=tmp_path, device="cpu", progress=False, overwrite=True)
    assert summary.cells == {1: 842} and list(read_manifest(tmp_path / "toy")["resolutions"]) == ["1"]
    # an unfinished build with other arguments is not silently mixed with a new one
    (tmp_path / "toy" / "manifest.json").unlink()
    (tmp_path / "toy" / "_build" / "done").mkdir(parents=True)
    (tmp_path / "toy" / "_build" / "build.json").write_text(json.dumps({"identity": {"precision": "int8"}}))
    with pytest.raises(InvalidArgumentError, match="precision: earlier 'int8', now 'float16'"):
        build(TOY, resolutions="1", output=tmp_path, device="cpu", progress=False)


def test_overwrite_keeps_the_old_dataset_readable_until_the_new_one_is_complete(tmp_path, monkeypatch) -> None:
    import query

    build(TOY, resolutions="0,1", output=tmp_path, device="cpu", progress=False)
    restore = crash_on_shard_write(monkeypatch, 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False, overwrite=True)
    dataset = tmp_path / "toy"
    assert list(read_manifest(dataset)["resolutions"]) == ["0", "1"] and validate_dataset(dataset) == []
    assert len(query.open(tmp_path).lookup(lat=[10.0], lon=[20.0], res=1)) == 1
    restore()
    summary = build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False, overwrite=True)
    assert summary.dataset == dataset and summary.cells == {2: 5882}
    manifest = read_manifest(dataset)
    assert list(manifest["resolutions"]) == ["2"] and manifest["dataset"] == "toy"
    assert validate_dataset(dataset) == []
    assert sorted(p.name for p in dataset.iterdir()) == ["_build.lock", "blocks", "collection.json", "data", "encoder", "index", "land",
                                                         "manifest.json", "overview"]
    assert [p.name for p in (dataset / "data").iterdir()] == ["res=2"]  # no empty res=0, res=1 left


def test_a_swap_killed_halfway_is_finished_by_the_next_run(tmp_path, monkeypatch) -> None:
    from catalog.storage import LocalStore

    build(TOY, resolutions="0", output=tmp_path, device="cpu", progress=False)
    old = set(LocalStore(tmp_path / "toy").files()) - {"_build.lock", "manifest.json", "collection.json"}
    real, deletes = LocalStore.delete, {"n": 0}

    def dying(self, rel):
        if rel in old:  # the old generation's files go only after the new manifest is in
            assert read_manifest(tmp_path / "toy")["generation"] == 1
            deletes["n"] += 1
            if deletes["n"] == 2:
                raise KeyboardInterrupt  # as a kill would stop it
        real(self, rel)

    monkeypatch.setattr(LocalStore, "delete", dying)
    with pytest.raises(KeyboardInterrupt):
        build(TOY, resolutions="1", output=tmp_path, device="cpu", progress=False, overwrite=True)
    dataset = tmp_path / "toy"
    assert list(read_manifest(dataset)["resolutions"]) == ["1"]  # published: the swap is the manifest
    leftovers = validate_dataset(dataset)
    assert leftovers and all(p.startswith("extra file: ") and "run the same 'hexatlas build' again" in p
                             for p in leftovers)
    monkeypatch.setattr(LocalStore, "delete", real)
    with pytest.raises(InvalidArgumentError, match="already holds a finished toy dataset"):
        build(TOY, resolutions="0", output=tmp_path, device="cpu", progress=False)  # the swap completes first
    assert list(read_manifest(dataset)["resolutions"]) == ["1"]
    assert validate_dataset(dataset) == [] and not (dataset / "_build").exists()
    assert not old & set(LocalStore(dataset).files())


def test_bad_arguments() -> None:
    with pytest.raises(UnknownResolutionError, match="0..15"):
        build(TOY, resolutions="14-16", output="unused")
    with pytest.raises(InvalidArgumentError, match="use a range like 0-5"):
        build(TOY, resolutions="zero", output="unused")
    with pytest.raises(InvalidArgumentError, match="float16, float32, int8"):
        build(TOY, resolutions="0", output="unused", precision="float8")
    with pytest.raises(InvalidArgumentError, match="unknown format 'geotiff'; choose from parquet, zarr"):
        build(TOY, resolutions="0", output="unused", formats="parquet,geotiff")


def test_a_second_build_at_the_same_time_is_refused(tmp_path) -> None:
    with exclusive(tmp_path / "toy"), pytest.raises(AtlasBusyError, match="another build is writing"):
        build(TOY, resolutions="0", output=tmp_path, device="cpu", progress=False)


def _small_shards(monkeypatch) -> None:
    import builder.grid

    monkeypatch.setattr(builder.grid, "SHARD_CELLS", 7**5)  # 122 shards at resolution 5, as at 7 by default


def test_crash_mid_build_then_resume(tmp_path, monkeypatch, capsys) -> None:
    import builder.build as b
    import builder.grid
    from builder import finish

    monkeypatch.setattr(b, "PARQUET_WRITERS", 1)
    monkeypatch.setattr(builder.grid, "SINGLE_SHARD_MAX_RES", 2)
    monkeypatch.setattr(builder.grid, "SHARD_CELLS", 7**5)  # 18 shards at resolution 4
    monkeypatch.setattr(finish, "ZARR_BLOCK_CELLS", 2 * finish.ZARR_CHUNK_CELLS)  # res 4 in 36 Zarr writes
    restore = crash_on_shard_write(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(TOY, resolutions="0,4", output=tmp_path, device="cpu", progress=False, formats="zarr")
    assert not (tmp_path / "toy" / "manifest.json").exists()
    written = len(list((tmp_path / "toy" / "data").rglob("*.parquet")))
    restore()
    summary = build(TOY, resolutions="0,4", output=tmp_path, device="cpu", progress=True, formats="zarr")
    assert 2 <= summary.resumed_shards == written <= 3 and summary.cells == {0: 122, 4: cell_count(4)}
    # res 4 was not streamed (a shard came from the first run): finished from its files, with a bar
    assert "zarr res 4" in capsys.readouterr().err and summary.seconds["read back"] > 0
    cells = pq.read_table(tmp_path / "toy" / "data/res=4", columns=["cell"]).column("cell").to_numpy()
    assert len(cells) == len(np.unique(cells)) == cell_count(4)
    assert validate_dataset(tmp_path / "toy") == []
    # res 4 spans several Zarr append blocks (sliced remainders): they must match the Parquet
    import xarray as xr

    _, _, _, emb = _read(tmp_path / "toy", 4)
    ds = xr.open_zarr(tmp_path / "toy" / "zarr/res=4.zarr")
    np.testing.assert_array_equal(ds.cell_ids.values, cells)
    np.testing.assert_array_equal(ds.embedding.values.astype(np.float32), emb)


def test_shard_files_written_in_parallel_survive_a_crash(tmp_path, monkeypatch) -> None:
    import builder.build as b

    monkeypatch.setattr(b, "PARQUET_WRITERS", 3)  # files finish out of order; some after the crash
    _small_shards(monkeypatch)
    restore = crash_on_shard_write(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(TOY, resolutions="5", output=tmp_path, device="cpu", progress=False)
    written = len(list((tmp_path / "toy" / "data").rglob("*.parquet")))
    assert 4 <= written < len(plan_shards([5])) and not list((tmp_path / "toy").rglob("*.tmpdir"))
    restore()
    summary = build(TOY, resolutions="5", output=tmp_path, device="cpu", progress=False)
    assert summary.resumed_shards == written and summary.cells == {5: cell_count(5)}
    cells = pq.read_table(tmp_path / "toy" / "data/res=5", columns=["cell"]).column("cell").to_numpy()
    np.testing.assert_array_equal(cells, np.sort(np.concatenate([shard_cells(s) for s in plan_shards([5])])))
    assert validate_dataset(tmp_path / "toy") == []


def test_a_resolution_failing_to_publish_stops_the_build_and_resumes(tmp_path, monkeypatch) -> None:
    import builder.finish

    real_finish = builder.finish.finish_index

    def failing(res, *args):
        if res == 2:
            raise OSError("disk full")
        return real_finish(res, *args)

    monkeypatch.setattr(builder.finish, "finish_index", failing)
    with pytest.raises(OSError, match="disk full"):
        build(TOY, resolutions="0-2", output=tmp_path, device="cpu", progress=False)
    dataset = tmp_path / "toy"
    assert not (dataset / "manifest.json").exists() and not list(dataset.rglob("*.tmp*"))
    assert not (dataset / "index" / "res=2.faiss").exists() and (dataset / "index" / "res=1.faiss").exists()
    monkeypatch.setattr(builder.finish, "finish_index", real_finish)
    summary = build(TOY, resolutions="0-2", output=tmp_path, device="cpu", progress=False)
    assert summary.resumed_shards == 3 and validate_dataset(dataset) == []


def test_sigkill_at_any_moment_then_resume(tmp_path) -> None:
    out = tmp_path / "atlas"
    argv = [sys.executable, "-m", "catalog.cli", "build", "--model", TOY, "--resolutions", "0,5",
            "--output", str(out), "--device", "cpu", "--no-progress"]
    for delay in (2.0, 4.0):
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert subprocess.run(argv, capture_output=True, check=False).returncode == 0
    cells = pq.read_table(out / "toy" / "data/res=5", columns=["cell"]).column("cell").to_numpy()
    assert len(cells) == len(np.unique(cells)) == cell_count(5)
    assert validate_dataset(out / "toy") == []


def test_land_only_keeps_exactly_the_land_cells(tmp_path) -> None:
    pytest.importorskip("global_land_mask")
    from builder.landmask import land_cells

    summary = build(TOY, resolutions="1-2", output=tmp_path, device="cpu", land_only=True, progress=False)
    for res in (1, 2):
        cells, _, _, _ = _read(tmp_path / "toy", res)
        np.testing.assert_array_equal(cells, land_cells(res))
        assert summary.cells[res] == len(land_cells(res)) < cell_count(res)
    manifest = read_manifest(tmp_path / "toy")
    assert manifest["build"]["land_only"] and "global-land-mask" in manifest["build"]["land_mask"]

def test_a_global_build_flags_land_shard_by_shard(tmp_path, monkeypatch) -> None:
    """Without listing the globe's land cells (O(cells) in one process): each shard tests its
    own, and ``land/res=<r>.npy`` is read back from the parts; both equal the list."""
    pytest.importorskip("global_land_mask")
    import builder.grid
    import builder.landmask
    from builder.landmask import land_cells

    expected = {res: np.array(land_cells(res)) for res in (2, 3)}  # listed before the build is watched
    monkeypatch.setattr(builder.grid, "SINGLE_SHARD_MAX_RES", 1)
    monkeypatch.setattr(builder.grid, "SHARD_CELLS", 2_000)  # resolution 3 in about 20 parts

    def refused(res):
        raise AssertionError(f"the build listed every land cell of resolution {res}")

    monkeypatch.setattr(builder.landmask, "land_cells", refused)
    build(TOY, resolutions="2-3", output=tmp_path, device="cpu", progress=False)
    manifest = read_manifest(tmp_path / "toy")
    assert len(manifest["resolutions"]["3"]["parts"]) > 10
    for res, land in expected.items():
        table = pq.read_table(tmp_path / "toy" / "data" / f"res={res}", columns=["cell", "land"])
        cells, flags = table.column("cell").to_numpy(), table.column("land").to_numpy(zero_copy_only=False)
        np.testing.assert_array_equal(flags, np.isin(cells, land))
        np.testing.assert_array_equal(np.load(tmp_path / "toy" / f"land/res={res}.npy"), land)
        assert manifest["resolutions"][str(res)]["land"]["cells"] == len(land)
    assert validate_dataset(tmp_path / "toy") == []

    assert validate_dataset(tmp_path / "toy") == []


def test_a_failure_while_a_shard_is_being_written_leaves_no_half_store(tmp_path, monkeypatch) -> None:

    import builder.encode
    import builder.write

    real_write, real_encode, calls = builder.write.write_shard, builder.encode.encode_stored, {"n": 0}

    def slow_write(*args):
        time.sleep(0.5)  # still writing (and then feeding the Zarr store) when the encoder fails
        return real_write(*args)

    def failing_encode(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # call 1 encodes a shard (no training sample: res 5 of the toy is exact)
            raise RuntimeError("encoder failed")
        return real_encode(*args)

    monkeypatch.setattr(builder.write, "write_shard", slow_write)
    monkeypatch.setattr(builder.encode, "encode_stored", failing_encode)
    _small_shards(monkeypatch)
    with pytest.raises(RuntimeError, match="encoder failed"):
        build(TOY, resolutions="5", output=tmp_path, device="cpu", progress=False, formats="zarr")
    time.sleep(0.7)  # a write left running would have finished by now
    assert not list((tmp_path / "toy").rglob("*.tmpdir"))
    assert len(list((tmp_path / "toy" / "data").rglob("*.parquet"))) == 1  # the shard written is kept


def test_the_land_file_is_counted_from_the_shards_records_or_their_parts(tmp_path) -> None:
    """The land file's length comes from the shards' done records (no pass over the parts);
    records written before they held it count the parts' land columns; a count that does not
    match the parts is an error, never a short or padded file."""
    from builder.finish import ShardSource, _write_land
    from builder.write import write_shard
    from catalog.errors import AtlasCorruptError
    from catalog.storage import open_store

    store = open_store(tmp_path / "atlas")
    records, flagged = [], []
    for shard in plan_shards([5])[:2]:
        cells = shard_cells(shard)
        land = np.arange(len(cells)) % 3 == 0
        stored = np.ones((len(cells), 4), np.float16)
        records.append(write_shard(store, shard, cells, stored, {}, land))
        flagged.append(cells[land])
    expected = np.concatenate(flagged)
    assert [r["land_rows"] for r in records] == [len(f) for f in flagged]
    for rows in (records, [{k: v for k, v in r.items() if k != "land_rows"} for r in records]):
        out = tmp_path / "land.npy"
        assert _write_land(out, ShardSource(store, rows, 4, "float16"), None) == len(expected)
        np.testing.assert_array_equal(np.load(out), expected)
    wrong = [{**records[0], "land_rows": records[0]["land_rows"] + 1}, records[1]]
    with pytest.raises(AtlasCorruptError, match="land flags changed"):
        _write_land(tmp_path / "bad.npy", ShardSource(store, wrong, 4, "float16"), None)
