"""Similar-place recall by kind of query (issue 24): ``--only similar_kinds`` (also run by ``--only similar``).

Atlases: ``$HEXATLAS_BENCH_ATLASES`` (``dir:res,dir:res``: atlases already built), else built
under ``$HEXATLAS_BENCH_DIR``: random SatCLIP L=40 land at resolution 7 (28.4M cells) and
GeoCLIP land at resolution 6 (4.1M cells; ~25 minutes of encoding on 2 cores); ``--quick``:
resolutions 5 and 4. Per atlas, :data:`PER_KIND` queries of each kind (the kinds of
:mod:`builder.probes`, plus a large ``bbox`` searched through the index), their exact top 100
by brute force over every part (with the filters' masks), then for every query:

- ``atlas.similar`` (k=10 and k=100): tie-aware recall (a result is found when its score is
  within :data:`builder.probes.EPSILON` of the true k-th), its Wilson lower bound, and the
  warm latency of the k=10 search (p50, p99);
- the same search without its seeds (the index's candidates and one walk from the best of
  them, no region seeds, no own cell, no sample: the search before this issue): recall@10 and p50;
- exact brute force of one query over every part (what the index saves).
"""

from __future__ import annotations

import glob
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks._common import Row

PER_KIND = 100


def _kinds(atlas_dir: Path, atlas, res: int, per_kind: int, seed: int) -> list[tuple[str, dict]]:
    """(kind, the keyword arguments of ``similar``) for every query."""
    import h3.api.numpy_int as h3i
    import pyarrow.parquet as pq

    from catalog.cells import latlng_to_cells
    from catalog.interpolation import haversine_km
    from catalog.vector_index import normalize

    rng = np.random.default_rng(seed)
    data = atlas._data(None, res)

    def held(cells):
        return ~np.isnan(data.vectors(cells)[:, 0])

    def uniform(n):
        out = []
        while len(out) < n:
            lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, 8 * n))), rng.uniform(-180, 180, 8 * n)
            c = latlng_to_cells(lat, lon, res)
            ok = held(c)
            out += list(zip(lat[ok].tolist(), lon[ok].tolist(), c[ok].tolist()))
        return out[:n]

    def vec(cell):
        return normalize(data.vectors(np.array([cell], np.uint64)))[0]

    queries = [("uniform", {"lat": lat, "lon": lon}) for lat, lon, _ in uniform(per_kind)]
    files = [pq.ParquetFile(p) for p in sorted(glob.glob(f"{atlas_dir}/*/data/res={res}/part-*.parquet"))]
    for i in rng.integers(len(files), size=per_kind):
        f = files[i]
        group = int(rng.integers(f.metadata.num_row_groups))
        cells = f.read_row_group(group, columns=["cell"]).column("cell").to_numpy()
        queries.append(("per_part", {"cell": int(cells[rng.integers(len(cells))])}))
    edge: list[int] = []
    while len(edge) < per_kind:
        edge += [c for _, _, c in uniform(500) if not held(h3i.grid_disk(c, 1).astype(np.uint64)).all()]
    queries += [("edge", {"cell": c}) for c in edge[:per_kind]]
    pairs = uniform(4 * per_kind)
    far = [(a, b) for a, b in zip(pairs[::2], pairs[1::2], strict=True) if haversine_km(a[0], a[1], b[0], b[1]) > 2000]
    queries += [("mean_of_two", {"vector": normalize((vec(a[2]) + vec(b[2]))[None])[0]}) for a, b in far[:per_kind]]
    for _, _, c in uniform(per_kind):
        v = vec(c)
        noise = rng.standard_normal(v.shape)
        queries.append(("noisy", {"vector": normalize((v + 0.5 * noise / np.linalg.norm(noise))[None])[0]}))
    queries += [("exclude_1000km", {"cell": c, "exclude_within_km": 1000.0}) for _, _, c in uniform(per_kind)]
    queries += [("bbox_60x40", {"cell": c, "bbox": (max(lon - 30, -180), max(lat - 20, -90), min(lon + 30, 180),
                                                    min(lat + 20, 90))}) for lat, lon, c in uniform(per_kind)]
    return queries


def _truth(atlas_dir: Path, res: int, atlas, queries: list[tuple[str, dict]]) -> tuple[np.ndarray, float]:
    """Each query's exact top-100 scores (best first) over every part, and one query's full pass in seconds."""
    import pyarrow.parquet as pq

    from catalog.cells import cells_to_latlng
    from catalog.interpolation import haversine_km
    from catalog.tables import embedding_matrix
    from catalog.vector_index import normalize

    data = atlas._data(None, res)
    vectors, masks = [], []
    for _, q in queries:
        if "vector" in q:
            vectors.append(np.asarray(q["vector"], np.float32))
        elif "cell" in q:
            vectors.append(normalize(data.vectors(np.array([q["cell"]], np.uint64)))[0])
        else:
            vectors.append(normalize(atlas.lookup([q["lat"]], [q["lon"]], res=res))[0])
        if "exclude_within_km" in q:
            lat, lon = cells_to_latlng(np.array([q["cell"]], np.uint64))
            masks.append(("exclude", float(lat[0]), float(lon[0]), q["exclude_within_km"]))
        elif "bbox" in q:
            masks.append(("bbox", *q["bbox"]))
        else:
            masks.append(None)
    qv = np.stack(vectors).astype(np.float32)
    best = np.full((len(qv), 100), -np.inf, np.float32)
    files = sorted(glob.glob(f"{atlas_dir}/*/data/res={res}/part-*.parquet"))
    single = 0.0
    for f in files:
        table = pq.read_table(f, columns=["cell", "embedding"])
        start = time.perf_counter()
        values = embedding_matrix(table.column("embedding"))
        cells = table.column("cell").to_numpy()
        lat, lon = cells_to_latlng(cells)
        for a in range(0, len(cells), 65536):
            unit = normalize(np.asarray(values[a:a + 65536], np.float32))
            scores = qv @ unit.T
            for i, mask in enumerate(masks):
                if mask is None:
                    continue
                la, lo = lat[a:a + 65536], lon[a:a + 65536]
                if mask[0] == "exclude":
                    scores[i, haversine_km(la, lo, mask[1], mask[2]) < mask[3]] = -np.inf
                else:
                    scores[i, ~((lo >= mask[1]) & (la >= mask[2]) & (lo <= mask[3]) & (la <= mask[4]))] = -np.inf
            both = np.concatenate([best, scores], axis=1)
            best = -np.sort(-np.partition(both, both.shape[1] - 100, axis=1)[:, -100:], axis=1)
        single += (time.perf_counter() - start) / len(qv)  # this part's share of one query's pass
    return best, single


def _search(atlas, res: int, queries, k: int) -> tuple[list[np.ndarray], list[float]]:
    scores, times = [], []
    for _, q in queries:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = atlas.similar(res=res, k=k, **q).column("score").to_numpy()
        times.append(time.perf_counter() - start)
        scores.append(got)
    return scores, times


def _found(scores: list[np.ndarray], kth: np.ndarray) -> np.ndarray:
    from builder.probes import EPSILON

    k = max(len(s) for s in scores) if scores else 1
    return np.array([np.sum(s >= t - EPSILON) / k for s, t in zip(scores, kth, strict=True)])


def measure(atlas_dir: Path, res: int, label: str, per_kind: int = PER_KIND) -> list[Row]:
    import query
    from builder.probes import wilson_bound
    from catalog import vector_index

    atlas = query.open(atlas_dir)
    queries = _kinds(atlas_dir, atlas, res, per_kind, seed=2024)
    start = time.perf_counter()
    best, single = _truth(atlas_dir, res, atlas, queries)
    truth_s = time.perf_counter() - start
    for _, q in queries[:5]:
        atlas.similar(res=res, **q)  # the index's lists and the blocks it reads paged in
    s10, t10 = _search(atlas, res, queries, 10)
    s100, _ = _search(atlas, res, queries, 100)
    names = ("SEED_REGIONS", "VECTOR_SEED_REGIONS", "SEED_POOL", "FILTERED_WIDEN")
    saved = {name: getattr(vector_index, name) for name in names}
    original = vector_index.reranked_search

    def unseeded(*args, seeds=None, sample=None, **kwargs):
        return original(*args, **kwargs)

    for name, value in zip(names, (0, 0, 0, 1), strict=True):
        setattr(vector_index, name, value)
    vector_index.reranked_search = unseeded
    try:
        o10, o_t = _search(atlas, res, queries, 10)
    finally:
        for name, value in saved.items():
            setattr(vector_index, name, value)
        vector_index.reranked_search = original
    kinds = np.array([kind for kind, _ in queries])
    r10, r100, old = _found(s10, best[:, 9]), _found(s100, best[:, 99]), _found(o10, best[:, 9])
    t10, o_t = np.array(t10), np.array(o_t)
    index = atlas.info()[atlas.models[0]]["resolutions"][str(res)]["index_detail"]
    recorded = index.get("recall", {})
    rows = [Row("similar by kind: exact brute force, one query", label, single * 1e3, "ms",
                f"all {len(queries)} queries' truth", truth_s * 1e3)]
    for kind in dict.fromkeys(kinds.tolist()):
        on = kinds == kind
        n = int(on.sum())
        build = recorded.get(kind)
        built = f"; the build recorded {build['at_10']:.3f} on its {build['queries']}" if build else ""
        rows += [
            Row(f"similar by kind: {kind}, recall@10 (lower bound {wilson_bound(float(r10[on].mean()), n):.3f}; "
                f"recall@100 {r100[on].mean():.3f}; {n} queries{built})", label, float(r10[on].mean()), "",
                "without seeds (the search before)", float(old[on].mean()), ">= 0.95 (lower bound)"),
            Row(f"similar by kind: {kind}, warm p50 (p99 {np.percentile(t10[on], 99) * 1e3:.1f} ms)", label,
                float(np.median(t10[on]) * 1e3), "ms", "without seeds, p50", float(np.median(o_t[on]) * 1e3), "<= 20 ms"),
        ]
    every = ~np.isin(kinds, ["bbox_60x40"])
    rows.append(Row(f"similar by kind: every kind but the box, warm p99 (p50 {np.median(t10[every]) * 1e3:.1f} ms)",
                    label, float(np.percentile(t10[every], 99) * 1e3), "ms", "without seeds, p99",
                    float(np.percentile(o_t[every], 99) * 1e3), "<= 100 ms"))
    return rows


def run(quick: bool = False) -> list[Row]:
    given = os.environ.get("HEXATLAS_BENCH_ATLASES")
    if given:
        atlases = [(Path(p), int(r)) for p, r in (item.rsplit(":", 1) for item in given.split(","))]
    else:
        atlases = _build(quick)
    rows = []
    for path, res in atlases:
        m = json.loads(next(path.glob("*/manifest.json")).read_text())
        info = m["resolutions"][str(res)]
        label = (f"{m['dataset']} {'land' if m['build']['land_only'] else 'global'} res {res} "
                 f"({info['cells']:,} cells, {info['index']['type']}, nprobe {info['index'].get('nprobe', '-')}, "
                 f"re-rank x{info['index'].get('rerank', 1)})")
        rows += measure(path, res, label, 30 if quick else PER_KIND)
    return rows


def _build(quick: bool) -> list[tuple[Path, int]]:
    import tempfile

    from builder.build import build
    from tests.data.satclip_checkpoint import make_checkpoint

    work = Path(os.environ.get("HEXATLAS_BENCH_DIR") or tempfile.mkdtemp(prefix="hexatlas-similar-kinds-"))
    sat, geo = (5, 4) if quick else (7, 6)
    out = []
    for name, res, kwargs in (("satclip", sat, {"model": "satclip-vit16-l40"}), ("geoclip", geo, {"model": "geoclip"})):
        path = work / f"{name}-land-{res}"
        if not list(path.glob("*/manifest.json")):
            if name == "satclip":
                kwargs["checkpoint"] = str(make_checkpoint(work / "l40.ckpt", legendre_polys=40))
            build(resolutions=str(res), land_only=True, output=path, device="cpu", progress=False, **kwargs)
        out.append((path, res))
    return out
