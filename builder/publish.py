"""Publish: the build lock, the manifest (written last) and the swap of an ``--overwrite`` rebuild.

A dataset is published when its manifest is written: until then readers refuse it as
unfinished. A rebuild writes a new generation beside the published dataset, under names of
its own (see :mod:`catalog.manifest`), so the swap is the manifest alone, replaced
atomically; the old generation's files are deleted after it. Readers see the old dataset,
then the new one, and never a file of one with the manifest of the other.
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

__all__ = ["exclusive", "finish_publish", "remove_unpublished", "versions", "write_manifest"]

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


def finish_publish(dataset: Store) -> dict[str, Any] | None:
    """Finish what a killed run left after its manifest was written; nothing otherwise.

    A build is published by its manifest; the STAC collection is then rewritten from it, the
    files of the generation it replaced are deleted, and ``_build/`` last. A run killed in
    between leaves ``_build/`` naming a generation that is no longer above the published
    one: this does the rest, as the next build (or a resumed one) starts.

    Returns
    -------
    dict or None
        The identity of the build whose publishing this finished (see
        :meth:`BuildConfig.identity`); None when there was none to finish.
    """
    with contextlib.suppress(FileNotFoundError):
        dataset.delete_tree(fmt.REBUILD_DIR)  # where hexatlas before generations built a rebuild
    building = fmt.building_generation(dataset)
    if building is None or not dataset.exists(fmt.MANIFEST):
        return None
    manifest = dataset.read_json(fmt.MANIFEST)
    if building > fmt.generation_of(manifest):
        return None  # a rebuild in progress
    identity = dataset.read_json(f"{fmt.BUILD_DIR}/build.json").get("identity")
    _sweep(dataset, manifest)
    return identity


def _sweep(dataset: Store, manifest: dict[str, Any]) -> None:
    """After the manifest: the STAC collection, then every file the manifest does not list
    (the old generation's), then ``_build/``."""
    dataset.write_json(fmt.STAC, fmt.stac_collection(manifest))
    listed = {record["path"] for record in manifest["files"]} | {fmt.MANIFEST, fmt.STAC}
    _delete(dataset, [rel for rel in dataset.files()
                      if rel not in listed and not rel.split("/")[0].startswith(fmt.BUILD_DIR)])
    if isinstance(dataset, LocalStore):  # directories of files the new dataset does not have
        for path in sorted(dataset.root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not any(path.iterdir()) and not path.name.startswith(fmt.BUILD_DIR):
                path.rmdir()
    # build.json last: until it goes, the next run knows which build this was, and finishes it
    _delete(dataset, [rel for rel in dataset.files(fmt.BUILD_DIR) if rel != f"{fmt.BUILD_DIR}/build.json"])
    dataset.delete_tree(fmt.BUILD_DIR)


def _delete(dataset: Store, rels: list[str]) -> None:
    if dataset.is_local:
        for rel in rels:
            dataset.delete(rel)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16, thread_name_prefix="delete") as pool:  # one request each: many at once
        list(pool.map(dataset.delete, rels))


def remove_unpublished(dataset: Store) -> None:
    """Remove an unfinished rebuild (its generation's files and ``_build/``), keeping the
    published dataset as it is."""
    _sweep(dataset, dataset.read_json(fmt.MANIFEST))


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
                   generation: int = 0, encoder_onnx: dict[str, Any] | None = None,
                   colors: dict[str, Any] | None = None, overview: dict[str, Any] | None = None) -> None:
    """Publish a finished dataset: the manifest (atomic: the publish step), then its STAC
    collection, the files of the generation it replaces deleted, and the resume state.
    ``encoder_onnx``: the exported encoder's entry (:mod:`builder.export`); ``colors`` and
    ``overview``: the map's basis and coarse levels (:func:`builder.finish.finish_map`)."""
    manifest = {
        "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "dataset": dataset.name,
        "generation": generation,
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
        "encoder_onnx": encoder_onnx, "colors": colors, "overview": overview,
        "software": versions(), "timings_s": {k: round(v, 3) for k, v in timer.seconds.items()},
    }
    dataset.write_json(fmt.MANIFEST, manifest)  # the publish step: atomic (a rename; one PUT)
    _sweep(dataset, manifest)
