"""The land flag per cell: in lookup/join results on request and in SQL; older atlases without it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import query
from catalog.errors import InvalidArgumentError

MODEL = "satclip-vit16-l10"


def test_lookup_join_and_sql_land_flags(atlas_dir) -> None:
    from builder.landmask import is_land_point, land_cells

    atlas = query.open(atlas_dir[0])
    land = land_cells(2)
    rng = np.random.default_rng(5)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 400))), rng.uniform(-180, 180, 400)
    emb, flags = atlas.lookup(lat, lon, res=2, model=MODEL, land=True)
    np.testing.assert_array_equal(emb, atlas.lookup(lat, lon, res=2, model=MODEL))
    cells = atlas.join(pa.table({"lat": lat, "lon": lon}), res=2, model=MODEL).column("cell").to_numpy()
    np.testing.assert_array_equal(flags, np.isin(cells, land))
    assert flags[is_land_point(lat=lat, lon=lon)].all() and not flags.all()  # a land point's cell touches land
    joined = atlas.join(pa.table({"lat": [lat[0], np.nan], "lon": [lon[0], 0.0]}), res=2, model=MODEL, land=True,
                        on_invalid="null")
    assert joined.column("land").to_pylist() == [bool(flags[0]), None]
    got = atlas.sql(f"SELECT res, count(*) AS n, count(*) FILTER (land) AS on_land FROM embeddings_{MODEL.replace('-', '_')} "
                    "GROUP BY res ORDER BY res").to_pydict()
    assert got["on_land"] == [len(land_cells(r)) for r in (0, 1, 2)]
    part = pq.read_table(atlas_dir[0] / MODEL / "data" / "res=2")  # the flag is in the plain Parquet too
    np.testing.assert_array_equal(part.column("land").to_numpy(), np.isin(part.column("cell").to_numpy(), land))
    one = atlas.sql(f"SELECT hexatlas_land(h3_latlng_to_cell(48.85, 2.35, 2), '{MODEL}') AS paris, "
                    f"hexatlas_land(h3_latlng_to_cell(-40.0, -130.0, 2), '{MODEL}') AS pacific").to_pydict()
    assert one == {"paris": [True], "pacific": [False]}
    with pytest.raises(InvalidArgumentError, match="'land' column"):
        atlas.join(pa.table({"lat": [0.0], "lon": [0.0], "land": [1]}), model=MODEL, land=True)


def _older(atlas_dir, tmp_path, name: str, *drop: str):
    copy = tmp_path / name
    shutil.copytree(atlas_dir[0] / MODEL, copy / MODEL)
    path = copy / MODEL / "manifest.json"
    manifest = json.loads(path.read_text())
    for info in manifest["resolutions"].values():
        for key in drop:
            info.pop(key, None)
    path.write_text(json.dumps(manifest))
    return query.open(copy)


def test_an_atlas_without_land_flags(atlas_dir, tmp_path) -> None:
    """An atlas built before land flags were stored still answers; asking for them says to rebuild."""
    from builder.landmask import land_cells

    # land cells listed, but no land column in the parts: SQL answers from the list
    listed = _older(atlas_dir, tmp_path, "listed", "land_column")
    got = listed.sql("SELECT count(*) FILTER (land) AS n FROM embeddings WHERE res = 2").column("n")[0].as_py()
    assert got == len(land_cells(2))
    atlas = _older(atlas_dir, tmp_path, "old", "land", "land_column", "fidelity")
    assert atlas.lookup([48.85], [2.35], res=2).shape == (1, 256)
    assert "land" not in atlas.sql("SELECT * FROM embeddings LIMIT 1").column_names
    assert atlas.info()[MODEL]["resolutions"]["2"]["fidelity"] is None
    with pytest.raises(InvalidArgumentError, match="before land flags"):
        atlas.lookup([48.85], [2.35], res=2, land=True)


def test_interpolated_lookup_of_no_valid_point(atlas_dir) -> None:
    atlas = query.open(atlas_dir[0])
    got = atlas.lookup([np.nan, 95.0], [0.0, 0.0], res=2, model=MODEL, interpolate=True, on_invalid="null")
    assert got.shape == (2, 256) and np.isnan(got).all()


def test_land_flags_from_the_cli_and_the_server(atlas_dir, tmp_path, capsys) -> None:
    from fastapi.testclient import TestClient

    from catalog.cli import main
    from query.server import create_app

    atlas = query.open(atlas_dir[0])
    lat, lon = [48.85, -40.0], [2.35, -130.0]  # Paris, the South Pacific
    _, want = atlas.lookup(lat, lon, res=2, model=MODEL, land=True)
    assert want.tolist() == [True, False]

    assert main(["lookup", str(atlas_dir[0]), "--lat", *map(str, lat), "--lon", *map(str, lon), "--res", "2",
                 "--model", MODEL, "--land", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["land"] for r in rows] == [True, False]
    points = tmp_path / "points.csv"
    points.write_text("lat,lon\n" + "".join(f"{a},{o}\n" for a, o in zip(lat, lon)))
    out = tmp_path / "joined.parquet"
    assert main(["join", str(atlas_dir[0]), "--input", str(points), "--output", str(out), "--res", "2",
                 "--model", MODEL, "--land"]) == 0
    assert pq.read_table(out).column("land").to_pylist() == [True, False]

    client = TestClient(create_app(atlas))
    one = client.get("/v1/lookup", params={"lat": lat[0], "lon": lon[0], "res": 2, "model": MODEL, "land": "true"})
    assert one.status_code == 200 and one.json()["land"] is True
    assert "land" not in client.get("/v1/lookup", params={"lat": lat[0], "lon": lon[0], "res": 2,
                                                          "model": MODEL}).json()
    many = client.post("/v1/lookup", json={"points": [{"lat": a, "lon": o} for a, o in zip(lat, lon)] + [{"lat": 95.0, "lon": 0.0}],
                                           "res": 2, "model": MODEL, "land": True, "on_invalid": "null"})
    assert many.status_code == 200, many.text
    assert [r["land"] for r in many.json()["results"]] == [True, False, None]
