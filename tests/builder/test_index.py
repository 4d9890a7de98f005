"""The FAISS index stage: normalisation, the exact k-th score, and the tuned approximate index."""

from __future__ import annotations

import faiss
import h3.api.numpy_int as h3i
import numpy as np
import pyarrow.parquet as pq
import pytest
import xarray as xr

from builder import finish
from builder.build import build
from builder.finish import IndexBuilder, ShardSource, _KthBest, ivf_sample
from builder.grid import Shard, cell_centers, shard_cells
from catalog import vector_index
from catalog.errors import AtlasCorruptError
from catalog.manifest import read_manifest
from catalog.storage import open_store
from catalog.tables import embedding_matrix
from catalog.vector_index import ivf_lists, normalize
from query import open as open_atlas
from tests.data.satclip_checkpoint import make_checkpoint

TOY = "tests.data.toy_encoder:load"


def test_normalize_into_out_keeps_the_input_and_zero_rows() -> None:
    vectors = np.array([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]], dtype=np.float16)
    out = np.full((3, 2), np.nan, dtype=np.float32)
    assert normalize(vectors, out=out) is out
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0]], rtol=1e-6)
    assert vectors[0, 0] == 3.0
    same = np.array([[0.0, 2.0]], dtype=np.float32)
    normalize(same, out=same)
    np.testing.assert_array_equal(same, [[0.0, 1.0]])
    with pytest.raises(ValueError, match="2-D"):
        normalize(np.ones(3))


def test_stored_values_convert_to_the_same_floats_whichever_way() -> None:
    rng = np.random.default_rng(5)
    for values in (rng.normal(size=(70_000, 3)).astype(np.float16), rng.integers(-127, 128, (500, 7), np.int8)):
        read_only = values.copy()
        read_only.flags.writeable = False  # as Arrow hands them out: numpy converts these
        for given in (values, read_only, values[::2]):
            out = np.full(given.shape, np.nan, np.float32)
            finish._to_float32(given, out)
            np.testing.assert_array_equal(out, given.astype(np.float32))


def test_kth_best_over_blocks_equals_a_full_sort() -> None:
    rng = np.random.default_rng(1)
    vectors = normalize(rng.normal(size=(5000, 8)))
    queries = vectors[:7].copy()
    full = np.sort(queries @ vectors.T, axis=1)[:, ::-1]
    kth = _KthBest(queries, 10)
    for start in range(0, 5000, 512):
        kth.update(vectors[start:start + 512])
    np.testing.assert_allclose(kth.scores(), full[:, 9], rtol=1e-6)


def _source(tmp_path, vectors, ids, shard_rows=7000):
    """Shards as part files of format 2 (float16), with their done records."""
    from catalog.blocks import write_part
    from catalog.manifest import file_record

    records = []
    for i, start in enumerate(range(0, len(ids), shard_rows)):
        cells = ids[start:start + shard_rows].astype(np.uint64)
        part, table = f"data/res=9/part-{i}.parquet", f"blocks/res=9/part-{i}.blocks"
        for rel in (part, table):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_part(tmp_path / part, tmp_path / table, cells, vectors[start:start + shard_rows].astype(np.float16),
                   metadata={})
        records.append({"path": part, "blocks": table, "rows": len(cells), "first_cell": int(cells[0]),
                        "last_cell": int(cells[-1]), "files": [file_record(tmp_path, part), file_record(tmp_path, table)]})
    return ShardSource(open_store(tmp_path), records, vectors.shape[1], "float16")


def _write_index(tmp_path, source, res, n, dim):
    """The index of the shards in ``source``, its training sample taken from them too."""
    index = IndexBuilder(res, n, dim, source.gather_cells)
    for table in source.tables(("cell", "embedding")):
        index.add(table.column("cell").to_numpy(), source.unit_vectors(table))
    return index.publish(open_store(tmp_path), source)


def test_shard_source_gathers_cells_across_shards_reading_only_their_blocks(tmp_path, monkeypatch) -> None:
    from catalog import blocks

    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(20_000, 6)).astype(np.float32)
    ids = np.arange(20_000, dtype=np.int64) * 3 + 5
    source = _source(tmp_path, vectors, ids)
    read, real = [], blocks.Part._check
    monkeypatch.setattr(blocks.Part, "_check",
                        lambda self, b, run, data: read.append((self.info.path, b)) or real(self, b, run, data))
    got_ids, got = source.gather_cells(np.array([4, 5, 21_003, 21_005, 59_999, 60_005]))  # 4, 21_003, 60_005 absent
    np.testing.assert_array_equal(got_ids, [5, 21_005, 59_999])
    rows = (got_ids - 5) // 3
    np.testing.assert_allclose(got, normalize(vectors[rows].astype(np.float16)), atol=1e-6)
    assert list(dict.fromkeys(read)) == [("data/res=9/part-0.parquet", 0), ("data/res=9/part-1.parquet", 0),
                                         ("data/res=9/part-2.parquet", 1)]  # 7,000 rows a part, 4,096 a block


def test_ivf_sample_spreads_distinct_cells_over_the_sphere_or_the_kept_ones() -> None:
    train, queries = ivf_sample(3, 2000)
    assert len(train) == 2000 == len(np.unique(train)) and np.isin(queries, train).all() and len(queries) == 100
    assert {h3i.get_resolution(c) for c in train[:50]} == {3}
    lat, _ = cell_centers(train)
    assert abs(np.mean(lat > 0) - 0.5) < 0.05 and abs(np.mean(np.abs(lat) < 30) - 0.5) < 0.05  # area-uniform
    keep = np.sort(train[::3])
    kept, _ = ivf_sample(3, 500, keep)
    assert len(kept) == 500 and np.isin(kept, keep).all()
    np.testing.assert_array_equal(ivf_sample(3, 2000)[0], train)  # the same every build


def test_ivf_lists_grow_with_the_square_root() -> None:
    assert ivf_lists(100) == 16
    assert ivf_lists(2_000_000) == 256
    assert ivf_lists(100_000_000) == 2048


def test_large_resolutions_get_an_approximate_index_with_measured_recall(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(vector_index, "EXACT_MAX_CELLS", 10_000)
    ids = shard_cells(Shard(3)).astype(np.int64)  # 41,162 cells: the sample is drawn by place
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, 24))
    vectors = normalize(centres[rng.integers(0, 64, len(ids))] + 0.3 * rng.normal(size=(len(ids), 24)))
    params, record = _write_index(tmp_path, _source(tmp_path, vectors, ids), 3, len(ids), 24)

    assert not params["exact"] and params["type"] == f"IVF{ivf_lists(len(ids))},SQ8"
    assert params["recall_at_10"] >= 0.95 and params["nprobe"] >= 4 and params["cells"] == len(ids)
    index = faiss.read_index(str(tmp_path / params["path"]))
    assert index.ntotal == len(ids) and faiss.extract_index_ivf(index).nprobe == params["nprobe"]
    assert record["bytes"] == (tmp_path / params["path"]).stat().st_size
    _, found = index.search(vectors[:20], 1)
    assert (found[:, 0] == ids[:20]).mean() >= 0.9  # SQ8 codes: the query's own cell comes first


def test_codes_too_large_for_sq8_become_product_quantised(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(vector_index, "EXACT_MAX_CELLS", 10_000)
    monkeypatch.setattr(finish, "SQ8_MAX_BYTES", 1 << 20)  # 41,162 x 64 B of SQ8 codes would pass it
    ids = shard_cells(Shard(3)).astype(np.int64)
    lat, lon = np.radians(cell_centers(ids.astype(np.uint64)))
    xyz = np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)
    rng = np.random.default_rng(0)  # smooth in place, as location embeddings are
    vectors = normalize(np.sin(xyz @ rng.normal(scale=3.0, size=(3, 64)) + rng.uniform(0, 2 * np.pi, 64)))
    params, _ = _write_index(tmp_path, _source(tmp_path, vectors, ids), 3, len(ids), 64)
    assert params["type"] == f"IVF{ivf_lists(len(ids))},PQ8" and params["rerank"] in finish.RERANKS
    assert params["recall_at_10"] >= 0.95  # reached by re-ranking candidates exactly
    index = faiss.read_index(str(tmp_path / params["path"]))
    assert faiss.extract_index_ivf(index).code_size == 8  # a byte per 8 dimensions


def test_an_index_missing_cells_is_refused(tmp_path) -> None:
    vectors = normalize(np.random.default_rng(3).normal(size=(100, 4)))
    with pytest.raises(AtlasCorruptError, match="hold 100 cells, expected 101"):
        _write_index(tmp_path, _source(tmp_path, vectors, np.arange(100)), 1, 101, 4)


def test_a_built_approximate_index_serves_similar(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(vector_index, "EXACT_MAX_CELLS", 1000)
    monkeypatch.setattr(finish, "ZARR_BLOCK_CELLS", 2 * finish.ZARR_CHUNK_CELLS)  # several blocks at res 2
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path / "cache"))
    ckpt = make_checkpoint(tmp_path / "satclip-l10.ckpt", legendre_polys=10)
    build("satclip-vit16-l10", checkpoint=str(ckpt), resolutions="1-2", output=tmp_path / "atlas", device="cpu",
          progress=False, formats="zarr")
    info = read_manifest(tmp_path / "atlas" / "satclip-vit16-l10")["resolutions"]
    assert info["1"]["index"]["exact"] and not info["2"]["index"]["exact"]
    assert info["2"]["index"]["recall_at_10"] >= 0.95
    # written while the shards were encoded: the Zarr store holds exactly the Parquet rows
    dataset = tmp_path / "atlas" / "satclip-vit16-l10"
    table = pq.read_table(dataset / "data" / "res=2")
    ds = xr.open_zarr(dataset / "zarr" / "res=2.zarr")
    np.testing.assert_array_equal(ds.cell_ids.values, table.column("cell").to_numpy())
    np.testing.assert_array_equal(ds.lat.values, cell_centers(table.column("cell").to_numpy())[0])
    np.testing.assert_array_equal(ds.embedding.values, embedding_matrix(table.column("embedding")))
    result = open_atlas(tmp_path / "atlas").similar(lat=48.85, lon=2.35, res=2, k=10)
    scores = result.column("score").to_numpy()
    assert len(result) == 10 and (np.diff(scores) <= 0).all() and scores[0] > 0.999


def test_an_index_that_misses_the_recall_target_stays_exact(tmp_path, monkeypatch, caplog) -> None:
    # the toy's embeddings span a plane: thousands of cells share nearly one direction, which
    # 8-bit codes cannot order, so no nprobe reaches recall 0.95
    monkeypatch.setattr(vector_index, "EXACT_MAX_CELLS", 1000)
    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False)
    info = read_manifest(tmp_path / "toy")["resolutions"]["2"]["index"]
    assert info["exact"] and info["recall_at_10"] == 1.0
    assert "keeping an exact index" in caplog.text


def test_an_index_that_misses_the_target_and_cannot_be_exact_keeps_its_best_setting(tmp_path, monkeypatch,
                                                                                      caplog) -> None:
    monkeypatch.setattr(vector_index, "EXACT_MAX_CELLS", 1000)
    monkeypatch.setattr(finish, "FLAT_MAX_BYTES", 0)  # as at resolution 7, where a flat index would not fit
    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False)
    info = read_manifest(tmp_path / "toy")["resolutions"]["2"]["index"]
    assert not info["exact"] and 0 < info["recall_at_10"] < 0.95 and "met" not in info
    assert "an exact index would not fit, keeping the best setting" in caplog.text
    assert len(open_atlas(tmp_path).similar(lat=10.0, lon=20.0, k=5)) == 5  # still searchable
