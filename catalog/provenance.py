"""Where an embedding came from: the record that travels with every atlas."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Provenance", "sha256_file"]


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Return the hex sha256 digest of a file, read in chunks into one buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk_bytes)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while size := fh.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


@dataclass(frozen=True)
class Provenance:
    """Provenance of a location encoder's weights.

    Attributes
    ----------
    model : str
        Registry name, e.g. ``"satclip-vit16-l40"``.
    dim : int
        Embedding dimension.
    source : str
        Where the weights came from (Hub repo and file, package file or local path).
    revision : str or None
        Hub commit, package version or None for a local file.
    sha256 : str
        Hex digest of the weights file.
    coordinate_order : str
        Column order the original implementation takes, ``"lat,lon"`` or ``"lon,lat"``.
    licence, paper : str
        Licence of the weights and the paper that introduced the model.
    config : dict
        Hyper-parameters read from the weights (plain JSON types).
    """

    model: str
    dim: int
    source: str
    revision: str | None
    sha256: str
    coordinate_order: str
    licence: str
    paper: str
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.coordinate_order not in ("lat,lon", "lon,lat"):
            raise ValueError(f"coordinate_order must be 'lat,lon' or 'lon,lat', got {self.coordinate_order!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form, as stored in manifests and file metadata."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
