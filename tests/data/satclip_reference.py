"""A per-harmonic SatCLIP evaluation in the style of the official implementation.

The official 'analytic' mode evaluates, for each (l, m) in a Python loop, an expanded
polynomial in cos(theta) in float64, then the SIREN in float64. This module does the same
from first principles (``numpy.polynomial``, not the official code), so it reproduces both
the official results and their loss of precision near the poles at high L. Tests use it as
the "official" side of the parity checks; the benchmark uses it as the naive baseline.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.polynomial import legendre as npleg
from numpy.polynomial import polynomial as nppoly


def _assoc_legendre_power_coeffs(ell: int, m: int) -> np.ndarray:
    """Power-basis coefficients of d^m/dx^m P_l(x) (times (1-x^2)^(m/2) gives P_l^m)."""
    p_l = npleg.leg2poly([0] * ell + [1])
    return nppoly.polyder(p_l, m) if m else p_l


def features(lat: np.ndarray, lon: np.ndarray, legendre_polys: int) -> torch.Tensor:
    """SatCLIP's L*L features, float64, shape (n, L*L), one harmonic at a time."""
    phi = torch.from_numpy(np.radians(np.asarray(lon, dtype=np.float64) + 180.0))
    theta = torch.from_numpy(np.radians(np.asarray(lat, dtype=np.float64) + 90.0))
    x, s = torch.cos(theta), torch.sin(theta)
    columns = []
    for ell in range(legendre_polys):
        for m in range(-ell, ell + 1):
            am = abs(m)
            poly = torch.zeros_like(x)
            for c in _assoc_legendre_power_coeffs(ell, am)[::-1]:  # Horner, as expanded code would
                poly = poly * x + float(c)
            p_lm = poly * s**am
            if m == 0:
                columns.append(math.sqrt((2 * ell + 1) * math.pi / 4) * p_lm)
                continue
            k = math.sqrt((2 * ell + 1) / (4 * math.pi) * math.factorial(ell - am) / math.factorial(ell + am))
            trig = torch.cos(am * phi) if m > 0 else torch.sin(am * phi)
            columns.append(math.sqrt(2.0) * k * p_lm * trig)
    return torch.stack(columns, dim=1)


def embed(lat: np.ndarray, lon: np.ndarray, ckpt: dict, *, batch: int = 20_000) -> np.ndarray:
    """Full float64 location embedding from a checkpoint dict in the released layout."""
    hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
    pre = "model.location.nnet."
    layers = [
        (state[f"{pre}layers.{i}.weight"].double(), state[f"{pre}layers.{i}.bias"].double())
        for i in range(hp["num_hidden_layers"])
    ]
    last = (state[f"{pre}last_layer.weight"].double(), state[f"{pre}last_layer.bias"].double())
    out = []
    for start in range(0, len(lat), batch):
        h = features(lat[start : start + batch], lon[start : start + batch], hp["legendre_polys"])
        for i, (w, b) in enumerate(layers):
            h = torch.sin((30.0 if i == 0 else 1.0) * torch.nn.functional.linear(h, w, b))
        out.append(torch.nn.functional.linear(h, *last))
    return torch.cat(out).numpy()
