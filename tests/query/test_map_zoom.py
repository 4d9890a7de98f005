"""The map page at three zoom levels, in real Chromium, on an atlas above the map's limit.

A regional resolution-7-only atlas (21,036 cells; tests/query/conftest.py) served with a map
limit of 5,000 cells: the globe is drawn from a stored overview level, the region (a
country's zoom) from a finer overview level, a city from the atlas's own cells. Each
screenshot is checked for drawn cells and for their colours, computed here from the
embeddings and the manifest's basis (tests/query/_colours.py); then a click, pans, and the
same page over a remote (HTTP) atlas. Skipped, saying why, where chromium or the page's npm
packages are not installed.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from collections.abc import Iterator

import h3
import numpy as np
import pytest

import query
from query.server import Limits, _missing_vendor, create_app
from tests.query import _colours
from tests.query._server import running

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)"),
    pytest.mark.skipif(bool(_missing_vendor()), reason="map page npm packages missing (npm ci in query/web)"),
]
LIMIT = 5000
PANEL_RIGHT = 340  # the control panel covers the map left of this (pixels)
BACKGROUND = np.array([11, 16, 32])  # the page's colour where no cell is
GLOBE, CITY = (0.0, 20.0, 1.1), (7.45, 46.95, 11.0)


@pytest.fixture(scope="module")
def reference(regional_dir):
    return _colours.reference(regional_dir)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        # WebGL without a GPU: chromium's software rasteriser.
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=["--enable-unsafe-swiftshader",
                                                                       "--use-angle=swiftshader"])
        yield launched
        launched.close()


@contextlib.contextmanager
def _page(browser, atlas, address: str = "", info_delay_s: float = 0.0) -> Iterator[tuple[object, list[str]]]:
    """The map page of ``atlas`` (at ``address``: ``#map=...``), served with a map limit of LIMIT
    cells, loaded and drawn; ``v1/info`` answered ``info_delay_s`` late (a slow server)."""
    with running(create_app(atlas, limits=Limits(max_map_cells=LIMIT))) as url:
        tab = browser.new_page(viewport={"width": 1000, "height": 600})
        errors: list[str] = []
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        if info_delay_s:
            tab.route("**/v1/info", lambda route: (time.sleep(info_delay_s), route.continue_()))
        try:
            tab.goto(f"{url}/{address}")
            tab.wait_for_function("window.hexatlasState.status === 'ready'", timeout=60_000)
            yield tab, errors
        finally:
            tab.close()


@pytest.fixture(scope="module")
def page(browser, regional_dir):
    with _page(browser, query.open(regional_dir)) as opened:
        yield opened


def _pixels(tab) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(tab.screenshot())).convert("RGB")).astype(int)


def _go(tab, view: tuple[float, float, float]) -> dict:
    """Move the view and wait until the page has drawn the answer to it."""
    before = tab.evaluate("window.hexatlasState.requests")
    tab.evaluate(f"window.hexatlasGoTo({view[0]}, {view[1]}, {view[2]})")
    tab.wait_for_function(f"window.hexatlasState.requests > {before} && window.hexatlasState.status === 'ready'",
                          timeout=30_000)
    tab.wait_for_timeout(300)  # a frame after the data arrived
    return tab.evaluate("window.hexatlasState")


def _check_picture(tab, colours: dict[int, np.ndarray], *, least: int, share: float) -> None:
    """Cells drawn (not a blank map) in their colours: the pixel at each cell centre in view."""
    shot = _pixels(tab)
    drawn = np.abs(shot - BACKGROUND).max(axis=2) > 40
    drawn[:, :PANEL_RIGHT] = False
    assert drawn.sum() >= least, drawn.sum()
    checked = matched = 0
    centres = [h3.cell_to_latlng(h3.int_to_str(cell))[::-1] for cell in colours]
    places = tab.evaluate("(points) => points.map(([lon, lat]) => window.hexatlasProject(lon, lat))", centres)
    for want, (x, y) in zip(colours.values(), places):
        if PANEL_RIGHT + 5 < x < shot.shape[1] - 5 and 5 < y < shot.shape[0] - 5:
            checked += 1
            matched += int(np.abs(shot[round(y), round(x)] - want).max() <= 24)  # outlines may cross a pixel
    assert checked >= 10 and matched >= share * checked, (matched, checked)


def test_a_regional_atlas_opens_on_its_region_from_an_overview_level(page, reference) -> None:
    tab, errors = page
    state = tab.evaluate("window.hexatlasState")
    assert not errors and state["error"] is None
    # 21,036 cells at res 7, more than the limit: the region is drawn at res 6, stored by the build
    assert (state["res"], state["source"], state["fromRes"], state["cells"]) == (6, "overview", 7, 3093)
    assert state["bytes"] <= 1024 + 32 * LIMIT
    assert "resolution 6 (overview: means of resolution 7)" in tab.inner_text("#status")
    assert "component 1" in tab.inner_text("#legend")
    options = tab.locator("#res option").all_inner_texts()
    assert options[0].startswith("auto") and options[1] == "7 (21,036 cells)" and len(options) == 9
    _check_picture(tab, _colours.level_colours(reference, 6), least=100_000, share=0.8)


def test_the_globe_is_drawn_from_a_coarse_overview_level(page, reference) -> None:
    tab, errors = page
    state = _go(tab, GLOBE)
    assert state["source"] == "overview" and state["res"] <= 3 and not errors  # cells of a few pixels
    _check_picture(tab, _colours.level_colours(reference, state["res"]), least=60, share=0.5)


def test_a_city_is_drawn_from_the_atlas_own_cells(page, reference) -> None:
    tab, errors = page
    state = _go(tab, CITY)
    assert (state["res"], state["source"]) == (7, "held") and 100 < state["cells"] <= LIMIT and not errors
    _check_picture(tab, _colours.held_colours(reference), least=300_000, share=0.8)
    tab.mouse.move(700, 300)
    tab.wait_for_timeout(200)
    assert "(resolution 7)" in tab.inner_text("#cursor")


def test_a_click_at_city_zoom_searches_at_the_shown_resolution(page, regional_dir) -> None:
    tab, errors = page
    if tab.evaluate("window.hexatlasState.res") != 7:
        _go(tab, CITY)
    lat, lon = 46.95, 7.6
    clicked = h3.latlng_to_cell(lat, lon, 7)
    x, y = tab.evaluate(f"window.hexatlasProject({lon}, {lat})")
    tab.mouse.click(x, y)
    tab.wait_for_function(f"window.hexatlasState.selected === '{clicked}' && window.hexatlasState.status === 'ready'",
                          timeout=30_000)
    want = query.open(regional_dir).similar(cell=clicked, k=10, res=7)
    got = tab.evaluate("window.hexatlasState.similar")
    assert [r["cell"] for r in got] == [h3.int_to_str(c) for c in want.column("cell").to_pylist()] and not errors
    assert "(resolution 7)" in tab.inner_text("#similar-title")


def test_panning_asks_again_only_past_what_was_fetched(page) -> None:
    tab, errors = page
    state = _go(tab, (7.45, 46.95, 11.0)) if tab.evaluate("window.hexatlasState.res") != 7 else \
        tab.evaluate("window.hexatlasState")
    before = state["requests"]
    tab.evaluate("window.hexatlasGoTo(7.47, 46.95, 11.0)")  # within the padding fetched around the view
    tab.wait_for_timeout(800)
    assert tab.evaluate("window.hexatlasState.requests") == before
    # far enough for a new answer; meanwhile the cells drawn stay until it arrives
    tab.evaluate("window.hexatlasGoTo(7.9, 46.95, 11.0)")
    polygons = tab.evaluate("window.hexatlasPolygons().length")
    assert polygons > 0
    tab.wait_for_function(f"window.hexatlasState.requests > {before} && window.hexatlasState.status === 'ready'",
                          timeout=30_000)
    assert tab.evaluate("window.hexatlasState.res") == 7 and not errors


def test_a_level_chosen_by_hand_and_one_refused(page) -> None:
    tab, errors = page
    _go(tab, GLOBE)
    tab.select_option("#res", "7")  # 21,036 cells on the globe: refused, the previous layer kept
    tab.wait_for_function("window.hexatlasState.error !== null", timeout=30_000)
    state = tab.evaluate("window.hexatlasState")
    assert "give a smaller bbox" in state["error"] and state["cells"] > 0 and state["status"] == "ready"
    tab.select_option("#res", "5")
    tab.wait_for_function("window.hexatlasState.res === 5 && window.hexatlasState.error === null", timeout=30_000)
    tab.select_option("#res", "auto")
    tab.wait_for_function("window.hexatlasState.mode === 'auto' && window.hexatlasState.res <= 3", timeout=30_000)
    assert not errors


def test_a_remote_atlas_on_the_page(browser, regional_dir, reference, tmp_path, monkeypatch) -> None:
    from catalog.manifest import write_atlas_index
    from tests.data.http_server import nginx

    root = tmp_path / "served"
    shutil.copytree(regional_dir, root)
    write_atlas_index(root)
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path / "cache"))
    with nginx(root) as base, _page(browser, query.open(f"{base}/atlas")) as (tab, errors):
        assert tab.evaluate("window.hexatlasState.res") == 6
        state = _go(tab, CITY)
        assert (state["res"], state["source"]) == (7, "held") and not errors
        _check_picture(tab, _colours.held_colours(reference), least=300_000, share=0.8)


def test_a_link_opens_on_its_view_and_the_view_is_kept_in_the_address(browser, regional_dir, page) -> None:
    tab, _ = page
    _go(tab, CITY)
    assert tab.evaluate("window.location.hash") == "#map=11.00/46.9500/7.4500"
    with _page(browser, query.open(regional_dir), "#map=11/46.95/7.45") as (linked, errors):
        state = linked.evaluate("window.hexatlasState")
        assert (state["res"], state["source"], state["requests"]) == (7, "held", 1) and not errors
        linked.evaluate("window.location.hash = '#map=1.1/20/0'")  # typed in the address bar
        linked.wait_for_function("window.hexatlasState.res <= 3 && window.hexatlasState.status === 'ready'",
                                 timeout=30_000)


def test_a_slow_description_costs_no_extra_map_request(browser, regional_dir) -> None:
    # deck.gl reports a view change as it starts; were the atlas still being described when the
    # page's debounce ran out, that view went to the server with no model, then was aborted
    with _page(browser, query.open(regional_dir), "#map=11/46.95/7.45", info_delay_s=1.0) as (tab, errors):
        state = tab.evaluate("window.hexatlasState")
        assert (state["res"], state["source"], state["requests"]) == (7, "held", 1) and not errors
