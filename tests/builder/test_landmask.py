"""Land-only cells: every point on land falls in a kept cell; open ocean is dropped."""

from __future__ import annotations

import h3.api.numpy_int as h3i
import numpy as np
import pytest

from builder.grid import cell_count
from builder.landmask import MASK_DESCRIPTION, PIXELS_PER_DEGREE, _land_pixels, is_land_point, land_cells
from catalog.errors import UnknownResolutionError

pytest.importorskip("global_land_mask")


def _land_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform on the sphere, kept where the mask says land, plus points hugging coastlines."""
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 20 * n)))
    lon = rng.uniform(-180, 180, 20 * n)
    on_land = is_land_point(lat, lon)
    lat, lon = lat[on_land][:n], lon[on_land][:n]
    # coastal pixels: land pixels with an ocean pixel to the east; points near their corners
    land = _land_pixels()
    rows = rng.integers(0, land.shape[0], 4000)
    cols = rng.integers(0, land.shape[1] - 1, 4000)
    coast = land[rows, cols] & ~land[rows, cols + 1]
    rows, cols = rows[coast], cols[coast]
    frac = rng.choice([1e-6, 0.5, 1 - 1e-6], size=(2, rows.size))
    c_lat = 90 - (rows + frac[0]) / PIXELS_PER_DEGREE
    c_lon = -180 + (cols + frac[1]) / PIXELS_PER_DEGREE
    return np.concatenate([lat, c_lat]), np.concatenate([lon, c_lon])


@pytest.mark.parametrize("res", [0, 1, 2, 3, 4])
def test_every_land_point_falls_in_a_kept_cell(res: int) -> None:
    lat, lon = _land_points(20_000, seed=res)
    assert is_land_point(lat, lon).all()
    kept = land_cells(res)
    cells = np.array([h3i.latlng_to_cell(a, o, res) for a, o in zip(lat, lon)], dtype=np.uint64)
    missing = ~np.isin(cells, kept)
    assert not missing.any(), f"{missing.sum()} land points outside kept cells, e.g. {lat[missing][:3]}, {lon[missing][:3]}"
    assert 0 < len(kept) < cell_count(res)
    assert (np.diff(kept.astype(np.int64)) > 0).all()


def test_open_ocean_is_dropped_and_interiors_kept() -> None:
    kept = land_cells(3)
    def cell(lat, lon):
        return h3i.latlng_to_cell(lat, lon, 3)

    for lat, lon in [(0.0, -140.0), (-60.0, -30.0), (-40.0, 80.0)]:
        assert cell(lat, lon) not in kept
    for lat, lon in [(48.85, 2.35), (-15.0, -55.0), (45.0, 90.0)]:
        assert cell(lat, lon) in kept


def test_parents_of_land_cells_touch_land_or_neighbour_it() -> None:
    coarse, fine = land_cells(2), land_cells(3)
    parents = np.unique(np.array([h3i.cell_to_parent(c, 2) for c in fine.tolist()], dtype=np.uint64))
    ring = np.unique(np.concatenate([h3i.grid_disk(c, 1) for c in coarse.tolist()]).astype(np.uint64))
    assert np.isin(parents, ring).all()
    assert np.isin(parents, coarse).mean() > 0.99


def test_bad_resolution_and_description() -> None:
    for res in (-1, 16):
        with pytest.raises(UnknownResolutionError, match="0..15"):
            land_cells(res)
    assert "global-land-mask 1.0.0" in MASK_DESCRIPTION and "1/120 degree" in MASK_DESCRIPTION
