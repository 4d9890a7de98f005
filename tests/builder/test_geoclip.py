"""GeoCLIP: parity with the geoclip package's own LocationEncoder, weights handling, errors."""

from __future__ import annotations

import importlib
import shutil
import sys
import types
import zipfile
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pytest
import torch

from builder.encoders import geoclip as geoclip_module
from builder.encoders import load_encoder
from catalog.errors import CheckpointError, InvalidCoordinateError, WeightsChecksumError, WeightsNotFoundError

try:
    _DIST = distribution("geoclip")
except PackageNotFoundError:
    _DIST = None
needs_geoclip = pytest.mark.skipif(_DIST is None, reason="the geoclip wheel is not installed (make setup installs it)")


@pytest.fixture(scope="module")
def reference_module():
    """The package's location_encoder.py, imported without geoclip/__init__ (transformers)."""
    root = _DIST.locate_file("geoclip")
    saved = {k: v for k, v in sys.modules.items() if k == "geoclip" or k.startswith("geoclip.")}
    pkg, sub, misc = (types.ModuleType(n) for n in ("geoclip", "geoclip.model", "geoclip.model.misc"))
    pkg.__path__, sub.__path__ = [str(root)], [str(root / "model")]
    misc.file_dir = str(root / "model")  # all location_encoder.py needs from misc.py (which imports pandas)
    sys.modules.update({"geoclip": pkg, "geoclip.model": sub, "geoclip.model.misc": misc})
    try:
        yield importlib.import_module("geoclip.model.location_encoder")
    finally:
        for name in [k for k in sys.modules if k == "geoclip" or k.startswith("geoclip.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _points(n: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-90, 90, n), rng.uniform(-180, 180, n)
    lat[:5], lon[:5] = [90, -90, 0, 0, 51.5], [180, -180, 0, 180, -0.12]
    return lat, lon


@needs_geoclip
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_the_package_location_encoder(reference_module, dtype) -> None:
    lat, lon = _points()
    ref = reference_module.LocationEncoder().eval()  # loads the shipped weights itself
    with torch.no_grad():
        expected = ref(torch.tensor(np.stack([lat, lon], 1), dtype=torch.float32)).numpy()
    enc = load_encoder("geoclip", device="cpu", dtype=dtype)
    ours = enc.encode(lat=lat, lon=lon)
    assert ours.shape == (3000, 512)
    assert np.abs(ours - expected).max() < 1e-4


@needs_geoclip
def test_provenance_and_default_dtype() -> None:
    enc = load_encoder("geoclip", device="cpu")
    prov = enc.provenance
    assert (enc.name, enc.dim, prov.sha256, prov.revision) == ("geoclip", 512, geoclip_module.WEIGHTS_SHA256, "1.3.0")
    assert prov.coordinate_order == "lat,lon" and prov.licence == "MIT" and "2309.16020" in prov.paper
    assert prov.source.startswith("pypi:geoclip==1.3.0/")
    assert enc.encode(lat=[0.0], lon=[0.0]).dtype == np.float32


@needs_geoclip
def test_geoclip_package_is_never_imported() -> None:
    import subprocess

    code = (
        "import sys\nfrom builder.encoders import load_encoder\n"
        "load_encoder('geoclip', device='cpu').encode(lat=[1.0], lon=[2.0])\n"
        "assert not [m for m in sys.modules if m.startswith(('geoclip', 'transformers', 'torchvision'))]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_geoclip
def test_weights_from_the_wheel_file(tmp_path) -> None:
    wheel = tmp_path / "geoclip-1.3.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(geoclip_module.shipped_weights(), geoclip_module.WEIGHTS_MEMBER)
    lat, lon = _points(200)
    from_wheel = load_encoder("geoclip", checkpoint=wheel, device="cpu")
    np.testing.assert_array_equal(from_wheel.encode(lat=lat, lon=lon),
                                  load_encoder("geoclip", device="cpu").encode(lat=lat, lon=lon))
    assert from_wheel.provenance.sha256 == geoclip_module.WEIGHTS_SHA256

    empty = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("other/__init__.py", "")
    with pytest.raises(WeightsNotFoundError, match="wheel without"):
        load_encoder("geoclip", checkpoint=empty)


@needs_geoclip
def test_altered_shipped_weights_are_refused(tmp_path, monkeypatch) -> None:
    altered = tmp_path / "location_encoder_weights.pth"
    shutil.copy(geoclip_module.shipped_weights(), altered)
    with open(altered, "r+b") as fh:
        fh.seek(-16, 2)
        fh.write(b"\x00" * 16)
    monkeypatch.setattr(geoclip_module, "shipped_weights", lambda: altered)
    with pytest.raises(WeightsChecksumError, match="expected 94b80ae3.*force-reinstall"):
        load_encoder("geoclip")


def test_missing_wheel_says_how_to_install(monkeypatch) -> None:
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(geoclip_module, "distribution", missing)
    with pytest.raises(WeightsNotFoundError, match=r"pip install --no-deps geoclip==1\.3\.0"):
        load_encoder("geoclip")


def test_user_state_dicts_are_checked(tmp_path) -> None:
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        load_encoder("geoclip", checkpoint=tmp_path / "nope.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not torch")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file"):
        load_encoder("geoclip", checkpoint=tmp_path / "garbage.pth")
    torch.save({"LocEnc0.capsule.0.b": torch.zeros(256, 2), "extra": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointError, match="missing: LocEnc0.capsule.1.bias.*unexpected: extra"):
        load_encoder("geoclip", checkpoint=tmp_path / "wrong.pth")


def test_user_trained_state_dict_loads_with_its_own_digest(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(3):
        state[f"LocEnc{i}.capsule.0.b"] = torch.randn(256, 2, generator=gen) * 2.0 ** (4 * i)
        for layer, (n_in, n_out) in zip(geoclip_module._LAYERS, ((512, 1024), (1024, 1024), (1024, 1024), (1024, 512))):
            state[f"LocEnc{i}.{layer}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
            state[f"LocEnc{i}.{layer}.bias"] = torch.zeros(n_out)
    torch.save(state, tmp_path / "mine.pth")
    enc = load_encoder("geoclip", checkpoint=tmp_path / "mine.pth", device="cpu", dtype="float64")
    assert enc.provenance.revision is None and enc.provenance.sha256 != geoclip_module.WEIGHTS_SHA256
    lat, lon = _points(50)
    # independent float64 evaluation straight from the state dict
    xy = geoclip_module.equal_earth(torch.tensor(lat), torch.tensor(lon))
    total = 0
    for i in range(3):
        v = 2 * np.pi * xy @ state[f"LocEnc{i}.capsule.0.b"].double().T
        h = torch.cat([v.cos(), v.sin()], 1)
        for j, layer in enumerate(geoclip_module._LAYERS):
            h = torch.nn.functional.linear(h, state[f"LocEnc{i}.{layer}.weight"].double(), state[f"LocEnc{i}.{layer}.bias"].double())
            h = h.relu() if j < 3 else h
        total = total + h
    np.testing.assert_allclose(enc.encode(lat=lat, lon=lon), total.numpy(), atol=1e-8)
    with pytest.raises(InvalidCoordinateError, match="lon=181.0"):
        enc.encode(lat=[0.0], lon=[181.0])
