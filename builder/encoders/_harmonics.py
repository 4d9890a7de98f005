"""Real spherical harmonics as SatCLIP's released checkpoints define them, evaluated stably.

SatCLIP's reference code evaluates sympy-expanded polynomials in cos(theta), which lose
precision near the poles at high degree. Here every associated Legendre function is written
once, at load time, as a trigonometric polynomial in theta:

    Pbar_l^m(cos theta) = sum_k  a_k cos(k theta)   (m even)
                        = sum_k  b_k sin(k theta)   (m odd),   k <= l

The coefficients come from an FFT of a numerically stable recurrence (float64), so they are
exact to rounding. At run time the features for a batch are then one matrix product of a
(b, 2L-1) table of cos/sin(k theta) with a fixed (2L-1, L*L) matrix, times the matching
cos/sin(m phi) column: no Python loop over harmonics, and the same accuracy at the poles as
at the equator.

Conventions (those of the released checkpoints, see the reference page):
phi = radians(lon + 180), theta = radians(lat + 90); features ordered by l = 0..L-1 and,
within l, m = -l..l; no Condon-Shortley phase; m != 0 scaled by sqrt(2) and m = 0 by pi
relative to the orthonormal harmonics (the generator's quirk the weights were trained on).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

__all__ = ["feature_scales", "legendre_normalized", "trig_coefficients"]


def legendre_normalized(legendre_polys: int, theta: NDArray[np.float64]) -> NDArray[np.float64]:
    """Orthonormal associated Legendre functions by the standard stable recurrence.

    Parameters
    ----------
    legendre_polys : int
        L; degrees l = 0..L-1 are returned.
    theta : numpy.ndarray, float64, shape (n,)
        Colatitude-like angle in radians. ``sin(theta)`` keeps its sign, so values in
        (pi, 2 pi) give the odd-m functions' natural continuation (needed for the FFT).

    Returns
    -------
    numpy.ndarray, float64, shape (n, L, L)
        ``out[:, l, m] = K(l, m) P_l^m(cos theta)`` for m <= l (zero above), without the
        Condon-Shortley phase, with K(l, m) = sqrt((2l+1)/(4 pi) (l-m)!/(l+m)!).
    """
    big_l = int(legendre_polys)
    x, s = np.cos(theta), np.sin(theta)
    out = np.zeros((theta.size, big_l, big_l))
    out[:, 0, 0] = math.sqrt(1.0 / (4.0 * math.pi))
    for m in range(1, big_l):
        out[:, m, m] = math.sqrt((2 * m + 1) / (2 * m)) * s * out[:, m - 1, m - 1]
    for m in range(big_l - 1):
        out[:, m + 1, m] = math.sqrt(2 * m + 3) * x * out[:, m, m]
    for m in range(big_l):
        for ell in range(m + 2, big_l):
            a = math.sqrt((4 * ell * ell - 1) / (ell * ell - m * m))
            b = math.sqrt(((ell - 1) ** 2 - m * m) / (4 * (ell - 1) ** 2 - 1))
            out[:, ell, m] = a * (x * out[:, ell - 1, m] - b * out[:, ell - 2, m])
    return out


def feature_scales(legendre_polys: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64]]:
    """Degree, order and scale of each of the L*L features, in SatCLIP's order.

    Returns
    -------
    (l, m, scale) : three arrays of shape (L*L,)
        ``scale`` is pi for m = 0 and sqrt(2) otherwise.
    """
    ells = np.concatenate([np.full(2 * ell + 1, ell) for ell in range(legendre_polys)])
    ms = np.concatenate([np.arange(-ell, ell + 1) for ell in range(legendre_polys)])
    scale = np.where(ms == 0, math.pi, math.sqrt(2.0))
    return ells, ms, scale


def trig_coefficients(legendre_polys: int) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """The matrices that turn angle tables into SatCLIP features.

    With ``T_theta = [cos(k theta) for k in 0..L-1] + [sin(k theta) for k in 1..L-1]`` and
    ``T_phi`` laid out the same way in phi, the features are
    ``(T_theta @ coeffs) * T_phi[:, phi_index]``.

    Returns
    -------
    coeffs : numpy.ndarray, float64, shape (2L-1, L*L)
    phi_index : numpy.ndarray, int64, shape (L*L,)
        Column of ``T_phi`` each feature multiplies: cos(m phi) for m >= 0, sin(|m| phi)
        for m < 0.
    """
    big_l = int(legendre_polys)
    n = 4 * big_l  # well above the 2L-1 samples needed to resolve frequencies < L
    theta = 2.0 * math.pi * np.arange(n) / n
    spectrum = np.fft.rfft(legendre_normalized(big_l, theta), axis=0) / n  # (n//2+1, L, L)
    cos_part = 2.0 * spectrum.real[:big_l]
    cos_part[0] /= 2.0
    sin_part = -2.0 * spectrum.imag[1:big_l]
    table = np.concatenate([cos_part, sin_part])  # (2L-1, L, L) indexed [row, l, m]

    ells, ms, scale = feature_scales(big_l)
    coeffs = table[:, ells, np.abs(ms)] * scale
    # An even-m function has only cosine terms and an odd-m one only sine terms; zero the
    # rounding noise in the other half so it cannot leak into the features.
    is_sin_row = np.arange(2 * big_l - 1) >= big_l
    coeffs[np.ix_(is_sin_row, np.abs(ms) % 2 == 0)] = 0.0
    coeffs[np.ix_(~is_sin_row, np.abs(ms) % 2 == 1)] = 0.0
    phi_index = np.where(ms >= 0, ms, big_l - 1 - ms).astype(np.int64)
    return coeffs, phi_index
