"""An xarray backend over format 2, read in place: ``xr.open_dataset(DATASET, engine="hexatlas", res=R)``.

The dataset it returns is one resolution of one model::

    <xarray.Dataset>
    Dimensions:    (cells: 14117882, dim: 4)
    Coordinates:
        cell_ids   (cells) uint64     ...   attrs: grid_name="h3", level=R (xdggs)
        lat        (cells) float64    ...   cell centres, degrees north
        lon        (cells) float64    ...   cell centres, degrees east
    Dimensions without coordinates: cells, dim
    Data variables:
        embedding  (cells, dim) float32 ...

Rows are the atlas's cells in ascending cell-id order, as the part files hold them. Every
variable is lazy (a :class:`xarray.backends.BackendArray`): opening reads the manifest only,
and a selection reads just the blocks (at most ~256 KB of embeddings each) that hold its
rows, each checked against its CRC-32, as a lookup does (:mod:`catalog.blocks`). ``cell_ids``
reads only the blocks' cell runs (8 B a cell); ``lat``/``lon`` are computed from those ids
with h3; ``embedding`` is float32 whatever the atlas stores (float16 widened, int8 codes
dequantised with the manifest's scale and offset), so it equals :meth:`query.Atlas.lookup`.

``cell_ids`` carries the xdggs attributes (those of the Zarr face) but is not a dimension
coordinate, so xarray builds no index over it on opening; ``xdggs.decode(ds)`` reads it then
(113 MB at resolution 6) to build its index. Remote atlases (``s3://``, ``https://``,
``hf://``) are read with range requests, 16 at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

if TYPE_CHECKING:
    import xarray as xr
    from numpy.typing import NDArray

    from query.atlas import _Resolution

__all__ = ["HexatlasBackendEntrypoint"]

READ_THREADS = 16  # range requests in flight for one remote selection
# a row selection as xarray's outer indexing hands it to a backend: an int, a slice or 1-d ints
RowKey = int | np.integer | slice | np.ndarray
Task = tuple[int, int, Any, Any]  # (part, block, rows in the block, rows of the result): slices or int arrays
# fill(cell ids, stored embeddings or None, rows in the block, rows of the result): one task's block, read
Fill = Callable[[Any, Any, Any, Any], None]


class _Source:
    """One resolution of one dataset: rows by position mapped to its parts' blocks.

    Opened on first use, and again in another process after unpickling (dask); a copy
    (``copy.deepcopy``, as ``xdggs.decode`` makes) shares it, being read-only.
    """

    def __init__(self, location: str, name: str, res: int, parts: tuple[str, ...], rows: tuple[int, ...],
                 data: _Resolution | None = None) -> None:
        self.location, self.name, self.res, self.parts = location, name, res, parts
        self.starts = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])  # first row of each part
        self.cells = int(self.starts[-1])
        self._data, self._lock = data, threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return _Source, (self.location, self.name, self.res, self.parts, tuple(np.diff(self.starts).tolist()))

    def __deepcopy__(self, memo: dict[int, Any]) -> _Source:
        return self

    @property
    def data(self) -> _Resolution:
        with self._lock:
            if self._data is None:
                from catalog.errors import AtlasChangedError
                from query.atlas import open_atlas

                data = open_atlas(self.location)._data(self.name, self.res)
                if tuple(p.path for p in data.reader.infos) != self.parts:
                    raise AtlasChangedError(
                        f"{self.location} was rebuilt since this dataset was opened; open it again with "
                        "xr.open_dataset to read the new one")
                self._data = data
            return self._data

    def close(self) -> None:
        with self._lock:
            self._data = None  # the parts' files close with their readers

    # ----------------------------------------------------------------- rows -> blocks
    def plan(self, key: RowKey) -> tuple[int, list[Task]]:
        """How many rows ``key`` selects, and which blocks to read for them."""
        n = self.cells
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                return max(stop - start, 0), self._span(start, stop)
            key = np.arange(start, stop, step)
        pos = np.asarray(key, dtype=np.int64).reshape(-1)
        pos = np.where(pos < 0, pos + n, pos)
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            bad = int(np.asarray(key).reshape(-1)[(pos < 0) | (pos >= n)][0])
            raise IndexError(f"row {bad} is out of range for {n:,} cells")
        return len(pos), self._positions(pos)

    def _span(self, start: int, stop: int) -> list[Task]:
        """Rows ``start:stop``: one task per block, both sides as slices (no index arrays)."""
        tasks, dest = [], 0
        p = int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            part = self.data.reader.part(p)
            local = start - int(self.starts[p])
            b = local // part.block_size
            first = b * part.block_size
            take = min(stop - start, first + int(part.blocks["rows"][b]) - local)
            tasks.append((p, b, slice(local - first, local - first + take), slice(dest, dest + take)))
            start, dest = start + take, dest + take
            if start >= self.starts[p + 1]:
                p += 1
        return tasks

    def _positions(self, pos: NDArray[np.int64]) -> list[Task]:
        """Rows at any positions (unsorted, repeated): one task per block they fall in."""
        order = np.argsort(pos, kind="stable")
        ordered = pos[order]
        part_of = np.searchsorted(self.starts, ordered, side="right") - 1
        tasks = []
        for lo, hi in _runs(part_of):
            p = int(part_of[lo])
            part = self.data.reader.part(p)
            local = ordered[lo:hi] - self.starts[p]
            block = local // part.block_size
            for a, z in _runs(block):
                b = int(block[a])
                tasks.append((p, b, local[a:z] - b * part.block_size, order[lo + a:lo + z]))
        return tasks

    def read(self, tasks: list[Task], fill: Fill, *, values: bool) -> None:
        """Read each task's block (``values``: its embeddings too, else only its cell ids) and
        hand it to ``fill(cells, stored, src, dest)``; remote blocks are read in parallel."""
        from catalog.blocks import read_block

        reader = self.data.reader

        def one(task: Task) -> None:
            p, b, src, dest = task
            fill(*read_block(reader, p, b, values=values), src, dest)

        if reader.store.is_local or len(tasks) < 2:
            for task in tasks:
                one(task)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(READ_THREADS, len(tasks)), thread_name_prefix="xarray-read") as pool:
            list(pool.map(one, tasks))  # each task fills rows of its own: no two write the same

    def cell_ids(self, key: RowKey) -> NDArray[np.uint64]:
        """The cell ids (uint64) of the rows ``key`` selects, from the blocks' cell runs only."""
        count, tasks = self.plan(key)
        out = np.empty(count, np.uint64)

        def fill(cells: NDArray[np.uint64], _: Any, src: Any, dest: Any) -> None:
            out[dest] = cells[src]

        self.read(tasks, fill, values=False)
        return out


def _runs(sorted_values: NDArray[Any]) -> list[tuple[int, int]]:
    """(lo, hi) of each run of equal values in a sorted array."""
    cuts = (np.flatnonzero(np.diff(sorted_values)) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, len(sorted_values)]))


class _Array(BackendArray):
    """A lazy variable of the dataset: xarray hands it outer-indexing keys."""

    def __init__(self, source: _Source, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.source, self.shape, self.dtype = source, shape, np.dtype(dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> NDArray[Any]:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._get)

    def _get(self, key: tuple[Any, ...]) -> NDArray[Any]:
        raise NotImplementedError


class _EmbeddingArray(_Array):
    """``embedding`` (cells, dim), float32: the blocks holding the selected rows, read and decoded."""

    def _get(self, key: tuple[Any, ...]) -> NDArray[np.float32]:
        from catalog.tables import dequantize

        rows, dims = key
        data = self.source.data
        count, tasks = self.source.plan(rows)
        width = np.empty((0, self.shape[1]), np.float32)[:, dims].shape[1:]
        out = np.empty((count, *width), np.float32)
        scale = offset = None
        if data.scale is not None:
            scale, offset = data.scale[dims], data.offset[dims]

        def fill(_: Any, stored: NDArray[Any], src: Any, dest: Any) -> None:
            picked = stored[src][:, dims]
            out[dest] = picked if scale is None else dequantize(picked, scale, offset)

        self.source.read(tasks, fill, values=True)
        return out[0] if isinstance(rows, (int, np.integer)) else out


class _CellArray(_Array):
    """``cell_ids`` (cells,), uint64: the selected rows' cell ids, from the blocks' cell runs."""

    def _get(self, key: tuple[Any, ...]) -> NDArray[np.uint64]:
        (rows,) = key
        out = self.source.cell_ids(rows)
        return out[0] if isinstance(rows, (int, np.integer)) else out


class _CentreArray(_Array):
    """``lat`` or ``lon`` (cells,), float64 degrees: the selected cells' centres, by h3."""

    def __init__(self, source: _Source, axis: int) -> None:
        super().__init__(source, (source.cells,), np.dtype(np.float64))
        self.axis = axis  # 0: latitude, 1: longitude (cells_to_latlng's order)

    def _get(self, key: tuple[Any, ...]) -> NDArray[np.float64]:
        from catalog.cells import cells_to_latlng

        (rows,) = key
        out = cells_to_latlng(self.source.cell_ids(rows))[self.axis]
        return out[0] if isinstance(rows, (int, np.integer)) else out


class HexatlasBackendEntrypoint(BackendEntrypoint):
    """``xr.open_dataset(DATASET, engine="hexatlas", res=R, model=None)``: one resolution of a
    hexatlas dataset as an xarray Dataset, read lazily in place (no Zarr face needed).

    ``DATASET`` is what :func:`query.open` takes: a dataset or atlas directory, ``s3://``,
    ``https://`` or ``hf://``. ``res`` is the H3 resolution (default: the finest built);
    ``model`` chooses the dataset of an atlas holding several. The result has dimensions
    ``cells`` (the atlas's cells, ascending cell id) and ``dim``: ``embedding`` (cells, dim)
    float32; coordinates ``cell_ids`` (uint64 H3 cells, xdggs attributes ``grid_name="h3"``,
    ``level=res``), ``lat`` and ``lon`` (float64 degrees, cell centres). All are lazy.
    """

    description = "hexatlas location embeddings on the H3 grid, read in place (format 2)"
    open_dataset_parameters = ("filename_or_obj", "drop_variables", "res", "model")

    def open_dataset(self, filename_or_obj: Any, *, drop_variables: str | Iterable[str] | None = None,
                     res: int | None = None, model: str | None = None) -> xr.Dataset:
        import xarray as xr

        from catalog.errors import InvalidArgumentError
        from query.atlas import open_atlas

        if not isinstance(filename_or_obj, (str, os.PathLike)):
            raise InvalidArgumentError(f"engine='hexatlas' opens a path or URL (what query.open takes), not "
                                       f"{type(filename_or_obj).__name__}")
        location = os.fspath(filename_or_obj)
        atlas = open_atlas(location)
        name = atlas._name(model)
        res = atlas._res(res, name)
        data = atlas._data(name, res)
        manifest = atlas._manifest(name)
        infos = data.reader.infos
        source = _Source(location, name, res, tuple(p.path for p in infos), tuple(p.rows for p in infos),
                         data)
        n, dim = source.cells, data.dim
        drop = {drop_variables} if isinstance(drop_variables, str) else set(drop_variables or ())
        # dask (chunks={} or "auto") then cuts along blocks
        block = manifest["resolutions"][str(res)].get("block_rows") or n
        chunks = {"preferred_chunks": {"cells": int(block)}}

        def lazy(array: _Array) -> indexing.LazilyIndexedArray:
            return indexing.LazilyIndexedArray(array)

        provenance = manifest["provenance"]
        variables = {
            "embedding": xr.Variable(("cells", "dim"), lazy(_EmbeddingArray(source, (n, dim), np.float32)),
                                     {"long_name": f"{provenance['model']} location embedding",
                                      "stored_precision": manifest["precision"]}, chunks),
            "cell_ids": xr.Variable("cells", lazy(_CellArray(source, (n,), np.uint64)),
                                    {"grid_name": "h3", "level": res}, chunks),
            "lat": xr.Variable("cells", lazy(_CentreArray(source, 0)),
                               {"standard_name": "latitude", "units": "degrees_north",
                                "long_name": "latitude of the cell centre"}, chunks),
            "lon": xr.Variable("cells", lazy(_CentreArray(source, 1)),
                               {"standard_name": "longitude", "units": "degrees_east",
                                "long_name": "longitude of the cell centre"}, chunks),
        }
        variables = {k: v for k, v in variables.items() if k not in drop}
        coords = [c for c in ("cell_ids", "lat", "lon") if c in variables]
        attrs = {"hexatlas_res": res, "hexatlas_dataset": name, "format_version": manifest["format_version"],
                 "precision": manifest["precision"], "generation": int(manifest.get("generation", 0)),
                 **{f"provenance_{k}": v for k, v in provenance.items() if isinstance(v, (str, int, float))}}
        ds = xr.Dataset(variables, attrs=attrs).set_coords(coords)
        ds.set_close(source.close)
        return ds

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """A local dataset directory (``manifest.json`` and ``blocks/``) or an atlas directory of
        them; remote atlases need ``engine="hexatlas"`` (guessing would cost requests)."""
        if not isinstance(filename_or_obj, (str, os.PathLike)):
            return False
        path = Path(os.fspath(filename_or_obj))
        try:
            if not path.is_dir():
                return False
            return _is_dataset(path) or any(_is_dataset(child) for child in path.iterdir() if child.is_dir())
        except OSError:
            return False


def _is_dataset(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "blocks").is_dir()
