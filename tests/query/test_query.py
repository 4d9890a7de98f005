"""The query layer: lookups, joins, similar places and SQL against a built atlas."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import h3.api.numpy_int as h3i
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import query
from catalog.cli import main
from catalog.errors import (
    AtlasCorruptError,
    AtlasNotFoundError,
    InvalidArgumentError,
    InvalidCoordinateError,
    UnknownColumnError,
    UnknownEncoderError,
    UnknownResolutionError,
)
from catalog.manifest import read_manifest
from query import QueryError

MODEL = "satclip-vit16-l10"


@pytest.fixture
def atlas(atlas_dir):
    return query.open(atlas_dir[0])


@pytest.fixture(scope="module")
def stored(atlas_dir):
    table = pq.read_table(atlas_dir[0] / MODEL / "data" / "res=2")  # plain Parquet, as any reader sees it
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    return table.column("cell").to_numpy(), emb


@pytest.fixture(scope="module")
def encoder(atlas_dir):
    from builder.encoders import load_encoder

    return load_encoder(MODEL, checkpoint=atlas_dir[1], device="cpu")


def _points(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def test_lookup_returns_the_stored_embedding_of_the_cell(atlas, stored) -> None:
    lat, lon = _points(500)
    emb = atlas.lookup(lat, lon, model=MODEL)
    assert emb.shape == (500, 256) and emb.dtype == np.float32
    cells, values = stored
    expected = values[np.searchsorted(cells, [h3i.latlng_to_cell(a, o, 2) for a, o in zip(lat, lon)])]
    np.testing.assert_array_equal(emb, expected)
    assert atlas.resolutions(MODEL) == [0, 1, 2] and atlas.models == [MODEL, "toy"]
    coarse = atlas.lookup([10.0], [20.0], res=0, model=MODEL)
    assert not np.allclose(coarse, atlas.lookup([10.0], [20.0], model=MODEL))


def test_lookup_bad_input(atlas) -> None:
    with pytest.raises(UnknownResolutionError, match="built: 0, 1, 2"):
        atlas.lookup([0.0], [0.0], res=5, model=MODEL)
    with pytest.raises(UnknownEncoderError, match="several models.*satclip-vit16-l10, toy"):
        atlas.lookup([0.0], [0.0])
    with pytest.raises(UnknownEncoderError, match="'geoclip' is not in this atlas"):
        atlas.lookup([0.0], [0.0], model="geoclip")
    with pytest.raises(InvalidCoordinateError, match="index 1"):
        atlas.lookup([0.0, np.nan], [0.0, 0.0], model=MODEL)
    with pytest.raises(InvalidCoordinateError, match="same length"):
        atlas.lookup([0.0, 1.0], [0.0], model=MODEL)
    out = atlas.lookup([0.0, np.nan, 91.0], [0.0, 0.0, 0.0], model=MODEL, on_invalid="null")
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()
    with pytest.raises(InvalidArgumentError, match="on_invalid"):
        atlas.lookup([0.0], [0.0], model=MODEL, on_invalid="skip")


def test_interpolation_is_exact_at_centres_and_closer_to_the_encoder(atlas, stored, encoder) -> None:
    cells, values = stored
    c_lat, c_lon = zip(*(h3i.cell_to_latlng(c) for c in cells[:50]))
    np.testing.assert_allclose(atlas.lookup(c_lat, c_lon, model=MODEL, interpolate=True), values[:50], atol=1e-6)
    lat, lon = _points(2000, seed=1)
    exact = encoder.encode(lat=lat, lon=lon)
    nearest = atlas.lookup(lat, lon, model=MODEL)
    blended = atlas.lookup(lat, lon, model=MODEL, interpolate=True)
    err_nearest = np.linalg.norm(nearest - exact, axis=1).mean()
    err_blended = np.linalg.norm(blended - exact, axis=1).mean()
    assert err_blended < 0.9 * err_nearest


def test_join_inputs_and_outputs(atlas, atlas_dir, tmp_path) -> None:
    import pandas as pd

    lat, lon = _points(300, seed=2)
    frame = pd.DataFrame({"site": np.arange(300), "Lat": lat, "Lon": lon})
    expected = atlas.lookup(lat, lon, model=MODEL)
    frame.to_csv(tmp_path / "p.csv", index=False)
    frame.to_parquet(tmp_path / "p.parquet")
    for points in (frame, pa.Table.from_pandas(frame), tmp_path / "p.csv", str(tmp_path / "p.parquet")):
        out = atlas.join(points, model=MODEL)
        assert out.column_names == ["site", "Lat", "Lon", "cell", "embedding"]
        np.testing.assert_array_equal(np.stack(out.column("embedding").to_numpy(zero_copy_only=False)), expected)
        assert out.column("cell")[0].as_py() == h3i.latlng_to_cell(lat[0], lon[0], 2)
    with pytest.raises(UnknownColumnError, match="no latitude column 'y'"):
        atlas.join(frame, lat_col="y", model=MODEL)
    with pytest.raises(InvalidArgumentError, match="cannot join onto list"):
        atlas.join([1, 2], model=MODEL)
    bad = pa.table({"lat": [1.0, None, 200.0], "lon": [1.0, 2.0, 3.0]})
    with pytest.raises(InvalidCoordinateError):
        atlas.join(bad, model=MODEL)
    out = atlas.join(bad, model=MODEL, on_invalid="null")
    assert out.column("cell").null_count == 2 and out.column("embedding").null_count == 2


def test_similar_matches_exact_search_and_filters(atlas, stored) -> None:
    cells, values = stored
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    target = 1234
    result = atlas.similar(cell=f"{cells[target]:x}", k=10, model=MODEL)
    assert result.column_names == ["cell", "lat", "lon", "score"]
    scores = unit @ unit[target]
    top = np.argsort(-scores)[:10]
    assert result.column("cell").to_numpy().tolist() == cells[top].tolist()
    np.testing.assert_allclose(result.column("score").to_numpy(), scores[top], atol=1e-5)

    lat, lon = h3i.cell_to_latlng(cells[target])
    far = atlas.similar(lat=lat, lon=lon, k=5, model=MODEL, exclude_within_km=2000)
    from catalog.interpolation import haversine_km as _haversine_km

    assert (_haversine_km(far.column("lat").to_numpy(), far.column("lon").to_numpy(), lat, lon) >= 2000).all()
    boxed = atlas.similar(vector=values[target], k=5, model=MODEL, bbox=(-10, 35, 30, 60))
    assert boxed.num_rows == 5
    assert ((boxed.column("lon").to_numpy() >= -10) & (boxed.column("lat").to_numpy() <= 60)).all()


def _exact_top(cells, values, query_vector, k, keep):
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    scores = unit[keep] @ (query_vector / np.linalg.norm(query_vector))
    return cells[keep][np.argsort(-scores, kind="stable")[:k]]


def test_similar_in_a_box_is_exact_over_the_box(atlas, stored, monkeypatch) -> None:
    cells, values = stored
    monkeypatch.setattr(atlas, "_index", lambda *a: pytest.fail("a small box is searched without the index"))
    c_lat, c_lon = np.array([h3i.cell_to_latlng(c) for c in cells]).T
    box = (-10.0, 35.0, 30.0, 60.0)
    inside = (c_lon >= box[0]) & (c_lat >= box[1]) & (c_lon <= box[2]) & (c_lat <= box[3])
    got = atlas.similar(vector=values[4321], k=8, model=MODEL, bbox=box)
    assert got.column("cell").to_numpy().tolist() == _exact_top(cells, values, values[4321], 8, inside).tolist()


def test_land_only_keeps_the_cells_that_touch_land(atlas, stored) -> None:
    from builder.landmask import land_cells

    cells, values = stored
    land = land_cells(2)
    assert atlas.info()[MODEL]["resolutions"]["2"]["land_flags"]
    sea = int(np.flatnonzero(~np.isin(cells, land))[100])  # a query from the open ocean
    got = atlas.similar(cell=int(cells[sea]), k=20, model=MODEL, land_only=True)
    assert np.isin(got.column("cell").to_numpy(), land).all()
    assert got.column("cell").to_numpy().tolist() == _exact_top(cells, values, values[sea], 20,
                                                                 np.isin(cells, land)).tolist()
    everywhere = atlas.similar(cell=int(cells[sea]), k=20, model=MODEL)
    assert not np.isin(everywhere.column("cell").to_numpy(), land).all()


def test_filters_decided_by_ancestors_equal_the_cells_own_centres(monkeypatch) -> None:
    """A filtered search's pool is filtered by coarse ancestors where they are wholly on one
    side (query.atlas._Filters.of): the same verdict as every cell's own centre, near poles,
    the antimeridian and the edges, with far fewer centres computed."""
    import query.atlas as qa
    from builder.landmask import land_cells

    rng = np.random.default_rng(11)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 20_000))), rng.uniform(-180, 180, 20_000)
    near = np.concatenate([rng.uniform(85, 90, 500), rng.uniform(-60, 60, 500)]), \
        np.concatenate([rng.uniform(-180, 180, 500), rng.uniform(179, 180, 500) * rng.choice([-1, 1], 500)])
    lat, lon = np.concatenate([lat, near[0]]), np.concatenate([lon, near[1]])
    cells = np.unique(np.array([h3i.latlng_to_cell(a, o, 5) for a, o in zip(lat, lon)], np.uint64))
    land = np.sort(np.unique([h3i.cell_to_children(c, 5) for c in land_cells(2).tolist()[:40]]).astype(np.uint64))
    computed = []
    real = qa.cells_to_latlng
    monkeypatch.setattr(qa, "cells_to_latlng", lambda c: (computed.append(len(c)), real(c))[1])
    centres = real(cells)
    cases = [(None, 1000.0, (48.85, 2.35), None), (None, 0.0, (0.0, 0.0), None), (None, 30.0, (89.9, 10.0), None),
             (None, 15_000.0, (-45.0, 179.9), land), ((-10.0, 35.0, 30.0, 60.0), None, None, None),
             ((170.0, 60.0, 180.0, 90.0), None, None, None), ((-180.0, -90.0, 180.0, 90.0), None, None, land),
             ((-180.0, -1.0, -179.5, 1.0), 500.0, (0.0, -179.0), None), ((5.0, 88.0, 6.0, 90.0), None, None, None)]
    for bbox, km, origin, flags in cases:
        keep = qa._Filters(bbox, km, origin, flags)
        computed.clear()
        got = keep.of(cells)
        np.testing.assert_array_equal(got, keep(cells, *centres), err_msg=str((bbox, km, origin)))
        # computed: the ancestors' centres, then those of the cells near an edge (under 500 here)
        assert computed[0] < 0.3 * len(cells) and sum(computed[1:]) < 0.03 * len(cells), (bbox, km, computed)


def test_similar_filters_that_leave_nothing_say_so(atlas) -> None:
    with pytest.raises(InvalidArgumentError, match="passes the filters .*exclude_within_km=20100"):
        atlas.similar(lat=0.0, lon=0.0, k=5, model=MODEL, exclude_within_km=20_100)
    with pytest.raises(InvalidArgumentError, match="no cell of resolution 2 in this atlas passes the filters"):
        atlas.similar(lat=0.0, lon=0.0, k=5, model=MODEL, bbox=(0.0, 0.0, 0.001, 0.001))
    with pytest.warns(UserWarning, match="most similar cells pass the filters"):  # the index's results, filtered
        antipodes = atlas.similar(lat=0.0, lon=0.0, k=1000, model=MODEL, exclude_within_km=19_000)
    from catalog.interpolation import haversine_km as _haversine_km

    far = _haversine_km(antipodes.column("lat").to_numpy(), antipodes.column("lon").to_numpy(), 0.0, 0.0)
    assert 0 < antipodes.num_rows < 1000 and (far >= 19_000).all()
    lat, lon = h3i.cell_to_latlng(h3i.latlng_to_cell(48.85, 2.35, 2))
    with pytest.warns(UserWarning, match="returning 1, not 5"):  # a box around one cell's centre
        one = atlas.similar(lat=0.0, lon=0.0, k=5, model=MODEL, bbox=(lon - 0.01, lat - 0.01, lon + 0.01, lat + 0.01))
    assert one.column("cell").to_pylist() == [h3i.latlng_to_cell(48.85, 2.35, 2)]


def test_similar_bad_input(atlas) -> None:
    with pytest.raises(InvalidArgumentError, match="k must be an integer from 1 to 1,000"):
        atlas.similar(lat=0.0, lon=0.0, k=0, model=MODEL)
    with pytest.raises(InvalidArgumentError, match="k must be an integer from 1 to 1,000"):
        atlas.similar(lat=0.0, lon=0.0, k=1001, model=MODEL)
    with pytest.raises(InvalidArgumentError, match="with NaN or inf"):
        atlas.similar(vector=[np.nan] * 256, model=MODEL)
    with pytest.raises(InvalidArgumentError, match="not all zero"):
        atlas.similar(vector=[0.0] * 256, model=MODEL)
    with pytest.raises(InvalidArgumentError, match="exclude_within_km must be a finite distance"):
        atlas.similar(lat=0.0, lon=0.0, exclude_within_km=float("nan"), model=MODEL)
    assert atlas.similar(lat=0.0, lon=0.0, k=1000, model=MODEL).num_rows == 1000
    with pytest.raises(InvalidArgumentError, match="exactly one of"):
        atlas.similar(lat=0.0, lon=0.0, cell="8001fffffffffff", model=MODEL)
    with pytest.raises(InvalidArgumentError, match="256 finite numbers"):
        atlas.similar(vector=[1.0, 2.0], model=MODEL)
    with pytest.raises(InvalidArgumentError, match="not an H3 cell"):
        atlas.similar(cell="zzz", model=MODEL)
    with pytest.raises(InvalidArgumentError, match="bbox"):
        atlas.similar(lat=0.0, lon=0.0, bbox=(10, 0, -10, 5), model=MODEL)


def test_sql_views_and_h3_functions(atlas) -> None:
    counts = atlas.sql("SELECT res, count(*) AS n FROM embeddings GROUP BY res ORDER BY res").to_pylist()
    assert counts == [{"res": r, "n": 2 + 120 * 7**r} for r in (0, 1, 2)]
    row = atlas.sql(
        "SELECT h3_latlng_to_cell(48.85, 2.35, 2) AS c, h3_cell_to_lat(h3_latlng_to_cell(48.85, 2.35, 2)) AS la, "
        "h3_cell_to_lng(h3_latlng_to_cell(48.85, 2.35, 2)) AS lo, h3_cell_to_parent(h3_latlng_to_cell(48.85, 2.35, 2), 0) AS p, "
        "h3_cell_to_resolution(h3_latlng_to_cell(48.85, 2.35, 2)) AS r"
    ).to_pylist()[0]
    cell = h3i.latlng_to_cell(48.85, 2.35, 2)
    assert row == {"c": cell, "la": pytest.approx(h3i.cell_to_latlng(cell)[0]), "lo": pytest.approx(h3i.cell_to_latlng(cell)[1]),
                   "p": h3i.cell_to_parent(cell, 0), "r": 2}
    con = atlas.connect()
    con.register("pts", pa.table({"id": [1, 2], "lat": [48.85, -33.9], "lon": [2.35, 151.2]}))
    joined = con.sql(
        "SELECT p.id, e.embedding FROM pts p JOIN embeddings e "
        "ON e.cell = h3_latlng_to_cell(p.lat, p.lon, 2) AND e.res = 2 ORDER BY p.id"
    ).to_arrow_table()
    np.testing.assert_allclose(np.stack(joined.column("embedding").to_numpy(zero_copy_only=False)),
                               atlas.lookup([48.85, -33.9], [2.35, 151.2], model=MODEL), atol=1e-7)
    assert con.sql("SELECT count(*) FROM embeddings_toy").fetchall() == [(842,)]
    with pytest.raises(QueryError, match="SQL failed"):
        atlas.sql("SELEC 1")
    with pytest.raises(QueryError, match="no_such_table"):
        atlas.sql("SELECT * FROM no_such_table")


def test_sql_embedding_function_reads_in_place_row_by_row(atlas) -> None:
    lat, lon = _points(5000, seed=7)
    lat[:3], lon[3] = [np.nan, 95.0, 0.0], 200.0  # NaN, out of range, fine, out of range
    res = np.where(np.arange(5000) % 2, 1, 2)
    con = atlas.connect()
    con.register("pts", pa.table({"lat": lat, "lon": lon, "res": res}))
    got = con.sql(f"SELECT hexatlas_embedding(lat, lon, res, '{MODEL}') AS e, h3_latlng_to_cell(lat, lon, res) AS c "
                  "FROM pts").to_arrow_table()
    emb = got.column("e").to_pylist()
    assert emb[0] is None and emb[1] is None and emb[3] is None and emb[2] is not None  # invalid rows: NULL
    for r in (1, 2):
        rows = np.flatnonzero((res == r) & (np.arange(5000) > 3))
        expected = atlas.lookup(lat[rows], lon[rows], res=r, model=MODEL)
        np.testing.assert_array_equal(np.array([emb[i] for i in rows], np.float32), expected)
        cells = got.column("c").fill_null(0).to_numpy()[rows]
        np.testing.assert_array_equal(cells, [h3i.latlng_to_cell(a, o, r) for a, o in zip(lat[rows], lon[rows])])
    assert got.column("c").null_count == 3
    # models of different dimensions (256 and 4): one function type for both, a list
    assert con.sql("SELECT typeof(hexatlas_embedding(10.0, 20.0, 1, 'toy'))").fetchall() == [("FLOAT[]",)]
    toy = con.sql("SELECT hexatlas_embedding(10.0, 20.0, 1, 'toy') AS e").fetchall()[0][0]
    np.testing.assert_allclose(toy, atlas.lookup([10.0], [20.0], model="toy")[0], rtol=1e-6)
    with pytest.raises(QueryError, match="holds several models .*name one as the fourth argument"):
        atlas.sql("SELECT hexatlas_embedding(10.0, 20.0, 1)")
    with pytest.raises(QueryError, match="model 'nope' is not in this atlas"):
        atlas.sql("SELECT hexatlas_embedding(10.0, 20.0, 1, 'nope')")


def test_open_errors(tmp_path, atlas_dir) -> None:
    with pytest.raises(AtlasNotFoundError):
        query.open(tmp_path / "nothing")
    (tmp_path / "partial" / "m" / "_build").mkdir(parents=True)
    with pytest.raises(AtlasCorruptError, match="unfinished builds: m.*resume"):
        query.open(tmp_path / "partial")
    import shutil

    shutil.copytree(atlas_dir[0] / "toy", tmp_path / "old" / "toy")
    manifest = json.loads((tmp_path / "old" / "toy" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "old" / "toy" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AtlasCorruptError, match="format version 99"):
        query.open(tmp_path / "old")
    assert query.open(atlas_dir[0] / "toy").models == ["toy"]


def _digest_tree(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_queries_never_write_to_the_atlas(atlas_dir) -> None:
    before = _digest_tree(atlas_dir[0])
    atlas = query.open(atlas_dir[0])
    atlas.lookup([1.0], [2.0], model="toy", interpolate=True)
    atlas.join(pa.table({"lat": [1.0], "lon": [2.0]}), model=MODEL)
    atlas.similar(lat=1.0, lon=2.0, model=MODEL)
    atlas.sql("SELECT count(*) FROM embeddings")
    assert _digest_tree(atlas_dir[0]) == before


def test_no_torch_needed(atlas_dir, tmp_path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now fails
        import pyarrow as pa
        import query
        atlas = query.open({str(atlas_dir[0])!r})
        assert atlas.lookup([10.0], [20.0], model="{MODEL}", interpolate=True).shape == (1, 256)
        assert atlas.join(pa.table({{"lat": [1.0], "lon": [2.0]}}), model="{MODEL}").num_rows == 1
        assert atlas.similar(lat=10.0, lon=20.0, k=3, model="{MODEL}").num_rows == 3
        assert atlas.sql("SELECT count(*) AS n FROM embeddings").to_pylist() == [{{"n": 6846}}]
        atlas.connect().sql("SELECT h3_latlng_to_cell(1.0, 2.0, 3)").fetchall()
        from catalog.cli import main
        assert main(["lookup", {str(atlas_dir[0])!r}, "--lat", "1", "--lon", "2", "--model", "toy"]) == 0
        leaked = [m for m in sys.modules if m in ("torch", "builder") or m.startswith(("torch.", "builder."))]
        assert not [m for m in leaked if sys.modules[m] is not None], leaked
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ,
                   "HEXATLAS_CACHE": str(tmp_path / "cache")})


def test_cli_commands(atlas_dir, tmp_path, capsys) -> None:
    root = str(atlas_dir[0])
    assert main(["info", root]) == 0
    assert "res 2: 5,882 cells" in capsys.readouterr().out
    assert main(["lookup", root, "--lat", "10", "--lon", "20", "--model", MODEL, "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and len(rows[0]["embedding"]) == 256
    assert main(["similar", root, "--lat", "10", "--lon", "20", "-k", "3", "--model", MODEL, "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "cell,lat,lon,score" and len(lines) == 4
    (tmp_path / "p.csv").write_text("lat,lon,name\n1,2,a\n3,4,b\n")
    assert main(["join", root, "--input", str(tmp_path / "p.csv"), "--output", str(tmp_path / "o.parquet"),
                 "--model", MODEL]) == 0
    assert pq.read_table(tmp_path / "o.parquet").column_names == ["lat", "lon", "name", "cell", "embedding"]
    assert main(["sql", root, "SELECT 42 AS answer"]) == 0
    assert "42" in capsys.readouterr().out
    assert main(["sql", root, "SELEC"]) == 2
    assert "SQL failed" in capsys.readouterr().err
    assert main(["lookup", root, "--lat", "95", "--lon", "0", "--model", MODEL]) == 2
    assert main(["similar", root, "--lat", "1", "--lon", "1", "-k", "0", "--model", MODEL]) == 2
    assert main(["lookup", root, "--lat", "1", "2", "--lon", "1", "--model", MODEL]) == 2
    assert "--lat has 2 values but --lon has 1" in capsys.readouterr().err


def test_an_int8_atlas_reads_back_dequantised(tmp_path) -> None:
    from builder.build import build

    for precision in ("float32", "int8"):
        build("tests.data.toy_encoder:load", resolutions="2", output=tmp_path / precision, device="cpu",
              precision=precision, progress=False)
    exact, quantised = query.open(tmp_path / "float32"), query.open(tmp_path / "int8")
    lat, lon = [10.0, -33.9, 60.2, 0.0], [20.0, 18.4, 24.9, -179.9]
    a, b = exact.lookup(lat=lat, lon=lon, res=2), quantised.lookup(lat=lat, lon=lon, res=2)
    scale = np.asarray(read_manifest(tmp_path / "int8" / "toy")["quantization"]["scale"], np.float32)
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    assert (np.abs(a - b) <= scale / 2 + 1e-6).all()  # within half a quantisation step
    top = quantised.similar(lat=10.0, lon=20.0, res=2, k=3)
    assert top.column("score").to_numpy()[0] > 0.999
