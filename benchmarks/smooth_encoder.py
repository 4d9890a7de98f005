"""A cheap, smooth, full-rank location encoder for benchmarks of everything but the encoder.

16 sines of random projections of the unit-sphere position (seeded): a field as smooth as
low-order spherical harmonics, whose every cell has its own direction, at the cost of one
3 x 16 matrix product. The tests' 4-d toy is cheaper still but rank 2 (every cell's vector
lies on one circle, and float16 ties thousands of neighbours), so its index and recall say
little about a real encoder's. ``hexatlas build --model benchmarks.smooth_encoder:load``.
"""

from __future__ import annotations

import math

import torch

from builder.encoders import Encoder
from catalog.provenance import Provenance

DIM = 16


class SmoothField(torch.nn.Module):
    def __init__(self, dim: int = DIM, seed: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("freq", torch.randn(3, dim, generator=generator) * 3.0)
        self.register_buffer("phase", torch.rand(dim, generator=generator) * 2 * math.pi)

    def forward(self, lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
        la, lo = torch.deg2rad(lat), torch.deg2rad(lon)
        xyz = torch.stack([la.cos() * lo.cos(), la.cos() * lo.sin(), la.sin()], dim=1).to(self.freq.dtype)
        return torch.sin(xyz @ self.freq + self.phase)


def load(*, checkpoint=None, device="auto", dtype=None) -> Encoder:
    provenance = Provenance(
        model="smooth16", dim=DIM, source="benchmarks/smooth_encoder.py", revision=None, sha256="0" * 64,
        coordinate_order="lat,lon", licence="MIT", paper="none",
    )
    return Encoder(SmoothField(), provenance=provenance, device=device, dtype=dtype)
