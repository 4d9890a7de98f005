"""Land-only cells: every point on land falls in a kept cell, parents are kept, open ocean is dropped.

h3 itself (``latlng_to_cell``, ``cell_to_parent``, ``cell_to_children``) and the package's own
``globe.is_land`` are the references.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import h3
import h3.api.numpy_int as h3i
import numpy as np
import pytest

from builder import landmask
from builder.landmask import MARGIN, MASK_DESCRIPTION, is_land_point, land_cells, land_fraction
from catalog.errors import InvalidCoordinateError, UnknownResolutionError

pytest.importorskip("global_land_mask")

# Archipelagos and high-latitude coasts: one-pixel islands, the antimeridian, narrow pixels.
HARD_COASTS = {
    "Maldives": (3.2, 73.2), "Tuamotu": (-17.0, -144.0), "Fiji (antimeridian)": (-16.8, 179.9),
    "Aleutians (antimeridian)": (51.8, 179.5), "Svalbard": (78.5, 16.0), "north Greenland": (83.0, -35.0),
    "Antarctic Peninsula": (-64.5, -62.0), "Chilean fjords": (-50.0, -75.0),
}


def _cells(lat: np.ndarray, lon: np.ndarray, res: int) -> np.ndarray:
    return np.fromiter(map(h3i.latlng_to_cell, lat.tolist(), lon.tolist(), itertools.repeat(res)),
                       dtype=np.uint64, count=len(lat))


def _ocean() -> np.ndarray:
    from global_land_mask import globe

    return globe._mask


def _pixel_points(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Corners (a hair inside), edge midpoints and centre of each pixel: 9 points per pixel."""
    fractions = [1e-7, 0.5, 1 - 1e-7]
    lat = np.concatenate([90 - (rows + a) / 120 for a, _ in itertools.product(fractions, fractions)])
    lon = np.concatenate([-180 + (cols + b) / 120 for _, b in itertools.product(fractions, fractions)])
    return lat, lon


def _coastal_pixels(ocean: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Those of the given pixels that are land with an ocean pixel beside, above or below."""
    n_rows, n_cols = ocean.shape
    wet = np.zeros(len(rows), bool)
    for dr, dc in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        wet |= ocean[np.clip(rows + dr, 0, n_rows - 1), (cols + dc) % n_cols]
    keep = ~ocean[rows, cols] & wet
    return rows[keep], cols[keep]


@pytest.fixture(scope="module")
def land_points() -> tuple[np.ndarray, np.ndarray]:
    """20,000 points uniform on the sphere that the mask calls land, plus points on coastlines."""
    rng = np.random.default_rng(7)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, 100_000)))
    lon = rng.uniform(-180, 180, 100_000)
    on_land = is_land_point(lat=lat, lon=lon)
    lat, lon = lat[on_land][:20_000], lon[on_land][:20_000]
    assert len(lat) == 20_000
    ocean = _ocean()
    # Coastal pixels anywhere, and every coastal pixel of the hard places.
    rows, cols = _coastal_pixels(ocean, rng.integers(0, 21600, 2_000_000), rng.integers(0, 43200, 2_000_000))
    hard = []
    for c_lat, c_lon in HARD_COASTS.values():
        r = np.arange(-60, 60) + int((90 - c_lat) * 120)
        c = (np.arange(-60, 60) + int((c_lon + 180) * 120)) % 43200
        rr, cc = np.meshgrid(r, c, indexing="ij")
        hard.append(_coastal_pixels(ocean, rr.ravel(), cc.ravel()))
    rows = np.concatenate([rows] + [h[0] for h in hard])
    cols = np.concatenate([cols] + [h[1] for h in hard])
    assert len(rows) > 6_000
    c_lat, c_lon = _pixel_points(rows, cols)
    assert is_land_point(lat=c_lat, lon=c_lon).all()
    return np.concatenate([lat, c_lat]), np.concatenate([lon, c_lon])


def test_is_land_point_matches_the_package() -> None:
    from global_land_mask import globe

    rng = np.random.default_rng(1)
    lat = np.concatenate([rng.uniform(-90, 90, 50_000), 90 - rng.integers(0, 21601, 5_000) / 120,
                          [90, -90, 0, 0]])
    lon = np.concatenate([rng.uniform(-180, 180, 50_000), -180 + rng.integers(0, 43201, 5_000) / 120,
                          [180, -180, 180, -180]])
    ours = is_land_point(lat=lat, lon=lon)
    np.testing.assert_array_equal(ours, globe.is_land(lat.copy(), lon.copy()))
    assert 0.25 < ours[:50_000].mean() < 0.40  # a third of the pixels are land
    assert is_land_point(lat=48.85, lon=2.35) and not is_land_point(lat=0.0, lon=-140.0)
    assert is_land_point(lat=np.zeros((2, 3)), lon=0.0).shape == (2, 3)


@pytest.mark.parametrize(("lat", "lon"), [(np.nan, 0.0), (91.0, 0.0), (0.0, -180.5), (0.0, np.inf)])
def test_is_land_point_rejects_bad_coordinates(lat: float, lon: float) -> None:
    with pytest.raises(InvalidCoordinateError, match=r"lat must be in \[-90, 90\]"):
        is_land_point(lat=[0.0, lat], lon=[0.0, lon])


@pytest.mark.parametrize("res", [0, 1, 2, 3, 4, 5])
def test_every_land_point_falls_in_a_kept_cell(res: int, land_points) -> None:
    lat, lon = land_points
    kept = land_cells(res)
    cells = _cells(lat, lon, res)
    missing = kept[np.minimum(np.searchsorted(kept, cells), len(kept) - 1)] != cells
    assert not missing.any(), (
        f"{missing.sum()} land points outside kept cells, e.g. {lat[missing][:3]}, {lon[missing][:3]}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("res", [6, 7])
def test_every_land_point_falls_in_a_kept_cell_fine(res: int, land_points) -> None:
    test_every_land_point_falls_in_a_kept_cell(res, land_points)


@pytest.mark.parametrize("res", [0, 1, 2, 3, 4, 5])
def test_counts_sorted_and_parents_kept(res: int) -> None:
    kept = land_cells(res)
    total = 2 + 120 * 7**res
    assert 0 < len(kept) < total
    assert land_fraction(res) == len(kept) / total
    assert kept.dtype == np.uint64 and (np.diff(kept.astype(np.int64)) > 0).all()
    assert all(h3i.get_resolution(c) == res for c in kept[:: max(1, len(kept) // 1000)].tolist())
    if res:
        parents = np.fromiter(map(h3i.cell_to_parent, kept.tolist(), itertools.repeat(res - 1)),
                              np.uint64, len(kept))
        assert np.isin(parents, land_cells(res - 1)).all()


def test_land_share_and_the_coastal_band() -> None:
    ocean = _ocean()
    weight = np.cos(np.radians(90 - (np.arange(ocean.shape[0]) + 0.5) / 120))
    land_share = (weight * (ocean.shape[1] - ocean.sum(axis=1))).sum() / (weight.sum() * ocean.shape[1])
    assert 0.28 < land_share < 0.30  # the mask: 28.9% of the Earth's area, lakes included
    # Coarse cells are kept far out to sea (a few islands suffice); finer ones approach the share.
    fractions = [land_fraction(r) for r in range(6)]
    assert fractions == sorted(fractions, reverse=True)
    assert fractions[0] > 0.9 and land_share < fractions[5] < land_share + 0.02


@pytest.mark.parametrize("res", [3, 4, 5])
def test_open_ocean_dropped_and_interiors_kept(res: int) -> None:
    ocean = _ocean()
    kept = land_cells(res)
    # No land within `clear` degrees: more than a cell's diameter plus its margin at `res`
    # (radius up to 79, 30, 11 km at resolutions 3, 4, 5); the South Sandwich Islands are
    # 160 km from (-60, -30), too close to rule out a res-3 cell.
    clear = {3: 2.2, 4: 0.9, 5: 0.4}[res]
    far = [(0.0, -140.0), (-62.0, -20.0), (-45.0, 100.0)] + [(-60.0, -30.0)] * (res >= 4)
    for lat, lon in far:
        half_lon = clear / np.cos(np.radians(lat))
        rows = slice(int((90 - lat - clear) * 120), int((90 - lat + clear) * 120))
        cols = slice(int((lon + 180 - half_lon) * 120), int((lon + 180 + half_lon) * 120))
        assert ocean[rows, cols].all()
        assert h3i.latlng_to_cell(lat, lon, res) not in kept
    for lat, lon in [(48.85, 2.35), (-15.0, -55.0), (45.0, 90.0), (-80.0, 0.0)]:
        assert h3i.latlng_to_cell(lat, lon, res) in kept


def test_descendants_stay_within_the_margin() -> None:
    """The premise of the coarse-to-fine search: no descendant reaches MARGIN radii out of its ancestor."""
    rng = np.random.default_rng(3)
    res1 = np.concatenate([h3i.cell_to_children(c, 1) for c in h3i.get_res0_cells()])
    parents = [(c, 0, 3) for c in h3i.get_res0_cells().tolist()]  # every base cell, 343 descendants each
    parents += [(c, 1, 3) for c in rng.choice(res1, 60, replace=False).tolist()]
    parents += [(h3i.cell_to_parent(h3i.latlng_to_cell(a, o, 9), 6), 6, 2)
                for a, o in zip(rng.uniform(-85, 85, 60).tolist(), rng.uniform(-180, 180, 60).tolist())]
    worst = 0.0
    for cell, res, depth in parents:
        centre = h3i.cell_to_latlng(cell)
        boundary = h3i.cell_to_boundary(cell)
        radius = max(h3.great_circle_distance(centre, v, unit="rads") for v in boundary)
        outside = _gnomonic_distance_outside(centre, boundary, h3i.cell_to_children(cell, res + depth))
        worst = max(worst, outside / radius)
    assert 0.1 < worst < MARGIN - 0.04, worst  # 0.19 measured over all res-1 cells to depth 4


def _gnomonic_distance_outside(centre, boundary, cells) -> float:
    """Largest distance of the cells' vertices from the polygon, in the gnomonic plane about ``centre``.

    Great circles are straight there and the projection only stretches, so this bounds the
    angular distance from above.
    """
    def project(points):
        lat, lon = np.radians(np.asarray(points)[:, 0]), np.radians(np.asarray(points)[:, 1])
        lat0, lon0 = np.radians(centre[0]), np.radians(centre[1])
        cos_c = np.sin(lat0) * np.sin(lat) + np.cos(lat0) * np.cos(lat) * np.cos(lon - lon0)
        x = np.cos(lat) * np.sin(lon - lon0) / cos_c
        y = (np.cos(lat0) * np.sin(lat) - np.sin(lat0) * np.cos(lat) * np.cos(lon - lon0)) / cos_c
        return np.stack([x, y], axis=1)

    poly = project(boundary)
    pts = project([v for c in cells.tolist() for v in h3i.cell_to_boundary(c)])
    a, b = poly, np.roll(poly, -1, axis=0)
    ab = b - a
    t = np.clip(np.einsum("pkd,kd->pk", pts[:, None] - a[None], ab) / (ab * ab).sum(1), 0, 1)
    seg = np.linalg.norm(pts[:, None] - (a[None] + t[..., None] * ab[None]), axis=2).min(axis=1)
    rel = pts[:, None] - a[None]
    cross = ab[None, :, 0] * rel[..., 1] - ab[None, :, 1] * rel[..., 0]
    inside = (cross >= 0).all(axis=1) | (cross <= 0).all(axis=1)
    return float(np.where(inside, 0.0, seg).max())


def test_radius_bound_holds_for_every_cell() -> None:
    for res in range(4):
        cells = np.concatenate([h3i.cell_to_children(c, res) for c in h3i.get_res0_cells()])
        radius = max(max(h3.great_circle_distance(h3i.cell_to_latlng(c), v, unit="rads")
                         for v in h3i.cell_to_boundary(c)) for c in cells.tolist())
        assert radius < landmask._radius_bound(res) < 1.1 * radius


def test_children_by_bits_match_h3() -> None:
    for res in range(4):
        cells = np.sort(np.concatenate([h3i.cell_to_children(c, res) for c in h3i.get_res0_cells()]))
        expected = np.concatenate([h3i.cell_to_children(c, res + 1) for c in cells.tolist()])
        cells, expected = cells.astype(np.uint64), expected.astype(np.uint64)
        children = landmask._children(cells, res)
        np.testing.assert_array_equal(children, np.sort(expected))  # also: already in sorted order


@pytest.mark.parametrize("res", [-1, 16, 2.0, True, "3", None])
def test_bad_resolution(res) -> None:
    for function in (land_cells, land_fraction):
        with pytest.raises(UnknownResolutionError, match=r"valid resolutions are 0\.\.15"):
            function(res)


def test_cached_read_only_and_described() -> None:
    assert land_cells(2) is land_cells(np.int64(2))
    with pytest.raises(ValueError, match="read-only"):
        land_cells(2)[0] = 0
    assert f"global-land-mask {version('global-land-mask')} " in MASK_DESCRIPTION
    assert "1/120 degree" in MASK_DESCRIPTION and "\n" not in MASK_DESCRIPTION


def test_missing_package_names_the_install_line() -> None:
    code = (
        "import sys; sys.modules['global_land_mask'] = None\n"
        "from builder.landmask import land_cells\n"
        "from catalog.errors import MissingDependencyError\n"
        "try:\n    land_cells(0)\nexcept MissingDependencyError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert "pip install 'hexatlas[build]'" in out and "global-land-mask" in out


def test_touches_land_is_the_list_without_listing() -> None:
    """The same answer as :func:`land_cells` for any cells, from their ancestors only; a
    second batch at a fine resolution reuses the pooled mask of every level (a shard of a
    global build is tested like this, and re-pooling a level costs seconds)."""
    from builder.landmask import touches_land

    rng = np.random.default_rng(4)
    for res in (3, 4):
        every = np.sort(np.asarray(h3i.uncompact_cells(h3i.get_res0_cells(), res), np.uint64))
        cells = every[rng.choice(len(every), 20_000, replace=False)]
        np.testing.assert_array_equal(touches_land(cells, res), np.isin(cells, land_cells(res)))
    coast = h3i.latlng_to_cell(43.30, 5.37, 6)  # Marseille: land, sea and islands
    fine = np.sort(np.asarray(h3i.cell_to_children(coast, 8), np.uint64))
    first = touches_land(fine, 8)
    assert 0 < first.mean() < 1
    misses = landmask._ocean_blocks.cache_info().misses
    np.testing.assert_array_equal(touches_land(fine[::-1], 8), first[::-1])
    assert landmask._ocean_blocks.cache_info().misses == misses
    landmask.release()  # as a build does once its shards are written: the mask goes, answers stay
    assert landmask._mask.cache_info().currsize == landmask._ocean_blocks.cache_info().currsize == 0
    np.testing.assert_array_equal(touches_land(fine, 8), first)
