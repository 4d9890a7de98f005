"""The atlas format: errors, coordinates, provenance and table I/O shared by builder and query.

Needs only the standard library, numpy and pyarrow.
"""

from __future__ import annotations

from catalog.coords import as_coordinates, invalid_mask
from catalog.errors import (
    AtlasBusyError,
    AtlasChangedError,
    AtlasCorruptError,
    AtlasNotFoundError,
    BuildFailedError,
    CheckpointError,
    HexatlasError,
    InputFileError,
    InvalidArgumentError,
    InvalidCoordinateError,
    MissingDependencyError,
    StorageError,
    UnknownColumnError,
    UnknownEncoderError,
    UnknownResolutionError,
    UnsafeAtlasError,
    UnsafeCheckpointError,
    WeightsChecksumError,
    WeightsNotFoundError,
)
from catalog.provenance import Provenance, sha256_file
from catalog.storage import Store, open_store
from catalog.tables import read_points, write_parquet

__all__ = [
    "AtlasBusyError",
    "AtlasChangedError",
    "AtlasCorruptError",
    "AtlasNotFoundError",
    "BuildFailedError",
    "CheckpointError",
    "HexatlasError",
    "InputFileError",
    "InvalidArgumentError",
    "InvalidCoordinateError",
    "MissingDependencyError",
    "Provenance",
    "StorageError",
    "Store",
    "UnknownColumnError",
    "UnknownEncoderError",
    "UnknownResolutionError",
    "UnsafeAtlasError",
    "UnsafeCheckpointError",
    "WeightsChecksumError",
    "WeightsNotFoundError",
    "as_coordinates",
    "invalid_mask",
    "open_store",
    "read_points",
    "sha256_file",
    "write_parquet",
]
