"""DuckDB access to an atlas: views over the Parquet files and the h3 functions SQL needs.

The functions carry the names of DuckDB's h3 extension, so the same SQL runs where that
extension is loaded. It cannot be downloaded on offline machines, so by default they are
vectorised Python UDFs; when the extension is already installed it is loaded instead.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.errors import HexatlasError, InvalidArgumentError

if TYPE_CHECKING:
    from query.atlas import Atlas

__all__ = ["QueryError", "connect", "run_sql"]


class QueryError(HexatlasError, ValueError):
    """SQL that DuckDB cannot parse, bind or run."""


def _to_numpy(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _latlng_to_cell(lat: pa.Array, lng: pa.Array, res: pa.Array) -> pa.Array:
    import h3.api.numpy_int as h3i

    lat_n, lng_n, res_n = _to_numpy(lat.cast(pa.float64())), _to_numpy(lng.cast(pa.float64())), _to_numpy(res)
    out = np.zeros(len(lat_n), dtype=np.uint64)
    valid = np.isfinite(lat_n) & np.isfinite(lng_n) & (np.abs(lat_n) <= 90) & (np.abs(lng_n) <= 180)
    for i in np.flatnonzero(valid):
        out[i] = h3i.latlng_to_cell(lat_n[i], lng_n[i], int(res_n[i]))
    return pa.array(out, pa.uint64(), mask=~valid)


def _cell_to_latlng(cell: pa.Array, which: int) -> pa.Array:
    import h3.api.numpy_int as h3i

    values = _to_numpy(cell.cast(pa.uint64()).fill_null(0))
    return pa.array([h3i.cell_to_latlng(c)[which] if c else None for c in values.tolist()], pa.float64())


def _cell_to_parent(cell: pa.Array, res: pa.Array) -> pa.Array:
    import h3.api.numpy_int as h3i

    values, res_n = _to_numpy(cell.cast(pa.uint64()).fill_null(0)), _to_numpy(res)
    return pa.array([h3i.cell_to_parent(c, int(r)) if c else None for c, r in zip(values.tolist(), res_n.tolist())],
                    pa.uint64())


def _cell_to_resolution(cell: pa.Array) -> pa.Array:
    # The resolution sits in bits 52-55 of an H3 index.
    values = _to_numpy(cell.cast(pa.uint64()).fill_null(0))
    return pa.array(((values >> np.uint64(52)) & np.uint64(15)).astype(np.int32), mask=_to_numpy(cell.is_null()))


def _register_functions(con: Any) -> None:
    """Load the h3 extension if it is installed, else register the UDFs."""
    import duckdb

    try:
        con.execute("LOAD h3")
        return
    except duckdb.Error:
        pass
    try:
        from duckdb.sqltypes import DOUBLE, INTEGER, UBIGINT
    except ImportError:  # duckdb < 1.4
        from duckdb.typing import DOUBLE, INTEGER, UBIGINT

    arrow = {"type": "arrow", "null_handling": "special"}
    con.create_function("h3_latlng_to_cell", _latlng_to_cell, [DOUBLE, DOUBLE, INTEGER], UBIGINT, **arrow)
    con.create_function("h3_cell_to_lat", lambda c: _cell_to_latlng(c, 0), [UBIGINT], DOUBLE, **arrow)
    con.create_function("h3_cell_to_lng", lambda c: _cell_to_latlng(c, 1), [UBIGINT], DOUBLE, **arrow)
    con.create_function("h3_cell_to_parent", _cell_to_parent, [UBIGINT, INTEGER], UBIGINT, **arrow)
    con.create_function("h3_cell_to_resolution", _cell_to_resolution, [UBIGINT], INTEGER, **arrow)


def connect(atlas: Atlas) -> Any:
    """A read-only-by-convention DuckDB connection over an atlas (see :meth:`Atlas.connect`)."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    _register_functions(con)
    for i, name in enumerate(atlas.models):
        view = "embeddings_" + re.sub(r"\W", "_", name)
        glob = atlas._parquet_glob(name).replace("'", "''")
        con.execute(
            f"CREATE VIEW {view} AS SELECT cell, CAST(res AS INTEGER) AS res, lat, lon, "
            f"CAST(embedding AS FLOAT[]) AS embedding "
            f"FROM read_parquet('{glob}', hive_partitioning = true)"
        )
        if i == 0:
            con.execute(f"CREATE VIEW embeddings AS SELECT * FROM {view}")
    return con


def run_sql(con: Any, text: str) -> pa.Table:
    """Run SQL and return an Arrow table; DuckDB's errors become :class:`QueryError`."""
    import duckdb

    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError("empty SQL")
    try:
        result = con.sql(text)
        return result.to_arrow_table() if result is not None else pa.table({})
    except duckdb.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise QueryError(f"SQL failed: {first}") from None
