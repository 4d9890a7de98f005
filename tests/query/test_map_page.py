"""The map page in a real browser: Debian's chromium, headless, driven by Playwright.

Loads the page from a live server, checks the picture (cells drawn in their principal-
component colours), clicks a place and checks the similar places listed and outlined.
Skipped, saying why, where chromium or the page's npm packages are not installed
(``make test`` installs both where it can).
"""

from __future__ import annotations

import io
import shutil

import h3
import numpy as np
import pytest

import query
from query.mapping import map_layer
from query.server import _missing_vendor, create_app
from tests.query._server import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)"),
    pytest.mark.skipif(bool(_missing_vendor()), reason="map page npm packages missing (npm ci in query/web)"),
]
MODEL = "satclip-vit16-l10"


@pytest.fixture(scope="module")
def page(atlas_dir):
    sync_api = pytest.importorskip("playwright.sync_api")
    atlas = query.open(atlas_dir[0])
    with running(create_app(atlas)) as url, sync_api.sync_playwright() as pw:
        # WebGL without a GPU: chromium's software rasteriser.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--enable-unsafe-swiftshader",
                                                                      "--use-angle=swiftshader"])
        tab = browser.new_page(viewport={"width": 1000, "height": 600})
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.goto(f"{url}/")
        tab.wait_for_function("window.hexatlasState && window.hexatlasState.status !== 'loading'", timeout=60_000)
        yield tab, atlas, errors
        browser.close()


def _pixels(tab) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(tab.screenshot())).convert("RGB")).astype(int)


def test_page_draws_the_cells_in_their_colours(page) -> None:
    tab, atlas, errors = page
    state = tab.evaluate("window.hexatlasState")
    assert state["status"] == "ready" and not errors, (state, errors)
    assert state["model"] == MODEL and state["res"] == 2 and state["cells"] == 2 + 120 * 7**2
    assert "principal components" in tab.inner_text("#legend")

    layer = map_layer(atlas, 2, MODEL)
    colour = dict(zip(layer.cells.tolist(), layer.rgb.tolist()))
    tab.wait_for_timeout(500)  # a frame after the data arrived
    shot = _pixels(tab)
    assert len(np.unique(shot.reshape(-1, 3) // 16, axis=0)) > 50  # many colours, not an empty canvas
    matches = 0
    for place in [(-30.0, 20.0), (0.0, 60.0), (40.0, 100.0), (-20.0, 140.0), (10.0, 0.0)]:
        cell = h3.latlng_to_cell(*place, 2)
        lat, lon = h3.cell_to_latlng(cell)  # sample cell centres, far from any edge
        x, y = tab.evaluate(f"window.hexatlasProject({lon}, {lat})")
        want = np.asarray(colour[h3.str_to_int(cell)])
        got = shot[round(y), round(x)]
        matches += int(np.abs(got - want).max() <= 24)  # land outlines may cross a sampled pixel
    assert matches >= 4


def test_click_lists_and_outlines_the_most_similar_places(page) -> None:
    tab, atlas, errors = page
    clicked = h3.latlng_to_cell(35.0, 105.0, 2)
    lat, lon = h3.cell_to_latlng(clicked)
    before = _pixels(tab)
    x, y = tab.evaluate(f"window.hexatlasProject({lon}, {lat})")
    tab.mouse.click(x, y)
    tab.wait_for_function("window.hexatlasState.similar.length > 0 && window.hexatlasState.status === 'ready'",
                          timeout=30_000)
    state = tab.evaluate("window.hexatlasState")
    assert state["selected"] == clicked and not errors
    want = atlas.similar(cell=clicked, k=10, res=2, model=MODEL)
    assert [r["cell"] for r in state["similar"]] == [h3.int_to_str(c) for c in want.column("cell").to_pylist()]
    items = tab.locator("#similar li").all_inner_texts()
    assert len(items) == 10 and "cosine 1.000" in items[0]
    tab.wait_for_timeout(500)
    changed = np.abs(_pixels(tab) - before).max(axis=2) > 60
    assert changed.sum() > 100  # the outlines were drawn


def test_far_away_similar_places(page) -> None:
    tab, atlas, errors = page
    tab.select_option("#exclude", "1000")
    cell = h3.latlng_to_cell(20.0, 80.0, 2)
    lat, lon = h3.cell_to_latlng(cell)
    x, y = tab.evaluate(f"window.hexatlasProject({lon}, {lat})")
    tab.mouse.click(x, y)
    tab.wait_for_function(f"window.hexatlasState.selected === '{cell}' && window.hexatlasState.status === 'ready'",
                          timeout=30_000)
    want = atlas.similar(cell=cell, k=10, res=2, model=MODEL, exclude_within_km=1000)
    got = tab.evaluate("window.hexatlasState.similar")
    assert [r["cell"] for r in got] == [h3.int_to_str(c) for c in want.column("cell").to_pylist()] and not errors
    tab.select_option("#exclude", "0")


def test_switching_resolution_reloads_the_layer(page) -> None:
    tab, _, errors = page
    tab.select_option("#res", "1")
    tab.wait_for_function("window.hexatlasState.res === 1 && window.hexatlasState.status === 'ready'", timeout=30_000)
    state = tab.evaluate("window.hexatlasState")
    assert state["cells"] == 2 + 120 * 7 and state["similar"] == [] and not errors


def test_cells_on_the_antimeridian_and_poles_are_drawn_once(page) -> None:
    tab, atlas, errors = page
    tab.select_option("#res", "1")
    tab.wait_for_function("window.hexatlasState.res === 1 && window.hexatlasState.status === 'ready'", timeout=30_000)
    polygons = [np.asarray(p) for p in tab.evaluate("window.hexatlasPolygons()")]
    lon = np.concatenate([p[:, 0] for p in polygons])
    assert lon.min() >= -180 and lon.max() <= 180  # cut at the antimeridian, nothing past the edge
    area = sum(abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(p[:, 1], np.roll(p[:, 0], -1))) / 2 for p in polygons)
    np.testing.assert_allclose(area, 360 * 2 * 85.051129, rtol=1e-6)  # the map covered once: no band, no gap
    crossing = [c for c in h3.get_res0_cells() for k in h3.cell_to_children(c, 1)
                if np.ptp([lng for _, lng in h3.cell_to_boundary(k)]) > 180 and abs(h3.cell_to_latlng(k)[0]) < 70]
    crossing = [k for k in dict.fromkeys(crossing)]
    assert crossing
    for cell in crossing:
        pieces = [np.asarray(p) for p in tab.evaluate("(c) => window.hexatlasCellPolygons(c)", cell)]
        assert len(pieces) == 2 and sum(np.ptp(p[:, 0]) for p in pieces) < 90  # a piece each side, no band
        assert sorted(np.sign(p[:, 0].mean()) for p in pieces) == [-1, 1]
    tab.select_option("#res", "2")
    tab.wait_for_function("window.hexatlasState.res === 2 && window.hexatlasState.status === 'ready'", timeout=30_000)
    assert not errors
