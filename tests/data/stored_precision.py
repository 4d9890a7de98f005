"""How far apart two evaluations of an encoder may be once stored: GPU against CPU, or one
batch shape against another (used by ``tests/builder/test_gpu.py`` and ``benchmarks/gpu``)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def tolerance(exact: NDArray[np.floating], precision: str) -> NDArray[np.float64]:
    """Per value of ``exact`` (n, dim): the largest difference that is within the stored precision.

    One storage step at the value's magnitude, or at its row's rms when that is larger:
    correct rounding gives half a step, and float32 arithmetic on another device (or in
    other batch shapes) moves values by about 1e-6 of the row's scale, which can cross a
    rounding boundary, or many steps of a value near zero. float16: one float16 step;
    float32: 1e-4 of that magnitude.
    """
    exact = np.asarray(exact, np.float64)
    rms = np.sqrt(np.mean(np.square(exact), axis=1, keepdims=True))
    scale = np.maximum(np.abs(exact), rms)
    if precision == "float16":
        return np.spacing(scale.astype(np.float16)).astype(np.float64)
    if precision == "float32":
        return 1e-4 * scale
    raise ValueError(f"precision {precision!r}: float16 or float32 (int8 is compared in codes)")
