"""Joins that stream against the in-memory join: ``python -m benchmarks --only join``.

Two resolution-7 regional atlases are built (:data:`CASES`): the tests' toy encoder (4-d) over
Europe (about 1.7M cells), and SatCLIP L=10 with random weights (256-d, float16, as the
published SatCLIP atlases) over a box in the Alps (about 25k cells: the embedding width, not
the cell count, is what costs a join memory). Seeded Parquet tables of uniform points in each
region (``id``, ``lat``, ``lon``; row groups of 1M rows) are joined onto it twice each, in fresh
Python processes of this checkout under ``/usr/bin/time -v`` (peak RSS), with the input and
the atlas dropped from the page cache first:

- streamed: ``hexatlas join ATLAS --input P --output O`` (``Atlas.join_file``: a batch read,
  looked up and written as a Parquet row group at a time);
- in memory: ``atlas.join(P)`` and ``write_parquet`` of the whole table (what ``hexatlas join``
  did before it streamed).

Both outputs are checked to hold the same cells. Default: 3M and 30M points on the 4-d atlas,
1M on the 256-d one (about ten minutes on 2 cores, 3 GB of scratch at most at a time);
``--quick``: a tenth of each. Scratch goes under
``$HEXATLAS_BENCH_DIR`` (default: a new directory under /tmp) and is deleted at the end unless
``$HEXATLAS_BENCH_KEEP`` is set; ``$HEXATLAS_BENCH_ATLAS=<a kept run's directory>`` measures
again on the atlases it built.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks._common import Row
from benchmarks.scale import _drop_page_cache, _run

REPO = Path(__file__).resolve().parents[1]
RSS_TARGET_MB = 1500


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    dataset: str
    region: str  # lon/lat box
    sizes: tuple[int, ...]
    label: str


CASES = (
    Case("toy", "tests.data.toy_encoder:load", "toy", "-10,35,30,60",  # Portugal to Poland, Sicily to Norway's south
         (3_000_000, 30_000_000), "toy 4-d"),
    Case("satclip", "satclip-vit16-l10", "satclip-vit16-l10", "5,45,10,48",  # the western Alps
         (1_000_000,), "SatCLIP L=10 256-d"),
)

_BUILD = """
from builder.build import build
start = time.perf_counter()
summary = build(P["model"], resolutions="7", output=P["atlas"], region=P["region"], checkpoint=P["checkpoint"],
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


def _write_points(path: Path, n: int, seed: int, region: str) -> None:
    """``n`` uniform points in the box ``region`` (uniform on the sphere), written 1M rows at a time."""
    import pyarrow.parquet as pq

    min_lon, min_lat, max_lon, max_lat = (float(v) for v in region.split(","))
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


def _case(case: Case, work: Path, kept: Path | None, quick: bool) -> list[Row]:
    atlas = (kept or work) / case.name
    if atlas.exists():
        import query

        built = {"cells": query.open(atlas).info()[case.dataset]["resolutions"]["7"]["cells"]}
        _log(f"measuring on {atlas} ({built['cells']:,} cells)")
    else:
        checkpoint = None
        if case.model.startswith("satclip"):
            from tests.data.satclip_checkpoint import make_checkpoint

            checkpoint = str(make_checkpoint(work / f"{case.name}.ckpt", legendre_polys=10))
        built, rss = _run(_BUILD, code=REPO, scratch=work, model=case.model, atlas=str(atlas), region=case.region,
                          checkpoint=checkpoint)
        _log(f"built {built['cells']:,} {case.label} cells at resolution 7 in {built['seconds']:.0f} s "
             f"(peak RSS {rss / 1e6:.0f} MB)")
    rows = []
    for n in (n // 10 for n in case.sizes) if quick else case.sizes:
        points = work / f"points-{n}.parquet"
        _write_points(points, n, seed=n, region=case.region)
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
            _log(f"{case.label}: {name} join of {n:,} points: {result['seconds']:.1f} s, "
                 f"{n / result['seconds']:,.0f} pt/s, peak RSS {rss / 1e6:,.0f} MB")
        outs = [work / f"out-{name}-{n}.parquet" for name in ("in-memory", "streamed")]
        if all(p.exists() for p in outs) and not _same_cells(*outs):
            raise RuntimeError(f"the streamed and in-memory joins of {n:,} points differ")
        for p in (points, *outs):
            p.unlink(missing_ok=True)
        label = f"{n / 1e6:g}M pts (id, lat, lon), res 7 region atlas ({case.label}, {built['cells']:,} cells)"
        stream, memory = measured["streamed"], measured["in-memory"]
        rows.append(Row("join", f"hexatlas join, streamed: {label}", stream[0], "pt/s", "in-memory join", memory[0]))
        rows.append(Row("join", f"peak RSS, streamed: {label}", stream[1], "MB", "in-memory join", memory[1],
                        target=f"< {RSS_TARGET_MB:,} MB"))
    return rows


def run(quick: bool = False) -> list[Row]:
    base = os.environ.get("HEXATLAS_BENCH_DIR")
    kept = Path(os.environ["HEXATLAS_BENCH_ATLAS"]) if os.environ.get("HEXATLAS_BENCH_ATLAS") else None
    work = Path(tempfile.mkdtemp(prefix="hexatlas-join-", dir=base))
    rows: list[Row] = []
    try:
        for case in CASES:
            rows += _case(case, work, kept, quick)
    finally:
        if not os.environ.get("HEXATLAS_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
    return rows
