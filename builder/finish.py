"""Finishing one resolution: its FAISS index and (opt-in) Zarr store, once its shards are written.

The index is built shard by shard (:mod:`builder.index`): trained before the shards, each
shard's inverted lists saved where it was encoded, merged and tuned here. :class:`ZarrRows`
copies the shards, in cell order, into whole-chunk blocks: a local build feeds it each shard
as it is written, so it overlaps the encoder; a resumed or distributed build feeds it
afterwards from :class:`ShardSource` (the published part files). Either holds one shard or
one list at a time, so memory does not grow with the resolution (res 7 has 99M cells).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from numpy.typing import NDArray

from builder import encode, index, probes
from builder._timing import Timer, progress_bar
from builder.grid import cell_centers
from builder.plan import BuildState, shard_step
from builder.write import ShardJob
from catalog import manifest as fmt
from catalog import vector_index
from catalog.cells import cells_to_parent
from catalog.errors import AtlasCorruptError
from catalog.storage import Store, settle
from catalog.tables import embedding_matrix

if TYPE_CHECKING:
    from builder.encode import Quantizer
    from builder.encoders._base import Encoder
    from catalog.blocks import ResolutionReader

__all__ = ["Finisher", "ShardSource", "ZarrRows", "finish_index", "finish_map", "finish_resolution", "finishing",
           "train_index"]

log = logging.getLogger(__name__)

ZARR_CHUNK_CELLS = 4096
ZARR_BLOCK_CELLS = 64 * ZARR_CHUNK_CELLS  # cells per Zarr write: whole chunks, one buffer


class ShardSource:
    """One resolution's part files in cell order: replayed whole, or read in place by cell.

    Parameters
    ----------
    dataset : Store
    records : list of dict
        The done records of the resolution's shards (those with rows), in cell order.
    dim, precision :
        The embeddings' length and storage.
    quantizer : Quantizer, optional
        For int8 datasets: how stored values map back to floats.
    """

    def __init__(self, dataset: Store, records: list[dict[str, Any]], dim: int, precision: str,
                 quantizer: Quantizer | None = None) -> None:
        self.dataset, self.records, self.dim, self.precision = dataset, records, dim, precision
        self.quantizer = quantizer
        self._buffer: NDArray[np.float32] | None = None  # reused by unit_vectors
        self._reader: ResolutionReader | None = None

    def table(self, record: dict[str, Any]) -> pa.Table:
        """One shard's part file, whole."""
        return self.read(record, ["cell", "embedding"])

    def read(self, record: dict[str, Any], columns: list[str]) -> pa.Table:
        """These columns of one shard's part file."""
        import pyarrow.parquet as pq

        fs, root = self.dataset.filesystem()
        return pq.read_table(f"{root}/{record['path']}", columns=columns, filesystem=fs)

    def tables(self) -> Iterator[pa.Table]:
        return map(self.table, self.records)

    def unit_vectors(self, values: pa.Table | NDArray[Any]) -> NDArray[np.float32]:
        """Stored embeddings (a table's, or a matrix) as unit-length float32, C-contiguous.

        The result lives in a buffer reused by the next call: copy it to keep it.
        """
        if isinstance(values, pa.Table):
            values = embedding_matrix(values.column("embedding"))
        n, dim = values.shape
        if self._buffer is None or self._buffer.shape[0] < n or self._buffer.shape[1] != dim:
            self._buffer = np.empty((max(n, 1), dim), dtype=np.float32)
        return index.unit_vectors(values, self.quantizer, self._buffer[:n])

    def _resolution_reader(self) -> ResolutionReader:
        from catalog.blocks import ResolutionReader, part_infos

        if self._reader is None:
            files = {f["path"]: f for r in self.records for f in r["files"]}
            self._reader = ResolutionReader(self.dataset, part_infos({"parts": self.records}, files), self.dim,
                                            self.precision, str(self.dataset), cache_bytes=64 << 20)
        return self._reader

    def gather_cells(self, wanted: NDArray[Any]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """Cells (as int64) and unit vectors of those of ``wanted`` that the parts hold, read
        in place: only the blocks that hold them, each checked against its CRC."""
        from catalog.blocks import STORED_DTYPES

        wanted = np.unique(np.asarray(wanted).astype(np.uint64))
        stored = np.empty((len(wanted), self.dim), STORED_DTYPES[self.precision])
        found = self._resolution_reader().gather(wanted, stored)
        if not found.any():
            return np.empty(0, np.int64), np.empty((0, self.dim), np.float32)
        return wanted[found].astype(np.int64), self.unit_vectors(stored[found]).copy()

    def release(self) -> None:
        self._buffer = self._reader = None


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
    def staged(cls, dataset: Store, res: int, n: int, quantizer: Quantizer | None,
               generation: int = 0) -> Iterator[ZarrRows]:
        """Yield a writer; on leaving, check the count, consolidate, and publish (``.files`` is then set)."""
        import zarr

        rel = fmt.zarr_relpath(res, generation)
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


class Finisher:
    """A resolution's Zarr rows, fed shard tables in cell order."""

    def __init__(self, zarr_rows: ZarrRows, timer: Timer) -> None:
        self.zarr_rows, self.timer = zarr_rows, timer

    def add(self, table: pa.Table) -> None:
        with self.timer("zarr"):
            self.zarr_rows.add(table)


@contextlib.contextmanager
def finishing(res: int, n: int, job: ShardJob, state: BuildState, timer: Timer) -> Iterator[Finisher | None]:
    """The Zarr store of one resolution of ``n`` cells, from the shard tables the block feeds
    in cell order; published and recorded as done when the block ends. None is yielded when
    there is none to write (not asked for, or finished by an earlier run)."""
    if not _zarr_todo(res, job, state):
        yield None
        return
    with ZarrRows.staged(job.dataset, res, n, job.quantizer(), job.generation) as zarr_rows:
        yield Finisher(zarr_rows, timer)
    state.mark(f"zarr-res={res}", {"files": zarr_rows.files})


def _zarr_todo(res: int, job: ShardJob, state: BuildState) -> bool:
    return job.zarr and (state.done(f"zarr-res={res}") is None
                         or not job.dataset.exists(f"{fmt.zarr_relpath(res, job.generation)}/.zmetadata"))


def _index_done(res: int, job: ShardJob, state: BuildState) -> bool:
    return state.done(f"index-res={res}") is not None and job.dataset.exists(fmt.index_relpath(res, job.generation))


def stored_bytes(dim: int, precision: str) -> int:
    from catalog.blocks import STORED_DTYPES

    return dim * np.dtype(STORED_DTYPES[precision]).itemsize


def train_index(res: int, n: int, encoder: Encoder, job: ShardJob, keep: NDArray[np.uint64] | None,
                state: BuildState, timer: Timer) -> index.TrainedIndex | None:
    """Before a resolution's shards are encoded: its trained IVF index (trained now, or by an
    earlier run); None for an exact resolution or one whose index is finished."""
    if vector_index.exact_fits(n, encoder.dim) or _index_done(res, job, state):
        return None
    step = f"index-train-res={res}"
    done = state.done(step)
    if done is None or done["queries"]["path"] != index.queries_relpath(res) or \
            not all(job.dataset.exists(done[k]["path"]) for k in ("trained", "queries")):
        quantizer = job.quantizer()

        def vectors_of(cells: NDArray[np.uint64]) -> NDArray[np.float32]:
            # the training sample, encoded now and stored (then read) as the shards will be
            lat, lon = cell_centers(cells)
            return index.unit_vectors(encode.encode_stored(encoder, lat, lon, job.precision, quantizer), quantizer)

        with timer("index"):
            done = index.train(job.dataset, res, n, encoder.dim, stored_bytes(encoder.dim, job.precision),
                               vectors_of, keep)
        state.mark(step, done)
    return index.TrainedIndex(res, done["trained"]["sha256"])


def shard_key(record: dict[str, Any]) -> str:
    return fmt.shard_key_of(record["path"])


def finish_index(res: int, job: ShardJob, state: BuildState, timer: Timer, source: ShardSource) -> None:
    """Merge, tune and publish resolution ``res``'s index (nothing if an earlier run did).

    An exact resolution's flat index is written from the part files. An approximate one is
    merged from the shards' saved lists; a shard without them (written before the index was
    trained, or by another trained index) is encoded into it from its part file now.
    """
    if _index_done(res, job, state):
        return
    start = time.perf_counter()
    dataset, n, dim = job.dataset, sum(r["rows"] for r in source.records), source.dim
    faiss = vector_index.require_faiss()
    rel = fmt.index_relpath(res, job.generation)
    trained = state.done(f"index-train-res={res}")
    with timer("index"), dataset.staged(rel) as tmp, tempfile.TemporaryDirectory() as fetched:
        if vector_index.exact_fits(n, dim):
            params, recall = _write_flat(tmp, source, dim), 1.0
        elif trained is None:
            raise AtlasCorruptError(f"resolution {res}'s index was never trained; rebuild with --overwrite")
        else:
            empty, queries = index.load_trained(dataset, res, trained["trained"]["sha256"])
            lists = [index.ShardLists(p) for p in _shard_lists(res, source, job, state, trained, Path(fetched))]
            top = index.complete_top(index.merged_top([s.top for s in lists]), queries, source.tables,
                                     source.unit_vectors)
            written = index.merge(tmp, empty, lists)
            del lists  # their maps
            if written != n:
                raise AtlasCorruptError(f"resolution {res}'s shards hold {written:,} cells in their index lists, "
                                        f"expected {n:,}; rebuild with --overwrite")
            sample = _sample(source, res)
            tuned, by_kind = index.tune(lambda: faiss.read_index(str(tmp), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY),
                                        queries, top, source.gather_cells, sample=vector_index.Sample.of(sample))
            recall = by_kind["uniform"]["at_10"]
            params = {"type": trained["type"], "exact": False, "nlist": trained["nlist"],
                      "nprobe": tuned["nprobe"], "nprobe_placed": tuned["nprobe_placed"], "rerank": tuned["rerank"],
                      "expand": True,
                      "recall_lower_bound": tuned["recall_lower_bound"], "recall": by_kind,
                      "recall_epsilon": probes.EPSILON,
                      "train_points": trained["train_points"], "recall_queries": len(queries)}
            short = [f"{k} {m['at_10_lower_bound']:.3f}" for k, m in by_kind.items()
                     if k not in probes.FILTERED and m["at_10_lower_bound"] < index.RECALL_TARGET]
            if short:
                log.warning("res %d: recall@10 lower bound below %.2f at the best setting found for %s", res,
                            index.RECALL_TARGET, ", ".join(short))
            # uniform queries decide whether an exact index replaces it, as before kinds were measured
            uniform = by_kind["uniform"]["at_10_lower_bound"]
            if uniform < index.RECALL_TARGET and n * dim * 4 > index.FLAT_MAX_BYTES:
                log.warning("%s reached recall@%d %.3f (lower bound %.3f) < %.2f at res %d; an exact index would "
                            "not fit, keeping the best setting", trained["type"], index.RECALL_K, recall, uniform,
                            index.RECALL_TARGET, res)
            elif uniform < index.RECALL_TARGET:
                log.warning("%s reached recall@%d %.3f (lower bound %.3f) < %.2f at res %d; keeping an exact index",
                            trained["type"], index.RECALL_K, recall, uniform, index.RECALL_TARGET, res)
                params, recall = _write_flat(tmp, source, dim), 1.0
        file = fmt.file_record(Path(), rel, local=tmp)
        directory = None if params["exact"] else _list_directory(tmp, params, n, dim)
    lists_file = sample_file = None
    if directory is not None:  # beside the index: what a remote search checks each list it reads against
        params["lists"] = fmt.lists_relpath(res, job.generation)
        lists_file = _save_npy(dataset, params["lists"], directory)
        params["sample"] = fmt.sample_relpath(res, job.generation)  # the seeds of filtered searches
        sample_file = _save_npy(dataset, params["sample"], sample)
    params.update({"metric": "inner_product", "recall_at_10": round(recall, 4), "normalized": True,
                   "build_s": round(time.perf_counter() - start + (trained or {}).get("train_s", 0.0), 2),
                   "path": rel, "cells": n, "bytes": file["bytes"], "bytes_per_cell": round(file["bytes"] / max(n, 1), 1),
                   "share_of_embeddings": round(file["bytes"] / max(n * stored_bytes(dim, job.precision), 1), 4)})
    state.mark(f"index-res={res}", {"index": params, "file": file, "lists_file": lists_file,
                                    "sample_file": sample_file})
    dataset.delete_tree(f"{fmt.BUILD_DIR}/index/res={res}")  # the trained index and the shards' lists
    source.release()


def _save_npy(dataset: Store, rel: str, table: NDArray[Any]) -> dict[str, Any]:
    """Publish ``table`` as the ``.npy`` file ``rel`` of the dataset; returns its file record."""
    with dataset.staged(rel) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, table, allow_pickle=False)
        return fmt.file_record(Path(), rel, local=tmp)


def _sample(source: ShardSource, res: int) -> NDArray[Any]:
    """The resolution's sample (:func:`catalog.vector_index.sample_dtype` rows, in cell order):
    :func:`sample_cells` of its parts, within :data:`catalog.vector_index.SAMPLE_BYTES`, with
    their unit vectors, read in place."""
    budget = max(1, vector_index.SAMPLE_BYTES // vector_index.sample_dtype(source.dim).itemsize)
    columns = (source.read(r, ["cell"]).column("cell").to_numpy().astype(np.uint64) for r in source.records)
    found, vectors = source.gather_cells(sample_cells(columns, res, budget))
    out = np.empty(len(found), vector_index.sample_dtype(source.dim))
    out["cell"], out["vector"] = found.astype(np.uint64), vectors
    return out


def sample_cells(columns: Iterable[NDArray[np.uint64]], res: int, budget: int) -> NDArray[np.uint64]:
    """The first cell under each ancestor at the finest resolution coarser than ``res`` whose
    ancestors holding cells number at most ``budget`` (resolution 0's, cut to ``budget``, if
    none), in cell order; ``columns``: the resolution's cells, part by part, in cell order.

    Every place the resolution holds gets a cell, however few it holds: an island smaller
    than a block lacked one in a sample of every few blocks, and a filtered search, which
    cannot walk across the sea, missed the islands' hills (random SatCLIP land res 7, 60
    ``exclude_within_km=1000`` queries: recall@10 0.948 -> 0.995). One pass, holding at most
    about twice ``budget`` cells per resolution.
    """
    firsts: dict[int, list[NDArray[np.uint64]]] = {p: [] for p in range(res)}  # per part, under each ancestor
    counts = dict.fromkeys(firsts, 0)
    for cells in filter(len, columns):
        for p in list(firsts):
            parents = cells_to_parent(cells, p)
            starts = np.flatnonzero(np.concatenate([[True], parents[1:] != parents[:-1]]))
            counts[p] += len(starts)  # an ancestor two parts share is counted twice
            if p and counts[p] > 2 * budget:  # too many here, and finer ancestors are more
                for q in range(p, res):
                    firsts.pop(q, None)
                break
            firsts[p].append(cells[starts])
    for p in sorted(firsts, reverse=True):
        cells = np.concatenate(firsts[p] or [np.empty(0, np.uint64)])
        _, at = np.unique(cells_to_parent(cells, p), return_index=True)
        if len(at) <= budget or not p:
            return cells[at][:budget]
    return np.empty(0, np.uint64)  # resolution 0: no coarser one


def _list_directory(path: Path, params: dict[str, Any], cells: int, dim: int) -> NDArray[Any]:
    """Each inverted list's offset, bytes and CRC-32 in the index file just written; the
    bytes before the first list (the trained parts) and their sha256 go into ``params``."""
    import hashlib
    import os

    from catalog.index_file import check_index_file
    from catalog.remote_index import list_directory

    with open(path, "rb") as fh:
        def read_at(offset: int, size: int) -> bytes:
            return os.pread(fh.fileno(), size, offset)

        layout = check_index_file(read_at, os.fstat(fh.fileno()).st_size, params, dim, cells, str(path))
        head = int(layout.list_offsets[0])
        params.update(head_bytes=head, head_sha256=hashlib.sha256(read_at(0, head)).hexdigest())
        return list_directory(layout, read_at)


def _write_flat(path: Path, source: ShardSource, dim: int) -> dict[str, Any]:
    faiss = vector_index.require_faiss()
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    for table in source.tables():
        flat.add_with_ids(source.unit_vectors(table), table.column("cell").to_numpy().astype(np.int64))
    faiss.write_index(flat, str(path))
    return {"type": "IDMap2,Flat", "exact": True, "rerank": 1}


def _shard_lists(res: int, source: ShardSource, job: ShardJob, state: BuildState,
                 trained: dict[str, Any], fetched: Path) -> Iterator[Path]:
    """Local paths of the shards' lists, in cell order; made from the part files where missing."""
    dataset, sha = job.dataset, trained["trained"]["sha256"]
    for record in source.records:
        saved = record.get("index")
        if saved is None or saved["trained"] != sha or not dataset.exists(saved["path"]):
            table, key = source.table(record), shard_key(record)
            saved = index.add_shard(dataset, index.TrainedIndex(res, sha), key, table.column("cell").to_numpy(),
                                    embedding_matrix(table.column("embedding")), job.quantizer())
            state.mark(shard_step(res, key), {**record, "index": saved})
        if dataset.is_local:
            yield dataset.path(saved["path"])
        else:
            local = fetched / Path(saved["path"]).name
            dataset.download(saved["path"], local)
            yield local


def finish_land(res: int, job: ShardJob, state: BuildState, timer: Timer, source: ShardSource,
                cells: NDArray[np.uint64] | None = None) -> dict[str, Any]:
    """A resolution's land flags: ``land/res=<r>.npy``, the sorted cells (uint64) of the atlas
    that touch land by the build's land mask (:mod:`builder.landmask`): ``cells`` when the
    build listed them (:func:`builder.plan.land_flag_cells`), else read from the parts' land
    columns, one part at a time; returns its done record."""
    step = f"land-res={res}"
    done = state.done(step)
    if done is None or not job.dataset.exists(done["file"]["path"]):
        with timer("land"):
            rel = fmt.land_relpath(res, job.generation)
            with job.dataset.staged(rel) as tmp:
                n = _write_land(tmp, source, cells)
                done = {"cells": n, "file": fmt.file_record(Path(), rel, local=tmp)}
        state.mark(step, done)
    return done


def _write_land(path: Path, source: ShardSource, cells: NDArray[np.uint64] | None) -> int:
    """``land/res=<r>.npy`` at ``path``: ``cells``, or the parts' cells flagged land, in
    cell order (the count for the header from the shards' records, or a first pass over the
    parts' land columns for shards written before records held it)."""
    if cells is not None:
        with open(path, "wb") as f:
            np.save(f, np.asarray(cells, np.uint64))
        return len(cells)
    import pyarrow.compute as pc

    n = sum(record["land_rows"] if "land_rows" in record else
            pc.sum(source.read(record, ["land"]).column("land")).as_py() or 0 for record in source.records)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint64, shape=(n,))
    at = 0
    for record in source.records:
        table = source.read(record, ["cell", "land"])
        flagged = table.column("cell").to_numpy()[table.column("land").to_numpy(zero_copy_only=False)]
        out[at:at + len(flagged)] = flagged
        at += len(flagged)
    if at != n:
        raise AtlasCorruptError(f"the parts' land flags changed while they were read ({at:,} then {n:,}); "
                                "run the build again")
    out.flush()
    del out
    return n


def finish_resolution(res: int, records: list[dict[str, Any]], encoder: Encoder, job: ShardJob,
                      state: BuildState, timer: Timer, progress: bool | None,
                      land_flags: bool = False,
                      land_cells: NDArray[np.uint64] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A resolution's manifest entry and file records, once its shards are written.

    Its index is merged here, and (``land_flags``, for an atlas not land-only) its land cells
    listed (``land_cells``, when the build listed them).
    A Zarr face not streamed while the shards were written (a Ray
    or resumed build) is written here by streaming the part files in cell order: one part at
    a time in memory.
    """
    from catalog.blocks import block_rows

    cells = sum(r["rows"] for r in records)
    files = [f for r in records for f in r["files"]]
    info = {"cells": cells, "block_rows": block_rows(encoder.dim, job.precision), "land_column": True,
            "parts": [{k: r[k] for k in ("path", "blocks", "rows", "first_cell", "last_cell")} for r in records]}
    source = ShardSource(job.dataset, records, encoder.dim, job.precision, job.quantizer())
    with finishing(res, cells, job, state, timer) as finish:
        if finish is not None:
            with timer("read back"), progress_bar(progress, cells, f"zarr res {res}") as bar:
                for table in source.tables():  # the Zarr time is its own
                    finish.add(table)
                    bar.update(table.num_rows)
    finish_index(res, job, state, timer, source)
    zarr_done, index_done = state.done(f"zarr-res={res}"), state.done(f"index-res={res}")
    info["zarr"], info["index"] = (fmt.zarr_relpath(res, job.generation) if job.zarr else None), index_done["index"]
    files += (zarr_done["files"] if job.zarr else []) + [index_done["file"]]
    files += [index_done[f] for f in ("lists_file", "sample_file") if index_done.get(f)]
    if land_flags:
        land = finish_land(res, job, state, timer, source, land_cells)
        info["land"] = {"path": land["file"]["path"], "cells": land["cells"]}
        files.append(land["file"])
    return info, files


def finish_map(job: ShardJob, state: BuildState, resolutions: dict[str, Any], files: list[dict[str, Any]],
               dim: int, timer: Timer, progress: bool | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None,
                                                                        list[dict[str, Any]]]:
    """The map's colouring, once every resolution is written (:mod:`catalog.colors`): the
    principal-component basis fitted on a seeded sample of the finest resolution's stored
    embeddings, and the overview levels coarser than it that the dataset does not hold, made by
    streaming its part files once. Returns the manifest's ``colors`` and ``overview`` entries
    and the levels' file records (reused from an earlier run when it finished this step)."""
    from catalog.blocks import ResolutionReader, part_infos
    from catalog.colors import fit_basis, overview_levels, planned_levels, sample_vectors

    step = "map"
    done = state.done(step)
    if done is not None and all(job.dataset.exists(f["path"]) for f in done["files"]):
        return done["colors"], done["overview"], done["files"]
    finest = max(int(r) for r in resolutions)
    info = resolutions[str(finest)]
    if not info["cells"]:
        return None, None, []
    records = {f["path"]: f for f in files}
    reader = ResolutionReader(job.dataset, part_infos(info, records), dim, job.precision, str(job.dataset),
                              cache_bytes=64 << 20)
    quantization = job.quantization
    with timer("map"):
        colors = fit_basis(sample_vectors(reader, quantization), res=finest)
        levels = planned_levels(finest, info["cells"], {int(r) for r in resolutions})
        with progress_bar(progress, info["cells"] if levels else 0, f"map overview from res {finest}") as bar:
            made = overview_levels(reader, colors, levels, quantization, bar.update)
        entries, level_files = {}, []
        for level, table in made.items():
            rel = fmt.overview_relpath(level, job.generation)
            with job.dataset.staged(rel) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, table, allow_pickle=False)
                level_files.append(fmt.file_record(Path(), rel, local=tmp))
            entries[str(level)] = {"path": rel, "cells": len(table)}
    overview = {"from_res": finest, "levels": entries}
    state.mark(step, {"colors": colors, "overview": overview, "files": level_files})
    return colors, overview, level_files
