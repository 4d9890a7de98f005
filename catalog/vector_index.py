"""Cosine-similarity FAISS indexes over cell embeddings: how they are built and searched.

Both sides of the format live here so that the recall the builder measures is the recall the
query layer gets: the index proposes ``rerank`` x k candidates, these are re-ranked by exact
cosine similarity against the stored embeddings, and (for IVF-PQ) refined along the H3 grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import MissingDependencyError

__all__ = ["EXACT_MAX_CELLS", "normalize", "read_index", "require_faiss", "reranked_search"]

# Up to this many cells an exact (flat) index is both fast enough (a search scans ~0.25 GB of
# float32 for 256-d) and exact; it holds 4 bytes a dimension, so it is kept to small resolutions.
EXACT_MAX_CELLS = 1 << 18


def require_faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise MissingDependencyError(
            "similar-place search needs FAISS: pip install faiss-cpu (or faiss-gpu-cu12 with a GPU)"
        ) from None
    return faiss


def normalize(vectors: NDArray[Any], *, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """Rows scaled to unit length (zero rows stay zero), float32 and C-contiguous.

    Parameters
    ----------
    vectors : numpy.ndarray, shape (n, dim)
        Any real dtype; never modified (unless it is ``out``).
    out : numpy.ndarray, float32, shape (n, dim), optional
        Where to write the result (it may be ``vectors`` itself); default: a new array.
    """
    if out is None:
        out = np.array(vectors, dtype=np.float32, order="C")  # a copy: never scale the caller's array
    elif out is not vectors:
        out[...] = vectors
    if out.ndim != 2:
        raise ValueError(f"expected a 2-D array of row vectors, got shape {out.shape}")
    # einsum and one in-place multiply: np.linalg.norm(axis=1) and a masked divide make
    # full-size temporaries and are ~10x slower on millions of rows.
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    out *= inverse[:, None]
    return out


def read_index(path: Path, info: dict[str, Any], dim: int, cells: int, where: str | None = None) -> Any:
    """Open an index for searching: an IVF index's inverted lists memory-mapped, read-only
    (only the lists a search probes are read from disk), its nprobe set from ``info``.

    The file is first parsed and checked against ``info``, ``dim`` and ``cells``
    (:func:`catalog.index_file.check_index_file`): FAISS never reads a file whose layout
    is not exactly the one the manifest describes.
    """
    import os

    from catalog.index_file import check_index_file

    faiss = require_faiss()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        check_index_file(lambda offset, n: os.pread(fh.fileno(), n, offset), size, info, dim, cells,
                         where or str(path))
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if not info["exact"]:
        faiss.extract_index_ivf(index).nprobe = info["nprobe"]
    return index


def ivf_lists(n: int) -> int:
    """Number of inverted lists for ``n`` vectors: about sqrt(n) / 4, a power of two (at least 16).

    Far fewer, longer lists than FAISS's 4 sqrt(n) rule. Adding the vectors costs
    n x nlist dot products, the largest part of building the index, while a search scans
    nprobe lists of ~4 sqrt(n) codes: at 2M cells, 256 lists of ~8,000 SQ8 codes, about a
    millisecond per query at nprobe 4. The tuned nprobe makes up the recall.
    """
    return 1 << max(4, round(math.log2(math.sqrt(n) / 4)))


VectorsOf = Callable[[NDArray[np.int64]], tuple[NDArray[np.int64], NDArray[np.float32]]]

# The most rounds of neighbour expansion a search makes (each adds the ring around the
# current best cells not yet expanded; a search stops as soon as all of them are), and the
# most of the best cells expanded (a filtered search asks for many more than it returns).
EXPAND_ROUNDS = 64
EXPAND_WIDTH = 1000


def reranked_search(
    index: Any,
    queries: NDArray[np.float32],
    k: int,
    vectors_of: VectorsOf,
    *,
    rerank: int = 1,
    expand: bool = False,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Search ``index`` for ``rerank * k`` candidates, re-rank them exactly and, with
    ``expand``, climb the H3 grid from them.

    Location embeddings change smoothly from cell to cell, so at fine resolutions thousands
    of neighbouring cells share nearly one PQ code: the index finds the right places, but not
    which of their cells are best. With ``expand``, the ring of cells around each of the
    current ``k`` best (at most :data:`EXPAND_WIDTH`) is scored exactly too, round after round, until every one of the best
    has been expanded (at most :data:`EXPAND_ROUNDS` rounds): a walk up the similarity
    surface along the grid, from wherever the index landed.

    Parameters
    ----------
    index : faiss.Index
        Over normalised embeddings, ids = H3 cells (as int64).
    queries : numpy.ndarray, float32, shape (q, dim)
        Normalised query vectors.
    vectors_of : callable
        Maps cell ids (1-D int64) to those of them the atlas holds and their normalised stored
        vectors: ``(ids, float32 (n, dim))``.

    Returns
    -------
    (scores, ids) : float32 and int64 arrays of shape (q, k), best first; id -1 where the
        index had fewer candidates.

    Raises
    ------
    AtlasCorruptError
        When the index proposes a cell the atlas lacks.
    """
    from catalog.cells import neighbours
    from catalog.errors import AtlasCorruptError

    _, cand = index.search(queries, max(k, k * rerank))
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for i, row in enumerate(cand):
        row = row[row >= 0]
        if row.size == 0:
            continue
        found, vectors = vectors_of(row)
        if len(found) != len(np.unique(row)):
            raise AtlasCorruptError("the index names cells the atlas's embeddings lack; run 'hexatlas validate'")
        cells, exact = found, vectors @ queries[i]
        seen, expanded = set(row.tolist()), set()
        for _ in range(EXPAND_ROUNDS if expand else 0):
            best = cells[np.argsort(-exact, kind="stable")[:min(k, EXPAND_WIDTH)]]
            frontier = [c for c in best.tolist() if c not in expanded]
            if not frontier:
                break
            expanded.update(frontier)
            ring = [c for c in neighbours(np.array(frontier, np.uint64)).astype(np.int64).tolist() if c not in seen]
            seen.update(ring)
            if ring:
                more, vectors = vectors_of(np.array(ring, np.int64))
                cells, exact = np.concatenate([cells, more]), np.concatenate([exact, vectors @ queries[i]])
        order = np.argsort(-exact, kind="stable")[:k]
        scores[i, : order.size], ids[i, : order.size] = exact[order], cells[order]
    return scores, ids
