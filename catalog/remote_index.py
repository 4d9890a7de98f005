"""Similar-place search over a remote IVF-PQ index, read in place: no index download.

A resolution's index file (:mod:`catalog.index_file` gives its layout) is a few small
trained parts, then the inverted lists, which hold almost all of its bytes. Opening it
reads the trained parts once, with one range request (the coarse centroids, the product
quantiser's codebooks and the list sizes: ~1.3 MB for 1,024 lists of 256-d), and the list
directory beside it (``index/res=<r>.lists``: each list's offset, length and CRC-32,
recorded in the manifest). A search then reads only the lists it probes (range requests;
lists next to each other in the file in one request), checks each against its CRC-32 (a
list that fails is read once more, then :class:`AtlasCorruptError`), and keeps them in a
bounded cache, least recently used first out.

The search itself is FAISS's, on an ``IndexIVFPQ`` assembled from the parsed parts: the
coarse quantiser and codebooks are handed over as arrays and the probed lists added with
``add_entries``, so the answers are those of the same file searched locally, and FAISS
never deserialises the publisher's bytes.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.crc import crc32
from catalog.errors import AtlasCorruptError
from catalog.index_file import PQ_NBITS, IndexLayout, check_index_file
from catalog.pools import map_in_pool

__all__ = ["LIST_DIRECTORY_DTYPE", "InPlaceIndex", "list_directory", "read_list_directory"]

ReadAt = Callable[[int, int], bytes]
LIST_DIRECTORY_DTYPE = np.dtype([("offset", "<u8"), ("bytes", "<u8"), ("crc32", "<u4")])
CACHE_BYTES = 64 << 20  # of lists kept, per resolution
MERGE_BYTES = 8 << 20  # adjacent lists are fetched in one request up to this size
FETCH_THREADS = 8


def list_directory(layout: IndexLayout, read_at: ReadAt) -> NDArray[Any]:
    """The list directory of a checked IVF-PQ index: each list's offset, bytes and CRC-32
    (of its codes, then its ids), read list by list. What the builder stores beside the index."""
    assert layout.list_sizes is not None and layout.list_offsets is not None
    out = np.zeros(layout.nlist, LIST_DIRECTORY_DTYPE)
    out["offset"] = layout.list_offsets
    out["bytes"] = layout.list_sizes * (layout.code_size + 8)
    for i in np.flatnonzero(out["bytes"]).tolist():
        out["crc32"][i] = crc32(read_at(int(out["offset"][i]), int(out["bytes"][i])))
    return out


def read_list_directory(data: bytes, layout: IndexLayout, where: str) -> NDArray[Any]:
    """Parse a ``.lists`` file and check that it describes ``layout``'s lists exactly."""
    try:
        table = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise AtlasCorruptError(f"{where} is not a list directory ({exc}); run 'hexatlas validate'") from None
    assert layout.list_sizes is not None and layout.list_offsets is not None
    if (table.dtype != LIST_DIRECTORY_DTYPE or table.shape != (layout.nlist,)
            or (table["offset"] != layout.list_offsets).any()
            or (table["bytes"] != layout.list_sizes * (layout.code_size + 8)).any()):
        raise AtlasCorruptError(f"{where} does not describe the lists of its index; run 'hexatlas validate' and "
                                "rebuild or re-download the dataset")
    return table


class InPlaceIndex:
    """An IVF-PQ index searched from its file in place (see the module's docstring).

    Thread-safe: searches of one resolution take turns (each is a few milliseconds once its
    lists are here); list reads run on up to :data:`FETCH_THREADS` threads.

    Parameters
    ----------
    read_at : callable (offset, size) -> bytes
        Range reads of the index file (retried by the store when transient).
    size : int
        The file's size (the manifest's, checked by the store).
    info : dict
        The manifest's ``index`` entry; ``nprobe`` is searched with.
    dim, cells : int
        The dataset's dimension and the resolution's cells.
    directory : bytes
        The ``.lists`` file's bytes (checked against the manifest's sha256 by the caller).
    """

    def __init__(self, read_at: ReadAt, size: int, info: dict[str, Any], dim: int, cells: int,
                 directory: bytes, where: str, cache_bytes: int = CACHE_BYTES) -> None:
        from catalog.vector_index import require_faiss

        faiss = require_faiss()
        import hashlib

        nlist, m = (int(v) for v in info["type"][3:].split(",PQ"))
        # the trained parts and the list sizes lie before the first list: one request for all,
        # checked against the sha256 the manifest gives them (read once more if it fails)
        for _ in range(2):
            head = read_at(0, int(info["head_bytes"]))
            if hashlib.sha256(head).hexdigest() == info["head_sha256"]:
                break
        else:
            raise AtlasCorruptError(f"{where}: its first {int(info['head_bytes']):,} bytes (the trained centroids, "
                                    "codebooks and list sizes) do not match their sha256 (read twice); run "
                                    "'hexatlas validate' and rebuild or re-download the dataset")
        def read(offset: int, size: int) -> bytes:  # the parse reads nothing past the head (else: a short read)
            return head[offset:offset + size]

        self.layout = layout = check_index_file(read, size, info, dim, cells, where)
        self.directory = read_list_directory(directory, layout, f"{where[:-len('.faiss')]}.lists")
        self.where, self.read_at = where, read_at
        centroids = np.frombuffer(read(layout.centroids_offset, nlist * dim * 4), "<f4").reshape(nlist, dim)
        codebooks = np.frombuffer(read(layout.pq_offset, dim * (1 << PQ_NBITS) * 4), "<f4")
        self._quantizer = faiss.IndexFlatIP(dim)
        self._quantizer.add(np.ascontiguousarray(centroids))
        index = faiss.IndexIVFPQ(self._quantizer, dim, nlist, m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(np.ascontiguousarray(codebooks), index.pq.centroids)
        index.by_residual = layout.by_residual
        index.is_trained = True
        index.nprobe = int(info["nprobe"])
        index.ntotal = cells  # the lists are added as searches probe them; FAISS needs only the count
        self.index, self.nprobe, self.ntotal, self.d = index, int(info["nprobe"]), cells, dim
        self._faiss = faiss
        self._loaded: OrderedDict[int, int] = OrderedDict()  # list -> bytes, least recently used first
        self._loaded_bytes, self._cache_bytes = 0, cache_bytes
        self._lock = threading.Lock()
        self.lists_read = 0  # lists fetched (a list read again after eviction counts again)

    @property
    def nlist(self) -> int:
        return int(self.index.nlist)

    def search(self, queries: NDArray[np.float32], k: int, params: Any = None) -> tuple[
            NDArray[np.float32], NDArray[np.int64]]:
        """FAISS's ``search``: (scores, ids) of shape (q, k), ids -1 past the candidates;
        ``params`` (``faiss.SearchParametersIVF``) may set another nprobe."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        nprobe = self.nprobe if params is None else int(params.nprobe)
        with self._lock:
            _, probed = self._quantizer.search(queries, nprobe)
            wanted = np.unique(probed[probed >= 0]).tolist()
            self._load([i for i in wanted if i not in self._loaded])
            for i in wanted:
                self._loaded.move_to_end(i)
            self._evict(keep=set(wanted))
            return self.index.search(queries, k, params=params)

    def _load(self, lists: list[int]) -> None:
        sizes, m = self.layout.list_sizes, self.layout.code_size
        assert sizes is not None
        lists = [i for i in lists if sizes[i]]
        groups: list[list[int]] = []
        for i in sorted(lists):  # lists lie in order in the file: neighbours are one range
            if groups and groups[-1][-1] == i - 1 and self._span(groups[-1] + [i]) <= MERGE_BYTES:
                groups[-1].append(i)
            else:
                groups.append([i])
        fetched = map_in_pool("list-read", FETCH_THREADS, self._fetch, groups)
        ptr = self._faiss.swig_ptr
        for group, chunks in zip(groups, fetched):
            for i, data in zip(group, chunks):
                n = int(sizes[i])
                codes = np.frombuffer(data, np.uint8, n * m)
                ids = np.frombuffer(data, "<i8", n, offset=n * m)
                self.index.invlists.add_entries(i, n, ptr(np.ascontiguousarray(ids)), ptr(np.ascontiguousarray(codes)))
                self._loaded[i] = len(data)
                self._loaded_bytes += len(data)
                self.lists_read += 1

    def _span(self, group: list[int]) -> int:
        return int(self.directory["bytes"][group].sum())

    def _fetch(self, group: list[int]) -> list[bytes]:
        """The lists of ``group`` (adjacent in the file), each checked against its CRC-32."""
        d = self.directory
        start = int(d["offset"][group[0]])
        for attempt in range(2):  # bytes damaged on the way differ the second time
            data = self.read_at(start, self._span(group))
            chunks, bad = [], None
            for i in group:
                lo = int(d["offset"][i]) - start
                chunk = data[lo:lo + int(d["bytes"][i])]
                if len(chunk) != int(d["bytes"][i]) or crc32(chunk) != int(d["crc32"][i]):
                    bad = i
                    break
                chunks.append(chunk)
            if bad is None:
                return chunks
        raise AtlasCorruptError(f"{self.where}: inverted list {bad} does not match its CRC-32 (read twice); run "
                                f"'hexatlas validate' and rebuild or re-download the dataset")

    def _evict(self, keep: set[int]) -> None:
        while self._loaded_bytes > self._cache_bytes and len(self._loaded) > len(keep):
            i, size = next(((i, s) for i, s in self._loaded.items() if i not in keep))
            del self._loaded[i]
            self.index.invlists.resize(i, 0)
            self._loaded_bytes -= size
