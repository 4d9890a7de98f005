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
