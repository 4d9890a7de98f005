"""Regional atlases (--region): exactly the cells touching the area, refused outside it, composable with land-only."""

from __future__ import annotations

import json

import h3.api.numpy_int as h3i
import numpy as np
import pytest

import query
from builder.build import build
from builder.landmask import land_cells
from builder.region import MAX_REGION_RES, parse_region
from catalog.cells import latlng_to_cells
from catalog.cli import main
from catalog.errors import InputFileError, InvalidArgumentError, InvalidCoordinateError
from catalog.manifest import read_manifest, validate_dataset

TOY = "tests.data.toy_encoder:load"
PARIS = (2.2, 48.8, 2.5, 48.95)
FIJI = (178.0, -19.0, -179.0, -16.0)  # across the antimeridian


def _touching(cells: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Independent check: a cell touches a (non-crossing) box when a point of its densified
    boundary is in the box (within a hair of its sampling step) or a box corner is in the cell."""
    lon0, lat0, lon1, lat1 = box
    res = int(h3i.get_resolution(int(cells[0])))
    corners = latlng_to_cells(np.array([lat0, lat0, lat1, lat1]), np.array([lon0, lon1, lon0, lon1]), res)
    out = []
    for c in cells.tolist():
        ring = np.array(h3i.cell_to_boundary(c))
        ring = np.vstack([ring, ring[:1]])
        t = np.linspace(0, 1, 400)[:, None]
        pts = np.concatenate([a + t * (b - a) for a, b in zip(ring[:-1], ring[1:])])
        eps = np.abs(np.diff(pts, axis=0)).max()
        inside = ((pts[:, 0] >= lat0 - eps) & (pts[:, 0] <= lat1 + eps) & (pts[:, 1] >= lon0 - eps)
                  & (pts[:, 1] <= lon1 + eps))
        out.append(bool(inside.any() or c in corners))
    return np.array(out)


def _box_points(box: tuple[float, float, float, float], n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A grid over the box, its edges and corners included."""
    lat, lon = np.meshgrid(np.linspace(box[1], box[3], n), np.linspace(box[0], box[2], n))
    return lat.ravel(), lon.ravel()


@pytest.fixture(scope="module")
def paris(tmp_path_factory):
    out = tmp_path_factory.mktemp("region")
    summary = build(TOY, resolutions="3,7", output=out, device="cpu", precision="float32", progress=False,
                    region=",".join(map(str, PARIS)))
    return out, summary


def test_keeps_exactly_the_cells_touching_the_box(paris) -> None:
    out, summary = paris
    manifest = read_manifest(out / "toy")
    assert manifest["build"]["region"] == {"bbox": list(PARIS)}
    assert validate_dataset(out / "toy") == []
    atlas = query.open(out)
    for res in (3, 7):
        cells = atlas.sql(f"SELECT cell FROM embeddings WHERE res = {res} ORDER BY cell").column("cell").to_numpy()
        assert summary.cells[res] == len(cells)
        # every cell with a point of the box (edges and corners too) is there ...
        lat, lon = _box_points(PARIS)
        assert set(np.unique(latlng_to_cells(lat, lon, res)).tolist()) <= set(cells.tolist())
        # ... and every cell there touches the box
        assert _touching(cells, PARIS).all()
        # a ring around them: none of those outside touches it
        ring = np.setdiff1d(np.unique(np.concatenate([h3i.grid_disk(int(c), 1) for c in cells])).astype(np.uint64),
                            cells)
        assert not _touching(ring, PARIS).any()
    assert summary.cells[7] > 100


def test_lookup_outside_the_region_is_refused(paris) -> None:
    out, _ = paris
    atlas = query.open(out)
    inside = atlas.lookup([48.85], [2.35], res=7)
    assert np.isfinite(inside).all()
    for interpolate in (False, True):
        with pytest.raises(InvalidCoordinateError, match="outside its region"):
            atlas.lookup([48.85, 48.7], [2.35, 2.35], res=7, interpolate=interpolate)
        got = atlas.lookup([48.85, 48.7], [2.35, 2.35], res=7, interpolate=interpolate, on_invalid="null")
        assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()
    info = atlas.info()["toy"]
    assert info["region"] == {"bbox": list(PARIS)}
    fid = info["resolutions"]["7"]["fidelity"]
    assert fid["points"] == 2000 and fid["sample"] == "uniform in the region"
    assert fid["cell"]["answered"] == fid["interpolated"]["answered"] == 2000  # points in the area are all answered


def test_antimeridian_box_and_land_only(tmp_path) -> None:
    region = parse_region(FIJI)
    assert len(region.polygons) == 2
    east, west = (parse_region((FIJI[0], FIJI[1], 180.0, FIJI[3])), parse_region((-180.0, FIJI[1], FIJI[2], FIJI[3])))
    np.testing.assert_array_equal(region.cells(4), np.union1d(east.cells(4), west.cells(4)))
    build(TOY, resolutions="4", output=tmp_path, device="cpu", progress=False, region=FIJI, land_only=True)
    atlas = query.open(tmp_path)
    cells = atlas.sql("SELECT cell, land FROM embeddings").to_pydict()
    expected = np.intersect1d(region.cells(4), land_cells(4))
    np.testing.assert_array_equal(np.sort(np.array(cells["cell"], np.uint64)), expected)
    assert all(cells["land"])
    lons = atlas.sql("SELECT lon FROM embeddings").column("lon").to_numpy()
    assert (lons > 170).any() and (lons < -170).any()


def test_geojson_file(tmp_path) -> None:
    ring = [[2.2, 48.8], [2.5, 48.8], [2.35, 48.95], [2.2, 48.8]]
    path = tmp_path / "area.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    region = parse_region(str(path))
    assert region.to_dict()["file"] == "area.geojson" and len(region.to_dict()["sha256"]) == 64
    cells = region.cells(7)
    lat, lon = region.sample(500, np.random.default_rng(0))
    assert region.contains(lat, lon).all() and (lat >= 48.8).all() and (lat <= 48.95).all()
    assert set(latlng_to_cells(lat, lon, 7).tolist()) <= set(cells.tolist())
    assert len(cells) < len(parse_region(PARIS).cells(7))  # a triangle in the box


@pytest.mark.parametrize(("spec", "error", "match"), [
    ("1,2,3", InvalidArgumentError, "MINLON,MINLAT,MAXLON,MAXLAT"),
    ("0,10,5,5", InvalidArgumentError, "MINLAT < MAXLAT"),
    ("0,0,0,5", InvalidArgumentError, "differ"),
    ("0,0,200,5", InvalidArgumentError, r"\[-180, 180\]"),
    ("missing.geojson", InputFileError, "does not exist"),
])
def test_bad_regions(spec, error, match) -> None:
    with pytest.raises(error, match=match):
        parse_region(spec)


def test_bad_geojson_and_too_large(tmp_path) -> None:
    path = tmp_path / "line.geojson"
    path.write_text(json.dumps({"type": "LineString", "coordinates": [[0, 0], [1, 1]]}))
    with pytest.raises(InputFileError, match="must be polygons"):
        parse_region(str(path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputFileError, match="GeoJSON"):
        parse_region(str(tmp_path / "bad.json"))
    with pytest.raises(InvalidArgumentError, match="more than the"):
        build(TOY, resolutions="8", output=tmp_path, region="0,0,50,50", device="cpu")
    with pytest.raises(InvalidArgumentError, match="touches land in the region"):
        build(TOY, resolutions="3", output=tmp_path / "sea", region="-140,-30,-139,-29", land_only=True, device="cpu")
    assert not (tmp_path / "sea" / "toy" / "_build").exists()  # refused before anything was written
    with pytest.raises(InvalidArgumentError, match=f"up to resolution {MAX_REGION_RES}"):
        build(TOY, resolutions="11", output=tmp_path, region=PARIS, device="cpu")


def test_cli_region_error_is_one_line(tmp_path, capsys) -> None:
    assert main(["build", "--model", TOY, "--output", str(tmp_path), "--region", "10,10,5,5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "region box" in err
