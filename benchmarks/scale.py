"""Format 2 at scale: a land-only SatCLIP L=40 atlas at resolution 7 (about 29M cells), against format 1.

``python -m benchmarks --only scale`` (about an hour on 2 cores; ``--quick``: resolutions 4 and 3, fewer
points, a minute or two). Three float16 land-only atlases of SatCLIP L=40 (random weights) are built:
format 2 at resolution 7 and 6 by this checkout, and format 1 at resolution 6 by the format-1 code
(commit ``FORMAT1``, checked out in a temporary git worktree). Every build and every query measurement
runs in its own fresh Python process of that code, under ``/usr/bin/time -v`` for its peak RSS, with an
empty ``$HEXATLAS_CACHE``; "cold" is the first call in that process after the atlas files were dropped
from the page cache, "warm" the same call repeated in the same process. Measured, against format 1 at
resolution 6 in the same run unless said otherwise:

- build cells/s and build peak RSS;
- bytes on disk per cell, data and FAISS index apart, against the raw float16 embedding (dim * 2 B);
- a fresh process's first lookup of one point (``query.open`` + ``lookup``, cold): wall time, peak RSS;
- joins of points clustered in France and of random land points: cold and warm points/s, peak RSS
  beyond the result table;
- format 2 at resolution 7: the SQL function ``hexatlas_embedding`` and the ``embeddings`` view join on
  random land points, against ``atlas.join`` of the same points;
- bytes read (``/proc/self/io`` ``read_bytes`` and ``rchar``) per point of a cold 1,000-point lookup.

The atlases go under ``$HEXATLAS_BENCH_DIR`` (default: a new directory under /tmp) and are deleted at
the end unless ``$HEXATLAS_BENCH_KEEP`` is set. ``$HEXATLAS_BENCH_RESUME=<that directory>`` measures
again on the atlases (and results, ``results.json``) an earlier kept run left there: builds that
finished are not redone, unless named in ``$HEXATLAS_BENCH_REDO`` (``build:f2-hi,build:f1-lo``...);
every query measurement is. A measurement that fails (a process killed for memory,
say) becomes a row marked failed, and the suite goes on.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from benchmarks._common import Row

FORMAT1 = "018798a"  # the last commit of format 1
MODEL = "satclip-vit16-l40"
REPO = Path(__file__).resolve().parents[1]
FRANCE = ((43.0, 50.0), (-5.0, 8.0))  # lat, lon bounds of the clustered points
POINTS = {"clustered": 10_000, "random": 1_000_000, "sql": 100_000, "io": 1_000}
QUICK_POINTS = {"clustered": 2_000, "random": 50_000, "sql": 10_000, "io": 1_000}

# Prepended to every snippet: its parameters (P), /proc/self/io, and emit() to hand back the result
# together with where its builder/query packages came from.
_PRELUDE = """
import json, sys, time
P = json.loads(sys.argv[1])
def io():
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}
def emit(**result):
    code = {m: sys.modules[m].__file__ for m in ("builder", "query") if m in sys.modules}
    print("@@result " + json.dumps({**result, "code": code}), flush=True)
"""

_BUILD = """
from builder.build import build
start = time.perf_counter()
summary = build(P["model"], resolutions=str(P["res"]), output=P["atlas"], checkpoint=P["checkpoint"],
                land_only=True, device="cpu", precision="float16", progress=False, **P["extra"])
emit(cells=sum(summary.cells.values()), seconds=time.perf_counter() - start)
"""

_FIRST_LOOKUP = """
start = time.perf_counter()
import query
opened = time.perf_counter()
query.open(P["atlas"]).lookup([48.85], [2.35], res=P["res"])
emit(seconds=time.perf_counter() - opened, import_s=opened - start)
"""

_BYTES_READ = """
import query, pyarrow.parquet as pq
points = pq.read_table(P["points"])
before = io()
query.open(P["atlas"]).lookup(points["lat"].to_numpy(), points["lon"].to_numpy(), res=P["res"])
after = io()
emit(**{k: (after[k] - before[k]) / len(points) for k in ("read_bytes", "rchar")})
"""

_POINTS = """
import pyarrow.parquet as pq
from benchmarks.scale import FRANCE, _land_points
for seed, (kind, path) in enumerate(P["points"].items()):
    pq.write_table(_land_points(P["counts"][kind], seed, FRANCE if kind == "clustered" else None), path)
emit()
"""

# One call twice (cold, then warm): atlas.join of the points, or P["sql"] with the points as table pts.
_CALL = """
import query, pyarrow.parquet as pq
atlas, points = query.open(P["atlas"]), pq.read_table(P["points"])
if P.get("sql"):
    con = atlas.connect()
    con.register("pts", points)
    call = lambda: con.sql(P["sql"]).to_arrow_table()
else:
    call = lambda: atlas.join(points, res=P["res"])
rates = []
for _ in range(2):
    start = time.perf_counter()
    result_bytes = call().nbytes  # the result is freed before the next call
    rates.append(len(points) / (time.perf_counter() - start))
emit(cold=rates[0], warm=rates[1], result_bytes=result_bytes)
"""


def _log(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _drop_page_cache(root: Path) -> None:
    """Evict every file under ``root`` from the page cache (so that the next read goes to disk)."""
    subprocess.run(["sync"], check=False)
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _run(snippet: str, *, code: Path, scratch: Path, **params: object) -> tuple[dict, int]:
    """Run a snippet in a fresh Python of the checkout ``code`` under ``/usr/bin/time -v``, with an empty
    ``$HEXATLAS_CACHE``: (what it emitted, peak RSS in bytes). Raises RuntimeError when it fails."""
    cache = Path(tempfile.mkdtemp(prefix="cache-", dir=scratch))
    env = {**os.environ, "PYTHONPATH": str(code), "HEXATLAS_CACHE": str(cache)}
    try:
        command = [sys.executable, "-c", _PRELUDE + textwrap.dedent(snippet), json.dumps(params)]
        proc = subprocess.run(["/usr/bin/time", "-v", *command], cwd=code, env=env, capture_output=True,
                              text=True, check=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    own_stderr, _, report = proc.stderr.rpartition("\tCommand being timed:")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", report)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@result ")]
    if proc.returncode or not lines or not rss:
        killed = re.search(r"Command terminated by signal \d+", own_stderr)
        own = [line.strip() for line in own_stderr.splitlines()
               if line.strip() and not line.startswith("Command ")]  # time's own status line
        last = killed.group(0) if killed else (own or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {last}")
    result = json.loads(lines[-1][len("@@result "):])
    imported = list(result.pop("code").values())
    if not imported or any(not Path(f).resolve().is_relative_to(code.resolve()) for f in imported):
        raise RuntimeError(f"builder/query imported from {imported}, not from {code}")
    return result, int(rss.group(1)) * 1024


def _measured(label: str, snippet: str, *, atlas: Path, code: Path, scratch: Path, cold: bool = True,
              **params: object) -> dict:
    """:func:`_run` as one step of a benchmark: logged before and after, ``atlas`` dropped from
    the page cache first (``cold``), peak RSS added as ``rss``; a failure is the result's
    ``error``, so that the other steps still run."""
    _log(f"{label} ...")
    if cold:
        _drop_page_cache(atlas)
    try:
        result, rss = _run(snippet, code=code, scratch=scratch, atlas=str(atlas), **params)
        result["rss"] = rss
    except (RuntimeError, OSError) as exc:
        result = {"error": str(exc)}
    _log(f"{label}: " + ", ".join(f"{k} {v:,.4g}" if isinstance(v, (int, float)) else f"{k} {v}"
                                  for k, v in result.items() if isinstance(v, (int, float, str))))
    return result


def _land_points(n: int, seed: int, box: tuple[tuple[float, float], ...] | None = None) -> pa.Table:
    """``n`` points on land (so in a land-only atlas at every resolution), uniform on the sphere or in a
    ((lat0, lat1), (lon0, lon1)) box."""
    from builder.landmask import is_land_point

    rng = np.random.default_rng(seed)
    lat, lon = np.empty(0), np.empty(0)
    while len(lat) < n:
        m = 4 * n + 1000
        if box is None:
            la, lo = np.degrees(np.arcsin(rng.uniform(-1, 1, m))), rng.uniform(-180, 180, m)
        else:
            la, lo = rng.uniform(*box[0], m), rng.uniform(*box[1], m)
        keep = is_land_point(lat=la, lon=lo)
        lat, lon = np.concatenate([lat, la[keep]]), np.concatenate([lon, lo[keep]])
    return pa.table({"id": np.arange(n), "lat": lat[:n], "lon": lon[:n]})


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@dataclass(frozen=True)
class _Atlas:
    format: int
    res: int
    path: Path
    code: Path  # the checkout whose builder and query build and read it

    @property
    def label(self) -> str:
        return f"format {self.format}, res {self.res}"


class _Scale:
    """The measurements (``measure``, results kept by (name, atlas key)) and the rows made of them."""

    def __init__(self, work: Path, format1_code: Path, hi: int, lo: int, counts: dict[str, int]) -> None:
        self.work, self.counts = work, counts
        self.atlases = {"f2-hi": _Atlas(2, hi, work / f"format2-res{hi}", REPO),
                        "f2-lo": _Atlas(2, lo, work / f"format2-res{lo}", REPO),
                        "f1-lo": _Atlas(1, lo, work / f"format1-res{lo}", format1_code)}
        self.saved = work / "results.json"
        self.results: dict[tuple[str, str], dict] = {}
        if self.saved.is_file():
            self.results = {tuple(k.split("|")): v for k, v in json.loads(self.saved.read_text()).items()}
        self.points = {kind: work / f"points-{kind}.parquet" for kind in counts}

    def measure(self, name: str, key: str, snippet: str, *, cold: bool = True, **params: object) -> None:
        atlas = self.atlases[key]
        self.results[name, key] = _measured(f"{name}, {atlas.label}", snippet, atlas=atlas.path, code=atlas.code,
                                            scratch=self.work, cold=cold, res=atlas.res, **params)
        self.saved.write_text(json.dumps({f"{n}|{k}": v for (n, k), v in self.results.items()}, indent=1))

    def run_all(self) -> list[Row]:
        from tests.data.satclip_checkpoint import make_checkpoint

        checkpoint = str(make_checkpoint(self.work / "satclip-l40.ckpt", legendre_polys=40))
        redo = set(filter(None, os.environ.get("HEXATLAS_BENCH_REDO", "").split(",")))
        for key, atlas in self.atlases.items():
            built = self.results.get(("build", key), {"error": "not run"})
            if "error" in built or f"build:{key}" in redo or not (atlas.path / MODEL / "manifest.json").is_file():
                shutil.rmtree(atlas.path, ignore_errors=True)
                extra = {"formats": "parquet"} if atlas.format == 2 else {}
                self.measure("build", key, _BUILD, cold=False, model=MODEL, checkpoint=checkpoint, extra=extra)
            self._disk(key)
        if not all(p.is_file() for p in self.points.values()):
            _log("drawing land points ...")  # in a process of its own: the land mask takes 1 GB
            _run(_POINTS, code=REPO, scratch=self.work, points={k: str(p) for k, p in self.points.items()},
                 counts=self.counts)
        for key in self.atlases:
            self.measure("first lookup", key, _FIRST_LOOKUP)
            self.measure("bytes read", key, _BYTES_READ, points=str(self.points["io"]))
            for kind in ("clustered", "random"):
                self.measure(f"join {kind}", key, _CALL, points=str(self.points[kind]))
        hi = self.atlases["f2-hi"].res
        sql = {"sql function": f"SELECT hexatlas_embedding(p.lat, p.lon, {hi}) AS embedding FROM pts p",
               "sql view": "SELECT count(*) FROM pts p JOIN embeddings e "
                           f"ON e.cell = h3_latlng_to_cell(p.lat, p.lon, {hi}) AND e.res = {hi}",
               "sql baseline": None}
        for name, text in sql.items():
            self.measure(name, "f2-hi", _CALL, points=str(self.points["sql"]), sql=text)
        return self.rows()

    def _disk(self, key: str) -> None:
        """Bytes per cell on disk: the FAISS index, and everything else (the data)."""
        result = self.results["build", key]
        dataset = self.atlases[key].path / MODEL
        if "error" in result:
            self.results["disk", key] = result
            return
        manifest = json.loads((dataset / "manifest.json").read_text())
        index = _tree_bytes(dataset / "index")
        cells = result["cells"]
        self.results["disk", key] = {"data": (_tree_bytes(dataset) - index) / cells, "index": index / cells,
                                     "raw": manifest["provenance"]["dim"] * 2}

    # ------------------------------------------------------------------ rows
    def value(self, name: str, key: str, metric: Callable[[dict], float]) -> float:
        result = self.results.get((name, key), {"error": "not run"})
        return math.nan if "error" in result else float(metric(result))

    def label(self, name: str, key: str) -> str:
        cells = self.results.get(("build", key), {}).get("cells")
        error = self.results.get((name, key), {"error": "not run"}).get("error")
        return (self.atlases[key].label + (f" ({cells:,} cells)" if cells else "")
                + (f" -- FAILED: {error[:100]}".replace("|", "/") if error else ""))

    def vs_format1(self, group: str, name: str, metric: Callable[[dict], float], unit: str,
                   target: str = "") -> list[Row]:
        """Format 2 at both resolutions against format 1 at the low one; the target is the high one's."""
        base, base_name = self.value(name, "f1-lo", metric), self.label(name, "f1-lo")
        return [Row(group, self.label(name, key), self.value(name, key, metric), unit, base_name, base,
                    target if key == "f2-hi" else "") for key in ("f2-hi", "f2-lo")]

    def rows(self) -> list[Row]:
        gb, n = 1e9, self.counts
        rows = self.vs_format1("build", "build", lambda r: r["cells"] / r["seconds"], "cells/s")
        rows += self.vs_format1("build peak RSS", "build", lambda r: r["rss"] / gb, "GB", "< 6 GB")
        raw = next((r["raw"] for (name, _), r in self.results.items() if "raw" in r), math.nan)
        for part, target in (("data", "<= 1.25x raw"), ("index", "reported apart")):
            rows += [Row(f"bytes on disk per cell: {part}", self.label("disk", key),
                         self.value("disk", key, lambda r, part=part: r[part]), "B", "raw float16 embedding", raw,
                         target if self.atlases[key].format == 2 else "") for key in self.atlases]
        first = "first lookup"
        rows += self.vs_format1(f"{first}, 1 point, fresh process, cold (query.open + lookup)", first,
                                lambda r: r["seconds"] * 1e3, "ms", "< 1,000 ms")
        rows += self.vs_format1(f"{first} peak RSS", first, lambda r: r["rss"] / 1e6, "MB", "< 500 MB")
        for kind, what in (("clustered", "points clustered in France"), ("random", "random land points")):
            name, big = f"join {kind}", kind == "random"
            for when in ("cold", "warm"):
                rows += self.vs_format1(f"join {n[kind]:,} {what}, {when}", name, lambda r, when=when: r[when], "pts/s",
                                        ">= 300,000 pts/s" if big and when == "warm" else "")
            rows += self.vs_format1(f"join {n[kind]:,} {what}: peak RSS beyond the result table", name,
                                    lambda r: (r["rss"] - r["result_bytes"]) / gb, "GB",
                                    "< 2 GB" if big else "")
        join = self.value("sql baseline", "f2-hi", lambda r: r["warm"])
        for name, target in (("sql function", ">= 300,000 pts/s"), ("sql view", "")):
            cold = self.value(name, "f2-hi", lambda r: r["cold"])
            warm = self.value(name, "f2-hi", lambda r: r["warm"])
            rows.append(Row(f"{name} on {n['sql']:,} random land points, warm (cold {cold:,.0f} pts/s)",
                            self.label(name, "f2-hi"), warm, "pts/s", "atlas.join of the same points, warm",
                            join, target))
        for counter in ("read_bytes", "rchar"):
            rows += self.vs_format1(f"bytes read per point ({counter}), cold {n['io']:,}-point lookup",
                                    "bytes read", lambda r, counter=counter: r[counter], "B")
        return rows


def run(quick: bool = False) -> list[Row]:
    base = Path(os.environ.get("HEXATLAS_BENCH_DIR") or "/tmp")
    base.mkdir(parents=True, exist_ok=True)
    resume = os.environ.get("HEXATLAS_BENCH_RESUME")
    work = Path(resume) if resume else Path(tempfile.mkdtemp(prefix="hexatlas-scale-", dir=base))
    format1_code = work / "format1-code"
    _log(f"atlases in {work}; format-1 code ({FORMAT1}) in a worktree at {format1_code}")
    try:
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False, capture_output=True)
        if not (format1_code / "query").is_dir():
            subprocess.run(["git", "worktree", "add", "--detach", str(format1_code), FORMAT1], cwd=REPO,
                           check=True, capture_output=True)
        hi, lo = (4, 3) if quick else (7, 6)
        return _Scale(work, format1_code, hi, lo, QUICK_POINTS if quick else POINTS).run_all()
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(format1_code)], cwd=REPO, check=False,
                       capture_output=True)
        if os.environ.get("HEXATLAS_BENCH_KEEP"):
            _log(f"kept {work} (HEXATLAS_BENCH_KEEP is set)")
        else:
            shutil.rmtree(work, ignore_errors=True)
