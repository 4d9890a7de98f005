"""Finishing one resolution: its Zarr store and FAISS index, from the shards in cell order.

Both take the shards one at a time: :class:`ZarrRows` copies them into whole-chunk blocks,
:class:`IndexBuilder` adds their unit vectors to an index trained beforehand on a sample
of cells spread over the sphere. A local build feeds them each shard as it is written, so
they overlap the encoder; a resumed or distributed build feeds them afterwards from
:class:`ShardSource` (the published part files). Besides the index
itself they hold one shard and one Zarr block at a time, in buffers allocated once, so
memory does not grow with the resolution (res 7 has 99M cells) and few fresh pages are
touched (first touches are a large part of these stages' cost).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from builder import encode
from builder._timing import Timer, progress_bar
from builder.grid import cell_centers
from builder.plan import BuildState
from builder.write import ShardJob
from catalog import manifest as fmt
from catalog.errors import AtlasCorruptError
from catalog.storage import Store, settle
from catalog.tables import embedding_matrix

if TYPE_CHECKING:
    from builder.encode import Quantizer
    from builder.encoders._base import Encoder
    from catalog.blocks import ResolutionReader

__all__ = ["Finisher", "IndexBuilder", "ShardSource", "ZarrRows", "finish_resolution", "finishing", "ivf_sample"]

log = logging.getLogger(__name__)

ZARR_CHUNK_CELLS = 4096
ZARR_BLOCK_CELLS = 64 * ZARR_CHUNK_CELLS  # cells per Zarr write: whole chunks, one buffer
INDEX_BATCH = 65536  # cells per index add: the unit vectors' buffer is this many rows
RECALL_TARGET = 0.95
RECALL_K = 10
RECALL_QUERIES = 100
RERANKS = (4, 16)  # candidates per result re-ranked exactly, tried in this order
NPROBES = (4, 8, 16, 32, 64, 128, 256)
# Codes of 8 bits a dimension (SQ8) while they take at most this many bytes; above, product
# quantisation with one byte per 8 dimensions (PQ), 8x smaller: SQ8 for a resolution-7 land
# SatCLIP atlas would hold 7.4 GB in the build (and in every process that searches it).
SQ8_MAX_BYTES = 1 << 30
PQ_TRAIN_POINTS = 39 * 256
# An index that misses the recall target is replaced by an exact one only up to this size.
FLAT_MAX_BYTES = 2 << 30


class ShardSource:
    """One resolution's part files in cell order: replayed whole, or read in place by cell.

    Parameters
    ----------
    dataset : Store
    records : list of dict, or a callable returning them
        The done records of the resolution's shards (those with rows), in cell order; a
        callable is asked when the files are first read (a local build's last shards are
        still being written when the source is made).
    dim, precision :
        The embeddings' length and storage.
    quantizer : Quantizer, optional
        For int8 datasets: how stored values map back to floats.
    """

    def __init__(self, dataset: Store, records: list[dict[str, Any]] | Callable[[], list[dict[str, Any]]],
                 dim: int, precision: str, quantizer: Quantizer | None = None) -> None:
        self.dataset, self._records, self.dim, self.precision = dataset, records, dim, precision
        self.quantizer = quantizer
        self._buffer: NDArray[np.float32] | None = None  # reused by unit_vectors
        self._reader: ResolutionReader | None = None

    def records(self) -> list[dict[str, Any]]:
        return self._records() if callable(self._records) else self._records

    def tables(self, columns: tuple[str, ...] = ("cell", "embedding")) -> Iterator[pa.Table]:
        import pyarrow.parquet as pq

        fs, root = self.dataset.filesystem()
        for record in self.records():
            yield pq.read_table(f"{root}/{record['path']}", columns=list(columns), filesystem=fs)

    def unit_vectors(self, values: pa.Table | NDArray[Any], rows: NDArray[np.intp] | None = None
                     ) -> NDArray[np.float32]:
        """Stored embeddings (a table's, or a matrix; only ``rows`` when given) as unit-length
        float32, C-contiguous.

        The result lives in a buffer reused by the next call: copy it to keep it.
        """
        from catalog.vector_index import normalize

        if isinstance(values, pa.Table):
            values = embedding_matrix(values.column("embedding"))
        if rows is not None:
            values = values[rows]
        n, dim = values.shape
        if self._buffer is None or self._buffer.shape[0] < n or self._buffer.shape[1] != dim:
            self._buffer = np.empty((max(n, 1), dim), dtype=np.float32)
        out = self._buffer[:n]
        _to_float32(values, out)
        if self.quantizer is not None:
            self.quantizer.decode(out, out=out)
        return normalize(out, out=out)

    def gather_cells(self, wanted: NDArray[Any]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Cells (as int64) and unit vectors of those of ``wanted`` that the parts hold, read
        in place: only the blocks that hold them, each checked against its CRC."""
        from catalog.blocks import STORED_DTYPES, ResolutionReader, part_infos

        wanted = np.unique(np.asarray(wanted).astype(np.uint64))
        if self._reader is None:
            records = self.records()
            files = {f["path"]: f for r in records for f in r["files"]}
            self._reader = ResolutionReader(self.dataset, part_infos({"parts": records}, files), self.dim,
                                            self.precision, str(self.dataset), cache_bytes=64 << 20)
        stored = np.empty((len(wanted), self.dim), STORED_DTYPES[self.precision])
        found = self._reader.gather(wanted, stored)
        if not found.any():
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return wanted[found].astype(np.int64), self.unit_vectors(stored[found]).copy()

    def release(self) -> None:
        self._buffer = self._reader = None


def _to_float32(values: NDArray[Any], out: NDArray[np.float32]) -> None:
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


class ZarrRows:
    """``zarr/res=<r>.zarr`` (xdggs layout) written from a resolution's rows, added in cell order.

    xarray writes the layout (zero-length variables with their attributes and chunking) on
    the first rows; the data go in with zarr, in blocks of whole chunks, each chunk file
    checksummed as soon as its block is written (and, when built in place, settled to disk).
    Use :meth:`staged`: the store is built in a local directory (beside the destination, or a
    temporary one for object storage) and published only when all ``n`` rows are in.
    """

    def __init__(self, path: Path, res: int, n: int, quantizer: Quantizer | None, settle_chunks: bool = False) -> None:
        self.path, self.res, self.n, self.quantizer = path, res, n, quantizer
        self.settle_chunks = settle_chunks  # the store is built where it is published (not staged for upload)
        self.files: list[dict[str, Any]] = []
        self._arrays: dict[str, Any] = {}
        self._block: dict[str, NDArray[Any]] = {}
        self._chunks: dict[str, dict[str, Any]] = {}  # chunk files written so far: path in the store -> record
        self._start = self._filled = 0

    @classmethod
    @contextlib.contextmanager
    def staged(cls, dataset: Store, res: int, n: int, quantizer: Quantizer | None) -> Iterator[ZarrRows]:
        """Yield a writer; on leaving, check the count, consolidate, and publish (``.files`` is then set)."""
        import zarr

        rel = fmt.zarr_relpath(res)
        with dataset.staged_dir(rel) as tmp:
            rows = cls(tmp, res, n, quantizer, settle_chunks=dataset.is_local)
            yield rows
            rows._flush()
            if rows._start != n or not rows._arrays:
                raise AtlasCorruptError(f"resolution {res}'s shards hold {rows._start:,} cells, expected {n:,}")
            zarr.consolidate_metadata(str(tmp))
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    key = p.relative_to(tmp).as_posix()
                    record = rows._chunks.get(key) or fmt.file_record(Path(), key, local=p)
                    rows.files.append({**record, "path": f"{rel}/{key}"})

    def add(self, table: pa.Table) -> None:
        from catalog.cells import cells_to_latlng

        values = embedding_matrix(table.column("embedding"))
        cells = table.column("cell").to_numpy()
        lat, lon = cells_to_latlng(cells)  # the store does not keep the centres; xarray users want them
        columns = {"embedding": values, "cell_ids": cells, "lat": lat, "lon": lon}
        if not self._arrays:
            self._arrays = _zarr_layout(self.path, self.res, self.n, values.shape[1], values.dtype, self.quantizer)
            self._block = {name: np.empty((min(self.n, ZARR_BLOCK_CELLS),) + col.shape[1:], col.dtype)
                           for name, col in columns.items()}
        if self._start + self._filled + len(values) > self.n:
            raise AtlasCorruptError(f"resolution {self.res}'s shards hold more than the {self.n:,} cells expected")
        size, taken = len(self._block["embedding"]), 0
        while taken < len(values):
            step = min(len(values) - taken, size - self._filled)
            for name, col in columns.items():
                self._block[name][self._filled:self._filled + step] = col[taken:taken + step]
            self._filled, taken = self._filled + step, taken + step
            if self._filled == size:
                self._flush()

    def _flush(self) -> None:
        stop = self._start + self._filled
        for name, array in self._arrays.items():
            array[self._start:stop] = self._block[name][:self._filled]
            # the block's chunks are whole and final: checksum each while it is cached, then settle it
            for i in range(self._start // ZARR_CHUNK_CELLS, -(-stop // ZARR_CHUNK_CELLS)):
                key = f"{name}/{array.metadata.encode_chunk_key((i,) + (0,) * (array.ndim - 1))}"
                self._chunks[key] = fmt.file_record(Path(), key, local=self.path / key)
                if self.settle_chunks:
                    settle(self.path / key)
        self._start, self._filled = stop, 0


def _zarr_layout(path: Path, res: int, n: int, dim: int, dtype: np.dtype,
                 quantizer: Quantizer | None) -> dict[str, Any]:
    """Create the store's variables (as xarray lays them out) with ``n`` cells; returns the zarr arrays."""
    import json

    import xarray as xr
    import zarr

    empty = xr.Dataset(
        {"embedding": (("cell_ids", "dim"), np.empty((0, dim), dtype))},
        coords={
            "cell_ids": ("cell_ids", np.empty(0, np.uint64), {"grid_name": "h3", "level": res}),
            "lat": ("cell_ids", np.empty(0, np.float64)),
            "lon": ("cell_ids", np.empty(0, np.float64)),
        },
        attrs={"hexatlas_res": res, **({"quantization": json.dumps(quantizer.to_dict())} if quantizer else {})},
    )
    encoding = {"embedding": {"chunks": (ZARR_CHUNK_CELLS, dim)},
                **{c: {"chunks": (ZARR_CHUNK_CELLS,)} for c in ("cell_ids", "lat", "lon")}}
    empty.to_zarr(path, mode="w", encoding=encoding, zarr_format=2, consolidated=False)
    group = zarr.open_group(str(path), mode="r+", zarr_format=2)
    # every chunk holds data: skip zarr's per-chunk "all fill value?" scan (NaN-aware, slow)
    arrays = {name: group[name].with_config({"write_empty_chunks": True})
              for name in ("embedding", "cell_ids", "lat", "lon")}
    for array in arrays.values():
        array.resize((n,) + array.shape[1:])
    return arrays


def ivf_sample(res: int, count: int, keep: NDArray[np.uint64] | None = None) -> tuple[
        NDArray[np.uint64], NDArray[np.uint64]]:
    """``count`` distinct cells of resolution ``res`` under uniformly random points on the sphere
    (only cells in the sorted ``keep``, when given), and :data:`RECALL_QUERIES` of them.

    What an IVF index trains on and its recall is measured with. Chosen by position, not by
    row, so that a build can encode them before any shard is written. Returns both sorted.
    """
    from catalog.cells import latlng_to_cells

    rng = np.random.default_rng(res)
    found = np.empty(0, np.uint64)
    for _ in range(100):  # land-only keeps ~30% of the points; each round adds more
        z, lon = rng.uniform(-1, 1, 2 * count), rng.uniform(-180, 180, 2 * count)
        cells = latlng_to_cells(np.degrees(np.arcsin(z)), lon, res)
        if keep is not None:
            pos = np.minimum(np.searchsorted(keep, cells), len(keep) - 1)
            cells = cells[keep[pos] == cells]
        found = np.union1d(found, cells)
        if len(found) >= count:
            break
    chosen = rng.permutation(found)[:count]
    return np.sort(chosen), np.sort(chosen[:RECALL_QUERIES])


VectorsOf = Callable[[NDArray[np.uint64]], tuple[NDArray[np.int64], NDArray[np.float32]]]


class IndexBuilder:
    """The FAISS index of one resolution (cosine over unit vectors, ids = cells), filled shard by shard.

    Exact (flat) up to :data:`catalog.vector_index.EXACT_MAX_CELLS` cells. Above, IVF with
    SQ8 codes (PQ codes where SQ8's would pass :data:`SQ8_MAX_BYTES`), trained on
    :func:`ivf_sample` cells, whose vectors ``vectors_of`` supplies (as stored), before the
    first :meth:`add`; :meth:`publish` then picks the cheapest re-rank depth and nprobe whose
    recall@10 (re-ranked, as the query layer searches) reaches 0.95 against exact search on
    100 of those cells, else an exact index where one fits in :data:`FLAT_MAX_BYTES`, else
    the best setting found, with its recall recorded and a warning. Built on the GPUs where
    faiss-gpu sees any.
    """

    def __init__(self, res: int, n: int, dim: int, vectors_of: VectorsOf,
                 keep: NDArray[np.uint64] | None = None) -> None:
        from catalog import vector_index

        start = time.perf_counter()
        self.faiss = vector_index.require_faiss()
        self.res, self.n, self.dim = res, n, dim
        self.added = 0
        self.seconds = 0.0  # in this object: training, adding, tuning, writing (not the sample's encoding)
        self.kth: _KthBest | None = None
        self._on_gpus = False
        if n <= vector_index.EXACT_MAX_CELLS:
            self.index = _flat_index(self.faiss, dim)
            return
        self.nlist = vector_index.ivf_lists(n)
        self.codes = "SQ8" if n * dim <= SQ8_MAX_BYTES or dim % 8 else f"PQ{dim // 8}"
        # PQ trains 256 centroids per sub-vector: faiss wants 39 points per centroid
        sample = max(40 * self.nlist, PQ_TRAIN_POINTS if self.codes != "SQ8" else 0)
        train_cells, query_cells = ivf_sample(res, min(n, sample), keep)
        self.seconds += time.perf_counter() - start
        ids, train = vectors_of(train_cells)
        start = time.perf_counter()
        self.queries = np.ascontiguousarray(train[np.isin(ids, query_cells.astype(np.int64))])
        self.index = self.faiss.index_factory(dim, f"IVF{self.nlist},{self.codes}", self.faiss.METRIC_INNER_PRODUCT)
        if getattr(self.faiss, "get_num_gpus", lambda: 0)() > 0:
            self.index, self._on_gpus = self.faiss.index_cpu_to_all_gpus(self.index), True
        self.index.train(train)
        self.kth = _KthBest(self.queries, RECALL_K)
        self.seconds += time.perf_counter() - start

    def add(self, cells: NDArray[np.uint64], unit: NDArray[np.float32]) -> None:
        if self.added + len(cells) > self.n:
            raise AtlasCorruptError(f"resolution {self.res}'s shards hold more than the {self.n:,} cells expected")
        start = time.perf_counter()
        self.index.add_with_ids(unit, cells.astype(np.int64))  # H3 indexes < 2**63
        if self.kth is not None:
            self.kth.update(unit)
        self.added += len(cells)
        self.seconds += time.perf_counter() - start

    def publish(self, dataset: Store, source: ShardSource) -> tuple[dict[str, Any], dict[str, Any]]:
        """Tune, write ``index/res=<r>.faiss``; returns its description and file record.

        ``source`` supplies the stored vectors of candidates (and all of them again should
        the approximate index miss its target).
        """
        start = time.perf_counter()
        if self.added != self.n:
            raise AtlasCorruptError(f"resolution {self.res}'s shards hold {self.added:,} cells, expected {self.n:,}")
        params: dict[str, Any] | None = None
        recall = 1.0
        if self.kth is None:
            params = {"type": "IDMap2,Flat", "exact": True, "rerank": 1}
        else:
            if self._on_gpus:
                self.index = self.faiss.index_gpu_to_cpu(self.index)
            params, recall = self._tune(source)
            if not params["met"] and self.n * self.dim * 4 > FLAT_MAX_BYTES:
                log.warning("IVF%d,%s reached recall@%d %.3f < %.2f at res %d; an exact index would not fit, "
                            "keeping the best setting", self.nlist, self.codes, RECALL_K, recall, RECALL_TARGET,
                            self.res)
            elif not params["met"]:
                log.warning("IVF%d,%s reached recall@%d %.3f < %.2f at res %d; keeping an exact index",
                            self.nlist, self.codes, RECALL_K, recall, RECALL_TARGET, self.res)
                self.index = _flat_index(self.faiss, self.dim)
                for table in source.tables(("cell", "embedding")):
                    cells = table.column("cell").to_numpy().astype(np.int64)
                    self.index.add_with_ids(source.unit_vectors(table), cells)
                params, recall = {"type": "IDMap2,Flat", "exact": True, "rerank": 1}, 1.0
            params.pop("met", None)
        rel = fmt.index_relpath(self.res)
        params.update({"metric": "inner_product", "recall_at_10": round(recall, 4), "normalized": True,
                       "build_s": round(self.seconds + time.perf_counter() - start, 2), "path": rel,
                       "cells": self.n})
        with dataset.staged(rel) as tmp:
            self.faiss.write_index(self.index, str(tmp))
            file = fmt.file_record(Path(), rel, local=tmp)
        return params, file

    def _tune(self, source: ShardSource) -> tuple[dict[str, Any], float]:
        from catalog.vector_index import reranked_search

        exact: dict[int, NDArray[np.float32]] = {}

        def lookup(cand: NDArray[np.int64]) -> NDArray[np.float32]:
            return np.stack([exact[c] for c in cand.tolist()])

        ivf = self.faiss.extract_index_ivf(self.index)
        best: tuple[float, dict[str, Any]] = (-1.0, {})
        for rerank in RERANKS:
            for nprobe in NPROBES:
                ivf.nprobe = nprobe
                _, cand = self.index.search(self.queries, RECALL_K * rerank)
                missing = np.setdiff1d(cand[cand >= 0], np.fromiter(exact, np.int64, len(exact)))
                if missing.size:
                    ids, vectors = source.gather_cells(missing)
                    exact.update(zip(ids.tolist(), vectors, strict=True))
                found, _ = reranked_search(self.index, self.queries, RECALL_K, lookup, rerank=rerank)
                # a hit is a result whose exact score reaches the true k-th score: ties are not misses
                recall = float(np.mean(found >= self.kth.scores()[:, None] - 1e-6))
                params = {"type": f"IVF{self.nlist},{self.codes}", "exact": False, "nlist": self.nlist,
                          "nprobe": nprobe, "rerank": rerank, "met": recall >= RECALL_TARGET}
                if recall > best[0]:
                    best = (recall, params)
                if params["met"]:
                    return params, recall
        return best[1], best[0]


def _flat_index(faiss: Any, dim: int) -> Any:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


class _KthBest:
    """The exact k-th best inner product of each query over blocks of vectors seen so far.

    Per block, one matrix product and one comparison with the current k-th best: after the
    first blocks few scores beat it, and only those rows are merged.
    """

    def __init__(self, queries: NDArray[np.float32], k: int) -> None:
        self.queries, self.k = queries, k
        self.best = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self._scores = np.empty(0, np.float32)

    def update(self, vectors: NDArray[np.float32]) -> None:
        size = len(self.queries) * len(vectors)
        if self._scores.size < size:
            self._scores = np.empty(size, np.float32)
        scores = self._scores[:size].reshape(len(self.queries), len(vectors))
        np.matmul(self.queries, vectors.T, out=scores)
        better = scores > self.best[:, :1]  # best is kept sorted ascending: column 0 is the k-th
        for i in np.flatnonzero(better.any(axis=1)):
            row = np.concatenate([self.best[i], scores[i, better[i]]])
            self.best[i] = np.sort(np.partition(row, row.size - self.k)[-self.k:])

    def scores(self) -> NDArray[np.float32]:
        return self.best[:, 0]


class Finisher:
    """A resolution's Zarr rows and index (each None when an earlier run finished it), fed
    shard tables in cell order."""

    def __init__(self, zarr_rows: ZarrRows | None, index: IndexBuilder | None, source: ShardSource,
                 timer: Timer) -> None:
        self.zarr_rows, self.index, self.source, self.timer = zarr_rows, index, source, timer

    def add(self, table: pa.Table, stored: NDArray[Any] | None = None) -> None:
        """Add a shard's rows; ``stored``: its embeddings as a writeable array, when at hand."""
        if self.zarr_rows is not None:
            with self.timer("zarr"):
                self.zarr_rows.add(table)
        if self.index is not None:
            with self.timer("index"):
                cells = table.column("cell").to_numpy()
                values = embedding_matrix(table.column("embedding")) if stored is None else stored
                for start in range(0, len(cells), INDEX_BATCH):  # float32 copies of a slice, not a shard
                    self.index.add(cells[start:start + INDEX_BATCH],
                                   self.source.unit_vectors(values[start:start + INDEX_BATCH]))


@contextlib.contextmanager
def finishing(res: int, n: int, encoder: Encoder, job: ShardJob, keep: NDArray[np.uint64] | None,
               state: BuildState, timer: Timer, source: ShardSource) -> Iterator[Finisher | None]:
    """The Zarr store and FAISS index of one resolution of ``n`` cells, from the shard tables
    the block feeds in cell order; when the block ends each is published and recorded as done.

    What an earlier run finished is kept (None is yielded when that is both). A local build
    feeds each shard as it is written; otherwise the caller replays ``source``.
    """
    dataset = job.dataset
    zarr_done = not job.zarr or (state.done(f"zarr-res={res}") is not None
                                 and dataset.exists(f"{fmt.zarr_relpath(res)}/.zmetadata"))
    index_done = state.done(f"index-res={res}") is not None and dataset.exists(fmt.index_relpath(res))
    if zarr_done and index_done:
        yield None
        source.release()
        return
    quantizer = job.quantizer()

    def vectors_of(cells: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        # the index's training sample, encoded now and stored as the shards are
        lat, lon = cell_centers(cells)
        stored = encode.encode_stored(encoder, lat, lon, job.precision, quantizer)
        return cells.astype(np.int64), source.unit_vectors(stored).copy()

    index = None
    if not index_done:
        with timer("index"):
            index = IndexBuilder(res, n, encoder.dim, vectors_of, keep)
    with (contextlib.nullcontext() if zarr_done else ZarrRows.staged(dataset, res, n, quantizer)) as zarr_rows:
        yield Finisher(zarr_rows, index, source, timer)
    if zarr_rows is not None:
        state.mark(f"zarr-res={res}", {"files": zarr_rows.files})
    if index is not None:
        with timer("index"):
            params, file = index.publish(dataset, source)
        state.mark(f"index-res={res}", {"index": params, "file": file})
    source.release()


def finish_resolution(res: int, records: list[dict[str, Any]], encoder: Encoder, job: ShardJob,
                      keep: NDArray[np.uint64] | None, state: BuildState, timer: Timer,
                      progress: bool | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A resolution's manifest entry and file records, once its shards are written.

    A resolution whose index (or Zarr face) was not streamed while its shards were written
    (a Ray or resumed build) is finished here, by streaming its part files in cell order:
    one part at a time in memory.
    """
    from catalog.blocks import block_rows

    cells = sum(r["rows"] for r in records)
    files = [f for r in records for f in r["files"]]
    info = {"cells": cells, "block_rows": block_rows(encoder.dim, job.precision),
            "parts": [{k: r[k] for k in ("path", "blocks", "rows", "first_cell", "last_cell")} for r in records]}
    source = ShardSource(job.dataset, records, encoder.dim, job.precision, job.quantizer())
    with finishing(res, cells, encoder, job, keep, state, timer, source) as finish:
        if finish is not None:
            with timer("read back"), progress_bar(progress, cells, f"finish res {res}") as bar:
                for table in source.tables():  # the Zarr and index time is their own
                    finish.add(table)
                    bar.update(table.num_rows)
    zarr_done, index_done = state.done(f"zarr-res={res}"), state.done(f"index-res={res}")
    info["zarr"], info["index"] = (fmt.zarr_relpath(res) if job.zarr else None), index_done["index"]
    files += (zarr_done["files"] if job.zarr else []) + [index_done["file"]]
    return info, files
