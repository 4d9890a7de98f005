"""Point tables in and Parquet out: the file handling shared by the builder and the query layer."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.coords import as_coordinates
from catalog.errors import InputFileError, InvalidCoordinateError, UnknownColumnError

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["atomic_path", "coordinate_columns", "dequantize", "embedding_array", "embedding_matrix", "read_points", "write_parquet"]

POINT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def read_points(path: str | Path) -> pa.Table:
    """Read a CSV or Parquet file of points into an Arrow table.

    Raises
    ------
    InputFileError
        The file is missing, has an unsupported extension or cannot be parsed.
    """
    import pyarrow.csv
    import pyarrow.parquet as pq

    path = Path(path)
    kind = POINT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise InputFileError(f"cannot read {str(path)!r}: expected a .csv or .parquet file")
    if not path.is_file():
        raise InputFileError(f"input file {str(path)!r} does not exist")
    try:
        return pyarrow.csv.read_csv(path) if kind == "csv" else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputFileError(f"cannot read {str(path)!r} as {kind}: {exc}") from None


def coordinate_columns(
    table: pa.Table, *, lat_col: str = "lat", lon_col: str = "lon", allow_invalid: bool = False
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The latitude and longitude columns of a table as validated float64 arrays.

    Nulls count as invalid coordinates. Column names match exactly, or else
    case-insensitively when that is unambiguous (``Lat``/``Lon`` files are common).

    Raises
    ------
    UnknownColumnError
        A column is not in the table; the message lists the columns there are.
    InvalidCoordinateError
        A value is not numeric, null, NaN or out of range (unless ``allow_invalid``).
    """
    arrays = []
    for role, name in (("latitude", lat_col), ("longitude", lon_col)):
        column = _find_column(table, name, role)
        try:
            values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidCoordinateError(f"{role} column {name!r} is not numeric ({column.type}): {exc}") from None
        arrays.append(np.asarray(values, dtype=np.float64))  # nulls arrive as NaN
    return as_coordinates(lat=arrays[0], lon=arrays[1], allow_invalid=allow_invalid)


def _find_column(table: pa.Table, name: str, role: str) -> pa.ChunkedArray:
    if name in table.column_names:
        return table.column(name)
    folded = [c for c in table.column_names if c.lower() == name.lower()]
    if len(folded) == 1:
        return table.column(folded[0])
    raise UnknownColumnError(
        f"no {role} column {name!r}; the table has {', '.join(map(repr, table.column_names)) or 'no columns'}. "
        f"Name it with --{'lat' if role == 'latitude' else 'lon'}-col (Python: "
        f"{'lat' if role == 'latitude' else 'lon'}_col=)"
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
