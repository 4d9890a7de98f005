"""Point geometries in, point geometries out: GeoParquet and GeoArrow points as lat/lon.

A table whose points are a geometry column (GeoParquet's ``geo`` metadata, or a field marked
``geoarrow.wkb`` / ``geoarrow.point`` as GeoPandas, GDAL and DuckDB hand them over) is read
here: WKB and GeoArrow points are decoded with numpy (no shapely needed), and a CRS other than
WGS 84 is transformed with pyproj (``pip install 'hexatlas[geo]'``), always with x = easting or
longitude and y = northing or latitude, as GeoParquet and GeoArrow fix the axis order whatever
the CRS says. The geometry itself is never rewritten: outputs carry the input's column and
CRS, with the ``geo`` metadata that makes them GeoParquet.

CRS rules (GeoParquet 1.1, GeoArrow 0.2): in ``geo`` metadata a column without ``crs`` is
OGC:CRS84 and ``"crs": null`` is unknown; in GeoArrow field metadata an absent CRS is unknown.
An unknown CRS is refused (never guessed) when the geometry is what locates the points.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.errors import (
    InputFileError,
    InvalidArgumentError,
    InvalidCoordinateError,
    MissingDependencyError,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["GEO_INSTALL", "PointColumn", "geo_schema", "is_geometry_field", "point_column", "points_wkt"]

GEO_INSTALL = "pip install 'hexatlas[geo]'"
GEO_KEY = b"geo"
EXT_NAME, EXT_META = b"ARROW:extension:name", b"ARROW:extension:metadata"
GEOARROW_NAMES = {"geoarrow.wkb": "WKB", "geoarrow.point": "point"}
UNKNOWN = "unknown"  # a CRS nobody stated (distinct from None: GeoParquet's default, OGC:CRS84)
# CRSs whose (x, y) already are (lon, lat) in degrees on WGS 84, as GeoParquet orders axes.
WGS84 = {("OGC", "CRS84"), ("OGC", "CRS84H"), ("EPSG", "4326"), ("EPSG", "4979")}
SLICE_ROWS = 1 << 20
WKB_TYPES = {1: "Point", 2: "LineString", 3: "Polygon", 4: "MultiPoint", 5: "MultiLineString",
             6: "MultiPolygon", 7: "GeometryCollection"}


@dataclass(frozen=True)
class PointColumn:
    """The geometry column that locates a table's points.

    ``encoding``: ``"WKB"`` or GeoArrow ``"point"`` (another GeoArrow encoding, say
    ``"polygon"``, is kept so that using it can say what it is). ``crs``: None for OGC:CRS84,
    :data:`UNKNOWN`, or the CRS as given (PROJJSON dict or a string pyproj reads).
    """

    name: str
    encoding: str
    crs: Any = None

    def lonlat(self, column: pa.ChunkedArray | pa.Array, *, first_row: int = 0,
               allow_invalid: bool = False) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Longitudes and latitudes (float64 degrees on WGS 84) of the points in ``column``.

        Null, empty and non-point geometries raise :class:`InvalidCoordinateError` naming the
        first such row (counted from ``first_row``), or give NaN with ``allow_invalid``.
        """
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        xs, ys, offset = [], [], first_row
        for chunk in chunks:
            for start in range(0, len(chunk), SLICE_ROWS):  # bounds the gathers' temporaries
                piece = chunk.slice(start, SLICE_ROWS)
                x, y = self._xy(piece, offset, allow_invalid)
                xs.append(x)
                ys.append(y)
                offset += len(piece)
        x = np.concatenate(xs) if xs else np.empty(0)
        y = np.concatenate(ys) if ys else np.empty(0)
        return to_wgs84(x, y, self.crs, column=self.name, first_row=first_row, allow_invalid=allow_invalid)

    def _xy(self, chunk: pa.Array, first_row: int, allow_invalid: bool) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        if isinstance(chunk, pa.ExtensionArray):
            chunk = chunk.storage
        if self.encoding == "WKB":
            x, y, bad = wkb_points(chunk)
        elif self.encoding == "point":
            x, y, bad = geoarrow_points(chunk, self.name)
        else:
            raise InvalidArgumentError(
                f"the geometry column {self.name!r} holds GeoArrow {self.encoding} geometries; join and encode "
                "take points (give each feature's centroid or representative point, e.g. GeoPandas "
                "GeoSeries.representative_point(), or lat/lon columns)")
        if bad.any():
            if not allow_invalid:
                i = int(np.flatnonzero(bad)[0])
                what = _wkb_problem(chunk[i].as_py()) if self.encoding == "WKB" else _point_problem(chunk[i].as_py())
                raise InvalidCoordinateError(
                    f"{int(bad.sum())} of {len(chunk)} geometries in column {self.name!r} are not points (null, empty "
                    f"or another type); first at row {first_row + i}: {what}. Join and encode take points (give each feature's centroid or "
                    "representative point, e.g. GeoPandas GeoSeries.representative_point()); pass "
                    "on_invalid='null' (--on-invalid null) to get null rows instead")
            x[bad] = np.nan
            y[bad] = np.nan
        return x, y


def point_column(schema: pa.Schema) -> PointColumn | None:
    """The geometry column of ``schema`` to locate points by, or None.

    The primary column of GeoParquet ``geo`` metadata, else the first field marked as a
    GeoArrow WKB or point column (extension type or field metadata).

    Raises
    ------
    InputFileError
        The ``geo`` metadata is not valid JSON or names a column the table lacks.
    """
    geo = _geo_metadata(schema)
    if geo is not None:
        name = geo.get("primary_column")
        columns = geo.get("columns") or {}
        if name not in columns or name not in schema.names:
            raise InputFileError(f"the table's GeoParquet metadata names primary column {name!r}, which it "
                                 f"does not have (columns: {', '.join(map(repr, schema.names))})")
        meta = columns[name]
        encoding = str(meta.get("encoding", "WKB"))
        encoding = "WKB" if encoding.upper() == "WKB" else encoding.lower()
        crs = None if "crs" not in meta else UNKNOWN if meta["crs"] is None else meta["crs"]
        return PointColumn(name, encoding, crs)
    for field in schema:
        found = _geoarrow_field(field)
        if found is not None:
            return found
    return None


def is_geometry_field(field: pa.Field) -> bool:
    """Whether GeoArrow marks ``field`` as WKB or point geometry (extension type or field metadata)."""
    found = _geoarrow_field(field)
    return found is not None and found.encoding in ("WKB", "point")


def _geo_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(GEO_KEY)
    if raw is None:
        return None
    try:
        geo = json.loads(raw)
    except ValueError as exc:
        raise InputFileError(f"the table's GeoParquet 'geo' metadata is not valid JSON ({exc})") from None
    if not isinstance(geo, dict):
        raise InputFileError("the table's GeoParquet 'geo' metadata is not a JSON object")
    return geo


def _geoarrow_field(field: pa.Field) -> PointColumn | None:
    """The field as a point column when GeoArrow marks it (extension type or field metadata)."""
    if isinstance(field.type, pa.ExtensionType):
        name, raw = field.type.extension_name, field.type.__arrow_ext_serialize__()
    else:
        meta = field.metadata or {}
        if EXT_NAME not in meta:
            return None
        name, raw = meta[EXT_NAME].decode(), meta.get(EXT_META, b"")
    if not name.startswith("geoarrow."):
        return None
    encoding = GEOARROW_NAMES.get(name, name.removeprefix("geoarrow."))
    if encoding in ("wkt", "box"):
        return None
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        meta = {}
    crs = meta.get("crs") if isinstance(meta, dict) else None
    if meta.get("crs_type") == "srid":  # a database's own number: not a CRS anyone else can read
        crs = None
    return PointColumn(field.name, encoding, UNKNOWN if crs is None else crs)


def geo_schema(schema: pa.Schema, *, primary: str | None = None) -> pa.Schema:
    """``schema`` with GeoParquet ``geo`` metadata and GeoArrow field metadata on its geometry.

    A schema that has ``geo`` metadata keeps it; one whose geometry is only marked GeoArrow
    (a GeoDataFrame's ``to_arrow()``, a GDAL layer) gets ``geo`` metadata written from it, so
    the table written to Parquet is GeoParquet; ``primary`` picks the primary column among
    several. A geometry field without GeoArrow metadata gets it (with its CRS), so
    ``geopandas.GeoDataFrame.from_arrow`` reads the table too. A schema without geometry
    is returned as it is.
    """
    geo = _geo_metadata(schema)
    fields = list(schema)
    if geo is None:
        found = {f.name: c for f in fields if (c := _geoarrow_field(f)) is not None and c.encoding in ("WKB", "point")}
        if not found:
            return schema
        if primary not in found:
            primary = next(iter(found))
        geo = {"version": "1.1.0", "primary_column": primary, "columns": {
            name: {"encoding": c.encoding, "geometry_types": [], **_crs_entry(c.crs)} for name, c in found.items()}}
        metadata = dict(schema.metadata or {})
        metadata[GEO_KEY] = json.dumps(geo).encode()
        schema = schema.with_metadata(metadata)
    for i, field in enumerate(fields):
        meta = (geo.get("columns") or {}).get(field.name)
        if meta is None or isinstance(field.type, pa.ExtensionType) or EXT_NAME in (field.metadata or {}):
            continue
        encoding = str(meta.get("encoding", "WKB"))
        ext = "geoarrow.wkb" if encoding.upper() == "WKB" else f"geoarrow.{encoding.lower()}"
        crs = meta.get("crs", "OGC:CRS84")
        ext_meta = {} if crs is None else {"crs": crs}
        field_meta = {**(field.metadata or {}), EXT_NAME: ext.encode(), EXT_META: json.dumps(ext_meta).encode()}
        schema = schema.set(i, field.with_metadata(field_meta))
    return schema


def _crs_entry(crs: Any) -> dict[str, Any]:
    """The ``crs`` member of a GeoParquet column: absent for WGS 84 lon/lat, PROJJSON otherwise."""
    if crs is None or _is_wgs84(crs):
        return {}
    if crs is UNKNOWN:
        return {"crs": None}
    if isinstance(crs, dict):
        return {"crs": crs}
    return {"crs": _pyproj("write the CRS of the geometry").CRS.from_user_input(crs).to_json_dict()}


def wkb_points(array: pa.Array) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """x, y (float64) of ISO or extended WKB points, and True where a row is not one (null,
    empty, another geometry type, not WKB); those rows are NaN.

    Vectorised over the array's buffers: each row's byte order, type code and coordinates are
    gathered with numpy; Z and M values are ignored.
    """
    if not (pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type)):
        try:
            array = array.cast(pa.large_binary())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InvalidArgumentError(f"a WKB geometry column must be binary, not {array.type}") from None
    n = len(array)
    x, y = np.full(n, np.nan), np.full(n, np.nan)
    bad = np.ones(n, dtype=bool)
    if n == 0:
        return x, y, bad
    width = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=width)[array.offset:array.offset + n + 1].astype(np.int64)
    data_buf = array.buffers()[2]
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    valid = ~np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    rows = np.flatnonzero(valid & (lengths >= 5))
    if rows.size == 0:
        return x, y, bad
    begin = starts[rows]
    big = data[begin] == 0
    type_bytes = data[begin[:, None] + np.arange(1, 5)].astype(np.uint32)
    type_bytes[big] = type_bytes[big, ::-1]
    code = type_bytes[:, 0] | type_bytes[:, 1] << 8 | type_bytes[:, 2] << 16 | type_bytes[:, 3] << 24
    coord, dims, base = _wkb_layout(code)
    keep = np.flatnonzero((base == 1) & (lengths[rows] == coord + 8 * dims))
    if keep.size:
        at = begin[keep] + coord[keep]
        for k, out in ((0, x), (8, y)):
            raw = data[(at + k)[:, None] + np.arange(8)]
            raw[big[keep]] = raw[big[keep], ::-1]
            out[rows[keep]] = raw.view("<f8").ravel()
        bad[rows[keep]] = np.isnan(x[rows[keep]]) & np.isnan(y[rows[keep]])  # POINT EMPTY is NaN, NaN
    return x, y, bad


def _wkb_layout(code: Any) -> tuple[Any, Any, Any]:
    """Offset of the first coordinate, coordinates per point and base type (1 = point) of WKB
    type codes: ISO (1001 = point Z...) or extended (PostGIS, DuckDB: flags in the high bits)."""
    code = np.asarray(code, dtype=np.uint32)
    plain = code & 0x0FFFFFFF
    extended = (code & 0xE0000000) != 0
    ewkb_dims = 2 + ((code & 0x80000000) != 0).astype(int) + ((code & 0x40000000) != 0).astype(int)
    iso_dims = np.array([2, 3, 3, 4])[np.minimum(plain // 1000, 3)]
    base = np.where(extended, plain, plain % 1000)
    coord = 5 + 4 * ((code & 0x20000000) != 0).astype(int)  # an SRID word first
    return coord, np.where(extended, ewkb_dims, iso_dims), base


def _wkb_problem(value: bytes | None) -> str:
    """What keeps one WKB value from being a point, in words."""
    if value is None:
        return "the geometry is null"
    if len(value) < 5:
        return f"not WKB ({len(value)} bytes)"
    code = int.from_bytes(value[1:5], "little" if value[0] else "big")
    coord, dims, base = (int(v) for v in _wkb_layout(code))
    if base != 1:
        return f"a {WKB_TYPES.get(base, f'WKB type {code}')}, not a point"
    if len(value) != coord + 8 * dims:
        return f"a point of {len(value)} bytes, not {coord + 8 * dims}"
    return "an empty point"


def geoarrow_points(array: pa.Array, name: str = "geometry") -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """x, y of a GeoArrow point array (struct of x, y[, z, m] or interleaved fixed-size lists),
    and True where a row is null or empty (those rows are NaN)."""
    n = len(array)
    null = np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_struct(array.type):
        children = dict(zip([array.type.field(i).name for i in range(array.type.num_fields)], array.flatten()))
        if "x" not in children or "y" not in children:
            raise InvalidArgumentError(f"GeoArrow point column {name!r} has no x and y fields ({array.type})")
        x, y = (np.asarray(children[k].to_numpy(zero_copy_only=False), dtype=np.float64).copy() for k in ("x", "y"))
    elif pa.types.is_fixed_size_list(array.type) and array.type.list_size >= 2:
        size = array.type.list_size
        values = array.values.slice(array.offset * size, n * size)
        xy = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64).reshape(n, size)
        x, y = xy[:, 0].copy(), xy[:, 1].copy()
    else:
        raise InvalidArgumentError(f"GeoArrow point column {name!r} must be a struct or a fixed-size list, "
                                   f"not {array.type}")
    bad = null | (np.isnan(x) & np.isnan(y))
    x[bad], y[bad] = np.nan, np.nan
    return x, y, bad


def _point_problem(value: Any) -> str:
    return "the geometry is null" if value is None else "an empty point"


_transformers = threading.local()  # pyproj transformers are not thread-safe: one set per thread


def to_wgs84(x: NDArray[np.float64], y: NDArray[np.float64], crs: Any, *, column: str = "geometry",
             first_row: int = 0, allow_invalid: bool = False) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(lon, lat) degrees on WGS 84 of points (x, y) in ``crs`` (None: OGC:CRS84).

    Axis order is always x = easting/longitude, y = northing/latitude (pyproj ``always_xy``).

    Raises
    ------
    InvalidArgumentError
        The CRS is unknown or pyproj cannot read it.
    MissingDependencyError
        The CRS is not WGS 84 and pyproj is not installed.
    InvalidCoordinateError
        A point cannot be transformed (unless ``allow_invalid``: then NaN).
    """
    if crs is None or _is_wgs84(crs):
        return x, y
    if crs is UNKNOWN:
        raise InvalidArgumentError(
            f"the geometry column {column!r} has no CRS (unknown), so its coordinates cannot be placed; set it "
            "(GeoPandas: gdf.set_crs('EPSG:4326') or the projected CRS the coordinates are in) or give lat/lon columns")
    pyproj = _pyproj(f"transform the geometry column {column!r} from {_crs_name(crs)} to WGS 84")
    key = json.dumps(crs, sort_keys=True) if isinstance(crs, dict) else str(crs)
    cache = _transformers.__dict__.setdefault("cache", {})
    if key not in cache:
        try:
            source = pyproj.CRS.from_user_input(crs)
        except pyproj.exceptions.CRSError as exc:
            raise InvalidArgumentError(f"the CRS of the geometry column {column!r} cannot be read: {exc}") from None
        if len(cache) > 16:
            cache.clear()
        cache[key] = pyproj.Transformer.from_crs(source, "EPSG:4326", always_xy=True)
    lon, lat = cache[key].transform(x, y, errcheck=False)
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    failed = np.isfinite(x) & np.isfinite(y) & ~(np.isfinite(lon) & np.isfinite(lat))
    if failed.any():
        if not allow_invalid:
            i = int(np.flatnonzero(failed)[0])
            raise InvalidCoordinateError(
                f"{int(failed.sum())} points of the geometry column {column!r} cannot be transformed from "
                f"{_crs_name(crs)} to WGS 84 (outside the CRS's domain); first at row {first_row + i}: "
                f"x={x[i]}, y={y[i]}. Fix them, or pass on_invalid='null' (--on-invalid null) for null rows")
        lon[failed], lat[failed] = np.nan, np.nan
    return lon, lat


def _is_wgs84(crs: Any) -> bool:
    if isinstance(crs, dict):
        ident = crs.get("id") or {}
        return (str(ident.get("authority", "")).upper(), str(ident.get("code", "")).upper()) in WGS84
    if isinstance(crs, str):
        return tuple(crs.strip().upper().split(":", 1)) in WGS84
    return False


def _crs_name(crs: Any) -> str:
    if isinstance(crs, dict):
        ident = crs.get("id") or {}
        code = f" ({ident['authority']}:{ident['code']})" if "authority" in ident and "code" in ident else ""
        return f"{crs.get('name', 'its CRS')}{code}"
    return str(crs)[:80]


def _pyproj(task: str) -> Any:
    try:
        import pyproj
    except ImportError:
        raise MissingDependencyError(f"pyproj is needed to {task}: {GEO_INSTALL}") from None
    return pyproj


def points_wkt(array: pa.ChunkedArray | pa.Array, encoding: str) -> pa.Array:
    """A point geometry column as WKT text in its own CRS (``POINT (x y)``; null where it is not a
    point), for text outputs such as CSV."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    x, y, bad = wkb_points(array) if encoding == "WKB" else geoarrow_points(array)
    text = [None if b else f"POINT ({a!r} {c!r})" for a, c, b in zip(x.tolist(), y.tolist(), bad.tolist())]
    return pa.array(text, pa.string())


def geodataframe_table(frame: Any) -> pa.Table:
    """A GeoDataFrame as an Arrow table: geometry columns as WKB, GeoParquet ``geo`` metadata
    (the active geometry primary, its CRS as PROJJSON), the index dropped as for pandas."""
    table = pa.table(frame.to_arrow(index=False, geometry_encoding="WKB"))
    return pa.Table.from_batches(table.to_batches(), schema=geo_schema(table.schema, primary=frame.geometry.name))


def is_geodataframe(obj: Any) -> bool:
    return type(obj).__module__.startswith("geopandas") and hasattr(obj, "to_arrow") and hasattr(obj, "geometry")
