"""The FAISS index of one resolution, built shard by shard: train, add, merge, tune.

An approximate resolution (above :data:`catalog.vector_index.EXACT_MAX_VALUES`: cells x dimensions) is
an ``IVF<nlist>,PQ<m>`` index over unit vectors, ids = cells:

1. **train** (:func:`train`, once, before the resolution's shards): the coarse centroids and
   product quantiser are trained on :func:`ivf_sample` cells encoded for the purpose, and
   saved in ``_build/index/res=<r>/`` with the query set of :mod:`builder.probes` (its
   uniform kind: :data:`RECALL_QUERIES` held-out cells, not trained on) and each query's
   floor (:func:`score_floor`: a score its exact top-100 beats, from the training sample);
2. **add** (:func:`add_shard`, wherever a shard is encoded: a local writer thread or a Ray
   task): the shard's vectors are encoded (:mod:`builder.ivfpq` on CPUs, FAISS on GPUs), and
   its inverted lists are saved (:class:`ShardLists`) with the exact top-100 scores above
   their floors of the queries over the shard (most shards hold none);
3. **merge** (:func:`merge`, on the driver): the shards' lists are streamed, list by list, into
   ``index/res=<r>.faiss`` in FAISS's own layout, which the query layer memory-maps: no process
   holds the resolution's codes;
4. **tune** (:func:`tune`): the cheapest re-rank depth and nprobe whose recall@10 (searched
   as the query layer searches) reaches 0.95 (lower bound) for every unfiltered kind of query
   against exact search over the whole resolution (the shards' top-100s merged, any query a
   floor left short found again: :func:`complete_top`); then the fewest lists (``nprobe_placed``)
   with which the kinds that have a place of their own (whose cell seeds the walk) still reach
   it; then every kind's recall@10 and @100 at that setting.

Exact resolutions get a flat index written from the part files (small by definition).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from builder import ivfpq, probes
from catalog import manifest as fmt
from catalog import vector_index
from catalog.errors import AtlasCorruptError

if TYPE_CHECKING:
    from builder.encode import Quantizer
    from catalog.storage import Store

__all__ = ["INDEX_BATCH", "RECALL_QUERIES", "RERANKS", "ShardLists", "TopK", "TrainedIndex", "add_shard",
           "complete_top", "ivf_sample", "load_trained", "merge", "merged_top", "pq_subquantizers", "score_floor", "train",
           "tune", "unit_vectors"]

log = logging.getLogger(__name__)

INDEX_BATCH = 65536  # cells per add: the unit vectors' buffer is this many rows
RECALL_TARGET = 0.95
RECALL_K = 10
TOP_K = 100  # each query's exact top scores kept: recall is measured at 10 and at 100
RECALL_QUERIES = 200
# Searches between fresh opens of the index while tuning (see tune): at resolution 8 one
# setting's searches touch most of an 8 GB memory-mapped index, whose pages counted in RSS.
REOPEN_SEARCHES = 16
RERANKS = (1, 4, 16)  # candidates per result re-ranked exactly, tried in this order
NPROBES = (4, 8, 16, 32, 64, 128, 256)
# Tried for queries with a place of their own, below the tuned nprobe: their own cell seeds the
# walk, so the index need only propose other regions (random SatCLIP land res 7, 60 queries a
# kind: recall@10 the same at nprobe 1 as at 4 for uniform, per-part and edge cells; see
# docs/benchmarks.md, "Fewer lists for a query with a place").
PLACED_NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
PQ_TRAIN_POINTS = 39 * 256  # PQ trains 256 centroids per sub-vector: faiss wants 39 points each
# The index (codes and 8-byte ids) stays within this share of the stored embeddings' bytes.
INDEX_SHARE = 0.10
# The recall queries' floors lie this far below their k-th best over the training sample: the
# shards encode those cells again, and their stored values may round apart (float16: ~1e-3).
FLOOR_MARGIN = 0.05
# Lists merged between remaps of the shards' files: their pages read would otherwise stay mapped
# (8 GB at resolution 8), a share of this many / nlist.
REMAP_LISTS = 256
# An index that misses the recall target is replaced by an exact one only up to this size.
FLAT_MAX_BYTES = 2 << 30


def pq_subquantizers(dim: int, stored_bytes: int) -> int:
    """Bytes of PQ code per cell: the most sub-quantisers (dividing ``dim``, at most one per
    4 dimensions, at least 4) whose code and 8-byte id take at most :data:`INDEX_SHARE` of a
    cell's ``stored_bytes``.

    SatCLIP float16 (512 B a cell): 32; GeoCLIP float16 (1 KB): 64; SatCLIP int8: 16.
    """
    budget = INDEX_SHARE * stored_bytes - 8
    fits = [m for m in range(4, dim // 4 + 1) if dim % m == 0 and m <= budget]
    return max(fits) if fits else next(m for m in range(min(4, dim), dim + 1) if dim % m == 0)


def unit_vectors(values: NDArray[Any], quantizer: Quantizer | None = None,
                 out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """Stored embeddings (float16/float32, or int8 with their ``quantizer``) as unit-length
    float32 rows, C-contiguous, in ``out`` when given (of the same shape)."""
    if out is None:
        out = np.empty(values.shape, np.float32)
    to_float32(values, out)
    if quantizer is not None:
        quantizer.decode(out, out=out)
    return vector_index.normalize(out, out=out)


def to_float32(values: NDArray[Any], out: NDArray[np.float32]) -> None:
    """Copy ``values`` into ``out`` as float32 (the same values either way).

    numpy converts float16 one element at a time; torch's vectorised cast is ~7x cheaper.
    torch only takes writeable arrays without a warning (Arrow-backed ones are read-only),
    and is fed blocks under its parallel grain size so the cast stays in this thread (its
    idle OpenMP workers would otherwise spin beside faiss's).
    """
    if values.dtype == np.float32 or not values.flags.writeable or not values.flags.c_contiguous:
        np.copyto(out, values)
        return
    import torch

    src, dst = torch.from_numpy(values), torch.from_numpy(out)
    step = max(1, _TORCH_GRAIN // max(values.shape[1], 1))
    for start in range(0, len(values), step):
        dst[start:start + step].copy_(src[start:start + step])


_TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: smaller element-wise ops run in the calling thread


def ivf_sample(res: int, count: int, keep: NDArray[np.uint64] | None = None) -> tuple[
        NDArray[np.uint64], NDArray[np.uint64]]:
    """``count`` distinct cells of resolution ``res`` under uniformly random points on the sphere
    (only cells in the sorted ``keep``, when given), and :data:`RECALL_QUERIES` more, held out.

    What an IVF index trains on and its recall is measured with. Chosen by position, not by
    row, so that a build can encode them before any shard is written. Returns both sorted.
    """
    from catalog.cells import in_sorted, latlng_to_cells

    rng = np.random.default_rng(res)
    wanted = count + RECALL_QUERIES
    found = np.empty(0, np.uint64)
    for _ in range(100):  # land-only keeps ~30% of the points; each round adds more
        z, lon = rng.uniform(-1, 1, 2 * wanted), rng.uniform(-180, 180, 2 * wanted)
        cells = latlng_to_cells(np.degrees(np.arcsin(z)), lon, res)
        if keep is not None:
            cells = cells[in_sorted(keep, cells)]
        found = np.union1d(found, cells)
        if len(found) >= wanted:
            break
    chosen = rng.permutation(found)[:wanted]
    return np.sort(chosen[RECALL_QUERIES:]), np.sort(chosen[:RECALL_QUERIES])


def train_relpath(res: int) -> str:
    return f"{fmt.BUILD_DIR}/index/res={res}/trained.faiss"


def queries_relpath(res: int) -> str:
    return f"{fmt.BUILD_DIR}/index/res={res}/queries.npz"


def lists_relpath(res: int, key: str) -> str:
    return f"{fmt.BUILD_DIR}/index/res={res}/part-{key}.lists"


EncodeCells = Callable[[NDArray[np.uint64]], NDArray[np.float32]]  # cells -> their unit vectors, as stored


def train(dataset: Store, res: int, n: int, dim: int, stored_bytes: int, vectors_of: EncodeCells,
          keep: NDArray[np.uint64] | None = None) -> dict[str, Any]:
    """Train resolution ``res``'s IVF-PQ index on a sample whose unit vectors ``vectors_of``
    gives (as stored); save it and the held-out queries; returns the step's done record."""
    faiss = vector_index.require_faiss()
    start = time.perf_counter()
    nlist = vector_index.ivf_lists(n)
    m = pq_subquantizers(dim, stored_bytes)
    train_cells, query_cells = ivf_sample(res, min(max(n - RECALL_QUERIES, 1), max(40 * nlist, PQ_TRAIN_POINTS)),
                                          keep)
    kinds = probes.probe_cells(res, query_cells, keep)
    vectors = vectors_of(np.concatenate([train_cells, *kinds.values()]))
    queries = probes.make_probes(kinds, vectors[len(train_cells):], res)
    queries = replace(queries, floor=score_floor(queries, train_cells, vectors[:len(train_cells)]))
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.do_polysemous_training = False  # Hamming-filtered search is not used: it would double the training
    if len(train_cells) < PQ_TRAIN_POINTS:  # a small resolution: fewer points than faiss asks for, knowingly
        ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1
    if _gpus(faiss) > 0:  # k-means on the GPUs; the trained index comes back
        gpu = faiss.index_cpu_to_all_gpus(index)
        gpu.train(vectors[:len(train_cells)])
        index = faiss.index_gpu_to_cpu(gpu)
    else:
        index.train(vectors[:len(train_cells)])
    with dataset.staged(train_relpath(res)) as tmp:
        faiss.write_index(index, str(tmp))
        trained = fmt.file_record(Path(), train_relpath(res), local=tmp)
    with dataset.staged(queries_relpath(res)) as tmp:
        tmp.write_bytes(queries.to_bytes())
        saved = fmt.file_record(Path(), queries_relpath(res), local=tmp)
    return {"type": f"IVF{nlist},PQ{m}", "nlist": nlist, "trained": trained, "queries": saved,
            "query_kinds": {kind: int((queries.kinds == kind).sum()) for kind in probes.KINDS},
            "train_points": len(train_cells),
            "train_s": round(time.perf_counter() - start, 2)}


def score_floor(queries: probes.Probes, cells: NDArray[np.uint64], vectors: NDArray[np.float32]) -> NDArray[np.float32]:
    """A score below each query's exact top :data:`TOP_K` over the resolution, from a sample
    of its cells (sorted, with their unit vectors as stored): the sample's k-th best, less
    :data:`FLOOR_MARGIN`; -inf where the sample has fewer cells."""
    top = TopK(queries.vectors, TOP_K, queries.exclusions())
    for start in range(0, len(cells), INDEX_BATCH):
        top.update(vectors[start:start + INDEX_BATCH], cells[start:start + INDEX_BATCH])
    return top.scores() - np.float32(FLOOR_MARGIN)


def complete_top(top: NDArray[np.float32], queries: probes.Probes,
                 tables: Callable[[], Any], unit_vectors_of: Callable[[Any], NDArray[np.float32]]) -> NDArray[np.float32]:
    """The shards' merged top scores (:func:`merged_top`), with those of any query whose
    floor kept fewer than :data:`TOP_K` (the sample's cells stored a rounding further apart
    than :data:`FLOOR_MARGIN`) found again by one exact pass over ``tables()`` (a
    resolution's part tables in cell order; ``unit_vectors_of`` a table's unit vectors)."""
    short = np.flatnonzero(np.isneginf(top[:, 0]) & np.isfinite(queries.floors()))
    if not short.size:
        return top
    log.warning("%d recall queries kept fewer than %d scores above their floor; finding them exactly "
                "in one pass over the part files", len(short), TOP_K)
    some = probes.Probes(queries.vectors[short], queries.kinds[short], queries.cells[short], queries.exclude_km[short])
    exact = TopK(some.vectors, TOP_K, some.exclusions())
    for table in tables():
        exact.update(unit_vectors_of(table), table.column("cell").to_numpy())
    top = top.copy()
    top[short] = exact.best
    return top


@dataclass(frozen=True)
class TrainedIndex:
    """Where a resolution's trained index is: picklable, for the processes that add shards."""

    res: int
    sha256: str  # of trained.faiss: lists are only merged into the index they were encoded by


_TRAINED: dict[tuple[str, int, str], tuple[Any, probes.Probes]] = {}  # this process's, by place
_TRAINED_LOCK = threading.Lock()


def load_trained(dataset: Store, res: int, sha256: str) -> tuple[Any, probes.Probes]:
    """The trained (empty) index and the query set, read once a process."""
    key = (str(dataset), res, sha256)
    with _TRAINED_LOCK:
        if key not in _TRAINED:
            if len(_TRAINED) >= 4:
                _TRAINED.pop(next(iter(_TRAINED)))
            _TRAINED[key] = _read_trained(dataset, res, sha256)
        return _TRAINED[key]


def _gpus(faiss: Any) -> int:
    return getattr(faiss, "get_num_gpus", lambda: 0)()


def _read_trained(dataset: Store, res: int, sha256: str) -> tuple[Any, probes.Probes]:
    import hashlib

    faiss = vector_index.require_faiss()
    data = dataset.read_bytes(train_relpath(res))
    if hashlib.sha256(data).hexdigest() != sha256:
        raise AtlasCorruptError(f"{train_relpath(res)} in {dataset} changed during the build; "
                                "run the build again with --overwrite")
    index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    return index, probes.Probes.from_bytes(dataset.read_bytes(queries_relpath(res)))


def add_shard(dataset: Store, trained: TrainedIndex, key: str, cells: NDArray[np.uint64],
              stored: NDArray[Any], quantizer: Quantizer | None) -> dict[str, Any]:
    """Encode one shard's rows into the trained index and save its inverted lists and the
    queries' exact top-100 scores over them; returns what the shard's done record keeps.

    On GPUs FAISS adds the rows; on CPUs :mod:`builder.ivfpq` encodes them (the same lists,
    with the coarse assignment bounded block by block)."""
    faiss = vector_index.require_faiss()
    empty, queries = load_trained(dataset, trained.res, trained.sha256)
    gpu = faiss.index_cpu_to_all_gpus(faiss.clone_index(empty), _gpu_options(faiss)) if _gpus(faiss) else None
    book = ivfpq.Codebook.of(empty)
    top = TopK(queries.vectors, TOP_K, queries.exclusions(), queries.floors())
    buffer = np.empty((min(len(cells), INDEX_BATCH), stored.shape[1]), np.float32)
    lists = np.empty(len(cells) if gpu is None else 0, np.int64)  # the CPU encoding's, row by row
    codes = np.empty((len(lists), book.code_size), np.uint8)
    for start in range(0, len(cells), INDEX_BATCH):
        values = stored[start:start + INDEX_BATCH]
        unit = unit_vectors(values, quantizer, buffer[:len(values)])
        batch = cells[start:start + INDEX_BATCH]
        balls = ivfpq.balls(unit)
        if gpu is not None:  # the coarse assignment (n x nlist dot products) is most of an add: on the GPUs
            gpu.add_with_ids(unit, batch.astype(np.int64))  # H3 indexes < 2**63
        else:
            lists[start:start + len(batch)], codes[start:start + len(batch)] = ivfpq.encode(book, unit, *balls)
        top.update(unit, batch, balls)
    if gpu is not None:
        sizes, codes, ids = _lists_of(faiss.extract_index_ivf(faiss.index_gpu_to_cpu(gpu)).invlists)
    else:
        order = np.argsort(lists, kind="stable")  # each list in row order, as FAISS appends
        sizes, codes, ids = np.bincount(lists, minlength=book.nlist), codes[order], cells[order].astype(np.int64)
    rel = lists_relpath(trained.res, key)
    with dataset.staged(rel) as tmp:
        ShardLists.write(tmp, sizes, codes, ids, top.best)
        record = fmt.file_record(Path(), rel, local=tmp)
    return {**record, "trained": trained.sha256}


def _gpu_options(faiss: Any) -> Any:
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True  # lookup tables for searching only; the codes are the same
    return options


def _lists_of(invlists: Any) -> tuple[NDArray[np.int64], NDArray[np.uint8], NDArray[np.int64]]:
    """FAISS inverted lists as arrays: every list's size, then the codes and ids, list after list."""
    import faiss

    sizes = np.array([invlists.list_size(i) for i in range(invlists.nlist)], np.int64)
    full = np.flatnonzero(sizes).tolist()  # rev_swig_ptr counts elements: code bytes, int64 ids
    cs = invlists.code_size
    codes = [faiss.rev_swig_ptr(invlists.get_codes(i), int(sizes[i]) * cs) for i in full]
    ids = [faiss.rev_swig_ptr(invlists.get_ids(i), int(sizes[i])) for i in full]
    return (sizes, np.concatenate(codes).reshape(-1, cs) if codes else np.empty((0, cs), np.uint8),
            np.concatenate(ids) if ids else np.empty(0, np.int64))


class TopK:
    """The exact k best inner products of each query over blocks of vectors seen so far.

    The vectors come in cell order, in blocks bounded by balls (:func:`builder.ivfpq.balls`):
    a query scores at most ``q . m + r |q|`` over a block of centre ``m`` and radius ``r``,
    so only the blocks that can beat the query's current k-th best are scored, and only
    those rows merged. While most blocks can (the first vectors seen), all are scored in one
    matrix product. ``exclude`` (as :meth:`builder.probes.Probes.exclusions` gives it): the
    rows whose search excludes the cells within a radius of their own, which are left out
    of their best. ``floor``: scores no better than it are not kept (a bound below each
    query's k-th best over all shards: a shard far from a query's best scores nothing).
    """

    def __init__(self, queries: NDArray[np.float32], k: int,
                 exclude: tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]] | None = None,
                 floor: NDArray[np.float32] | None = None) -> None:
        self.queries, self.k, self.exclude = queries, k, exclude
        self.best = np.full((len(queries), k), -np.inf, dtype=np.float32)  # ascending: column 0 is the k-th
        self.floor = np.full(len(queries), -np.inf, np.float32) if floor is None else floor
        self._norms = np.linalg.norm(queries, axis=1).astype(np.float32)
        self._excluded = {} if exclude is None else {int(r): j for j, r in enumerate(exclude[0])}

    def update(self, vectors: NDArray[np.float32], cells: NDArray[np.uint64] | None = None,
               balls: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None) -> None:
        """Merge the scores of ``vectors`` (rows in cell order, of ``cells``; ``balls``: their
        blocks' as :func:`builder.ivfpq.balls` gives them, when the caller has them)."""
        if self.exclude is not None and cells is None:
            raise ValueError("a query set with exclusions needs the vectors' cells")
        centres, radii = ivfpq.balls(vectors) if balls is None else balls
        reach = self.queries @ centres.T + radii[None, :] * self._norms[:, None] + ivfpq.slack(vectors.shape[1])
        hit = reach > self._kth()[:, None]
        if hit.mean() > ivfpq.DENSE:
            self._update_all(vectors, cells)
            return
        near = _Near(self.exclude, cells) if self.exclude is not None else None
        steps = np.arange(ivfpq.BLOCK)
        for i in np.flatnonzero(hit.any(axis=1)).tolist():
            rows = (np.flatnonzero(hit[i])[:, None] * ivfpq.BLOCK + steps).ravel()
            rows = rows[rows < len(vectors)]
            scores = vectors[rows] @ self.queries[i]
            if near is not None and i in self._excluded:
                scores[near.of(self._excluded[i], rows)] = -np.inf
            self._merge(i, scores)

    def _update_all(self, vectors: NDArray[np.float32], cells: NDArray[np.uint64] | None) -> None:
        scores = self.queries @ vectors.T
        if self.exclude is not None:
            rows, _, _ = self.exclude
            near = _Near(self.exclude, cells)
            scores[rows] = np.where(near.all(), -np.inf, scores[rows])
        for i in np.flatnonzero((scores > self._kth()[:, None]).any(axis=1)).tolist():
            self._merge(i, scores[i])

    def _kth(self) -> NDArray[np.float32]:
        return np.maximum(self.best[:, 0], self.floor)

    def _merge(self, i: int, scores: NDArray[np.float32]) -> None:
        better = scores[scores > max(self.best[i, 0], self.floor[i])]
        if better.size:
            row = np.concatenate([self.best[i], better])
            self.best[i] = np.sort(np.partition(row, row.size - self.k)[-self.k:])

    def scores(self) -> NDArray[np.float32]:
        """The k-th best score of each query (-inf where fewer than k beat its floor)."""
        return self.best[:, 0]


class _Near:
    """Which of a batch's cells lie within the excluded radius of a query's own cell (their
    positions worked out on first use)."""

    def __init__(self, exclude: tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]],
                 cells: NDArray[np.uint64]) -> None:
        _, self.origins, self.limits = exclude
        self.cells = cells
        self._xyz: NDArray[np.float64] | None = None

    @property
    def xyz(self) -> NDArray[np.float64]:
        if self._xyz is None:
            from catalog.cells import cells_to_latlng

            self._xyz = probes.unit_xyz(*cells_to_latlng(self.cells))
        return self._xyz

    def all(self) -> NDArray[np.bool_]:
        return self.origins @ self.xyz.T > self.limits[:, None]

    def of(self, j: int, rows: NDArray[np.int64]) -> NDArray[np.bool_]:
        return self.xyz[rows] @ self.origins[j] > self.limits[j]


class ShardLists:
    """One shard's inverted lists, as :func:`add_shard` saves them and :func:`merge` reads them.

    Layout (little-endian): ``HXLISTS1``, then u64 nlist, code_size, rows, queries, k; then
    the lists' sizes (nlist x i64); the queries' top-k scores (queries x k f32); every code
    (rows x code_size bytes, list after list) and every id (rows x i64, in the same order).
    """

    MAGIC = b"HXLISTS1"
    HEAD = struct.Struct("<8s5Q")

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            head = f.read(self.HEAD.size)
        if len(head) < self.HEAD.size or not head.startswith(self.MAGIC):
            raise AtlasCorruptError(f"{path} is not a shard's inverted lists (truncated or overwritten); "
                                    "delete it and run the build again: the shard's lists are made anew")
        _, self.nlist, self.code_size, self.rows, q, k = self.HEAD.unpack(head)
        offset = self.HEAD.size
        expected = offset + 8 * self.nlist + 4 * q * k + (self.code_size + 8) * self.rows
        if path.stat().st_size != expected:
            raise AtlasCorruptError(f"{path} holds {path.stat().st_size:,} bytes, expected {expected:,}")
        self.sizes = np.fromfile(path, np.int64, self.nlist, offset=offset)
        offset += 8 * self.nlist
        self.top = np.fromfile(path, np.float32, q * k, offset=offset).reshape(q, k)
        offset += 4 * q * k
        self._path, self._offset = path, offset
        self.remap()
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])

    def remap(self) -> None:
        """Map the codes and ids afresh: the pages read so far leave this process's memory."""
        self.codes = np.memmap(self._path, np.uint8, "r", self._offset, (self.rows * self.code_size,))
        self.ids = np.memmap(self._path, np.int64, "r", self._offset + self.rows * self.code_size, (self.rows,))

    @classmethod
    def write(cls, path: Path, sizes: NDArray[np.int64], codes: NDArray[np.uint8], ids: NDArray[np.int64],
              top: NDArray[np.float32]) -> None:
        """Save lists given as their sizes and the codes (rows x code size) and ids of every
        list, list after list."""
        with open(path, "wb") as f:
            f.write(cls.HEAD.pack(cls.MAGIC, len(sizes), codes.shape[1], int(sizes.sum()), *top.shape))
            f.write(np.asarray(sizes, "<i8").tobytes())
            f.write(np.ascontiguousarray(top, np.float32).tobytes())
            f.write(np.ascontiguousarray(codes, np.uint8).tobytes())
            f.write(np.asarray(ids, "<i8").tobytes())

    def list(self, i: int) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        a, b = self.starts[i], self.starts[i + 1]
        return self.codes[a * self.code_size:b * self.code_size], self.ids[a:b]


def merge(out: Path, trained: Any, shards: list[ShardLists]) -> int:
    """Write the IVF index whose lists are the shards' (in the given order) to ``out``, in
    FAISS's ArrayInvertedLists layout, one list of one shard in memory at a time; returns the
    cells written.

    The layout is what ``faiss.write_index`` writes for the trained index with these lists:
    the trained index's bytes (with ``ntotal`` set) up to its empty lists, then ``ilar``,
    nlist, code size, ``full`` and the list sizes, then each list's codes and ids.
    """
    faiss = vector_index.require_faiss()
    ivf = faiss.extract_index_ivf(trained)
    nlist, cs = ivf.nlist, ivf.code_size
    if any(s.nlist != nlist or s.code_size != cs for s in shards):
        raise AtlasCorruptError("a shard's inverted lists were encoded by another index; rebuild with --overwrite")
    sizes = np.sum([s.sizes for s in shards], axis=0, dtype=np.int64) if shards else np.zeros(nlist, np.int64)
    total = int(sizes.sum())
    header = _header_with(trained, total)
    empty_lists = b"ilar" + struct.pack("<2Q", nlist, cs) + b"sprs" + struct.pack("<Q", 0)
    if not header.endswith(empty_lists):
        raise RuntimeError("this FAISS version writes IVF indexes in a layout hexatlas does not know")
    with open(out, "wb") as f:
        f.write(header[:-len(empty_lists)])
        f.write(b"ilar" + struct.pack("<2Q", nlist, cs) + b"full" + struct.pack("<Q", nlist))
        f.write(sizes.astype("<u8").tobytes())
        for i in range(nlist):
            if i % REMAP_LISTS == 0:  # the shards' pages read so far are dropped: memory stays bounded
                for shard in shards:
                    shard.remap()
            if sizes[i]:
                lists = [s.list(i) for s in shards]
                f.writelines(codes for codes, _ in lists)
                f.writelines(ids for _, ids in lists)
    return total


def _header_with(trained: Any, ntotal: int) -> bytes:
    faiss = vector_index.require_faiss()
    index = faiss.clone_index(trained)
    index.ntotal = ntotal  # the lists stay empty: only the count in the header changes
    return faiss.serialize_index(index).tobytes()


def merged_top(shard_tops: list[NDArray[np.float32]]) -> NDArray[np.float32]:
    """Each query's exact :data:`TOP_K` best scores over all shards (best last), from each
    shard's top scores."""
    return np.sort(np.concatenate(shard_tops, axis=1), axis=1)[:, -TOP_K:]



def tune(open_index: Callable[[], Any], queries: probes.Probes, top: NDArray[np.float32],
         vectors_of: vector_index.VectorsOf, expand: bool = True,
         sample: vector_index.Sample | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The cheapest (rerank, nprobe) whose recall@10 reaches the target (lower bound,
    :func:`builder.probes.wilson_bound`) for every unfiltered kind of query, else the one
    whose worst kind is best; then ``nprobe_placed``, the fewest lists (of
    :data:`PLACED_NPROBES`, at most nprobe) with which every unfiltered kind with a cell of its
    own still reaches the target (or does as well as at nprobe); and every kind's recall at that setting.

    Searched as the query layer searches: candidates re-ranked exactly, then (``expand``)
    refined along the grid from them, from other regions, from a cell query's own cell and,
    filtered, from the resolution's ``sample`` (:func:`catalog.vector_index.reranked_search`). ``top``: each query's exact best scores
    over the resolution, best last (as :func:`merged_top` gives them); ``vectors_of`` gives
    the stored unit vectors of the cells the atlas holds, each read once. ``open_index()``
    gives the index, opened afresh every :data:`REOPEN_SEARCHES` searches (a memory-mapped
    index then lets go of the pages of the lists probed before). Returns the
    parameters (``met`` says whether the target was reached, ``recall_lower_bound`` is the
    worst kind's) and :func:`builder.probes.summary`.
    """
    faiss = vector_index.require_faiss()
    known: dict[int, NDArray[np.float32] | None] = {}  # None: a cell the atlas lacks

    def cached(ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        missing = np.array([c for c in ids.tolist() if c not in known], np.int64)
        if missing.size:
            known.update(dict.fromkeys(missing.tolist()))
            found, vectors = vectors_of(missing)
            known.update(zip(found.tolist(), vectors, strict=True))
        held = [c for c in ids.tolist() if known[c] is not None]
        return np.array(held, np.int64), np.stack([known[c] for c in held]) if held else \
            np.empty((0, queries.vectors.shape[1]), np.float32)

    def found(rows: NDArray[np.int64], k: int, rerank: int, nprobe: int,
              placed: int | None = None) -> NDArray[np.float64]:
        scores = np.full((len(rows), k), -np.inf, np.float32)
        for j, i in enumerate(rows.tolist()):
            if j % REOPEN_SEARCHES == 0:
                index = open_index()
                faiss.extract_index_ivf(index).nprobe = nprobe
            own = [np.array([queries.cells[i]], np.int64)] if queries.cells[i] else None
            keep = _outside(queries.cells[i], queries.exclude_km[i]) if queries.exclude_km[i] else None
            scores[j] = vector_index.reranked_search(index, queries.vectors[i:i + 1], k, cached, rerank=rerank,
                                                     expand=expand, seeds=own, keep=keep, sample=sample,
                                                     placed_nprobe=placed)[0][0]
        return probes.found_share(scores, top[rows, -k] if top.shape[1] >= k else np.full(len(rows), -np.inf))

    nlist = faiss.extract_index_ivf(open_index()).nlist
    tuned = np.flatnonzero(~np.isin(queries.kinds, probes.FILTERED))
    kinds = queries.kinds[tuned]
    best: tuple[float, dict[str, Any], NDArray[np.float64]] = (-1.0, {}, np.empty(0))
    for rerank in RERANKS:
        stale, ladder = 0, -1.0  # this re-rank depth's best so far
        for nprobe in NPROBES:
            if nprobe > nlist or stale >= 2:  # probing more lists stopped helping: re-rank more
                break
            share = found(tuned, RECALL_K, rerank, nprobe)
            bounds = {kind: probes.wilson_bound(float(share[kinds == kind].mean()), int((kinds == kind).sum()))
                      for kind in np.unique(kinds).tolist()}
            worst = min(bounds.values())
            log.debug("nprobe %d, re-rank x%d: recall@10 lower bounds %s", nprobe, rerank,
                      ", ".join(f"{kind} {b:.3f}" for kind, b in bounds.items()))
            params = {"nprobe": nprobe, "rerank": rerank, "recall_lower_bound": round(worst, 4),
                      "met": worst >= RECALL_TARGET}
            stale = 0 if worst > ladder + 0.002 else stale + 1
            ladder = max(ladder, worst)
            if worst > best[0]:
                best = (worst, params, share)
            if params["met"]:
                break
        if best[1].get("met"):
            break
    _, params, share = best
    placed = queries.cells[tuned] != 0
    params["nprobe_placed"], placed_share = _placed_nprobe(tuned[placed], share[placed], params, queries.kinds,
                                                           found)
    # recall@10 at the chosen setting: the tuned kinds' as the ladder and _placed_nprobe found
    # it, the filtered kinds' searched now
    at_10 = np.empty(len(queries))
    at_10[tuned] = share
    at_10[tuned[placed]] = placed_share
    filtered = np.flatnonzero(np.isin(queries.kinds, probes.FILTERED))
    setting = (params["rerank"], params["nprobe"], params["nprobe_placed"])
    at_10[filtered] = found(filtered, RECALL_K, *setting)
    at_100 = found(np.arange(len(queries)), TOP_K, *setting)
    return params, probes.summary(queries.kinds, at_10, at_100)


def _placed_nprobe(rows: NDArray[np.int64], share: NDArray[np.float64], params: dict[str, Any],
                   kinds: NDArray[Any],
                   found: Callable[..., NDArray[np.float64]]) -> tuple[int, NDArray[np.float64]]:
    """The fewest lists with which the queries ``rows`` (each with a cell of its own) reach
    the target for every kind, or their worst kind's bound at ``params``'s nprobe (``share``:
    each row's recall@10 there, as the tuning found it), and each row's recall@10 with them."""
    nprobe, rerank = params["nprobe"], params["rerank"]
    if not rows.size:
        return nprobe, share

    def worst(share: NDArray[np.float64]) -> float:
        return min(probes.wilson_bound(float(share[kinds[rows] == kind].mean()), int((kinds[rows] == kind).sum()))
                   for kind in np.unique(kinds[rows]).tolist())

    floor = min(RECALL_TARGET, worst(share))
    for fewer in (p for p in PLACED_NPROBES if p < nprobe):
        got = found(rows, RECALL_K, rerank, nprobe, fewer)
        bound = worst(got)
        log.debug("placed queries at nprobe %d: recall@10 lower bound %.3f", fewer, bound)
        if bound >= floor:
            return fewer, got
    return nprobe, share


def _outside(cell: int, km: float) -> vector_index.Keep:
    """Whether cells lie at least ``km`` from ``cell``'s centre (``exclude_within_km``)."""
    from catalog.cells import cells_to_latlng
    from catalog.interpolation import haversine_km

    lat0, lon0 = (float(v[0]) for v in cells_to_latlng(np.array([cell], np.uint64)))

    def keep(ids: NDArray[np.int64]) -> NDArray[np.bool_]:
        return haversine_km(*cells_to_latlng(ids.astype(np.uint64)), lat0, lon0) >= km

    return keep
