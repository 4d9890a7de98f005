"""The map at any scale: one colour basis per dataset, overview levels, views read in place.

On a regional resolution-7-only atlas (tests/query/conftest.py), checked against colours
computed here from its embeddings (read by SQL) and its manifest's basis with plain numpy.
"""

from __future__ import annotations

import json
import shutil
import time

import h3
import numpy as np
import pytest

import query
from catalog.cli import main
from catalog.colors import OVERVIEW_DTYPE
from catalog.errors import AtlasCorruptError, InvalidArgumentError, UnknownResolutionError, UnsafeAtlasError
from catalog.manifest import read_manifest, validate_dataset
from query import mapping
from query.mapping import map_levels, map_view, render_png
from query.server import Limits, create_app
from tests.query import _colours
from tests.query.conftest import REGION

CITY = (7.30, 46.85, 7.60, 47.05)  # Bern and around


@pytest.fixture(scope="module")
def reference(regional_dir):
    return _colours.reference(regional_dir)


def _level_colours(ref, level: int) -> dict[int, np.ndarray]:
    return _colours.level_colours(ref, level)


def _assert_colours(layer, want: dict[int, np.ndarray]) -> None:
    got = dict(zip(layer.cells.tolist(), layer.rgb.astype(int)))
    assert set(got) <= set(want) and got
    assert max(int(np.abs(got[c] - want[c]).max()) for c in got) <= 1  # float32 against float64 rounding


def test_the_build_fits_one_basis_and_stores_overview_levels(regional_dir, reference) -> None:
    manifest = read_manifest(regional_dir / "toy")
    cells, emb, _, basis = reference
    assert validate_dataset(regional_dir / "toy") == []
    assert basis["sample"] == {"cells": 16_384, "res": 7}
    components = np.asarray(basis["components"])
    # the toy encoder's 4 outputs are a rank-2 map of the unit vector: a third component would be noise
    np.testing.assert_allclose(components @ components.T, np.diag([1.0, 1.0, 0.0]), atol=1e-6)
    assert basis["low"][2] == basis["high"][2] == 0.0 and basis["explained"][2] < 1e-6
    centred = emb - emb.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)  # the principal axes of every cell
    for i in range(2):  # fitted on a sample, the axes are those of the whole resolution
        assert abs(axes[i] @ components[i]) > 0.99
    overview = manifest["overview"]
    assert overview["from_res"] == 7 and sorted(map(int, overview["levels"])) == [0, 1, 2, 3, 4, 5, 6]
    for level in (4, 6):
        entry = overview["levels"][str(level)]
        table = np.load(regional_dir / "toy" / entry["path"])
        assert table.dtype == OVERVIEW_DTYPE and len(table) == entry["cells"]
        want = _level_colours(reference, level)
        assert table["cell"].tolist() == sorted(want)
        assert max(int(np.abs(table["rgb"][i].astype(int) - want[c]).max())
                   for i, c in enumerate(table["cell"].tolist())) <= 1


def test_views_take_the_finest_level_that_fits(regional_dir, reference) -> None:
    atlas = query.open(regional_dir)
    assert map_levels(atlas) == {7: "held", **{r: "overview" for r in range(6, -1, -1)}}
    globe = map_view(atlas, max_cells=5000)  # 21,036 cells at res 7: above the limit
    assert (globe.res, globe.source, globe.from_res, len(globe.cells)) == (6, "overview", 7, 3093)
    _assert_colours(globe, _level_colours(reference, 6))
    small = map_view(atlas, max_cells=5000, max_res=3)
    assert (small.res, small.source) == (3, "overview")
    assert map_view(atlas, max_cells=100).res == 4  # 81 cells

    city = map_view(atlas, CITY, max_cells=5000)
    assert city.res == 7 and city.source == "held" and city.bbox == CITY
    cells = reference[0]
    lat, lon = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in city.cells]).T
    inside = (lon > CITY[0]) & (lon < CITY[2]) & (lat > CITY[1]) & (lat < CITY[3])
    centres = np.array([h3.cell_to_latlng(h3.int_to_str(int(c))) for c in cells])
    in_box = cells[(centres[:, 1] > CITY[0]) & (centres[:, 1] < CITY[2]) & (centres[:, 0] > CITY[1])
                   & (centres[:, 0] < CITY[3])]
    assert set(in_box.tolist()) == set(city.cells[inside].tolist()) and len(in_box) > 50  # and a rim beyond
    _assert_colours(city, _colours.held_colours(reference))

    with pytest.raises(InvalidArgumentError, match="resolution 7 has about 21,036 cells in this view.*coarser ones"):
        map_view(atlas, res=7, max_cells=5000)
    assert 0 < len(map_view(atlas, CITY, res=5, max_cells=5000).cells) < 30  # the box and a rim of two cells
    with pytest.raises(UnknownResolutionError, match="resolution 8 is not in this atlas's map"):
        map_view(atlas, res=8)
    for bad in [(1, 2, 3), (0, 50, 10, 40), (0, 0, 200, 10), ("a", 0, 1, 1)]:
        with pytest.raises(InvalidArgumentError, match="bbox"):
            map_view(atlas, bad)
    with pytest.raises(InvalidArgumentError, match="max_cells"):
        map_view(atlas, max_cells=0)
    # across the antimeridian: nothing of this atlas there, and no error
    assert len(map_view(atlas, (170.0, -20.0, -170.0, 0.0), max_cells=5000).cells) == 0


def _copy(regional_dir, tmp_path, change) -> query.Atlas:
    root = tmp_path / "atlas"
    shutil.copytree(regional_dir, root)
    path = root / "toy" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    return query.open(root)


def test_a_level_not_stored_is_averaged_from_its_children_in_view(regional_dir, reference, tmp_path) -> None:
    def drop_level_6(manifest: dict) -> None:
        rel = manifest["overview"]["levels"].pop("6")["path"]
        manifest["files"] = [f for f in manifest["files"] if f["path"] != rel]

    atlas = _copy(regional_dir, tmp_path, drop_level_6)
    assert map_levels(atlas)[6] == "averaged"
    layer = map_view(atlas, REGION, max_cells=5000)
    assert (layer.res, layer.source, layer.from_res) == (6, "averaged", 7)
    _assert_colours(layer, _level_colours(reference, 6))
    assert len(layer.cells) > 2000


def test_an_older_atlas_gets_its_colours_on_first_use_and_keeps_them(regional_dir, tmp_path, monkeypatch) -> None:
    def before_overviews(manifest: dict) -> None:
        for level in manifest.pop("overview")["levels"].values():
            manifest["files"] = [f for f in manifest["files"] if f["path"] != level["path"]]
        del manifest["colors"]

    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path / "cache"))
    old = _copy(regional_dir, tmp_path, before_overviews)
    built = query.open(regional_dir)
    layer = map_view(old, max_cells=5000)
    want = map_view(built, max_cells=5000)  # the same sample, the same seed: the same colours
    assert (layer.res, layer.source) == (6, "overview")
    np.testing.assert_array_equal(layer.cells, want.cells)
    np.testing.assert_array_equal(layer.rgb, want.rgb)
    cached = sorted(p.name for p in (tmp_path / "cache" / "map").glob("*/*"))
    assert cached == ["colors.json", "overview.json", *sorted(f"res={r}.npy" for r in range(7))]

    import catalog.colors

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the overview was computed again")

    monkeypatch.setattr(catalog.colors, "overview_levels", no_second_pass)
    again = map_view(query.open(tmp_path / "atlas"), max_cells=5000)
    np.testing.assert_array_equal(again.rgb, want.rgb)


def test_a_damaged_colouring_is_refused(regional_dir, tmp_path) -> None:
    def path_outside(manifest: dict) -> None:
        manifest["overview"]["levels"]["3"]["path"] = "../elsewhere/res=3.npy"

    def too_many_cells(manifest: dict) -> None:
        manifest["overview"]["levels"]["3"]["cells"] = 10**9

    def short_basis(manifest: dict) -> None:
        manifest["colors"]["mean"] = [0.0]

    def nan_basis(manifest: dict) -> None:
        manifest["colors"]["low"] = ["x", 0.0, 0.0]

    for change, error, match in [(path_outside, UnsafeAtlasError, "overview.levels.3.path"),
                                 (too_many_cells, AtlasCorruptError, "overview.levels.3.cells"),
                                 (short_basis, AtlasCorruptError, "colors.mean"),
                                 (nan_basis, AtlasCorruptError, r"colors.low\[\]")]:
        with pytest.raises(error, match=match):
            _copy(regional_dir, tmp_path / change.__name__, change)
    atlas = _copy(regional_dir, tmp_path / "rewritten", lambda m: None)
    level = tmp_path / "rewritten" / "atlas" / "toy" / "overview" / "res=6.npy"
    table = np.load(level)
    table["cell"] = table["cell"][::-1]  # same size and dtype, not in order
    with open(level, "wb") as fh:
        np.save(fh, table)
    with pytest.raises(AtlasCorruptError, match="not of resolution 6 in ascending order"):
        map_view(atlas, max_cells=5000)
    assert any("sha256" in p for p in validate_dataset(tmp_path / "rewritten" / "atlas" / "toy"))


def test_server_answers_are_bounded_in_bytes_and_time(regional_dir, reference) -> None:
    from fastapi.testclient import TestClient

    limit = 5000
    client = TestClient(create_app(query.open(regional_dir), limits=Limits(max_map_cells=limit)))
    views = [{}, {"bbox": ",".join(map(str, REGION))}, {"bbox": ",".join(map(str, CITY))},
             {"bbox": "7,46,8,47", "max_cells": 100000}, {"bbox": "5,45,9,48", "max_res": 5}]
    for params in views:
        start = time.perf_counter()
        answer = client.get("/v1/map", params=params)
        took = time.perf_counter() - start
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["max_cells"] == min(params.get("max_cells", limit), limit) and len(data["cells"]) <= limit
        assert len(answer.content) <= 1024 + 32 * len(data["cells"]) and took < 5, (params, took)
        assert len(data["colors"]) == 3 * len(data["cells"]) and data["levels"][0] == {"res": 7, "source": "held"}
    city = client.get("/v1/map", params={"bbox": ",".join(map(str, CITY))}).json()
    assert city["res"] == 7 and city["source"] == "held" and city["from_res"] is None
    assert client.get("/v1/map", params={"bbox": ",".join(map(str, REGION)), "max_res": 5}).json()["res"] == 5
    refused = client.get("/v1/map", params={"res": 7})  # the symptom of issue 28: still 400, saying what to do
    assert refused.status_code == 400 and "give a smaller bbox" in refused.json()["detail"]
    assert client.get("/v1/map", params={"res": 7, "bbox": ",".join(map(str, CITY))}).json()["res"] == 7
    assert client.get("/v1/map", params={"bbox": "1,2,3"}).status_code == 400
    assert client.get("/v1/map", params={"max_cells": 0}).status_code == 422
    assert client.get("/v1/map", params=[("bbox", "1,2,3,4"), ("bbox", "1,2,3,4")]).status_code == 422
    # similar places work at the city's resolution, from a cell the map drew
    cell = city["cells"][len(city["cells"]) // 2]
    similar = client.get("/v1/similar", params={"cell": cell, "res": 7, "k": 5}).json()
    assert similar["res"] == 7 and len(similar["results"]) == 5  # (the toy's neighbours tie at cosine ~1)
    assert similar["results"][0]["score"] > 0.9999


def test_a_remote_atlas_is_mapped_in_place(regional_dir, tmp_path, monkeypatch) -> None:
    from tests.data.http_server import nginx

    from catalog.manifest import write_atlas_index

    root = tmp_path / "served"
    shutil.copytree(regional_dir, root)
    write_atlas_index(root)
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path / "cache"))
    local = query.open(regional_dir)
    with nginx(root) as base:
        remote = query.open(f"{base}/atlas")
        for box in (None, REGION, CITY):
            got, want = map_view(remote, box, max_cells=5000), map_view(local, box, max_cells=5000)
            assert (got.res, got.source) == (want.res, want.source)
            np.testing.assert_array_equal(got.cells, want.cells)
            np.testing.assert_array_equal(got.rgb, want.rgb)
    fetched = sorted(p.relative_to(tmp_path / "cache").parts[-2:] for p in (tmp_path / "cache").rglob("*")
                     if p.is_file())
    assert fetched and all(folder == "overview" for folder, _ in fetched)  # parts were read in place


def test_png_of_the_globe_and_of_a_region(regional_dir, tmp_path, capsys) -> None:
    from PIL import Image

    atlas = query.open(regional_dir)
    out = render_png(atlas, tmp_path / "region.png", bbox=REGION, width_px=500, coastlines=False)
    image = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert image.shape[1] == 500 and len(np.unique(image.reshape(-1, 3) // 8, axis=0)) > 100  # cells, not blank
    assert main(["map", str(regional_dir), "--bbox", ",".join(map(str, CITY)), "--output", str(tmp_path / "c.png"),
                 "--width", "400"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["map", str(regional_dir), "--output", str(tmp_path / "g.png"), "--width", "400"]) == 0
    assert main(["map", str(regional_dir), "--bbox", "1,2", "--output", str(tmp_path / "x.png")]) == 2
    assert "bbox must be min_lon,min_lat" in capsys.readouterr().err


def test_the_png_budget_follows_its_width(regional_dir, monkeypatch) -> None:
    seen = []
    real = mapping.map_view
    monkeypatch.setattr(mapping, "render_layer", lambda layer, output, **kw: seen.append(layer) or output)
    monkeypatch.setattr(mapping, "map_view", lambda *a, **kw: seen.append(kw["max_cells"]) or real(*a, **kw))
    atlas = query.open(regional_dir)
    render_png(atlas, "a.png", width_px=400)  # 400 x 224 pixels: a few thousand cells at most
    render_png(atlas, "b.png", width_px=3000, bbox=REGION)
    assert seen[0] == 2240 and seen[1].res == 5 and seen[2] > 21_036 and seen[3].res == 7  # 3,093 cells at 6


def test_an_int8_atlas_is_coloured_from_its_dequantised_embeddings(tmp_path) -> None:
    from builder.build import build

    build("tests.data.toy_encoder:load", resolutions="3", output=tmp_path, device="cpu", precision="int8",
          progress=False)
    ref = _colours.reference(tmp_path, res=3)  # SQL dequantises: what a reader gets
    assert ref[0].size == 2 + 120 * 7**3
    atlas = query.open(tmp_path)
    assert map_levels(atlas) == {3: "held", 2: "overview", 1: "overview", 0: "overview"}
    _assert_colours(map_view(atlas, max_cells=6000), _level_colours(ref, 2))
    _assert_colours(map_view(atlas, (0.0, 40.0, 20.0, 50.0), max_cells=6000), _colours.held_colours(ref))
