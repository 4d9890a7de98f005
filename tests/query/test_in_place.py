"""Format 2 read in place: only the blocks a query needs, each checked; damage is named, never answered."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

import query
from builder.build import build
from catalog import blocks
from catalog.cells import latlng_to_cells
from catalog.errors import AtlasCorruptError
from catalog.manifest import read_manifest

TOY = "tests.data.toy_encoder:load"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("in-place")
    build(TOY, resolutions="0-3", output=out, device="cpu", progress=False)
    return out


@pytest.fixture
def copy(toy, tmp_path):
    shutil.copytree(toy, tmp_path / "atlas")
    return tmp_path / "atlas"


def _block_of(dataset, res, cell):
    """(part path, block index, block entry) holding ``cell``."""
    info = read_manifest(dataset)["resolutions"][str(res)]
    for part in info["parts"]:
        if part["first_cell"] <= cell <= part["last_cell"]:
            table = np.load(dataset / part["blocks"])
            b = int(np.searchsorted(table["first_cell"], np.uint64(cell), side="right")) - 1
            return dataset / part["path"], b, table[b]
    raise AssertionError("no part holds the cell")


def test_a_lookup_reads_one_block_and_opening_reads_none(toy, monkeypatch) -> None:
    reads = []
    real = blocks.Part._check

    def counting(self, b, run, data):
        reads.append((self.info.path, b, run))
        return real(self, b, run, data)

    monkeypatch.setattr(blocks.Part, "_check", counting)
    atlas = query.open(toy)
    assert atlas.info()["toy"]["format_version"] == 2 and not reads
    assert not atlas._loaded  # no resolution opened, no block table read
    emb = atlas.lookup([48.85], [2.35], res=3)
    assert [r[2] for r in reads] == ["cells", "values"] and len({r[:2] for r in reads}) == 1  # one block
    assert emb.shape == (1, 4)
    info = read_manifest(toy / "toy")["resolutions"]["3"]
    assert info["block_rows"] == blocks.block_rows(4, "float16") and len(info["parts"]) == 1


def test_results_equal_a_plain_parquet_read(toy) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(toy / "toy" / "data" / "res=3")
    cells = table.column("cell").to_numpy()
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    atlas = query.open(toy)
    rng = np.random.default_rng(3)
    pick = rng.choice(len(cells), 5000, replace=False)
    got = atlas._data("toy", 3).vectors(cells[pick])
    np.testing.assert_array_equal(got, stored[pick])
    missing = atlas._data("toy", 3).vectors(np.array([0, cells[0] - 1, cells[-1] + 1], np.uint64))
    assert np.isnan(missing).all()
    between = cells[pick[:100]] + np.uint64(1)  # inside a block's range, but not cells the atlas holds
    mixed = atlas._data("toy", 3).vectors(np.concatenate([between, cells[pick[:100]]]))
    assert np.isnan(mixed[:100]).all()
    np.testing.assert_array_equal(mixed[100:], stored[pick[:100]])
    everything = atlas._data("toy", 3).scan()
    np.testing.assert_array_equal(everything[0], cells)
    np.testing.assert_array_equal(everything[1], stored)


def test_points_that_share_a_cell_read_its_row_once(toy, monkeypatch) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(toy / "toy" / "data" / "res=3")
    cells = table.column("cell").to_numpy()
    stored = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    rng = np.random.default_rng(4)
    pick = rng.choice(len(cells), 300, replace=False)
    many = rng.choice(pick, 20_000)  # 20,000 points in 300 cells, with cells the atlas lacks among them
    asked = np.concatenate([cells[many], cells[pick[:50]] + np.uint64(1), cells[many[:10]]])
    reads, real = [], blocks.os.pread
    monkeypatch.setattr(blocks.os, "pread", lambda fd, n, at: (reads.append(n), real(fd, n, at))[1])
    got = query.open(toy)._data("toy", 3).vectors(asked)
    np.testing.assert_array_equal(got[:20_000], stored[many])
    np.testing.assert_array_equal(got[-10:], stored[many[:10]])
    assert np.isnan(got[20_000:-10]).all()
    assert reads.count(4 * 2) == 300  # one read of a row (4 float16s) per cell held; the rest check runs


def test_an_altered_block_is_named_and_the_others_still_answer(copy) -> None:
    dataset = copy / "toy"
    cell = int(latlng_to_cells(np.array([48.85]), np.array([2.35]), 3)[0])
    path, b, entry = _block_of(dataset, 3, cell)
    data = bytearray(path.read_bytes())
    data[int(entry["values_offset"]) + 5] ^= 0x40
    path.write_bytes(bytes(data))
    atlas = query.open(copy)
    with pytest.raises(AtlasCorruptError, match=rf"part-all.parquet: block {b} .*does not match its checksum.*validate"):
        atlas.lookup([48.85], [2.35], res=3)
    far = atlas.lookup([-45.0], [170.0], res=3)  # another block of the same file
    assert np.isfinite(far).all()
    with pytest.raises(AtlasCorruptError, match="does not match its checksum"):  # and again: never a wrong answer
        atlas.lookup([48.85], [2.35], res=3)


def test_a_truncated_or_missing_part_or_table_is_named(copy) -> None:
    dataset = copy / "toy"
    part = dataset / "data" / "res=3" / "part-all.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(AtlasCorruptError, match=r"part-all.parquet has [\d,]+ bytes, its manifest says .*truncated"):
        query.open(copy).lookup([0.0], [0.0], res=3)
    (dataset / "data" / "res=2" / "part-all.parquet").unlink()
    with pytest.raises(AtlasCorruptError, match="res=2/part-all.parquet is missing; run 'hexatlas validate"):
        query.open(copy).lookup([0.0], [0.0], res=2)
    table = dataset / "blocks" / "res=1" / "part-all.blocks"
    table.write_bytes(table.read_bytes()[:-8])
    with pytest.raises(AtlasCorruptError, match="part-all.blocks does not match the sha256 in its manifest"):
        query.open(copy).lookup([0.0], [0.0], res=1)
    assert np.isfinite(query.open(copy).lookup([0.0], [0.0], res=0)).all()


def test_a_format_1_atlas_is_refused_with_what_to_do(copy) -> None:
    path = copy / "toy" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(AtlasCorruptError, match="format-1 atlas .*Rebuild it .*--overwrite"):
        query.open(copy)


def test_int8_reads_in_place_and_in_sql(tmp_path) -> None:
    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False, precision="int8")
    atlas = query.open(tmp_path)
    lat, lon = np.array([10.0, -60.0, 80.0]), np.array([20.0, 100.0, -170.0])
    emb = atlas.lookup(lat, lon)
    exact = __import__("tests.data.toy_encoder", fromlist=["load"]).load(device="cpu").encode(lat=lat, lon=lon)
    assert np.abs(emb - exact).max() < 0.05 * np.abs(exact).max()  # the cell's centre, quantised
    con = atlas.connect()
    con.register("pts", pa.table({"lat": lat, "lon": lon}))
    via_sql = con.sql("SELECT hexatlas_embedding(lat, lon, 2) AS e FROM pts").to_arrow_table()
    np.testing.assert_allclose(np.array(via_sql.column("e").to_pylist(), np.float32), emb)
    view = con.sql("SELECT e.embedding FROM pts p JOIN embeddings e ON e.cell = h3_latlng_to_cell(p.lat, p.lon, 2) "
                   "AND e.res = 2 ORDER BY p.lat").to_arrow_table()
    np.testing.assert_allclose(np.array(view.column("embedding").to_pylist(), np.float32), emb[np.argsort(lat)],
                               rtol=1e-6)
    # one model: the function and the view give the fixed-size FLOAT[4]
    types = con.sql("SELECT typeof(hexatlas_embedding(p.lat, p.lon, 2)), typeof(e.embedding) FROM pts p "
                    "JOIN embeddings e ON e.cell = h3_latlng_to_cell(p.lat, p.lon, 2) AND e.res = 2").fetchall()
    assert set(types) == {("FLOAT[4]", "FLOAT[4]")}


def test_the_zarr_face_is_what_xdggs_decodes(tmp_path) -> None:
    xr = pytest.importorskip("xarray")
    xdggs = pytest.importorskip("xdggs")
    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False, formats="parquet,zarr")
    manifest = read_manifest(tmp_path / "toy")
    ds = xdggs.decode(xr.open_zarr(tmp_path / "toy" / manifest["resolutions"]["2"]["zarr"]))
    assert ds.dggs.grid_info.level == 2 and type(ds.dggs.grid_info).__name__.lower().startswith("h3")
    cells, stored = query.open(tmp_path)._data("toy", 2).scan()
    np.testing.assert_array_equal(ds.cell_ids.values, cells)
    np.testing.assert_array_equal(ds.embedding.values.astype(np.float32), stored)
    plain = tmp_path / "plain"
    build(TOY, resolutions="2", output=plain, device="cpu", progress=False)
    assert not (plain / "toy" / "zarr").exists() and read_manifest(plain / "toy")["resolutions"]["2"]["zarr"] is None


def test_concurrent_readers_get_what_one_reader_gets(toy, monkeypatch) -> None:
    """The server's thread pool shares one Atlas: parts opened, checked and indexed by several
    threads at once must still answer every query exactly."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(blocks, "CELL_INDEX_BYTES", 4 * 8 * 4096)  # cell runs replaced in the slab mid-run
    rng = np.random.default_rng(11)
    queries = [(np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n))
               for n in rng.integers(1, 400, 64)]
    expected = [query.open(toy).lookup(lat, lon, res=3) for lat, lon in queries]
    shared = query.open(toy)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: shared.lookup(q[0], q[1], res=3), queries))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_land_only_atlas_has_no_answer_at_sea(tmp_path) -> None:
    pytest.importorskip("global_land_mask")
    from catalog.errors import InvalidCoordinateError

    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False, land_only=True)
    atlas = query.open(tmp_path)
    lat, lon = np.array([48.85, 0.0, -33.87]), np.array([2.35, -140.0, 151.21])  # Paris, the Pacific, Sydney
    emb = atlas.lookup(lat, lon, on_invalid="null")
    assert np.isfinite(emb[[0, 2]]).all() and np.isnan(emb[1]).all()
    with pytest.raises(InvalidCoordinateError, match="1 of 3 points fall in cells this atlas does not hold"):
        atlas.lookup(lat, lon)


def test_cell_ids_kept_in_memory_stay_within_their_budget(tmp_path, monkeypatch) -> None:
    """The cell runs a resolution keeps fill a slab of at most CELL_INDEX_BYTES; a batch that
    needs more blocks is located in pieces, and every answer equals that of an unbounded reader."""
    import builder.grid

    monkeypatch.setattr(builder.grid, "SINGLE_SHARD_MAX_RES", 2)
    monkeypatch.setattr(builder.grid, "SHARD_CELLS", 7**3)  # resolution 4 in 840 parts
    build(TOY, resolutions="4", output=tmp_path, device="cpu", progress=False)
    lat, lon = np.degrees(np.arcsin(np.random.default_rng(5).uniform(-1, 1, 20_000))), \
        np.random.default_rng(6).uniform(-180, 180, 20_000)
    expected = query.open(tmp_path).lookup(lat, lon)  # the default budget holds every run
    width = query.open(tmp_path)._data("toy", 4).reader.block_size
    monkeypatch.setattr(blocks, "CELL_INDEX_BYTES", 3 * 8 * width)  # three blocks' runs
    atlas = query.open(tmp_path)
    for _ in range(2):
        np.testing.assert_array_equal(atlas.lookup(lat, lon), expected)
    for n in (1, 7, 500):  # small batches after big ones: rows reused, answers still exact
        np.testing.assert_array_equal(atlas.lookup(lat[:n], lon[:n]), expected[:n])
    reader = atlas._data("toy", 4).reader
    directory = reader._directory
    assert len(reader.infos) > 100 and directory.slab.nbytes <= 3 * 8 * width
    assert (directory.slot > 0).sum() <= 3
