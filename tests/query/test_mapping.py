"""Principal-component colours, cell outlines on a flat map, and ``hexatlas map``."""

from __future__ import annotations

import h3
import numpy as np
import pytest

import query
from catalog.cli import main
from catalog.errors import InvalidArgumentError
from query.mapping import _boundary_rings, principal_colors, render_png

MODEL = "satclip-vit16-l10"


def test_principal_colors_follow_the_strongest_directions() -> None:
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(32, 3)))
    coeff = rng.normal(size=(4000, 3)) * [5.0, 3.0, 2.0]
    vectors = coeff @ basis.T + rng.normal(scale=0.1, size=(4000, 32)) + 7.0
    rgb, explained = principal_colors(vectors)
    assert rgb.shape == (4000, 3) and rgb.dtype == np.uint8
    for channel in range(3):  # red follows the largest-variance direction, and so on
        assert abs(np.corrcoef(rgb[:, channel], coeff[:, channel])[0, 1]) > 0.95
    expected = np.array([25.0, 9.0, 4.0]) / (38.0 + 32 * 0.01)
    np.testing.assert_allclose(explained, expected, rtol=0.08)
    again, _ = principal_colors(vectors[::-1])  # order does not change any cell's colour
    np.testing.assert_array_equal(again[::-1], rgb)
    flipped, _ = principal_colors(-vectors)  # signs are fixed by the loadings: negated data, inverted colours
    assert np.abs(flipped.astype(int) + rgb.astype(int) - 255).max() <= 1
    with pytest.raises(InvalidArgumentError, match="at least 2"):
        principal_colors(np.zeros((1, 4)))


@pytest.mark.parametrize("res", [0, 1, 2])
def test_cell_outlines_tile_the_flat_map_exactly(res: int) -> None:
    """Unwrapped rings (pole cells closed along the map edge) cover 360 x 180 degrees once."""
    cells = np.array([h3.str_to_int(c) for c in h3.get_res0_cells()], dtype=np.uint64)
    if res:
        cells = np.array([h3.str_to_int(k) for c in h3.get_res0_cells() for k in h3.cell_to_children(c, res)],
                         dtype=np.uint64)
    area = 0.0
    for ring in _boundary_rings(cells):
        x, y = ring[:, 0], ring[:, 1]
        area += abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2
    np.testing.assert_allclose(area, 360.0 * 180.0, rtol=1e-9)


def test_render_png_and_cli(atlas_dir, tmp_path, capsys) -> None:
    from PIL import Image

    atlas = query.open(atlas_dir[0])
    out = render_png(atlas, tmp_path / "map.png", res=1, model=MODEL, width_px=600)
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[1] == 600 and image.shape[0] == round(600 * 0.56)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200
    with pytest.raises(InvalidArgumentError, match=r"\.png"):
        render_png(atlas, tmp_path / "map.jpg", res=1, model=MODEL)

    assert main(["map", str(atlas_dir[0]), "--model", "toy", "--res", "1", "--output", str(tmp_path / "t.png"),
                 "--width", "400"]) == 0
    assert (tmp_path / "t.png").stat().st_size > 1000 and "wrote" in capsys.readouterr().out
    assert main(["map", str(atlas_dir[0]), "--model", MODEL, "--res", "5", "--output", str(tmp_path / "x.png")]) == 2
    assert "resolution 5 is not in this atlas" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def _cells(res: int) -> np.ndarray:
    return np.array([h3.str_to_int(k) for c in h3.get_res0_cells() for k in h3.cell_to_children(c, res)],
                    dtype=np.uint64)


def _axes_box(image: np.ndarray) -> tuple[slice, slice]:
    """Rows and columns inside the map: where the (all-painted) cells are, 3 pixels in."""
    painted = (image < 40).all(axis=2)
    rows, cols = np.flatnonzero(painted.sum(1) > painted.shape[1] // 2), np.flatnonzero(painted.sum(0) > painted.shape[0] // 2)
    return slice(rows[0] + 3, rows[-1] - 3), slice(cols[0] + 3, cols[-1] - 3)


def test_png_cells_on_the_antimeridian_are_drawn_once_without_a_band(tmp_path) -> None:
    from PIL import Image

    from query.mapping import MapLayer, render_layer

    cells = _cells(1)
    rings = _boundary_rings(cells)
    crossing = [c for c, r in zip(cells.tolist(), rings) if (r[:, 0].min() < -180 or r[:, 0].max() > 180)
                and abs(h3.cell_to_latlng(h3.int_to_str(c))[0]) < 60]
    assert len(crossing) >= 4
    # every cell black, the crossing ones pure green: a band would paint green across the map
    rgb = np.zeros((len(cells), 3), np.uint8)
    rgb[np.isin(cells, crossing)] = [0, 255, 0]
    layer = MapLayer("test", 1, cells, rgb, (1.0, 0.0, 0.0))
    image = np.asarray(Image.open(render_layer(layer, tmp_path / "a.png", title="t", width_px=900,
                                               coastlines=False)).convert("RGB")).astype(int)
    rows, cols = _axes_box(np.where((np.abs(image - [0, 255, 0]).max(axis=2) < 30)[..., None], 0, image))
    inside = image[rows, cols]
    green = np.abs(inside - [0, 255, 0]).max(axis=2) < 30
    width = green.shape[1]
    columns = np.flatnonzero(green.any(axis=0))
    assert columns.min() < 0.02 * width and columns.max() > 0.98 * width  # both halves, at both edges
    assert not green[:, int(0.1 * width):int(0.9 * width)].any()  # and nothing between: no band
    for lat in {round(h3.cell_to_latlng(h3.int_to_str(c))[0]) for c in crossing}:  # each row drawn at the edges
        row = int((90 - lat) / 180 * green.shape[0])
        assert green[row, : int(0.05 * width)].any() or green[row, int(0.95 * width):].any()


def test_png_coastlines_come_from_the_installed_land_mask(tmp_path) -> None:
    from PIL import Image

    from query.mapping import MapLayer, coastline_grid, render_layer

    lon, lat, count = coastline_grid()
    assert count.shape == (1800, 3600) and count.max() == 144
    at = lambda la, lo: count[np.abs(lat - la).argmin(), np.abs(lon - lo).argmin()]
    assert at(0.0, 20.0) == 144 and at(0.0, -30.0) == 0 and at(-80.0, 0.0) == 144  # Congo, Atlantic, Antarctica
    cells = _cells(0)
    layer = MapLayer("test", 0, cells, np.zeros((len(cells), 3), np.uint8), (1.0, 0.0, 0.0))
    white = []
    for coast in (False, True):
        image = np.asarray(Image.open(render_layer(layer, tmp_path / f"{coast}.png", title="t", width_px=900,
                                                   coastlines=coast)).convert("RGB")).astype(int)
        rows, cols = _axes_box(image)
        north = image[rows, cols][: (rows.stop - rows.start) // 2]  # above the legend
        white.append(int((north.min(axis=2) > 120).sum()))
    assert white[0] == 0 and white[1] > 2000
