"""Point tables in and Parquet out: the file handling shared by the builder and the query layer."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.coords import as_coordinates
from catalog.errors import (
    InputFileError,
    InvalidArgumentError,
    InvalidCoordinateError,
    MissingDependencyError,
    UnknownColumnError,
)
from catalog.geometry import (
    GEO_INSTALL,
    PointColumn,
    geo_schema,
    geodataframe_table,
    is_geodataframe,
    is_geometry_field,
    point_column,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["Coordinates", "as_table", "atomic_path", "coordinate_columns", "dequantize", "embedding_array",
           "embedding_matrix", "locate_points", "open_points", "read_points", "write_parquet"]

POINT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".geoparquet": "parquet"}
# Read through GDAL (pyogrio, with GeoPandas): the vector formats GeoPandas reads.
VECTOR_FORMATS = {".gpkg": "GeoPackage", ".geojson": "GeoJSON", ".json": "GeoJSON", ".geojsonl": "GeoJSONSeq",
                  ".geojsons": "GeoJSONSeq", ".fgb": "FlatGeobuf", ".shp": "Shapefile", ".gml": "GML", ".kml": "KML"}
SUPPORTED = "a .csv or .parquet file (with GeoPandas also .gpkg, .geojson, .fgb, .shp)"


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    kind = POINT_FORMATS.get(suffix) or ("vector" if suffix in VECTOR_FORMATS else None)
    if kind is None:
        raise InputFileError(f"cannot read {str(path)!r}: expected {SUPPORTED}")
    if not path.is_file():
        raise InputFileError(f"input file {str(path)!r} does not exist")
    return kind


def read_points(path: str | Path) -> pa.Table:
    """Read a file of points into an Arrow table: CSV, Parquet or GeoParquet, and (with
    GeoPandas installed) the vector formats GDAL reads (GeoPackage, GeoJSON, FlatGeobuf...).

    A geometry column comes back as WKB (or GeoParquet's GeoArrow encoding) with GeoParquet
    ``geo`` metadata; a vector file's geometry column is named ``geometry``, as GeoPandas names it.

    Raises
    ------
    InputFileError
        The file is missing, has an unsupported extension or cannot be parsed.
    MissingDependencyError
        A vector format without GeoPandas (pyogrio) installed.
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "vector":
        reader, _ = _vector_batches(path, 1 << 16)
        return _with_geo(reader.read_all())
    import pyarrow.csv
    import pyarrow.parquet as pq

    try:
        table = pyarrow.csv.read_csv(path) if kind == "csv" else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFileError(f"cannot read {str(path)!r} as {kind}: {exc}") from None
    return _with_geo(table)


def open_points(points: Any, *, batch_rows: int = 65_536) -> tuple[pa.RecordBatchReader, int | None]:
    """Points as a stream of record batches of at most about ``batch_rows`` rows, and the row
    count when it is known without reading (Parquet, an in-memory table).

    ``points``: a CSV, (Geo)Parquet or vector file path (read a batch at a time), a
    ``pyarrow.RecordBatchReader`` (or anything with ``__arrow_c_stream__``), or any in-memory
    table :func:`as_table` takes. Geometry columns carry GeoParquet ``geo`` metadata, as in
    :func:`read_points`.
    """
    if isinstance(points, (str, os.PathLike)):
        path = Path(points)
        kind = _kind(path)
        if kind == "vector":
            return _vector_batches(path, batch_rows)
        if kind == "parquet":
            import pyarrow.parquet as pq

            try:  # pre-buffering keeps every row group read so far (pyarrow 26): memory would follow the file
                file = pq.ParquetFile(path, pre_buffer=False)
            except (pa.ArrowInvalid, OSError) as exc:
                raise InputFileError(f"cannot read {str(path)!r} as parquet: {exc}") from None
            schema = geo_schema(file.schema_arrow)
            batches = _checked(file.iter_batches(batch_size=batch_rows), path, "parquet")
            return _reader(schema, batches), file.metadata.num_rows
        import pyarrow.csv

        try:
            stream = pyarrow.csv.open_csv(path, read_options=pyarrow.csv.ReadOptions(block_size=8 << 20))
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputFileError(f"cannot read {str(path)!r} as csv: {exc}") from None
        return _reader(stream.schema, _rebatched(_checked(stream, path, "csv"), batch_rows)), None
    in_memory = isinstance(points, (pa.Table, pa.RecordBatch)) or is_geodataframe(points) or (
        type(points).__module__.startswith(("pandas", "polars")))
    if isinstance(points, pa.RecordBatchReader) or (not in_memory and hasattr(points, "__arrow_c_stream__")):
        reader = points if isinstance(points, pa.RecordBatchReader) else pa.RecordBatchReader.from_stream(points)
        return _reader(geo_schema(reader.schema), _rebatched(reader, batch_rows)), None
    table = as_table(points)
    return pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=batch_rows)), table.num_rows


def _reader(schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> pa.RecordBatchReader:
    """Batches under ``schema`` (the same columns; the schema may add geometry metadata)."""
    return pa.RecordBatchReader.from_batches(
        schema, (pa.RecordBatch.from_arrays(b.columns, schema=schema) for b in batches))


def _checked(batches: Any, path: Path, kind: str) -> Iterator[pa.RecordBatch]:
    try:
        yield from batches
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFileError(f"cannot read {str(path)!r} as {kind}: {exc}") from None


def _rebatched(batches: Any, rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of at most ``rows`` rows (a CSV block, a caller's batch may be larger)."""
    for batch in batches:
        for start in range(0, batch.num_rows, rows):
            yield batch.slice(start, rows)


def _vector_batches(path: Path, batch_rows: int) -> tuple[pa.RecordBatchReader, None]:
    """A GDAL vector layer as record batches (pyogrio), its geometry column named ``geometry``."""
    try:
        from pyogrio.errors import DataSourceError
        from pyogrio.raw import open_arrow
    except ImportError:
        raise MissingDependencyError(f"reading {path.suffix} files needs GeoPandas (pyogrio): {GEO_INSTALL}") from None
    opened = open_arrow(path, use_pyarrow=True, batch_size=batch_rows)
    try:
        _, reader = opened.__enter__()
    except (DataSourceError, OSError, RuntimeError) as exc:
        raise InputFileError(f"cannot read {str(path)!r}: {exc}") from None
    schema = reader.schema
    geom = next((f.name for f in schema if is_geometry_field(f)), None)
    if geom is not None and geom != "geometry" and "geometry" not in schema.names:
        schema = schema.set(schema.get_field_index(geom), schema.field(geom).with_name("geometry"))
    schema = geo_schema(schema)

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in reader:
                yield pa.RecordBatch.from_arrays(batch.columns, schema=schema)
        finally:
            opened.__exit__(None, None, None)

    return pa.RecordBatchReader.from_batches(schema, batches()), None


def _with_geo(table: pa.Table) -> pa.Table:
    schema = geo_schema(table.schema)
    return table if schema is table.schema else pa.Table.from_arrays(table.columns, schema=schema)


def as_table(points: Any, *, action: str = "read points from") -> pa.Table:
    """An in-memory table of points: a pyarrow Table or RecordBatch, a pandas, polars or
    GeoPandas DataFrame (geometry as WKB with its CRS in GeoParquet ``geo`` metadata), or a
    path :func:`read_points` reads. ``action`` words the error for anything else."""
    if isinstance(points, pa.Table):
        return _with_geo(points)
    if isinstance(points, (str, os.PathLike)):
        return read_points(points)
    if isinstance(points, pa.RecordBatch):
        return _with_geo(pa.Table.from_batches([points]))
    if is_geodataframe(points):
        return geodataframe_table(points)
    if hasattr(points, "to_arrow") and type(points).__module__.startswith("polars"):
        return _with_geo(points.to_arrow())
    if type(points).__module__.startswith("pandas"):
        return pa.Table.from_pandas(points, preserve_index=False)
    raise InvalidArgumentError(
        f"cannot {action} {type(points).__name__}; give a pyarrow Table, a pandas, polars or GeoPandas "
        f"DataFrame, or the path of {SUPPORTED}"
    )


@dataclass(frozen=True)
class Coordinates:
    """Where a table's points are: two columns of degrees (``lat``, ``lon``) or a point
    geometry column (``geometry``), found once per schema by :func:`locate_points`."""

    lat: str | None = None
    lon: str | None = None
    geometry: PointColumn | None = None

    def read(self, table: pa.Table | pa.RecordBatch, *, first_row: int = 0,
             allow_invalid: bool = False) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Latitudes and longitudes (float64 degrees, WGS 84) of the rows of ``table``; errors
        name rows counted from ``first_row``."""
        if self.geometry is not None:
            lon, lat = self.geometry.lonlat(table.column(self.geometry.name), first_row=first_row,
                                            allow_invalid=allow_invalid)
            return as_coordinates(lat=lat, lon=lon, allow_invalid=allow_invalid, first_index=first_row)
        arrays = []
        for role, name in (("latitude", self.lat), ("longitude", self.lon)):
            column = table.column(name)
            try:
                values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise InvalidCoordinateError(f"{role} column {name!r} is not numeric ({column.type}): {exc}") from None
            arrays.append(np.asarray(values, dtype=np.float64))  # nulls arrive as NaN
        return as_coordinates(lat=arrays[0], lon=arrays[1], allow_invalid=allow_invalid, first_index=first_row)


def locate_points(schema: pa.Schema, *, lat_col: str | None = None, lon_col: str | None = None) -> Coordinates:
    """How to read the points of tables of ``schema``.

    Named columns when ``lat_col`` or ``lon_col`` is given (the other defaults to ``lat`` /
    ``lon``); otherwise ``lat`` and ``lon`` columns when the table has both, else its point
    geometry (GeoParquet or GeoArrow; see :mod:`catalog.geometry`). Names match exactly, or
    else case-insensitively when that is unambiguous (``Lat``/``Lon`` files are common).

    Raises
    ------
    UnknownColumnError
        A named column is not there, or there are neither lat/lon columns nor a geometry;
        the message lists the columns there are.
    """
    names = schema.names
    if lat_col is None and lon_col is None:
        found = [_match(names, n) for n in ("lat", "lon")]
        if None not in found:
            return Coordinates(lat=found[0], lon=found[1])
        geometry = point_column(schema)
        if geometry is not None:
            return Coordinates(geometry=geometry)
    lat = _column(names, lat_col or "lat", "latitude", geometry_too=lat_col is None)
    lon = _column(names, lon_col or "lon", "longitude", geometry_too=lon_col is None)
    return Coordinates(lat=lat, lon=lon)


def coordinate_columns(
    table: pa.Table, *, lat_col: str | None = None, lon_col: str | None = None, allow_invalid: bool = False
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The latitudes and longitudes of a table's points as validated float64 arrays (degrees).

    The points are found by :func:`locate_points`: ``lat``/``lon`` columns (or the named
    ones), else the table's point geometry, transformed to WGS 84 from its CRS. Nulls count
    as invalid coordinates.

    Raises
    ------
    UnknownColumnError
        A column is not in the table; the message lists the columns there are.
    InvalidCoordinateError
        A value is not numeric, null, NaN or out of range, or a geometry is not a point
        (unless ``allow_invalid``: then NaN).
    """
    return locate_points(table.schema, lat_col=lat_col, lon_col=lon_col).read(table, allow_invalid=allow_invalid)


def _match(names: list[str], name: str) -> str | None:
    if name in names:
        return name
    folded = [c for c in names if c.lower() == name.lower()]
    return folded[0] if len(folded) == 1 else None


def _column(names: list[str], name: str, role: str, *, geometry_too: bool) -> str:
    found = _match(names, name)
    if found is not None:
        return found
    flag = "lat" if role == "latitude" else "lon"
    other = " and no point geometry (GeoParquet or a GeoDataFrame)" if geometry_too else ""
    raise UnknownColumnError(
        f"no {role} column {name!r}{other}; the table has {', '.join(map(repr, names)) or 'no columns'}. "
        f"Name it with --{flag}-col (Python: {flag}_col=)"
    )


def embedding_array(values: NDArray[Any]) -> pa.FixedSizeListArray:
    """A (n, dim) numpy array as an Arrow fixed-size-list column, without copying."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> NDArray[Any]:
    """A fixed-size-list embedding column as a (n, dim) numpy array in its stored dtype.

    The inverse of :func:`embedding_array`; rows must not be null. A fixed-size binary
    column (format 2's int8 codes) gives int8.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_fixed_size_binary(column.type):
        dim = column.type.byte_width
        data = np.frombuffer(column.buffers()[1], dtype=np.int8)
        return data[column.offset * dim:(column.offset + len(column)) * dim].reshape(-1, dim)
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)


def dequantize(q: NDArray[Any], scale: NDArray[np.float32], offset: NDArray[np.float32],
               out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """int8 codes back to values, ``q * scale + offset`` per dimension (the format's int8 storage).

    ``out`` (float32) may be ``q`` itself when that is already float32.
    """
    out = np.multiply(q, scale, out=out, dtype=np.float32)
    return np.add(out, offset, out=out)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Readers never see a half-written file: a crash leaves at most a ``.tmp`` file, which is
    removed when the error is a Python exception.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_parquet(table: pa.Table, path: str | Path, *, metadata: dict[str, str] | None = None, **options: Any) -> None:
    """Write ``table`` to Parquet atomically (zstd), adding key/value ``metadata``."""
    import pyarrow.parquet as pq

    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    options.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **options)
