"""Plan: what a build is asked for, which shards it needs, and which of them are done.

The first stage of the build (plan -> encode -> write -> publish). :class:`BuildConfig` is
the validated request; :class:`BuildState` is the ``_build/`` directory that records each
shard and finishing step as done, so a killed build resumes; :func:`enumerate_shard` gives a
shard's cells and their centres (see :mod:`builder.grid` for how the grid is split).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from builder.grid import Shard, cell_centers, parse_resolutions, shard_cells
from catalog import manifest as fmt
from catalog.cells import in_sorted
from catalog.errors import InvalidArgumentError
from catalog.storage import Store, is_remote

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = ["EXECUTORS", "PRECISIONS", "BuildConfig", "BuildState", "enumerate_shard", "land_cells_of", "land_flag_cells",
           "land_mask_description", "remove_stale_temporaries", "shard_step", "step_name", "total_cells"]

PRECISIONS = ("float16", "float32", "int8")
EXECUTORS = ("local", "ray")


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
    region: Any = None  # a builder.region.Region (or what parse_region reads): keep the cells touching it
    fidelity_points: int = 2000  # seeded random points per resolution for the fidelity measurement

    def __post_init__(self) -> None:
        if self.region is not None:
            from builder.region import parse_region

            object.__setattr__(self, "region", parse_region(self.region))
            for res in parse_resolutions(self.resolutions):
                self.region.check_size(res)
        if not isinstance(self.fidelity_points, int) or self.fidelity_points < 1:
            raise InvalidArgumentError(f"fidelity_points must be a positive integer, got {self.fidelity_points!r}")
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
            **({"region": self.region.to_dict()} if self.region is not None else {}),
        }


class BuildState:
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


def step_name(shard: Shard) -> str:
    return shard_step(shard.res, shard.key)


def shard_step(res: int, key: str) -> str:
    """The done-record name of the shard ``key`` of resolution ``res``."""
    return f"res={res}_shard={key}"


def remove_stale_temporaries(dataset: Path) -> None:
    # Left by a killed run: half-written files never renamed into place.
    for path in list(dataset.rglob("*.tmp")) + list(dataset.rglob("*.tmpdir")):
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def land_cells_of(config: BuildConfig) -> dict[int, NDArray[np.uint64]]:
    """The cells a build keeps, by resolution (sorted uint64): those touching its region (and
    land, with ``land_only``), or touching land; empty for a global build, which keeps all."""
    from builder.landmask import land_cells, touches_land

    if config.region is None:
        return {res: land_cells(res) for res in config.resolutions} if config.land_only else {}
    kept = {}
    for res in config.resolutions:
        cells = config.region.cells(res)
        kept[res] = cells[touches_land(cells, res)] if config.land_only else cells
    return kept


def land_flag_cells(config: BuildConfig, kept: dict[int, NDArray[np.uint64]]) -> dict[int, NDArray[np.uint64]]:
    """The sorted cells touching land per resolution of a regional atlas that is not
    land-only (its kept cells are listed already; each shard's land column and
    ``land/res=<r>.npy`` come from them). Empty for a land-only build, where all cells do,
    and for a global one, whose shards test their own cells as they are written
    (:func:`builder.write.land_flags`): a list of the globe's land cells would be O(cells)
    in one process (1.6 GB at resolution 8)."""
    from builder.landmask import touches_land

    if config.land_only or config.region is None:
        return {}
    return {res: kept[res][touches_land(kept[res], res)] for res in config.resolutions}


def land_mask_description() -> str:
    from builder.landmask import MASK_DESCRIPTION

    return MASK_DESCRIPTION


def enumerate_shard(shard: Shard, land: dict[int, NDArray[np.uint64]]) -> tuple[NDArray[np.uint64], NDArray, NDArray]:
    cells = shard_cells(shard)
    if shard.res in land:
        cells = cells[in_sorted(land[shard.res], cells)]
    lat, lon = cell_centers(cells)
    return cells, lat, lon


def total_cells(todo: list[Shard], land: dict[int, NDArray[np.uint64]], state: BuildState) -> int:
    from builder.grid import shard_size

    if land:
        done_rows = sum(r["rows"] for r in state.records() if r.get("res") in land)
        return sum(len(c) for c in land.values()) - done_rows
    return sum(shard_size(s) for s in todo)


