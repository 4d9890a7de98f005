"""The queries a build measures its index's recall with, one set per kind of query.

Recall measured on uniform points alone is not a guarantee for other queries: an island's
cell, the edge of a land-only atlas, a vector that is no cell's embedding and a filtered
search each fail differently. A build draws :data:`PER_KIND` queries of each kind (the
held-out uniform cells of :func:`builder.index.ivf_sample` are the first), finds their exact
top 100 while its shards are encoded (:class:`builder.index.TopK`), tunes the index until
every unfiltered kind's lower bound reaches the target, and records each kind's recall in
the manifest. The kinds (:data:`KINDS`):

- ``uniform``: the cells under uniformly random points of the atlas's area (a lat/lon query);
- ``per_part``: a random cell of a random part (coasts, islands and sparse regions are drawn
  as often as continents); land-only and regional atlases of more than one part;
- ``edge``: cells with a neighbour the atlas lacks; land-only and regional atlases;
- ``mean_of_two``: the normalised mean of two uniform cells' embeddings more than
  :data:`MEAN_MIN_KM` apart ("places like these two"; no cell's embedding);
- ``noisy``: a uniform cell's embedding plus a random vector of norm :data:`NOISE`,
  normalised (an embedding from elsewhere, such as an image's);
- ``exclude_1000km``: a uniform cell with ``exclude_within_km=1000``, the filtered search
  (measured and recorded; the search widens itself for filters, and tuning does not wait on it).

A result counts as found when its exact score is within :data:`EPSILON` of the true k-th
score: neighbouring cells can store the same float16 vector, and float32 dot products differ
in the last bits between batch shapes (~1e-7), so plain set recall would count ties as misses.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

__all__ = ["EPSILON", "KINDS", "PER_KIND", "Probes", "probe_cells", "wilson_bound"]

PER_KIND = 100
MEAN_MIN_KM = 2000.0
NOISE = 0.5
EXCLUDE_KM = 1000.0
EPSILON = 2e-6
KINDS = ("uniform", "per_part", "edge", "mean_of_two", "noisy", "exclude_1000km")
FILTERED = ("exclude_1000km",)


@dataclass(frozen=True)
class Probes:
    """The query set: unit vectors, each one's kind, cell (0 for a vector query) and the
    radius its search excludes around that cell (0: none); ``floor``: a score each query's
    exact k-th best over the resolution is known to exceed (see :func:`builder.index.train`),
    -inf where none is known."""

    vectors: NDArray[np.float32]
    kinds: NDArray[np.str_]
    cells: NDArray[np.uint64]
    exclude_km: NDArray[np.float64]
    floor: NDArray[np.float32] | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def floors(self) -> NDArray[np.float32]:
        return np.full(len(self), -np.inf, np.float32) if self.floor is None else self.floor

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(out, vectors=self.vectors, kinds=self.kinds, cells=self.cells, exclude_km=self.exclude_km,
                 floor=self.floors())
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Probes:
        with np.load(io.BytesIO(data), allow_pickle=False) as f:
            return cls(np.ascontiguousarray(f["vectors"], np.float32), f["kinds"].astype(str),
                       f["cells"].astype(np.uint64), f["exclude_km"].astype(np.float64),
                       f["floor"].astype(np.float32) if "floor" in f.files else None)

    def exclusions(self) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]] | None:
        """(rows, unit xyz of their cells' centres, cosine of each radius), or None."""
        from catalog.cells import cells_to_latlng
        from catalog.interpolation import EARTH_RADIUS_KM

        rows = np.flatnonzero(self.exclude_km > 0)
        if rows.size == 0:
            return None
        return rows, unit_xyz(*cells_to_latlng(self.cells[rows])), np.cos(self.exclude_km[rows] / EARTH_RADIUS_KM)


def unit_xyz(lat: NDArray[np.float64], lon: NDArray[np.float64]) -> NDArray[np.float64]:
    """Points on the unit sphere, shape (n, 3)."""
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)


def probe_cells(res: int, uniform: NDArray[np.uint64], keep: NDArray[np.uint64] | None) -> dict[str, NDArray[np.uint64]]:
    """The cells of the cell kinds: ``uniform`` as given, and for an atlas of some cells only
    (the sorted ``keep``) ``per_part`` (when ``res`` has more than one part) and ``edge``."""
    from builder.grid import shard_resolution

    rng = np.random.default_rng(res + 1000)
    cells = {"uniform": uniform}
    if keep is not None and len(keep):
        if shard_resolution(res) is not None:
            cells["per_part"] = _per_part(res, keep, rng)
        cells["edge"] = _edge(keep, rng)
    return {kind: c for kind, c in cells.items() if len(c)}


def _per_part(res: int, keep: NDArray[np.uint64], rng: np.random.Generator) -> NDArray[np.uint64]:
    """A random cell of a random part, :data:`PER_KIND` times. The parts are ranges of the
    sorted cells (their shards' parents are consecutive), found by their first children."""
    from builder.grid import plan_shards, shard_resolution

    parent_res = shard_resolution(res)
    assert parent_res is not None
    shards = plan_shards([res], only={res: keep})
    firsts = np.array([_first_child(s.parent, parent_res, res) for s in shards], np.uint64)
    bounds = np.append(np.searchsorted(keep, firsts), len(keep))
    sizes = np.diff(bounds)
    held = np.flatnonzero(sizes > 0)
    parts = held[rng.integers(len(held), size=PER_KIND)]
    return np.unique(keep[bounds[parts] + (rng.random(PER_KIND) * sizes[parts]).astype(np.int64)])


def _first_child(parent: int, parent_res: int, res: int) -> int:
    """The lowest H3 index of resolution ``res`` under ``parent``: its digits below the
    parent's resolution all 0 (an index's digit d lies at bits 3 * (15 - d))."""
    cell = (parent & ~(0xF << 52)) | (res << 52)
    for digit in range(parent_res + 1, res + 1):
        cell &= ~(7 << (3 * (15 - digit)))
    return cell


def _edge(keep: NDArray[np.uint64], rng: np.random.Generator) -> NDArray[np.uint64]:
    """Up to :data:`PER_KIND` random cells of ``keep`` with a neighbour outside it."""
    import h3.api.numpy_int as h3i

    from catalog.cells import in_sorted

    found: list[int] = []
    for _ in range(200):  # ~3% of a land atlas's cells at resolution 7 are on its edge
        for cell in keep[rng.integers(len(keep), size=2000)].tolist():
            if not in_sorted(keep, h3i.grid_disk(cell, 1).astype(np.uint64)).all():
                found.append(cell)
        if len(set(found)) >= PER_KIND:
            break
    return np.unique(np.array(found, np.uint64))[:PER_KIND]


def make_probes(cells: dict[str, NDArray[np.uint64]], vectors: NDArray[np.float32], res: int) -> Probes:
    """The query set from the cell kinds' cells and their unit ``vectors`` (as stored, in the
    order of ``cells``' kinds): the vector and filtered kinds are made from the uniform ones."""
    from catalog.cells import cells_to_latlng
    from catalog.interpolation import haversine_km
    from catalog.vector_index import normalize

    rng = np.random.default_rng(res + 2000)
    kinds = [np.full(len(c), kind) for kind, c in cells.items()]
    all_cells = [c for c in cells.values()]
    parts = [vectors]
    exclude = [np.zeros(len(vectors))]
    uniform, u_vec = cells["uniform"], vectors[:len(cells["uniform"])]
    lat, lon = cells_to_latlng(uniform)
    first, second = rng.permutation(len(uniform)), rng.permutation(len(uniform))
    far = haversine_km(lat[first], lon[first], lat[second], lon[second]) > MEAN_MIN_KM
    pairs = np.stack([first[far], second[far]], axis=1)[:PER_KIND]
    noisy = rng.permutation(len(uniform))[:PER_KIND]  # the uniform cells are sorted: drawn, not the first
    made = {
        "mean_of_two": normalize(u_vec[pairs[:, 0]] + u_vec[pairs[:, 1]]),
        "noisy": normalize(u_vec[noisy] + NOISE * normalize(rng.standard_normal(u_vec[noisy].shape))),
    }
    for kind, vecs in made.items():
        kinds.append(np.full(len(vecs), kind))
        all_cells.append(np.zeros(len(vecs), np.uint64))
        parts.append(vecs)
        exclude.append(np.zeros(len(vecs)))
    filtered = rng.permutation(len(uniform))[:PER_KIND]
    kinds.append(np.full(len(filtered), "exclude_1000km"))
    all_cells.append(uniform[filtered])
    parts.append(u_vec[filtered])
    exclude.append(np.full(len(filtered), EXCLUDE_KM))
    return Probes(np.ascontiguousarray(np.concatenate(parts), np.float32), np.concatenate(kinds).astype(str),
                  np.concatenate(all_cells).astype(np.uint64), np.concatenate(exclude))


def wilson_bound(recall: float, queries: int, z: float = 1.645) -> float:
    """A lower bound on the recall of queries like the measured ones: the Wilson score
    interval's lower end at ``z`` standard errors (95% one-sided).

    Misses come a query at a time (a search lands on the wrong hill and misses most of its
    results), so the sample is the queries, not their results. Unlike the normal
    approximation it does not collapse to the measurement at a recall of 1: 100 queries all
    found are a bound of 0.974, 0.99 on 100 queries one of 0.956.
    """
    n = max(queries, 1)
    centre = recall + z * z / (2 * n)
    spread = z * math.sqrt(max(recall * (1 - recall), 0.0) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def found_share(scores: NDArray[np.float32], kth: NDArray[np.float32]) -> NDArray[np.float64]:
    """Per query, the share of its results whose score reaches the true k-th within
    :data:`EPSILON` (``scores`` (q, k), missing results -inf)."""
    return np.mean(scores >= kth[:, None] - EPSILON, axis=1)


def summary(kinds: NDArray[np.str_], at_10: NDArray[np.float64], at_100: NDArray[np.float64]) -> dict[str, dict]:
    """Per kind, in :data:`KINDS`' order: queries, recall@10, its lower bound, recall@100."""
    out = {}
    for kind in KINDS:
        rows = kinds == kind
        if rows.any():
            r10 = float(at_10[rows].mean())
            out[kind] = {"queries": int(rows.sum()), "at_10": round(r10, 4),
                         "at_10_lower_bound": round(wilson_bound(r10, int(rows.sum())), 4),
                         "at_100": round(float(at_100[rows].mean()), 4)}
    return out
