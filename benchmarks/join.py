"""Joins that stream against the in-memory join: ``python -m benchmarks --only join``.

A resolution-7 atlas of the tests' toy encoder (4-d, the build pipeline as for any model) over
a region of Europe (:data:`REGION`, about 1.6M cells) is built once; seeded Parquet tables of
uniform points in that region (``id``, ``lat``, ``lon``; row groups of 1M rows) are joined
onto it twice each, in fresh Python processes of this checkout under ``/usr/bin/time -v``
(peak RSS), with the input and the atlas dropped from the page cache first:

- streamed: ``hexatlas join ATLAS --input P --output O`` (``Atlas.join_file``: a batch read,
  looked up and written as a Parquet row group at a time);
- in memory: ``atlas.join(P)`` and ``write_parquet`` of the whole table (what ``hexatlas join``
  did before it streamed).

Both outputs are checked to hold the same cells. Default: 3M and 30M points (a few minutes on
2 cores, about 3 GB of scratch); ``--quick``: 300k and 3M. Scratch goes under
``$HEXATLAS_BENCH_DIR`` (default: a new directory under /tmp) and is deleted at the end unless
``$HEXATLAS_BENCH_KEEP`` is set; ``$HEXATLAS_BENCH_ATLAS=<its atlas directory>`` measures again on
the atlas a kept run built.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks._common import Row
from benchmarks.scale import _drop_page_cache, _run

REPO = Path(__file__).resolve().parents[1]
REGION = "-10,35,30,60"  # lon/lat box: Portugal to Poland, Sicily to Norway's south
SIZES = (3_000_000, 30_000_000)
QUICK_SIZES = (300_000, 3_000_000)
RSS_TARGET_MB = 1500

_BUILD = """
from builder.build import build
start = time.perf_counter()
summary = build("tests.data.toy_encoder:load", resolutions="7", output=P["atlas"], region=P["region"],
                device="cpu", progress=False)
emit(cells=sum(summary.cells.values()), seconds=time.perf_counter() - start)
"""

_STREAM = """
from catalog.cli import main
start = time.perf_counter()
status = main(["join", P["atlas"], "--input", P["input"], "--output", P["output"], "--no-progress"])
emit(status=status, seconds=time.perf_counter() - start)
"""

_IN_MEMORY = """
import query
from catalog.tables import write_parquet
start = time.perf_counter()
table = query.open(P["atlas"]).join(P["input"])
write_parquet(table, P["output"])
emit(status=0, rows=table.num_rows, seconds=time.perf_counter() - start)
"""


def _log(message: str) -> None:
    print(f"[join {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _write_points(path: Path, n: int, seed: int) -> None:
    """``n`` uniform points in :data:`REGION` (uniform on the sphere), written 1M rows at a time."""
    import pyarrow.parquet as pq

    min_lon, min_lat, max_lon, max_lat = (float(v) for v in REGION.split(","))
    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.int64()), ("lat", pa.float64()), ("lon", pa.float64())])
    lo, hi = np.sin(np.radians(min_lat)), np.sin(np.radians(max_lat))
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for start in range(0, n, 1 << 20):
            m = min(1 << 20, n - start)
            lat = np.degrees(np.arcsin(rng.uniform(lo, hi, m)))
            lon = rng.uniform(min_lon, max_lon, m)
            writer.write_table(pa.table({"id": np.arange(start, start + m), "lat": lat, "lon": lon}, schema=schema))


def _same_cells(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    files = [pq.ParquetFile(p) for p in (a, b)]
    if files[0].metadata.num_rows != files[1].metadata.num_rows:
        return False
    streams = [f.iter_batches(batch_size=1 << 20, columns=["cell"]) for f in files]
    left = pa.concat_arrays([x.column(0) for x in streams[0]])
    right = pa.concat_arrays([x.column(0) for x in streams[1]])
    return left.equals(right)


def run(quick: bool = False) -> list[Row]:
    sizes = QUICK_SIZES if quick else SIZES
    base = os.environ.get("HEXATLAS_BENCH_DIR")
    work = Path(tempfile.mkdtemp(prefix="hexatlas-join-", dir=base))
    rows: list[Row] = []
    try:
        atlas = Path(os.environ.get("HEXATLAS_BENCH_ATLAS") or work / "atlas")
        if atlas.exists():
            import query

            built = {"cells": query.open(atlas).info()["toy"]["resolutions"]["7"]["cells"]}
            _log(f"measuring on {atlas} ({built['cells']:,} cells)")
        else:
            built, rss = _run(_BUILD, code=REPO, scratch=work, atlas=str(atlas), region=REGION)
            _log(f"built {built['cells']:,} cells at resolution 7 in {built['seconds']:.0f} s "
                 f"(peak RSS {rss / 1e6:.0f} MB)")
        for n in sizes:
            points = work / f"points-{n}.parquet"
            _write_points(points, n, seed=n)
            measured = {}
            for name, snippet in (("in-memory", _IN_MEMORY), ("streamed", _STREAM)):
                out = work / f"out-{name}-{n}.parquet"
                _drop_page_cache(work)
                if not atlas.is_relative_to(work):
                    _drop_page_cache(atlas)
                try:
                    result, rss = _run(snippet, code=REPO, scratch=work, atlas=str(atlas), input=str(points),
                                       output=str(out))
                except RuntimeError as exc:  # killed for memory, say: a row that says so
                    _log(f"{name} join of {n:,} points failed: {exc}")
                    measured[name] = (float("nan"), float("nan"))
                    continue
                measured[name] = (n / result["seconds"], rss / 1e6)
                _log(f"{name} join of {n:,} points: {result['seconds']:.1f} s, {n / result['seconds']:,.0f} pt/s, "
                     f"peak RSS {rss / 1e6:,.0f} MB")
            outs = [work / f"out-{name}-{n}.parquet" for name in ("in-memory", "streamed")]
            if all(p.exists() for p in outs) and not _same_cells(*outs):
                raise RuntimeError(f"the streamed and in-memory joins of {n:,} points differ")
            for p in (points, *outs):
                p.unlink(missing_ok=True)
            label = f"{n / 1e6:g}M pts (id, lat, lon), res 7 region atlas (toy 4-d, {built['cells'] / 1e6:.1f}M cells)"
            stream, memory = measured["streamed"], measured["in-memory"]
            rows.append(Row("join", f"hexatlas join, streamed: {label}", stream[0], "pt/s", "in-memory join",
                            memory[0]))
            rows.append(Row("join", f"peak RSS, streamed: {label}", stream[1], "MB", "in-memory join", memory[1],
                            target=f"< {RSS_TARGET_MB:,} MB"))
    finally:
        if not os.environ.get("HEXATLAS_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return rows
