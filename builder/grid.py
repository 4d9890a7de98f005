"""The H3 grid, split into independent shards.

A shard is every cell of one resolution under a run of consecutive parent cells (or the
whole resolution when it is small), grouped so that a shard holds up to about 7**7 cells:
one part file of the atlas each, so files stay few and large (tens to hundreds of MB) at
every resolution. Shards cover a resolution exactly once, can run in any order on any
executor, and, because an H3 index sorts by base cell and then by its digits, each shard is
one contiguous run of the resolution's cells in sorted order: the atlas is sorted by cell
without a global sort.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from catalog.errors import InvalidArgumentError, UnknownResolutionError

__all__ = ["MAX_RES", "Shard", "cell_centers", "cell_count", "parse_resolutions", "plan_shards", "shard_cells"]

MAX_RES = 15
# Resolutions up to here are one shard; above, shards are runs of parents SHARD_SPAN levels up
# (base cells, at least), as many consecutive parents as fit in SHARD_CELLS cells.
SINGLE_SHARD_MAX_RES = 4
SHARD_SPAN = 7
SHARD_CELLS = 7**7


def cell_count(res: int) -> int:
    """Number of H3 cells at resolution ``res``: 2 + 120 * 7**res."""
    _check_res(res)
    return 2 + 120 * 7**res


def _check_res(res: int) -> None:
    if not isinstance(res, (int, np.integer)) or not 0 <= res <= MAX_RES:
        raise UnknownResolutionError(f"H3 resolution {res!r} does not exist; valid resolutions are 0..{MAX_RES}")


def parse_resolutions(spec: str | int | Iterable[int]) -> tuple[int, ...]:
    """Parse ``"0-5"``, ``"3,5"``, ``"0-2,4"``, an int or a list into sorted unique resolutions.

    Raises
    ------
    InvalidArgumentError
        The text is not a list of resolutions or ranges.
    UnknownResolutionError
        A resolution is outside 0..15.
    """
    if isinstance(spec, (int, np.integer)):
        values = [int(spec)]
    elif isinstance(spec, str):
        values = []
        for part in spec.replace(" ", "").split(","):
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
            if match is None:
                raise InvalidArgumentError(
                    f"cannot read resolutions {spec!r}: use a range like 0-5, a list like 3,5, or both (0-2,4)"
                )
            lo, hi = int(match[1]), int(match[2] or match[1])
            if hi < lo:
                raise InvalidArgumentError(f"resolution range {part!r} is empty; write it low-high")
            values.extend(range(lo, hi + 1))
    else:
        values = [int(v) for v in spec]
    if not values:
        raise InvalidArgumentError("no resolutions given")
    for res in values:
        _check_res(res)
    return tuple(sorted(set(values)))


@dataclass(frozen=True, order=True)
class Shard:
    """All cells of resolution ``res`` under ``count`` consecutive parents (H3 cells at
    :func:`shard_resolution`, in sorted order) starting with ``parent``.

    ``parent`` is None for a one-shard resolution. ``key`` names the shard in file paths.
    """

    res: int
    parent: int | None = None
    count: int = 1

    @property
    def key(self) -> str:
        return "all" if self.parent is None else f"{self.parent:x}"

    def __str__(self) -> str:
        return f"res={self.res}/shard={self.key}"


def shard_resolution(res: int) -> int | None:
    """Resolution of the parent cells that shard ``res``; None when it is one shard."""
    _check_res(res)
    if res <= SINGLE_SHARD_MAX_RES:
        return None
    return max(0, res - SHARD_SPAN)


def plan_shards(resolutions: Iterable[int], only: dict[int, NDArray[np.uint64]] | None = None) -> list[Shard]:
    """The shards covering every cell of each resolution exactly once, in sorted cell order.

    ``only``: for the resolutions it names, just the shards holding any of its cells (a
    regional build); the shards are the same as without it, fewer.
    """
    import h3.api.numpy_int as h3i

    from catalog.cells import cells_to_parent

    shards = []
    for res in resolutions:
        parent_res = shard_resolution(res)
        if parent_res is None:
            shards.append(Shard(res))
            continue
        needed = None
        if only is not None and res in only:
            needed = set(np.unique(cells_to_parent(only[res], parent_res)).tolist())
        parents = _parents(parent_res)
        group: list[int] = []
        size = 0

        def close() -> None:
            if needed is None or any(p in needed for p in group):
                shards.append(Shard(res, group[0], len(group)))

        for p in parents.tolist():
            n = int(h3i.cell_to_children_size(p, res))
            if group and size + n > SHARD_CELLS:
                close()
                group, size = [], 0
            group.append(p)
            size += n
        close()
    return shards


def _parents(parent_res: int) -> NDArray[np.uint64]:
    import h3.api.numpy_int as h3i

    return np.sort(np.concatenate([h3i.cell_to_children(c, parent_res) for c in h3i.get_res0_cells()]))


def shard_parents(shard: Shard) -> list[int]:
    """The parent cells a shard covers, in sorted order."""
    import h3.api.numpy_int as h3i

    if shard.parent is None:
        return [int(c) for c in h3i.get_res0_cells()]
    if shard.count == 1:
        return [shard.parent]
    parents = _parents(int(h3i.get_resolution(shard.parent)))
    start = int(np.searchsorted(parents, np.uint64(shard.parent)))
    return [int(p) for p in parents[start:start + shard.count]]


def shard_cells(shard: Shard) -> NDArray[np.uint64]:
    """The shard's cells as sorted uint64 H3 indexes."""
    import h3.api.numpy_int as h3i

    cells = np.concatenate([h3i.cell_to_children(p, shard.res) for p in shard_parents(shard)]).astype(np.uint64)
    cells.sort()
    return cells


def shard_size(shard: Shard) -> int:
    """Number of cells in a shard, without enumerating them."""
    import h3.api.numpy_int as h3i

    if shard.parent is None:
        return cell_count(shard.res)
    return sum(int(h3i.cell_to_children_size(p, shard.res)) for p in shard_parents(shard))


def cell_centers(cells: NDArray[np.uint64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Centres of H3 cells in degrees: (lat, lon), two float64 arrays of shape (n,)."""
    from catalog.cells import cells_to_latlng

    # ~1 us per cell, far below the encoders' per-point cost (stage "enumerate" in make bench).
    return cells_to_latlng(cells)
