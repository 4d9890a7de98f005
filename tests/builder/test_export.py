"""The encoder exported to ONNX (builder.export): parity with the torch module, and what is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from builder.encoders import load_encoder
from builder.export import PARITY_TOLERANCE, export_onnx
from tests.data import satclip_reference
from tests.data.satclip_checkpoint import make_checkpoint

ort = pytest.importorskip("onnxruntime")


def _points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform on the sphere, with poles, the antimeridian and the equator first."""
    rng = np.random.default_rng(seed)
    lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)
    lat[:6], lon[:6] = [90, -90, 0, 0, 89.9999, -45], [0, 180, -180, 0, 179.9, 45]
    return lat, lon


def _run(model: bytes, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"lat": lat, "lon": lon})[0]


def _exported(encoder) -> tuple[bytes, dict]:
    model, record = export_onnx(encoder)
    assert model is not None, record
    assert record["parity"]["max_abs_diff"] <= PARITY_TOLERANCE and record["parity"]["points"] == 2000
    assert [i["name"] for i in record["inputs"]] == ["lat", "lon"] and record["output"]["shape"] == ["n", encoder.dim]
    return model, record


def test_geoclip_onnx_matches_torch(tmp_path) -> None:
    pytest.importorskip("onnx")
    encoder = load_encoder("geoclip", device="cpu")  # the real weights, from the geoclip wheel
    model, record = _exported(encoder)
    assert record["licence"] == "MIT" and record["weights_sha256"] == encoder.provenance.sha256
    lat, lon = _points(500, seed=3)
    got = _run(model, lat, lon)
    assert got.dtype == np.float32 and got.shape == (500, 512)
    assert np.abs(got - encoder.encode(lat=lat, lon=lon)).max() <= 1e-4  # max abs difference


@pytest.mark.parametrize("legendre", [10, 40])
def test_satclip_onnx_matches_torch_and_the_reference(tmp_path, legendre) -> None:
    ckpt = make_checkpoint(tmp_path / f"l{legendre}.ckpt", legendre_polys=legendre, seed=legendre)
    encoder = load_encoder(f"satclip-vit16-l{legendre}", checkpoint=ckpt, device="cpu")
    model, _ = _exported(encoder)
    lat, lon = _points(600, seed=legendre)
    got = _run(model, lat, lon)
    assert np.abs(got - encoder.encode(lat=lat, lon=lon)).max() <= 1e-4  # everywhere, poles included
    # and against the official-style evaluation: everywhere at L=10, |lat| <= 45 at L=40 (its
    # own precision fails near the poles there, see builder.encoders.satclip)
    ref = satclip_reference.embed(lat, lon, torch.load(ckpt, weights_only=True))
    where = np.abs(lat) <= (90 if legendre == 10 else 45)
    assert np.abs(got[where] - ref[where]).max() <= 1e-4
    one = _run(model, lat[:1], lon[:1])  # the batch axis is dynamic: one point and 600 alike
    assert np.allclose(one, got[:1], atol=1e-6)


def test_an_encoder_that_cannot_be_exported_says_why() -> None:
    from tests.data.toy_encoder import NumpyToy, load

    model, record = export_onnx(NumpyToy())
    assert model is None and record["path"] is None
    assert "toy-numpy" in record["reason"] and "without a torch module" in record["reason"]

    class Opaque(torch.nn.Module):  # an operator the exporter has no translation for
        def forward(self, lat, lon):
            return torch.stack([torch.special.zeta(lat.abs() + 2, lon.abs() + 1)] * 4, dim=1).float()

    toy = load(device="cpu")
    toy.module = Opaque()
    model, record = export_onnx(toy)
    assert model is None and "torch.onnx.export failed" in record["reason"]
    half = load_encoder("tests.data.toy_encoder:load", device="cpu", dtype="bfloat16")
    model, record = export_onnx(half)
    assert model is None and "bfloat16" in record["reason"]
