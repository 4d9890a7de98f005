"""A user's own location encoder, as a plugin would provide it (used by the registry tests)."""

from __future__ import annotations

import torch

from builder.encoders import Encoder
from catalog.provenance import Provenance


class ToyModule(torch.nn.Module):
    """Unit-sphere position and a learnt-looking linear map: 3 -> 4, deterministic."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 4)
        with torch.no_grad():
            self.linear.weight.copy_(torch.arange(12.0).reshape(4, 3) / 10)
            self.linear.bias.zero_()

    def forward(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        la, lo = torch.deg2rad(lat), torch.deg2rad(lon)
        xyz = torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], dim=1)
        return self.linear(xyz.to(self.linear.weight.dtype))


def load(*, checkpoint=None, device="auto", dtype=None) -> Encoder:
    provenance = Provenance(
        model="toy", dim=4, source=str(checkpoint or "tests/data/toy_encoder.py"), revision=None,
        sha256="0" * 64, coordinate_order="lat,lon", licence="MIT", paper="none",
    )
    return Encoder(ToyModule(), provenance=provenance, device=device, dtype=dtype)


def broken(*, checkpoint=None, device="auto", dtype=None) -> object:
    return object()


class NumpyToy:
    """A plugin encoder with no torch module (say, one wrapping another framework): it builds,
    but has nothing to export for exact lookups."""

    name, dim, device, dtype, batch_size = "toy-numpy", 4, "cpu", "float32", 4096

    def __init__(self) -> None:
        self.provenance = Provenance(
            model=self.name, dim=4, source="tests/data/toy_encoder.py", revision=None, sha256="1" * 64,
            coordinate_order="lat,lon", licence="MIT", paper="none",
        )

    def encode(self, *, lat, lon, batch_size=None, out=None):
        import numpy as np

        la, lo = np.radians(np.asarray(lat, dtype=np.float64)), np.radians(np.asarray(lon, dtype=np.float64))
        emb = np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la), np.cos(la)], axis=1)
        if out is None:
            return emb.astype(np.float32)
        out[...] = emb
        return out


def numpy_plugin(*, checkpoint=None, device="auto", dtype=None) -> NumpyToy:
    return NumpyToy()
