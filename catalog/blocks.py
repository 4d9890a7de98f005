"""Format 2's embedding store: plain Parquet files that are also read in place, block by block.

Each part file holds a run of one resolution's cells, sorted, as a Parquet file with two
columns, ``cell`` (uint64, with min/max statistics) and ``embedding`` (a fixed-size list of
float16/float32, or for int8 a fixed-size binary of ``dim`` bytes), then (atlases built
since land flags per cell) ``land`` (bool), which only Parquet readers read. It is written
uncompressed, PLAIN-encoded, without dictionaries, one data page per column chunk, in row
groups of :func:`block_rows` cells (about 256 KB of embeddings), so each row group's cell
ids and embeddings are two contiguous runs of raw little-endian values at the end of their
column chunks. Beside it, ``<part>.blocks`` (a ``.npy`` of :data:`BLOCK_DTYPE`, one row per
row group) records where those runs are and a CRC-32 of each.

So the same bytes serve two readers. DuckDB, Polars, Spark and pyarrow read the files as
ordinary Parquet (row groups pruned by the cell statistics). hexatlas reads them in place:
a point lookup finds its part from the manifest, its block from the part's block table (a
few KB, the only per-part state it keeps), and reads just that block's two runs, checking
their CRCs; locally with ``pread``, remotely with range requests.
(zstd shrinks float16 embeddings by ~7%, not worth losing in-place reads.)
"""

from __future__ import annotations

import io
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog.crc import crc32
from catalog.errors import AtlasCorruptError
from catalog.pools import map_in_pool
from catalog.tables import dequantize, embedding_array

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from catalog.storage import Store

__all__ = ["BLOCK_BYTES", "BLOCK_DTYPE", "STORED_DTYPES", "Part", "PartInfo", "ResolutionReader", "block_rows",
           "embedding_column", "part_infos", "read_block", "read_block_table", "write_part"]

BLOCK_BYTES = 256 * 1024  # embedding bytes per block: what one point lookup reads at most
MAX_BLOCK_ROWS = 4096  # cells per block at most (tiny embeddings would make the cell run dominate)
BLOCK_DTYPE = np.dtype([
    ("first_cell", "<u8"), ("last_cell", "<u8"), ("rows", "<u8"),
    ("cells_offset", "<u8"), ("values_offset", "<u8"), ("cells_crc", "<u4"), ("values_crc", "<u4"),
])
STORED_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}
# The cell runs a local resolution has read stay in memory, at most this many bytes of them
# (8 B a cell: all of resolution 7 on land), least recently used out; see _CellDirectory.
CELL_INDEX_BYTES = 256 << 20
RANGE_THREADS = 16  # a remote resolution's blocks read at once
GATHER_ROWS = 4096  # local rows read, then decoded, at a time
RUN_GAP_BYTES = 64 << 10  # a remote block's two runs this close together are read in one request
_NO_CELL = np.uint64(np.iinfo(np.uint64).max)  # pads a short block's row of the slab: above every H3 cell


def block_rows(dim: int, precision: str) -> int:
    """Cells per block for embeddings of ``dim`` values stored as ``precision``: a power of two
    with at most :data:`BLOCK_BYTES` of embeddings (and at most :data:`MAX_BLOCK_ROWS`)."""
    row = dim * STORED_DTYPES[precision].itemsize
    return int(min(MAX_BLOCK_ROWS, 1 << max(0, (BLOCK_BYTES // row).bit_length() - 1)))


def embedding_column(values: NDArray[Any]) -> pa.Array:
    """A (n, dim) stored matrix as the part files' ``embedding`` column, without copying.

    Floats are a fixed-size list; int8 a fixed-size binary of ``dim`` bytes, because Parquet
    would widen each int8 to a 4-byte INT32 and the runs would no longer be the raw codes.
    """
    if values.dtype != np.int8:
        return embedding_array(values)
    values = np.ascontiguousarray(values)
    n, dim = values.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(dim), n, [None, pa.py_buffer(values)])


def write_part(path: Path, blocks_path: Path, cells: NDArray[np.uint64], values: NDArray[Any], *,
               metadata: dict[str, str], land: NDArray[np.bool_] | None = None) -> NDArray[Any]:
    """Write one part file and its block table (both to the local paths given).

    ``land`` (bool, one per cell) adds a third column, ``land``: whether the cell touches
    land. It follows the two columns read in place and is only read as Parquet (SQL).

    The byte runs are located from the Parquet footer, then checked against ``cells`` and
    ``values`` as read back from the file, and their CRC-32s taken from those bytes: what
    the table records is what the file holds. Returns the block table.
    """
    import pyarrow.parquet as pq

    n, dim = values.shape
    precision = next(k for k, v in STORED_DTYPES.items() if v == values.dtype.newbyteorder("<"))
    rows = block_rows(dim, precision)
    columns = {"cell": pa.array(cells, pa.uint64()), "embedding": embedding_column(values)}
    if land is not None:
        columns["land"] = pa.array(np.asarray(land, bool), pa.bool_())
    table = pa.table(columns)
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    pq.write_table(table, path, row_group_size=rows, compression="none", use_dictionary=False,
                   write_statistics=["cell"], data_page_size=4 * rows * dim * values.itemsize + (1 << 16))
    meta = pq.read_metadata(path)
    blocks = np.zeros(meta.num_row_groups, BLOCK_DTYPE)
    cell_bytes, value_bytes = np.dtype("<u8").itemsize, dim * values.itemsize
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        start = 0
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            count = group.num_rows
            stop = start + count
            ends = [group.column(j).data_page_offset + group.column(j).total_compressed_size for j in (0, 1)]
            c_off, v_off = ends[0] - count * cell_bytes, ends[1] - count * value_bytes
            c_run, v_run = mm[c_off:ends[0]], mm[v_off:ends[1]]
            if c_run != cells[start:stop].astype("<u8").tobytes() or v_run != values[start:stop].tobytes():
                raise AtlasCorruptError(
                    f"{path}: row group {i} is not laid out as format 2 expects (this pyarrow "
                    f"{pa.__version__} split or encoded its pages); report it with the pyarrow version"
                )
            blocks[i] = (cells[start], cells[stop - 1], count, c_off, v_off, crc32(c_run), crc32(v_run))
            start = stop
    if start != n:
        raise AtlasCorruptError(f"{path} holds {start} rows, expected {n}")
    with open(blocks_path, "wb") as fh:
        np.save(fh, blocks, allow_pickle=False)
    return blocks


def read_block_table(data: bytes, where: str, part: PartInfo | None = None, dim: int = 0,
                     itemsize: int = 0) -> NDArray[Any]:
    """Parse a ``.blocks`` file's bytes; with ``part`` (and the rows' ``dim`` and ``itemsize``),
    check it against the part it describes before anything is read through it.

    Checked: the dtype and shape; then, per block, that its rows are the format's block
    size (the last may be fewer), that both runs lie inside the part file, and that the
    blocks' cells are sorted, disjoint and inside the part's range, their rows summing to the
    part's. A reader never sizes a read or seeks from an unchecked entry.
    """
    try:
        blocks = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise AtlasCorruptError(f"{where} is not a block table ({exc}); run 'hexatlas validate'") from None
    if blocks.dtype != BLOCK_DTYPE or blocks.ndim != 1:
        raise AtlasCorruptError(f"{where} is not a format-2 block table; run 'hexatlas validate'")
    if part is None:
        return blocks
    size = block_rows(dim, next(k for k, v in STORED_DTYPES.items() if v.itemsize == itemsize))
    rows = blocks["rows"]
    first, last = blocks["first_cell"], blocks["last_cell"]
    problem = None
    if len(blocks) != -(-part.rows // size):
        problem = f"has {len(blocks)} blocks, the {part.rows:,} rows of its part make {-(-part.rows // size)}"
    elif len(blocks) and ((rows[:-1] != size).any() or not 0 < int(rows[-1]) <= size):
        problem = f"has blocks that are not of {size} rows (the last one at most)"
    elif int(rows.sum()) != part.rows:
        problem = f"lists {int(rows.sum())} rows, the manifest {part.rows}"
    # (offsets alone first: one near 2**64 would wrap past the sums' checks)
    elif len(blocks) and ((blocks["cells_offset"] > part.bytes).any() or (blocks["values_offset"] > part.bytes).any()
                          or (blocks["cells_offset"] + rows * 8 > part.bytes).any()
                          or (blocks["values_offset"] + rows * (dim * itemsize) > part.bytes).any()):
        problem = f"points past the end of its part ({part.bytes:,} bytes)"
    elif len(blocks) and ((first > last).any() or (first[1:] <= last[:-1]).any()
                          or int(first[0]) < part.first_cell or int(last[-1]) > part.last_cell):
        problem = "has blocks whose cells are not sorted, disjoint and within its part's"
    if problem:
        raise AtlasCorruptError(f"{where} {problem}; run 'hexatlas validate' and rebuild or re-download it")
    return blocks


def _allow_open_files() -> None:
    """Raise this process's soft limit on open files towards the hard one (once): a global
    query on a resolution-8 atlas opens all of its 842 parts."""
    global _LIMIT_RAISED
    if _LIMIT_RAISED:
        return
    _LIMIT_RAISED = True
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep the limit
        pass


_LIMIT_RAISED = False


class _LocalBytes:
    """A local part file, read with ``pread``: exactly the bytes asked for, through the page
    cache, nothing mapped into the process (so nothing accumulates in its memory).

    The kernel is told the reads are random: on this project's VM a read would otherwise
    pull in up to 8 MB ahead (``read_ahead_kb``).
    """

    def __init__(self, path: Path) -> None:
        _allow_open_files()
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)  # rows are read with os.pread on it (see _CellDirectory)
        self.size = os.fstat(self.fd).st_size
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def __del__(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)


class _RemoteBytes:
    """A part file in object storage or on an HTTP server, read by range requests."""

    def __init__(self, store: Store, rel: str) -> None:
        self.store, self.rel = store, rel
        self._file = store.open_input(rel)
        self.size = self._file.size()

    def read(self, offset: int, size: int) -> bytes:
        data = self._file.read_at(size, offset)
        return data.to_pybytes() if hasattr(data, "to_pybytes") else bytes(data)


Missing = Callable[[str], Exception]  # a file's path in the dataset -> the error to raise for its absence


def _corrupt_missing(where: str) -> Missing:
    return lambda rel: AtlasCorruptError(f"{where}/{rel} is missing; run 'hexatlas validate {where}' "
                                         "and rebuild or re-download the dataset")


@dataclass(frozen=True)
class PartInfo:
    """A part as the manifest lists it."""

    path: str
    blocks: str
    rows: int
    first_cell: int
    last_cell: int
    bytes: int
    blocks_sha256: str
    blocks_bytes: int


class Part:
    """One part file opened for in-place reads: its block table in memory, blocks read on demand.

    Each block's two runs are checked against their CRC-32s the first time this process
    reads them (later reads of a local block trust the check; remote blocks are cached
    only once checked). A mismatch, a file of the wrong size or a missing file is an
    :class:`AtlasCorruptError` naming the file and what to do.
    """

    def __init__(self, store: Store, info: PartInfo, dim: int, dtype: np.dtype, where: str,
                 missing: Missing | None = None) -> None:
        import hashlib

        self.info, self.dim, self.dtype, self.where = info, dim, np.dtype(dtype), where
        self._missing = missing or _corrupt_missing(where)
        for attempt in range(1 if store.is_local else 2):  # remote: read again, in case it changed on the way
            try:
                raw = store.read_bytes(info.blocks, limit=info.blocks_bytes)
            except FileNotFoundError:
                raise self._missing(info.blocks) from None
            if hashlib.sha256(raw).hexdigest() == info.blocks_sha256:
                break
        if hashlib.sha256(raw).hexdigest() != info.blocks_sha256:
            raise AtlasCorruptError(
                f"{where}/{info.blocks} does not match the sha256 in its manifest (altered or damaged); "
                f"run 'hexatlas validate {where}' and rebuild or re-download the dataset")
        self.blocks = read_block_table(raw, f"{where}/{info.blocks}", info, dim, self.dtype.itemsize)
        self.first = np.ascontiguousarray(self.blocks["first_cell"])
        self._values_offset = self.blocks["values_offset"].astype(np.int64)
        try:
            self.bytes = _LocalBytes(store.path(info.path)) if store.is_local else _RemoteBytes(store, info.path)
        except FileNotFoundError:
            raise self._missing(info.path) from None
        if self.bytes.size != info.bytes:
            raise AtlasCorruptError(
                f"{where}/{info.path} has {self.bytes.size:,} bytes, its manifest says {info.bytes:,} "
                f"(truncated or altered); run 'hexatlas validate {where}' and rebuild or re-download it")
        self.block_size = int(self.blocks["rows"][0]) if len(self.blocks) else 0
        self._cells_ok = np.zeros(len(self.blocks), dtype=bool)  # runs checked against their CRC
        self._values_ok = np.zeros(len(self.blocks), dtype=bool)
        self.value_bytes = dim * self.dtype.itemsize

    def block(self, b: int) -> tuple[NDArray[np.uint64], NDArray[Any]]:
        """Cells (uint64, sorted) and stored embeddings ((rows, dim)) of block ``b``, checked."""
        entry = self.blocks[b]
        rows = int(entry["rows"])
        # a remote block that fails its checksum is read once more: bytes damaged on the way
        # differ the second time, bytes damaged where they are stored do not
        for attempt in range(1 if isinstance(self.bytes, _LocalBytes) else 2):
            try:
                c_run, v_run = self._runs(int(entry["cells_offset"]), int(entry["values_offset"]), rows)
            except OSError:  # an object deleted since it was opened (a rebuild): say so if that is why
                changed = self._missing(self.info.path)
                if isinstance(changed, AtlasCorruptError):
                    raise
                raise changed from None
            try:
                if not self._cells_ok[b]:
                    self._check(b, "cells", c_run)
                if not self._values_ok[b]:
                    self._check(b, "values", v_run)
                break
            except AtlasCorruptError:
                if attempt or isinstance(self.bytes, _LocalBytes):
                    raise
        cells = np.frombuffer(c_run, dtype="<u8")
        values = np.frombuffer(v_run, dtype=self.dtype).reshape(rows, self.dim)
        return cells, values

    def _runs(self, cells_at: int, values_at: int, rows: int) -> tuple[bytes, bytes]:
        """A block's cell run and value run. Remotely one range request when the value run
        follows the cell run closely (in the format it does: the embedding column chunk's page
        header lies between them), so that a block costs one round trip, not two."""
        c_size, v_size = rows * 8, rows * self.value_bytes
        gap = values_at - (cells_at + c_size)
        if isinstance(self.bytes, _RemoteBytes) and 0 <= gap <= RUN_GAP_BYTES:
            data = self.bytes.read(cells_at, c_size + gap + v_size)
            return data[:c_size], data[c_size + gap:]
        return self.bytes.read(cells_at, c_size), self.bytes.read(values_at, v_size)

    def _check(self, b: int, run: str, data: Any) -> None:
        """Check block ``b``'s ``run`` ("cells" or "values") against its CRC-32."""
        entry = self.blocks[b]
        if crc32(data) != int(entry[f"{run}_crc"]):
            raise AtlasCorruptError(
                f"{self.where}/{self.info.path}: block {b} (cells {int(entry['first_cell']):x}.."
                f"{int(entry['last_cell']):x}) does not match its checksum ({run} altered or damaged); run "
                f"'hexatlas validate {self.where}' and rebuild or re-download the dataset")
        (self._cells_ok if run == "cells" else self._values_ok)[b] = True

    def _check_local(self, blocks: NDArray[np.intp], run: str) -> None:
        """Check the ``run`` of each of ``blocks`` not checked yet, read with one ``pread`` each."""
        done = self._cells_ok if run == "cells" else self._values_ok
        width = 8 if run == "cells" else self.value_bytes
        for b in np.unique(blocks[~done[blocks]]).tolist():
            entry = self.blocks[b]
            self._check(b, run, self.bytes.read(int(entry[f"{run}_offset"]), int(entry["rows"]) * width))

    def _cell_run(self, b: int) -> NDArray[np.uint64]:
        entry = self.blocks[b]
        data = self.bytes.read(int(entry["cells_offset"]), int(entry["rows"]) * 8)
        if not self._cells_ok[b]:
            self._check(b, "cells", data)
        return np.frombuffer(data, "<u8")


class _CellDirectory:
    """Where each cell of a local resolution lies, found for a whole batch of cells at once.

    A batch of random points (DuckDB hands ``hexatlas_embedding`` 2,048 rows a call) falls in
    nearly every part, so a search part by part costs each call the parts' count in Python
    work. Here the resolution's blocks are one sorted array of first cells (an unread part's
    entries hold the part's first cell, so the array stays sorted; a part's block table is
    read, and its entries filled in, the first time a batch falls in it), and the cell runs of
    the blocks read so far are the rows of one slab (at most :data:`CELL_INDEX_BYTES`, grown
    as needed, the rows served longest ago reused), so that one ``searchsorted`` finds every
    cell's block and one vectorised binary search over the slab its row. A batch needing more
    blocks than the slab holds is located in pieces. Memory: 21 B a block (the globe at
    resolution 8: 28 MB, in pages touched only as parts are read) and the slab; nothing else
    grows with the cells.
    """

    def __init__(self, reader: ResolutionReader) -> None:
        self.reader, self.width = reader, reader.block_size
        counts = np.array([-(-p.rows // self.width) for p in reader.infos], np.int64)
        self.base = np.concatenate([[0], np.cumsum(counts)])
        n = int(self.base[-1])
        self.first = np.repeat(reader.first, counts)
        # zero-filled, so that the pages of parts never read take no memory
        self.values_offset = np.zeros(n, np.int64)
        # the parts keep the same flags; this copy lets a batch whose blocks are all checked
        # skip the per-part calls (up to one per part a batch, the cost this class removes)
        self.values_ok = np.zeros(n, bool)
        self.slot = np.zeros(n, np.int32)  # 1 + the slab row holding each block's cell run; 0: none
        self.opened = np.zeros(len(reader.infos), bool)
        self.fd = np.full(len(reader.infos), -1, np.int64)
        self.max_slots = max(1, CELL_INDEX_BYTES // (self.width * 8))
        self.slab = np.empty((0, self.width), np.uint64)
        self.holder = np.empty(0, np.int64)  # the block in each slab row (-1: free)
        self.used = np.empty(0, np.int64)  # the batch each row last served
        self.tick = 0
        self.lock = threading.Lock()

    def locate(self, cells: NDArray[np.uint64]) -> tuple[NDArray[np.bool_], NDArray[np.int64], NDArray[np.int64]]:
        """Which of ``cells`` the resolution holds, and for those (in order) the file descriptor
        of their part and the offset of their stored embedding. Every run read is checked."""
        reader = self.reader
        part_of = np.searchsorted(reader.first, cells, side="right") - 1
        where = np.flatnonzero((part_of >= 0) & (cells <= reader.last[np.maximum(part_of, 0)]))
        targets = cells[where]
        with self.lock:
            parts = np.unique(part_of[where])
            for p in parts[~self.opened[parts]].tolist():
                self._open(p)
            block = np.searchsorted(self.first, targets, side="right") - 1
            found, rows = np.zeros(len(where), bool), np.zeros(len(where), np.int64)
            wanted = np.unique(block)
            if len(wanted) <= self.max_slots:
                self._hold(wanted)
                order = np.argsort(targets)  # searched in cell order: a block's row stays in cache
                found[order], rows[order] = self._search(block[order], targets[order])
            else:  # in pieces whose blocks fit in the slab
                order = np.argsort(block, kind="stable")
                ordered = block[order]
                for piece in np.array_split(wanted, -(-len(wanted) // self.max_slots)):
                    sel = order[np.searchsorted(ordered, piece[0]):np.searchsorted(ordered, piece[-1], side="right")]
                    self._hold(piece)
                    found[sel], rows[sel] = self._search(block[sel], targets[sel])
            block, rows = block[found], rows[found]
            unchecked = np.unique(block[~self.values_ok[block]])
        # outside the lock: value runs are the large reads (up to 256 KB a block), which another
        # thread's batch (DuckDB calls from several) should not wait for
        self._check_values(unchecked)
        hit = np.zeros(len(cells), bool)
        hit[where[found]] = True
        part = np.searchsorted(self.base, block, side="right") - 1
        return hit, self.fd[part], self.values_offset[block] + rows * (reader.dim * reader.dtype.itemsize)

    def _open(self, p: int) -> None:
        part = self.reader.part(p)
        assert isinstance(part.bytes, _LocalBytes), "a cell directory is for local parts"
        lo, hi = int(self.base[p]), int(self.base[p + 1])
        self.first[lo:hi] = part.first
        self.values_offset[lo:hi] = part.blocks["values_offset"]
        self.fd[p] = part.bytes.fd
        self.opened[p] = True

    def _hold(self, blocks: NDArray[np.int64]) -> None:
        """Put the cell runs of ``blocks`` (at most ``max_slots``) in the slab, each checked."""
        self.tick += 1
        held = self.slot[blocks] > 0
        self.used[self.slot[blocks[held]] - 1] = self.tick
        missing = blocks[~held]
        if not missing.size:
            return
        free = np.flatnonzero(self.holder < 0)
        if free.size < missing.size and len(self.slab) < self.max_slots:  # grow: double, up to the budget
            grow = min(self.max_slots, max(2 * len(self.slab), len(self.slab) + missing.size, 16)) - len(self.slab)
            self.slab = np.concatenate([self.slab, np.full((grow, self.width), _NO_CELL, np.uint64)])
            self.holder = np.concatenate([self.holder, np.full(grow, -1, np.int64)])
            self.used = np.concatenate([self.used, np.zeros(grow, np.int64)])
            free = np.flatnonzero(self.holder < 0)
        if free.size < missing.size:  # reuse the rows that served a batch longest ago (never this one)
            old = np.flatnonzero((self.holder >= 0) & (self.used < self.tick))
            old = old[np.argsort(self.used[old], kind="stable")[:missing.size - free.size]]
            self.slot[self.holder[old]] = 0
            self.holder[old] = -1
            free = np.concatenate([free, old])
        parts = np.searchsorted(self.base, missing, side="right") - 1
        for b, p, row in zip(missing.tolist(), parts.tolist(), free[:missing.size].tolist()):
            run = self.reader.part(p)._cell_run(b - int(self.base[p]))
            self.slab[row, :len(run)] = run
            self.slab[row, len(run):] = _NO_CELL
            self.slot[b], self.holder[row], self.used[row] = row + 1, b, self.tick

    def _search(self, blocks: NDArray[np.int64], targets: NDArray[np.uint64]) -> tuple[
            NDArray[np.bool_], NDArray[np.int64]]:
        """Whether each target is in its block's run (held in the slab), and its row there: a
        branch-free lower bound for all targets at once (the width is a power of two)."""
        flat = self.slab.reshape(-1)
        start = (self.slot[blocks].astype(np.int64) - 1) * self.width
        pos = np.zeros(len(blocks), np.int64)
        step = self.width // 2
        while step:
            pos += np.where(flat[start + pos + step - 1] < targets, step, 0)
            step //= 2
        pos += flat[start + pos] < targets
        found = pos < self.width
        found[found] = flat[start[found] + pos[found]] == targets[found]
        return found, pos

    def _check_values(self, blocks: NDArray[np.int64]) -> None:
        """Check the value runs of ``blocks`` against their CRC-32s (once per process)."""
        parts = np.searchsorted(self.base, blocks, side="right") - 1
        for p in np.unique(parts).tolist():
            self.reader.part(p)._check_local(blocks[parts == p] - int(self.base[p]), "values")
        self.values_ok[blocks] = True


class ResolutionReader:
    """One resolution of a dataset, read in place: parts opened lazily, blocks read as needed.

    Thread-safe. Remote blocks are kept in a bounded cache of checked blocks. ``missing(rel)``
    gives the error to raise when a file the manifest names is not there (default: an
    :class:`AtlasCorruptError`; the query layer first checks whether the atlas was rebuilt).
    """

    def __init__(self, store: Store, parts: list[PartInfo], dim: int, precision: str, where: str,
                 cache_bytes: int = 256 << 20, missing: Missing | None = None) -> None:
        self.store, self.infos, self.dim, self.where = store, parts, dim, where
        self.missing = missing
        self.dtype = STORED_DTYPES[precision]
        self.first = np.array([p.first_cell for p in parts], dtype=np.uint64)
        self.last = np.array([p.last_cell for p in parts], dtype=np.uint64)
        self.cells_count = sum(p.rows for p in parts)
        self._parts: dict[int, Part] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[int, int], tuple[NDArray[np.uint64], NDArray[Any]]] = OrderedDict()
        self._cache_bytes, self._cache_max = 0, cache_bytes if not store.is_local else 0
        self.block_size = block_rows(dim, precision)
        self._directory: _CellDirectory | None = None  # local only: made by the first lookup

    def part(self, p: int) -> Part:
        with self._lock:
            if p not in self._parts:
                self._parts[p] = Part(self.store, self.infos[p], self.dim, self.dtype, self.where, self.missing)
            return self._parts[p]

    def _block(self, p: int, b: int) -> tuple[NDArray[np.uint64], NDArray[Any]]:
        if not self._cache_max:
            return self.part(p).block(b)
        with self._lock:
            hit = self._cache.get((p, b))
            if hit is not None:
                self._cache.move_to_end((p, b))
                return hit
        got = self.part(p).block(b)
        with self._lock:
            self._cache[(p, b)] = got
            self._cache_bytes += got[0].nbytes + got[1].nbytes
            while self._cache_bytes > self._cache_max and len(self._cache) > 1:
                _, (c, v) = self._cache.popitem(last=False)
                self._cache_bytes -= c.nbytes + v.nbytes
        return got

    def gather(self, cells: NDArray[np.uint64], out: NDArray[Any],
               decode: Callable[[NDArray[Any], NDArray[Any]], None] | None = None) -> NDArray[np.bool_]:
        """Write the stored embedding of each cell into ``out`` (n, dim); returns which were found.

        Rows of cells the resolution does not hold are left as they are. ``decode(stored,
        dest)`` converts stored rows into ``out``'s rows (default: an assignment).
        """
        cells = np.asarray(cells, dtype=np.uint64)
        found = np.zeros(len(cells), dtype=bool)
        if not len(cells) or not len(self.infos):
            return found
        if self.store.is_local:
            self._gather_local(cells, out, found, decode)
            return found
        order = np.argsort(cells, kind="stable")
        sorted_cells = cells[order]
        part_of = np.searchsorted(self.first, sorted_cells, side="right") - 1
        ok = (part_of >= 0) & (sorted_cells <= self.last[np.maximum(part_of, 0)])
        work = self._plan(sorted_cells, part_of, ok)
        self._prefetch(work)
        for p, b, lo, hi in work:
            block_cells, values = self._block(p, b)
            pos = np.searchsorted(block_cells, sorted_cells[lo:hi])
            pos_c = np.minimum(pos, len(block_cells) - 1)
            hit = block_cells[pos_c] == sorted_cells[lo:hi]
            dest = order[lo:hi][hit]
            if decode is None:
                out[dest] = values[pos_c[hit]]
            else:
                decode(values[pos_c[hit]], dest)
            found[dest] = True
        return found

    def _gather_local(self, cells: NDArray[np.uint64], out: NDArray[Any], found: NDArray[np.bool_],
                      decode: Callable[[NDArray[Any], NDArray[Any]], None] | None) -> None:
        if self._directory is None:
            with self._lock:
                if self._directory is None:
                    self._directory = _CellDirectory(self)
        # each distinct cell is read once, into its first point's row; its other points copy
        # that row (points cluster: 1M points in a 5 x 5 degree box hold ~43,000 cells of res 7)
        cells, first, inverse = np.unique(cells, return_index=True, return_inverse=True)
        hit, fds, offsets = self._directory.locate(cells)
        dest = first[hit]
        pread, size = os.pread, self.dim * self.dtype.itemsize
        # in slices: a million rows joined into one buffer made a 1M-point join 2x slower
        # (profiled: the join of a million bytes objects into 512 MB took 5.3 s of 11.8)
        for lo in range(0, len(dest), GATHER_ROWS):
            hi = lo + GATHER_ROWS
            raw = b"".join([pread(fd, size, at) for fd, at in zip(fds[lo:hi].tolist(), offsets[lo:hi].tolist())])
            values = np.frombuffer(raw, self.dtype).reshape(-1, self.dim)
            if decode is None:
                out[dest[lo:hi]] = values
            else:
                decode(values, dest[lo:hi])
        found[:] = hit[inverse]
        again = np.flatnonzero(found & (np.arange(len(found)) != first[inverse]))
        for lo in range(0, len(again), GATHER_ROWS):
            rows = again[lo:lo + GATHER_ROWS]
            out[rows] = out[first[inverse[rows]]]

    def _plan(self, sorted_cells: NDArray[np.uint64], part_of: NDArray[np.intp],
              ok: NDArray[np.bool_]) -> list[tuple[int, int, int, int]]:
        """(part, block, lo, hi): the runs of sorted cells that each block may hold (remote reads)."""
        work = []
        idx = np.flatnonzero(ok)
        if not idx.size:
            return work
        part_ids = part_of[idx]
        bounds = np.flatnonzero(np.diff(part_ids)) + 1
        for group in np.split(idx, bounds):
            p = int(part_of[group[0]])
            part = self.part(p)
            block_of = np.searchsorted(part.first, sorted_cells[group], side="right") - 1
            inside = (block_of >= 0) & (sorted_cells[group] <= part.blocks["last_cell"][np.maximum(block_of, 0)])
            group, block_of = group[inside], block_of[inside]
            if not group.size:
                continue
            cuts = np.flatnonzero(np.diff(block_of)) + 1
            starts = np.concatenate([[0], cuts])
            stops = np.concatenate([cuts, [len(group)]])
            # the group's sorted cells are contiguous in sorted_cells, and so is each block's run
            work.extend((p, int(block_of[s]), int(group[s]), int(group[e - 1]) + 1) for s, e in zip(starts, stops))
        return work

    def _prefetch(self, work: list[tuple[int, int, int, int]]) -> None:
        with self._lock:  # blocks already cached need no thread
            wanted = [pb for pb in dict.fromkeys((p, b) for p, b, _, _ in work) if pb not in self._cache]
        if len(wanted) > 1:
            map_in_pool("range-read", RANGE_THREADS, lambda pb: self._block(*pb), wanted)

    def vectors(self, cells: NDArray[np.uint64], quantization: dict[str, Any] | None = None) -> NDArray[np.float32]:
        """(n, dim) float32 embeddings of ``cells`` as a reader gets them: int8 codes dequantised
        with the manifest's ``quantization`` (``scale``, ``offset``); NaN rows for cells not held."""
        out = np.full((len(cells), self.dim), np.nan, dtype=np.float32)
        decode = None
        if quantization is not None:
            scale, offset = (np.asarray(quantization[k], np.float32) for k in ("scale", "offset"))

            def decode(stored: NDArray[Any], dest: NDArray[np.intp]) -> None:
                out[dest] = dequantize(stored, scale, offset)
        self.gather(cells, out, decode)
        return out

    def scan(self) -> tuple[NDArray[np.uint64], NDArray[Any]]:
        """Every cell and its stored embedding (for small resolutions: the map, the recall check)."""
        cells, values = [], []
        for p in range(len(self.infos)):
            part = self.part(p)
            for b in range(len(part.blocks)):
                c, v = self._block(p, b)
                cells.append(c)
                values.append(v)
        if not cells:
            return np.empty(0, np.uint64), np.empty((0, self.dim), self.dtype)
        return np.concatenate(cells), np.concatenate(values)


def part_infos(manifest_res: dict[str, Any], files: dict[str, dict[str, Any]]) -> list[PartInfo]:
    """The parts of one resolution from its manifest entry and the manifest's file records."""
    return [PartInfo(p["path"], p["blocks"], int(p["rows"]), int(p["first_cell"]), int(p["last_cell"]),
                     int(files[p["path"]]["bytes"]), files[p["blocks"]]["sha256"], int(files[p["blocks"]]["bytes"]))
            for p in manifest_res["parts"]]


def read_block(reader: ResolutionReader, part: int, block: int, *,
               values: bool = True) -> tuple[NDArray[np.uint64], NDArray[Any] | None]:
    """Block ``block`` of part ``part`` of a resolution, checked: its cell ids (uint64, sorted)
    and, with ``values``, its stored embeddings ((rows, dim), else None: only the cell run is
    read). For readers that address rows by position (the xarray backend); remote blocks with
    values come through the reader's cache of checked blocks, as lookups do."""
    if not values:
        return reader.part(part)._cell_run(block), None
    return reader._block(part, block)
