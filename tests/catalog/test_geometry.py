"""catalog.geometry: WKB and GeoArrow points decoded with numpy, GeoParquet's CRS rules, and the
``geo`` metadata written back, checked against WKB packed by hand with ``struct``."""

from __future__ import annotations

import json
import struct

import numpy as np
import pyarrow as pa
import pytest

from catalog.errors import InputFileError, InvalidArgumentError, InvalidCoordinateError
from catalog.geometry import UNKNOWN, PointColumn, geo_schema, point_column, points_wkt, wkb_points
from catalog.tables import coordinate_columns, locate_points

EXT = b"ARROW:extension:name"


def _wkb(code: int, coords: tuple[float, ...], *, big: bool = False, srid: int | None = None) -> bytes:
    order = ">" if big else "<"
    head = struct.pack(f"{order}BI", 0 if big else 1, code)
    return head + (struct.pack(f"{order}I", srid) if srid is not None else b"") + struct.pack(f"{order}{len(coords)}d", *coords)


def test_wkb_points_of_every_flavour_match_struct() -> None:
    rows = [
        _wkb(1, (2.5, -3.25)),                              # ISO point, little-endian
        _wkb(1, (10.0, 20.0), big=True),                    # big-endian
        _wkb(1001, (1.0, 2.0, 3.0)),                        # ISO point Z
        _wkb(3001, (4.0, 5.0, 6.0, 7.0), big=True),         # ISO point ZM
        _wkb(0x80000001 | 0x20000000, (8.0, 9.0, 1.0), srid=4326),  # extended WKB (PostGIS): Z and SRID
        None,
        _wkb(1, (float("nan"), float("nan"))),              # POINT EMPTY
        _wkb(2, (0.0, 0.0, 1.0, 1.0))[:5] + struct.pack("<I4d", 2, 0, 0, 1, 1),  # a LineString
        b"\x01\x01",                                        # not WKB
        _wkb(1, (1.0,)),                                    # a point cut short
    ]
    for kind in (pa.binary(), pa.large_binary()):
        array = pa.array(rows, kind)
        x, y, bad = wkb_points(array)
        np.testing.assert_array_equal(x[:5], [2.5, 10.0, 1.0, 4.0, 8.0])
        np.testing.assert_array_equal(y[:5], [-3.25, 20.0, 2.0, 5.0, 9.0])
        assert bad.tolist() == [False] * 5 + [True] * 5 and np.isnan(x[5:]).all()
        x, y, bad = wkb_points(array.slice(1, 3))  # an offset into the buffers
        assert x.tolist() == [10.0, 1.0, 4.0] and not bad.any()
    column = PointColumn("geometry", "WKB")
    for i, message in [(5, "the geometry is null"), (6, "an empty point"), (7, "a LineString, not a point"),
                       (8, "not WKB"), (9, "a point of 13 bytes, not 21")]:
        with pytest.raises(InvalidCoordinateError, match=f"first at row 100: {message}"):
            column.lonlat(pa.array(rows[:5] + [rows[i]]).slice(0), first_row=95)
    lon, _ = column.lonlat(pa.chunked_array([pa.array(rows[:3]), pa.array(rows[3:])]), allow_invalid=True)
    assert lon[:5].tolist() == [2.5, 10.0, 1.0, 4.0, 8.0] and np.isnan(lon[5:]).all()
    assert points_wkt(pa.array(rows[:2]), "WKB").to_pylist() == ["POINT (2.5 -3.25)", "POINT (10.0 20.0)"]


def test_geoarrow_points_separated_and_interleaved() -> None:
    struct_points = pa.array([{"x": 1.0, "y": 2.0}, None, {"x": 3.0, "y": 4.0}],
                             pa.struct([("x", pa.float64()), ("y", pa.float64())]))
    interleaved = pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0, 9.0, 9.0, 3.0, 4.0]), 2)
    column = PointColumn("geom", "point")
    for array in (struct_points, interleaved.slice(0)):
        lon, lat = column.lonlat(array, allow_invalid=True)
        assert lon[[0, 2]].tolist() == [1.0, 3.0] and lat[[0, 2]].tolist() == [2.0, 4.0]
    with pytest.raises(InvalidCoordinateError, match="first at row 1: the geometry is null"):
        column.lonlat(struct_points)
    with pytest.raises(InvalidArgumentError, match="GeoArrow polygon geometries"):
        PointColumn("geom", "polygon").lonlat(struct_points)


def test_geoparquet_crs_rules_and_the_primary_column() -> None:
    wkb = pa.array([_wkb(1, (2.0, 48.0))])

    def schema(columns: dict, primary: str = "g") -> pa.Schema:
        geo = {"version": "1.1.0", "primary_column": primary, "columns": columns}
        return pa.schema([("g", pa.binary()), ("h", pa.binary())], metadata={"geo": json.dumps(geo)})

    assert point_column(schema({"g": {"encoding": "WKB"}})) == PointColumn("g", "WKB", None)  # absent: OGC:CRS84
    assert point_column(schema({"g": {"encoding": "WKB", "crs": None}})).crs is UNKNOWN  # null: unknown
    assert point_column(schema({"g": {}, "h": {"encoding": "point"}}, primary="h")).encoding == "point"
    with pytest.raises(InputFileError, match="primary column 'x'"):
        point_column(schema({"g": {}}, primary="x"))
    with pytest.raises(InputFileError, match="not valid JSON"):
        point_column(pa.schema([("g", pa.binary())], metadata={"geo": "{"}))
    table = pa.Table.from_arrays([wkb, wkb], schema=schema({"g": {"encoding": "WKB", "crs": None}}))
    with pytest.raises(InvalidArgumentError, match="'g' has no CRS"):
        coordinate_columns(table)
    # EPSG:4326 as PROJJSON is lon/lat already: no transform, no pyproj
    projjson = {"type": "GeographicCRS", "name": "WGS 84", "id": {"authority": "EPSG", "code": 4326}}
    table = pa.Table.from_arrays([wkb, wkb], schema=schema({"g": {"encoding": "WKB", "crs": projjson}}))
    assert [a.tolist() for a in coordinate_columns(table)] == [[48.0], [2.0]]


def test_a_geoarrow_field_gets_geo_metadata_and_lat_lon_columns_come_first() -> None:
    crs = {"type": "ProjectedCRS", "name": "WGS 84 / Pseudo-Mercator", "id": {"authority": "EPSG", "code": 3857}}
    field = pa.field("where", pa.binary(), metadata={EXT: b"geoarrow.wkb",
                                                     b"ARROW:extension:metadata": json.dumps({"crs": crs}).encode()})
    schema = geo_schema(pa.schema([("name", pa.string()), field]))
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["primary_column"] == "where" and geo["columns"]["where"] == {
        "encoding": "WKB", "geometry_types": [], "crs": crs}
    assert point_column(schema) == PointColumn("where", "WKB", crs)
    bare = geo_schema(pa.schema([("g", pa.binary())], metadata={"geo": json.dumps(
        {"version": "1.0.0", "primary_column": "g", "columns": {"g": {"encoding": "WKB"}}})}))
    assert bare.field("g").metadata[EXT] == b"geoarrow.wkb"  # so GeoDataFrame.from_arrow finds it
    assert geo_schema(pa.schema([("lat", pa.float64())])).metadata is None
    both = pa.schema([("Lat", pa.float64()), ("LON", pa.float64()), field])
    assert locate_points(both).lat == "Lat" and locate_points(both).geometry is None
    assert locate_points(pa.schema([("lat", pa.float64()), field])).geometry.name == "where"
