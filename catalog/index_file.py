"""The FAISS index files of format 2, parsed and checked before FAISS reads them.

``faiss.read_index`` is C++ deserialisation: it trusts every count in the file, and a file
whose sha256 matches its manifest proves only that the publisher wrote both. So an index is
read here first, field by field, with nothing allocated from its counts: its header must be
one of the two layouts hexatlas writes, agree with the manifest (type, dimension, cells,
nlist, code size), and account for every byte of the file (each inverted list's codes and
ids inside it, and nothing after the last). Only then does FAISS see it.

The two layouts (FAISS's own serialisation, little-endian; ``vec<T>`` is a uint64 count then
that many ``T``):

- exact: ``IxM2`` header, an ``IxFI`` (flat, inner product) header, ``vec<float>`` of
  ``ntotal * d`` values, then ``vec<int64>`` of ``ntotal`` ids;
- approximate: ``IwPQ`` header, ``nlist``, ``nprobe``, the coarse quantiser (an ``IxFI`` of
  ``nlist`` centroids), the direct map (none), ``by_residual``, ``code_size``, the product
  quantiser (``d``, ``M``, ``nbits`` = 8, ``vec<float>`` of ``d * 256`` centroids), then the
  inverted lists: ``ilar``, ``nlist``, ``code_size``, ``full`` and ``vec<uint64>`` of list
  sizes, then each non-empty list's codes (``size * code_size`` bytes) and ids (``size * 8``).

A header is ``fourcc, d (int32), ntotal (int64), two int64 (unused), is_trained (uint8),
metric (int32: 0 inner product)``. :class:`IndexLayout` keeps where each list lies, so
that a reader can fetch single lists by range.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import AtlasCorruptError

__all__ = ["IndexLayout", "check_index_file"]

ReadAt = Callable[[int, int], bytes]  # (offset, size) -> exactly those bytes (fewer at the end of the file)
_HEADER = struct.Struct("<4siqqqBi")
METRIC_INNER_PRODUCT = 0
PQ_NBITS = 8


@dataclass(frozen=True)
class IndexLayout:
    """Where the parts of a checked index file lie (byte offsets into it)."""

    kind: str  # "flat" or "ivfpq"
    d: int
    ntotal: int
    nlist: int = 0
    code_size: int = 0
    centroids_offset: int = 0  # nlist * d float32 (ivfpq), or the ntotal * d vectors (flat)
    pq_offset: int = 0  # d * 256 float32: M sub-quantisers of 256 centroids of d / M values
    list_sizes: NDArray[np.int64] | None = None
    list_offsets: NDArray[np.int64] | None = None  # each list's codes; its ids follow them
    by_residual: bool = True  # PQ codes encode the vector's residual from its list's centroid


class _Cursor:
    def __init__(self, read_at: ReadAt, size: int, where: str) -> None:
        self.read_at, self.size, self.where, self.pos = read_at, size, where, 0

    def fail(self, what: str) -> AtlasCorruptError:
        return AtlasCorruptError(f"{self.where} is not the index its manifest describes ({what}, at byte "
                                 f"{self.pos:,}); refusing to load it. Run 'hexatlas validate' and rebuild or "
                                 "re-download the dataset")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{n:,} bytes wanted past the end of the file ({self.size:,} bytes)")
        data = self.read_at(self.pos, n)
        if len(data) != n:
            raise self.fail("a short read")
        self.pos += n
        return data

    def skip(self, n: int) -> int:
        """Skip ``n`` bytes that must be in the file; returns where they start."""
        start = self.pos
        if n < 0 or start + n > self.size:
            raise self.fail(f"{n:,} bytes of data run past the end of the file ({self.size:,} bytes)")
        self.pos += n
        return start

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def header(self, fourcc: bytes, d: int, ntotal: int | None) -> int:
        magic, dd, nt, _, _, trained, metric = _HEADER.unpack(self.take(_HEADER.size))
        if magic != fourcc:
            raise self.fail(f"a {magic!r} where {fourcc!r} belongs")
        if dd != d or (ntotal is not None and nt != ntotal) or trained != 1 or metric != METRIC_INNER_PRODUCT:
            raise self.fail(f"{fourcc.decode()} header says d={dd}, ntotal={nt}, trained={trained}, metric={metric}; "
                            f"expected d={d}, ntotal={ntotal}, trained, inner product")
        return nt

    def vector(self, itemsize: int, count: int) -> int:
        """A ``vec<T>`` that must hold ``count`` items: its start (after the count)."""
        n = self.u64()
        if n != count:
            raise self.fail(f"a vector of {n:,} items where {count:,} belong")
        return self.skip(count * itemsize)


def check_index_file(read_at: ReadAt, size: int, info: dict[str, Any], dim: int, cells: int,
                     where: str) -> IndexLayout:
    """Parse and check a resolution's index file against its manifest entry ``info``.

    Parameters
    ----------
    read_at : callable (offset, size) -> bytes
        Reads the file (a local file, or range requests); only headers and the list sizes
        are read (at most ``8 * nlist`` bytes at a time), never the vectors or codes.
    size : int
        The file's size in bytes.
    info : dict
        The manifest's ``index`` entry (checked by :func:`catalog.checks.check_manifest`).
    dim, cells : int
        The dataset's dimension and the resolution's cell count.

    Raises
    ------
    AtlasCorruptError
        Anything that is not exactly the layout the manifest describes.
    """
    cur = _Cursor(read_at, size, where)
    if info["exact"]:
        cur.header(b"IxM2", dim, cells)
        cur.header(b"IxFI", dim, cells)
        vectors = cur.vector(4, cells * dim)
        cur.vector(8, cells)
        layout = IndexLayout("flat", dim, cells, centroids_offset=vectors)
    else:
        nlist, m = (int(v) for v in info["type"][3:].split(",PQ"))
        cur.header(b"IwPQ", dim, cells)
        if cur.u64() != nlist:
            raise cur.fail(f"nlist is not the manifest's {nlist}")
        cur.u64()  # nprobe: the manifest's is used
        cur.header(b"IxFI", dim, nlist)
        centroids = cur.vector(4, nlist * dim)
        if cur.take(1) != b"\x00" or cur.u64() != 0:
            raise cur.fail("a direct map (hexatlas writes none)")
        by_residual = cur.take(1)
        if by_residual not in (b"\x00", b"\x01"):
            raise cur.fail("by_residual is neither true nor false")
        if cur.u64() != m:
            raise cur.fail(f"the code size is not {m} bytes")
        if (cur.u64(), cur.u64(), cur.u64()) != (dim, m, PQ_NBITS):
            raise cur.fail(f"the product quantiser is not {m} x {PQ_NBITS} bits over {dim} dimensions")
        pq = cur.vector(4, dim * (1 << PQ_NBITS))
        if cur.take(4) != b"ilar" or cur.u64() != nlist or cur.u64() != m or cur.take(4) != b"full":
            raise cur.fail("inverted lists not in FAISS's array layout with every list's size")
        if cur.u64() != nlist:
            raise cur.fail(f"list sizes for other than {nlist} lists")
        sizes = np.frombuffer(cur.take(8 * nlist), "<u8")
        if int(sizes.max(initial=0)) > cells or int(sizes.sum(dtype=np.uint64)) != cells:
            raise cur.fail(f"list sizes summing to {int(sizes.sum(dtype=np.uint64)):,}, not the {cells:,} cells")
        sizes = sizes.astype(np.int64)
        lengths = sizes * (m + 8)
        offsets = cur.pos + np.concatenate([[0], np.cumsum(lengths)[:-1]])
        cur.skip(int(lengths.sum()))
        layout = IndexLayout("ivfpq", dim, cells, nlist, m, centroids, pq, sizes, offsets.astype(np.int64),
                             by_residual == b"\x01")
    if cur.pos != size:
        raise cur.fail(f"{size - cur.pos:,} bytes after the index's end")
    return layout
