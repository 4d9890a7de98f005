"""Embed the points of a table: the job behind ``hexatlas encode``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.errors import InvalidArgumentError
from catalog.tables import as_table, coordinate_columns, embedding_array, read_points, write_parquet

if TYPE_CHECKING:
    from builder.encoders._base import Encoder

__all__ = ["embed_table", "encode_file"]

PROVENANCE_KEY = "hexatlas.provenance"


def embed_table(
    table: Any,
    encoder: Encoder,
    *,
    lat_col: str | None = None,
    lon_col: str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> pa.Table:
    """Return ``table`` plus an ``embedding`` column computed by ``encoder``.

    Parameters
    ----------
    table : pyarrow.Table, or a pandas, polars or GeoPandas DataFrame
        Points: latitude and longitude columns in degrees, or (without ``lat``/``lon``
        columns) a point geometry in any CRS pyproj knows (GeoParquet ``geo`` metadata, a
        GeoDataFrame), transformed to WGS 84; the geometry is kept as it is.
    encoder : Encoder
        From :func:`builder.encoders.load_encoder`.
    lat_col, lon_col : str, optional
        Column names (matched case-insensitively when unambiguous); default ``lat``/``lon``,
        else the point geometry.
    progress : bool, optional
        Show a progress bar; None shows one on a terminal for inputs of 100,000+ rows.

    Returns
    -------
    pyarrow.Table
        The input columns, then ``embedding``: fixed-size list of float32, length ``encoder.dim``.

    Raises
    ------
    InvalidArgumentError
        The table already has an ``embedding`` column.
    UnknownColumnError, InvalidCoordinateError
        From the coordinate columns.
    """
    from tqdm.auto import tqdm

    table = as_table(table, action="embed the points of")
    if "embedding" in table.column_names:
        raise InvalidArgumentError("the input already has an 'embedding' column; rename or drop it first")
    lat, lon = coordinate_columns(table, lat_col=lat_col, lon_col=lon_col)
    n = lat.size
    out = np.empty((n, encoder.dim), dtype=np.float32)
    step = max(int(batch_size or encoder.batch_size), 1) * 4
    disable = (n < 100_000) if progress is None else not progress
    with tqdm(total=n, unit="pt", desc=f"encode {encoder.name}", disable=disable or None) as bar:
        for start in range(0, n, step):
            stop = min(start + step, n)
            out[start:stop] = encoder.encode(lat=lat[start:stop], lon=lon[start:stop], batch_size=batch_size)
            bar.update(stop - start)
    return table.append_column("embedding", embedding_array(out))


def encode_file(
    input: str | Path,
    output: str | Path,
    encoder: Encoder | str,
    *,
    lat_col: str | None = None,
    lon_col: str | None = None,
    batch_size: int | None = None,
    progress: bool | None = None,
    **load_options: Any,
) -> pa.Table:
    """Read points from a file, embed them, write Parquet atomically; returns the table.

    Parameters
    ----------
    input, output : path
        A ``.csv``, ``.parquet`` or GeoParquet file of points (with GeoPandas installed also
        ``.gpkg``, ``.geojson``, ``.fgb``...: see :func:`catalog.tables.read_points`); the
        ``.parquet`` file to write (GeoParquet, keeping the geometry, when the input has one).
    encoder : Encoder or str
        A loaded encoder, or a model name loaded (with ``load_options``, e.g.
        ``checkpoint=``, ``device=``) only after the input has been read and checked.

    The output's key/value metadata holds the encoder's provenance under
    ``hexatlas.provenance`` (JSON).
    """
    from builder.encoders import load_encoder

    if Path(output).suffix.lower() not in (".parquet", ".pq"):
        raise InvalidArgumentError(f"output {str(output)!r} must be a .parquet file")
    table = read_points(input)
    coordinate_columns(table, lat_col=lat_col, lon_col=lon_col)  # fail on bad rows before loading weights
    if isinstance(encoder, str):
        encoder = load_encoder(encoder, batch_size=batch_size, **load_options)
    table = embed_table(table, encoder, lat_col=lat_col, lon_col=lon_col, batch_size=batch_size, progress=progress)
    write_parquet(table, output, metadata={PROVENANCE_KEY: encoder.provenance.to_json()})
    return table
