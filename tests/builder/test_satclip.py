"""SatCLIP: features against scipy, the model against a per-harmonic reference, loading."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch

from builder.encoders import load_encoder
from builder.encoders._harmonics import feature_scales, trig_coefficients
from catalog.errors import (
    CheckpointError,
    InvalidArgumentError,
    InvalidCoordinateError,
    UnsafeCheckpointError,
    WeightsNotFoundError,
)
from tests.data import satclip_reference
from tests.data.satclip_checkpoint import make_checkpoint

scipy_special = pytest.importorskip("scipy.special")


def _points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat, lon = rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)
    # poles, the antimeridian and the equator, where conventions go wrong first
    lat[:6] = [90, -90, 0, 0, 89.9999, -45]
    lon[:6] = [0, 180, -180, 0, 179.9, 45]
    return lat, lon


@pytest.fixture(scope="module")
def ckpt_l10(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "satclip-vit16-l10.ckpt", legendre_polys=10)


@pytest.fixture(scope="module")
def ckpt_l40(tmp_path_factory: pytest.TempPathFactory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "satclip-vit16-l40.ckpt", legendre_polys=40, seed=1)


@pytest.mark.parametrize("legendre", [10, 40])
def test_features_match_scipy_with_released_conventions(legendre: int) -> None:
    lat, lon = _points(1500)
    module = load_module_features(legendre)
    ours = module(torch.from_numpy(lat), torch.from_numpy(lon)).numpy()
    theta, phi = np.radians(lat + 90), np.radians(lon + 180)
    ells, ms, _ = feature_scales(legendre)
    expected = np.empty_like(ours)
    for j, (ell, m) in enumerate(zip(ells, ms)):
        y = scipy_special.sph_harm_y(ell, abs(m), theta, phi)
        sign = (-1.0) ** abs(m)  # scipy includes the Condon-Shortley phase; SatCLIP does not
        if m > 0:
            expected[:, j] = sign * math.sqrt(2) * y.real
        elif m < 0:
            expected[:, j] = sign * math.sqrt(2) * y.imag
        else:
            expected[:, j] = math.pi * y.real  # the released checkpoints' m = 0 scaling
    np.testing.assert_allclose(ours, expected, atol=1e-11, rtol=0)


def load_module_features(legendre: int):
    from builder.encoders.satclip import SatCLIPLocationEncoder

    dummy = [(torch.zeros(4, legendre * legendre), torch.zeros(4)), (torch.zeros(3, 4), torch.zeros(3))]
    return SatCLIPLocationEncoder(legendre, dummy).features


def test_trig_coefficients_keep_parity() -> None:
    coeffs, phi_index = trig_coefficients(6)
    _, ms, _ = feature_scales(6)
    assert coeffs.shape == (11, 36) and phi_index.shape == (36,)
    odd = np.abs(ms) % 2 == 1
    assert not coeffs[:6, odd].any() and not coeffs[6:, ~odd].any()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_l10_matches_reference_everywhere(ckpt_l10, dtype: str) -> None:
    lat, lon = _points(3000, seed=1)
    enc = load_encoder("satclip-vit16-l10", checkpoint=ckpt_l10, device="cpu", dtype=dtype)
    ours = enc.encode(lat=lat, lon=lon)
    ref = satclip_reference.embed(lat, lon, torch.load(ckpt_l10, weights_only=True))
    assert ours.shape == (3000, 256) and ours.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert np.abs(ours - ref).max() < 1e-4


def test_l40_matches_reference_within_acceptance(ckpt_l40) -> None:
    lat, lon = _points(1500, seed=2)
    enc = load_encoder("satclip-vit16-l40", checkpoint=ckpt_l40, device="cpu")
    ours = enc.encode(lat=lat, lon=lon).astype(np.float64)
    ref = satclip_reference.embed(lat, lon, torch.load(ckpt_l40, weights_only=True))
    mid = np.abs(lat) <= 45
    assert np.abs(ours[mid] - ref[mid]).max() < 1e-4
    cosine = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.999


def test_hyper_parameters_come_from_the_checkpoint(tmp_path) -> None:
    path = make_checkpoint(tmp_path / "small.ckpt", legendre_polys=10, capacity=32, num_hidden_layers=3, embed_dim=16)
    enc = load_encoder("satclip-resnet18-l10", checkpoint=path, device="cpu")
    assert enc.dim == 16 and enc.name == "satclip-resnet18-l10"
    assert enc.provenance.config == {
        "legendre_polys": 10, "capacity": 32, "num_hidden_layers": 3, "embed_dim": 16,
        "harmonics_calculation": "analytic",
    }
    assert enc.provenance.coordinate_order == "lon,lat" and enc.provenance.licence == "MIT"
    assert "2311.17179" in enc.provenance.paper
    assert enc.encode(lat=[10.0, 20.0], lon=[0.0, 5.0]).shape == (2, 16)


def test_batching_does_not_change_results(ckpt_l10) -> None:
    lat, lon = _points(1000, seed=3)
    enc = load_encoder("satclip-vit16-l10", checkpoint=ckpt_l10, device="cpu")
    np.testing.assert_array_equal(enc.encode(lat=lat, lon=lon), enc.encode(lat=lat, lon=lon, batch_size=1000))
    np.testing.assert_allclose(enc.encode(lat=lat, lon=lon, batch_size=7), enc.encode(lat=lat, lon=lon), atol=2e-5)


def _hub_cache(root, repo: str, filename: str, source) -> str:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(source.read_bytes())
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_released_checkpoint_resolves_from_the_hub_cache_offline(offline_hub, ckpt_l10) -> None:
    commit = _hub_cache(offline_hub, "microsoft/SatCLIP-ResNet18-L10", "satclip-resnet18-l10.ckpt", ckpt_l10)
    enc = load_encoder("satclip-resnet18-l10", device="cpu")
    assert enc.provenance.source == "hf://microsoft/SatCLIP-ResNet18-L10/satclip-resnet18-l10.ckpt"
    assert enc.provenance.revision == commit
    direct = load_encoder("satclip-resnet18-l10", checkpoint=ckpt_l10, device="cpu")
    assert enc.provenance.sha256 == direct.provenance.sha256
    np.testing.assert_array_equal(enc.encode(lat=[1.0], lon=[2.0]), direct.encode(lat=[1.0], lon=[2.0]))


def test_default_alias_is_vit16_l40_and_missing_weights_say_what_to_do(offline_hub) -> None:
    with pytest.raises(WeightsNotFoundError, match=r"microsoft/SatCLIP-ViT16-L40.*--checkpoint"):
        load_encoder("satclip", device="cpu")


def test_unsafe_checkpoint_is_refused_unless_trusted(tmp_path) -> None:
    path = make_checkpoint(tmp_path / "unsafe.ckpt", extra_hparams={"args": argparse.Namespace(lr=1e-4)})
    with pytest.raises(UnsafeCheckpointError, match="trust_checkpoint=True"):
        load_encoder("satclip-vit16-l10", checkpoint=path, device="cpu")
    enc = load_encoder("satclip-vit16-l10", checkpoint=path, device="cpu", trust_checkpoint=True)
    assert enc.dim == 256


def test_bad_checkpoints_are_named(tmp_path, ckpt_l10) -> None:
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_encoder("satclip-vit16-l10", checkpoint=garbage)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_encoder("satclip-vit16-l10", checkpoint=tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointError, match=r"L=10 but model 'satclip-vit16-l40'.*satclip-vit16-l10"):
        load_encoder("satclip-vit16-l40", checkpoint=ckpt_l10)
    stripped = torch.load(ckpt_l10, weights_only=True)
    del stripped["state_dict"]["model.location.nnet.last_layer.weight"]
    torch.save(stripped, tmp_path / "stripped.ckpt")
    with pytest.raises(CheckpointError, match="last_layer.weight"):
        load_encoder("satclip-vit16-l10", checkpoint=tmp_path / "stripped.ckpt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a SatCLIP checkpoint"):
        load_encoder("satclip-vit16-l10", checkpoint=tmp_path / "other.ckpt")


def test_bad_arguments_and_coordinates(ckpt_l10) -> None:
    with pytest.raises(InvalidArgumentError, match="float32"):
        load_encoder("satclip-vit16-l10", checkpoint=ckpt_l10, dtype="int8")
    enc = load_encoder("satclip-vit16-l10", checkpoint=ckpt_l10, device="cpu")
    with pytest.raises(InvalidCoordinateError, match="index 1"):
        enc.encode(lat=[0.0, np.nan], lon=[0.0, 0.0])
    with pytest.raises(InvalidCoordinateError, match="lat=91"):
        enc.encode(lat=[91.0], lon=[0.0])
    with pytest.raises(InvalidCoordinateError, match="same length"):
        enc.encode(lat=[1.0, 2.0], lon=[0.0])
