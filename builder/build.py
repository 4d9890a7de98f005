"""The atlas build: evaluate an encoder at every H3 cell centre and publish the results.

Stages, each measured: enumerate (cells and centres of a shard), encode, write (the shard's
part file of format 2, see :mod:`catalog.blocks`), then per resolution the index (and the
Zarr store when asked for), then the manifest. Shards are independent; each is
written to a temporary name, renamed, and only then recorded as done under ``_build/``, so a
build killed at any moment and started again with the same arguments redoes at most the
shards in flight. The manifest is written last: until it exists the dataset is unfinished
and the query layer refuses it. One build per dataset at a time on a local disk (an OS file
lock, released even on SIGKILL); object storage has no such lock (see :func:`_exclusive`).

Shards run here (``executor="local"``: enumeration, encoding and writing overlapped in
threads) or as Ray tasks (``executor="ray"``, :mod:`builder.executors`); both call the same
per-shard steps and write the same files. The output is a local directory or an
``s3://bucket/prefix`` (:mod:`catalog.storage`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from builder.finish import IndexBuilder, ShardSource, ZarrRows
from builder.grid import Shard, cell_centers, cell_count, parse_resolutions, plan_shards, shard_cells
from catalog import manifest as fmt
from catalog.blocks import block_rows, embedding_column, write_part
from catalog.errors import AtlasBusyError, InvalidArgumentError
from catalog.storage import LocalStore, Store, is_remote, open_store
from catalog.tables import dequantize

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from builder.encoders._base import Encoder

__all__ = ["EXECUTORS", "BuildConfig", "BuildSummary", "ShardJob", "build", "process_shard"]

log = logging.getLogger(__name__)

PRECISIONS = ("float16", "float32", "int8")
EXECUTORS = ("local", "ray")
PARQUET_WRITERS = max(1, (os.cpu_count() or 2) // 2)  # shard files written at once (pyarrow frees the GIL)
ENCODE_CHUNK = 65536  # cells per encode call: the progress bar's granularity


@dataclass(frozen=True)
class BuildConfig:
    """What to build; validated on construction. See :func:`build` for the fields."""

    model: str
    resolutions: tuple[int, ...]
    output: Path | str  # a local directory, or an s3:// URI kept as text
    checkpoint: str | None = None
    land_only: bool = False
    device: str = "auto"
    precision: str = "float16"
    batch_size: int | None = None
    overwrite: bool = False
    trust_checkpoint: bool = False
    executor: str = "local"
    ray_address: str | None = None
    formats: tuple[str, ...] = ("parquet",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolutions", parse_resolutions(self.resolutions))
        formats = self.formats.split(",") if isinstance(self.formats, str) else list(self.formats)
        formats = [f.strip().lower() for f in formats if f.strip()]
        unknown = [f for f in formats if f not in fmt.FORMATS]
        if unknown:
            raise InvalidArgumentError(f"unknown format {unknown[0]!r}; choose from {', '.join(fmt.FORMATS)} "
                                       "(parquet, the store itself, is always written)")
        object.__setattr__(self, "formats", tuple(f for f in fmt.FORMATS if f in {"parquet", *formats}))
        remote = is_remote(os.fspath(self.output))
        object.__setattr__(self, "output", os.fspath(self.output).rstrip("/") if remote else Path(self.output))
        if self.executor not in EXECUTORS:
            raise InvalidArgumentError(f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}")
        if self.ray_address is not None and self.executor != "ray":
            raise InvalidArgumentError(
                f"a Ray address ({self.ray_address!r}) needs executor='ray' (--executor ray)"
            )
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if self.precision not in PRECISIONS:
            raise InvalidArgumentError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.batch_size is not None and self.batch_size <= 0:
            raise InvalidArgumentError(f"batch_size must be positive, got {self.batch_size}")

    def identity(self, provenance_sha256: str) -> dict[str, Any]:
        """What must match for a resumed build to continue the same work."""
        return {
            "model": self.model, "weights_sha256": provenance_sha256, "resolutions": list(self.resolutions),
            "land_only": self.land_only, "precision": self.precision, "formats": list(self.formats),
        }


@dataclass
class BuildSummary:
    """What a build did: where, how many cells, how many bytes, seconds and cells/s per stage."""

    dataset: Path | str  # a local directory, or the s3:// URI of the dataset
    cells: dict[int, int]
    bytes: int
    seconds: dict[str, float] = field(default_factory=dict)
    resumed_shards: int = 0

    def __str__(self) -> str:
        total = sum(self.cells.values())
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        per_res = ", ".join(f"r{r}: {n:,}" for r, n in sorted(self.cells.items()))
        resumed = f"; {self.resumed_shards} shards reused from an earlier run" if self.resumed_shards else ""
        return f"{total:,} cells ({per_res}), {self.bytes / 1e6:,.1f} MB in {self.dataset}; {stages}{resumed}"


class _Timer:
    """Seconds per stage, from any thread; a stage nested in another (in the same thread) is
    taken out of the outer one's time, so that each second counts once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        nested = self._local.__dict__.setdefault("nested", [])  # per open stage: seconds in inner stages
        nested.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = nested.pop()
            if nested:
                nested[-1] += elapsed
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - inner


@contextlib.contextmanager
def _exclusive(dataset: Path | Store) -> Iterator[None]:
    """Hold the dataset's build lock; the OS releases it when the process dies.

    Object storage has no lock that the OS releases on a crash, and pyarrow's S3 client
    cannot make conditional writes, so an ``s3://`` dataset is not locked: a warning says
    so, and keeping to one build per dataset is up to the user (or their scheduler).
    """
    import fcntl

    if isinstance(dataset, Store) and not dataset.is_local:
        log.warning("%s is in object storage, which has no build lock: make sure no other build writes it now", dataset)
        yield
        return
    dataset = dataset.root if isinstance(dataset, LocalStore) else Path(dataset)
    dataset.mkdir(parents=True, exist_ok=True)
    with open(dataset / "_build.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AtlasBusyError(
                f"another build is writing {str(dataset)!r}; wait for it to finish (or stop it) and run again"
            ) from None
        yield


class Quantizer:
    """Per-dimension affine int8 quantisation: ``value = q * scale + offset``."""

    def __init__(self, scale: NDArray[np.float32], offset: NDArray[np.float32]) -> None:
        self.scale, self.offset = np.asarray(scale, np.float32), np.asarray(offset, np.float32)

    @classmethod
    def calibrate(cls, encoder: Encoder) -> Quantizer:
        """Range of each dimension over the res-2 cell centres and 20,000 random points, +5%."""
        cells = shard_cells(Shard(2))
        lat, lon = cell_centers(cells)
        rng = np.random.default_rng(0)
        z = rng.uniform(-1, 1, 20_000)
        lat = np.concatenate([lat, np.degrees(np.arcsin(z))])
        lon = np.concatenate([lon, rng.uniform(-180, 180, 20_000)])
        emb = encoder.encode(lat=lat, lon=lon)
        lo, hi = emb.min(0), emb.max(0)
        margin = 0.05 * (hi - lo) + 1e-6
        lo, hi = lo - margin, hi + margin
        return cls((hi - lo) / 254.0, (hi + lo) / 2.0)

    def encode(self, values: NDArray[np.float32]) -> NDArray[np.int8]:
        q = np.rint((values - self.offset) / self.scale)
        return np.clip(q, -127, 127).astype(np.int8)

    def decode(self, q: NDArray[Any], out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        return dequantize(q, self.scale, self.offset, out)

    def to_dict(self) -> dict[str, list[float]]:
        return {"scale": self.scale.tolist(), "offset": self.offset.tolist()}


def _encode_stored(encoder: Encoder, lat: NDArray, lon: NDArray, precision: str, quantizer: Quantizer | None,
                   on_chunk: Any = None) -> NDArray[Any]:
    """Embeddings of the points as stored: cast batch by batch while copied out of the
    encoder (float16, float32), or quantised (int8)."""
    dtype = np.float16 if precision == "float16" else np.float32
    emb = np.empty((lat.size, encoder.dim), dtype=dtype)
    for start in range(0, lat.size, ENCODE_CHUNK):
        stop = min(start + ENCODE_CHUNK, lat.size)
        encoder.encode(lat=lat[start:stop], lon=lon[start:stop], out=emb[start:stop])
        if on_chunk is not None:
            on_chunk(stop - start)
    if precision == "int8":
        assert quantizer is not None
        return quantizer.encode(emb)
    return emb


class _BuildState:
    """The ``_build/`` directory: build identity and which shards and stages are done."""

    def __init__(self, dataset: Store) -> None:
        self.store = dataset
        self.dir = fmt.BUILD_DIR
        self.done_dir = f"{fmt.BUILD_DIR}/done"

    def start(self, identity: dict[str, Any]) -> dict[str, Any] | None:
        """Record or check the identity; returns the saved state of an earlier run, if any."""
        path = f"{self.dir}/build.json"
        if self.store.exists(path):
            saved = self.store.read_json(path)
            diff = {k: (saved["identity"].get(k), v) for k, v in identity.items() if saved["identity"].get(k) != v}
            if diff:
                detail = "; ".join(f"{k}: earlier {a!r}, now {b!r}" for k, (a, b) in diff.items())
                raise InvalidArgumentError(
                    f"an unfinished build with other arguments is in {str(self.store)!r} ({detail}); run it again "
                    "with the same arguments to resume, or pass --overwrite (Python: overwrite=True) to start over"
                )
            return saved
        return None

    def save(self, identity: dict[str, Any], extra: dict[str, Any]) -> None:
        self.store.write_json(f"{self.dir}/build.json", {"identity": identity, **extra})

    def done(self, name: str) -> dict[str, Any] | None:
        path = f"{self.done_dir}/{name}.json"
        return self.store.read_json(path) if self.store.exists(path) else None

    def all_done(self) -> dict[str, dict[str, Any]]:
        """Every done record by name, in one listing (one request per 1,000 on object storage)."""
        names = [rel for rel in self.store.files(self.done_dir) if rel.endswith(".json")]
        return {rel.rsplit("/", 1)[-1][: -len(".json")]: self.store.read_json(rel) for rel in sorted(names)}

    def records(self) -> list[dict[str, Any]]:
        return [r for name, r in self.all_done().items() if name.startswith("res=")]

    def mark(self, name: str, record: dict[str, Any]) -> None:
        self.store.write_json(f"{self.done_dir}/{name}.json", record)


def _step_name(shard: Shard) -> str:
    return f"res={shard.res}_shard={shard.key}"


def build(
    model: str = "geoclip",
    *,
    resolutions: str | int | tuple[int, ...] = "0-3",
    output: str | Path = "atlas",
    checkpoint: str | None = None,
    land_only: bool = False,
    device: str = "auto",
    precision: str = "float16",
    batch_size: int | None = None,
    overwrite: bool = False,
    trust_checkpoint: bool = False,
    progress: bool | None = None,
    encoder: Encoder | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    formats: str | tuple[str, ...] = ("parquet",),
) -> BuildSummary:
    """Build (or resume) one model's dataset in an atlas directory.

    Parameters
    ----------
    model : str
        Encoder name (see :func:`builder.encoders.list_encoders`) or ``module:callable``.
    resolutions : str, int or sequence of int
        ``"0-5"``, ``"3,5"`` or a list: H3 resolutions to build.
    output : path or str
        The atlas directory, or an ``s3://bucket/prefix`` (credentials and endpoint from the
        standard AWS environment variables); the dataset goes to ``output/<model>/``. Other
        models' datasets in the same place are left alone.
    land_only : bool
        Keep only cells that touch land (see :mod:`builder.landmask`).
    precision : {"float16", "float32", "int8"}
        Storage of the embeddings; int8 stores per-dimension scale and offset.
    overwrite : bool
        Replace a finished dataset (built beside it and swapped in when complete: the old one
        stays readable until then), or start an unfinished one over.
    encoder : Encoder, optional
        An already-loaded encoder (then ``model``, ``checkpoint``, ``device`` are ignored).
        With ``executor="ray"`` it is put in Ray's object store and unpickled by the workers.
    executor : {"local", "ray"}
        Run the shards in this process, or as Ray tasks (one GPU per task where the cluster
        has GPUs, else one CPU); needs ``pip install 'hexatlas[ray]'``.
    ray_address : str, optional
        The Ray cluster to join (``ray://host:10001``, ``host:6379`` or ``auto``); default:
        an already initialised Ray, else ``$RAY_ADDRESS``, else a new local instance.
    formats : str or sequence of str
        Faces to write besides the store: ``"zarr"`` adds a Zarr store per resolution that
        ``xdggs.decode(xarray.open_zarr(...))`` reads (a second copy of the embeddings).
        ``"parquet"`` is the store itself (plain Parquet), always written.

    Returns
    -------
    BuildSummary

    Raises
    ------
    AtlasBusyError
        Another build is writing the same (local) dataset.
    BuildFailedError
        Ray tasks failed after their retries; the finished shards are kept for a resume.
    InvalidArgumentError
        A finished dataset exists (without ``overwrite``), or an unfinished one has other
        arguments.
    """
    from builder.encoders import load_encoder

    config = BuildConfig(
        model=model, resolutions=resolutions, output=output, checkpoint=checkpoint, land_only=land_only,
        device=device, precision=precision, batch_size=batch_size, overwrite=overwrite,
        trust_checkpoint=trust_checkpoint, executor=executor, ray_address=ray_address, formats=formats,
    )
    encoder_given = encoder is not None
    if encoder_given:
        config = replace(config, model=encoder.name)
    timer = _Timer()
    with timer("load model"):
        if encoder is None:
            encoder = load_encoder(config.model, checkpoint=config.checkpoint, device=config.device,
                                   batch_size=config.batch_size, trust_checkpoint=config.trust_checkpoint)
    dataset = open_store(config.output).child(fmt.dataset_name(encoder.name))
    with _exclusive(dataset):
        _publish_rebuild(dataset)  # finishes a swap that a killed run left half done
        if config.overwrite and dataset.exists(fmt.MANIFEST):
            return _rebuild(config, encoder, dataset, timer, progress, encoder_given)
        return _build_locked(config, encoder, dataset, timer, progress, encoder_given)


def _rebuild(config: BuildConfig, encoder: Encoder, dataset: Store, timer: _Timer, progress: bool | None,
             encoder_given: bool) -> BuildSummary:
    """``overwrite`` of a finished dataset: build the new one beside it, then swap it in.

    The old dataset stays published (and queryable) until the new one is complete; a killed
    rebuild resumes when run again with the same arguments, like any build.
    """
    staging = dataset.child(fmt.REBUILD_DIR)
    config = replace(config, overwrite=False)
    try:
        _BuildState(staging).start(config.identity(encoder.provenance.sha256))
    except InvalidArgumentError:  # an interrupted rebuild with other arguments: start over
        staging.delete_tree()
    summary = _build_locked(config, encoder, staging, timer, progress, encoder_given, name=dataset.name)
    _publish_rebuild(dataset)
    summary.dataset = dataset.root if isinstance(dataset, LocalStore) else dataset.uri
    return summary


def _publish_rebuild(dataset: Store) -> None:
    """Swap a finished rebuild (``_build.rebuild/``) in; nothing when there is none.

    The old manifest goes first, then the old files the new dataset does not have; the new
    files move in, the manifest last. Readers see the old dataset, then an unfinished one,
    then the new one, never a mix. Killed halfway, it carries on when called again.
    """
    staging = dataset.child(fmt.REBUILD_DIR)
    if not staging.exists(fmt.MANIFEST):
        return
    new = {record["path"] for record in staging.read_json(fmt.MANIFEST)["files"]} | {fmt.STAC}
    dataset.delete(fmt.MANIFEST)
    for rel in dataset.files():
        if not rel.startswith(fmt.BUILD_DIR) and rel not in new:  # keeps _build.lock, _build.rebuild/
            dataset.delete(rel)
    for rel in sorted(staging.files()):
        if rel != fmt.MANIFEST:
            dataset.move(f"{fmt.REBUILD_DIR}/{rel}", rel)
    dataset.move(f"{fmt.REBUILD_DIR}/{fmt.MANIFEST}", fmt.MANIFEST)
    dataset.delete_tree(fmt.REBUILD_DIR)
    if isinstance(dataset, LocalStore):  # directories of files the new dataset does not have
        for path in sorted(dataset.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def _build_locked(config: BuildConfig, encoder: Encoder, dataset: Store, timer: _Timer,
                  progress: bool | None, encoder_given: bool = False, name: str | None = None) -> BuildSummary:
    identity = config.identity(encoder.provenance.sha256)
    if dataset.exists(fmt.MANIFEST) and not config.overwrite:
        raise InvalidArgumentError(
            f"{str(dataset)!r} already holds a finished {encoder.name} dataset; pass --overwrite (Python: "
            "overwrite=True) to rebuild it, or choose another --output"
        )
    if config.overwrite:
        dataset.delete_tree(keep=("_build.lock",))
    state = _BuildState(dataset)
    saved = state.start(identity)
    quantizer = None
    if config.precision == "int8":
        if saved and "quantization" in saved:
            quantizer = Quantizer(**saved["quantization"])
        else:
            with timer("calibrate"):
                quantizer = Quantizer.calibrate(encoder)
    state.save(identity, {"quantization": quantizer.to_dict()} if quantizer else {})
    if isinstance(dataset, LocalStore):
        _remove_stale_temporaries(dataset.root)

    shards = plan_shards(config.resolutions)
    done_records = state.all_done()
    present = set(dataset.files("data")) | set(dataset.files("blocks"))
    todo = [s for s in shards
            if (r := done_records.get(_step_name(s))) is None or not all(f["path"] in present for f in r["files"])]
    resumed = len(shards) - len(todo)
    land = _land_cells(config) if config.land_only else {}
    job = ShardJob(dataset, config.precision, quantizer.to_dict() if quantizer else None,
                   _parquet_metadata(encoder, config.precision, quantizer), "zarr" in config.formats)
    if config.executor == "ray":
        from builder.executors import run_ray

        run_ray(todo, job, config, encoder, land, state, timer, progress, _total_cells(todo, land, state),
                encoder_given=encoder_given)
    else:
        _run_shards(todo, encoder, job, land, state, timer, progress)

    cells: dict[int, int] = {}
    res_info: dict[str, Any] = {}
    files: list[dict[str, Any]] = []
    done_records = state.all_done()
    for res in config.resolutions:
        records = [r for s in shards if s.res == res and (r := done_records[_step_name(s)])["rows"]]
        cells[res] = sum(r["rows"] for r in records)
        files += [f for r in records for f in r["files"]]
        info = {"cells": cells[res], "block_rows": block_rows(encoder.dim, config.precision),
                "parts": [{k: r[k] for k in ("path", "blocks", "rows", "first_cell", "last_cell")} for r in records]}
        # a resolution not streamed while its shards were written (Ray, resumed) is finished now
        source = ShardSource(dataset, records, encoder.dim, config.precision, quantizer)
        with _finishing(res, cells[res], encoder, job, land.get(res), state, timer, source) as finish:
            if finish is not None:
                with timer("read back"), _progress(progress, cells[res], f"finish res {res}") as bar:
                    for table in source.tables(finish.columns):  # the Zarr and index time is their own
                        finish.add(table)
                        bar.update(table.num_rows)
        zarr_done, index_done = state.done(f"zarr-res={res}"), state.done(f"index-res={res}")
        info["zarr"], info["index"] = (fmt.zarr_relpath(res) if job.zarr else None), index_done["index"]
        files += (zarr_done["files"] if job.zarr else []) + [index_done["file"]]
        res_info[str(res)] = info

    manifest = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "dataset": name or dataset.name,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "provenance": encoder.provenance.to_dict(), "precision": config.precision,
        "quantization": quantizer.to_dict() if quantizer else None,
        "resolutions": res_info, "files": sorted(files, key=lambda r: r["path"]),
        "build": {**asdict(config), "output": str(config.output), "land_only": config.land_only,
                  "ray_address": None,  # where it ran is not part of the dataset
                  "land_mask": _land_mask_description() if config.land_only else None,
                  "device": str(encoder.device), "compute_dtype": str(encoder.dtype).removeprefix("torch.")},
        "software": _versions(), "timings_s": {k: round(v, 3) for k, v in timer.seconds.items()},
    }
    dataset.write_json(fmt.STAC, fmt.stac_collection(manifest))
    dataset.write_json(fmt.MANIFEST, manifest)  # the publish step: last, atomic
    dataset.delete_tree(fmt.BUILD_DIR)
    where = dataset.root if isinstance(dataset, LocalStore) else dataset.uri
    return BuildSummary(where, cells, sum(f["bytes"] for f in files), dict(timer.seconds), resumed)


def _remove_stale_temporaries(dataset: Path) -> None:
    # Left by a killed run: half-written files never renamed into place.
    for path in list(dataset.rglob("*.tmp")) + list(dataset.rglob("*.tmpdir")):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _land_cells(config: BuildConfig) -> dict[int, NDArray[np.uint64]]:
    from builder.landmask import land_cells

    return {res: land_cells(res) for res in config.resolutions}


def _land_mask_description() -> str:
    from builder.landmask import MASK_DESCRIPTION

    return MASK_DESCRIPTION


def _enumerate(shard: Shard, land: dict[int, NDArray[np.uint64]]) -> tuple[NDArray[np.uint64], NDArray, NDArray]:
    cells = shard_cells(shard)
    if shard.res in land:
        keep = land[shard.res]
        pos = np.minimum(np.searchsorted(keep, cells), len(keep) - 1)
        cells = cells[keep[pos] == cells]
    lat, lon = cell_centers(cells)
    return cells, lat, lon


@dataclass(frozen=True)
class ShardJob:
    """What writing a shard of one dataset needs besides the encoder; small and picklable.

    ``dataset`` travels as its location: an ``s3://`` store is re-resolved from the
    environment of the process that unpickles it, so credentials never ride with a task.
    """

    dataset: Store
    precision: str
    quantization: dict[str, list[float]] | None
    metadata: dict[str, str]
    zarr: bool = False  # also write the Zarr face

    def quantizer(self) -> Quantizer | None:
        return Quantizer(**self.quantization) if self.quantization else None


def _parquet_metadata(encoder: Encoder, precision: str, quantizer: Quantizer | None) -> dict[str, str]:
    return {
        "hexatlas.provenance": encoder.provenance.to_json(), "hexatlas.precision": precision,
        **({"hexatlas.quantization": json.dumps(quantizer.to_dict())} if quantizer else {}),
    }


def _total_cells(todo: list[Shard], land: dict[int, NDArray[np.uint64]], state: _BuildState) -> int:
    from builder.grid import shard_size

    if land:
        done_rows = sum(r["rows"] for r in state.records() if r.get("res") in land)
        return sum(len(c) for c in land.values()) - done_rows
    return sum(shard_size(s) for s in todo)


def process_shard(job: ShardJob, shard: Shard, encoder: Encoder,
                  land: dict[int, NDArray[np.uint64]] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """One shard, start to finish: enumerate, encode, write its part file.

    The unit of work of a distributed build (a Ray task runs exactly this). The file name
    depends only on the shard and is published atomically, so running a shard twice (a
    retried task) replaces the file with the same content instead of adding a second one.

    Returns
    -------
    record : dict
        The shard's done record: ``res``, ``rows``, ``path``, ``blocks``, ``first_cell``,
        ``last_cell`` and ``files`` (path, bytes, sha256 of each; none for an empty shard).
    seconds : dict
        Seconds spent per stage (enumerate, encode, write).
    """
    timer = _Timer()
    with timer("enumerate"):
        cells, lat, lon = _enumerate(shard, land or {})
    with timer("encode"):
        stored = _encode_stored(encoder, lat, lon, job.precision, job.quantizer())
    with timer("write"):
        record = _write_shard(job.dataset, shard, cells, stored, job.metadata)
    return record, timer.seconds


def _run_shards(todo: list[Shard], encoder: Encoder, job: ShardJob, land: dict[int, NDArray[np.uint64]],
                state: _BuildState, timer: _Timer, progress: bool | None) -> None:
    """Encode shards in this process; enumerating and writing run beside the encoder.

    Resolutions go largest first, each with a writer thread of its own: it writes the
    shards' part files and, when this run writes every shard of the resolution, feeds them
    straight into its index (and Zarr store, when asked for), which it then publishes while
    the encoder goes on with the next resolution.
    """
    quantizer = job.quantizer()
    by_res = {res: [s for s in todo if s.res == res] for res in sorted({s.res for s in todo}, reverse=True)}
    order = [shard for shards in by_res.values() for shard in shards]

    def write_one(shard: Shard, cells: NDArray[np.uint64], stored: NDArray[Any]) -> None:
        record = _write_shard(job.dataset, shard, cells, stored, job.metadata)
        state.mark(_step_name(shard), record)

    def write_res(res: int, shards: list[Shard], feed: queue.Queue[Any]) -> None:
        # streamed only when this run writes every shard of the resolution, in cell order
        streamed = len(shards) == len(plan_shards([res]))
        n = len(land[res]) if res in land else cell_count(res)
        source = ShardSource(job.dataset, lambda: [r for s in shards if (r := state.done(_step_name(s)))["rows"]],
                             encoder.dim, job.precision, quantizer)
        with (_finishing(res, n, encoder, job, land.get(res), state, timer, source) if streamed
              else contextlib.nullcontext()) as finish:
            written: list[Future[None]] = []  # Parquet files being written, oldest first
            try:
                while (item := feed.get()) is not _END:
                    if item is _CANCEL:  # the encoder failed: unwind without publishing
                        raise _Cancelled
                    shard, cells, stored = item
                    table = _shard_table(cells, stored)
                    written.append(parquet_pool.submit(_timed, timer, "write", write_one, shard, cells, stored))
                    if finish is not None:
                        finish.add(table, stored)
                    # at most 2 x PARQUET_WRITERS files in flight; a failed write stops the resolution
                    while written and (written[0].done() or len(written) > 2 * PARQUET_WRITERS):
                        written.pop(0).result()
            finally:  # the resolution is published only once its Parquet files are
                for future in written:
                    future.result()

    writers: list[tuple[queue.Queue[Any], Future[None]]] = []
    with _progress(progress, _total_cells(todo, land, state), f"build {encoder.name}") as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="enumerate") as enum_pool, \
            ThreadPoolExecutor(max(len(by_res), 1), thread_name_prefix="finish") as finish_pool, \
            ThreadPoolExecutor(PARQUET_WRITERS, thread_name_prefix="parquet") as parquet_pool:
        try:
            position = 0
            next_cells = enum_pool.submit(_timed, timer, "enumerate", _enumerate, order[0], land) if order else None
            for res, shards in by_res.items():
                feed: queue.Queue[Any] = queue.Queue(maxsize=1)  # at most one shard waits to be written
                writers.append((feed, finish_pool.submit(write_res, res, shards, feed)))
                for shard in shards:
                    with timer("wait enumerate"):
                        cells, lat, lon = next_cells.result()
                    position += 1
                    if position < len(order):
                        next_cells = enum_pool.submit(_timed, timer, "enumerate", _enumerate, order[position], land)
                    with timer("encode"):
                        stored = _encode_stored(encoder, lat, lon, job.precision, quantizer, bar.update)
                    with timer("wait write"):
                        _hand_over(writers[-1], (shard, cells, stored))
                    for _, earlier in writers[:-1]:  # one may still be publishing: stop at its error
                        if earlier.done():
                            earlier.result()
                _hand_over(writers[-1], _END)
        except BaseException:
            for writer in writers:  # written shards stay done; unpublished stores are removed
                with contextlib.suppress(BaseException):
                    _hand_over(writer, _CANCEL)
            for _, future in writers:
                with contextlib.suppress(BaseException):
                    future.result()
            raise
        for _, future in writers:
            future.result()


_END, _CANCEL = object(), object()  # what a writer's feed ends with: all shards given, or none will be


class _Cancelled(Exception):
    """Raised in a writer whose encoder failed, to unwind its open stores."""


def _hand_over(writer: tuple[queue.Queue[Any], Future[None]], item: Any) -> None:
    """Put ``item`` in a writer's feed; if the writer has stopped, raise its error."""
    feed, future = writer
    while True:
        try:
            feed.put(item, timeout=0.05)
            return
        except queue.Full:
            if future.done():
                future.result()  # raises the writer's error
                raise RuntimeError("a shard writer stopped before its resolution was complete") from None


class _Finisher:
    """A resolution's Zarr rows and index (each None when an earlier run finished it), fed
    shard tables in cell order."""

    def __init__(self, zarr_rows: ZarrRows | None, index: IndexBuilder | None, source: ShardSource,
                 timer: _Timer) -> None:
        self.zarr_rows, self.index, self.source, self.timer = zarr_rows, index, source, timer
        self.columns = ("cell", "embedding")

    def add(self, table: pa.Table, stored: NDArray[Any] | None = None) -> None:
        """Add a shard's rows; ``stored``: its embeddings as a writeable array, when at hand."""
        if self.zarr_rows is not None:
            with self.timer("zarr"):
                self.zarr_rows.add(table)
        if self.index is not None:
            with self.timer("index"):
                self.index.add(table.column("cell").to_numpy(),
                               self.source.unit_vectors(table if stored is None else stored))


@contextlib.contextmanager
def _finishing(res: int, n: int, encoder: Encoder, job: ShardJob, keep: NDArray[np.uint64] | None,
               state: _BuildState, timer: _Timer, source: ShardSource) -> Iterator[_Finisher | None]:
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
        stored = _encode_stored(encoder, lat, lon, job.precision, quantizer)
        return cells.astype(np.int64), source.unit_vectors(stored).copy()

    index = None
    if not index_done:
        with timer("index"):
            index = IndexBuilder(res, n, encoder.dim, vectors_of, keep)
    with (contextlib.nullcontext() if zarr_done else ZarrRows.staged(dataset, res, n, quantizer)) as zarr_rows:
        yield _Finisher(zarr_rows, index, source, timer)
    if zarr_rows is not None:
        state.mark(f"zarr-res={res}", {"files": zarr_rows.files})
    if index is not None:
        with timer("index"):
            params, file = index.publish(dataset, source)
        state.mark(f"index-res={res}", {"index": params, "file": file})
    source.release()


def _progress(progress: bool | None, total: int, desc: str) -> Any:
    """A progress bar of cells (cells/s, ETA); ``progress`` None: only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cell", desc=desc, disable=not progress if progress is not None else None,
                smoothing=0.1)


def _timed(timer: _Timer, stage: str, fn: Any, *args: Any) -> Any:
    with timer(stage):
        return fn(*args)


def _shard_table(cells: NDArray[np.uint64], stored: NDArray[Any]) -> pa.Table:
    """A shard's rows as its part file holds them (no copies of the arrays)."""
    return pa.table({"cell": pa.array(cells, pa.uint64()), "embedding": embedding_column(stored)})


def _write_shard(dataset: Store, shard: Shard, cells: NDArray[np.uint64], stored: NDArray[Any],
                 metadata: dict[str, str]) -> dict[str, Any]:
    """Write one shard's part file and block table (atomically, under fixed names); returns
    its done record. A shard without cells (open ocean in a land-only build) writes nothing."""
    part, blocks = fmt.part_relpath(shard.res, shard.key), fmt.blocks_relpath(shard.res, shard.key)
    record: dict[str, Any] = {"res": shard.res, "rows": len(cells), "path": part, "blocks": blocks, "files": []}
    if not len(cells):
        return record
    with dataset.staged(part) as tmp_part, dataset.staged(blocks) as tmp_blocks:
        write_part(tmp_part, tmp_blocks, cells, stored, metadata={**metadata, "hexatlas.res": str(shard.res)})
        record["files"] = [fmt.file_record(Path(), part, local=tmp_part),
                           fmt.file_record(Path(), blocks, local=tmp_blocks)]
    return {**record, "first_cell": int(cells[0]), "last_cell": int(cells[-1])}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("hexatlas", "torch", "h3", "pyarrow", "numpy", "xarray", "zarr", "faiss-cpu", "faiss-gpu-cu12",
                 "global-land-mask"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out
