"""A shard's IVF-PQ codes computed from the trained index's parameters, without FAISS's add.

FAISS's CPU add scores every vector against every coarse centroid: n x nlist dot products,
a cost per cell that grows with the resolution's lists (8,192 at resolution 8, 7-32 us a cell
on one core here, more than the rest of a build when the encoder is free). A grid's rows come
in cell order, so consecutive rows are close on the sphere and, for the smooth fields
location encoders give, close in embedding space. The assignment then shrinks with an exact
bound per block of :data:`BLOCK` rows (centre ``m``, radius ``r``): a vector ``x`` of the
block scores ``x . c = m . c + (x - m) . c``, within ``r |c|`` of ``m . c``, so only the
centroids whose upper bound reaches the best lower bound can win, and only those are scored.
Where a field is rough (the bound keeps most centroids) every centroid is scored, as FAISS
does. The same balls bound the recall queries' scores over a block
(:class:`builder.index.TopK`). Residuals are PQ-encoded by FAISS, except one-dimensional
sub-quantisers (a 4-d field's PQ4), whose nearest centroid is found by bisection.

The lists equal FAISS's for the same vectors up to float ties (a vector whose two best
centroids score within rounding may go to either list), which searching tolerates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["BLOCK", "Codebook", "balls", "encode", "slack"]

BLOCK = 256  # rows per bounding ball: consecutive cells of a shard
CHUNK = 1 << 20  # floats of differences worked out at once when bounding blocks
DENSE = 0.5  # a block whose candidates exceed this share of the lists scores them all


@dataclass(frozen=True)
class Codebook:
    """What encoding needs of a trained ``IVF<nlist>,PQ<m>`` index."""

    centroids: NDArray[np.float32]  # nlist x d, the coarse quantiser's
    norms: NDArray[np.float32]  # nlist: |c|, for the bound
    pq: Any  # faiss.ProductQuantizer
    by_residual: bool

    @classmethod
    def of(cls, index: Any) -> Codebook:
        import faiss

        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if not isinstance(ivf, faiss.IndexIVFPQ):
            raise TypeError(f"only IVF-PQ indexes are encoded here, not {type(ivf).__name__}")
        if ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the coarse assignment here is by inner product")
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float32)
        return cls(centroids, np.linalg.norm(centroids, axis=1).astype(np.float32), ivf.pq, bool(ivf.by_residual))

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    @property
    def code_size(self) -> int:
        return int(self.pq.code_size)


def slack(dim: int) -> float:
    """What every bound is widened by: float32 rounding of a ``dim``-long dot product of unit
    vectors stays within ``dim`` units of its last place, here counted four times over."""
    return 4 * dim * float(np.finfo(np.float32).eps)


def balls(vectors: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """The centre and radius of each block of :data:`BLOCK` consecutive rows (the last may be
    shorter): every row of block ``b`` lies within ``radii[b]`` of ``centres[b]``."""
    n, d = vectors.shape
    count = -(-n // BLOCK)
    centres, radii = np.empty((count, d), np.float32), np.empty(count, np.float32)
    step = max(1, CHUNK // max(d, 1) // BLOCK)  # blocks at once: a few MB of differences
    for first in range(0, count, step):
        last = min(first + step, count)
        rows = vectors[first * BLOCK:last * BLOCK]
        whole = min(last, n // BLOCK) - first  # blocks of BLOCK rows in this chunk
        if whole > 0:
            part = rows[:whole * BLOCK].reshape(whole, BLOCK, d)
            centres[first:first + whole] = part.mean(axis=1)
            radii[first:first + whole] = ((part - centres[first:first + whole, None]) ** 2).sum(axis=2).max(axis=1)
        if first + whole < last:  # the short last block
            tail = rows[whole * BLOCK:]
            centres[last - 1] = tail.mean(axis=0)
            radii[last - 1] = ((tail - centres[last - 1]) ** 2).sum(axis=1).max()
    return centres, np.sqrt(radii) * np.float32(1 + 1e-5)


def assign(book: Codebook, vectors: NDArray[np.float32], centres: NDArray[np.float32],
           radii: NDArray[np.float32]) -> NDArray[np.int64]:
    """Each row's coarse list: the centroid of the largest inner product (exact)."""
    mid = centres @ book.centroids.T
    spread = radii[:, None] * book.norms[None, :]
    floor = (mid - spread).max(axis=1, keepdims=True)
    margin = slack(vectors.shape[1])
    possible = mid + spread + margin >= floor - margin
    out = np.empty(len(vectors), np.int64)
    nlist = book.nlist
    for b, start in enumerate(range(0, len(vectors), BLOCK)):
        rows = vectors[start:start + BLOCK]
        lists = np.flatnonzero(possible[b])
        if len(lists) > DENSE * nlist:
            out[start:start + len(rows)] = np.argmax(rows @ book.centroids.T, axis=1)
        else:
            out[start:start + len(rows)] = lists[np.argmax(rows @ book.centroids[lists].T, axis=1)]
    return out


def pq_codes(book: Codebook, residuals: NDArray[np.float32]) -> NDArray[np.uint8]:
    """Each row's PQ code: per sub-vector, the nearest (L2) of its sub-quantiser's centroids."""
    import faiss

    pq = book.pq
    if pq.dsub != 1 or pq.nbits != 8:
        return pq.compute_codes(np.ascontiguousarray(residuals))
    # one value per sub-vector: the nearest of the sorted centroids lies between two midpoints
    centroids = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub)
    codes = np.empty((len(residuals), pq.M), np.uint8)
    for j, values in enumerate(centroids):
        order = np.argsort(values, kind="stable")
        ranked = values[order]
        codes[:, j] = order[np.searchsorted((ranked[1:] + ranked[:-1]) / 2, residuals[:, j])]
    return codes


def encode(book: Codebook, vectors: NDArray[np.float32], centres: NDArray[np.float32] | None = None,
           radii: NDArray[np.float32] | None = None) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """Unit ``vectors`` (rows in cell order) as their lists and PQ codes; the balls of
    :func:`balls` when the caller has them."""
    if centres is None or radii is None:
        centres, radii = balls(vectors)
    lists = assign(book, vectors, centres, radii)
    residuals = vectors - book.centroids[lists] if book.by_residual else vectors
    return lists, pq_codes(book, residuals)
