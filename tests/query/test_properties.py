"""Properties of coordinates and cells (Hypothesis), against h3 and the stored Parquet.

The reference for every lookup is independent of the reader: the cell ``h3.latlng_to_cell``
names, and that cell's row read from the atlas's Parquet files with pyarrow. Points are
drawn anywhere on the globe and from a list of hard places: the poles, both sides of the
antimeridian (lon 180 and -180), and the centres of and points beside the pentagons.

Example counts come from the Hypothesis profile (``tests/conftest.py``): a few dozen in the
default run, more with ``pytest --hypothesis-profile=slow``.
"""

from __future__ import annotations

import math
import re
from importlib.util import find_spec

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("hypothesis")
import h3
from hypothesis import given
from hypothesis import strategies as st

import query
from catalog.errors import InvalidCoordinateError, UnknownResolutionError

MODEL, TOY = "satclip-vit16-l10", "toy"  # res 0-2 stored as float32; res 1 stored as float16
BUILT = [(MODEL, 0), (MODEL, 1), (MODEL, 2), (TOY, 1)]


def _hard_places() -> list[tuple[float, float]]:
    places = [(90.0, 0.0), (-90.0, 0.0), (90.0, -180.0), (-90.0, 180.0), (0.0, 180.0), (0.0, -180.0),
              (45.0, 180.0), (45.0, -180.0), (-60.0, 179.9999999), (-60.0, -179.9999999), (89.99999, 17.0),
              (-89.99999, -123.0), (-0.0, -0.0), (5e-324, -5e-324)]
    for res in range(3):
        for pentagon in h3.get_pentagons(res):
            lat, lon = h3.cell_to_latlng(pentagon)
            places += [(lat, lon), (lat + 0.05, lon), (lat, max(lon - 0.05, -180.0))]
    return places


HARD = _hard_places()
PLACES = st.one_of(st.sampled_from(HARD), st.tuples(st.floats(-90, 90), st.floats(-180, 180)))
POINTS = st.lists(PLACES, min_size=1, max_size=40)
# Invalid as a latitude and as a longitude alike.
BAD = st.sampled_from([math.nan, math.inf, -math.inf, None, 180.000001, -180.5, 1e300, -1e300])
HAVE_POLARS = find_spec("polars") is not None
KINDS = ["arrow", "pandas"] + (["polars"] if HAVE_POLARS else [])  # polars: tested where installed


@pytest.fixture(scope="module")
def atlas(atlas_dir):
    return query.open(atlas_dir[0])


@pytest.fixture(scope="module")
def stored(atlas_dir):
    """(model, res) -> (cells ascending, float32 embeddings), read as plain Parquet."""
    out = {}
    for model, res in BUILT:
        table = pq.read_table(atlas_dir[0] / model / "data" / f"res={res}")
        cells = table.column("cell").to_numpy()
        emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
        order = np.argsort(cells)
        assert len(cells) == 2 + 120 * 7**res  # a global atlas: every cell, so every point has one
        out[model, res] = cells[order], emb[order]
    return out


def h3_cells(lat, lon, res: int) -> np.ndarray:
    return np.array([h3.str_to_int(h3.latlng_to_cell(a, o, res)) for a, o in zip(lat, lon)], dtype=np.uint64)


def rows(stored, model: str, res: int, cells: np.ndarray) -> np.ndarray:
    held, emb = stored[model, res]
    at = np.minimum(np.searchsorted(held, cells), len(held) - 1)
    assert (held[at] == cells).all(), "a cell h3 names is missing from the stored Parquet"
    return emb[at]


def split(points) -> tuple[np.ndarray, np.ndarray]:
    lat, lon = np.array(points, dtype=np.float64).reshape(-1, 2).T
    return lat, lon


@given(points=POINTS, which=st.sampled_from(BUILT))
def test_lookup_is_the_stored_embedding_of_the_cell_h3_names(atlas, stored, points, which) -> None:
    model, res = which
    lat, lon = split(points)
    got = atlas.lookup(lat, lon, res=res, model=model)
    assert got.dtype == np.float32 and got.shape == (len(lat), atlas.dim(model))
    np.testing.assert_array_equal(got, rows(stored, model, res, h3_cells(lat, lon, res)))


@given(lat=st.floats(-90, 90), which=st.sampled_from(BUILT))
def test_both_sides_of_the_antimeridian_are_one_place(atlas, stored, lat, which) -> None:
    model, res = which
    east, west = (atlas.lookup([lat], [lon], res=res, model=model) for lon in (180.0, -180.0))
    np.testing.assert_array_equal(east, west)
    np.testing.assert_array_equal(east, rows(stored, model, res, h3_cells([lat], [180.0], res)))


@given(points=POINTS, kind=st.sampled_from(["list", "tuple", "float32", "scalar", *KINDS]))
def test_every_array_kind_gives_the_same_lookup(atlas, stored, points, kind) -> None:
    lat, lon = split(points)
    if kind == "float32":  # float32 degrees are looked up as the exact float64 values they hold
        lat, lon = lat.astype(np.float32), lon.astype(np.float32)
        args = lat, lon
    elif kind == "list":
        args = lat.tolist(), lon.tolist()
    elif kind == "tuple":
        args = tuple(lat.tolist()), tuple(lon.tolist())
    elif kind == "pandas":
        pd = pytest.importorskip("pandas")
        args = pd.Series(lat), pd.Series(lon)
    elif kind == "polars":
        pl = pytest.importorskip("polars")
        args = pl.Series(lat), pl.Series(lon)
    elif kind == "arrow":
        args = pa.array(lat), pa.array(lon)
    else:
        lat, lon = lat[:1], lon[:1]
        args = float(lat[0]), float(lon[0])
    got = atlas.lookup(*args, res=2, model=MODEL)
    want = rows(stored, MODEL, 2, h3_cells(lat.astype(np.float64), lon.astype(np.float64), 2))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("res", range(16))
def test_every_h3_resolution_is_served_or_clearly_refused(atlas, stored, res) -> None:
    lat, lon = split(HARD)
    built = [r for m, r in BUILT if m == MODEL]
    if res in built:
        np.testing.assert_array_equal(atlas.lookup(lat, lon, res=res, model=MODEL),
                                      rows(stored, MODEL, res, h3_cells(lat, lon, res)))
        return
    message = f"resolution {res} is not in this atlas for {MODEL}; built: 0, 1, 2"
    with pytest.raises(UnknownResolutionError, match=message):
        atlas.lookup(lat, lon, res=res, model=MODEL)
    with pytest.raises(UnknownResolutionError, match=message):
        atlas.join(pa.table({"lat": lat, "lon": lon}), res=res, model=MODEL, interpolate=True)


@pytest.mark.parametrize("res", [-1, 16, 2.0, "2", True, np.float64(1)])
def test_a_resolution_that_is_no_h3_resolution_is_refused(atlas, res) -> None:
    message = f"resolution {re.escape(repr(res))} is not in this atlas.*built: 0, 1, 2"
    with pytest.raises(UnknownResolutionError, match=message):
        atlas.lookup([0.0], [0.0], res=res, model=MODEL)


def _with_bad(data, n: int) -> tuple[list, list, np.ndarray]:
    """Points of which some rows hold a NaN, an infinity, a null or an out-of-range value."""
    lat, lon = split(data.draw(st.lists(PLACES, min_size=n, max_size=n)))
    lat_l, lon_l = lat.tolist(), lon.tolist()
    bad = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    for i in np.flatnonzero(bad):
        column = lat_l if data.draw(st.booleans()) else lon_l
        column[i] = data.draw(BAD)
    return lat_l, lon_l, bad


@given(data=st.data(), n=st.integers(0, 30), interpolate=st.booleans())
def test_invalid_points_raise_or_give_nan_rows_in_place(atlas, stored, data, n, interpolate) -> None:
    lat_l, lon_l, bad = _with_bad(data, n)
    lat = np.array([math.nan if v is None else v for v in lat_l])
    lon = np.array([math.nan if v is None else v for v in lon_l])
    got = atlas.lookup(lat, lon, res=1, model=MODEL, interpolate=interpolate, on_invalid="null")
    assert got.shape == (n, atlas.dim(MODEL))
    assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all()
    if not interpolate:
        np.testing.assert_array_equal(got[~bad], rows(stored, MODEL, 1, h3_cells(lat[~bad], lon[~bad], 1)))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        message = f"{int(bad.sum())} of {n} coordinates .* index {first}:"
        with pytest.raises(InvalidCoordinateError, match=message):
            atlas.lookup(lat, lon, res=1, model=MODEL, interpolate=interpolate)


@given(data=st.data(), n=st.integers(0, 30), kind=st.sampled_from(KINDS),
       which=st.sampled_from(BUILT), interpolate=st.booleans())
def test_join_keeps_row_order_columns_and_nulls(atlas, stored, data, n, kind, which, interpolate) -> None:
    model, res = which
    lat_l, lon_l, bad = _with_bad(data, n)
    table = pa.table({"id": np.arange(n)[::-1].copy(), "lat": pa.array(lat_l, pa.float64()),
                      "lon": pa.array(lon_l, pa.float64()), "name": [f"p{i}" for i in range(n)]})
    if kind == "pandas":
        points = pytest.importorskip("pandas").DataFrame(table.to_pydict())
    elif kind == "polars":
        points = pytest.importorskip("polars").from_arrow(table)
    else:
        points = table
    out = atlas.join(points, res=res, model=model, interpolate=interpolate, on_invalid="null")
    assert out.column_names == ["id", "lat", "lon", "name", "cell", "embedding"]
    assert out.column("id").to_pylist() == list(range(n))[::-1]
    assert out.column("name").to_pylist() == [f"p{i}" for i in range(n)]
    assert out.column("cell").is_null().to_pylist() == bad.tolist()
    assert out.column("embedding").is_null().to_pylist() == bad.tolist()
    ok = ~bad
    lat = np.array(lat_l, dtype=object)[ok].astype(np.float64)
    lon = np.array(lon_l, dtype=object)[ok].astype(np.float64)
    cells = h3_cells(lat, lon, res)
    assert out.column("cell").drop_null().to_numpy().tolist() == cells.tolist()
    if ok.any():
        emb = np.stack(out.column("embedding").drop_null().to_numpy(zero_copy_only=False)).astype(np.float32)
        want = atlas.lookup(lat, lon, res=res, model=model, interpolate=interpolate)
        np.testing.assert_array_equal(emb, want)
        if not interpolate:
            np.testing.assert_array_equal(emb, rows(stored, model, res, cells))


@given(points=POINTS, which=st.sampled_from(BUILT))
def test_interpolated_lookup_is_a_convex_blend_of_the_cell_and_its_neighbours(atlas, stored, points,
                                                                              which) -> None:
    from scipy.optimize import nnls

    model, res = which
    lat, lon = split(points)
    got = atlas.lookup(lat, lon, res=res, model=model, interpolate=True)
    assert np.isfinite(got).all()
    for i, cell in enumerate(h3_cells(lat, lon, res)):
        ring = h3.grid_disk(h3.int_to_str(int(cell)), 1)
        disk = np.array([h3.str_to_int(c) for c in ring], dtype=np.uint64)
        assert len(disk) == (6 if h3.is_pentagon(h3.int_to_str(int(cell))) else 7)
        near = rows(stored, model, res, disk).astype(np.float64)
        tol = 1e-6 * max(1.0, float(np.abs(near).max()))  # the blend is rounded to float32
        assert (got[i] >= near.min(axis=0) - tol).all() and (got[i] <= near.max(axis=0) + tol).all()
        # Weights exist that are >= 0 and sum to 1 (the last row, weighted heavily, asks for the sum).
        a = np.vstack([near.T, np.full(len(near), 1e3)])
        weights, residual = nnls(a, np.append(got[i].astype(np.float64), 1e3))
        assert residual <= 1e-5 * (1.0 + np.linalg.norm(got[i])), (residual, weights)


@given(data=st.data(), which=st.sampled_from(BUILT))
def test_a_point_on_a_cell_centre_gets_exactly_that_cells_embedding(atlas, stored, data, which) -> None:
    model, res = which
    held, _ = stored[model, res]
    pentagons = [h3.str_to_int(p) for p in h3.get_pentagons(res)]
    picked = data.draw(st.lists(st.one_of(st.sampled_from(pentagons), st.sampled_from(held.tolist())),
                                min_size=1, max_size=20))
    centres = [h3.cell_to_latlng(h3.int_to_str(c)) for c in picked]
    lat, lon = split(centres)
    got = atlas.lookup(lat, lon, res=res, model=model, interpolate=True)
    np.testing.assert_array_equal(got, rows(stored, model, res, np.array(picked, dtype=np.uint64)))


def test_polars_inputs_when_installed(atlas, stored) -> None:
    pl = pytest.importorskip("polars")  # optional: the strategies above draw it only where installed
    lat, lon = split(HARD)
    want = rows(stored, MODEL, 2, h3_cells(lat, lon, 2))
    np.testing.assert_array_equal(atlas.lookup(pl.Series(lat), pl.Series(lon), res=2, model=MODEL), want)
    frame = pl.DataFrame({"lat": [*lat.tolist(), None], "lon": [*lon.tolist(), 0.0]})
    out = atlas.join(frame, res=2, model=MODEL, on_invalid="null")
    assert out.column("cell").is_null().to_pylist() == [False] * len(lat) + [True]
