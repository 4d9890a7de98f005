"""Interpolated lookup: which stored cell centres blend into a point's embedding, and how much.

One implementation for the query layer (which blends the vectors an atlas holds) and the
builder (which predicts, from the encoder at the same centres, what an atlas would return,
to measure its fidelity before building it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from catalog.cells import cells_to_latlng

__all__ = ["EARTH_RADIUS_KM", "Neighbourhood", "blend", "haversine_km", "interpolate", "neighbourhood"]

EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True)
class Neighbourhood:
    """Each point's cell and the cells one step around it.

    ``unique``: the distinct cells of all disks, sorted uint64 (m,); ``rows``: (n, 7) indexes
    into ``unique``, the point's own cell first; ``dist``: (n, 7) km from the point to each
    centre, inf on the repeated slot of a pentagon's 6-cell disk.
    """

    cells: NDArray[np.uint64]
    unique: NDArray[np.uint64]
    rows: NDArray[np.intp]
    dist: NDArray[np.float64]


def haversine_km(lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike) -> NDArray[np.float64]:
    """Great-circle distance in km between points in degrees (numpy broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dl = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0, 1)))


def neighbourhood(lat: NDArray[np.float64], lon: NDArray[np.float64], cells: NDArray[np.uint64]) -> Neighbourhood:
    """The disks of radius 1 around ``cells`` (the cells of the points ``lat``, ``lon``, degrees)."""
    import h3.api.numpy_int as h3i

    n = len(cells)
    disks = np.zeros((n, 7), dtype=np.uint64)
    for i, c in enumerate(np.asarray(cells, np.uint64).tolist()):
        disk = h3i.grid_disk(c, 1)  # 7 cells; 6 around a pentagon (the 7th repeats, masked below)
        disk = [c] + [d for d in disk if d != c]
        disks[i, : len(disk)], disks[i, len(disk):] = disk, c
    unique, inverse = np.unique(disks.ravel(), return_inverse=True)
    c_lat, c_lon = cells_to_latlng(unique)
    rows = inverse.reshape(n, 7)
    dist = haversine_km(c_lat[rows], c_lon[rows], np.asarray(lat)[:, None], np.asarray(lon)[:, None])
    dist[:, 1:][disks[:, 1:] == disks[:, :1]] = np.inf
    return Neighbourhood(np.asarray(cells, np.uint64), unique, rows, dist)


def blend(hood: Neighbourhood, held: NDArray[np.bool_]) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Inverse-distance weights of the three nearest held centres to each point.

    The three nearest centres to a point are always among its cell and that cell's
    neighbours. A point on a centre gets exactly that centre. A point whose own cell is not
    held gets no weights: an atlas without a cell (open ocean in a land-only atlas, outside a
    regional one) does not answer for points in it.

    Parameters
    ----------
    held : bool, shape (m,)
        Which of ``hood.unique`` the atlas holds.

    Returns
    -------
    rows : (n, 3) intp, indexes into ``hood.unique``
    weights : (n, 3) float64, summing to 1, or all 0 where the point gets no answer
    """
    n = len(hood.cells)
    dist = np.where(held[hood.rows], hood.dist, np.inf)
    nearest = np.argsort(dist, axis=1)[:, :3]
    d3 = np.take_along_axis(dist, nearest, axis=1)
    r3 = np.take_along_axis(hood.rows, nearest, axis=1)
    weights = np.where(np.isfinite(d3), 1.0 / np.maximum(d3, 1e-9), 0.0)
    weights[d3[:, 0] < 1e-6] = [1.0, 0.0, 0.0]
    weights[~held[hood.rows[:, 0]]] = 0.0
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return r3.reshape(n, 3), weights


def interpolate(vectors: Callable[[NDArray[np.uint64]], NDArray[np.float32]], lat: NDArray[np.float64],
                lon: NDArray[np.float64], cells: NDArray[np.uint64]) -> NDArray[np.float32]:
    """Interpolated embeddings at points: ``vectors(cells)`` gives (m, dim) float32 for the
    sorted cells asked, NaN rows for cells not held. Returns (n, dim) float32, NaN rows for
    points that get no answer (see :func:`blend`)."""
    hood = neighbourhood(lat, lon, cells)
    stored = vectors(hood.unique)  # neighbouring points share cells: each is read once
    held = ~np.isnan(stored[:, 0])
    rows, weights = blend(hood, held)
    stored = np.where(held[:, None], stored, 0.0)  # a weight of 0 on a NaN row would still give NaN
    out = np.einsum("nk,nkd->nd", weights, stored[rows.ravel()].reshape(len(cells), 3, stored.shape[1]))
    out = out.astype(np.float32)
    out[weights.sum(axis=1) == 0] = np.nan
    return out
