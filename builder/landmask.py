"""Which H3 cells touch land, from the ``global-land-mask`` package (PyPI).

The mask is the GLOBE dataset's land/ocean grid: 21600 x 43200 pixels of 1/120 degree (about
0.93 km at the equator; most lakes count as land). Pixel ``(i, j)`` covers latitudes
``90 - (i+1)/120 .. 90 - i/120`` and longitudes ``-180 + j/120 .. -180 + (j+1)/120`` (degrees);
:func:`is_land_point` looks a point up exactly as ``global_land_mask.globe.is_land`` does.

Guarantee
---------
Write ``L`` for the union of the land pixels, ``hex(C)`` for the region that
``h3.latlng_to_cell`` maps to cell ``C`` (the spherical polygon with great-circle edges through
its ``cell_to_boundary`` vertices) and ``R(C)`` for its circumradius. ``land_cells(r)`` holds

* every cell ``C`` of resolution ``r`` with ``hex(C)`` meeting ``L``, so the cell of every
  point that the mask calls land, coastal cells included; and more generally every cell with
  a descendant (at any resolution) meeting ``L``;
* the parent of each of its cells: ``land_cells(r)`` lies in the children of
  ``land_cells(r - 1)``.

Beyond these it keeps only cells within about ``MARGIN * R(C)`` (up to 1.24 times that off a
corner) plus one block (below) of a land pixel: a thin band of ocean cells along coasts (see
:func:`land_fraction`).

Why it holds
------------
* H3 children poke out of their parent. Measured over all cells of resolution 1 to depth 4,
  of resolution 2 to depth 3, and samples of resolutions 3-11, no descendant of ``P`` reaches
  farther than ``0.191 R(P)`` from ``hex(P)``; deeper levels add under 0.01, and
  ``MARGIN = 0.25`` (re-checked by ``tests/builder/test_landmask.py``). So every ancestor ``A``
  of a cell meeting ``L`` is within ``MARGIN * R(A)`` of ``L``. The search runs coarse to fine
  over the children of the cells kept one resolution up, and no test below ever drops a cell
  within ``MARGIN * R`` of ``L``: by induction from the 122 cells of resolution 0, each such
  ancestor, and the cell itself, is a candidate and is kept. Parents are kept by construction.
* The tests, in order, for a candidate ``C`` with centre ``c`` (``R(C) <= RADIUS_FACTOR e(r)``,
  ``e(r)`` the average edge length; measured at most ``1.0998 e(r)`` over all cells of
  resolutions 0-5):

  1. The lat/lon box of the cap of radius ``(1 + MARGIN) RADIUS_FACTOR e(r)`` about ``c``
     holds every point within ``MARGIN * R`` of ``hex(C)``, so every descendant. Its land
     pixels are counted in a summed-area table (over 4 x 4 pixel blocks, rounding the box
     out): none, and ``C`` with all its descendants is dropped; all, and ``C`` with all its
     descendants touch land: they are kept without more tests at any resolution.
  2. ``C`` is kept when the pixel of ``c`` is land.
  3. Otherwise ``hex(C)`` widened by ``MARGIN * R(C)`` is tested against the land blocks
     (``p x p`` pixels, land when any pixel is; a side of at most a fifth of ``R``, one pixel
     from resolution 6 on) in the box of its own cap. A point ``x`` within angle ``m`` of
     ``hex(C)`` has ``n . x >= -sin(m)`` for the inward unit normal ``n`` of every edge great
     circle that bounds the cell (an edge is used only when all vertices lie on its inner
     side: cells crossing icosahedron edges have up to 10 vertices). A block passes when, for
     every such ``n``, its largest ``n . x`` -- at most ``n . b`` (``b`` its centre) plus its
     half extents along north and east projected on ``n``, plus ``(2h)**2 / 2`` for the
     curvature over a block of half side ``h`` -- reaches ``-sin(MARGIN * R(C))``; ``C`` is
     kept when any block passes. The package's pixel boundaries sit up to 1.5e-10 degree off
     the nominal grid, so blocks are widened by 1e-9 degree.

Cost (2 cores, after the mask loads in 3-4 s): resolutions 0-5 in about 7 s, 6 in 4 s and 7
in 15 s (28M cells), because only cells near coasts are ever tested.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time

import numpy as np
from numpy.typing import ArrayLike, NDArray

from catalog.cells import cells_to_latlng
from catalog.errors import InvalidCoordinateError, MissingDependencyError, UnknownResolutionError

__all__ = ["MARGIN", "MASK_DESCRIPTION", "is_land_point", "land_cells", "land_fraction", "release", "touches_land"]

_log = logging.getLogger(__name__)

PIXELS_PER_DEGREE = 120
MAX_RES = 15
#: No test drops a cell within this many of its circumradii of land: more than any H3
#: descendant reaches out of its ancestor (0.191 measured; see the module docstring).
MARGIN = 0.25
#: Every H3 cell's circumradius is below this times the resolution's average edge length
#: (measured maximum 1.0998 over all cells of resolutions 0-5).
RADIUS_FACTOR = 1.15

_ROWS, _COLS = 180 * PIXELS_PER_DEGREE, 360 * PIXELS_PER_DEGREE
_PIXEL_RAD = math.radians(1.0 / PIXELS_PER_DEGREE)
_EPS_DEG = 1e-9  # the package's row boundaries sit up to 1.5e-10 degree off the nominal grid
_EPS_RAD = math.radians(_EPS_DEG)
_SAT_POOL = 4  # summed-area table over 4 x 4 pixel blocks: 233 MB of int32
_POOLS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 36, 40, 48, 60, 72, 80, 96, 100, 108, 120)  # divide the grid
_CHUNK_CELLS = 1 << 19  # candidates per batch: bounds the memory of a pass
_WINDOW_BUDGET = 1 << 21  # blocks gathered at once in the polygon test
_EARTH_RADIUS_KM = 6371.007180918475  # h3's
_PENTAGON_BASE_CELLS = np.array([4, 14, 24, 38, 49, 58, 63, 72, 83, 97, 107, 117], dtype=np.uint64)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("global-land-mask")
    except PackageNotFoundError:
        return "(not installed)"


MASK_DESCRIPTION = (
    f"global-land-mask {_version()} (GLOBE land/ocean grid at 1/120 degree, about 0.93 km at the "
    "equator; most lakes count as land)"
)


# --------------------------------------------------------------------------- the mask


@functools.lru_cache(maxsize=1)
def _mask() -> tuple[NDArray[np.bool_], NDArray[np.float64], NDArray[np.float64]]:
    """The package's ocean grid (21600, 43200) bool, True on ocean, and its lat/lon axes (degrees)."""
    try:
        from global_land_mask import globe
    except ImportError:
        raise MissingDependencyError(
            "the land mask (--land-only) needs the global-land-mask package: pip install 'hexatlas[build]'"
        ) from None
    # The package keeps its grid private; its public API looks up one point at a time.
    ocean, lat, lon = globe._mask, np.asarray(globe._lat, np.float64), np.asarray(globe._lon, np.float64)
    if (ocean.shape != (_ROWS, _COLS) or lat[0] != 90.0 or lon[0] != -180.0
            or abs((lat[0] - lat[1]) * PIXELS_PER_DEGREE - 1) > 1e-9
            or abs((lon[1] - lon[0]) * PIXELS_PER_DEGREE - 1) > 1e-9):
        raise MissingDependencyError(
            f"global-land-mask {_version()} has an unexpected grid {ocean.shape} (hexatlas expects "
            "21600 x 43200 from 90 N, 180 W): pip install 'global-land-mask==1.0.0'"
        )
    if not np.array_equal(ocean[-1], ocean[-2]):
        # The package clips latitudes to its last axis value and rounds down, so points in the
        # last row's area are looked up in the row above: count that row as land there too.
        ocean = ocean.copy()
        ocean[-1] &= ocean[-2]
    return ocean, lat, lon


def is_land_point(*, lat: ArrayLike, lon: ArrayLike) -> NDArray[np.bool_]:
    """Whether each point is on land according to the mask.

    The same lookup as ``global_land_mask.globe.is_land``, vectorised.

    Parameters
    ----------
    lat, lon : array_like of float
        Latitude in [-90, 90] and longitude in [-180, 180], degrees (WGS84); broadcast together.

    Returns
    -------
    numpy.ndarray of bool
        True on land, in the broadcast shape of ``lat`` and ``lon``.

    Raises
    ------
    InvalidCoordinateError
        A coordinate is NaN, infinite or out of range.
    MissingDependencyError
        ``global-land-mask`` is not installed.
    """
    lat, lon = np.broadcast_arrays(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
    bad = ~(np.abs(lat) <= 90.0) | ~(np.abs(lon) <= 180.0)
    if bad.any():
        where = np.flatnonzero(bad)[0]
        raise InvalidCoordinateError(
            f"point {where} (lat={lat.flat[where]!r}, lon={lon.flat[where]!r}) is not a coordinate: "
            "lat must be in [-90, 90] and lon in [-180, 180] degrees"
        )
    ocean, lat_axis, lon_axis = _mask()
    # The package's own arithmetic (clip to the axis, divide by its step, truncate), so that
    # points on pixel boundaries land in the same pixel as with globe.is_land.
    rows = ((np.clip(lat, lat_axis.min(), lat_axis.max()) - lat_axis[0]) / (lat_axis[1] - lat_axis[0]))
    cols = ((np.clip(lon, lon_axis.min(), lon_axis.max()) - lon_axis[0]) / (lon_axis[1] - lon_axis[0]))
    return np.asarray(~ocean[rows.astype(np.int64), cols.astype(np.int64)])


@functools.lru_cache(maxsize=1)
def _land_count4() -> NDArray[np.uint8]:
    """Land pixels per 4 x 4 block, (5400, 10800) uint8."""
    ocean, _, _ = _mask()
    p = _SAT_POOL
    out = np.empty((_ROWS // p, _COLS // p), np.uint8)
    step = 1200  # rows at a time: bounded temporaries
    for start in range(0, _ROWS, step):
        # Read 4 bool bytes as one word: multiplying by 0x01010101 sums them into its top byte,
        # ten times faster than a reduction over a (.., 4, .., 4) view.
        words = ocean[start:start + step].view(np.uint32)
        ocean_4 = ((words * np.uint32(0x01010101)) >> np.uint32(24)).astype(np.uint8)
        ocean_16 = ocean_4.reshape(step // p, p, -1).sum(axis=1, dtype=np.uint8)
        out[start // p:(start + step) // p] = p * p - ocean_16
    return out


@functools.lru_cache(maxsize=1)
def _summed_area() -> NDArray[np.int32]:
    """Summed-area table of land pixels over 4 x 4 blocks, (5401, 10801) int32 (a third of 933M fits)."""
    counts = _land_count4()
    table = np.zeros((counts.shape[0] + 1, counts.shape[1] + 1), np.int32)
    inner = table[1:, 1:]
    inner[...] = counts
    np.cumsum(inner, axis=1, out=inner)
    for row in range(1, inner.shape[0]):  # row by row: 10x faster than cumsum along axis 0
        inner[row] += inner[row - 1]
    return table


@functools.lru_cache(maxsize=len(_POOLS))  # a fine search walks 7 pools at once (res 0-8): ~300 MB
def _ocean_blocks(pool: int) -> NDArray[np.bool_]:
    """Blocks of ``pool`` x ``pool`` pixels that hold no land, (21600/pool, 43200/pool) bool."""
    ocean, _, _ = _mask()
    if pool == 1:
        return ocean
    if pool == 2:
        pairs = ocean.view(np.uint16) == 0x0101  # two ocean bytes side by side
        return pairs[0::2] & pairs[1::2]
    k = pool // _SAT_POOL
    counts = _land_count4()
    if k == 1:
        return counts == 0
    pooled = counts.reshape(counts.shape[0] // k, k, counts.shape[1] // k, k).sum(axis=(1, 3), dtype=np.int64)
    return pooled == 0


# --------------------------------------------------------------------------- H3 helpers


def _check_res(res: object) -> int:
    if isinstance(res, bool) or not isinstance(res, (int, np.integer)) or not 0 <= res <= MAX_RES:
        raise UnknownResolutionError(
            f"H3 resolution {res!r} does not exist; valid resolutions are 0..{MAX_RES}"
        )
    return int(res)


def _radius_bound(res: int) -> float:
    """An upper bound on the circumradius of every cell at ``res``, radians."""
    import h3

    return RADIUS_FACTOR * h3.average_hexagon_edge_length(res, unit="km") / _EARTH_RADIUS_KM


def _children(cells: NDArray[np.uint64], res: int) -> NDArray[np.uint64]:
    """The children at ``res + 1`` of cells at ``res``, in sorted order when ``cells`` are sorted.

    Bit arithmetic on the H3 index (resolution field, then one 3-bit digit per resolution),
    thousands of times faster than one ``cell_to_children`` call per cell.
    """
    cells = np.asarray(cells, np.uint64)
    child_res = res + 1
    shift = np.uint64(3 * (15 - child_res))
    base = (cells & ~np.uint64(0xF << 52)) | np.uint64(child_res << 52)
    base &= ~(np.uint64(7) << shift)
    out = base[:, None] | (np.arange(7, dtype=np.uint64) << shift)[None, :]
    # A pentagon (pentagonal base cell, all digits 0) has no child on the deleted K axis (digit 1).
    digits = (cells >> np.uint64(3 * (15 - res))) & np.uint64((1 << (3 * res)) - 1)
    pentagon = np.isin((cells >> np.uint64(45)) & np.uint64(0x7F), _PENTAGON_BASE_CELLS) & (digits == 0)
    if not pentagon.any():
        return out.ravel()
    keep = np.ones(out.shape, bool)
    keep[pentagon, 1] = False
    return out[keep]


def _descendants(cells: NDArray[np.uint64], res: int, target: int) -> NDArray[np.uint64]:
    for r in range(res, target):
        cells = _children(cells, r)
    return cells


def _unit(lat_deg: NDArray[np.float64], lon_deg: NDArray[np.float64]) -> NDArray[np.float64]:
    lat, lon = np.radians(lat_deg), np.radians(lon_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def _polygons(cells: NDArray[np.uint64],
              centre: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Inward unit normals of the cells' hull edges (n, k, 3), k <= 10, and circumradii (n,) in radians.

    A zero normal constrains nothing. ``centre``: unit vectors of the cell centres, (n, 3).
    """
    import h3.api.numpy_int as h3i

    boundaries = list(map(h3i.cell_to_boundary, cells.tolist()))
    counts = np.fromiter(map(len, boundaries), dtype=np.int64, count=len(boundaries))
    width = int(counts.max())
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(boundaries)),
                       dtype=np.float64, count=2 * int(counts.sum())).reshape(-1, 2)
    # Pad each polygon by repeating its last vertex: a zero-length edge constrains nothing.
    slot = np.minimum(np.arange(width)[None, :], counts[:, None] - 1) + (np.cumsum(counts) - counts)[:, None]
    verts = _unit(flat[slot, 0], flat[slot, 1])  # (n, width, 3)
    radius = np.arccos(np.clip(np.einsum("nvd,nd->nv", verts, centre), -1.0, 1.0)).max(axis=1)
    normals = np.cross(verts, np.roll(verts, -1, axis=1))
    norm = np.linalg.norm(normals, axis=2, keepdims=True)
    normals = np.where(norm > 1e-15, normals / np.where(norm > 0, norm, 1.0), 0.0)
    normals *= np.sign(np.einsum("nvd,nd->nv", normals, centre))[:, :, None]  # the centre is inside
    # Only hull edges bound the cell: an edge with a vertex outside it is dropped (never wrongly excludes).
    inside = np.einsum("nkd,nvd->nkv", normals, verts).min(axis=2) >= -1e-12
    normals[~inside] = 0.0
    return normals, radius


# --------------------------------------------------------------------------- the tests


def _cap_box(lat: NDArray[np.float64], lon: NDArray[np.float64], radius: NDArray[np.float64] | float,
             pool: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Blocks of ``pool`` pixels covering the lat/lon box of the cap of ``radius`` rad about each point.

    Returns first row, number of rows, first column (0 <= c < columns), number of columns
    (columns wrap around the antimeridian; a cap over a pole takes every column).
    """
    step = pool / PIXELS_PER_DEGREE
    n_rows, n_cols = _ROWS // pool, _COLS // pool
    radius = np.broadcast_to(np.asarray(radius, np.float64), lat.shape)
    top, bottom = lat + np.degrees(radius) + _EPS_DEG, lat - np.degrees(radius) - _EPS_DEG
    r0 = np.clip(np.floor((90.0 - top) / step), 0, n_rows - 1).astype(np.int64)
    r1 = np.clip(np.floor((90.0 - bottom) / step), 0, n_rows - 1).astype(np.int64)
    cos_lat = np.cos(np.radians(lat))
    polar = (top >= 90.0) | (bottom <= -90.0) | (np.sin(radius) >= cos_lat)
    half = np.degrees(np.arcsin(np.clip(np.sin(radius) / np.where(polar, 1.0, cos_lat), 0.0, 1.0))) + _EPS_DEG
    c0 = np.floor((lon - half + 180.0) / step).astype(np.int64)
    c1 = np.floor((lon + half + 180.0) / step).astype(np.int64)
    n = c1 - c0 + 1
    full = polar | (n >= n_cols)
    return r0, r1 - r0 + 1, np.where(full, 0, c0 % n_cols), np.where(full, n_cols, n)


def _land_in_boxes(r0: NDArray[np.int64], nr: NDArray[np.int64], c0: NDArray[np.int64],
                   nc: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Land pixels and all pixels in boxes of 4 x 4 blocks (from :func:`_cap_box` with pool 4)."""
    table = _summed_area()
    n_cols = table.shape[1] - 1
    r1 = r0 + nr

    def part(a: NDArray[np.int64], b: NDArray[np.int64]) -> NDArray[np.int64]:
        return table[r1, b].astype(np.int64) - table[r0, b] - table[r1, a] + table[r0, a]

    end = c0 + nc
    land = part(c0, np.minimum(end, n_cols)) + part(np.zeros_like(c0), np.clip(end - n_cols, 0, n_cols))
    return land, nr * nc * _SAT_POOL * _SAT_POOL


def _fine_pool(res: int) -> int:
    """Block size (pixels) for the polygon test: a block side at most a fifth of a cell radius."""
    limit = 0.2 * _radius_bound(res) / _PIXEL_RAD
    return max(p for p in _POOLS if p <= max(limit, 1))


def _near_land(cells: NDArray[np.uint64], lat: NDArray[np.float64], lon: NDArray[np.float64],
               res: int) -> NDArray[np.bool_]:
    """Whether each cell, widened by ``MARGIN`` times its radius, may meet a land block.

    Never False when it does (test 3 of the module docstring). ``lat``, ``lon``: cell centres
    in degrees, shape (n,). Returns bool, shape (n,).
    """
    hit = np.zeros(len(cells), bool)
    if not len(cells):
        return hit
    pool = _fine_pool(res)
    ocean = _ocean_blocks(pool)
    n_cols = ocean.shape[1]
    step = pool / PIXELS_PER_DEGREE
    half = pool * _PIXEL_RAD / 2
    second_order = 0.5 * (2 * half) ** 2  # bound on the curvature term of x - b over a block
    normals, radius = _polygons(cells, _unit(lat, lon))
    slack = np.sin(MARGIN * radius)
    nx, ny, nz = (np.ascontiguousarray(normals[:, :, d]) for d in range(3))
    # Sines and cosines of block centres, per row and per column, gathered per block below.
    b_lat = np.radians(90.0 - (np.arange(ocean.shape[0]) + 0.5) * step)
    b_lon = np.radians(-180.0 + (np.arange(n_cols) + 0.5) * step)
    sin_lat, cos_lat, sin_lon, cos_lon = np.sin(b_lat), np.cos(b_lat), np.sin(b_lon), np.cos(b_lon)

    def within(owner: NDArray[np.int64], row: NDArray[np.int64], col: NDArray[np.int64]) -> NDArray[np.bool_]:
        """For land blocks (row, col) near cells ``owner``: may the block meet the widened cell?"""
        sp, cp, sl, cl = sin_lat[row], cos_lat[row], sin_lon[col], cos_lon[col]
        alive = np.arange(len(owner))
        for k in range(nx.shape[1]):
            o, sp_, cp_, sl_, cl_ = owner[alive], sp[alive], cp[alive], sl[alive], cl[alive]
            ex, ey, ez = nx[o, k], ny[o, k], nz[o, k]
            horizontal = ex * cl_ + ey * sl_
            # Largest n . x over the block: its centre, plus its half extents along north and
            # east projected on n, plus the curvature bound (and the grid's 1e-9 degree slop).
            top = (horizontal * cp_ + ez * sp_ + half * np.abs(ez * cp_ - horizontal * sp_)
                   + half * cp_ * np.abs(ey * cl_ - ex * sl_) + (second_order + 2 * _EPS_RAD + 1e-12))
            alive = alive[top >= -slack[o]]
        ok = np.zeros(len(owner), bool)
        ok[alive] = True
        return ok

    r0, nr, c0, nc = _cap_box(lat, lon, (1 + MARGIN) * radius, pool)
    # Cells with the same window shape go together, in slices within the block budget.
    shapes, group = np.unique(np.stack([nr, nc], axis=1), axis=0, return_inverse=True)
    group = group.ravel()
    for g, (n_r, n_c) in enumerate(shapes.tolist()):
        members = np.flatnonzero(group == g)
        per_slice = max(1, _WINDOW_BUDGET // (n_r * n_c))
        for start in range(0, len(members), per_slice):
            batch = members[start:start + per_slice]
            rows = r0[batch, None] + np.arange(n_r)
            cols = (c0[batch, None] + np.arange(n_c)) % n_cols
            which, i, j = np.nonzero(~ocean[rows[:, :, None], cols[:, None, :]])
            ok = within(batch[which], rows[which, i], cols[which, j])
            hit[batch[which[ok]]] = True
    return hit


def _classify(cells: NDArray[np.uint64], res: int) -> tuple[NDArray[np.bool_], NDArray[np.bool_], int]:
    """Tests 1-3 for candidate cells of ``res``: (to refine, final, number polygon-tested).

    A cell is neither when it is dropped with all its descendants.
    """
    reach = (1 + MARGIN) * _radius_bound(res)
    lat, lon = cells_to_latlng(cells)
    land, total = _land_in_boxes(*_cap_box(lat, lon, reach, _SAT_POOL))  # test 1
    final = land == total
    refine = np.zeros(len(cells), bool)
    mixed = np.flatnonzero((land > 0) & (land < total))
    on_land = is_land_point(lat=lat[mixed], lon=lon[mixed])  # test 2
    refine[mixed[on_land]] = True
    rest = mixed[~on_land]
    refine[rest[_near_land(cells[rest], lat[rest], lon[rest], res)]] = True  # test 3
    return refine, final, len(rest)


@functools.cache
def _level(res: int) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """Kept cells at ``res``, split in (to refine, final), both sorted uint64.

    Final cells lie in land together with all their descendants (test 1), which are all kept
    without tests; the children of the cells to refine are the candidates at ``res + 1``.
    """
    import h3.api.numpy_int as h3i
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if res == 0:
        candidates = np.sort(np.asarray(h3i.get_res0_cells(), np.uint64))
    else:
        candidates = _children(_level(res - 1)[0], res - 1)
    refine, final = [], []
    tested = 0
    chunks = range(0, len(candidates), _CHUNK_CELLS)
    for start in tqdm(chunks, desc=f"land cells res {res}", unit="chunk", leave=False,
                      disable=None if len(chunks) > 4 else True):
        cells = candidates[start:start + _CHUNK_CELLS]
        to_refine, is_final, n_tested = _classify(cells, res)
        refine.append(cells[to_refine])
        final.append(cells[is_final])
        tested += n_tested
    refine_cells = np.sort(np.concatenate(refine)) if refine else np.empty(0, np.uint64)
    final_cells = np.sort(np.concatenate(final)) if final else np.empty(0, np.uint64)
    _log.info("land cells res %d: %d candidates, %d polygons tested, %d kept to refine, %d kept with all "
              "descendants, %.1f s", res, len(candidates), tested, len(refine_cells), len(final_cells),
              time.perf_counter() - started)
    return refine_cells, final_cells


# --------------------------------------------------------------------------- public


def land_cells(res: int) -> NDArray[np.uint64]:
    """The H3 cells of resolution ``res`` that touch land, coastal cells included.

    Every cell that a land pixel of the mask touches is included (so the cell of every point
    on land), plus a thin band of ocean cells along coasts (within about a quarter of a cell
    radius and one block of land); the parent of every cell is in ``land_cells(res - 1)``. The
    module docstring states the guarantee and why it holds. Results are cached per resolution
    in this process, as are the mask (933 MB) and a summed-area table of it (233 MB).

    Parameters
    ----------
    res : int
        H3 resolution, 0..15. Resolutions 0-5 take about 7 s after the mask loads, 7 about
        15 s (28M cells, 230 MB); each finer resolution holds seven times more cells.

    Returns
    -------
    numpy.ndarray of uint64, shape (n,)
        Sorted unique H3 cell indexes (``h3.api.numpy_int``). Read-only: it is the cached array.

    Raises
    ------
    UnknownResolutionError
        ``res`` is not an integer in 0..15.
    MissingDependencyError
        ``global-land-mask`` is not installed.
    """
    return _land_cells(_check_res(res))


@functools.cache
def _land_cells(res: int) -> NDArray[np.uint64]:
    parts = [_level(res)[0]] + [_descendants(_level(k)[1], k, res) for k in range(res + 1)]
    out = np.concatenate(parts)
    out.sort()
    out.flags.writeable = False
    return out


def touches_land(cells: ArrayLike, res: int) -> NDArray[np.bool_]:
    """Whether each cell of resolution ``res`` is in :func:`land_cells` (``res``), without
    listing the whole resolution: the same tests, run only on the cells' ancestors.

    For the cells of a region at a fine resolution (8-10), where listing every land cell of
    the globe would take minutes and gigabytes. Returns bool, shape (n,).
    """
    from catalog.cells import cells_to_parent

    res = _check_res(res)
    cells = np.asarray(cells, np.uint64)
    out = np.zeros(len(cells), bool)
    open_ = np.arange(len(cells))
    # a shard's cells come sorted, and so do their ancestors at every level (a parent's bits
    # are a prefix of its children's): their distinct values are the changes, no sort needed
    ordered = bool((cells[1:] >= cells[:-1]).all())
    for k in range(res + 1):
        if not len(open_):
            break
        ancestors = cells_to_parent(cells[open_], k) if k < res else cells[open_]
        unique, inverse = _sorted_unique(ancestors) if ordered else np.unique(ancestors, return_inverse=True)
        refine, final = np.zeros(len(unique), bool), np.zeros(len(unique), bool)
        for start in range(0, len(unique), _CHUNK_CELLS):
            part = slice(start, start + _CHUNK_CELLS)
            refine[part], final[part], _ = _classify(unique[part], k)
        inverse = inverse.ravel()
        out[open_[final[inverse]]] = True
        open_ = open_[refine[inverse] & ~final[inverse]]
    out[open_] = True
    return out


def _sorted_unique(values: NDArray[np.uint64]) -> tuple[NDArray[np.uint64], NDArray[np.intp]]:
    """``np.unique(values, return_inverse=True)`` of sorted ``values``, in one pass."""
    starts = np.ones(len(values), bool)
    np.not_equal(values[1:], values[:-1], out=starts[1:])
    return values[starts], np.cumsum(starts) - 1


def release() -> None:
    """Free the mask and everything derived from it (~1.5 GB once a fine shard was tested):
    the build calls this once every shard is written, before finishing."""
    for cached in (_mask, _land_count4, _summed_area, _ocean_blocks, _level, _land_cells):
        cached.cache_clear()


def land_fraction(res: int) -> float:
    """Share of all cells at ``res`` (2 + 120 * 7**res) that :func:`land_cells` keeps, in [0, 1].

    Raises
    ------
    UnknownResolutionError
        ``res`` is not an integer in 0..15.
    MissingDependencyError
        ``global-land-mask`` is not installed.
    """
    res = _check_res(res)
    return len(_land_cells(res)) / (2 + 120 * 7**res)
