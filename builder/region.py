"""A build's study area (``--region``): a lon/lat box or GeoJSON polygons, and its cells.

A regional atlas keeps exactly the cells whose hexagon touches the area (h3's "overlap"
containment: the cell and the area share at least a point, edges included), at
resolutions up to :data:`MAX_REGION_RES`. Boxes may cross the antimeridian (``minlon >
maxlon``); they are split there. Box edges are followed a vertex a degree, so that h3's
polygon edges run along the parallels and meridians of the box.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import InputFileError, InvalidArgumentError

__all__ = ["MAX_REGION_CELLS", "MAX_REGION_RES", "Region", "parse_region"]

MAX_REGION_RES = 10
MAX_REGION_CELLS = 25_000_000  # per resolution: a regional atlas is meant to be small
EARTH_RADIUS_KM = 6371.0088


@dataclass(frozen=True)
class Region:
    """A study area: ``polygons`` is a list of polygons, each a list of rings (the outer ring
    first, then holes), each ring a list of (lon, lat) in degrees; ``bbox`` bounds it."""

    polygons: tuple[Any, ...]
    bbox: tuple[float, float, float, float]  # (minlon, minlat, maxlon, maxlat); minlon > maxlon across 180
    description: dict[str, Any] = field(compare=False)

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records of the region."""
        return dict(self.description)

    # ------------------------------------------------------------------ cells
    def _shapes(self) -> list[Any]:
        import h3

        return [h3.LatLngPoly(*[[(lat, lon) for lon, lat in ring] for ring in poly]) for poly in self.polygons]

    def cells(self, res: int) -> NDArray[np.uint64]:
        """The cells of resolution ``res`` whose hexagon touches the area, sorted uint64."""
        import h3

        found = [np.empty(0, np.uint64)]
        for shape in self._shapes():
            cells = h3.h3shape_to_cells_experimental(shape, int(res), contain="overlap")
            found.append(np.array([h3.str_to_int(c) for c in cells], dtype=np.uint64))
        return np.unique(np.concatenate(found))

    def estimate_cells(self, res: int) -> float:
        """About how many cells of ``res`` touch the area (by the area of its bounding box, plus
        a ring of cells along it): an upper bound used to refuse a too large build early."""
        import h3

        total = 0.0
        for lon0, lat0, lon1, lat1 in _split(self.bbox):
            a = np.radians([lon0, lat0, lon1, lat1])
            area = EARTH_RADIUS_KM ** 2 * (a[2] - a[0]) * (math.sin(a[3]) - math.sin(a[1]))
            edge = h3.average_hexagon_edge_length(int(res), unit="km")
            perimeter = 2 * EARTH_RADIUS_KM * ((a[2] - a[0]) * math.cos(min(abs(a[1]), abs(a[3]))) + (a[3] - a[1]))
            total += area / h3.average_hexagon_area(int(res), unit="km^2") + perimeter / edge + 7
        return total

    def check_size(self, res: int) -> None:
        """Refuse a resolution above :data:`MAX_REGION_RES` or one whose cells would exceed
        :data:`MAX_REGION_CELLS`, before anything is built."""
        if res > MAX_REGION_RES:
            raise InvalidArgumentError(f"a regional atlas goes up to resolution {MAX_REGION_RES}, not {res}; "
                                       "choose a coarser resolution")
        estimate = self.estimate_cells(res)
        if estimate > MAX_REGION_CELLS:
            raise InvalidArgumentError(
                f"the region {self.bbox} holds about {estimate:,.0f} cells at resolution {res}, more than the "
                f"{MAX_REGION_CELLS:,} a regional atlas may hold; choose a smaller area or a coarser resolution"
            )

    # ------------------------------------------------------------------ points
    def contains(self, lat: NDArray[np.float64], lon: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Whether points (degrees) lie in the area: inside an outer ring (edges included) and
        in none of its holes, the rings taken as straight lines in lon/lat."""
        lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        inside = np.zeros(lat.shape, bool)
        for poly in self.polygons:
            here = _in_ring(lon, lat, poly[0])
            for hole in poly[1:]:
                here &= ~_in_ring(lon, lat, hole, edges=False)
            inside |= here
        return inside

    def sample(self, n: int, rng: np.random.Generator, accept: Any = None) -> tuple[NDArray, NDArray]:
        """``n`` points uniform by area in the region (and passing ``accept(lat, lon)``); fewer
        when 200 rounds of candidates do not find them (a land-only area that is nearly all sea)."""
        boxes = _split(self.bbox)
        areas = np.array([(b[2] - b[0]) * (math.sin(math.radians(b[3])) - math.sin(math.radians(b[1])))
                          for b in boxes])
        got_lat: list[NDArray] = []
        got_lon: list[NDArray] = []
        have, tries = 0, 0
        while have < n and tries < 200:  # fewer (even none) where the area has (almost) no land
            tries += 1
            m = max(4 * (n - have), 1024)
            which = rng.choice(len(boxes), size=m, p=areas / areas.sum())
            b = np.array(boxes)[which]
            z = rng.uniform(np.sin(np.radians(b[:, 1])), np.sin(np.radians(b[:, 3])))
            lat, lon = np.degrees(np.arcsin(z)), rng.uniform(b[:, 0], b[:, 2])
            ok = self.contains(lat, lon)
            if accept is not None and ok.any():
                ok[ok] = accept(lat[ok], lon[ok])
            got_lat.append(lat[ok])
            got_lon.append(lon[ok])
            have += int(ok.sum())
        return np.concatenate(got_lat)[:n], np.concatenate(got_lon)[:n]


def _in_ring(x: NDArray, y: NDArray, ring: list[tuple[float, float]], edges: bool = True) -> NDArray[np.bool_]:
    """Even-odd point-in-polygon test (planar lon/lat); points on an edge count as inside when ``edges``."""
    pts = np.asarray(ring, np.float64)
    x0, y0 = pts[:-1, 0], pts[:-1, 1]
    x1, y1 = pts[1:, 0], pts[1:, 1]
    inside = np.zeros(x.shape, bool)
    on_edge = np.zeros(x.shape, bool)
    for a, b, c, d in zip(x0, y0, x1, y1):
        crosses = (b > y) != (d > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xcross = a + (y - b) * (c - a) / (d - b)
        inside ^= crosses & (x < xcross)
        cross = (c - a) * (y - b) - (d - b) * (x - a)
        on_edge |= (np.abs(cross) <= 1e-12 * max(1.0, abs(c - a) + abs(d - b))) & (
            (np.minimum(a, c) - 1e-12 <= x) & (x <= np.maximum(a, c) + 1e-12)
            & (np.minimum(b, d) - 1e-12 <= y) & (y <= np.maximum(b, d) + 1e-12))
    return inside | on_edge if edges else inside & ~on_edge


def _split(bbox: tuple[float, float, float, float]) -> list[tuple[float, float, float, float]]:
    """A box as boxes that do not cross the antimeridian."""
    lon0, lat0, lon1, lat1 = bbox
    if lon0 <= lon1:
        return [bbox]
    return [(lon0, lat0, 180.0, lat1), (-180.0, lat0, lon1, lat1)]


def _box_polygons(bbox: tuple[float, float, float, float]) -> list[list[list[tuple[float, float]]]]:
    """A box as polygons at most 90 degrees wide, a vertex a degree along each edge."""
    polys = []
    for lon0, lat0, lon1, lat1 in _split(bbox):
        cuts = np.linspace(lon0, lon1, max(1, math.ceil((lon1 - lon0) / 90)) + 1)
        for left, right in zip(cuts[:-1], cuts[1:]):
            nx = max(2, math.ceil(right - left) + 1)
            ny = max(2, math.ceil(lat1 - lat0) + 1)
            xs, ys = np.linspace(left, right, nx), np.linspace(lat0, lat1, ny)
            ring = ([(x, lat0) for x in xs] + [(right, y) for y in ys[1:]] + [(x, lat1) for x in xs[::-1][1:]]
                    + [(left, y) for y in ys[::-1][1:]])
            polys.append([[(float(a), float(b)) for a, b in ring]])
    return polys


def _parse_box(values: Any, given: Any) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)):
        raise InvalidArgumentError(f"a region box is MINLON,MINLAT,MAXLON,MAXLAT in degrees, got {given!r}")
    lon0, lat0, lon1, lat1 = box
    if not (-180 <= lon0 <= 180 and -180 <= lon1 <= 180 and -90 <= lat0 < lat1 <= 90) or lon0 == lon1:
        raise InvalidArgumentError(
            f"region box {given!r}: longitudes must be in [-180, 180] and differ (MINLON > MAXLON crosses the "
            "antimeridian), latitudes in [-90, 90] with MINLAT < MAXLAT"
        )
    return box  # type: ignore[return-value]


def _geometry_polygons(geometry: Any, where: str) -> list[Any]:
    """The polygons of a GeoJSON Polygon, MultiPolygon, Feature or FeatureCollection."""
    if not isinstance(geometry, dict) or "type" not in geometry:
        raise InputFileError(f"{where}: not a GeoJSON object (no 'type')")
    kind = geometry["type"]
    if kind == "FeatureCollection":
        return [p for f in geometry.get("features") or [] for p in _geometry_polygons(f, where)]
    if kind == "Feature":
        return _geometry_polygons(geometry.get("geometry"), where)
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] for p in _geometry_polygons(g, where)]
    if kind not in ("Polygon", "MultiPolygon"):
        raise InputFileError(f"{where}: a region must be polygons (Polygon, MultiPolygon, or features of them), "
                             f"got a {kind}")
    polys = [geometry.get("coordinates")] if kind == "Polygon" else list(geometry.get("coordinates") or [])
    out = []
    for poly in polys:
        try:
            rings = [[(float(p[0]), float(p[1])) for p in ring] for ring in poly]
        except (TypeError, ValueError, IndexError):
            raise InputFileError(f"{where}: polygon coordinates must be rings of [lon, lat] pairs") from None
        for ring in rings:
            if len(ring) < 4 or any(not (-180 <= x <= 180 and -90 <= y <= 90) for x, y in ring):
                raise InputFileError(f"{where}: each ring needs 4+ [lon, lat] positions in degrees (lon in "
                                     "[-180, 180], lat in [-90, 90])")
            if ring[0] != ring[-1]:
                ring.append(ring[0])
        out.append(rings)
    return out


def parse_region(spec: Any) -> Region:
    """A region from ``"MINLON,MINLAT,MAXLON,MAXLAT"``, a 4-sequence, a ``.geojson``/``.json``
    path, or a GeoJSON dict (Polygon, MultiPolygon, Feature, FeatureCollection).

    Raises
    ------
    InvalidArgumentError
        A malformed or empty box.
    InputFileError
        A missing or unreadable GeoJSON file, or one without polygons.
    """
    if isinstance(spec, Region):
        return spec
    if isinstance(spec, (list, tuple)):
        box = _parse_box(spec, spec)
        return Region(tuple(_box_polygons(box)), box, {"bbox": list(box)})
    if isinstance(spec, dict):
        polys = _geometry_polygons(spec, "region")
        text = json.dumps(spec, sort_keys=True)
        return _from_polygons(polys, {"geojson": spec, "sha256": hashlib.sha256(text.encode()).hexdigest()}, "region")
    text = str(spec).strip()
    if text.lower().endswith((".geojson", ".json")) or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise InputFileError(f"region file {text!r} does not exist")
        raw = path.read_bytes()
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InputFileError(f"cannot read region file {text!r} as GeoJSON: {exc}") from None
        polys = _geometry_polygons(data, f"region file {text!r}")
        return _from_polygons(polys, {"geojson": data, "file": path.name, "sha256": hashlib.sha256(raw).hexdigest()},
                              f"region file {text!r}")
    return parse_region(_parse_box(text.split(","), text))


def _from_polygons(polys: list[Any], description: dict[str, Any], where: str) -> Region:
    if not polys:
        raise InputFileError(f"{where} holds no polygon")
    pts = np.array([p for poly in polys for p in poly[0]])
    box = (float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max()))
    if box[1] == box[3] or box[0] == box[2]:
        raise InputFileError(f"{where}: the polygons have no area")
    return Region(tuple(polys), box, {**description, "bbox": list(box)})
