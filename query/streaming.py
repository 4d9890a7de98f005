"""Joins that stream: points read a batch at a time, looked up, and handed on or written as they go.

Memory follows the batch, not the table: a batch takes about :data:`BATCH_BYTES` while it is
joined (43,690 rows of a 256-d atlas, 127,100 of a 4-d one), by the same code as ``Atlas.join``, then
written (a Parquet row group, or a block of CSV lines) and dropped before the next is read.
A Parquet input is read a batch at a time (``ParquetFile.iter_batches``), a CSV file in 8 MB
blocks (``pyarrow.csv.open_csv``), a GDAL vector file through pyogrio's Arrow stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from catalog.errors import InvalidArgumentError
from catalog.tables import atomic_path, locate_points, open_points

__all__ = ["batch_rows_for", "check_join_options", "join_batches", "join_file"]

BATCH_BYTES = 64 << 20
ROW_BYTES = 512  # what a row costs beside its embedding while it is joined (coordinates, cells, sorts), measured
ON_INVALID = ("raise", "null")
OUTPUTS = {".parquet": "parquet", ".pq": "parquet", ".geoparquet": "parquet", ".csv": "csv"}


def check_join_options(on_invalid: str, exact: bool, interpolate: bool) -> None:
    """Refuse option values a join cannot take (in memory or streamed), before any row is read."""
    if on_invalid not in ON_INVALID:
        raise InvalidArgumentError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    if exact and interpolate:
        raise InvalidArgumentError("exact=True evaluates the encoder at each point, interpolate=True blends "
                                   "stored cells: choose one")


def batch_rows_for(dim: int) -> int:
    """Rows of a batch that joins ``dim``-d embeddings (float32) in about :data:`BATCH_BYTES`,
    between 4,096 and 1,048,576."""
    return int(min(max(BATCH_BYTES // (4 * dim + ROW_BYTES), 4096), 1 << 20))


def _joined(atlas: Any, points: Any, *, lat_col: str | None, lon_col: str | None, res: int | None,
            model: str | None, interpolate: bool, on_invalid: str, exact: bool, land: bool,
            batch_rows: int | None) -> tuple[pa.Schema, Iterator[pa.RecordBatch], int | None]:
    """The output schema, the joined batches (lazily) and the input's row count when known."""
    check_join_options(on_invalid, exact, interpolate)
    res = atlas._res(res, model)
    if batch_rows is not None and batch_rows < 1:
        raise InvalidArgumentError(f"batch_rows must be a positive number of rows, got {batch_rows}")
    source, total = open_points(points, batch_rows=batch_rows or batch_rows_for(atlas.dim(model)))
    where = locate_points(source.schema, lat_col=lat_col, lon_col=lon_col)
    added = [("cell", pa.uint64()), ("embedding", pa.list_(pa.float32(), atlas.dim(model)))]
    added += [("land", pa.bool_())] if land else []
    for name, _ in added:
        if name in source.schema.names:
            raise InvalidArgumentError(f"the points already have a {name!r} column; rename or drop it first")
    schema = source.schema
    for name, kind in added:
        schema = schema.append(pa.field(name, kind))

    def batches() -> Iterator[pa.RecordBatch]:
        first = 0
        for batch in source:
            if batch.num_rows == 0:
                continue
            table = atlas._join_table(pa.Table.from_batches([batch]), where, res=res, model=model,
                                      interpolate=interpolate, on_invalid=on_invalid, exact=exact, land=land,
                                      first_row=first)
            first += batch.num_rows
            yield pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns], schema=schema)

    return schema, batches(), total


def join_batches(atlas: Any, points: Any, *, batch_rows: int | None = None, **options: Any) -> pa.RecordBatchReader:
    """``Atlas.join_batches``: the joined batches as a ``pyarrow.RecordBatchReader``."""
    schema, batches, _ = _joined(atlas, points, batch_rows=batch_rows, **options)
    return pa.RecordBatchReader.from_batches(schema, batches)


def join_file(atlas: Any, points: Any, output: str | os.PathLike[str], *, batch_rows: int | None = None,
              progress: bool | None = None, **options: Any) -> int:
    """``Atlas.join_file``: write the joined batches to ``output`` as they come; the row count."""
    from tqdm.auto import tqdm

    output = Path(output)
    kind = OUTPUTS.get(output.suffix.lower())
    if kind is None:
        raise InvalidArgumentError(f"output {str(output)!r} must be .parquet or .csv")
    schema, batches, total = _joined(atlas, points, batch_rows=batch_rows, **options)
    rows = 0
    with atomic_path(output) as tmp, tqdm(total=total, unit="pt", unit_scale=True, desc="join", smoothing=0.1,
                                          disable=None if progress is None else not progress) as bar:
        sink = _ParquetSink(tmp, schema) if kind == "parquet" else _CsvSink(tmp, schema)
        try:
            for batch in batches:
                sink.write(batch)
                rows += batch.num_rows
                bar.update(batch.num_rows)
        finally:
            sink.close()
    return rows


class _ParquetSink:
    """A Parquet file written a row group a batch (zstd), with the schema's key/value metadata
    (GeoParquet's ``geo`` among them)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        import pyarrow.parquet as pq

        self._writer = pq.ParquetWriter(path, schema, compression="zstd")

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()


class _CsvSink:
    """CSV written a block of lines a batch: embeddings as JSON lists, cells as integers, and
    geometry columns as WKT in their own CRS."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        import json

        geo = json.loads((schema.metadata or {}).get(b"geo", b"{}"))
        self._geometry = {name: str(meta.get("encoding", "WKB")) for name, meta in (geo.get("columns") or {}).items()
                          if name in schema.names}
        self._names = schema.names
        self._file = open(path, "w", newline="")  # noqa: SIM115  closed by close(), after the last batch
        self._header = True

    def write(self, batch: pa.RecordBatch) -> None:
        from query.output import emit

        table = pa.Table.from_batches([batch])
        for name, encoding in self._geometry.items():
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, _wkt(table.column(name), encoding))
        emit(table, "csv", out=self._file, header=self._header)
        self._header = False

    def close(self) -> None:
        if self._header:  # no rows: still a header line
            import csv

            csv.writer(self._file).writerow(self._names)
        self._file.close()


def _wkt(column: pa.ChunkedArray, encoding: str) -> pa.Array:
    """A geometry column as WKT: any geometry with shapely installed, points without it."""
    from catalog.geometry import points_wkt

    if encoding.upper() == "WKB":
        try:
            import shapely
        except ImportError:
            pass
        else:
            storage = column.combine_chunks()
            storage = storage.storage if isinstance(storage, pa.ExtensionArray) else storage
            return pa.array(shapely.to_wkt(shapely.from_wkb(storage.to_numpy(zero_copy_only=False)), rounding_precision=-1), pa.string())
    return points_wkt(column, "WKB" if encoding.upper() == "WKB" else encoding.lower())
