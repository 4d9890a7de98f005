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


REGION = (5.0, 45.0, 9.0, 48.0)  # the Alps' north side: about 21,000 cells at resolution 7


@pytest.fixture(scope="session")
def regional_dir(tmp_path_factory):
    """A regional resolution-7-only atlas (toy encoder, float32): above any small map limit,
    so that the map's overview levels, averaged levels and in-place reads are all exercised."""
    from builder.build import build

    root = tmp_path_factory.mktemp("regional-atlas")
    build("tests.data.toy_encoder:load", resolutions="7", output=root / "atlas", device="cpu", precision="float32",
          progress=False, region=",".join(map(str, REGION)))
    return root / "atlas"
