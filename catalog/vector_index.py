"""Cosine-similarity FAISS indexes over cell embeddings: how they are built and searched.

Both sides of the format live here so that the recall the builder measures is the recall the
query layer gets: the index proposes ``rerank`` x k candidates, these are re-ranked by exact
cosine similarity against the stored embeddings, and (for IVF-PQ) refined along the H3 grid.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import MissingDependencyError

__all__ = ["EXACT_MAX_VALUES", "Sample", "exact_fits", "normalize", "read_index", "require_faiss", "reranked_search",
           "sample_dtype"]

# A resolution gets an exact (flat) index, fast enough and exact, while one search scans at most
# this many float32 values (cells x dimensions): 2^18 cells of SatCLIP's 256 (~0.25 GB), 2^17 of
# GeoCLIP's 512. The limit is the scan's work, not the cell count, so a low-dimensional encoder
# does not train (and tune) an IVF-PQ index its few dimensions cannot quantise.
EXACT_MAX_VALUES = (1 << 18) * 256


def exact_fits(cells: int, dim: int) -> bool:
    """Whether a resolution of ``cells`` embeddings of ``dim`` dimensions gets an exact index."""
    return cells * dim <= EXACT_MAX_VALUES


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
EXPAND_ROUNDS = 32
EXPAND_WIDTH = 1000
STRIDES = (8,)  # measured at resolution 7: the same recall as single steps, p50 25 -> 17 ms
# Where a walk starts besides the index's best candidates: the best candidate of each of up to
# SEED_REGIONS regions (the cells under one parent SEED_SPAN resolutions coarser) among the
# index's SEED_POOL best, each climbing on its own. PQ codes tie thousands of neighbouring
# cells, so the index's top candidates can all lie on one hill that is not the highest.
# A query with a place of its own (a cell, a lat/lon) starts from its own cell too, so it
# needs fewer regions than a vector query: random SatCLIP land res 7, 60 queries a kind, 4
# regions kept recall@10 (1.000, edge 0.998) at p50 17-20 ms against 20-35 with 16, but GeoCLIP's
# means of two needed 16 (docs/benchmarks.md, "Fewer region seeds for a placed query").
SEED_POOL = 1000
SEED_REGIONS = 4
VECTOR_SEED_REGIONS = 16
SEED_SPAN = 3
# A filtered search widens its pool of candidates (8x, then nprobe 4x) until enough pass, up
# to this many candidates and every list.
MAX_CANDIDATES = 100_000
# A filtered search's best cells are often on other hills than the query's own, of nearly
# equal height: it starts from this many times more regions (GeoCLIP land res 6: exclude
# 1000 km recall@10 0.970 with 4, 0.965 with 1). It probes the index's nprobe lists, as an
# unfiltered query does, and more only when the pool exhausts them: 4x the lists as well kept
# the same recall at 1.7x (GeoCLIP) and 1.1x (random SatCLIP res 7) the p50 (docs/benchmarks.md,
# "Checksums through ISA-L, and the lists of a filtered search").
FILTERED_WIDEN = 4

# A filtered search also starts from the best of a sample of the resolution's cells, scored
# exactly: the index's candidates cluster on the hills nearest the query, which a filter
# (an excluded circle, a box) often removes, while its best passing cells lie on some far
# hill the index never proposed (random SatCLIP, land res 7, the build's 100 queries:
# exclude 1000 km recall@10 0.78 -> 0.94). So does a vector query (no place of its own): a mean
# of two places' embeddings is nearly as close to many far hills, within the PQ codes' error
# (the same atlas, 100 means of two: 0.955 -> 1.000 with 8 seeds, 0.990 with 4; p50 +25 ms).
# The sample is the first cell under each ancestor at a coarser resolution (islands too) with its
# unit vector (float16), at most SAMPLE_BYTES (see builder.finish._sample).
SAMPLE_BYTES = 8 << 20
SAMPLE_SEEDS = 16  # for a filtered search
VECTOR_SAMPLE_SEEDS = 8  # for an unfiltered search without seeds of its own
SAMPLE_CHUNK = 1024  # sample cells filtered at a time, best first, until SAMPLE_SEEDS pass

Keep = Callable[[NDArray[np.int64]], NDArray[np.bool_]]  # which cells a filtered search may return


def sample_dtype(dim: int) -> np.dtype:
    """A row of ``index/res=<r>.sample``: a cell and its unit embedding as float16."""
    return np.dtype([("cell", "<u8"), ("vector", "<f2", (dim,))])


@dataclass(frozen=True)
class Sample:
    """A resolution's sample of cells (int64) and their unit vectors (float32, (n, dim))."""

    cells: NDArray[np.int64]
    vectors: NDArray[np.float32]

    @classmethod
    def parse(cls, data: bytes, dim: int, where: str) -> Sample:
        """A ``.sample`` file's bytes, checked: a ``.npy`` of :func:`sample_dtype` rows, no pickles."""
        from catalog.errors import AtlasCorruptError

        try:
            table = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise AtlasCorruptError(f"{where} is not a sample of cells ({exc}); run 'hexatlas validate'") from None
        if table.dtype != sample_dtype(dim) or table.ndim != 1:
            raise AtlasCorruptError(f"{where} holds {table.dtype} rows, not cells with {dim}-d vectors; "
                                    "run 'hexatlas validate'")
        sample = cls.of(table)
        if not np.isfinite(sample.vectors).all():
            raise AtlasCorruptError(f"{where} holds vectors that are not finite; run 'hexatlas validate'")
        return sample

    @classmethod
    def of(cls, table: NDArray[Any]) -> Sample:
        """From :func:`sample_dtype` rows."""
        return cls(table["cell"].astype(np.int64), table["vector"].astype(np.float32))

    def best(self, query: NDArray[np.float32], count: int) -> NDArray[np.int64]:
        """The ``count`` best sample cells for ``query``, best first."""
        scores = self.vectors @ query
        top = np.argpartition(-scores, count)[:count] if count < len(scores) else np.arange(len(scores))
        return self.cells[top[np.argsort(-scores[top], kind="stable")]]

    def seeds(self, query: NDArray[np.float32], keep: Keep, count: int) -> NDArray[np.int64]:
        """The ``count`` best sample cells for ``query`` that ``keep`` accepts."""
        order = np.argsort(-(self.vectors @ query), kind="stable")
        found: list[NDArray[np.int64]] = []
        for start in range(0, len(order), SAMPLE_CHUNK):
            cells = self.cells[order[start:start + SAMPLE_CHUNK]]
            found.append(cells[keep(cells)])
            if sum(map(len, found)) >= count:
                break
        return np.concatenate(found)[:count] if found else np.empty(0, np.int64)


def reranked_search(
    index: Any,
    queries: NDArray[np.float32],
    k: int,
    vectors_of: VectorsOf,
    *,
    rerank: int = 1,
    expand: bool = False,
    seeds: list[NDArray[np.int64]] | None = None,
    keep: Keep | None = None,
    fallback: list[NDArray[np.int64]] | None = None,
    sample: Sample | None = None,
    placed_nprobe: int | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Search ``index`` for ``rerank * k`` candidates, re-rank them exactly and, with
    ``expand``, climb the H3 grid from them and from other regions' seeds.

    Location embeddings change smoothly from cell to cell, so at fine resolutions thousands
    of neighbouring cells share nearly one PQ code: the index finds the right places, but not
    which of their cells are best, and its best candidates can all come from one place. With
    ``expand`` the walk starts from three kinds of seed: the ``rerank * k`` candidates, the
    best candidate of each of up to :data:`SEED_REGIONS` regions (:data:`VECTOR_SEED_REGIONS`
    for a query without ``seeds`` of its own) among the index's
    :data:`SEED_POOL` best, and ``seeds[i]`` (a cell query's own cell). Each round scores
    exactly the ring around every unexpanded cell among the current ``k`` best (at most
    :data:`EXPAND_WIDTH`) and around each seed's own best cell (every cell belongs to the
    seed whose ring found it), so that a seed below the current best still climbs its hill;
    the walk stops when none is left to expand, or after :data:`EXPAND_ROUNDS` rounds.

    With ``keep``, only the cells it accepts are results, candidates and region seeds (4x as
    many regions, chosen by exact score); the index is asked for more
    candidates (then probes more lists) until :data:`SEED_POOL` pass or
    :data:`MAX_CANDIDATES` and every list have been searched; ``fallback`` cells join them
    when fewer pass; with ``sample``, its best :data:`SAMPLE_SEEDS` cells that pass are seeds
    too, and for an unfiltered query without ``seeds`` (a vector) its best
    :data:`VECTOR_SAMPLE_SEEDS`.

    Parameters
    ----------
    index : faiss.Index
        Over normalised embeddings, ids = H3 cells (as int64).
    queries : numpy.ndarray, float32, shape (q, dim)
        Normalised query vectors.
    vectors_of : callable
        Maps cell ids (1-D int64) to those of them the atlas holds and their normalised stored
        vectors: ``(ids, float32 (n, dim))``.
    seeds : list of int64 arrays, optional
        Per query, cells the walk also starts from (those the atlas lacks are ignored).
    keep : callable, optional
        Maps cell ids (1-D int64) to whether each may be returned.
    fallback : list of int64 arrays, optional
        Per query, cells that pass ``keep`` wherever the index's best do not (the edge of an
        excluded circle, points of a box): seeds too when fewer candidates pass than wanted.
    sample : Sample, optional
        The resolution's sample (see :data:`SAMPLE_BYTES`), for filtered and vector searches.
    placed_nprobe : int, optional
        The lists an unfiltered query with ``seeds`` of its own probes (its own cell seeds the
        walk, so it may need fewer: the build tunes it apart); default the index's nprobe.

    Returns
    -------
    (scores, ids) : float32 and int64 arrays of shape (q, k), best first; id -1 where fewer
        cells were found (or passed ``keep``).

    Raises
    ------
    AtlasCorruptError
        When the index proposes a cell the atlas lacks.
    """
    top = max(k, k * rerank)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for i, query in enumerate(queries):
        want = max(top, SEED_POOL) if expand else top
        placed = seeds is not None and len(seeds[i]) > 0  # a cell or point query, not a vector
        row = _candidates(index, query, want, keep, placed_nprobe if placed and keep is None else None)[:want]
        if len(row) < want and fallback is not None and len(fallback[i]):
            extra = np.setdiff1d(np.asarray(fallback[i], np.int64), row)
            extra, _ = vectors_of(extra[keep(extra)] if keep is not None else extra)  # those the atlas holds
            row = np.concatenate([row, extra])
        if row.size == 0 and (sample is None or keep is None or not expand):
            continue
        start = np.unique(row[:top])
        if not expand:
            cells, exact = _scored(vectors_of, start, query, start)
            passing = np.ones(len(cells), bool)
        else:
            pool, scored, ranked = np.empty(0, np.int64), np.empty(0, np.float32), row
            if keep is not None:  # regions' seeds by exact score: the PQ order is noise among far
                pool, vectors = vectors_of(np.unique(row))  # hills of nearly one height
                scored = vectors @ query
                ranked = pool[np.argsort(-scored, kind="stable")]
            regions = (SEED_REGIONS if placed else VECTOR_SEED_REGIONS) * (1 if keep is None else FILTERED_WIDEN)
            others = _region_seeds(ranked, set(start.tolist()), regions)
            own = None if seeds is None else np.setdiff1d(np.asarray(seeds[i], np.int64), start)
            if own is not None:
                others = np.concatenate([others, own[keep(own)] if keep is not None else own])
            if sample is not None and (keep is not None or not placed):
                picked = sample.seeds(query, keep, SAMPLE_SEEDS) if keep is not None else \
                    sample.best(query, VECTOR_SAMPLE_SEEDS)
                others = np.concatenate([others, np.setdiff1d(picked, start)])
            others = np.unique(others)
            # the candidates and the seeds not scored yet, read at once (remotely one round trip)
            got, got_exact = _scored(vectors_of, np.setdiff1d(np.union1d(start, others), pool), query,
                                     np.setdiff1d(start, pool))
            # every candidate scored exactly may be a result; those not seeds climb as the index's
            cells, exact = np.concatenate([pool, got]), np.concatenate([scored, got_exact])
            first = ~np.isin(cells, others)
            cells, exact, passing = _walk(np.concatenate([cells[first], cells[~first]]),
                                          np.concatenate([exact[first], exact[~first]]),
                                          int(first.sum()), query, k, vectors_of, keep)
        order = np.flatnonzero(passing)[np.argsort(-exact[passing], kind="stable")[:k]]
        scores[i, : order.size], ids[i, : order.size] = exact[order], cells[order]
    return scores, ids


def _scored(vectors_of: VectorsOf, cells: NDArray[np.int64], query: NDArray[np.float32],
            needed: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """The cells of ``cells`` the atlas holds and their exact scores; every one of ``needed``
    (the index's candidates) must be held."""
    from catalog.errors import AtlasCorruptError

    found, vectors = vectors_of(cells)
    if np.setdiff1d(needed, found).size:
        raise AtlasCorruptError("the index names cells the atlas's embeddings lack; run 'hexatlas validate'")
    return found, vectors @ query


def _candidates(index: Any, query: NDArray[np.float32], want: int, keep: Keep | None,
                nprobe: int | None = None) -> NDArray[np.int64]:
    """The index's best ``want`` candidates for ``query`` (probing ``nprobe`` lists, default
    the index's); with ``keep``, those it accepts, the search widened until ``want`` pass or
    it can widen no more (see :func:`reranked_search`).

    The pool grows 8x a step; when too few pass, the search skips the steps that the share
    passing so far says cannot be enough and answers each skipped step from the larger
    search's first rows, so a pool that must reach :data:`MAX_CANDIDATES` costs two searches, not four.
    """
    base = getattr(index, "nprobe", None)
    nprobe = base if nprobe is None or base is None else nprobe
    nlist = getattr(index, "nlist", None)
    pool, ask = want, want
    while True:
        params = {}
        if nprobe != base:
            params["params"] = require_faiss().SearchParametersIVF(nprobe=nprobe)
        _, found = index.search(query[None, :], ask, **params)
        row = found[0][found[0] >= 0]
        if keep is None:
            return row
        ok = keep(row)
        while True:  # each step of the pool up to ``ask``: its first ``pool`` rows, as if searched alone
            top = row[:pool]
            passing = top[ok[:len(top)]]
            if len(passing) >= want:
                return passing
            if len(top) < pool or pool >= ask:
                break
            pool = min(MAX_CANDIDATES, pool * 8)
        if len(top) < pool:  # every candidate of the probed lists: probe more
            if nprobe is None or nlist is None or nprobe >= nlist:
                return passing
            nprobe = min(nlist, nprobe * 4)
            ask = pool
        elif pool >= MAX_CANDIDATES:
            return passing
        else:
            share = len(passing) / max(1, len(top))
            pool = ask = min(MAX_CANDIDATES, pool * 8)
            while ask < MAX_CANDIDATES and ask * share < want:  # steps too small to be enough
                ask = min(MAX_CANDIDATES, ask * 8)


def _region_seeds(candidates: NDArray[np.int64], taken: set[int], regions: int) -> NDArray[np.int64]:
    """The best of ``candidates`` (index order) in each of the first ``regions`` regions they
    fall in, but those already ``taken``."""
    from catalog.cells import cells_to_parent

    if candidates.size == 0 or regions <= 0:
        return np.empty(0, np.int64)
    res = (int(candidates[0]) >> 52) & 0xF  # an H3 index's resolution bits
    parents = cells_to_parent(candidates.astype(np.uint64), max(0, res - SEED_SPAN))
    _, first = np.unique(parents, return_index=True)
    chosen = candidates[np.sort(first)[:regions]]
    return np.array([c for c in chosen.tolist() if c not in taken], np.int64)


def _walk(cells: NDArray[np.int64], exact: NDArray[np.float32], n_index: int, query: NDArray[np.float32], k: int,
          vectors_of: VectorsOf, keep: Keep | None) -> tuple[NDArray[np.int64], NDArray[np.float32], NDArray[np.bool_]]:
    """Climb the grid from ``cells`` (the first ``n_index``, the index's candidates, one
    seed; each later one a seed of its own), as :func:`reranked_search` describes; returns
    every cell scored, its score and whether ``keep`` accepts it."""
    import h3.api.numpy_int as h3i

    seed = np.concatenate([np.zeros(n_index, np.int64), np.arange(1, len(cells) - n_index + 1)])
    passing = keep(cells) if keep is not None else np.ones(len(cells), bool)
    seen, expanded = set(cells.tolist()), set()
    owner = dict(zip(cells.tolist(), seed.tolist(), strict=True))  # each cell scored -> its seed
    for _ in range(EXPAND_ROUNDS):
        order = np.argsort(-exact, kind="stable")
        order = order[passing[order]]  # a filtered walk climbs only where it may return cells
        _, first = np.unique(seed[order], return_index=True)  # each seed's best cell
        best = order[:min(k, EXPAND_WIDTH)]
        frontier = [c for c in dict.fromkeys(np.concatenate([cells[best], cells[order[first]]]).tolist())
                    if c not in expanded]
        if not frontier:
            break
        expanded.update(frontier)
        found: dict[int, int] = {}  # a new cell -> the seed whose ring found it
        for c in frontier:
            for r in _steps(h3i, c):
                if r not in seen:
                    seen.add(r)
                    found[r] = owner[c]
        if found:
            more, vectors = vectors_of(np.fromiter(found, np.int64, len(found)))
            owners = [found[c] for c in more.tolist()]
            owner.update(zip(more.tolist(), owners, strict=True))
            cells = np.concatenate([cells, more])
            exact = np.concatenate([exact, vectors @ query])
            seed = np.concatenate([seed, np.array(owners, np.int64)])
            passing = np.concatenate([passing, keep(more) if keep is not None else np.ones(len(more), bool)])
    return cells, exact, passing


def _steps(h3i: Any, cell: int) -> list[int]:
    """Where a walk looks from ``cell``: its ring, and six cells in the ring at each distance
    of :data:`STRIDES` (a climb moves up to the longest stride a round, not one cell)."""
    import h3

    out = h3i.grid_disk(cell, 1).astype(np.int64).tolist()
    for d in STRIDES:
        with contextlib.suppress(h3.H3FailedError):  # a ring across a pentagon's distortion is not walked
            out += h3i.grid_ring(cell, d)[::d].astype(np.int64).tolist()
    return out
