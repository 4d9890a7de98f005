"""Which H3 cells touch land, from the ``global-land-mask`` package (PyPI).

The mask is the GLOBE dataset's land/ocean grid at 1/120 degree (about 0.93 km at the
equator; most lakes count as land). A point is on land when the mask pixel holding it is.

Guarantee: every cell that a land pixel intersects is kept, so any point on land falls in a
kept cell. Work happens on blocks of p x p pixels ("land" when any pixel is), with p small
against the cells (block diagonal at most a quarter of an average cell's inradius):

1. Cells whose centre lies in a land block are kept.
2. A cell that touches land but whose centre is in an ocean block crosses from ocean to land
   inside itself (cells are convex), so it intersects a *coastal* land block (one with an
   ocean neighbour). For a convex cell much larger than a block, intersecting it means the
   cell holds one of the block's corners or centre, or one of the cell's vertices lies in the
   block. Both are tested for every coastal block, with the vertex test applied to the
   neighbours of the cells found by the corner test.

Candidates at resolution r are the children of the land cells at r - 1 and of their
neighbours (an H3 child can poke slightly out of its parent). Using blocks keeps a few
extra coastal cells whose hexagon misses the land pixels but meets their block.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.typing import NDArray

from catalog.errors import MissingDependencyError, UnknownResolutionError

__all__ = ["MASK_DESCRIPTION", "is_land_point", "land_cells"]

PIXELS_PER_DEGREE = 120
_ROWS, _COLS = 180 * PIXELS_PER_DEGREE, 360 * PIXELS_PER_DEGREE
_BLOCKS = (120, 60, 40, 30, 20, 15, 12, 10, 8, 6, 5, 4, 3, 2, 1)  # divide both grid sides


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("global-land-mask")
    except PackageNotFoundError:
        return "not installed"


MASK_DESCRIPTION = (
    f"global-land-mask {_version()} (GLOBE land/ocean grid, 1/120 degree = 0.93 km at the equator; "
    "lakes mostly count as land)"
)


@functools.lru_cache(maxsize=1)
def _land_pixels() -> NDArray[np.bool_]:
    """(21600, 43200) bool, True on land; row 0 at 90 N, column 0 at 180 W."""
    try:
        from global_land_mask import globe
    except ImportError:
        raise MissingDependencyError(
            "--land-only needs the global-land-mask package: pip install 'hexatlas[build]'"
        ) from None
    ocean = globe._mask  # the package keeps its grid private; its public API is per point
    if ocean.shape != (_ROWS, _COLS):
        raise MissingDependencyError(f"unexpected global-land-mask grid {ocean.shape}; pip install global-land-mask==1.0.0")
    return ~ocean


@functools.lru_cache(maxsize=8)
def _blocks(p: int) -> NDArray[np.bool_]:
    land = _land_pixels()
    return land.reshape(_ROWS // p, p, _COLS // p, p).any(axis=(1, 3)) if p > 1 else land


def _block_index(lat: NDArray[np.float64], lon: NDArray[np.float64], p: int) -> tuple[NDArray, NDArray]:
    rows = np.clip(np.floor((90.0 - lat) * PIXELS_PER_DEGREE / p), 0, _ROWS // p - 1).astype(np.int64)
    cols = np.floor((lon + 180.0) * PIXELS_PER_DEGREE / p).astype(np.int64) % (_COLS // p)
    return rows, cols


def is_land_point(lat: NDArray[np.float64], lon: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Whether each point (degrees) is on land according to the mask; bool array (n,)."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    return _blocks(1)[_block_index(lat, lon, 1)]


def _block_size(res: int) -> int:
    import h3

    inradius_km = h3.average_hexagon_edge_length(res, unit="km") * math.sqrt(3) / 2
    limit = inradius_km / 4 / (math.sqrt(2) * 40_075 / 360 / PIXELS_PER_DEGREE)
    return next(p for p in _BLOCKS if p <= limit)


def _cells_of(lat: NDArray[np.float64], lon: NDArray[np.float64], res: int) -> NDArray[np.uint64]:
    from catalog.cells import latlng_to_cells

    return np.unique(latlng_to_cells(lat, lon, res))


def _coastal_blocks(blocks: NDArray[np.bool_]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    ocean = ~blocks
    near_ocean = ocean.copy()
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                shifted = np.roll(ocean, dc, axis=1)  # longitude wraps around
                if dr:
                    shifted = np.roll(shifted, dr, axis=0)
                    shifted[0 if dr > 0 else -1] = False  # latitude does not
                near_ocean |= shifted
    return np.nonzero(blocks & near_ocean)


def _children(parents: NDArray[np.uint64], res: int) -> NDArray[np.uint64]:
    import h3.api.numpy_int as h3i

    return np.unique(np.concatenate([h3i.cell_to_children(c, res) for c in parents.tolist()]).astype(np.uint64))


@functools.lru_cache(maxsize=16)
def land_cells(res: int) -> NDArray[np.uint64]:
    """Sorted H3 cells (uint64) at resolution ``res`` that touch land (see the module doc).

    Raises
    ------
    UnknownResolutionError
        ``res`` is not in 0..15.
    MissingDependencyError
        ``global-land-mask`` is not installed.
    """
    import h3.api.numpy_int as h3i

    from builder.grid import cell_centers

    if not isinstance(res, (int, np.integer)) or not 0 <= res <= 15:
        raise UnknownResolutionError(f"H3 resolution {res!r} does not exist; valid resolutions are 0..15")
    if res == 0:
        candidates = np.sort(h3i.get_res0_cells().astype(np.uint64))
    else:
        coarser = land_cells(res - 1)
        ring = np.unique(np.concatenate([h3i.grid_disk(c, 1) for c in coarser.tolist()]).astype(np.uint64))
        candidates = _children(ring, res)
    p = _block_size(res)
    blocks = _blocks(p)

    lat, lon = cell_centers(candidates)
    keep = candidates[blocks[_block_index(lat, lon, p)]]

    rows, cols = _coastal_blocks(blocks)
    step = p / PIXELS_PER_DEGREE
    north, west = 90.0 - rows * step, -180.0 + cols * step
    eps = 1e-9  # sample just inside each block so a corner is not attributed to its neighbour
    corners_lat = np.concatenate([north - eps, north - eps, north - step + eps, north - step + eps, north - step / 2])
    corners_lon = np.concatenate([west + eps, west + step - eps, west + eps, west + step - eps, west + step / 2])
    touched = _cells_of(corners_lat, corners_lon, res)

    neighbours = np.setdiff1d(
        np.unique(np.concatenate([h3i.grid_disk(c, 1) for c in touched.tolist()] or [np.empty(0, np.uint64)])
                  .astype(np.uint64)),
        np.union1d(touched, keep),
    )
    vertex_hits = [c for c in neighbours.tolist() if _any_vertex_on_land(h3i.cell_to_boundary(c), blocks, p)]
    out = np.union1d(np.union1d(keep, touched), np.asarray(vertex_hits, dtype=np.uint64))
    return out.astype(np.uint64)


def _any_vertex_on_land(boundary: tuple[tuple[float, float], ...], blocks: NDArray[np.bool_], p: int) -> bool:
    pts = np.asarray(boundary)
    return bool(blocks[_block_index(pts[:, 0], pts[:, 1], p)].any())
