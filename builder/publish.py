"""Publish: the build lock, the manifest (written last) and the swap of an ``--overwrite`` rebuild.

A dataset is published when its manifest is written: until then readers refuse it as
unfinished. A rebuild is made beside the published dataset and swapped in file by file,
the manifest last, so readers see the old dataset, then an unfinished one, then the new one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder._timing import Timer
from builder.plan import BuildConfig, land_mask_description
from catalog import manifest as fmt
from catalog.errors import AtlasBusyError
from catalog.storage import LocalStore, Store

if TYPE_CHECKING:
    from builder.encode import Quantizer
    from builder.encoders._base import Encoder

__all__ = ["exclusive", "publish_rebuild", "versions", "write_manifest"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(dataset: Path | Store, *, break_lock: bool = False) -> Iterator[None]:
    """Hold the dataset's build lock.

    Locally a ``flock`` on ``_build.lock``, released by the OS when the process dies. On S3
    an object ``_build.lock`` written with ``If-None-Match: *`` (:func:`catalog.lock.s3_lock`):
    one build gets it, others are refused; one left by a dead build is reported with how to
    clear it (``break_lock`` removes it first).
    """
    import fcntl

    if isinstance(dataset, Store) and not dataset.writable:
        dataset.staged("")  # raises: read-only (HTTP, the Hub), with what to do instead
    if isinstance(dataset, Store) and not dataset.is_local:
        from catalog.lock import s3_lock

        with s3_lock(dataset.uri, break_lock=break_lock):
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


def publish_rebuild(dataset: Store) -> None:
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


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("hexatlas", "torch", "h3", "pyarrow", "numpy", "xarray", "zarr", "faiss-cpu", "faiss-gpu-cu12",
                 "global-land-mask", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


def write_manifest(dataset: Store, config: BuildConfig, encoder: Encoder, quantizer: Quantizer | None,
                   resolutions: dict[str, Any], files: list[dict[str, Any]], timer: Timer,
                   name: str | None = None, encoder_onnx: dict[str, Any] | None = None) -> None:
    """Publish a finished dataset: its STAC collection, then the manifest (last, atomic), then
    drop the resume state. ``encoder_onnx``: the exported encoder's entry (:mod:`builder.export`)."""
    manifest = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "dataset": name or dataset.name,
        "created": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "provenance": encoder.provenance.to_dict(), "precision": config.precision,
        "quantization": quantizer.to_dict() if quantizer else None,
        "resolutions": resolutions, "files": sorted(files, key=lambda r: r["path"]),
        "build": {**{k: v for k, v in asdict(config).items() if k != "region"}, "output": str(config.output),
                  "land_only": config.land_only,
                  "region": config.region.to_dict() if config.region is not None else None,
                  "ray_address": None,  # where it ran is not part of the dataset
                  "land_mask": land_mask_description() if config.land_only else None,
                  "device": str(encoder.device), "compute_dtype": str(encoder.dtype).removeprefix("torch.")},
        "encoder_onnx": encoder_onnx,
        "software": versions(), "timings_s": {k: round(v, 3) for k, v in timer.seconds.items()},
    }
    dataset.write_json(fmt.STAC, fmt.stac_collection(manifest))
    dataset.write_json(fmt.MANIFEST, manifest)  # the publish step: last, atomic
    dataset.delete_tree(fmt.BUILD_DIR)
