"""Cosine-similarity FAISS indexes over cell embeddings: how they are built and searched.

Both sides of the format live here so that the recall the builder measures is the recall the
query layer gets: the index proposes ``rerank`` x k candidates and these are re-ranked by
exact cosine similarity against the stored embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import MissingDependencyError

__all__ = ["EXACT_MAX_CELLS", "normalize", "reranked_search", "require_faiss"]

# Below this many cells an exact (flat) index is both fast enough and exact.
EXACT_MAX_CELLS = 1_000_000


def require_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(
            "similar-place search needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12 with a GPU)"
        ) from None
    return faiss


def normalize(vectors: NDArray[Any]) -> NDArray[np.float32]:
    """Rows scaled to unit length (zero rows stay zero), float32 and C-contiguous."""
    out = np.array(vectors, dtype=np.float32, order="C")  # a copy: never scale the caller's array
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    return out


def ivf_lists(n: int) -> int:
    """Number of inverted lists for ``n`` vectors: about sqrt(n), a power of two.

    Fewer, longer lists than FAISS's 4 sqrt(n) rule: k-means training stays short on a
    small machine, and the tuned nprobe makes up the recall.
    """
    return 1 << max(4, round(math.log2(math.sqrt(n))))


def reranked_search(
    index: Any,
    queries: NDArray[np.float32],
    k: int,
    exact_vectors: Callable[[NDArray[np.int64]], NDArray[np.float32]],
    *,
    rerank: int = 1,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Search ``index`` for ``rerank * k`` candidates and re-rank them exactly.

    Parameters
    ----------
    index : faiss.Index
        Over normalised embeddings, ids = H3 cells (as int64).
    queries : numpy.ndarray, float32, shape (q, dim)
        Normalised query vectors.
    exact_vectors : callable
        Maps candidate ids (1-D int64) to their normalised stored vectors (float32, (n, dim)).

    Returns
    -------
    (scores, ids) : float32 and int64 arrays of shape (q, k), best first; id -1 where the
        index had fewer candidates.
    """
    _, cand = index.search(queries, max(k, k * rerank))
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for i, row in enumerate(cand):
        row = row[row >= 0]
        if row.size == 0:
            continue
        exact = exact_vectors(row) @ queries[i]
        order = np.argsort(-exact, kind="stable")[:k]
        scores[i, : order.size], ids[i, : order.size] = exact[order], row[order]
    return scores, ids
