"""A small two-model atlas built once for the query tests (SatCLIP L=10 random weights + toy)."""

from __future__ import annotations

import pytest

from tests.data.satclip_checkpoint import make_checkpoint


@pytest.fixture(scope="session")
def atlas_dir(tmp_path_factory):
    from builder.build import build

    root = tmp_path_factory.mktemp("query-atlas")
    ckpt = make_checkpoint(root / "satclip-l10.ckpt", legendre_polys=10)
    build("satclip-vit16-l10", checkpoint=str(ckpt), resolutions="0-2", output=root / "atlas", device="cpu",
          precision="float32", progress=False)
    build("tests.data.toy_encoder:load", resolutions="1", output=root / "atlas", device="cpu", progress=False)
    return root / "atlas", ckpt


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HEXATLAS_CACHE", str(tmp_path_factory.getbasetemp() / "hexatlas-cache"))
