"""The xarray backend: format 2 opened lazily in place, answering as the query layer and xdggs expect."""

from __future__ import annotations

import copy
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import query
from catalog import blocks
from catalog.cells import cells_to_latlng, latlng_to_cells
from catalog.errors import AtlasChangedError, UnknownEncoderError, UnknownResolutionError
from catalog.manifest import read_manifest

xr = pytest.importorskip("xarray")
xdggs = pytest.importorskip("xdggs")

from query.xarray_backend import HexatlasBackendEntrypoint as Engine  # noqa: E402  (needs xarray)

TOY = "tests.data.toy_encoder:load"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy model at resolutions 1 and 3, resolution 3 (41,162 cells) in several parts of
    several blocks each (the last block of each part shorter)."""
    import builder.grid
    from builder.build import build

    out = tmp_path_factory.mktemp("xarray")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builder.grid, "SINGLE_SHARD_MAX_RES", 2)
        mp.setattr(builder.grid, "SHARD_CELLS", 12_000)  # about 3 blocks of 4,096 cells a part
        build(TOY, resolutions="1,3", output=out, device="cpu", progress=False)
    parts = read_manifest(out / "toy")["resolutions"]["3"]["parts"]
    assert len(parts) > 2 and all(p["rows"] > 4096 for p in parts) and any(p["rows"] % 4096 for p in parts)
    return out


@pytest.fixture(scope="module")
def reference(toy):
    """Every cell of resolution 3 and its embedding as the query layer reads them (float32)."""
    cells, _ = query.open(toy)._data("toy", 3).scan()
    return cells, query.open(toy)._data("toy", 3).vectors(cells)


@pytest.fixture
def reads(monkeypatch):
    """Each block run this process checks, as (part path, block, "cells" or "values")."""
    seen = []
    real = blocks.Part._check

    def counting(self, b, run, data):
        seen.append((self.info.path, b, run))
        return real(self, b, run, data)

    monkeypatch.setattr(blocks.Part, "_check", counting)
    return seen


def _block_of(atlas, cell):
    """(part path, block) holding a cell of resolution 3."""
    for part in read_manifest(atlas / "toy")["resolutions"]["3"]["parts"]:
        if part["first_cell"] <= cell <= part["last_cell"]:
            table = np.load(atlas / "toy" / part["blocks"])
            return part["path"], int(np.searchsorted(table["first_cell"], np.uint64(cell), side="right")) - 1
    raise AssertionError("no part holds the cell")


def _points(n, seed):
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def test_opening_reads_no_block_and_a_selection_only_its_blocks(toy, reads) -> None:
    ds = xr.open_dataset(toy, engine=Engine, res=3)
    assert not reads
    assert dict(ds.sizes) == {"cells": 41162, "dim": 4} and ds.embedding.dtype == np.float32
    assert ds.cell_ids.dtype == np.uint64 and ds.cell_ids.attrs == {"grid_name": "h3", "level": 3}
    assert not ds.embedding.variable._in_memory and not ds.cell_ids.variable._in_memory
    assert ds.attrs["hexatlas_res"] == 3 and ds.attrs["provenance_model"] == "toy"
    repr(ds)  # shows no values: reads nothing
    assert not reads
    ds.embedding[4100:4102].values  # rows in the second block of the first part
    assert sorted({(r[1], r[2]) for r in reads}) == [(1, "cells"), (1, "values")]
    assert len({r[0] for r in reads}) == 1
    reads.clear()
    ds.cell_ids[[5, 40_000]].values
    assert [r[2] for r in reads] == ["cells", "cells"] and len({r[0] for r in reads}) == 2  # no values read


def test_the_dataset_is_what_the_query_layer_reads(toy, reference) -> None:
    cells, vectors = reference
    ds = xr.open_dataset(toy, engine=Engine, res=3)
    np.testing.assert_array_equal(ds.cell_ids.values, cells)
    np.testing.assert_array_equal(ds.embedding.values, vectors)
    lat, lon = cells_to_latlng(cells[::97])
    np.testing.assert_array_equal(ds.lat[::97].values, lat)
    np.testing.assert_array_equal(ds.lon[::97].values, lon)
    small = xr.open_dataset(toy / "toy", engine=Engine, res=1)  # the dataset folder itself
    assert small.sizes["cells"] == 842 and small.cell_ids.attrs["level"] == 1
    assert xr.open_dataset(toy, engine=Engine).sizes["cells"] == 41162  # default: the finest resolution


@pytest.mark.parametrize("key", [
    (slice(None), slice(None)), (slice(4090, 4200), slice(None)), (slice(10, 30_000, 977), 2),
    (slice(None, None, -1301), slice(1, 3)), (-1, slice(None)), (0, 3), (slice(41_000, 10), slice(None)),
    ([40_000, 3, 3, 17_000, 4095, 4096, -2], [3, 0]), (np.arange(0, 41162, 4096), slice(None)),
])
def test_indexing_matches_numpy(toy, reference, key) -> None:
    _, vectors = reference
    rows, dims = key
    ds = xr.open_dataset(toy, engine=Engine, res=3)
    expected = vectors[rows][..., dims] if isinstance(rows, int) else vectors[rows][:, dims]
    np.testing.assert_array_equal(ds.embedding[rows, dims].values, expected)


def test_vectorized_indexing_and_bounds(toy, reference) -> None:
    _, vectors = reference
    ds = xr.open_dataset(toy, engine=Engine, res=3)
    rows, dims = xr.DataArray([7, 30_000, 12], dims="p"), xr.DataArray([1, 0, 3], dims="p")
    np.testing.assert_array_equal(ds.embedding[rows, dims].values, vectors[[7, 30_000, 12], [1, 0, 3]])
    with pytest.raises(IndexError):
        ds.embedding[41162].values


def test_xdggs_decodes_it_and_sel_latlon_answers_as_lookup(toy, reads) -> None:
    ds = xdggs.decode(xr.open_dataset(toy, engine=Engine, res=3))
    assert ds.dggs.grid_info.level == 3 and type(ds.dggs.grid_info).__name__ == "H3Info"
    assert {r[2] for r in reads} == {"cells"}  # decoding reads the cell ids, no embedding
    reads.clear()
    lat, lon = _points(50, 3)
    picked = ds.dggs.sel_latlon(lat, lon)
    got = picked.embedding.values
    assert {r[2] for r in reads} == {"values"}  # the blocks holding the points, nothing else
    assert {r[:2] for r in reads} == {_block_of(toy, c) for c in latlng_to_cells(lat, lon, 3)}
    np.testing.assert_array_equal(got, query.open(toy).lookup(lat, lon, res=3))
    np.testing.assert_array_equal(picked.cell_ids.values, latlng_to_cells(lat, lon, 3))
    centres = ds.dggs.assign_latlon_coords()
    np.testing.assert_allclose(centres.latitude[:50].values, ds.lat[:50].values, atol=1e-9)


def test_an_int8_atlas_reads_dequantised(tmp_path) -> None:
    from builder.build import build

    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False, precision="int8")
    ds = xr.open_dataset(tmp_path, engine=Engine, res=2)
    assert ds.attrs["precision"] == "int8" and ds.embedding.dtype == np.float32
    lat, lon = _points(200, 4)
    np.testing.assert_array_equal(xdggs.decode(ds).dggs.sel_latlon(lat, lon).embedding.values,
                                  query.open(tmp_path).lookup(lat, lon, res=2))
    _, vectors = query.open(tmp_path)._data("toy", 2).scan()
    np.testing.assert_array_equal(ds.embedding[:, 1:3].values, vectors[:, 1:3])


def test_the_zarr_face_and_the_backend_agree(tmp_path) -> None:
    from builder.build import build

    build(TOY, resolutions="2", output=tmp_path, device="cpu", progress=False, formats="parquet,zarr")
    face = xr.open_zarr(tmp_path / "toy" / read_manifest(tmp_path / "toy")["resolutions"]["2"]["zarr"])
    ds = xr.open_dataset(tmp_path, engine=Engine, res=2)
    assert ds.cell_ids.attrs == face.cell_ids.attrs
    np.testing.assert_array_equal(ds.cell_ids.values, face.cell_ids.values)
    np.testing.assert_array_equal(ds.embedding.values, face.embedding.values.astype(np.float32))
    np.testing.assert_array_equal(ds.lat.values, face.lat.values)


def test_choosing_the_model_and_resolution(toy, tmp_path) -> None:
    shutil.copytree(toy / "toy", tmp_path / "toy")
    shutil.copytree(toy / "toy", tmp_path / "toy-copy")
    with pytest.raises(UnknownEncoderError, match="choose one with model=: toy, toy-copy"):
        xr.open_dataset(tmp_path, engine=Engine, res=3)
    chosen = xr.open_dataset(tmp_path, engine=Engine, res=1, model="toy-copy")
    assert chosen.attrs["hexatlas_dataset"] == "toy-copy"
    with pytest.raises(UnknownResolutionError, match="built: 1, 3"):
        xr.open_dataset(toy, engine=Engine, res=2)
    ds = xr.open_dataset(toy, engine=Engine, res=1, drop_variables=["lat", "lon"])
    assert set(ds.variables) == {"embedding", "cell_ids"}


def test_copies_and_pickles_read_the_same(toy, reference) -> None:
    cells, vectors = reference
    ds = xr.open_dataset(toy, engine=Engine, res=3)
    again = pickle.loads(pickle.dumps(ds))  # opens the atlas again (a dask worker would)
    np.testing.assert_array_equal(again.embedding[100:9000].values, vectors[100:9000])
    np.testing.assert_array_equal(copy.deepcopy(ds).cell_ids[-5:].values, cells[-5:])
    ds.close()
    np.testing.assert_array_equal(ds.embedding[7].values, vectors[7])  # closed, opened again on use


def test_a_rebuild_since_opening_is_named(tmp_path) -> None:
    from builder.build import build

    build(TOY, resolutions="1", output=tmp_path, device="cpu", progress=False)
    ds = xr.open_dataset(tmp_path, engine=Engine, res=1)
    pickled = pickle.dumps(ds)
    build(TOY, resolutions="1", output=tmp_path, device="cpu", progress=False, overwrite=True)
    with pytest.raises(AtlasChangedError, match="rebuilt"):
        ds.embedding.values
    with pytest.raises(AtlasChangedError, match="rebuilt"):
        pickle.loads(pickled).cell_ids.values
    assert xr.open_dataset(tmp_path, engine=Engine, res=1).embedding.shape == (842, 4)


def test_guess_can_open(toy, tmp_path) -> None:
    engine = Engine()
    assert engine.guess_can_open(toy) and engine.guess_can_open(str(toy / "toy"))
    assert not engine.guess_can_open(tmp_path) and not engine.guess_can_open(toy / "toy" / "manifest.json")
    assert not engine.guess_can_open("https://example.org/atlas") and not engine.guess_can_open(b"bytes")


def test_engine_hexatlas_by_name(toy, reference) -> None:
    """``engine="hexatlas"`` by name, through the installed distribution's entry point (skipped
    only where the installed distribution lacks it: one installed before the backend)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        points = distribution("hexatlas").entry_points
    except PackageNotFoundError:
        points = ()
    if not any(p.group == "xarray.backends" and p.name == "hexatlas" for p in points):
        pytest.skip("the installed hexatlas distribution has no xarray.backends entry point 'hexatlas' "
                    "(installed before the backend): pip install -e . again")
    assert "hexatlas" in xr.backends.list_engines()
    ds = xr.open_dataset(toy, engine="hexatlas", res=3)
    np.testing.assert_array_equal(ds.embedding[:10].values, reference[1][:10])
    assert xr.open_dataset(toy, res=3).sizes["cells"] == 41162  # guessed from the folder


def test_remote_atlas_reads_as_the_local_one(toy, reference, monkeypatch) -> None:
    from tests.data.http_server import HUB_REPO, nginx

    cells, vectors = reference
    lat, lon = _points(30, 5)
    with nginx(toy) as base:
        ds = xr.open_dataset(f"{base}/atlas/toy", engine=Engine, res=3)
        np.testing.assert_array_equal(ds.cell_ids.values, cells)
        np.testing.assert_array_equal(ds.embedding[[3, 40_000, 20_000]].values, vectors[[3, 40_000, 20_000]])
        np.testing.assert_array_equal(xdggs.decode(ds).dggs.sel_latlon(lat, lon).embedding.values,
                                      query.open(toy).lookup(lat, lon, res=3))
        monkeypatch.setenv("HF_ENDPOINT", base)  # nginx lays the folder out as the Hub's URLs
        hub = xr.open_dataset(f"hf://datasets/{HUB_REPO}/toy", engine=Engine, res=3)
        np.testing.assert_array_equal(hub.embedding[-4097:-4090].values, vectors[-4097:-4090])


def test_an_s3_atlas_reads_as_the_local_one(tmp_path) -> None:
    pytest.importorskip("moto")
    import logging

    from builder.build import build
    from tests.data.s3_server import BUCKET, s3_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    build(TOY, resolutions="1", output=tmp_path, device="cpu", progress=False)
    with s3_server():
        build(TOY, resolutions="1", output=f"s3://{BUCKET}/atlas", device="cpu", progress=False)
        ds = xr.open_dataset(f"s3://{BUCKET}/atlas", engine=Engine, res=1)
        near = xr.open_dataset(tmp_path, engine=Engine, res=1)
        np.testing.assert_array_equal(ds.cell_ids.values, near.cell_ids.values)
        np.testing.assert_array_equal(ds.embedding[::3].values, near.embedding[::3].values)


def test_no_torch_needed(toy, tmp_path) -> None:
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now fails
        import xarray as xr, xdggs
        from query.xarray_backend import HexatlasBackendEntrypoint
        ds = xdggs.decode(xr.open_dataset({str(toy)!r}, engine=HexatlasBackendEntrypoint, res=3))
        assert ds.dggs.sel_latlon([48.85], [2.35]).embedding.values.shape == (1, 4)
        leaked = [m for m in sys.modules if m in ("torch", "builder") or m.startswith(("torch.", "builder."))]
        assert not [m for m in leaked if sys.modules[m] is not None], leaked
        """)
    subprocess.run([sys.executable, "-c", code], check=True,
                   env={**__import__("os").environ, "HEXATLAS_CACHE": str(tmp_path / "cache")})
