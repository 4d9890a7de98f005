"""Write: a shard's part file of format 2 (:mod:`catalog.blocks`), published atomically, and
its inverted lists in its resolution's trained index (:mod:`builder.index`).

:func:`process_shard` is one shard from start to finish (enumerate, encode, write, index):
the unit of work of a distributed build. The index is merged and the Zarr face written by
:mod:`builder.finish` from the same shards.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from builder import encode
from builder._timing import Timer
from builder.encode import Quantizer
from builder.grid import Shard
from builder.index import TrainedIndex, add_shard
from builder.plan import enumerate_shard
from catalog import manifest as fmt
from catalog.blocks import embedding_column, write_part
from catalog.cells import in_sorted
from catalog.storage import Store

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from builder.encoders._base import Encoder

__all__ = ["ShardJob", "add_to_index", "land_flags", "parquet_metadata", "process_shard", "shard_table", "write_and_index", "write_shard"]


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
    land_only: bool = False  # every cell touches land: the part files' land column is all True
    indexes: dict[int, TrainedIndex] = field(default_factory=dict)  # by resolution: trained IVF indexes
    generation: int = 0  # in the names of the files written (see catalog.manifest)

    def quantizer(self) -> Quantizer | None:
        return Quantizer(**self.quantization) if self.quantization else None


def parquet_metadata(encoder: Encoder, precision: str, quantizer: Quantizer | None) -> dict[str, str]:
    return {
        "hexatlas.provenance": encoder.provenance.to_json(), "hexatlas.precision": precision,
        **({"hexatlas.quantization": json.dumps(quantizer.to_dict())} if quantizer else {}),
    }


def process_shard(job: ShardJob, shard: Shard, encoder: Encoder,
                  land: dict[int, NDArray[np.uint64]] | None = None,
                  flags: dict[int, NDArray[np.uint64]] | None = None) -> tuple[dict[str, Any], dict[str, float]]:
    """One shard, start to finish: enumerate, encode, write its part file and index lists.

    The unit of work of a distributed build (a Ray task runs exactly this). The file name
    depends only on the shard and is published atomically, so running a shard twice (a
    retried task) replaces the file with the same content instead of adding a second one.

    Returns
    -------
    record : dict
        The shard's done record: ``res``, ``rows``, ``path``, ``blocks``, ``first_cell``,
        ``last_cell`` and ``files`` (path, bytes, sha256 of each; none for an empty shard).
    seconds : dict
        Seconds spent per stage (enumerate, encode, write, index).
    """
    timer = Timer()
    with timer("enumerate"):
        cells, lat, lon = enumerate_shard(shard, land or {})
    with timer("encode"):
        stored = encode.encode_stored(encoder, lat, lon, job.precision, job.quantizer())
    return write_and_index(job, shard, cells, stored, timer, (flags or {}).get(shard.res)), timer.seconds


def write_and_index(job: ShardJob, shard: Shard, cells: NDArray[np.uint64], stored: NDArray[Any],
                    timer: Timer, land_cells: NDArray[np.uint64] | None = None) -> dict[str, Any]:
    """Write one encoded shard's part file (its land column from ``land_cells``, see
    :func:`land_flags`), then add its rows to its resolution's index; returns its done record
    (the caller marks it done)."""
    with timer("land"):
        land = land_flags(shard.res, cells, job.land_only, land_cells)
    with timer("write"):
        record = write_shard(job.dataset, shard, cells, stored, job.metadata, land, job.generation)
    with timer("index"):
        return add_to_index(job, shard, cells, stored, record)


def add_to_index(job: ShardJob, shard: Shard, cells: NDArray[np.uint64], stored: NDArray[Any],
                 record: dict[str, Any]) -> dict[str, Any]:
    """The shard's done record, with its inverted lists in its resolution's trained index
    (when the resolution has one and the shard has cells)."""
    trained = job.indexes.get(shard.res)
    if trained is None or not len(cells):
        return record
    return {**record, "index": add_shard(job.dataset, trained, shard.key, cells, stored, job.quantizer())}


def shard_table(cells: NDArray[np.uint64], stored: NDArray[Any]) -> pa.Table:
    """A shard's rows as its part file holds them (no copies of the arrays)."""
    return pa.table({"cell": pa.array(cells, pa.uint64()), "embedding": embedding_column(stored)})


def land_flags(res: int, cells: NDArray[np.uint64], land_only: bool,
               land_cells: NDArray[np.uint64] | None = None) -> NDArray[np.bool_]:
    """Whether each of a shard's cells touches land by the build's land mask: all do in a
    land-only build; else membership in ``land_cells`` (a regional build's sorted land cells,
    listed once), or, without them (a global build), :func:`builder.landmask.touches_land`
    on the shard's cells: the same answer, from the ancestors of the shard's cells only."""
    if land_only or not len(cells):
        return np.ones(len(cells), bool)
    if land_cells is not None:
        return in_sorted(land_cells, cells)
    from builder.landmask import touches_land

    with _LAND_LOCK:  # one mask (1.2 GB) loaded, not one per writer thread
        return touches_land(cells, res)


_LAND_LOCK = threading.Lock()


def write_shard(dataset: Store, shard: Shard, cells: NDArray[np.uint64], stored: NDArray[Any],
                metadata: dict[str, str], land: NDArray[np.bool_] | None = None,
                generation: int = 0) -> dict[str, Any]:
    """Write one shard's part file and block table (atomically, under names fixed by the shard
    and the generation); returns its done record. A shard without cells (open ocean in a
    land-only build) writes nothing. ``land``: the cells' land flags, the part's ``land`` column."""
    part = fmt.part_relpath(shard.res, shard.key, generation)
    blocks = fmt.blocks_relpath(shard.res, shard.key, generation)
    record: dict[str, Any] = {"res": shard.res, "rows": len(cells), "path": part, "blocks": blocks, "files": []}
    if not len(cells):
        return record
    with dataset.staged(part) as tmp_part, dataset.staged(blocks) as tmp_blocks:
        write_part(tmp_part, tmp_blocks, cells, stored, metadata={**metadata, "hexatlas.res": str(shard.res)},
                   land=land)
        record["files"] = [fmt.file_record(Path(), part, local=tmp_part),
                           fmt.file_record(Path(), blocks, local=tmp_blocks)]
    if land is not None:  # the land file's length, known without reading the column back
        record["land_rows"] = int(np.count_nonzero(land))
    return {**record, "first_cell": int(cells[0]), "last_cell": int(cells[-1])}


