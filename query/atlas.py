"""Reading an atlas without PyTorch: lookups, joins, similar places and SQL.

Embeddings are read in place (:mod:`catalog.blocks`): opening reads the manifests only; a
query reads the block table of each part it touches (a few KB) and then only the blocks
(at most ~256 KB each) that hold its cells, each checked against its CRC-32 the first time
this process reads it. Local parts are read with ``pread`` (through the page cache, nothing
mapped or copied into the process but what a query returns); parts in object storage
(``query.open("s3://bucket/prefix")``), on an HTTP(S) server (``https://...``) or on the
Hugging Face Hub (``hf://datasets/ORG/NAME``) are read with range requests, and checked
blocks are kept in a bounded cache. Nothing is decoded or copied up front, so memory follows the
query, not the atlas. The atlas itself is only ever read.

Two things are still fetched whole from a remote atlas, into a mirror in the user's cache
(``$HEXATLAS_CACHE``, else ``~/.cache/hexatlas``, under ``remote/<manifest digest>/``) and
checked against the manifest's sha256: a resolution's FAISS index for ``similar``, and the
part files for the SQL view (DuckDB reads local files; its httpfs extension cannot be
installed offline).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from numpy.typing import ArrayLike, NDArray

from catalog.blocks import ResolutionReader, part_infos
from catalog.cells import (
    cells_to_latlng,
    cells_to_parent,
    descendant_spread_km,
    hex_to_cell,
    in_sorted,
    latlng_to_cells,
)
from catalog.checks import MAX_MANIFEST_BYTES
from catalog.coords import as_coordinates, invalid_mask
from catalog.errors import (
    AtlasChangedError,
    AtlasCorruptError,
    AtlasNotFoundError,
    InvalidArgumentError,
    InvalidCoordinateError,
    UnknownEncoderError,
    UnknownResolutionError,
)
from catalog.interpolation import EARTH_RADIUS_KM, haversine_km
from catalog.interpolation import interpolate as interpolate_cells
from catalog.manifest import BUILD_DIR, MANIFEST, dataset_name, list_datasets, read_manifest
from catalog.paths import inside
from catalog.storage import LocalStore, Store, is_remote, open_store
from catalog.tables import Coordinates, as_table, dequantize, embedding_array, locate_points
from query.streaming import ON_INVALID, check_join_options

__all__ = ["Atlas", "open_atlas"]


def open_atlas(path: str | os.PathLike[str]) -> Atlas:
    """Open an atlas directory (one dataset per model) or a single dataset directory.

    ``path`` may also be an ``s3://bucket/prefix`` (credentials and endpoint from the
    standard AWS environment variables), an ``https://`` (or ``http://``) URL, or
    ``hf://datasets/ORG/NAME[@REVISION][/PATH]`` (a Hugging Face Hub dataset; ``HF_ENDPOINT``,
    ``HF_TOKEN`` honoured), all read in place with range requests. Over HTTP a URL names a
    dataset (the folder of its ``manifest.json``) or an atlas root with an ``atlas.json``.

    Raises
    ------
    AtlasNotFoundError
        Nothing at ``path``.
    AtlasCorruptError
        No finished dataset (an unfinished build, or not an atlas), or an incompatible format.
    StorageError
        The object store or HTTP server refused a request (credentials, endpoint, bucket), or
        failed it after the retries.
    """
    if is_remote(os.fspath(path)):
        return _open_remote(open_store(os.fspath(path)))
    root = Path(path)
    if not root.exists():
        raise AtlasNotFoundError(f"no atlas at {str(root)!r}")
    if (root / MANIFEST).is_file():
        dirs = [root]
    elif root.is_dir():
        dirs = sorted(p for p in root.iterdir() if (p / MANIFEST).is_file())
        if not dirs:
            unfinished = [p.name for p in root.iterdir() if (p / BUILD_DIR).exists()]
            hint = (f"; unfinished builds: {', '.join(unfinished)} (run the same 'hexatlas build' again to resume)"
                    if unfinished else "")
            raise AtlasCorruptError(f"{str(root)!r} holds no finished hexatlas dataset{hint}")
    else:
        raise AtlasNotFoundError(f"{str(root)!r} is not an atlas directory")
    return Atlas({d.name: (LocalStore(d), read_manifest(d)) for d in dirs}, location=os.fspath(path))


def _open_remote(store: Store) -> Atlas:
    first: bytes | None = None
    if not store.listable:  # HTTP: one GET answers both whether it is a dataset and what it holds
        with contextlib.suppress(FileNotFoundError):
            first = store.read_bytes(MANIFEST, limit=MAX_MANIFEST_BYTES)
    if first is not None or (store.listable and store.exists(MANIFEST)):
        stores = [store]
    else:
        stores = [store.child(name) for name in list_datasets(store)]
        if not stores:
            unfinished = [n for n in store.subdirs() if store.child(n).exists(f"{BUILD_DIR}/build.json")]
            hint = (f"; unfinished builds: {', '.join(unfinished)} (run the same 'hexatlas build' again to resume)"
                    if unfinished else "")
            raise AtlasCorruptError(f"{str(store)!r} holds no finished hexatlas dataset{hint}")
    datasets, mirrors, digests = {}, {}, {}
    for dataset in stores:
        raw = first if first is not None else dataset.read_bytes(MANIFEST, limit=MAX_MANIFEST_BYTES)
        manifest = read_manifest(dataset, data=raw)
        datasets[dataset.name] = (dataset, manifest)
        digests[dataset.name] = hashlib.sha256(raw).hexdigest()
        # the name is one safe segment (an atlas.json's names are checked; a URL's last one is made so)
        mirrors[dataset.name] = _cache_dir() / "remote" / digests[dataset.name][:24] / dataset_name(dataset.name)
    return Atlas(datasets, mirrors=mirrors, digests=digests, location=store.uri)


class _Resolution:
    """One resolution of one dataset, read in place; vectors come back as float32."""

    def __init__(self, store: Store, manifest: dict[str, Any], res: int) -> None:
        info = manifest["resolutions"][str(res)]
        files = {rec["path"]: rec for rec in manifest["files"]}
        self.dim = int(manifest["provenance"]["dim"])
        self.cells_count = int(info["cells"])
        self.reader = ResolutionReader(store, part_infos(info, files), self.dim, manifest["precision"], str(store),
                                       missing=lambda rel: _missing(store, manifest, rel))
        self.quantization = quant = manifest.get("quantization")
        self.scale = np.asarray(quant["scale"], np.float32) if quant else None
        self.offset = np.asarray(quant["offset"], np.float32) if quant else None

    def vectors(self, cells: NDArray[np.uint64]) -> NDArray[np.float32]:
        """(n, dim) float32 embeddings of ``cells``; rows of cells the atlas lacks are NaN."""
        return self.reader.vectors(cells, self.quantization)

    def scan(self) -> tuple[NDArray[np.uint64], NDArray[np.float32]]:
        """Every cell of the resolution and its embedding (only for small resolutions)."""
        cells, stored = self.reader.scan()
        if self.scale is not None:
            return cells, dequantize(stored, self.scale, self.offset)
        return cells, stored.astype(np.float32)


def _missing(store: Store, manifest: dict[str, Any], rel: str) -> Exception:
    """The error for a file that ``manifest`` names and ``store`` lacks: the atlas was rebuilt
    since it was opened (its manifest is another now), or it is damaged."""
    try:
        current = read_manifest(store)
    except (AtlasCorruptError, OSError):
        current = None
    if current != manifest:
        was, now = manifest.get("generation", 0), (current or {}).get("generation", "?")
        return AtlasChangedError(
            f"{store} was rebuilt while it was open (generation {was}, now {now}): {rel} is gone. Open it again "
            "(query.open, or Atlas.reopen()) to read the new dataset")
    return AtlasCorruptError(f"{store}/{rel} is missing; run 'hexatlas validate {store}' and rebuild or "
                             "re-download the dataset")


class Atlas:
    """An opened atlas: use :func:`query.open`. Every method is read-only and thread-safe.

    It reads the dataset as its manifest was when it was opened. If an ``--overwrite``
    rebuild replaces it meanwhile, answers stay those of the old dataset until a call needs
    a file the rebuild has deleted; that call raises :class:`AtlasChangedError`, and
    :meth:`reopen` gives the new dataset. No answer mixes the two.
    """

    def __init__(self, datasets: dict[str, tuple[Store, dict[str, Any]]],
                 mirrors: dict[str, Path] | None = None, digests: dict[str, str] | None = None,
                 location: str | None = None) -> None:
        self._location = location
        self._datasets = datasets
        self._mirrors = mirrors or {}  # remote dataset name -> local folder of the files fetched whole
        self._digests = digests or {}  # remote dataset name -> sha256 of the manifest read
        self._loaded: dict[tuple[str, int], _Resolution] = {}
        self._indexes: dict[tuple[str, int], Any] = {}  # FAISS indexes, opened
        self._samples: dict[tuple[str, int], Any] = {}  # the indexes' samples of cells, read
        self._land_cells: dict[tuple[str, int], NDArray[np.uint64]] = {}  # memory-mapped
        self._exact: dict[str, Any] = {}  # dataset name -> its exported encoder (query.exact), loaded once
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()

    def reopen(self) -> Atlas:
        """The atlas at the same place, opened again: its current datasets (after a rebuild)."""
        if self._location is None:
            raise InvalidArgumentError("this Atlas was not opened from a path; open it with query.open(PATH)")
        return open_atlas(self._location)

    def _file_gone(self, name: str, rel: str) -> Exception:
        store, manifest = self._datasets[name]
        return _missing(store, manifest, rel)

    def _local(self, name: str, rels: list[str]) -> list[Path]:
        """Local paths of the files ``rels`` of a dataset: in the dataset itself, or (for one in
        object storage) in its mirror, where missing files are downloaded and checked first.
        Either way each path is checked to stay in its folder once links are followed."""
        store, manifest = self._datasets[name]
        if isinstance(store, LocalStore):
            return [store.path(rel) for rel in rels]
        from catalog.provenance import sha256_file

        mirror = self._mirrors[name]
        records = {rec["path"]: rec for rec in manifest["files"]}
        paths = []
        with self._fetch_lock:
            for rel in rels:
                # rel was checked with the manifest; this checks the final path, links followed
                dest = inside(mirror, mirror / rel, where=f"the cache of {store}")
                paths.append(dest)
                if dest.is_file():
                    continue
                tmp = dest.with_name(f".{dest.name}.{os.getpid()}.download")
                for _ in range(2):  # once more if it fails its sha256: bytes changed on the way differ next time
                    try:
                        if (size := store.size(rel)) != records[rel]["bytes"]:
                            raise AtlasCorruptError(f"{store}/{rel} has {size:,} bytes, its manifest says "
                                                    f"{records[rel]['bytes']:,}; not downloading it. Run "
                                                    f"'hexatlas validate {store}'")
                        store.download(rel, tmp)
                    except FileNotFoundError:
                        raise self._file_gone(name, rel) from None
                    if ok := sha256_file(tmp) == records[rel]["sha256"]:
                        break
                if not ok:
                    tmp.unlink()
                    raise AtlasCorruptError(
                        f"{store}/{rel} does not match the sha256 in its manifest; run 'hexatlas validate {store}'"
                    )
                os.replace(tmp, dest)
        return paths

    # ----------------------------------------------------------------- description
    @property
    def models(self) -> list[str]:
        """Names of the datasets (one per model)."""
        return sorted(self._datasets)

    def resolutions(self, model: str | None = None) -> list[int]:
        """Built resolutions of a model, ascending."""
        return sorted(int(r) for r in self._manifest(model)["resolutions"])

    def dim(self, model: str | None = None) -> int:
        return int(self._manifest(model)["provenance"]["dim"])

    def info(self) -> dict[str, Any]:
        """A plain-JSON summary: per model its provenance, precision and per-resolution counts."""
        out = {}
        for name, (store, manifest) in sorted(self._datasets.items()):
            out[name] = {
                "path": str(store), "format_version": manifest["format_version"], "model": manifest["provenance"]["model"], "dim": manifest["provenance"]["dim"],
                "precision": manifest["precision"], "created": manifest["created"],
                "land_only": manifest["build"]["land_only"],
                "region": _region_summary(manifest["build"].get("region")),
                "resolutions": {r: {"cells": i["cells"], "parts": len(i["parts"]), "zarr": i.get("zarr"),
                                    "index": i["index"]["type"],
                                    "recall_at_10": i["index"]["recall_at_10"],
                                    "index_detail": _index_detail(i["index"]),
                                    "land_flags": bool(i.get("land")) or manifest["build"]["land_only"],
                                    "fidelity": i.get("fidelity")}
                                for r, i in sorted(manifest["resolutions"].items(), key=lambda kv: int(kv[0]))},
                "provenance": manifest["provenance"],
                "exact": _exact_summary(name, manifest),
            }
            if not store.is_local:  # what was read: the manifest's digest; URL, Hub commit, ETag where known
                out[name]["source"] = {**store.describe(), "manifest_sha256": self._digests.get(name)}
        return out

    def __repr__(self) -> str:
        parts = [f"{m} (res {','.join(map(str, self.resolutions(m)))})" for m in self.models]
        return f"Atlas({'; '.join(parts)})"

    def _name(self, model: str | None) -> str:
        if model is None:
            if len(self._datasets) == 1:
                return next(iter(self._datasets))
            raise UnknownEncoderError(f"this atlas holds several models; choose one with model=: {', '.join(self.models)}")
        if model in self._datasets:
            return model
        by_model = [n for n, (_, m) in self._datasets.items() if m["provenance"]["model"] == model]
        if by_model:
            return by_model[0]
        raise UnknownEncoderError(f"model {model!r} is not in this atlas; it holds: {', '.join(self.models)}")

    def _manifest(self, model: str | None) -> dict[str, Any]:
        return self._datasets[self._name(model)][1]

    def _res(self, res: int | None, model: str | None) -> int:
        built = self.resolutions(model)
        if res is None:
            return built[-1]
        if not isinstance(res, (int, np.integer)) or isinstance(res, bool) or int(res) not in built:
            raise UnknownResolutionError(
                f"resolution {res!r} is not in this atlas for {self._name(model)}; built: {', '.join(map(str, built))}"
            )
        return int(res)

    # ----------------------------------------------------------------- data access
    def _data(self, model: str | None, res: int) -> _Resolution:
        name = self._name(model)
        key = (name, res)
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = _Resolution(*self._datasets[name], res)
            return self._loaded[key]

    def _exact_encoder(self, model: str | None) -> Any:
        """The dataset's exported encoder, loaded (and its sha256 checked) on first use."""
        from query.exact import ExactEncoder, require_onnxruntime, unavailable_reason

        name = self._name(model)
        manifest = self._manifest(name)
        reason = unavailable_reason(name, manifest)
        if reason is not None:
            raise InvalidArgumentError(f"exact=True: {reason}")
        require_onnxruntime()
        with self._lock:
            if name not in self._exact:
                info = manifest["encoder_onnx"]
                store = self._datasets[name][0]
                path = self._local(name, [info["path"]])[0]
                self._exact[name] = ExactEncoder(path, info, f"{store}/{info['path']}")
            return self._exact[name]

    def _embed(self, lat: NDArray[np.float64], lon: NDArray[np.float64], res: int, model: str | None,
               interpolate: bool, exact: bool = False) -> tuple[NDArray[np.uint64], NDArray[np.float32]]:
        """Cells and embeddings of valid points; rows of points outside the atlas are NaN."""
        cells = latlng_to_cells(lat, lon, res)
        if exact:
            return cells, self._exact_encoder(model).encode(lat, lon)
        data = self._data(model, res)
        if not interpolate:
            return cells, data.vectors(cells)
        return cells, interpolate_cells(data.vectors, lat, lon, cells)  # NaN where the own cell is not held

    def lookup(self, lat: ArrayLike, lon: ArrayLike, *, res: int | None = None, model: str | None = None,
               interpolate: bool = False, on_invalid: str = "raise", exact: bool = False,
               land: bool = False) -> NDArray[np.float32] | tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """Embeddings at points.

        Parameters
        ----------
        lat, lon : array-like of float, shape (n,) or scalars
            Degrees.
        res : int, optional
            H3 resolution; defaults to the finest built.
        interpolate : bool
            Blend the three nearest cell centres by inverse distance, so that a point between
            centres gets a smooth embedding, instead of its cell's embedding.
        on_invalid : {"raise", "null"}
            NaN/out-of-range coordinates (and points in cells the atlas lacks: open ocean in a
            land-only atlas, outside the region of a regional one) raise, or give a row of NaN
            with "null".
        exact : bool
            The encoder's embedding at the point itself, computed by the encoder the atlas
            stores (ONNX, run with onnxruntime: ``pip install 'hexatlas[exact]'``; never
            torch) instead of the stored embedding of the point's cell. Reads no cells, so
            ``res`` and ``interpolate`` do not apply (giving either raises), and a land-only
            or regional atlas answers everywhere.
        land : bool
            Also return whether each point's cell touches land by the build's land mask.

        Returns
        -------
        numpy.ndarray, float32, shape (n, dim)
            With ``land=True``, a tuple: that and a bool array of shape (n,) (False where
            the row is NaN).

        Raises
        ------
        InvalidArgumentError
            ``exact=True`` on a dataset without an exported encoder (the message says why:
            a plugin encoder that could not be exported, or an atlas built before exports).
        MissingDependencyError
            ``exact=True`` without onnxruntime installed.
        """
        if on_invalid not in ON_INVALID:
            raise InvalidArgumentError(f"on_invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
        if exact and (res is not None or interpolate):
            given = "res= and interpolate=True" if res is not None and interpolate else (
                "res=" if res is not None else "interpolate=True")
            raise InvalidArgumentError(f"exact=True evaluates the encoder at each point and reads no cells, so {given} "
                                       "does not apply; drop it, or use exact=False for the cell embeddings")
        res = self._res(res, model)
        lat_a, lon_a = as_coordinates(lat=lat, lon=lon, allow_invalid=on_invalid == "null")
        bad = invalid_mask(lat_a, lon_a)
        out = np.full((lat_a.size, self.dim(model)), np.nan, dtype=np.float32)
        cells, emb = self._embed(lat_a[~bad], lon_a[~bad], res, model, interpolate, exact)
        out[~bad] = emb
        if on_invalid == "raise":
            _raise_if_missing(out, lat_a, lon_a, res, self._region_text(model))
        if land:
            flags = np.zeros(lat_a.size, bool)
            flags[~bad] = self.land_flags(cells, res=res, model=model)
            return out, flags & ~np.isnan(out[:, 0])
        return out

    def join(self, points: Any, *, lat_col: str | None = None, lon_col: str | None = None, res: int | None = None,
             model: str | None = None, interpolate: bool = False, on_invalid: str = "raise",
             exact: bool = False, land: bool = False) -> pa.Table:
        """Add ``cell`` (uint64) and ``embedding`` (fixed-size list of float32) to a point table.

        ``points``: a pyarrow Table, a pandas, polars or GeoPandas DataFrame, or a path (CSV,
        Parquet or GeoParquet; GeoPackage, GeoJSON, FlatGeobuf... with GeoPandas installed).
        The points are the ``lat``/``lon`` columns (or ``lat_col``/``lon_col``), else the
        table's point geometry, transformed to WGS 84 from its CRS (pyproj, ``pip install
        'hexatlas[geo]'``); the geometry is kept as it is, with GeoParquet ``geo`` metadata, so
        ``pyarrow.parquet.write_table`` writes GeoParquet and
        ``geopandas.GeoDataFrame.from_arrow`` reads the result. Rows with invalid coordinates
        (or null, empty or non-point geometries) raise, or get null cell and embedding with
        ``on_invalid="null"``. ``exact=True``: the embedding is the encoder's at the point (see
        :meth:`lookup`); ``cell`` is still the point's cell at ``res``. ``land=True`` adds
        ``land`` (bool: the cell touches land by the build's land mask; null where the
        embedding is). The whole table is held in memory: for a file larger than memory use
        :meth:`join_file` (or :meth:`join_batches`), which stream.
        """
        check_join_options(on_invalid, exact, interpolate)
        table = as_table(points, action="join onto")
        where = locate_points(table.schema, lat_col=lat_col, lon_col=lon_col)
        return self._join_table(table, where, res=self._res(res, model), model=model, interpolate=interpolate,
                                on_invalid=on_invalid, exact=exact, land=land)

    def join_batches(self, points: Any, *, lat_col: str | None = None, lon_col: str | None = None,
                     res: int | None = None, model: str | None = None, interpolate: bool = False,
                     on_invalid: str = "raise", exact: bool = False, land: bool = False,
                     batch_rows: int | None = None) -> pa.RecordBatchReader:
        """:meth:`join` as a stream: joined record batches, each read, looked up and handed on
        before the next is read, so memory follows ``batch_rows``, not the input.

        ``points``: a file path (read a batch at a time), a ``pyarrow.RecordBatchReader`` (or
        any Arrow stream), or an in-memory table. ``batch_rows`` defaults to what joins in about
        64 MB (43,690 rows of a 256-d atlas). An invalid row raises when its batch is read.
        """
        from query.streaming import join_batches

        return join_batches(self, points, lat_col=lat_col, lon_col=lon_col, res=res, model=model,
                            interpolate=interpolate, on_invalid=on_invalid, exact=exact, land=land,
                            batch_rows=batch_rows)

    def join_file(self, points: Any, output: str | os.PathLike[str], *, lat_col: str | None = None,
                  lon_col: str | None = None, res: int | None = None, model: str | None = None,
                  interpolate: bool = False, on_invalid: str = "raise", exact: bool = False, land: bool = False,
                  batch_rows: int | None = None, progress: bool | None = None) -> int:
        """Join ``points`` (as :meth:`join_batches` takes them) and write the result to ``output``
        as it goes: ``.parquet`` (a row group a batch; GeoParquet when the input has a geometry)
        or ``.csv`` (embeddings as JSON lists, a geometry as WKT). The file appears complete or
        not at all. ``progress``: a bar on stderr (None: when it is a terminal). Returns the
        number of rows written.
        """
        from query.streaming import join_file

        return join_file(self, points, output, lat_col=lat_col, lon_col=lon_col, res=res, model=model,
                         interpolate=interpolate, on_invalid=on_invalid, exact=exact, land=land,
                         batch_rows=batch_rows, progress=progress)

    def _join_table(self, table: pa.Table, where: Coordinates, *, res: int, model: str | None, interpolate: bool,
                    on_invalid: str, exact: bool, land: bool, first_row: int = 0) -> pa.Table:
        """The join of one table (or one batch of a stream: ``first_row`` numbers its rows in messages)."""
        for name in ("cell", "embedding") + (("land",) if land else ()):
            if name in table.column_names:
                raise InvalidArgumentError(f"the points already have a {name!r} column; rename or drop it first")
        lat, lon = where.read(table, first_row=first_row, allow_invalid=on_invalid == "null")
        bad = invalid_mask(lat, lon)
        if bad.any():
            emb = np.full((lat.size, self.dim(model)), np.nan, dtype=np.float32)
            cells = np.zeros(lat.size, dtype=np.uint64)
            cells[~bad], emb[~bad] = self._embed(lat[~bad], lon[~bad], res, model, interpolate, exact)
        else:  # the common case: no masked copies of a (n, dim) matrix
            cells, emb = self._embed(lat, lon, res, model, interpolate, exact)
        if on_invalid == "raise":
            _raise_if_missing(emb, lat, lon, res, self._region_text(model), first_row=first_row)
        missing = np.isnan(emb[:, 0])
        valid = pa.array(~missing)
        cell_col = pa.array(cells, pa.uint64(), mask=missing)
        emb_col = embedding_array(emb)
        if missing.any():
            emb_col = pa.FixedSizeListArray.from_arrays(emb_col.values, emb_col.type.list_size, mask=pa.compute.invert(valid))
        table = table.append_column("cell", cell_col).append_column("embedding", emb_col)
        if land:
            flags = np.zeros(len(cells), bool)
            flags[~missing] = self.land_flags(cells[~missing], res=res, model=model)
            table = table.append_column("land", pa.array(flags, pa.bool_(), mask=missing))
        return table

    def land_flags(self, cells: ArrayLike, *, res: int | None = None, model: str | None = None) -> NDArray[np.bool_]:
        """Whether each cell (uint64 H3 ids of resolution ``res``) touches land by the build's
        land mask: all True in a land-only atlas; from ``land/res=<r>.npy`` otherwise.

        Raises
        ------
        InvalidArgumentError
            The atlas was built before land flags were stored (rebuild it).
        """
        name = self._name(model)
        res = self._res(res, name)
        cells = np.asarray(cells, dtype=np.uint64).reshape(-1)
        flags = self._land(name, res)
        return np.ones(len(cells), bool) if flags is None else in_sorted(flags, cells)

    def _region_text(self, model: str | None) -> str:
        region = self._manifest(model)["build"].get("region")
        return f" {tuple(region['bbox'])}" if region else ""

    # ----------------------------------------------------------------- search
    def _index(self, model: str | None, res: int) -> tuple[Any, dict[str, Any]]:
        """The resolution's index. Local: FAISS, memory-mapped (its inverted lists are paged in
        as searches read them). Remote IVF-PQ with a list directory: read in place
        (:class:`catalog.remote_index.InPlaceIndex`: the trained parts once, then the lists a
        search probes). Otherwise (a flat index of a small resolution, or an atlas built
        before list directories) the file is fetched whole into the cache first."""
        from catalog.vector_index import read_index

        name = self._name(model)
        info = self._manifest(name)["resolutions"][str(res)]["index"]
        with self._lock:
            if (name, res) not in self._indexes:
                store, manifest = self._datasets[name]
                if not store.is_local and not info["exact"] and info.get("lists"):
                    self._indexes[(name, res)] = self._in_place_index(name, res, info)
                    return self._indexes[(name, res)], info
                path = self._local(name, [info["path"]])[0]
                if not path.is_file():
                    raise self._file_gone(name, info["path"])
                manifest = self._manifest(name)
                self._indexes[(name, res)] = read_index(path, info, int(manifest["provenance"]["dim"]),
                                                        int(manifest["resolutions"][str(res)]["cells"]),
                                                        f"{self._datasets[name][0]}/{info['path']}")
            return self._indexes[(name, res)], info

    def _sample(self, model: str | None, res: int) -> Any:
        """The resolution's sample of cells (:class:`catalog.vector_index.Sample`), the seeds
        of a filtered search, read whole and checked against its sha256 on first use; None
        for an index without one (exact, or built before samples)."""
        from catalog.vector_index import Sample

        name = self._name(model)
        rel = self._manifest(name)["resolutions"][str(res)]["index"].get("sample")
        if rel is None:
            return None
        with self._lock:
            if (name, res) not in self._samples:
                store, manifest = self._datasets[name]
                self._samples[(name, res)] = Sample.parse(self._checked_bytes(name, rel),
                                                          int(manifest["provenance"]["dim"]), f"{store}/{rel}")
            return self._samples[(name, res)]

    def _checked_bytes(self, name: str, rel: str) -> bytes:
        """A small file of dataset ``name`` read whole, checked against its manifest's sha256."""
        import hashlib

        store, manifest = self._datasets[name]
        record = {rec["path"]: rec for rec in manifest["files"]}[rel]
        try:
            data = store.read_bytes(rel, limit=record["bytes"])
        except FileNotFoundError:
            raise self._file_gone(name, rel) from None
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise AtlasCorruptError(f"{store}/{rel} does not match the sha256 in its manifest; run "
                                    f"'hexatlas validate {store}'")
        return data

    def _in_place_index(self, name: str, res: int, info: dict[str, Any]) -> Any:
        from catalog.blocks import _RemoteBytes
        from catalog.remote_index import InPlaceIndex

        store, manifest = self._datasets[name]
        records = {rec["path"]: rec for rec in manifest["files"]}
        where = f"{store}/{info['path']}"
        directory = self._checked_bytes(name, info["lists"])
        try:
            file = _RemoteBytes(store, info["path"])
        except FileNotFoundError:
            raise self._file_gone(name, info["path"]) from None
        if file.size != records[info["path"]]["bytes"]:
            raise AtlasCorruptError(f"{where} has {file.size:,} bytes, its manifest says "
                                    f"{records[info['path']]['bytes']:,}; run 'hexatlas validate {store}'")
        return InPlaceIndex(file.read, file.size, info, int(manifest["provenance"]["dim"]),
                            int(manifest["resolutions"][str(res)]["cells"]), directory, where)

    def _land(self, name: str, res: int) -> NDArray[np.uint64] | None:
        """The sorted cells that touch land of a global atlas's resolution (memory-mapped);
        None for a land-only atlas, where every cell does."""
        manifest = self._manifest(name)
        if manifest["build"]["land_only"]:
            return None
        land = manifest["resolutions"][str(res)].get("land")
        if land is None:
            raise InvalidArgumentError("this atlas was built before land flags were stored; rebuild it to use "
                                       "land_only (hexatlas build ... --overwrite)")
        with self._lock:
            if (name, res) not in self._land_cells:
                path = self._local(name, [land["path"]])[0]
                try:
                    flags = np.load(path, mmap_mode="r", allow_pickle=False)
                except FileNotFoundError:
                    raise self._file_gone(name, land["path"]) from None
                except (ValueError, OSError, EOFError) as exc:
                    raise AtlasCorruptError(f"{self._datasets[name][0]}/{land['path']} is not a land table ({exc}); "
                                            "run 'hexatlas validate'") from None
                if flags.dtype != np.dtype("<u8") or flags.shape != (land["cells"],):
                    raise AtlasCorruptError(f"{self._datasets[name][0]}/{land['path']} holds {flags.dtype} of shape "
                                            f"{flags.shape}, not the {land['cells']:,} cells its manifest says; "
                                            "run 'hexatlas validate'")
                self._land_cells[(name, res)] = flags
            return self._land_cells[(name, res)]

    def similar(self, *, lat: float | None = None, lon: float | None = None, cell: int | str | None = None,
                vector: ArrayLike | None = None, k: int = 10, res: int | None = None, model: str | None = None,
                bbox: tuple[float, float, float, float] | None = None,
                exclude_within_km: float | None = None, land_only: bool = False) -> pa.Table:
        """The ``k`` cells most similar to a place, a cell or a vector, by cosine similarity.

        Give exactly one of ``lat``/``lon``, ``cell`` or ``vector``; ``k`` up to 1,000.
        ``bbox`` = (min_lon, min_lat, max_lon, max_lat) keeps results whose centre is inside
        (searched exactly over the box's cells when it holds at most 20,000);
        ``exclude_within_km`` drops results closer than that to the query place;
        ``land_only`` keeps cells that touch land (always so in a land-only atlas). The index
        proposes candidates; they are re-ranked by exact cosine similarity against the stored
        embeddings. Filters that leave no cell raise :class:`InvalidArgumentError`; filters
        that leave fewer than ``k`` among the most similar 100,000 return those, with a warning.

        Returns
        -------
        pyarrow.Table
            ``cell`` (uint64), ``lat``, ``lon`` (cell centre), ``score`` (cosine), best first.
        """
        from catalog.vector_index import normalize, require_faiss

        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 < k <= MAX_K:
            raise InvalidArgumentError(f"k must be an integer from 1 to {MAX_K:,}, got {k!r}")
        given = [name for name, v in (("lat/lon", lat if lat is not None else lon), ("cell", cell),
                                      ("vector", vector)) if v is not None]
        if len(given) != 1:
            raise InvalidArgumentError(f"give exactly one of lat= and lon=, cell= or vector=; got {', '.join(given) or 'none'}")
        res = self._res(res, model)
        data = self._data(model, res)
        origin, own = None, np.empty(0, np.int64)  # own: the query's cell, where the walk also starts
        if vector is not None:
            try:
                query = np.asarray(vector, dtype=np.float32).reshape(1, -1)
            except (TypeError, ValueError):
                raise InvalidArgumentError(f"vector must be {self.dim(model)} numbers") from None
            if query.shape[1] != self.dim(model) or not np.isfinite(query).all() or not np.abs(query).sum():
                raise InvalidArgumentError(f"vector must hold {self.dim(model)} finite numbers, not all zero; got "
                                           f"{query.shape[1]} numbers{'' if np.isfinite(query).all() else ' with NaN or inf'}")
        elif cell is not None:
            cid = hex_to_cell(cell)
            query = data.vectors(np.array([cid], dtype=np.uint64))
            if np.isnan(query[0, 0]):
                raise InvalidArgumentError(f"cell {cid:x} is not in this atlas at resolution {res}")
            origin = tuple(x[0] for x in cells_to_latlng(np.array([cid], dtype=np.uint64)))
            own = np.array([cid], np.int64)
        else:
            if lat is None or lon is None:
                raise InvalidArgumentError("give both lat= and lon=")
            query = self.lookup([lat], [lon], res=res, model=model)
            origin = (float(lat), float(lon))
            own = latlng_to_cells(np.array([origin[0]]), np.array([origin[1]]), res).astype(np.int64)
        if exclude_within_km is not None and origin is None:
            raise InvalidArgumentError("exclude_within_km needs a place (lat/lon or cell), not a vector")
        if exclude_within_km is not None and not (np.isfinite(exclude_within_km) and exclude_within_km >= 0):
            raise InvalidArgumentError(f"exclude_within_km must be a finite distance >= 0, got {exclude_within_km!r}")
        if bbox is not None:
            bbox = _check_bbox(bbox)
        query = normalize(query)
        name = self._name(model)
        keep = _Filters(bbox, exclude_within_km, origin, self._land(name, res) if land_only else None)

        def exact(ids: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
            vectors = data.vectors(ids.astype(np.uint64))
            held = ~np.isnan(vectors[:, 0])
            return ids[held], normalize(vectors[held])

        if bbox is not None and _cells_in_box(bbox, res) <= BBOX_EXACT_CELLS:
            import h3

            try:
                return _box_search(data, query[0], k, bbox, res, keep)
            except h3.H3FailedError:  # h3 cannot fill some boxes at a pole: the index search filters them too
                pass
        index, info = self._index(model, res)
        # One query split over OpenMP threads runs 2-2.5x slower than on one thread (measured on
        # 2 cores, flat and IVF). The setting is per calling thread, so it is restored here and
        # concurrent callers (the server's thread pool) do not disturb each other.
        faiss = require_faiss()
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return _filtered_search(index, info, query, k, exact, keep, res, own,
                                    self._sample(model, res) if keep.active or not own.size else None)
        finally:
            faiss.omp_set_num_threads(threads)

    # ----------------------------------------------------------------- SQL
    def connect(self) -> Any:
        """A DuckDB connection with the ``embeddings`` view(s) and h3 SQL functions.

        Views: ``embeddings`` (the only or first model) and ``embeddings_<model>`` for each:
        ``cell UBIGINT, res INTEGER, lat DOUBLE, lon DOUBLE, embedding FLOAT[d]``. Functions
        named as in DuckDB's h3 extension: ``h3_latlng_to_cell(lat, lng, res)``,
        ``h3_cell_to_lat``, ``h3_cell_to_lng``, ``h3_cell_to_parent``, ``h3_cell_to_resolution``.
        """
        from query.sql import View, connect

        httpfs = None
        if any(not store.is_local for store, _ in self._datasets.values()):
            from query.sql import httpfs_extension

            httpfs = httpfs_extension()
        views = [View(name, self.dim(name), self._parquet_glob(name, httpfs is not None),
                      self._manifest(name).get("quantization"),
                      land=self._has_land_flags(name),
                      land_column=all(i.get("land_column") for i in self._manifest(name)["resolutions"].values()))
                 for name in self.models]

        def lookup(lat: NDArray[np.float64], lon: NDArray[np.float64], res: int, model: str | None) -> NDArray:
            return self.lookup(lat, lon, res=res, model=model, on_invalid="null")

        def land(cells: NDArray[np.uint64], res: int, model: str | None) -> NDArray[np.bool_]:
            return self.land_flags(cells, res=res, model=model)

        return connect(views, lookup, land, httpfs)

    def _has_land_flags(self, name: str) -> bool:
        manifest = self._manifest(name)
        return manifest["build"]["land_only"] or all(i.get("land") for i in manifest["resolutions"].values())

    def sql(self, text: str) -> pa.Table:
        """Run SQL on :meth:`connect`'s connection and return an Arrow table."""
        from query.sql import QueryError, run_sql

        try:
            return run_sql(self.connect(), text)
        except QueryError:  # a part file deleted by a rebuild reads as DuckDB's IO error
            for name, (store, manifest) in self._datasets.items():
                gone = [p["path"] for info in manifest["resolutions"].values() for p in info["parts"]
                        if isinstance(store, LocalStore) and not (store.root / p["path"]).is_file()]
                if gone and isinstance(changed := self._file_gone(name, gone[0]), AtlasChangedError):
                    raise changed from None
            raise

    def _parquet_glob(self, name: str, httpfs: bool = False) -> list[str]:
        """The dataset's part files, as its manifest lists them (a glob would also take those
        of a rebuild being published, or already published). A remote dataset's are URLs that
        DuckDB's httpfs reads in place (row groups by range) when ``httpfs``; else they are
        downloaded into the cache first, with a warning saying what to install."""
        store, manifest = self._datasets[name]
        parts = [p for info in manifest["resolutions"].values() for p in info["parts"]]
        if not store.is_local and httpfs:
            # DuckDB sizes a scan of many files from the first one: the largest first, so a
            # join builds its hash table on the points, not on the atlas's parts
            parts.sort(key=lambda p: -p["rows"])
        rels = [p["path"] for p in parts]
        if not store.is_local and httpfs:
            from catalog.storage import HttpStore

            # the Hub's URLs name the commit first read: SQL reads the same revision as lookups
            return [store.url(rel).replace("%3D", "=") if isinstance(store, HttpStore) else f"{store.uri}/{rel}"
                    for rel in rels]
        if not store.is_local:
            from query.sql import REMOTE_SQL_INSTALL

            missing = [rel for rel in rels if not (self._mirrors[name] / rel).is_file()]
            if missing:
                warnings.warn(f"SQL on {store} downloads its {len(missing)} part files into the cache: DuckDB's httpfs "
                              f"extension, which reads them in place, is not installed ({REMOTE_SQL_INSTALL})",
                              stacklevel=3)
        return [str(path) for path in self._local(name, rels)]


def _exact_summary(name: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What ``info`` shows of the exported encoder: whether exact=True works, and its record or why not."""
    from query.exact import unavailable_reason

    reason = unavailable_reason(name, manifest)
    if reason is not None:
        return {"available": False, "reason": reason}
    info = manifest["encoder_onnx"]
    return {"available": True, **{k: info[k] for k in ("path", "bytes", "sha256", "opset", "licence", "parity")}}
def _region_summary(region: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``info`` shows of a regional atlas's area: its box, and the GeoJSON's file and digest."""
    if region is None:
        return None
    return {k: region[k] for k in ("bbox", "file", "sha256") if k in region}


def _index_detail(index: dict[str, Any]) -> dict[str, Any]:
    """What ``info`` shows of a resolution's index: its parameters, size and measured recall."""
    keys = ("type", "exact", "nlist", "nprobe", "nprobe_placed", "rerank", "recall_at_10", "recall_lower_bound", "recall_queries",
            "recall", "recall_epsilon", "bytes", "bytes_per_cell", "share_of_embeddings", "build_s")
    return {key: index[key] for key in keys if key in index}


def _raise_if_missing(emb: NDArray[np.float32], lat: NDArray[np.float64], lon: NDArray[np.float64], res: int,
                      region: str = "", first_row: int = 0) -> None:
    bad = invalid_mask(lat, lon)
    if bad.any():
        as_coordinates(lat=lat, lon=lon, first_index=first_row)  # raises with the first bad index
    missing = np.isnan(emb[:, 0])
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise InvalidCoordinateError(
            f"{int(missing.sum())} of {len(lat)} points fall in cells this atlas does not hold at resolution {res} "
            f"(a land-only atlas has no open-ocean cells, a regional one none outside its region{region}); first "
            f"at index {first_row + i}: lat={lat[i]}, lon={lon[i]}. Pass on_invalid='null' to get NaN rows instead"
        )


MAX_K = 1000
FILTER_SPAN = 3  # a filter decides by ancestors this many resolutions coarser where it can (_Filters.of)
FALLBACK_POINTS = 64  # where a filtered search also looks when the most similar cells do not pass
BBOX_EXACT_CELLS = 20_000  # a box with at most about this many cells is searched exactly, cell by cell (~0.2 s)


def _check_bbox(bbox: Any) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in bbox)
    except (TypeError, ValueError):
        box = ()
    if (len(box) != 4 or not all(np.isfinite(box)) or not -180 <= box[0] <= box[2] <= 180
            or not -90 <= box[1] <= box[3] <= 90):
        raise InvalidArgumentError(f"bbox must be (min_lon, min_lat, max_lon, max_lat) in degrees, min <= max, "
                                   f"got {bbox!r}")
    return box  # type: ignore[return-value]


class _Filters:
    """Which result cells a search keeps: in the box, far enough from the origin, on land."""

    def __init__(self, bbox: Any, exclude_km: float | None, origin: Any, land: NDArray[np.uint64] | None) -> None:
        self.bbox, self.exclude_km, self.origin, self.land = bbox, exclude_km, origin, land

    def __call__(self, cells: NDArray[np.uint64], lat: NDArray[np.float64], lon: NDArray[np.float64]) -> NDArray[np.bool_]:
        ok = np.ones(len(cells), dtype=bool)
        if self.bbox is not None:
            b = self.bbox
            ok &= (lon >= b[0]) & (lat >= b[1]) & (lon <= b[2]) & (lat <= b[3])
        if self.exclude_km is not None:
            ok &= haversine_km(lat, lon, self.origin[0], self.origin[1]) >= self.exclude_km
        if self.land is not None:
            ok &= in_sorted(self.land, cells)
        return ok

    def of(self, cells: NDArray[np.uint64]) -> NDArray[np.bool_]:
        """:meth:`__call__` for cells of one resolution, without the centre of every cell: the
        box and the circle are decided by the cells' ancestors :data:`FILTER_SPAN` resolutions
        coarser where all their descendants fall on one side, and by the cells' own centres
        only near an edge (a filtered search's pool at resolution 7 is ~100,000 cells, whose
        centres cost ~75 ms a query)."""
        cells = np.asarray(cells, np.uint64)
        ok = in_sorted(self.land, cells) if self.land is not None else np.ones(len(cells), bool)
        if (self.bbox is None and self.exclude_km is None) or not ok.any():
            return ok
        at = np.flatnonzero(ok)
        coarsest = int(((cells[at] >> np.uint64(52)) & np.uint64(0xF)).min())  # an H3 index's resolution bits
        coarse = max(0, coarsest - FILTER_SPAN)
        parents, which = np.unique(cells_to_parent(cells[at], coarse), return_inverse=True)
        verdict = self._verdict(*cells_to_latlng(parents), descendant_spread_km(coarse))[which]
        ok[at[verdict == 0]] = False
        unsure = at[verdict < 0]
        if unsure.size:
            ok[unsure] = self(cells[unsure], *cells_to_latlng(cells[unsure]))
        return ok

    def _verdict(self, lat: NDArray[np.float64], lon: NDArray[np.float64], spread_km: float) -> NDArray[np.int8]:
        """For places whose cells' centres lie within ``spread_km`` of (lat, lon): 1 where all
        pass the box and the circle, 0 where none does, -1 where it depends on the cell."""
        every, none = np.ones(len(lat), bool), np.zeros(len(lat), bool)
        if self.exclude_km is not None:
            d = haversine_km(lat, lon, self.origin[0], self.origin[1])
            every &= d - spread_km >= self.exclude_km
            none |= d + spread_km < self.exclude_km
        if self.bbox is not None:
            b, reach = self.bbox, spread_km / EARTH_RADIUS_KM  # the cap's angular radius
            dlat = np.degrees(reach)
            polar = np.abs(lat) + dlat >= 90  # the cap holds a pole: every longitude
            dlon = np.degrees(np.arcsin(np.minimum(1.0, np.sin(reach) / np.maximum(np.cos(np.radians(lat)), 1e-12))))
            dlon[polar] = 360.0
            wraps = (lon - dlon < -180) | (lon + dlon > 180)
            every &= (lat - dlat >= b[1]) & (lat + dlat <= b[3]) & (lon - dlon >= b[0]) & (lon + dlon <= b[2]) & ~wraps
            none |= (lat + dlat < b[1]) | (lat - dlat > b[3]) | (~wraps & ((lon + dlon < b[0]) | (lon - dlon > b[2])))
        return np.where(none, 0, np.where(every, 1, -1)).astype(np.int8)

    def inside(self, res: int) -> NDArray[np.int64]:
        """Cells of resolution ``res`` that may pass, wherever the most similar do not: points
        just outside the excluded circle, a grid of points in the box (see ``fallback`` in
        :func:`catalog.vector_index.reranked_search`)."""
        import h3

        lat, lon = np.empty(0), np.empty(0)
        if self.exclude_km is not None:
            lat0, lon0 = np.radians(self.origin)
            d = min(self.exclude_km + 2 * h3.average_hexagon_edge_length(res, unit="km"),
                    np.pi * EARTH_RADIUS_KM * 0.999) / EARTH_RADIUS_KM
            bearing = np.linspace(0, 2 * np.pi, FALLBACK_POINTS, endpoint=False)
            lat = np.arcsin(np.sin(lat0) * np.cos(d) + np.cos(lat0) * np.sin(d) * np.cos(bearing))
            lon = lon0 + np.arctan2(np.sin(bearing) * np.sin(d) * np.cos(lat0), np.cos(d) - np.sin(lat0) * np.sin(lat))
            lat, lon = np.degrees(lat), (np.degrees(lon) + 540) % 360 - 180
        if self.bbox is not None:
            side = int(np.sqrt(FALLBACK_POINTS))
            b = self.bbox
            gx, gy = np.meshgrid(np.linspace(b[0], b[2], side), np.linspace(b[1], b[3], side))
            lat, lon = np.concatenate([lat, gy.ravel()]), np.concatenate([lon, gx.ravel()])
        return np.unique(latlng_to_cells(lat, lon, res)).astype(np.int64) if len(lat) else np.empty(0, np.int64)

    @property
    def active(self) -> bool:
        return self.bbox is not None or self.exclude_km is not None or self.land is not None

    def describe(self) -> str:
        parts = [f"bbox {self.bbox}" if self.bbox is not None else "",
                 f"exclude_within_km={self.exclude_km:g}" if self.exclude_km is not None else "",
                 "land_only" if self.land is not None else ""]
        return ", ".join(p for p in parts if p)


def _result(cells: NDArray[np.uint64], lat: Any, lon: Any, scores: Any) -> pa.Table:
    return pa.table({"cell": pa.array(cells, pa.uint64()), "lat": lat, "lon": lon,
                     "score": pa.array(scores, pa.float32())})


def _filtered_search(index: Any, info: dict[str, Any], query: NDArray[np.float32], k: int, exact: Any,
                     keep: _Filters, res: int, own: NDArray[np.int64], sample: Any = None) -> pa.Table:
    """The index's re-ranked results that pass ``keep`` (see
    :func:`catalog.vector_index.reranked_search`); the walk along the grid also starts from
    ``own`` (the query's cell, if any) and, filtered or from a vector, from the best of
    ``sample`` (that pass)."""
    from catalog.vector_index import MAX_CANDIDATES, reranked_search

    def passing(ids: NDArray[np.int64]) -> NDArray[np.bool_]:
        return keep.of(ids.astype(np.uint64))

    try:
        scores, ids = reranked_search(index, query, k, exact, rerank=info.get("rerank", 1), expand=info.get("expand", False),
                                      seeds=[own], keep=passing if keep.active else None,
                                      fallback=[keep.inside(res)] if keep.active else None, sample=sample,
                                      placed_nprobe=info.get("nprobe_placed"))
    except AtlasCorruptError as exc:
        raise AtlasCorruptError(f"resolution {res}: {exc}") from None
    found = ids[0] >= 0
    cells, scores = ids[0][found].astype(np.uint64), scores[0][found]
    if len(cells) < k and keep.active:
        if not len(cells):
            raise InvalidArgumentError(f"no cell among the {MAX_CANDIDATES:,} most similar passes the filters "
                                       f"({keep.describe()}); widen them")
        warnings.warn(f"only {len(cells)} of the most similar cells pass the filters ({keep.describe()}; up to "
                      f"{MAX_CANDIDATES:,} searched); returning {len(cells)}, not {k}", stacklevel=3)
    lat, lon = cells_to_latlng(cells)
    return _result(cells, lat, lon, scores)


def _cells_in_box(bbox: tuple[float, float, float, float], res: int) -> float:
    """About how many cells of resolution ``res`` have their centre in ``bbox``."""
    import h3

    lon0, lat0, lon1, lat1 = np.radians(bbox)
    area = EARTH_RADIUS_KM ** 2 * (lon1 - lon0) * (np.sin(lat1) - np.sin(lat0))
    return float(area / h3.average_hexagon_area(res, unit="km^2"))


def _box_cells(bbox: tuple[float, float, float, float], res: int) -> NDArray[np.uint64]:
    """Every cell of resolution ``res`` whose centre is in ``bbox``, and some just outside.

    h3 fills polygons whose edges are great circles: the box is cut into pieces at most 90
    degrees wide, each outlined by a vertex a degree, widened by two cell edges.
    """
    import h3

    lon0, lat0, lon1, lat1 = bbox
    pad = 2 * np.degrees(h3.average_hexagon_edge_length(res, unit="km") / EARTH_RADIUS_KM)
    a0, a1 = max(lat0 - pad, -89.999), min(lat1 + pad, 89.999)
    widen = pad / max(np.cos(np.radians(max(abs(a0), abs(a1)))), 1e-3)
    o0, o1 = max(lon0 - widen, -180.0), min(lon1 + widen, 180.0)
    found = [np.empty(0, np.uint64)]
    cuts = np.linspace(o0, o1, int(np.ceil((o1 - o0) / 90)) + 1) if o1 > o0 else np.array([o0, o1])
    for left, right in itertools.pairwise(cuts):
        steps = max(2, int(max(right - left, a1 - a0)) + 1)
        lons, lats = np.linspace(left, right, steps), np.linspace(a0, a1, steps)
        ring = ([(a0, x) for x in lons] + [(y, right) for y in lats[1:]] + [(a1, x) for x in lons[::-1][1:]]
                + [(y, left) for y in lats[::-1][1:-1]])
        found.append(np.array([h3.str_to_int(c) for c in h3.polygon_to_cells(h3.LatLngPoly(ring), res)],
                              dtype=np.uint64))
    return np.unique(np.concatenate(found))


def _box_search(data: _Resolution, query: NDArray[np.float32], k: int, bbox: tuple[float, float, float, float],
                res: int, keep: _Filters) -> pa.Table:
    """Exact search over the stored cells whose centre is in ``bbox``."""
    from catalog.vector_index import normalize

    cells = _box_cells(bbox, res)
    lat, lon = cells_to_latlng(cells)
    inside = keep(cells, lat, lon)
    cells, lat, lon = cells[inside], lat[inside], lon[inside]
    vectors = data.vectors(cells)
    held = ~np.isnan(vectors[:, 0])
    if not held.any():
        raise InvalidArgumentError(f"no cell of resolution {res} in this atlas passes the filters "
                                   f"({keep.describe()}); widen them")
    cells, lat, lon = cells[held], lat[held], lon[held]
    scores = normalize(vectors[held]) @ query
    order = np.argsort(-scores, kind="stable")[:k]
    if len(order) < k:
        warnings.warn(f"only {len(order)} cells pass the filters ({keep.describe()}); returning {len(order)}, "
                      f"not {k}", stacklevel=3)
    return _result(cells[order], lat[order], lon[order], scores[order])


def _cache_dir() -> Path:
    return Path(os.environ.get("HEXATLAS_CACHE") or Path.home() / ".cache" / "hexatlas")
