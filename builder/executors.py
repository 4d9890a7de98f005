"""Running a build's shards as Ray tasks, on one machine or a cluster.

The driver (the process that called :func:`builder.build`) plans the shards, submits one
task per shard that is not done yet, and records each shard as done (``_build/done/``) as its
result arrives; it then assembles the Zarr, the index and the manifest as a local build does.
A task runs :func:`builder.write.process_shard`: it writes the shard's own part file under
a name fixed by the shard and returns the file's size and sha256.

- Resources: one GPU per task when the cluster has GPUs (and the device is not ``cpu``),
  else one CPU.
- Failures: a task whose worker dies (killed, out of memory, node lost) is retried
  ``MAX_RETRIES`` times, and so is one that raises ``OSError`` (a storage hiccup); a retried
  task overwrites its shard's file, so no cell is duplicated or lost. Shards that still fail
  are named in a :class:`~catalog.errors.BuildFailedError` after every other shard has
  finished and been recorded; running the build again resumes, as after a killed driver.
- The encoder is loaded inside each worker process, once (a per-process cache keyed by the
  model arguments), never pickled from the driver with its weights. Only an :class:`Encoder`
  object given in Python (``build(encoder=...)``) is put in Ray's object store.
- Workers must see the output: an ``s3://`` prefix (credentials from each node's
  environment), or a directory on a filesystem every node mounts at the same path.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catalog.errors import BuildFailedError, InvalidArgumentError, MissingDependencyError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from builder._timing import Timer
    from builder.encoders._base import Encoder
    from builder.grid import Shard
    from builder.plan import BuildConfig, BuildState
    from builder.write import ShardJob

__all__ = ["MAX_RETRIES", "EncoderSpec", "require_ray", "run_ray", "task_resources"]

log = logging.getLogger(__name__)

MAX_RETRIES = 3
INSTALL_HINT = "pip install 'hexatlas[ray]'"


def require_ray() -> Any:
    """Import Ray, or say how to install it."""
    try:
        import ray
    except ImportError:
        raise MissingDependencyError(
            f"the Ray executor needs the 'ray' package, which is not installed; install it with: {INSTALL_HINT}"
        ) from None
    return ray


@dataclass(frozen=True)
class EncoderSpec:
    """How a worker loads the encoder itself: the arguments of :func:`builder.encoders.load_encoder`."""

    model: str
    checkpoint: str | None
    device: str
    batch_size: int | None
    trust_checkpoint: bool

    def load(self) -> Encoder:
        """The encoder, loaded once per process and reused by every later task there."""
        encoder = _LOADED.get(self)
        if encoder is None:
            from builder.encoders import load_encoder

            encoder = load_encoder(self.model, checkpoint=self.checkpoint, device=self.device,
                                   batch_size=self.batch_size, trust_checkpoint=self.trust_checkpoint)
            _LOADED[self] = encoder
        return encoder


_LOADED: dict[EncoderSpec, Any] = {}


def _shard_task(job: ShardJob, shard: Shard, encoder: EncoderSpec | Encoder,
                land: dict[int, NDArray[np.uint64]] | None,
                flags: dict[int, NDArray[np.uint64]] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """The body of one Ray task (``encoder`` arrives already resolved from an object ref)."""
    from builder.write import process_shard

    if isinstance(encoder, EncoderSpec):
        encoder = encoder.load()
    return process_shard(job, shard, encoder, land, flags)


def run_ray(todo: list[Shard], job: ShardJob, config: BuildConfig, encoder: Encoder,
            land: dict[int, NDArray[np.uint64]], state: BuildState, timer: Timer, progress: bool | None,
            total_cells: int, *, encoder_given: bool = False,
            flags: dict[int, NDArray[np.uint64]] | None = None) -> None:
    """Run ``todo`` as Ray tasks, marking each shard done as its result arrives.

    ``encoder_given``: the encoder was passed in Python, so workers cannot load it by name
    and get it from Ray's object store instead. ``flags``: the land cells per resolution for
    the part files' land column (put in Ray's object store once, like ``land``).

    Raises
    ------
    MissingDependencyError
        Ray is not installed.
    BuildFailedError
        Some shards failed after their retries (the others are recorded as done).
    """
    from builder._timing import progress_bar
    from builder.plan import step_name

    ray = require_ray()
    started_here = not ray.is_initialized()
    if started_here:
        # address None: $RAY_ADDRESS if set, else a new local instance with this machine's CPUs/GPUs
        ray.init(address=config.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    elif config.ray_address is not None:
        log.warning("Ray is already initialised in this process; --ray-address %s is not used", config.ray_address)
    try:
        if not todo:
            return
        resources = task_resources(ray.cluster_resources(), config.device)
        use_gpu = "num_gpus" in resources
        if not encoder_given:
            payload: Any = EncoderSpec(config.model, config.checkpoint, "cuda" if use_gpu else config.device,
                                       config.batch_size, config.trust_checkpoint)
        else:  # an Encoder object given in Python: workers unpickle it from the object store
            payload = ray.put(encoder)
        land_ref = ray.put(land) if land else None
        flags_ref = ray.put(flags) if flags else None
        task = ray.remote(_shard_task).options(max_retries=MAX_RETRIES, retry_exceptions=[OSError], **resources)
        log.info("submitting %d shards to Ray (%s per task)", len(todo), "1 GPU" if use_gpu else "1 CPU")
        start = time.perf_counter()
        pending = {task.remote(job, shard, payload, land_ref, flags_ref): shard for shard in todo}
        failed: list[tuple[Shard, BaseException]] = []
        with progress_bar(progress, total_cells, f"build {encoder.name} (ray)") as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    shard = pending.pop(ref)
                    try:
                        record, seconds = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        log.error("shard %s failed after %d retries: %s", shard, MAX_RETRIES, exc)
                        failed.append((shard, exc))
                        continue
                    state.mark(step_name(shard), record)
                    bar.update(record["rows"])
                    for stage, s in seconds.items():  # summed over workers: CPU/GPU-seconds, not wall time
                        timer.seconds[f"{stage} (tasks)"] = timer.seconds.get(f"{stage} (tasks)", 0.0) + s
        timer.seconds["shards (ray, wall)"] = time.perf_counter() - start
        if failed:
            names = ", ".join(str(s) for s, _ in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
            first = _cause(failed[0][1])
            raise BuildFailedError(
                f"{len(failed)} of {len(todo)} shards failed after {MAX_RETRIES} retries ({names}); first error: "
                f"{first}. The {len(todo) - len(failed)} finished shards are kept: fix the cause and run the same "
                "build again to resume"
            )
    finally:
        if started_here:
            ray.shutdown()


def task_resources(cluster: dict[str, float], device: str) -> dict[str, float]:
    """What one shard task asks Ray for: a whole GPU where the cluster has any, else one CPU.

    ``device="cpu"`` keeps tasks on CPUs even on a GPU cluster. One GPU per task, because a
    shard's encoder batches fill a GPU and two models on one card only contend for it.
    """
    if device != "cpu" and cluster.get("GPU", 0) > 0:
        return {"num_gpus": 1}
    if device == "cuda":
        raise InvalidArgumentError(
            "device='cuda' (--device cuda) was asked for, but the Ray cluster has no GPUs; add GPU workers "
            "or use --device auto"
        )
    return {"num_cpus": 1}


def _cause(exc: BaseException) -> str:
    """The user-facing part of a Ray error: the task's own exception when there is one."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
