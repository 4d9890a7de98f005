"""Fidelity: how close what an atlas returns is to its encoder, per resolution.

Seeded random points (uniform on the sphere; on land for a land-only atlas; in the area
for a regional one) are encoded exactly and compared with what the atlas returns for them,
by cell lookup and by interpolated lookup (:mod:`catalog.interpolation`, the query layer's
own blend): mean, 5th percentile and minimum cosine similarity and mean L2 distance.

After a build the atlas is read back from its part files (:func:`measure_written`), so the
numbers in the manifest are what a reader gets. Before a build (``--resolutions auto``, the
README's table at resolutions nobody built) :func:`predict` computes what an atlas would
return from the encoder at the same cell centres, stored at the build's precision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from catalog.cells import cells_to_latlng, latlng_to_cells
from catalog.errors import InvalidArgumentError
from catalog.interpolation import interpolate

if TYPE_CHECKING:
    from builder.encoders._base import Encoder
    from builder.region import Region
    from catalog.storage import Store

__all__ = ["FIDELITY_POINTS", "FIDELITY_SEED", "choose_resolution", "compare", "measure", "measure_written",
           "predict", "sample_points", "would_return"]

FIDELITY_POINTS = 2000
FIDELITY_SEED = 0
AUTO_MAX_RES = 10  # the finest resolution --resolutions auto considers

Vectors = Callable[[NDArray[np.uint64]], NDArray[np.float32]]


def sample_points(n: int = FIDELITY_POINTS, *, seed: int = FIDELITY_SEED, land_only: bool = False,
                  region: Region | None = None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``n`` seeded random points (lat, lon in degrees, float64 (n,)), uniform by area: on the
    sphere, or in ``region``; on land by the build's land mask when ``land_only``."""
    accept = None
    if land_only:
        from builder.landmask import is_land_point

        def accept(lat: NDArray, lon: NDArray) -> NDArray[np.bool_]:
            return is_land_point(lat=lat, lon=lon)
    rng = np.random.default_rng(seed)
    if region is not None:
        return region.sample(n, rng, accept)
    lats, lons, have = [], [], 0
    while have < n:
        m = 4 * (n - have)
        lat, lon = np.degrees(np.arcsin(rng.uniform(-1, 1, m))), rng.uniform(-180, 180, m)
        if accept is not None:
            ok = accept(lat, lon)
            lat, lon = lat[ok], lon[ok]
        lats.append(lat)
        lons.append(lon)
        have += len(lat)
    return np.concatenate(lats)[:n], np.concatenate(lons)[:n]


def compare(exact: NDArray[np.float32], got: NDArray[np.float32]) -> dict[str, float]:
    """Cosine similarity and L2 distance of ``got`` to ``exact`` (both (n, dim)), over the rows
    ``got`` answers: ``mean_cosine``, ``p05_cosine``, ``min_cosine``, ``mean_l2``, ``answered``."""
    ok = ~np.isnan(got[:, 0]) if len(got) else np.zeros(0, bool)
    a, b = exact[ok].astype(np.float64), got[ok].astype(np.float64)
    if not len(a):
        return {"mean_cosine": None, "p05_cosine": None, "min_cosine": None, "mean_l2": None, "answered": 0}
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return {"mean_cosine": round(float(cos.mean()), 6), "p05_cosine": round(float(np.percentile(cos, 5)), 6),
            "min_cosine": round(float(cos.min()), 6), "mean_l2": round(float(np.linalg.norm(a - b, axis=1).mean()), 6),
            "answered": int(ok.sum())}


def measure(vectors: Vectors, res: int, lat: NDArray[np.float64], lon: NDArray[np.float64],
            exact: NDArray[np.float32], sample: str) -> dict[str, Any]:
    """The fidelity entry of one resolution: ``vectors`` answers for cells as the atlas does."""
    cells = latlng_to_cells(lat, lon, res)
    return {"points": len(lat), "seed": FIDELITY_SEED, "sample": sample,
            "cell": compare(exact, vectors(cells)), "interpolated": compare(exact, interpolate(vectors, lat, lon, cells))}


def describe_sample(land_only: bool, region: Region | None) -> str:
    where = "in the region" if region is not None else "on the sphere"
    return f"uniform {where}{', on land' if land_only else ''}"


def measure_written(dataset: Store, manifest_resolutions: dict[str, Any], files: list[dict[str, Any]], dim: int,
                    precision: str, quantization: dict[str, list[float]] | None, encoder: Encoder,
                    land_only: bool, region: Region | None,
                    points: int = FIDELITY_POINTS) -> dict[str, dict[str, Any]]:
    """Each resolution's fidelity, reading the written part files back (as the query layer does)."""
    from catalog.blocks import ResolutionReader, part_infos

    lat, lon = sample_points(points, land_only=land_only, region=region)
    exact = encoder.encode(lat=lat, lon=lon)
    by_path = {f["path"]: f for f in files}
    out = {}
    for res, info in manifest_resolutions.items():
        reader = ResolutionReader(dataset, part_infos(info, by_path), dim, precision, str(dataset))
        out[res] = measure(lambda cells, r=reader: r.vectors(cells, quantization), int(res), lat, lon, exact,
                           describe_sample(land_only, region))
    return out


def would_return(encoder: Encoder, res: int, *, precision: str = "float16", land_only: bool = False,
                 region: Region | None = None) -> Vectors:
    """What an atlas of ``res`` would return for cells, without building it: the encoder at
    their centres, stored as float16 or float32 (int8 is taken as float32); NaN rows for
    cells it would not hold (outside the region; not touching land when ``land_only``)."""
    keep = None
    if region is not None:
        region.check_size(res)
        keep = region.cells(res)
    dtype = np.float16 if precision == "float16" else np.float32

    def vectors(cells: NDArray[np.uint64]) -> NDArray[np.float32]:
        held = np.ones(len(cells), bool)
        if keep is not None:
            held &= np.isin(cells, keep)
        if land_only and held.any():
            from builder.landmask import touches_land

            held[held] = touches_land(cells[held], res)
        got = np.full((len(cells), encoder.dim), np.nan, np.float32)
        if held.any():
            c_lat, c_lon = cells_to_latlng(cells[held])
            got[held] = encoder.encode(lat=c_lat, lon=c_lon).astype(dtype).astype(np.float32)
        return got

    return vectors


def predict(encoder: Encoder, res: int, lat: NDArray[np.float64], lon: NDArray[np.float64],
            exact: NDArray[np.float32], *, precision: str = "float16", land_only: bool = False,
            region: Region | None = None) -> dict[str, Any]:
    """The fidelity an atlas of ``res`` would measure at the points, without building it
    (:func:`would_return`)."""
    vectors = would_return(encoder, res, precision=precision, land_only=land_only, region=region)
    return measure(vectors, res, lat, lon, exact, describe_sample(land_only, region))


def choose_resolution(encoder: Encoder, min_cosine: float, *, precision: str = "float16", land_only: bool = False,
                      region: Region | None = None, points: int = FIDELITY_POINTS,
                      max_res: int = AUTO_MAX_RES, report: Callable[[str], None] | None = None) -> int:
    """The coarsest resolution whose predicted interpolated mean cosine reaches ``min_cosine``.

    Raises
    ------
    InvalidArgumentError
        ``min_cosine`` is not in (0, 1], or no resolution up to ``max_res`` reaches it.
    """
    if not (isinstance(min_cosine, (int, float)) and 0 < min_cosine <= 1):
        raise InvalidArgumentError(f"--min-cosine must be a number in (0, 1], got {min_cosine!r}")
    lat, lon = sample_points(points, land_only=land_only, region=region)
    if not len(lat):
        raise InvalidArgumentError("no random point fell on land in the region: there is nothing to measure or build")
    exact = encoder.encode(lat=lat, lon=lon)
    seen = []
    for res in range(max_res + 1):
        try:
            fid = predict(encoder, res, lat, lon, exact, precision=precision, land_only=land_only, region=region)
        except InvalidArgumentError as exc:  # the region is too large at this resolution
            raise InvalidArgumentError(f"no resolution up to {res - 1} reaches an interpolated mean cosine of "
                                       f"{min_cosine} ({'; '.join(seen)}), and at {res}: {exc}") from None
        got = fid["interpolated"]["mean_cosine"]
        seen.append(f"{res}: {got:.4f}")
        if report is not None:
            report(f"res {res}: interpolated mean cosine {got:.4f} (cell {fid['cell']['mean_cosine']:.4f}, "
                   f"5th percentile {fid['interpolated']['p05_cosine']:.4f}) over {len(lat):,} points")
        if got >= min_cosine:
            return res
    raise InvalidArgumentError(f"no resolution up to {max_res} reaches an interpolated mean cosine of {min_cosine} "
                               f"({'; '.join(seen)}); lower --min-cosine")
