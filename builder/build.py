"""The atlas build: evaluate an encoder at every H3 cell centre and publish the results.

The build is a pipeline whose stages each have their module: :mod:`builder.plan` (what to
build, which shards, which are done), :mod:`builder.encode` (cell centres through the
encoder, into the stored precision), :mod:`builder.write` (a shard's part file and its codes
in the resolution's index, :mod:`builder.index`) and :mod:`builder.finish` (the index merged,
the Zarr face), :mod:`builder.export` (the encoder as ONNX, for exact lookups without torch), then
:mod:`builder.publish` (the manifest, last; the lock; the swap of a rebuild). This module
runs them: here, overlapped in threads (``executor="local"``), or as Ray tasks
(``executor="ray"``, :mod:`builder.executors`), which only decides where the per-shard
steps run, not what they do.

Shards are independent; each is written to a temporary name, renamed, and only then
recorded as done under ``_build/``, so a build killed at any moment and started again with
the same arguments redoes at most the shards in flight. The manifest is written last: until
it exists the dataset is unfinished and the query layer refuses it. An ``--overwrite``
rebuild writes the next generation's files beside the published ones (never over them) and
swaps by replacing the manifest. One build per dataset at
a time on a local disk (an OS file lock, released even on SIGKILL); object storage has no
such lock (see :func:`builder.publish.exclusive`). The output is a local directory or an
``s3://bucket/prefix`` (:mod:`catalog.storage`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from builder import encode, write
from builder._timing import Timer, progress_bar, timed
from builder.encode import Quantizer
from builder.fidelity import measure_written
from builder.finish import finish_map, finish_resolution, finishing, train_index
from builder.grid import Shard, cell_count, plan_shards
from builder.landmask import release as release_land_mask
from builder.plan import (
    EXECUTORS,
    BuildConfig,
    BuildState,
    enumerate_shard,
    land_cells_of,
    land_flag_cells,
    remove_stale_temporaries,
    step_name,
    total_cells,
)
from builder.publish import exclusive, finish_publish, remove_unpublished, write_manifest
from builder.write import ShardJob, parquet_metadata, process_shard, shard_table
from catalog import manifest as fmt
from catalog.errors import InvalidArgumentError
from catalog.manifest import read_manifest
from catalog.storage import LocalStore, Store, open_store

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from builder.encoders._base import Encoder

__all__ = ["EXECUTORS", "BuildConfig", "BuildSummary", "ShardJob", "build", "process_shard"]

log = logging.getLogger(__name__)

PARQUET_WRITERS = max(1, (os.cpu_count() or 2) // 2)  # part files written at once (pyarrow frees the GIL)


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
    region: Any = None,
    fidelity_points: int = 2000,
    break_lock: bool = False,
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
    region : str, sequence of 4 floats or dict, optional
        A study area (:func:`builder.region.parse_region`): ``"MINLON,MINLAT,MAXLON,MAXLAT"``
        (MINLON > MAXLON crosses the antimeridian), a GeoJSON file or dict of polygons. Only
        cells whose hexagon touches it are kept (with ``land_only``, those that also touch
        land), at resolutions up to 10; a lookup outside it is refused.
    fidelity_points : int
        Seeded random points per resolution (in the region / on land as the atlas is) at which
        the finished atlas is compared with the encoder; recorded in the manifest.
    break_lock : bool
        Remove the lock a dead build left on an ``s3://`` dataset first (only when no build
        of it runs: two would interleave their uploads). Local locks need no breaking.

    Returns
    -------
    BuildSummary

    Raises
    ------
    AtlasBusyError
        Another build is writing the same dataset (locally: a flock; on S3: a lock object
        written with If-None-Match), or a dead build left its S3 lock (the message says how
        to clear it).
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
        region=region, fidelity_points=fidelity_points,
    )
    encoder_given = encoder is not None
    if encoder_given:
        config = replace(config, model=encoder.name)
    timer = Timer()
    with timer("load model"):
        if encoder is None:
            encoder = load_encoder(config.model, checkpoint=config.checkpoint, device=config.device,
                                   batch_size=config.batch_size, trust_checkpoint=config.trust_checkpoint)
    dataset = open_store(config.output).child(fmt.dataset_name(encoder.name))
    with exclusive(dataset, break_lock=break_lock):
        if finish_publish(dataset) == config.identity(encoder.provenance.sha256):
            # this very build was killed after publishing: now finished, like any resumed build
            return _published(dataset)
        if config.overwrite and dataset.exists(fmt.MANIFEST):
            summary = _rebuild(config, encoder, dataset, timer, progress, encoder_given)
        else:
            summary = _build_locked(config, encoder, dataset, timer, progress, encoder_given)
    fmt.write_atlas_index(open_store(config.output))  # how HTTP readers find the root's datasets
    return summary


def _published(dataset: Store) -> BuildSummary:
    """The summary of a dataset a killed run had already published."""
    manifest = read_manifest(dataset)
    where = dataset.root if isinstance(dataset, LocalStore) else dataset.uri
    return BuildSummary(where, {int(r): info["cells"] for r, info in manifest["resolutions"].items()},
                        sum(f["bytes"] for f in manifest["files"]), {},
                        sum(len(info["parts"]) for info in manifest["resolutions"].values()))


def _rebuild(config: BuildConfig, encoder: Encoder, dataset: Store, timer: Timer, progress: bool | None,
             encoder_given: bool) -> BuildSummary:
    """``overwrite`` of a finished dataset: build the next generation beside it, then swap it in.

    The new files carry the generation in their names, so none of the published dataset's
    is touched: it stays readable until the new manifest replaces it. A killed rebuild
    resumes when run again with the same arguments, like any build; one with other
    arguments starts the generation over.
    """
    generation = fmt.generation_of(read_manifest(dataset)) + 1
    config = replace(config, overwrite=False)
    try:
        BuildState(dataset).start(config.identity(encoder.provenance.sha256))
    except InvalidArgumentError:  # an interrupted rebuild with other arguments: start over
        remove_unpublished(dataset)
    return _build_locked(config, encoder, dataset, timer, progress, encoder_given, generation=generation)


def _build_locked(config: BuildConfig, encoder: Encoder, dataset: Store, timer: Timer,
                  progress: bool | None, encoder_given: bool = False, generation: int = 0) -> BuildSummary:
    identity = config.identity(encoder.provenance.sha256)
    if not generation and dataset.exists(fmt.MANIFEST) and not config.overwrite:
        raise InvalidArgumentError(
            f"{str(dataset)!r} already holds a finished {encoder.name} dataset; pass --overwrite (Python: "
            "overwrite=True) to rebuild it, or choose another --output"
        )
    # before anything is written: a region that keeps no cell is refused, not left half built
    with timer("land"):  # listed once per process (cached): a second model's build pays nothing here
        land = land_cells_of(config) if config.land_only or config.region is not None else {}
    empty = [res for res, kept in land.items() if not len(kept)]
    if config.region is not None and empty:
        raise InvalidArgumentError(f"no cell of resolution {empty[0]} touches land in the region {config.region.bbox}; "
                                   "drop --land-only or choose another area")
    if config.overwrite:
        dataset.delete_tree(keep=("_build.lock",))
    state = BuildState(dataset)
    saved = state.start(identity)
    quantizer = None
    if config.precision == "int8":
        if saved and "quantization" in saved:
            quantizer = Quantizer(**saved["quantization"])
        else:
            with timer("calibrate"):
                quantizer = Quantizer.calibrate(encoder)
    state.save(identity, {"generation": generation, **({"quantization": quantizer.to_dict()} if quantizer else {})})
    if isinstance(dataset, LocalStore):
        remove_stale_temporaries(dataset.root)

    shards = plan_shards(config.resolutions, only=land if config.region is not None else None)
    with timer("land"):
        flags = land_flag_cells(config, land)
    done_records = state.all_done()
    present = set(dataset.files("data")) | set(dataset.files("blocks"))
    todo = [s for s in shards
            if (r := done_records.get(step_name(s))) is None or not all(f["path"] in present for f in r["files"])]
    resumed = len(shards) - len(todo)
    job = ShardJob(dataset, config.precision, quantizer.to_dict() if quantizer else None,
                   parquet_metadata(encoder, config.precision, quantizer), "zarr" in config.formats,
                   land_only=config.land_only, generation=generation)
    # trained before any shard, so that each shard's codes are added where it is encoded
    trained = {res: t for res in config.resolutions
               if (t := train_index(res, len(land[res]) if res in land else cell_count(res), encoder, job,
                                    land.get(res), state, timer)) is not None}
    job = replace(job, indexes=trained)
    if config.executor == "ray":
        from builder.executors import run_ray

        run_ray(todo, job, config, encoder, land, state, timer, progress, total_cells(todo, land, state),
                encoder_given=encoder_given, flags=flags)
    else:
        _run_shards(todo, encoder, job, land, state, timer, progress, flags)
    release_land_mask()  # the shards are written: finishing needs their land columns, not the mask

    cells: dict[int, int] = {}
    res_info: dict[str, Any] = {}
    files: list[dict[str, Any]] = []
    done_records = state.all_done()
    for res in config.resolutions:
        records = [r for s in shards if s.res == res and (r := done_records[step_name(s)])["rows"]]
        res_info[str(res)], res_files = finish_resolution(res, records, encoder, job, state, timer, progress,
                                                          land_flags=not config.land_only, land_cells=flags.get(res))
        cells[res] = res_info[str(res)]["cells"]
        files += res_files
    colors, overview, map_files = finish_map(job, state, res_info, files, encoder.dim, timer, progress)
    files += map_files
    with timer("fidelity"):  # read back from the written parts: what a reader of the atlas gets
        measured = measure_written(dataset, res_info, files, encoder.dim, config.precision,
                                   quantizer.to_dict() if quantizer else None, encoder, config.land_only,
                                   config.region, config.fidelity_points)
    for res, fidelity in measured.items():
        res_info[res]["fidelity"] = fidelity
    files, onnx = _export_encoder(dataset, encoder, files, timer, generation)
    write_manifest(dataset, config, encoder, quantizer, res_info, files, timer, generation, encoder_onnx=onnx,
                   colors=colors, overview=overview)
    where = dataset.root if isinstance(dataset, LocalStore) else dataset.uri
    return BuildSummary(where, cells, sum(f["bytes"] for f in files), dict(timer.seconds), resumed)


def _export_encoder(dataset: Store, encoder: Encoder, files: list[dict[str, Any]],
                    timer: Timer, generation: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Store the encoder as ONNX (:mod:`builder.export`) for exact lookups; returns the file
    records with its own added and its manifest entry (or why there is none)."""
    from builder.export import export_onnx

    with timer("export encoder"):
        model, info = export_onnx(encoder)
        if model is None:
            return files, info
        rel = fmt.encoder_relpath(generation)
        with dataset.staged(rel) as tmp:
            tmp.write_bytes(model)
            record = fmt.file_record(Path(), rel, local=tmp)
    return files + [record], {"path": rel, "sha256": record["sha256"], "bytes": record["bytes"], **info}


def _run_shards(todo: list[Shard], encoder: Encoder, job: ShardJob, land: dict[int, NDArray[np.uint64]],
                state: BuildState, timer: Timer, progress: bool | None,
                flags: dict[int, NDArray[np.uint64]] | None = None) -> None:
    """Encode shards in this process; enumerating and writing run beside the encoder.

    Resolutions go largest first, each with a writer thread of its own: it writes the
    shards' part files and index lists and, when this run writes every shard of the
    resolution and a Zarr face is asked for, feeds them straight into it, which it then
    publishes while the encoder goes on with the next resolution.
    """
    quantizer = job.quantizer()
    by_res = {res: [s for s in todo if s.res == res] for res in sorted({s.res for s in todo}, reverse=True)}
    order = [shard for shards in by_res.values() for shard in shards]

    def write_one(shard: Shard, cells: NDArray[np.uint64], stored: NDArray[Any]) -> None:
        state.mark(step_name(shard), write.write_and_index(job, shard, cells, stored, timer,
                                                           (flags or {}).get(shard.res)))

    def write_res(res: int, shards: list[Shard], feed: queue.Queue[Any]) -> None:
        # streamed only when this run writes every shard of the resolution, in cell order
        streamed = len(shards) == len(plan_shards([res]))
        n = len(land[res]) if res in land else cell_count(res)
        with (finishing(res, n, job, state, timer) if streamed else contextlib.nullcontext()) as finish:
            written: list[Future[None]] = []  # part files being written, oldest first
            try:
                while (item := feed.get()) is not _END:
                    if item is _CANCEL:  # the encoder failed: unwind without publishing
                        raise _Cancelled
                    shard, cells, stored = item
                    written.append(parquet_pool.submit(write_one, shard, cells, stored))
                    if finish is not None:
                        finish.add(shard_table(cells, stored))
                    # at most 2 x PARQUET_WRITERS files in flight; a failed write stops the resolution
                    while written and (written[0].done() or len(written) > 2 * PARQUET_WRITERS):
                        written.pop(0).result()
            except _Cancelled:
                raise
            except BaseException:  # a write failed: the shards still queued behind it are not started
                for future in written:
                    future.cancel()
                raise
            finally:  # the resolution is published only once its part files are
                for future in written:
                    if not future.cancelled():
                        future.result()

    writers: list[tuple[queue.Queue[Any], Future[None]]] = []
    with progress_bar(progress, total_cells(todo, land, state), f"build {encoder.name}") as bar, \
            ThreadPoolExecutor(1, thread_name_prefix="enumerate") as enum_pool, \
            ThreadPoolExecutor(max(len(by_res), 1), thread_name_prefix="finish") as finish_pool, \
            ThreadPoolExecutor(PARQUET_WRITERS, thread_name_prefix="parquet") as parquet_pool:
        try:
            position = 0
            next_cells = enum_pool.submit(timed, timer, "enumerate", enumerate_shard, order[0], land) if order else None
            for res, shards in by_res.items():
                feed: queue.Queue[Any] = queue.Queue(maxsize=1)  # at most one shard waits to be written
                writers.append((feed, finish_pool.submit(write_res, res, shards, feed)))
                for shard in shards:
                    with timer("wait enumerate"):
                        cells, lat, lon = next_cells.result()
                    position += 1
                    if position < len(order):
                        next_cells = enum_pool.submit(timed, timer, "enumerate", enumerate_shard, order[position], land)
                    with timer("encode"):
                        stored = encode.encode_stored(encoder, lat, lon, job.precision, quantizer, bar.update)
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
