"""The encoder registry: listing without heavy imports, plugins, and errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from builder.encoders import encoder_spec, list_encoders, load_encoder
from catalog.errors import InvalidArgumentError, UnknownEncoderError


def test_listing_imports_nothing_heavy() -> None:
    code = textwrap.dedent(
        """
        import sys
        from builder.encoders import list_encoders
        names = list_encoders()
        assert "geoclip" in names and "satclip-vit16-l40" in names, names
        heavy = [m for m in ("torch", "huggingface_hub", "builder.encoders.satclip") if m in sys.modules]
        assert not heavy, heavy
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_names_and_dimensions() -> None:
    names = list_encoders()
    expected = {f"satclip-{v}-l{lv}" for v in ("resnet18", "resnet50", "vit16") for lv in (10, 40)}
    assert expected | {"geoclip", "satclip"} <= set(names)
    assert encoder_spec("geoclip").dim == 512
    assert encoder_spec("satclip").options == (("variant", "satclip-vit16-l40"),)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(UnknownEncoderError, match=r"unknown encoder 'satclip-vit99'.*geoclip.*module:callable"):
        load_encoder("satclip-vit99")
    with pytest.raises(UnknownEncoderError, match="cannot import encoder module 'no_such_pkg'"):
        load_encoder("no_such_pkg:load")
    with pytest.raises(UnknownEncoderError, match="has no callable 'nope'"):
        load_encoder("tests.data.toy_encoder:nope")
    with pytest.raises(UnknownEncoderError, match="lacks name, dim, provenance, encode"):
        load_encoder("tests.data.toy_encoder:broken")


def _expected_toy(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    la, lo = np.radians(lat), np.radians(lon)
    xyz = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)
    return xyz @ (np.arange(12.0).reshape(4, 3) / 10).T


def test_module_callable_plugin() -> None:
    enc = load_encoder("tests.data.toy_encoder:load", device="cpu", batch_size=3)
    lat, lon = np.array([0.0, 45.0, -90.0, 10.0]), np.array([0.0, 90.0, 180.0, -170.0])
    assert enc.name == "toy" and enc.dim == 4 and enc.batch_size == 3
    np.testing.assert_allclose(enc.encode(lat=lat, lon=lon), _expected_toy(lat, lon), atol=1e-6)


def test_entry_point_plugin(tmp_path, monkeypatch) -> None:
    dist = tmp_path / "toy_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hexatlas.encoders]\ntoy = tests.data.toy_encoder:load\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "toy" in list_encoders()
    enc = load_encoder("toy", device="cpu")
    np.testing.assert_allclose(enc.encode(lat=[30.0], lon=[60.0]), _expected_toy(np.array([30.0]), np.array([60.0])),
                               atol=1e-6)


def test_bad_device_and_batch_size() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown device 'gpu0'"):
        load_encoder("tests.data.toy_encoder:load", device="gpu0")
    enc = load_encoder("tests.data.toy_encoder:load", device="cpu")
    with pytest.raises(InvalidArgumentError, match="batch_size must be positive"):
        enc.encode(lat=[0.0], lon=[0.0], batch_size=-1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error on machines without CUDA")
def test_cuda_requested_without_gpu_is_a_clear_error() -> None:
    with pytest.raises(InvalidArgumentError, match="no CUDA GPU"):
        load_encoder("tests.data.toy_encoder:load", device="cuda")


def test_auto_device_is_cuda_when_available() -> None:
    import torch

    enc = load_encoder("tests.data.toy_encoder:load")
    assert enc.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_encode_into_a_given_array() -> None:
    enc = load_encoder("tests.data.toy_encoder:load", device="cpu")
    lat, lon = np.linspace(-80, 80, 50), np.linspace(-170, 170, 50)
    # The same batches compute the same floats, so writing into ``out`` is bitwise the plain
    # result. Other batch shapes agree only within float rounding: CPUs' matrix kernels (AVX-512
    # on Xeon against AVX2 on EPYC, seen 6e-8 apart) round differently per shape.
    expected = enc.encode(lat=lat, lon=lon, batch_size=7)
    np.testing.assert_allclose(enc.encode(lat=lat, lon=lon), expected, rtol=1e-6, atol=1e-6)
    for dtype in (np.float16, np.float32, np.float64):
        out = np.full((50, enc.dim), np.nan, dtype)
        assert enc.encode(lat=lat, lon=lon, batch_size=7, out=out) is out
        np.testing.assert_array_equal(out, expected.astype(dtype))
    for bad in (np.empty((49, enc.dim), np.float32), np.empty((50, enc.dim), np.int8),
                np.empty((enc.dim, 50), np.float32).T):
        with pytest.raises(InvalidArgumentError, match="out must be"):
            enc.encode(lat=lat, lon=lon, out=bad)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_cpu_encoders_keep_freed_memory_unless_the_environment_says_otherwise() -> None:
    import os
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    code = ("from builder.encoders import load_encoder; from builder.encoders._base import retain_freed_memory; "
            "load_encoder('tests.data.toy_encoder:load', device='cpu'); print(retain_freed_memory())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, env=env, capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert subprocess.run(run, env={**env, "MALLOC_ARENA_MAX": "2"}, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
