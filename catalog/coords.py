"""Validation of coordinates, shared by the builder and the query layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from catalog.errors import InvalidCoordinateError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

__all__ = ["as_coordinates", "invalid_mask"]


def invalid_mask(lat: NDArray[np.float64], lon: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Return True where a coordinate pair is NaN, infinite or out of range."""
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0) & (np.abs(lon) <= 180.0)
    return ~ok


def as_coordinates(
    *, lat: ArrayLike, lon: ArrayLike, allow_invalid: bool = False, first_index: int = 0
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Convert latitudes and longitudes to validated 1-D float64 arrays.

    Parameters
    ----------
    lat, lon : array-like of float, or scalars
        Degrees, WGS84; latitude in [-90, 90], longitude in [-180, 180].
    allow_invalid : bool
        Return invalid pairs unchanged instead of raising (callers mask them).
    first_index : int
        Index of the first pair in the whole input, for messages (a batch of a stream).

    Returns
    -------
    (lat, lon) : two contiguous float64 arrays of shape (n,)

    Raises
    ------
    InvalidCoordinateError
        If the lengths differ, or (unless ``allow_invalid``) any pair is NaN, infinite or
        out of range; the message names the first offending index and the count.
    """
    try:
        lat_a = np.ascontiguousarray(np.atleast_1d(np.asarray(lat, dtype=np.float64)))
        lon_a = np.ascontiguousarray(np.atleast_1d(np.asarray(lon, dtype=np.float64)))
    except (TypeError, ValueError) as exc:
        raise InvalidCoordinateError(f"coordinates must be numbers in degrees: {exc}") from None
    # Arrow and memory-mapped inputs arrive read-only; torch and in-place users need writable.
    lat_a = lat_a if lat_a.flags.writeable else lat_a.copy()
    lon_a = lon_a if lon_a.flags.writeable else lon_a.copy()
    if lat_a.ndim != 1 or lon_a.ndim != 1:
        raise InvalidCoordinateError(
            f"lat and lon must be 1-D, got shapes {lat_a.shape} and {lon_a.shape}"
        )
    if lat_a.shape != lon_a.shape:
        raise InvalidCoordinateError(
            f"lat and lon must have the same length, got {lat_a.size} and {lon_a.size}"
        )
    if not allow_invalid:
        bad = invalid_mask(lat_a, lon_a)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise InvalidCoordinateError(
                f"{int(bad.sum())} of {lat_a.size} coordinates are NaN or out of range; "
                f"first at index {first_index + i}: lat={float(lat_a[i])}, lon={float(lon_a[i])}. Valid: "
                "-90 <= lat <= 90 and -180 <= lon <= 180 degrees; drop or fix these rows"
            )
    return lat_a, lon_a
