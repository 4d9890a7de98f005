"""Pictures of an atlas: cells coloured by the principal components of their embeddings, at any scale.

Shared by the map page (:mod:`query.server` sends the colours) and ``hexatlas map`` (a static
PNG drawn with matplotlib). The colouring follows SatCLIP's own figure: the first three
principal components of the embeddings, each stretched between its 2nd and 98th percentile,
become red, green and blue. The basis is the dataset's own, fitted once by the build and kept
in its manifest (:mod:`catalog.colors`), so every resolution, place and zoom level is coloured
alike; for an atlas built before that, it is fitted on first use and cached.

A map is asked for a view (a lon/lat box) and a budget of cells; it answers the finest
**level** whose cells in view fit. A level is a resolution the atlas holds (its cells in view
read in place, block by block), an overview level the build stored (coarser cells coloured by
the mean of their descendants at the finest resolution; memory-mapped, a few MB), or the
level just above a held one, averaged from its children in view on the fly. So a globe of a
resolution-7 atlas is drawn from a stored overview level and a city from its own cells, and
what one answer reads is bounded by its budget, not by the atlas.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import AtlasCorruptError, InvalidArgumentError, MissingDependencyError, UnknownResolutionError

__all__ = ["MAX_MAP_CELLS", "MapLayer", "coastline_grid", "configure_map", "map_layer", "map_levels", "map_view",
           "principal_colors", "render_layer", "render_png", "run_map"]

log = logging.getLogger(__name__)

# A map answer holds at most this many cells: the page would ship tens of MB and the PNG would
# take minutes to draw. Resolution 4 of a full globe (288,122 cells) fits.
MAX_MAP_CELLS = 300_000
# Cells of a view looked up (polygon fill, then blocks read) to answer it, at most: the fill
# alone takes ~1.3 us a cell.
MAX_VIEW_LOOKUPS = 2_500_000
READ_CHUNK = 1 << 15  # cells whose embeddings are read at once (a bounded (n, dim) float32 buffer)
WORLD = (-180.0, -90.0, 180.0, 90.0)
SOURCES = ("held", "overview", "averaged")


@dataclass(frozen=True)
class MapLayer:
    """One level's cells in a view, with their colours.

    ``cells`` uint64 (n,), sorted; ``rgb`` uint8 (n, 3); ``explained`` the fraction of the
    embeddings' variance each of the three components carries. ``source``: ``held`` (the
    atlas's own cells at ``res``), ``overview`` (a stored level, each cell the mean of its
    descendants at ``from_res``) or ``averaged`` (the mean of its children at ``from_res``,
    read in view). ``bbox``: the view, (min_lon, min_lat, max_lon, max_lat) degrees
    (min_lon > max_lon: across the antimeridian).
    """

    model: str
    res: int
    cells: NDArray[np.uint64]
    rgb: NDArray[np.uint8]
    explained: tuple[float, float, float]
    source: str = "held"
    from_res: int | None = None
    bbox: tuple[float, float, float, float] = WORLD


def principal_colors(vectors: NDArray[np.floating]) -> tuple[NDArray[np.uint8], tuple[float, float, float]]:
    """RGB from the first three principal components of ``vectors`` (n, d), fitted on them.

    Each component's sign is fixed so that its largest loading is positive, which makes the
    colours reproducible across runs and machines. Returns the colours (n, 3) uint8 and the
    explained-variance fraction of each component. (A dataset's map uses the basis its build
    fitted, :func:`catalog.colors.fit_basis`; this is the same fit on any vectors.)
    """
    from catalog.colors import apply_basis, fit_basis

    basis = fit_basis(vectors)
    return apply_basis(vectors, basis), tuple(basis["explained"])  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ boxes
def check_view(bbox: Any) -> tuple[float, float, float, float]:
    """A view box: (min_lon, min_lat, max_lon, max_lat) in degrees, lon in -180..180, lat in
    -90..90, min_lat <= max_lat; min_lon > max_lon crosses the antimeridian."""
    try:
        box = tuple(float(v) for v in bbox)
    except (TypeError, ValueError):
        box = ()
    if (len(box) != 4 or not all(np.isfinite(box)) or not all(-180 <= box[i] <= 180 for i in (0, 2))
            or not -90 <= box[1] <= box[3] <= 90):
        raise InvalidArgumentError(f"bbox must be min_lon,min_lat,max_lon,max_lat in degrees (lon -180..180, lat "
                                   f"-90..90, min_lat <= max_lat; min_lon > max_lon crosses the antimeridian), "
                                   f"got {bbox!r}")
    return box  # type: ignore[return-value]


def _pieces(box: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """The box as boxes that do not cross the antimeridian."""
    w, s, e, n = box
    return [box] if w <= e else [(w, s, 180.0, n), (-180.0, s, e, n)]


def _grid_cells(box: tuple[float, float, float, float], res: int) -> float:
    """About how many cells of the H3 grid at ``res`` have their centre in ``box``."""
    from query.atlas import _cells_in_box

    return sum(_cells_in_box(piece, res) for piece in _pieces(box))


def _fill(box: tuple[float, float, float, float], res: int) -> NDArray[np.uint64]:
    """The grid's cells at ``res`` in ``box`` (and a ring just outside), sorted."""
    from query.atlas import _box_cells

    return np.unique(np.concatenate([_box_cells(piece, res) for piece in _pieces(box)]))


def _inside(lat: NDArray[Any], lon: NDArray[Any], box: tuple[float, float, float, float],
            res: int) -> NDArray[np.bool_]:
    """Whether each centre is in ``box`` widened by two cell edges (so cells across its edges count)."""
    import h3

    from catalog.interpolation import EARTH_RADIUS_KM

    pad = 2 * np.degrees(h3.average_hexagon_edge_length(res, unit="km") / EARTH_RADIUS_KM)
    ok = np.zeros(len(lat), bool)
    for w, s, e, n in _pieces(box):
        widen = pad / max(np.cos(np.radians(min(max(abs(s), abs(n)) + pad, 89.9))), 1e-3)
        ok |= (lat >= s - pad) & (lat <= n + pad) & (lon >= w - widen) & (lon <= e + widen)
        # a piece on an edge of the map: centres just across the antimeridian
        if w - widen < -180:
            ok |= (lat >= s - pad) & (lat <= n + pad) & (lon >= w - widen + 360)
        if e + widen > 180:
            ok |= (lat >= s - pad) & (lat <= n + pad) & (lon <= e + widen - 360)
    return ok


# ------------------------------------------------------------------------------------ a dataset's map
class _Level:
    """A stored overview level in memory: cells (sorted), colours and float32 centres."""

    def __init__(self, table: NDArray[Any]) -> None:
        from catalog.cells import cells_to_latlng

        self.cells = np.ascontiguousarray(table["cell"])
        self.rgb = np.ascontiguousarray(table["rgb"])
        lat, lon = cells_to_latlng(self.cells)
        self.lat, self.lon = lat.astype(np.float32), lon.astype(np.float32)


def _read_level(path: Path, cells: int, level: int, where: str) -> NDArray[Any]:
    """An overview file checked: its dtype, its count, cells of its level in ascending order."""
    from catalog.colors import OVERVIEW_DTYPE

    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise AtlasCorruptError(f"{where} is not an overview level ({exc}); run 'hexatlas validate'") from None
    if table.dtype != OVERVIEW_DTYPE or table.shape != (cells,):
        raise AtlasCorruptError(f"{where} holds {table.dtype} of shape {table.shape}, not the {cells:,} cells of "
                                f"overview level {level} its manifest says; run 'hexatlas validate'")
    ids = np.asarray(table["cell"])
    if len(ids) and (((ids >> np.uint64(52)) & np.uint64(0xF)) != level).any() or (ids[1:] <= ids[:-1]).any():
        raise AtlasCorruptError(f"{where} holds cells that are not of resolution {level} in ascending order; "
                                "run 'hexatlas validate'")
    return np.array(table)  # out of the map: a few MB at most


class _DatasetMap:
    """The map of one dataset of an atlas: its colour basis, its levels and its views."""

    def __init__(self, atlas: Any, name: str) -> None:
        self.atlas, self.name = atlas, name
        manifest = atlas._manifest(name)
        self.held = sorted(int(r) for r in manifest["resolutions"])
        self.counts = {int(r): int(i["cells"]) for r, i in manifest["resolutions"].items()}
        self.finest = self.held[-1]
        self._basis: dict[str, Any] | None = manifest.get("colors")
        overview = manifest.get("overview")
        self.built = overview is not None  # else: an atlas from before overviews, computed on first use
        if overview is not None:
            self.stored = {int(k): dict(v) for k, v in overview["levels"].items()}
            self.overview_from = int(overview["from_res"])
        else:
            from catalog.colors import planned_levels

            self.stored = {r: {} for r in planned_levels(self.finest, self.counts[self.finest], set(self.held))}
            self.overview_from = self.finest
        self._levels: dict[int, _Level] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ what the map offers
    def levels(self) -> dict[int, str]:
        """Level -> source, finest first."""
        out = {}
        for r in range(self.finest, -1, -1):
            if r in self.held:
                out[r] = "held"
            elif r in self.stored:
                out[r] = "overview"
            elif r + 1 in self.held:
                out[r] = "averaged"
        return out

    def _from_res(self, res: int, source: str) -> int | None:
        return {"held": None, "overview": self.overview_from, "averaged": res + 1}[source]

    @property
    def basis(self) -> dict[str, Any]:
        with self._lock:
            if self._basis is None:
                self._basis = self._cached_basis()
            return self._basis

    def _cache(self) -> Path:
        """Where the map of an atlas built before overviews is kept: per manifest digest."""
        import hashlib

        from query.atlas import _cache_dir

        digest = self.atlas._digests.get(self.name) or hashlib.sha256(
            json.dumps(self.atlas._manifest(self.name), sort_keys=True).encode()).hexdigest()
        return _cache_dir() / "map" / digest[:24]

    def _cached_basis(self) -> dict[str, Any]:
        from catalog.checks import check_colors
        from catalog.colors import fit_basis, sample_vectors
        from catalog.tables import atomic_path

        path = self._cache() / "colors.json"
        dim = self.atlas.dim(self.name)
        if path.is_file() and path.stat().st_size < (64 << 10) + 64 * dim:
            try:
                return check_colors(json.loads(path.read_text()), dim, str(path))
            except (ValueError, AtlasCorruptError):
                pass  # damaged: fitted again below
        log.info("fitting the map's colours of %s (built before the build stored them)", self.name)
        data = self.atlas._data(self.name, self.finest)
        basis = fit_basis(sample_vectors(data.reader, data.quantization), res=self.finest)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(basis))
        return basis

    def _level(self, res: int) -> _Level:
        basis = None if self.built else self.basis  # an older atlas's levels need it, outside the lock
        with self._lock:
            if res not in self._levels:
                if self.built:
                    entry = self.stored[res]
                    path = self.atlas._local(self.name, [entry["path"]])[0]
                    where = f"{self.atlas._datasets[self.name][0]}/{entry['path']}"
                    self._levels[res] = _Level(_read_level(path, entry["cells"], res, where))
                else:
                    self._compute_levels(basis)
            return self._levels[res]

    def _compute_levels(self, basis: dict[str, Any]) -> None:
        """An atlas built before overviews: every planned level, by one pass over the finest
        resolution (minutes for a resolution-7 one), cached under ``$HEXATLAS_CACHE``."""
        from catalog.colors import OVERVIEW_DTYPE, OVERVIEW_MAX_CELLS, overview_levels
        from catalog.tables import atomic_path

        folder = self._cache()
        counts = folder / "overview.json"
        try:
            known = {int(k): int(v) for k, v in json.loads(counts.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            known = {}
        if set(known) == set(self.stored) and all(0 <= n <= OVERVIEW_MAX_CELLS for n in known.values()):
            try:
                for res, n in known.items():
                    self._levels[res] = _Level(_read_level(folder / f"res={res}.npy", n, res, str(folder)))
                    self.stored[res] = {"cells": n}
                return
            except AtlasCorruptError:
                self._levels.clear()
        log.warning("computing the map's overview of %s from its resolution %d (an atlas built before the build "
                    "stored it): one pass over %s cells, then cached in %s", self.name, self.finest,
                    f"{self.counts[self.finest]:,}", folder)
        data = self.atlas._data(self.name, self.finest)
        made = overview_levels(data.reader, basis, sorted(self.stored), data.quantization)
        folder.mkdir(parents=True, exist_ok=True)
        for res, table in made.items():
            with atomic_path(folder / f"res={res}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, table.astype(OVERVIEW_DTYPE), allow_pickle=False)
            self._levels[res] = _Level(table)
            self.stored[res] = {"cells": len(table)}
        with atomic_path(counts) as tmp:
            tmp.write_text(json.dumps({str(r): len(t) for r, t in made.items()}))

    # ------------------------------------------------------------------ views
    def _fraction(self, box: tuple[float, float, float, float], levels: dict[int, str]) -> float:
        """The share of the grid's cells in view that the dataset holds, estimated from the finest
        overview level with at most 50,000 grid cells in view (1 without one, or when the
        view holds too few of them to tell)."""
        for res in (r for r, source in levels.items() if source == "overview"):
            grid = _grid_cells(box, res)
            if grid <= 50_000:
                if grid < 50:
                    return 1.0
                level = self._level(res)
                held = int(_inside(level.lat, level.lon, box, res).sum())
                return min(1.0, max(held, 1) / grid)
        return 1.0

    def view(self, box: tuple[float, float, float, float], max_cells: int, res: int | None,
             max_res: int | None = None) -> MapLayer:
        levels = self.levels()
        if res is not None:
            if res not in levels:
                raise UnknownResolutionError(f"resolution {res} is not in this atlas's map of {self.name}; its "
                                             f"levels: {', '.join(f'{r} ({s})' for r, s in sorted(levels.items()))}")
            layer, seen = self._draw(res, levels[res], box, max_cells)
            if layer is None:
                fits = [r for r in levels if r < res]
                raise InvalidArgumentError(
                    f"resolution {res} has {seen} cells in this view, more than a map shows at once "
                    f"({max_cells:,}); give a smaller bbox, or leave res out for the finest level that fits"
                    + (f" (coarser ones: {', '.join(map(str, sorted(fits)))})" if fits else ""))
            return layer
        if max_res is not None:  # finer cells than the picture can show are not worth reading
            levels = {r: s for r, s in levels.items() if r <= max_res} or {min(levels): levels[min(levels)]}
        fraction = self._fraction(box, levels)
        for level, source in levels.items():
            estimate = _grid_cells(box, level) * fraction
            held = self.counts.get(level) if source == "held" else self.stored[level].get("cells") \
                if source == "overview" else None
            if min(estimate, held if held is not None else estimate) > max_cells:
                continue  # the estimate errs high: a level skipped would not have fitted
            layer, _ = self._draw(level, source, box, max_cells)
            if layer is not None:
                return layer
        raise InvalidArgumentError(f"even the coarsest level of {self.name}'s map has more than {max_cells:,} "
                                   "cells in this view; raise max_cells")

    def _draw(self, res: int, source: str, box: tuple[float, float, float, float],
              max_cells: int) -> tuple[MapLayer | None, str]:
        """The view at one level, or (None, how many cells it has) when more than ``max_cells``."""
        basis = self.basis
        if source == "overview":
            level = self._level(res)
            keep = np.flatnonzero(_inside(level.lat, level.lon, box, res))
            if len(keep) > max_cells:
                return None, f"{len(keep):,}"
            cells, rgb = level.cells[keep], level.rgb[keep]
        else:
            read = res if source == "held" else res + 1
            got = self._read(read, box, max_cells * (1 if source == "held" else 7))
            if got is None:
                return None, f"about {min(_grid_cells(box, res), self.counts.get(res, np.inf)):,.0f}"
            cells, values = got
            if source == "averaged":
                cells, values = _means(cells, values, res)
            if len(cells) > max_cells:
                return None, f"{len(cells):,}"
            from catalog.colors import to_rgb

            rgb = to_rgb(values, basis)
        return MapLayer(self.name, res, cells, rgb, tuple(basis["explained"]), source,  # type: ignore[arg-type]
                        self._from_res(res, source), box), ""

    def _read(self, res: int, box: tuple[float, float, float, float],
              most: int) -> tuple[NDArray[np.uint64], NDArray[np.float32]] | None:
        """The held cells of ``res`` in view and their scores, read in place; None when more than
        ``most`` (or more than :data:`MAX_VIEW_LOOKUPS` to look at)."""
        from catalog.cells import cells_to_latlng
        from catalog.colors import scores

        data = self.atlas._data(self.name, res)
        grid = _grid_cells(box, res)
        if self.counts[res] <= most and self.counts[res] < grid:
            cells, values = data.scan()  # the whole resolution costs less than looking up the view
            lat, lon = cells_to_latlng(cells)
            keep = _inside(lat, lon, box, res)
            return cells[keep], scores(values[keep], self.basis)
        if grid > MAX_VIEW_LOOKUPS:
            return None
        wanted = _fill(box, res)
        found, values = [], []
        for start in range(0, len(wanted), READ_CHUNK):
            chunk = wanted[start:start + READ_CHUNK]
            vectors = data.vectors(chunk)
            held = ~np.isnan(vectors[:, 0])
            found.append(chunk[held])
            values.append(scores(vectors[held], self.basis))
            if sum(map(len, found)) > most:
                return None
        return np.concatenate(found), np.concatenate(values)


def _means(cells: NDArray[np.uint64], values: NDArray[np.float32],
           res: int) -> tuple[NDArray[np.uint64], NDArray[np.float64]]:
    """Mean scores per parent at ``res`` of sorted ``cells``."""
    from catalog.cells import cells_to_parent

    if not len(cells):
        return cells, values.astype(np.float64)
    parents = cells_to_parent(cells, res)
    starts = np.flatnonzero(np.concatenate([[True], parents[1:] != parents[:-1]]))
    sums = np.add.reduceat(values.astype(np.float64), starts, axis=0)
    return parents[starts], sums / np.diff(np.append(starts, len(parents)))[:, None]


_MAPS: weakref.WeakKeyDictionary[Any, dict[str, _DatasetMap]] = weakref.WeakKeyDictionary()
_MAPS_LOCK = threading.Lock()


def _dataset_map(atlas: Any, model: str | None) -> _DatasetMap:
    name = atlas._name(model)
    with _MAPS_LOCK:
        maps = _MAPS.setdefault(atlas, {})
        if name not in maps:
            maps[name] = _DatasetMap(atlas, name)
        return maps[name]


def map_levels(atlas: Any, model: str | None = None) -> dict[int, str]:
    """The levels a dataset's map draws, finest first: resolution -> ``held``, ``overview``
    (stored by the build, or computed and cached for an older atlas) or ``averaged``."""
    return _dataset_map(atlas, model).levels()


def map_view(atlas: Any, bbox: Any = None, *, max_cells: int | None = None, res: int | None = None,
             max_res: int | None = None, model: str | None = None) -> MapLayer:
    """The cells of a view (``bbox``, default the globe) at the finest level whose cells in it
    number at most ``max_cells`` (default and at most :data:`MAX_MAP_CELLS`), with their colours.

    ``res`` asks for that level only; ``max_res`` for none finer (the finest a picture of the
    view can show: smaller cells would be less than a pixel). Reads only what the view needs: an overview level
    (a few MB), or the blocks of a held resolution that hold the view's cells.

    Raises
    ------
    InvalidArgumentError
        A bad box or budget, or ``res`` has more than ``max_cells`` cells in the view.
    UnknownResolutionError
        ``res`` is not one of the map's levels (:func:`map_levels`).
    """
    box = WORLD if bbox is None else check_view(bbox)
    limit = MAX_MAP_CELLS if max_cells is None else max_cells
    if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or not 1 <= limit <= MAX_MAP_CELLS:
        raise InvalidArgumentError(f"max_cells must be an integer from 1 to {MAX_MAP_CELLS:,}, got {max_cells!r}")
    for name, value in (("res", res), ("max_res", max_res)):
        if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
            raise InvalidArgumentError(f"{name} must be an integer, got {value!r}")
    return _dataset_map(atlas, model).view(box, int(limit), None if res is None else int(res),
                                           None if max_res is None else int(max_res))


def map_layer(atlas: Any, res: int | None = None, model: str | None = None) -> MapLayer:
    """The whole globe of one level (default: the finest that fits :data:`MAX_MAP_CELLS`)."""
    return map_view(atlas, res=res, model=model)


def _boundary_rings(cells: NDArray[np.uint64]) -> list[NDArray[np.float64]]:
    """Each cell's outline as (lon, lat) vertices, unwrapped so no edge jumps 360 degrees.

    Cells that enclose a pole are closed along the map's top or bottom edge. A ring may
    then extend past +-180 degrees; the caller draws it again shifted by 360.
    """
    import h3

    rings = []
    for cell in cells.tolist():
        latlng = np.asarray(h3.cell_to_boundary(h3.int_to_str(cell)), dtype=np.float64)
        lon = np.degrees(np.unwrap(np.radians(latlng[:, 1])))
        lat = latlng[:, 0]
        winding = (lon[-1] - lon[0]) + ((lon[0] - lon[-1] + 180) % 360 - 180)
        if abs(winding) > 180:  # the ring goes round a pole: close it along that pole's edge
            pole = 90.0 if lat.mean() > 0 else -90.0
            end = lon[0] + winding
            lon = np.concatenate([lon, [end, end, lon[0]]])
            lat = np.concatenate([lat, [lat[0], pole, pole]])
        rings.append(np.column_stack([lon, lat]))
    return rings


COAST_STEP = 12  # mask pixels (1/120 degree) per side of a coastline-grid cell: 0.1 degree


def coastline_grid() -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.uint8]]:
    """Land fraction on a 0.1-degree grid, from the ``global-land-mask`` package (PyPI).

    That package ships the GLOBE land/ocean grid (1/120 degree) inside its wheel: the land
    mask the builder's land flags use, so the coastlines drawn are the ones the atlas's
    ``land_only`` means; nothing is fetched at run time. Decoding the whole mask takes a few
    seconds and ~1 GB, so the reduced grid (6.5 MB) is cached under ``$HEXATLAS_CACHE``.

    Returns
    -------
    lon : float64 (3600,), lat : float64 (1800,)
        Grid-cell centres, degrees; ``lat`` runs north to south.
    count : uint8 (1800, 3600)
        Land pixels among the 144 of each grid cell.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("global-land-mask")
    except PackageNotFoundError:
        raise MissingDependencyError("coastlines on hexatlas map come from global-land-mask: "
                                     "pip install 'hexatlas[serve]'") from None
    import os

    from catalog.tables import atomic_path

    cache = Path(os.environ.get("HEXATLAS_CACHE") or Path.home() / ".cache" / "hexatlas")
    path = cache / f"coast-global-land-mask-{release}-{COAST_STEP}-land.npy"
    if path.is_file():
        count = np.load(path)
    else:
        from global_land_mask import globe

        ocean = globe._mask  # (21600, 43200) bool, True at sea, row 0 at 90 N; the package's only copy
        rows, cols = ocean.shape[0] // COAST_STEP, ocean.shape[1] // COAST_STEP
        count = np.empty((rows, cols), dtype=np.uint8)
        for start in range(0, rows, 100):  # a band at a time: no full-size temporary
            band = ocean[start * COAST_STEP:(start + 100) * COAST_STEP]
            sea = band.reshape(-1, COAST_STEP, cols, COAST_STEP).sum(axis=(1, 3), dtype=np.uint8)
            count[start:start + 100] = COAST_STEP * COAST_STEP - sea
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, count)
    step = COAST_STEP / 120.0
    lon = -180.0 + step * (np.arange(count.shape[1]) + 0.5)
    lat = 90.0 - step * (np.arange(count.shape[0]) + 0.5)
    return lon, lat, count


PNG_PIXELS_PER_CELL = 40  # the default budget of a PNG: a cell every ~6 x 6 pixels


def render_png(atlas: Any, output: str | Path, *, res: int | None = None, model: str | None = None,
               bbox: Any = None, width_px: int = 1800, coastlines: bool = True) -> Path:
    """Draw a view as a map (plate carree) to a PNG, with a title, legend and coastlines
    (:func:`coastline_grid`): the globe, or ``bbox`` (min_lon, min_lat, max_lon, max_lat), at
    the finest level that fits a cell every few pixels (see :func:`map_view`), or at ``res``.

    Returns the path written. Needs matplotlib (``pip install 'hexatlas[serve]'``).
    """
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise InvalidArgumentError(f"output {str(output)!r} must end in .png")
    if not isinstance(width_px, int) or not 100 <= width_px <= 20_000:
        raise InvalidArgumentError(f"width must be 100 to 20,000 pixels, got {width_px!r}")
    box = WORLD if bbox is None else check_view(bbox)
    budget = max(1000, min(MAX_MAP_CELLS, width_px * round(width_px * _aspect(box)) // PNG_PIXELS_PER_CELL))
    layer = map_view(atlas, box, max_cells=MAX_MAP_CELLS if res is not None else budget, res=res, model=model)
    provenance = atlas._manifest(layer.model)["provenance"]
    how = {"held": "", "overview": f", means of resolution {layer.from_res}",
           "averaged": f", means of resolution {layer.from_res}"}[layer.source]
    title = f"{provenance['model']} embeddings, H3 resolution {layer.res} ({len(layer.cells):,} cells{how})"
    return render_layer(layer, output, title=title, width_px=width_px, coastlines=coastlines)


def _aspect(box: tuple[float, float, float, float]) -> float:
    """Height over width of a plate carree map of ``box`` (stretched by 1/cos(latitude) off the globe)."""
    w, s, e, n = box
    width = (e - w) % 360 or 360.0
    if box == WORLD:
        return 0.56
    stretch = 1 / max(np.cos(np.radians((s + n) / 2)), 0.2)
    return float(np.clip((n - s) * stretch / width, 0.25, 2.0))


def render_layer(layer: MapLayer, output: str | Path, *, title: str, width_px: int = 1800,
                 coastlines: bool = True) -> Path:
    """Draw ``layer``'s cells to a PNG (see :func:`render_png`).

    A cell that crosses the antimeridian is one unwrapped ring (its longitudes run past 180)
    drawn twice, shifted by 360 degrees, each copy clipped by the map's edge: each half
    appears once on its side, and no polygon spans the map.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import PolyCollection
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise MissingDependencyError("hexatlas map needs matplotlib: pip install 'hexatlas[serve]'") from exc
    from catalog.tables import atomic_path

    output = Path(output)
    w, south, e, north = layer.bbox
    x0, x1 = w, e if w <= e else e + 360.0  # a view across the antimeridian runs on past 180
    rings = _boundary_rings(layer.cells)
    colours = layer.rgb / 255.0
    polys, faces = [], []
    for ring, colour in zip(rings, colours):
        for shift in (-360.0, 0.0, 360.0):  # copies cover cells that cross the antimeridian
            lon = ring[:, 0] + shift
            if lon.max() > x0 and lon.min() < x1:
                polys.append(np.column_stack([lon, ring[:, 1]]))
                faces.append(colour)
    dpi = 150
    fig, ax = plt.subplots(figsize=(width_px / dpi, width_px / dpi * _aspect(layer.bbox)), dpi=dpi)
    ax.add_collection(PolyCollection(polys, facecolors=faces, edgecolors=faces, linewidths=0.15))
    if coastlines:
        lon, lat, count = coastline_grid()
        for shift in (0.0, 360.0) if x1 > 180 else (0.0,):
            ax.contour(lon + shift, lat, count, levels=[COAST_STEP * COAST_STEP / 2], colors="white",
                       linewidths=0.5, alpha=0.8)
    ax.set_xlim(x0, x1)
    ax.set_ylim(south, north)
    ax.set_aspect("equal" if layer.bbox == WORLD else 1 / max(np.cos(np.radians((south + north) / 2)), 0.2))
    ax.set_xlabel("longitude (degrees)")
    ax.set_ylabel("latitude (degrees)")
    import textwrap

    ax.set_title(textwrap.fill(title, max(30, width_px // 9)), fontsize=10 if width_px >= 900 else 8)
    names = ("red", "green", "blue")
    handles = [Patch(color=c, label=f"{n}: principal component {i + 1} ({layer.explained[i]:.1%} of variance)"
                     if layer.explained[i] >= 1e-6 else f"{n}: unused (no variance in a component {i + 1})")
               for i, (n, c) in enumerate(zip(names, ("#d62728", "#2ca02c", "#1f77b4")))]
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return output


def configure_map(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("atlas", help="atlas directory (or one dataset directory)")
    parser.add_argument("--res", type=int, default=None,
                        help="H3 resolution (default: the finest whose cells in view fit the picture)")
    parser.add_argument("--model", default=None, help="dataset, when the atlas holds several models")
    parser.add_argument("--bbox", default=None, metavar="MINLON,MINLAT,MAXLON,MAXLAT",
                        help="draw this region (MINLON > MAXLON crosses the antimeridian; default: the globe)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1800, help="image width in pixels (default 1800)")


def run_map(args: argparse.Namespace) -> int:
    import query

    bbox = None
    if args.bbox is not None:
        try:
            bbox = tuple(float(v) for v in args.bbox.split(","))
        except ValueError:
            raise InvalidArgumentError(f"--bbox {args.bbox!r}: give four numbers MINLON,MINLAT,MAXLON,MAXLAT") from None
    path = render_png(query.open(args.atlas), args.output, res=args.res, model=args.model, bbox=bbox,
                      width_px=args.width)
    print(f"wrote {path}")
    return 0
