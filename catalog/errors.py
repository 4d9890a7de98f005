"""The one error hierarchy of hexatlas.

Every error a user can cause derives from :class:`HexatlasError` and also from the
matching built-in exception, so ``except ValueError`` keeps working (as h3-py does).
Messages say what was given, what is valid, and how to fix it.
"""

from __future__ import annotations

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
    "StorageError",
    "UnknownColumnError",
    "UnknownEncoderError",
    "UnknownResolutionError",
    "UnsafeAtlasError",
    "UnsafeCheckpointError",
    "WeightsChecksumError",
    "WeightsNotFoundError",
]


class HexatlasError(Exception):
    """Base class of every error hexatlas raises on purpose."""


class InvalidCoordinateError(HexatlasError, ValueError):
    """A latitude or longitude is NaN, infinite or out of range."""


class InvalidArgumentError(HexatlasError, ValueError):
    """An argument has a value outside its valid choices."""


class UnknownEncoderError(HexatlasError, LookupError):
    """No location encoder is registered under the given name."""


class UnknownResolutionError(HexatlasError, LookupError):
    """An H3 resolution is invalid or not present in an atlas."""


class UnknownColumnError(HexatlasError, KeyError):
    """A named column is not present in the input table."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(HexatlasError, ValueError):
    """A model checkpoint is unreadable or is not the expected kind of checkpoint."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint would need arbitrary unpickling to load."""


class WeightsNotFoundError(HexatlasError, FileNotFoundError):
    """Model weights are not available locally and cannot be downloaded."""


class WeightsChecksumError(HexatlasError, ValueError):
    """A weights file does not have the sha256 it was published with."""


class MissingDependencyError(HexatlasError, ImportError):
    """An optional dependency is needed; the message names the install line."""


class InputFileError(HexatlasError, OSError):
    """An input table cannot be read."""


class AtlasNotFoundError(HexatlasError, FileNotFoundError):
    """No atlas (or no dataset of the requested model) exists at a path."""


class AtlasCorruptError(HexatlasError, ValueError):
    """An atlas is partial, altered or of an incompatible format version."""


class UnsafeAtlasError(AtlasCorruptError):
    """An atlas names something a reader must never follow: a path outside its layout (absolute,
    ``..``, escapes, a link leaving the dataset), an allocation it does not justify, or a
    model that would load more than its own bytes. What it names is refused, not read."""


class AtlasChangedError(HexatlasError, RuntimeError):
    """An opened atlas changed since it was opened (rebuilt with ``--overwrite``, or a remote
    file replaced: another ETag): open it again."""


class AtlasBusyError(HexatlasError, RuntimeError):
    """Another build holds the lock on this atlas."""


class StorageError(HexatlasError, OSError):
    """Object storage refused or failed a request (bucket, credentials, endpoint)."""


class BuildFailedError(HexatlasError, RuntimeError):
    """Shards of a distributed build failed after their retries; finished shards are kept."""
