"""Similar-place search at scale: the shard-built, memory-mapped IVF-PQ index against exact
brute-force search and the IVF-SQ8 index loaded whole (the design before it), in the same run.

``python -m benchmarks --only similar`` (the scale group: about 45 minutes on 2 cores and ~25 GB of
disk; ``--quick``: resolutions 4 and 3, a few minutes). Two float16 SatCLIP L=40 atlases (random
weights) are built: land-only at resolution 7 (28.4M cells) and global at resolution 6 (14.1M). Each
build and each measurement runs in a fresh Python process under ``/usr/bin/time -v`` (peak RSS);
"cold" means the atlas's files were dropped from the page cache first. 200 query cells are drawn
at random (on land for the land-only atlas), with a seed of their own (the builder measures its
recall on 200 others). Measured per atlas:

- build: cells/s, the index's share of the build (training, adding the shards, merging, tuning);
- index bytes per cell and against the raw float16 embeddings;
- recall@10 of ``atlas.similar(cell=...)`` against exact search over every cell of the resolution
  (a result is a hit when its exact score reaches the true 10th best);
- a fresh process's first search (cold): wall time, peak RSS, and its anonymous memory (what is
  not pages of the atlas's files);
- warm searches: p50 and p99 of 400 (two passes over the 200);
- baselines: exact brute force (one query's full pass over the part files), and IVF-SQ8 with the
  same number of lists, built in memory and searched as before (candidates re-ranked exactly,
  no walk along the grid), tuned on the same ladder of nprobe and re-rank depth: its recall,
  warm p50, bytes, and a fresh process's first search (``faiss.read_index`` of the whole file).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from benchmarks._common import Row
from benchmarks.scale import MODEL, REPO, _drop_page_cache, _log, _measured

QUERIES = 200

_BUILD = """
from catalog import vector_index
if P["exact_max_values"]:
    vector_index.EXACT_MAX_VALUES = P["exact_max_values"]
from builder.build import build
start = time.perf_counter()
summary = build(P["model"], resolutions=str(P["res"]), output=P["atlas"], checkpoint=P["checkpoint"],
                land_only=P["land_only"], device="cpu", precision="float16", progress=False)
emit(cells=sum(summary.cells.values()), seconds=time.perf_counter() - start,
     index_seconds=summary.seconds.get("index", 0.0))
"""

# The query cells, and exact search over every stored cell: the truth, and one query's full pass.
_TRUTH = """
import glob
import numpy as np, pyarrow.parquet as pq
from catalog.cells import latlng_to_cells
from catalog.tables import embedding_matrix
from catalog.vector_index import normalize
import query
atlas = query.open(P["atlas"])
data = atlas._data(None, P["res"])
rng = np.random.default_rng(2026)
cells = np.empty(0, np.uint64)
while len(cells) < P["queries"]:
    z, lon = rng.uniform(-1, 1, 4000), rng.uniform(-180, 180, 4000)
    c = latlng_to_cells(np.degrees(np.arcsin(z)), lon, P["res"])
    c = c[~np.isnan(data.vectors(c)[:, 0])]
    cells = np.unique(np.concatenate([cells, c]))
cells = rng.permutation(cells)[:P["queries"]]
queries = normalize(data.vectors(cells))

def exact(q):
    best = np.full((len(q), 10), -np.inf, np.float32)
    ids = np.zeros((len(q), 10), np.int64)
    for f in sorted(glob.glob(P["atlas"] + f"/*/data/res={P['res']}/part-*.parquet")):
        table = pq.read_table(f)
        all_cells = table.column("cell").to_numpy().astype(np.int64)
        values = embedding_matrix(table.column("embedding"))
        for a in range(0, len(all_cells), 65536):
            scores = q @ normalize(values[a:a + 65536]).T
            rows = np.flatnonzero((scores > best[:, 9:]).any(axis=1))  # only queries this chunk improves
            if not rows.size:
                continue
            scores = scores[rows]
            top = np.argpartition(-scores, 10, axis=1)[:, :10] if scores.shape[1] > 10 else \\
                np.tile(np.arange(scores.shape[1]), (len(rows), 1))
            cand = np.concatenate([best[rows], np.take_along_axis(scores, top, 1)], 1)
            cand_ids = np.concatenate([ids[rows], all_cells[a:a + 65536][top]], 1)
            order = np.argsort(-cand, axis=1)[:, :10]
            best[rows], ids[rows] = np.take_along_axis(cand, order, 1), np.take_along_axis(cand_ids, order, 1)
    return best, ids

if P.get("exact", True):
    start = time.perf_counter()
    exact(queries[:1])
    single = time.perf_counter() - start
    start = time.perf_counter()
    best, ids = exact(queries)
    emit(cells=cells.tolist(), kth=best[:, 9].tolist(), single_s=single, all_s=time.perf_counter() - start)
else:  # the queries alone: their exact answers cost two passes over every part
    emit(cells=cells.tolist())
"""

_STATUS = """
def status():
    with open("/proc/self/status") as fh:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in fh) if k in ("RssAnon", "RssFile")}
"""

_SEARCH = _STATUS + """
import numpy as np
start = time.perf_counter()
import query
atlas = query.open(P["atlas"])
atlas.similar(cell=P["cells"][0], k=10, res=P["res"])
first = time.perf_counter() - start
first_status = status()
scores, times = [], []
for rnd in range(3):
    for c in P["cells"]:
        t = time.perf_counter()
        r = atlas.similar(cell=c, k=10, res=P["res"])
        times.append(time.perf_counter() - t)
        if rnd == 0:
            scores.append(r.column("score").to_numpy().tolist())
warm = np.array(times[len(P["cells"]):])
# the index and the exact re-ranking alone, as the IVF-SQ8 baseline is timed
import faiss
from catalog.vector_index import normalize, reranked_search
data = atlas._data(None, P["res"])
index, info = atlas._index(None, P["res"])
queries = normalize(data.vectors(np.array(P["cells"], np.uint64)))
faiss.omp_set_num_threads(1)

def vectors_of(ids):
    v = data.vectors(ids.astype(np.uint64))
    held = ~np.isnan(v[:, 0])
    return ids[held], normalize(v[held])

core = []
for rnd in range(2):
    for i in range(len(queries)):
        t = time.perf_counter()
        reranked_search(index, queries[i:i + 1], 10, vectors_of, rerank=info["rerank"], expand=info.get("expand", False))
        core.append(time.perf_counter() - t)
emit(first=first, first_anon=first_status["RssAnon"], first_file=first_status["RssFile"], scores=scores,
     p50=float(np.percentile(warm, 50)), p99=float(np.percentile(warm, 99)), end=status(),
     core_p50=float(np.percentile(core, 50)), core_p99=float(np.percentile(core, 99)))
"""

# The design before: IVF-SQ8, every code in memory; tuned as the builder tunes; then searched.
_SQ8 = _STATUS + """
import glob, os
import numpy as np, pyarrow.parquet as pq, faiss
from builder import index as bindex
from catalog.tables import embedding_matrix
from catalog.vector_index import ivf_lists, normalize, reranked_search
import query
atlas = query.open(P["atlas"])
data = atlas._data(None, P["res"])
files = sorted(glob.glob(P["atlas"] + f"/*/data/res={P['res']}/part-*.parquet"))
start = time.perf_counter()
n = data.cells_count
nlist = ivf_lists(n)
rng = np.random.default_rng(1)
train = []
for f in files:
    table = pq.read_table(f)
    rows = np.sort(rng.choice(table.num_rows, max(1, 40 * nlist * table.num_rows // n), replace=False))
    train.append(normalize(embedding_matrix(table.column("embedding"))[rows]))
dim = train[0].shape[1]
index = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
index.train(np.concatenate(train))
del train
for f in files:
    table = pq.read_table(f)
    cells = table.column("cell").to_numpy().astype(np.int64)
    values = embedding_matrix(table.column("embedding"))
    for a in range(0, len(cells), 65536):
        index.add_with_ids(normalize(values[a:a + 65536]), cells[a:a + 65536])
build_s = time.perf_counter() - start
queries = normalize(data.vectors(np.array(P["cells"], np.uint64)))
kth = np.array(P["kth"], np.float32)

def vectors_of(ids):
    return ids, normalize(data.vectors(ids.astype(np.uint64)))

from builder.probes import Probes
probes = Probes(queries, np.full(len(queries), "uniform"), np.array(P["cells"], np.uint64), np.zeros(len(queries)))
# tune reads the k-th best score from the end of each query's row of exact scores
tuned, by_kind = bindex.tune(lambda: index, probes, np.repeat(kth[:, None], 10, axis=1), vectors_of, expand=False)
recall = by_kind["uniform"]["at_10"]  # as it was searched
faiss.extract_index_ivf(index).nprobe = tuned["nprobe"]
faiss.omp_set_num_threads(1)
exact = vectors_of

times = []
for rnd in range(3):
    for i in range(len(queries)):
        t = time.perf_counter()
        reranked_search(index, queries[i:i + 1], 10, exact, rerank=tuned["rerank"])
        times.append(time.perf_counter() - t)
warm = np.array(times[len(queries):])
faiss.write_index(index, P["out"])
emit(build_s=build_s, nprobe=tuned["nprobe"], rerank=tuned["rerank"], recall=recall, bytes=os.path.getsize(P["out"]),
     p50=float(np.percentile(warm, 50)), p99=float(np.percentile(warm, 99)), end=status())
"""

# A fresh process's first IVF-SQ8 search, as the query layer did it: the whole index read first.
_SQ8_FIRST = """
start = time.perf_counter()
import numpy as np, faiss
import query
from catalog.vector_index import normalize, reranked_search
atlas = query.open(P["atlas"])
data = atlas._data(None, P["res"])
index = faiss.read_index(P["out"])
faiss.extract_index_ivf(index).nprobe = P["nprobe"]
q = normalize(data.vectors(np.array(P["cells"][:1], np.uint64)))
reranked_search(index, q, 10, lambda ids: (ids, normalize(data.vectors(ids.astype(np.uint64)))), rerank=P["rerank"])
emit(first=time.perf_counter() - start)
"""


class _Similar:
    def __init__(self, work: Path, atlases: dict[str, tuple[int, bool]], exact_max_values: int | None) -> None:
        self.work, self.exact_max_values = work, exact_max_values
        self.atlases = atlases  # key -> (res, land_only)
        self.saved = work / "similar-results.json"
        self.results: dict[str, dict] = json.loads(self.saved.read_text()) if self.saved.is_file() else {}

    def path(self, key: str) -> Path:
        return self.work / f"similar-{key}"

    def measure(self, name: str, key: str, snippet: str, *, cold: bool = True, **params: object) -> dict:
        res, _ = self.atlases[key]
        result = _measured(f"{name}, {key}", snippet, atlas=self.path(key), code=REPO, scratch=self.work,
                           cold=cold, res=res, **params)
        self.results[f"{name}|{key}"] = result
        self.saved.write_text(json.dumps(self.results))
        return result

    def run_all(self) -> list[Row]:
        from tests.data.satclip_checkpoint import make_checkpoint

        checkpoint = str(make_checkpoint(self.work / "satclip-l40.ckpt", legendre_polys=40))
        for key, (res, land_only) in self.atlases.items():
            if "error" in self.results.get(f"build|{key}", {"error": ""}):
                shutil.rmtree(self.path(key), ignore_errors=True)
                self.measure("build", key, _BUILD, cold=False, model=MODEL, checkpoint=checkpoint,
                             land_only=land_only, exact_max_values=self.exact_max_values)
            truth = self.measure("truth", key, _TRUTH, queries=QUERIES)
            if "error" in truth:
                continue
            self.measure("search", key, _SEARCH, cells=truth["cells"])
            out = str(self.work / f"sq8-{key}.faiss")
            sq8 = self.measure("sq8", key, _SQ8, cold=False, cells=truth["cells"], kth=truth["kth"], out=out)
            if "error" not in sq8:
                _drop_page_cache(Path(out))  # cold, as the atlas's own files are
                self.measure("sq8 first search", key, _SQ8_FIRST, cells=truth["cells"], out=out,
                             nprobe=sq8["nprobe"], rerank=sq8["rerank"])
            Path(out).unlink(missing_ok=True)
        return self.rows()

    def get(self, name: str, key: str, metric) -> float:
        result = self.results.get(f"{name}|{key}", {"error": "not run"})
        try:
            return math.nan if "error" in result else float(metric(result))
        except (KeyError, TypeError, ZeroDivisionError):
            return math.nan

    def rows(self) -> list[Row]:
        rows = []
        for key, (res, land_only) in self.atlases.items():
            manifest = self._manifest(key)
            index = manifest["resolutions"][str(res)]["index"] if manifest else {}
            cells = index.get("cells", math.nan)
            raw = 2 * manifest["provenance"]["dim"] if manifest else math.nan
            what = f"res {res} {'land' if land_only else 'global'}, {cells:,} cells, {index.get('type', '?')}"
            kth = self.results.get(f"truth|{key}", {}).get("kth")
            found = self.results.get(f"search|{key}", {}).get("scores")
            recall = math.nan
            if kth and found:
                hits = [s >= k - 1e-6 for row, k in zip(found, kth, strict=True) for s in row]
                recall = sum(hits) / (10 * len(kth))
            sq8_bytes = self.get("sq8", key, lambda r, cells=cells: r["bytes"] / cells)
            rows += [
                Row("similar: index bytes per cell", what, index.get("bytes_per_cell", math.nan), "B",
                    "IVF-SQ8 (the index before)", sq8_bytes, f"<= 10% of raw ({raw * 0.1:.0f} B)"),
                Row("similar: index build (train, add, merge, tune)", what,
                    self.get("build", key, lambda r: r["index_seconds"]), "s",
                    "IVF-SQ8 built in memory", self.get("sq8", key, lambda r: r["build_s"])),
                Row(f"similar: recall@10, 200 fresh queries vs exact search (the build measured "
                    f"{index.get('recall_at_10', math.nan)} on its 200 held-out cells)", what, recall, "",
                    "IVF-SQ8, tuned alike", self.get("sq8", key, lambda r: r["recall"]), ">= 0.95"),
                Row("similar: warm p50, k=10", what, self.get("search", key, lambda r: r["p50"] * 1e3), "ms",
                    "exact brute force, one query", self.get("truth", key, lambda r: r["single_s"] * 1e3), "<= 20 ms"),
                Row("similar: warm p99, k=10", what, self.get("search", key, lambda r: r["p99"] * 1e3), "ms",
                    "exact brute force, one query", self.get("truth", key, lambda r: r["single_s"] * 1e3)),
                Row("similar: index search + exact re-rank alone, warm p50", what,
                    self.get("search", key, lambda r: r["core_p50"] * 1e3), "ms",
                    "IVF-SQ8, the same, warm p50", self.get("sq8", key, lambda r: r["p50"] * 1e3)),
                Row("similar: index search + exact re-rank alone, warm p99", what,
                    self.get("search", key, lambda r: r["core_p99"] * 1e3), "ms",
                    "IVF-SQ8, the same, warm p99", self.get("sq8", key, lambda r: r["p99"] * 1e3)),
                Row("similar: first search, fresh process, cold", what,
                    self.get("search", key, lambda r: r["first"] * 1e3), "ms",
                    "IVF-SQ8 read whole, cold", self.get("sq8 first search", key, lambda r: r["first"] * 1e3), "< 2,000 ms"),
                Row("similar: search process peak RSS (first search + 600 warm)", what,
                    self.get("search", key, lambda r: r["rss"] / 1e6), "MB",
                    "IVF-SQ8 search process", self.get("sq8 first search", key, lambda r: r["rss"] / 1e6)),
                Row("similar: search process memory beyond file pages (RssAnon, end)", what,
                    self.get("search", key, lambda r: r["end"]["RssAnon"] / 1e6), "MB",
                    "its file pages (RssFile, end)", self.get("search", key, lambda r: r["end"]["RssFile"] / 1e6),
                    "< 1,000 MB"),
            ]
        return rows

    def _manifest(self, key: str) -> dict | None:
        found = list(self.path(key).glob("*/manifest.json"))
        return json.loads(found[0].read_text()) if found else None


def run(quick: bool = False) -> list[Row]:
    base = Path(os.environ.get("HEXATLAS_BENCH_DIR") or "/tmp")
    base.mkdir(parents=True, exist_ok=True)
    resume = os.environ.get("HEXATLAS_BENCH_RESUME")
    work = Path(resume) if resume else Path(tempfile.mkdtemp(prefix="hexatlas-similar-", dir=base))
    _log(f"atlases in {work}")
    atlases = {"land-hi": (4, True), "global-lo": (3, False)} if quick else {"land-hi": (7, True), "global-lo": (6, False)}
    try:
        return _Similar(work, atlases, 10_000 * 256 if quick else None).run_all()  # quick: IVF from 10,000 cells
    finally:
        if os.environ.get("HEXATLAS_BENCH_KEEP"):
            _log(f"kept {work} (HEXATLAS_BENCH_KEEP is set)")
        else:
            shutil.rmtree(work, ignore_errors=True)
