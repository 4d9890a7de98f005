"""Measured fidelity: stored per resolution, equal to what the query layer returns, predicted before a build."""

from __future__ import annotations

import json

import numpy as np
import pytest

import query
from builder.build import build
from builder.fidelity import choose_resolution, compare, predict, sample_points
from builder.landmask import is_land_point
from catalog.cli import main
from catalog.errors import InvalidArgumentError
from tests.data.toy_encoder import load as load_toy

TOY = "tests.data.toy_encoder:load"


@pytest.fixture(scope="module")
def toy_float32(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    build(TOY, resolutions="0-2", output=out, device="cpu", precision="float32", progress=False, fidelity_points=600)
    return out


def test_stored_fidelity_is_what_the_atlas_returns(toy_float32) -> None:
    atlas = query.open(toy_float32)
    manifest = json.loads((toy_float32 / "toy" / "manifest.json").read_text())
    stac = json.loads((toy_float32 / "toy" / "collection.json").read_text())
    encoder = load_toy(device="cpu")
    lat, lon = sample_points(600)
    exact = encoder.encode(lat=lat, lon=lon)
    means = []
    for res in (0, 1, 2):
        stored = manifest["resolutions"][str(res)]["fidelity"]
        assert stored["points"] == 600 and stored["sample"] == "uniform on the sphere"
        for kind, interpolate in (("cell", False), ("interpolated", True)):
            # recomputed independently of the builder: the query layer's answers at the same points
            got = atlas.lookup(lat, lon, res=res, interpolate=interpolate)
            cos = np.sum(got * exact, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(exact, axis=1)
            assert stored[kind]["mean_cosine"] == pytest.approx(cos.mean(), abs=2e-6)
            assert stored[kind]["min_cosine"] == pytest.approx(cos.min(), abs=2e-6)
            assert stored[kind]["p05_cosine"] == pytest.approx(np.percentile(cos, 5), abs=2e-6)
            assert stored[kind]["mean_l2"] == pytest.approx(np.linalg.norm(got - exact, axis=1).mean(), abs=2e-6)
        assert stac["hexatlas:fidelity"][str(res)] == stored
        assert atlas.info()["toy"]["resolutions"][str(res)]["fidelity"] == stored
        means.append(stored["interpolated"]["mean_cosine"])
        # what the builder predicts without an atlas is what the float32 atlas measures
        predicted = predict(encoder, res, lat, lon, exact, precision="float32")
        assert predicted["cell"] == pytest.approx(stored["cell"], abs=1e-6)
        assert predicted["interpolated"] == pytest.approx(stored["interpolated"], abs=1e-6)
    assert means == sorted(means) and means[0] < 0.999 < means[-1]  # finer is closer


def test_info_shows_fidelity(toy_float32, capsys) -> None:
    assert main(["info", str(toy_float32)]) == 0
    text = capsys.readouterr().out
    assert text.count("cosine to encoder cell") == 3 and "interpolated" in text
    assert main(["info", str(toy_float32), "--format", "json"]) == 0
    res2 = json.loads(capsys.readouterr().out)["toy"]["resolutions"]["2"]["fidelity"]
    assert set(res2) >= {"points", "cell", "interpolated"}
    assert set(res2["cell"]) >= {"mean_cosine", "p05_cosine", "min_cosine", "mean_l2"}


def test_land_points_and_compare() -> None:
    lat, lon = sample_points(300, land_only=True, seed=3)
    assert len(lat) == 300 and is_land_point(lat=lat, lon=lon).all()
    again = sample_points(300, land_only=True, seed=3)
    np.testing.assert_array_equal(again[0], lat)
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    b = np.array([[1.0, 0.0], [0.0, -1.0], [np.nan, np.nan]], np.float32)
    got = compare(a, b)
    assert got["answered"] == 2 and got["mean_cosine"] == 0.0 and got["min_cosine"] == -1.0
    assert got["mean_l2"] == pytest.approx(1.0)


def test_choose_resolution() -> None:
    encoder = load_toy(device="cpu")
    lines = []
    chosen = choose_resolution(encoder, 0.9995, points=400, report=lines.append)
    means = [float(line.split()[5]) for line in lines]
    assert lines[0].startswith("res 0: interpolated mean cosine") and len(lines) == chosen + 1
    assert means[-1] >= 0.9995 > max(means[:-1]) and chosen >= 1  # the coarsest that reaches it
    assert choose_resolution(encoder, 0.5, points=400) == 0
    with pytest.raises(InvalidArgumentError, match="no resolution up to 1 reaches"):
        choose_resolution(encoder, 0.9999999, points=400, max_res=1)
    with pytest.raises(InvalidArgumentError, match="--min-cosine"):
        choose_resolution(encoder, 1.5)


def test_cli_auto(tmp_path, capsys) -> None:
    assert main(["build", "--model", TOY, "--device", "cpu", "--output", str(tmp_path), "--no-progress",
                 "--resolutions", "auto:1", "--min-cosine", "0.999", "--precision", "float32"]) == 0
    err = capsys.readouterr().err
    assert "chose resolution 2" in err and "building 1-2" in err
    assert query.open(tmp_path).resolutions() == [1, 2]
    assert main(["build", "--model", TOY, "--output", str(tmp_path / "x"), "--resolutions", "auto"]) == 2
    assert "--min-cosine" in capsys.readouterr().err
    assert main(["build", "--model", TOY, "--output", str(tmp_path / "x"), "--min-cosine", "0.9"]) == 2
