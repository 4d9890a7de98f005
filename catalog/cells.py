"""H3 cell ids: the one place that converts between coordinates, uint64 ids and hex strings."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["cell_to_hex", "cells_to_latlng", "cells_to_parent", "descendant_spread_km", "hex_to_cell", "in_sorted",
           "latlng_to_cells"]


def latlng_to_cells(lat: NDArray[np.float64], lon: NDArray[np.float64], res: int) -> NDArray[np.uint64]:
    """H3 cells (uint64) holding each point (degrees) at resolution ``res``; shape (n,)."""
    # h3-py has no array API, so this is one C call per point. Its Cython core skips the
    # public wrapper's per-call conversions: ~0.45 us a point instead of ~0.9 us.
    try:
        from h3._cy import latlng_to_cell as to_cell
    except ImportError:  # a future h3-py may move it; the public API is always there
        from h3.api.numpy_int import latlng_to_cell as to_cell
    lat_l, lon_l = np.asarray(lat, np.float64).tolist(), np.asarray(lon, np.float64).tolist()
    return np.fromiter(map(to_cell, lat_l, lon_l, [int(res)] * len(lat_l)), dtype=np.uint64, count=len(lat_l))


def cells_to_latlng(cells: NDArray[np.uint64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Centres of cells in degrees: (lat, lon), float64 arrays of shape (n,)."""
    try:  # the Cython core without the public wrapper's checks: ~0.75 us a cell instead of ~0.95
        from h3._cy import cell_to_latlng as to_latlng
    except ImportError:
        from h3.api.numpy_int import cell_to_latlng as to_latlng
    flat = np.fromiter((v for c in np.asarray(cells, np.uint64).tolist() for v in to_latlng(c)),
                       dtype=np.float64, count=2 * len(cells)).reshape(-1, 2)
    return np.ascontiguousarray(flat[:, 0]), np.ascontiguousarray(flat[:, 1])


def cells_to_parent(cells: NDArray[np.uint64], res: int) -> NDArray[np.uint64]:
    """The ancestors at resolution ``res`` of cells (uint64) at ``res`` or finer; shape (n,).

    Bit arithmetic on the index (the resolution field, then unused digits set to 7), as
    ``h3.cell_to_parent`` does, without a call per cell.
    """
    cells = np.asarray(cells, np.uint64)
    unused = np.uint64((1 << (3 * (15 - int(res)))) - 1)
    return (cells & ~np.uint64(0xF << 52)) | np.uint64(int(res) << 52) | unused


def descendant_spread_km(res: int) -> float:
    """A bound on the distance from a cell's centre at resolution ``res`` to the centre of any
    of its descendants: twice the resolution's average edge length. Measured at resolutions
    0-8 (140 cells each, pentagons among them, descendants 1-3 resolutions finer): at most
    1.085 edges; H3 places a child's centre within its parent's hexagon, whose radius is an
    edge, each finer level adding a 7th of the area (tested)."""
    import h3

    return 2.0 * h3.average_hexagon_edge_length(int(res), unit="km")


def in_sorted(sorted_cells: NDArray[np.uint64], cells: NDArray[np.uint64]) -> NDArray[np.bool_]:
    """Whether each of ``cells`` is in ``sorted_cells`` (ascending uint64, e.g. memory-mapped);
    a binary search per cell, never a copy of the sorted array."""
    cells = np.asarray(cells, dtype=np.uint64)
    if not len(sorted_cells):
        return np.zeros(cells.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_cells, cells), len(sorted_cells) - 1)
    return np.asarray(sorted_cells[pos]) == cells


def cell_to_hex(cell: int) -> str:
    return f"{int(cell):x}"


def hex_to_cell(text: str | int) -> int:
    """An H3 cell from its hex string (``"831fb4fffffffff"``) or integer form."""
    from catalog.errors import InvalidArgumentError

    if isinstance(text, (int, np.integer)):
        return int(text)
    try:
        return int(str(text).strip().lower().removeprefix("0x"), 16)
    except ValueError:
        raise InvalidArgumentError(f"{text!r} is not an H3 cell (hex string like 831fb4fffffffff)") from None
