"""The whole globe at one fine resolution (issue 25): ``python -m benchmarks --only planet``.

A cheap smooth encoder (:mod:`benchmarks.smooth_encoder`, 16-d, nearly free: what is left of a
build when the encoder costs nothing; the tests' 4-d toy is rank 2, so its index and recall
would say little) over every cell of resolution 8 (691,776,122 cells; ``$HEXATLAS_BENCH_RES``; 5 with ``--quick``),
and the same two resolutions coarser in the same run as the baseline: cells/s that fall from
one to the other show what grows with cells. Each step runs in a fresh process of this
checkout under ``/usr/bin/time -v`` (peak RSS), with an empty cache:

- the build: cells/s end to end and per stage (thread-summed, from its timings), peak RSS,
  files, bytes on disk per cell (data, index, land flags), manifest bytes, the index's type,
  lists, training and finishing time, land-flag time, fidelity read-back time;
- ``validate_dataset`` (every checksum);
- open + first lookup; a join of 1M uniform points, cold and warm;
- exact search for 200 random cells over every part (the truth; two passes over every part,
  ~20 minutes at resolution 8: ``$HEXATLAS_BENCH_PLANET_EXACT=0`` skips it and the recall),
  then the first ``similar`` of a fresh process and recall@10 of the 200 against the truth.

Disk: ~34 B a cell of data and ~12 of index (about 32 GB at resolution 8) under
``$HEXATLAS_BENCH_DIR`` (default: a temporary folder), deleted after unless
``$HEXATLAS_BENCH_KEEP`` is set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks._common import Row
from benchmarks.scale import _CALL, _FIRST_LOOKUP, _measured, _tree_bytes
from benchmarks.similar import _SEARCH, _TRUTH

REPO = Path(__file__).resolve().parents[1]
MODEL, MODEL_NAME = "benchmarks.smooth_encoder:load", "smooth16"
JOIN_POINTS = 1_000_000

_BUILD = """
import threading
from builder.build import build
peak = {"anon": 0, "file": 0}
def sample():  # peak RSS counts the pages of memory-mapped files read (page cache): split it
    while True:
        with open("/proc/self/status") as fh:
            rss = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in fh) if k in ("RssAnon", "RssFile")}
        peak["anon"], peak["file"] = max(peak["anon"], rss["RssAnon"]), max(peak["file"], rss["RssFile"])
        time.sleep(0.5)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
summary = build(P["model"], resolutions=str(P["res"]), output=P["atlas"], device="cpu", progress=False)
emit(cells=sum(summary.cells.values()), seconds=time.perf_counter() - start, stages=summary.seconds,
     anon_peak=peak["anon"], file_peak=peak["file"])
"""

_VALIDATE = """
import query  # what `hexatlas validate` loads (and how _run checks the code is this checkout's)
from catalog.manifest import validate_dataset
start = time.perf_counter()
problems = validate_dataset(P["dataset"])
emit(seconds=time.perf_counter() - start, problems=problems[:5])
"""


def _uniform_points(path: Path, n: int) -> None:
    rng = np.random.default_rng(8)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)
    pq.write_table(pa.table({"id": np.arange(n), "lat": lat, "lon": lon}), path)


def _measure(work: Path, res: int, points: Path, full: bool) -> dict:
    """Build the globe at ``res`` and (``full``) query it; the results by step."""
    atlas = work / f"globe-res{res}"
    out: dict = {}

    def step(name: str, snippet: str, cold: bool = True, **params: object) -> dict:
        out[name] = _measured(f"planet res {res}: {name}", snippet, atlas=atlas, code=REPO, scratch=work,
                              cold=cold, res=res, **params)
        return out[name]

    if "error" in step("build", _BUILD, cold=False, model=MODEL):
        return out
    dataset = atlas / MODEL_NAME
    manifest = json.loads((dataset / "manifest.json").read_text())
    info = manifest["resolutions"][str(res)]
    out["disk"] = {"files": len(manifest["files"]), "manifest": (dataset / "manifest.json").stat().st_size,
                   "index": _tree_bytes(dataset / "index"), "land": _tree_bytes(dataset / "land"),
                   "all": _tree_bytes(dataset), "index_info": {k: v for k, v in info["index"].items() if k != "recall"}}
    if full:
        step("validate", _VALIDATE, dataset=str(dataset))
        step("first lookup", _FIRST_LOOKUP)
        step("join", _CALL, points=str(points))
        truth = step("truth", _TRUTH, queries=200, exact=os.environ.get("HEXATLAS_BENCH_PLANET_EXACT", "1") != "0")
        if "error" not in truth:
            step("search", _SEARCH, cells=truth["cells"])
    if not os.environ.get("HEXATLAS_BENCH_KEEP"):
        shutil.rmtree(atlas, ignore_errors=True)
    return out


def _rows(fine: int, coarse: int, got: dict[int, dict], points: int) -> list[Row]:
    def value(res: int, *keys: str, scale: float = 1.0) -> float:
        node = got.get(res, {})
        for key in keys:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return float(node) * scale if isinstance(node, (int, float)) else math.nan

    def rate(res: int, seconds: float) -> float:
        return value(res, "build", "cells") / seconds if seconds else math.nan

    what = {r: f"smooth 16-d, globe res {r} ({value(r, 'build', 'cells'):,.0f} cells)" for r in (fine, coarse)}
    base = f"the same at res {coarse}"
    rows = [Row("planet: build end to end", what[fine], rate(fine, value(fine, "build", "seconds")), "cells/s",
                base, rate(coarse, value(coarse, "build", "seconds")), ">= 400,000 cells/s"),
            Row("planet: build peak RSS", what[fine], value(fine, "build", "rss", scale=1e-9), "GB",
                base, value(coarse, "build", "rss", scale=1e-9), "< 4 GB"),
            Row("planet: build peak anonymous memory (RssAnon, sampled)", what[fine],
                value(fine, "build", "anon_peak", scale=1e-9), "GB", base, value(coarse, "build", "anon_peak", scale=1e-9)),
            Row("planet: build peak file pages mapped (RssFile, sampled)", what[fine],
                value(fine, "build", "file_peak", scale=1e-9), "GB", base, value(coarse, "build", "file_peak", scale=1e-9))]
    stages = ("enumerate", "encode", "write", "index", "land", "map", "fidelity")  # the ones that grow with cells
    rows += [Row(f"planet: stage {s} (thread-summed)", what[fine], rate(fine, value(fine, "build", "stages", s)),
                 "cells/s", base, rate(coarse, value(coarse, "build", "stages", s))) for s in stages]
    for part in ("all", "index", "land"):
        rows.append(Row(f"planet: bytes on disk per cell ({part})", what[fine],
                        value(fine, "disk", part) / value(fine, "build", "cells"), "B",
                        base, value(coarse, "disk", part) / value(coarse, "build", "cells")))
    rows += [Row("planet: files / manifest bytes", what[fine], value(fine, "disk", "files"), "files",
                 f"manifest: {value(fine, 'disk', 'manifest'):,.0f} B", value(coarse, "disk", "files")),
             Row(f"planet: index {got.get(fine, {}).get('disk', {}).get('index_info', {}).get('type', '?')}: "
                 "train + merge + tune", what[fine], value(fine, "disk", "index_info", "build_s"), "s", base,
                 value(coarse, "disk", "index_info", "build_s")),
             Row("planet: validate (every checksum)", what[fine], value(fine, "validate", "seconds"), "s", "", math.nan),
             Row("planet: open + first lookup, fresh process", what[fine], value(fine, "first lookup", "seconds", scale=1e3),
                 "ms", f"peak RSS {value(fine, 'first lookup', 'rss', scale=1e-6):,.0f} MB (< 150 MB)", math.nan, "< 100 ms")]
    for when in ("cold", "warm"):
        rows.append(Row(f"planet: join {points:,} uniform points, {when}", what[fine],
                        value(fine, "join", when), "pts/s", "", math.nan))
    kth, found = got.get(fine, {}).get("truth", {}).get("kth"), got.get(fine, {}).get("search", {}).get("scores")
    recall = (sum(s >= k - 1e-6 for row, k in zip(found, kth, strict=True) for s in row) / (10 * len(kth))
              if kth and found else math.nan)
    rows += [Row("planet: first similar, fresh process", what[fine], value(fine, "search", "first", scale=1e3), "ms",
                 f"peak RSS of the search process {value(fine, 'search', 'rss', scale=1e-6):,.0f} MB (< 600 MB)",
                 math.nan, "< 1,000 ms"),
             Row("planet: recall@10, 200 random cells vs exact search", what[fine], recall, "", "", math.nan, ">= 0.95")]
    return rows


def run(quick: bool = False) -> list[Row]:
    fine = int(os.environ.get("HEXATLAS_BENCH_RES") or (5 if quick else 8))
    coarse = max(fine - 2, 0)
    base = Path(os.environ.get("HEXATLAS_BENCH_DIR") or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hexatlas-planet-", dir=base))
    try:
        points, n = work / "points.parquet", 50_000 if quick else JOIN_POINTS
        _uniform_points(points, n)
        got = {coarse: _measure(work, coarse, points, full=False), fine: _measure(work, fine, points, full=True)}
        (base / "planet-results.json").write_text(json.dumps({str(k): v for k, v in got.items()}, default=str))
        return _rows(fine, coarse, got, n)
    finally:
        if not os.environ.get("HEXATLAS_BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)
