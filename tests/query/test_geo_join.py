"""Geometry in, geometry out: joins of GeoParquet, GeoDataFrames and GDAL vector files.

Each input is written by the library its users write it with (GeoPandas, DuckDB's own GEOMETRY
type and GeoParquet writer), joined, and read back by that library: the geometry and CRS as
they were, the embeddings those of the points' WGS 84 coordinates.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import query
from catalog.cli import main
from catalog.errors import (
    InvalidArgumentError,
    InvalidCoordinateError,
    MissingDependencyError,
    UnknownColumnError,
)

gpd = pytest.importorskip("geopandas")
shapely = pytest.importorskip("shapely")

MODEL = "satclip-vit16-l10"
N = 60


@pytest.fixture
def atlas(atlas_dir):
    return query.open(atlas_dir[0])


@pytest.fixture(scope="module")
def places():
    rng = np.random.default_rng(7)
    lat, lon = rng.uniform(-70, 70, N), rng.uniform(-175, 175, N)
    frame = gpd.GeoDataFrame({"name": [f"p{i}" for i in range(N)], "n": np.arange(N)},
                             geometry=gpd.points_from_xy(lon, lat), crs="OGC:CRS84")
    return frame, lat, lon


def _emb(table: pa.Table) -> np.ndarray:
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False))


def test_a_geoparquet_file_in_web_mercator_joins_at_its_wgs84_points(atlas, atlas_dir, places, tmp_path) -> None:
    frame, lat, lon = places
    web = frame.to_crs("EPSG:3857")
    web.to_parquet(tmp_path / "p.parquet")  # GeoParquet 1.x, WKB, CRS as PROJJSON
    assert json.loads(pq.read_schema(tmp_path / "p.parquet").metadata[b"geo"])["columns"]["geometry"]["encoding"] == "WKB"
    expected = atlas.lookup(lat, lon, model=MODEL)
    out = atlas.join(tmp_path / "p.parquet", model=MODEL)
    assert out.column_names == ["name", "n", "geometry", "cell", "embedding"]
    np.testing.assert_array_equal(_emb(out), expected)
    back = gpd.GeoDataFrame.from_arrow(out)  # the geometry and CRS as they came in
    assert back.crs == web.crs and back.geometry.geom_equals_exact(web.geometry, 0).all()
    # the CLI of the issue: 'name', 'geometry' and no lat/lon; streamed, several row groups
    assert main(["join", str(atlas_dir[0]), "--input", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "o.parquet"),
                 "--model", MODEL, "--batch-rows", "16"]) == 0
    assert pq.ParquetFile(tmp_path / "o.parquet").metadata.num_row_groups == 4
    read = gpd.read_parquet(tmp_path / "o.parquet")
    assert read.crs == web.crs and read.geometry.geom_equals_exact(web.geometry, 0).all()
    assert list(read.columns) == ["name", "n", "geometry", "cell", "embedding"]
    np.testing.assert_array_equal(np.stack(read["embedding"].to_numpy()), expected)


def test_geoarrow_points_in_a_utm_zone_and_geodataframes_in_memory(atlas, tmp_path) -> None:
    rng = np.random.default_rng(3)
    lat, lon = rng.uniform(40, 60, N), rng.uniform(9.5, 20.5, N)  # around UTM zone 33N
    utm = gpd.GeoDataFrame({"id": np.arange(N)}, geometry=gpd.points_from_xy(lon, lat), crs=4326).to_crs(32633)
    expected = atlas.lookup(lat, lon, model=MODEL)
    utm.to_parquet(tmp_path / "native.parquet", geometry_encoding="geoarrow")  # GeoParquet 1.1 GeoArrow point
    for points in (tmp_path / "native.parquet", utm):
        out = atlas.join(points, model=MODEL)
        np.testing.assert_array_equal(_emb(out), expected)
        back = gpd.GeoDataFrame.from_arrow(out)
        assert back.crs == utm.crs and back.geometry.geom_equals_exact(utm.geometry, 0).all()
    atlas.join_file(tmp_path / "native.parquet", tmp_path / "o.parquet", model=MODEL, batch_rows=25)
    read = gpd.read_parquet(tmp_path / "o.parquet")
    assert read.crs == utm.crs and read.geometry.geom_equals_exact(utm.geometry, 0).all()
    geo = json.loads(pq.read_schema(tmp_path / "o.parquet").metadata[b"geo"])
    assert geo["columns"]["geometry"]["encoding"] == "point"
    # a GeoDataFrame to a file: GeoParquet with its CRS written from the frame
    atlas.join_file(utm, tmp_path / "frame.parquet", model=MODEL)
    read = gpd.read_parquet(tmp_path / "frame.parquet")
    assert read.crs == utm.crs and read.geometry.geom_equals_exact(utm.geometry, 0).all()


def test_lat_lon_columns_win_over_the_geometry(atlas, places) -> None:
    frame, lat, lon = places
    both = frame.assign(lat=lat[::-1], lon=lon[::-1])
    np.testing.assert_array_equal(_emb(atlas.join(both, model=MODEL)), atlas.lookup(lat[::-1], lon[::-1], model=MODEL))


@pytest.mark.parametrize(("suffix", "driver"), [(".gpkg", "GPKG"), (".geojson", "GeoJSON"), (".fgb", "FlatGeobuf")])
def test_gdal_vector_files_join_to_geoparquet(atlas, atlas_dir, places, tmp_path, suffix, driver) -> None:
    frame, lat, lon = places
    source = frame if driver == "GeoJSON" else frame.to_crs("EPSG:3035")  # GeoJSON is WGS 84 only
    path = tmp_path / f"p{suffix}"
    source.to_file(path, driver=driver)
    assert main(["join", str(atlas_dir[0]), "--input", str(path), "--output", str(tmp_path / "o.parquet"), "--model", MODEL,
                 "--batch-rows", "25"]) == 0
    read, written = gpd.read_parquet(tmp_path / "o.parquet"), gpd.read_file(path)
    assert read.crs == written.crs and read.geometry.geom_equals_exact(written.geometry, 0).all()
    assert list(read.columns) == ["name", "n", "geometry", "cell", "embedding"]
    order = read["n"].to_numpy()  # FlatGeobuf's spatial index puts the features in its own order
    np.testing.assert_allclose(np.stack(read["embedding"].to_numpy()), atlas.lookup(lat[order], lon[order], model=MODEL),
                               atol=1e-6)


def test_duckdb_reads_the_output_geometry_back_as_it_wrote_it(atlas, places, tmp_path) -> None:
    # DuckDB 1.5+ has the GEOMETRY type and GeoParquet I/O in its core; its spatial extension is
    # not needed (and its wheel, for DuckDB 1.5.5 only, does not load into another version).
    duckdb = pytest.importorskip("duckdb")
    frame, lat, lon = places
    con = duckdb.connect()
    try:
        con.execute("SELECT 'POINT (1 2)'::GEOMETRY")
    except duckdb.Error as exc:
        pytest.skip(f"this DuckDB has no GEOMETRY type in its core: {exc}")
    wkt = [f"POINT ({x!r} {y!r})" for x, y in zip(lon.tolist(), lat.tolist())]
    con.execute("CREATE TABLE p AS SELECT * FROM (SELECT unnest(?) AS id, unnest(?) AS w) "
                "ORDER BY id", [list(range(N)), wkt])
    con.execute(f"COPY (SELECT id, w::GEOMETRY AS geom FROM p ORDER BY id) TO '{tmp_path / 'd.parquet'}'")
    assert b"geo" in pq.read_schema(tmp_path / "d.parquet").metadata
    atlas.join_file(tmp_path / "d.parquet", tmp_path / "o.parquet", model=MODEL, batch_rows=16)
    rows = con.execute(f"SELECT id, ST_AsText(geom), cell, typeof(geom) FROM '{tmp_path / 'o.parquet'}' ORDER BY id").fetchall()
    written = con.execute(f"SELECT ST_AsText(geom) FROM '{tmp_path / 'd.parquet'}' ORDER BY id").fetchall()
    assert [r[1] for r in rows] == [w[0] for w in written] and rows[0][3].startswith("GEOMETRY")
    np.testing.assert_array_equal([r[2] for r in rows], atlas.join(frame, model=MODEL).column("cell").to_numpy())
    # GeoPandas' file in Web Mercator: DuckDB sees the same geometry and CRS in the output
    frame.to_crs(3857).to_parquet(tmp_path / "g.parquet")
    atlas.join_file(tmp_path / "g.parquet", tmp_path / "og.parquet", model=MODEL)
    (before, crs_in), = con.execute(f"SELECT list(ST_AsText(geometry)), any_value(ST_CRS(geometry)) FROM '{tmp_path / 'g.parquet'}'").fetchall()
    (after, crs_out), = con.execute(f"SELECT list(ST_AsText(geometry)), any_value(ST_CRS(geometry)) FROM '{tmp_path / 'og.parquet'}'").fetchall()
    assert before == after and crs_in == crs_out and "3857" in crs_out


def test_non_points_empty_null_and_unknown_crs_are_refused_by_row(atlas, tmp_path) -> None:
    geoms = [shapely.Point(2.35, 48.85), shapely.LineString([(0, 0), (1, 1)]), shapely.Point(), None,
             shapely.Point(13.4, 52.5)]
    frame = gpd.GeoDataFrame({"k": range(5)}, geometry=geoms, crs=4326)
    with pytest.raises(InvalidCoordinateError, match="first at row 1: a LineString, not a point"):
        atlas.join(frame, model=MODEL)
    with pytest.raises(InvalidCoordinateError, match="first at row 1: an empty point"):
        atlas.join(frame.drop(index=1), model=MODEL)
    with pytest.raises(InvalidCoordinateError, match="first at row 2: the geometry is null"):
        atlas.join(frame.iloc[[0, 4, 3]], model=MODEL)
    out = atlas.join(frame, model=MODEL, on_invalid="null")
    assert out.column("cell").is_null().to_pylist() == [False, True, True, True, False]
    np.testing.assert_array_equal(_emb(out.filter(out.column("cell").is_valid())),
                                  atlas.lookup([48.85, 52.5], [2.35, 13.4], model=MODEL))
    # streamed: the row named is the row of the whole input, the output never appears
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InvalidCoordinateError, match="first at row 1: a LineString"):
        atlas.join_file(tmp_path / "bad.parquet", tmp_path / "o.parquet", model=MODEL, batch_rows=1)
    assert not (tmp_path / "o.parquet").exists() and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(InvalidArgumentError, match="has no CRS.*set_crs"):
        atlas.join(frame.iloc[[0]].set_crs(None, allow_override=True), model=MODEL)
    polygons = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)], crs=4326)
    polygons.to_parquet(tmp_path / "poly.parquet", geometry_encoding="geoarrow")
    with pytest.raises(InvalidArgumentError, match="GeoArrow polygon geometries; join and encode take points"):
        atlas.join(tmp_path / "poly.parquet", model=MODEL)
    with pytest.raises(UnknownColumnError, match="no latitude column 'lat' and no point geometry"):
        atlas.join(pa.table({"name": ["a"], "geometry": [b"\x01"]}), model=MODEL)  # WKB with no metadata: not guessed


def test_a_crs_without_pyproj_names_the_install_line(atlas, places, monkeypatch) -> None:
    import sys

    frame, lat, lon = places
    wgs84, web = pa.table(frame.to_arrow(index=False)), pa.table(frame.to_crs(3857).to_arrow(index=False))
    monkeypatch.setitem(sys.modules, "pyproj", None)
    np.testing.assert_array_equal(_emb(atlas.join(wgs84, model=MODEL)), atlas.lookup(lat, lon, model=MODEL))
    with pytest.raises(MissingDependencyError, match=r"pip install 'hexatlas\[geo\]'"):
        atlas.join(web, model=MODEL)


def test_geoarrow_extension_types_and_csv_output(atlas, places, tmp_path) -> None:
    pytest.importorskip("geoarrow.pyarrow")
    import geoarrow.pyarrow  # noqa: F401  registers the extension types: Parquet reads come back typed

    frame, lat, lon = places
    frame.to_crs(3857).to_parquet(tmp_path / "p.parquet")
    table = pq.read_table(tmp_path / "p.parquet")
    assert isinstance(table.schema.field("geometry").type, pa.ExtensionType)
    out = atlas.join(table, model=MODEL)
    np.testing.assert_array_equal(_emb(out), atlas.lookup(lat, lon, model=MODEL))
    atlas.join_file(tmp_path / "p.parquet", tmp_path / "o.csv", model=MODEL, batch_rows=7)
    lines = (tmp_path / "o.csv").read_text().splitlines()
    assert lines[0] == "name,n,geometry,cell,embedding" and len(lines) == N + 1
    x, y = float(frame.to_crs(3857).geometry.x[0]), float(frame.to_crs(3857).geometry.y[0])
    assert lines[1].startswith(f"p0,0,POINT ({x!r} {y!r}),")
    for source in (tmp_path / "p.parquet", table):  # typed columns in, GeoParquet out all the same
        atlas.join_file(source, tmp_path / "o.parquet", model=MODEL, batch_rows=7)
        read = gpd.read_parquet(tmp_path / "o.parquet")
        assert read.crs == frame.to_crs(3857).crs and read.geometry.geom_equals_exact(frame.to_crs(3857).geometry, 0).all()
