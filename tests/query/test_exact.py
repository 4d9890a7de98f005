"""Exact embeddings (exact=True): the atlas's exported encoder run with onnxruntime, never torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pytest

import query
from catalog.cli import main
from catalog.errors import AtlasCorruptError, InvalidArgumentError, MissingDependencyError

pytest.importorskip("onnxruntime")
MODEL = "satclip-vit16-l10"


@pytest.fixture(scope="module")
def atlas(atlas_dir):
    return query.open(atlas_dir[0])


def _points(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


def test_exact_is_the_torch_encoder_at_the_point(atlas, atlas_dir) -> None:
    from builder.encoders import load_encoder

    lat, lon = _points()
    exact = atlas.lookup(lat, lon, model=MODEL, exact=True)
    torch_enc = load_encoder(MODEL, checkpoint=atlas_dir[1], device="cpu")
    assert exact.dtype == np.float32 and exact.shape == (300, 256)
    assert np.abs(exact - torch_enc.encode(lat=lat, lon=lon)).max() <= 1e-4
    cells = atlas.lookup(lat, lon, model=MODEL)
    assert np.abs(exact - cells).max() > 1e-3  # a point is not its cell's centre


def test_exact_at_cell_centres_is_the_stored_embedding(atlas) -> None:
    table = atlas.sql("SELECT lat, lon FROM embeddings_satclip_vit16_l10 WHERE res = 2 LIMIT 50")
    lat, lon = table.column("lat").to_numpy(), table.column("lon").to_numpy()
    stored = atlas.lookup(lat, lon, res=2, model=MODEL)  # a float32 atlas: stored as computed
    assert np.abs(atlas.lookup(lat, lon, model=MODEL, exact=True) - stored).max() <= 1e-4


def test_join_and_the_cli_take_exact(atlas, atlas_dir, tmp_path, capsys) -> None:
    points = pa.table({"lat": [10.0, 95.0, -33.9], "lon": [20.0, 0.0, 18.4]})
    table = atlas.join(points, model=MODEL, exact=True, on_invalid="null", res=1)
    assert table.column("cell").to_pylist()[1] is None and table.column("embedding").null_count == 1
    expected = atlas.lookup([10.0, -33.9], [20.0, 18.4], model=MODEL, exact=True)
    got = np.stack([np.asarray(v, np.float32) for v in table.column("embedding").to_pylist() if v is not None])
    assert np.array_equal(got, expected)
    assert main(["lookup", str(atlas_dir[0]), "--lat", "10", "--lon", "20", "--model", MODEL, "--exact",
                 "--format", "json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert np.allclose(row["embedding"], expected[0], atol=1e-6)
    (tmp_path / "p.csv").write_text("lat,lon\n10,20\n-33.9,18.4\n")
    assert main(["join", str(atlas_dir[0]), "--input", str(tmp_path / "p.csv"), "--output",
                 str(tmp_path / "o.parquet"), "--model", MODEL, "--exact"]) == 0
    assert main(["info", str(atlas_dir[0])]) == 0
    assert "exact (--exact): encoder/model.onnx" in capsys.readouterr().out


def test_exact_refuses_what_does_not_apply(atlas) -> None:
    with pytest.raises(InvalidArgumentError, match="interpolate=True"):
        atlas.lookup([1.0], [2.0], model=MODEL, exact=True, interpolate=True)
    with pytest.raises(InvalidArgumentError, match="res= does not apply"):
        atlas.lookup([1.0], [2.0], model=MODEL, exact=True, res=1)
    with pytest.raises(InvalidArgumentError, match="choose one"):
        atlas.join(pa.table({"lat": [1.0], "lon": [2.0]}), model=MODEL, exact=True, interpolate=True)
    from catalog.errors import InvalidCoordinateError

    with pytest.raises(InvalidCoordinateError):
        atlas.lookup([91.0], [2.0], model=MODEL, exact=True)
    assert np.isnan(atlas.lookup([91.0], [2.0], model=MODEL, exact=True, on_invalid="null")).all()


def test_without_onnxruntime_the_install_line_is_named(atlas_dir, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'hexatlas\[exact\]'"):
        query.open(atlas_dir[0]).lookup([1.0], [2.0], model=MODEL, exact=True)


def test_a_dataset_without_a_model_says_why(atlas_dir, tmp_path) -> None:
    from builder.build import build

    build("tests.data.toy_encoder:numpy_plugin", resolutions="0", output=tmp_path / "plugin", progress=False)
    atlas = query.open(tmp_path / "plugin")
    assert atlas.lookup([1.0], [2.0]).shape == (1, 4)  # the cells are there
    with pytest.raises(InvalidArgumentError, match="no exported encoder .*toy-numpy.* without a torch module"):
        atlas.lookup([1.0], [2.0], exact=True)
    assert not atlas.info()["toy-numpy"]["exact"]["available"]
    old = tmp_path / "old" / "toy"  # an atlas from before exports: no encoder_onnx in its manifest
    shutil.copytree(atlas_dir[0] / "toy", old)
    manifest = json.loads((old / "manifest.json").read_text())
    rel = manifest.pop("encoder_onnx")["path"]
    manifest["files"] = [f for f in manifest["files"] if f["path"] != rel]
    (old / rel).unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidArgumentError, match="built before hexatlas stored its encoder.*--overwrite"):
        query.open(old).lookup([1.0], [2.0], exact=True)


def test_an_altered_model_is_refused(atlas_dir, tmp_path) -> None:
    copy = tmp_path / "toy"
    shutil.copytree(atlas_dir[0] / "toy", copy)
    path = copy / "encoder" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(AtlasCorruptError, match="sha256"):
        query.open(copy).lookup([1.0], [2.0], exact=True)


def test_exact_needs_no_torch(atlas_dir, tmp_path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now fails
        import pyarrow as pa
        import query
        atlas = query.open({str(atlas_dir[0])!r})
        assert atlas.lookup([10.0, -45.0], [20.0, 170.0], model="{MODEL}", exact=True).shape == (2, 256)
        assert atlas.join(pa.table({{"lat": [1.0], "lon": [2.0]}}), model="toy", exact=True).num_rows == 1
        from catalog.cli import main
        assert main(["lookup", {str(atlas_dir[0])!r}, "--lat", "1", "--lon", "2", "--model", "toy", "--exact"]) == 0
        leaked = [m for m in sys.modules if m in ("torch", "builder") or m.startswith(("torch.", "builder."))]
        assert not [m for m in leaked if sys.modules[m] is not None], leaked
        assert "onnxruntime" in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ,
                   "HEXATLAS_CACHE": str(tmp_path / "cache")})


def test_the_server_takes_exact(atlas) -> None:
    from fastapi.testclient import TestClient

    from query.server import create_app

    client = TestClient(create_app(atlas))
    expected = atlas.lookup([10.0, -33.9], [20.0, 18.4], model=MODEL, exact=True)
    one = client.get("/v1/lookup", params={"lat": 10.0, "lon": 20.0, "model": MODEL, "exact": "true"})
    assert one.status_code == 200 and np.allclose(one.json()["embedding"], expected[0], atol=1e-6)
    many = client.post("/v1/lookup", json={"points": [{"lat": 10.0, "lon": 20.0}, {"lat": -33.9, "lon": 18.4}],
                                           "model": MODEL, "exact": True})
    assert np.allclose([r["embedding"] for r in many.json()["results"]], expected, atol=1e-6)
    both = client.get("/v1/lookup", params={"lat": 1.0, "lon": 2.0, "model": MODEL, "exact": "true",
                                            "interpolate": "true"})
    assert both.status_code == 400 and "choose one" in both.json()["detail"]


def test_concurrent_exact_lookups_agree_with_one_call(atlas_dir) -> None:
    from concurrent.futures import ThreadPoolExecutor

    atlas = query.open(atlas_dir[0])
    lat, lon = _points(64)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: atlas.lookup(lat[i:i + 8], lon[i:i + 8], model=MODEL, exact=True),
                                range(0, 64, 8)))
    assert len(atlas._exact) == 1
    # batches of 8 against one of 64: equal within float rounding (kernels round per batch shape)
    np.testing.assert_allclose(np.concatenate(results), atlas.lookup(lat, lon, model=MODEL, exact=True),
                               rtol=1e-6, atol=1e-6)
