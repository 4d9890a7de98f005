"""Encode: a shard's cell centres through the encoder, into the stored precision.

Floats are cast batch by batch while copied out of the encoder; int8 is quantised per
dimension with a :class:`Quantizer` calibrated once per build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from builder.grid import Shard, cell_centers, shard_cells
from catalog.tables import dequantize

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from builder.encoders._base import Encoder

__all__ = ["ENCODE_CHUNK", "Quantizer", "encode_stored"]

ENCODE_CHUNK = 65536  # cells per encode call: the progress bar's granularity


class Quantizer:
    """Per-dimension affine int8 quantisation: ``value = q * scale + offset``."""

    def __init__(self, scale: NDArray[np.float32], offset: NDArray[np.float32]) -> None:
        self.scale, self.offset = np.asarray(scale, np.float32), np.asarray(offset, np.float32)

    @classmethod
    def calibrate(cls, encoder: Encoder) -> Quantizer:
        """Range of each dimension over the res-2 cell centres and 20,000 random points, +5%."""
        cells = shard_cells(Shard(2))
        lat, lon = cell_centers(cells)
        rng = np.random.default_rng(0)
        z = rng.uniform(-1, 1, 20_000)
        lat = np.concatenate([lat, np.degrees(np.arcsin(z))])
        lon = np.concatenate([lon, rng.uniform(-180, 180, 20_000)])
        emb = encoder.encode(lat=lat, lon=lon)
        lo, hi = emb.min(0), emb.max(0)
        margin = 0.05 * (hi - lo) + 1e-6
        lo, hi = lo - margin, hi + margin
        return cls((hi - lo) / 254.0, (hi + lo) / 2.0)

    def encode(self, values: NDArray[np.float32]) -> NDArray[np.int8]:
        q = np.rint((values - self.offset) / self.scale)
        return np.clip(q, -127, 127).astype(np.int8)

    def decode(self, q: NDArray[Any], out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
        return dequantize(q, self.scale, self.offset, out)

    def to_dict(self) -> dict[str, list[float]]:
        return {"scale": self.scale.tolist(), "offset": self.offset.tolist()}


def encode_stored(encoder: Encoder, lat: NDArray, lon: NDArray, precision: str, quantizer: Quantizer | None,
                   on_chunk: Any = None) -> NDArray[Any]:
    """Embeddings of the points as stored: cast batch by batch while copied out of the
    encoder (float16, float32), or quantised (int8)."""
    dtype = np.float16 if precision == "float16" else np.float32
    emb = np.empty((lat.size, encoder.dim), dtype=dtype)
    # never below the encoder's batch: a larger --batch-size (a GPU's) would otherwise be cut to the chunk
    chunk = max(ENCODE_CHUNK, int(getattr(encoder, "batch_size", 0) or 0))
    for start in range(0, lat.size, chunk):
        stop = min(start + chunk, lat.size)
        encoder.encode(lat=lat[start:stop], lon=lon[start:stop], out=emb[start:stop])
        if on_chunk is not None:
            on_chunk(stop - start)
    if precision == "int8":
        assert quantizer is not None
        return quantizer.encode(emb)
    return emb


