"""Pictures of an atlas: cells coloured by the principal components of their embeddings.

Shared by the map page (:mod:`query.server` sends the colours) and ``hexatlas map`` (a static
PNG drawn with matplotlib). The colouring follows SatCLIP's own figure: the first three
principal components of one resolution's embeddings, each stretched between its 2nd and 98th
percentile, become red, green and blue.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from catalog.errors import InvalidArgumentError, MissingDependencyError

__all__ = ["MapLayer", "coastline_grid", "configure_map", "map_layer", "principal_colors", "render_layer", "render_png",
           "run_map"]

# A map of more cells than this is refused: the page would ship tens of MB and the PNG
# would take minutes to draw. Resolution 4 of a full globe (288,122 cells) fits.
MAX_MAP_CELLS = 300_000


@dataclass(frozen=True)
class MapLayer:
    """One resolution's cells and their colours.

    ``cells`` uint64 (n,); ``rgb`` uint8 (n, 3); ``explained`` the fraction of the
    embeddings' variance each of the three components carries.
    """

    model: str
    res: int
    cells: NDArray[np.uint64]
    rgb: NDArray[np.uint8]
    explained: tuple[float, float, float]


def principal_colors(vectors: NDArray[np.floating]) -> tuple[NDArray[np.uint8], tuple[float, float, float]]:
    """RGB from the first three principal components of ``vectors`` (n, d).

    Each component's sign is fixed so that its largest loading is positive, which makes the
    colours reproducible across runs and machines. Returns the colours (n, 3) uint8 and the
    explained-variance fraction of each component.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise InvalidArgumentError(f"principal components need at least 2 vectors, got shape {x.shape}")
    x = x - x.mean(axis=0)
    values, vecs = np.linalg.eigh(x.T @ x)  # d x d: cheap for d = 256 or 512, any n
    order = np.argsort(values)[::-1][:3]
    values, vecs = values[order], vecs[:, order]
    vecs *= np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])])
    scores = x @ vecs
    if scores.shape[1] < 3:  # fewer than three dimensions: pad with a constant mid grey
        scores = np.pad(scores, ((0, 0), (0, 3 - scores.shape[1])))
    lo, hi = np.percentile(scores, [2, 98], axis=0)
    scaled = (scores - lo) / np.where(hi > lo, hi - lo, 1.0)
    rgb = np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    total = float(np.einsum("ij,ij->", x, x))  # all the variance, not only the top three
    explained = tuple(float(v / total) if total > 0 else 0.0 for v in np.pad(values, (0, 3 - len(values))))
    return rgb, explained  # type: ignore[return-value]


def map_layer(atlas: Any, res: int | None = None, model: str | None = None) -> MapLayer:
    """The cells of one resolution of ``atlas`` with their principal-component colours.

    Raises
    ------
    InvalidArgumentError
        The resolution holds more than ``MAX_MAP_CELLS`` cells.
    """
    name = atlas._name(model)
    res = atlas._res(res, name)
    counts = {int(r): i["cells"] for r, i in atlas._manifest(name)["resolutions"].items()}
    if counts[res] > MAX_MAP_CELLS:
        coarser = sorted(r for r, n in counts.items() if n <= MAX_MAP_CELLS)
        hint = f"; choose a coarser one: {', '.join(map(str, coarser))}" if coarser else ""
        raise InvalidArgumentError(f"resolution {res} has {counts[res]:,} cells, more than a map shows "
                                   f"({MAX_MAP_CELLS:,}){hint}")
    cells, vectors = atlas._data(name, res).scan()
    rgb, explained = principal_colors(vectors)
    return MapLayer(name, res, cells, rgb, explained)


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


def render_png(atlas: Any, output: str | Path, *, res: int | None = None, model: str | None = None,
               width_px: int = 1800, coastlines: bool = True) -> Path:
    """Draw one resolution as a world map (plate carree) to a PNG, with a title, legend and
    coastlines (:func:`coastline_grid`).

    Returns the path written. Needs matplotlib (``pip install 'hexatlas[serve]'``).
    """
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise InvalidArgumentError(f"output {str(output)!r} must end in .png")
    layer = map_layer(atlas, res, model)
    provenance = atlas._manifest(layer.model)["provenance"]
    title = f"{provenance['model']} embeddings, H3 resolution {layer.res} ({len(layer.cells):,} cells)"
    return render_layer(layer, output, title=title, width_px=width_px, coastlines=coastlines)


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
    rings = _boundary_rings(layer.cells)
    colours = layer.rgb / 255.0
    polys, faces = [], []
    for ring, colour in zip(rings, colours):
        for shift in (-360.0, 0.0, 360.0):  # copies cover cells that cross the antimeridian
            lon = ring[:, 0] + shift
            if lon.max() > -180 and lon.min() < 180:
                polys.append(np.column_stack([lon, ring[:, 1]]))
                faces.append(colour)
    dpi = 150
    fig, ax = plt.subplots(figsize=(width_px / dpi, width_px / dpi * 0.56), dpi=dpi)
    ax.add_collection(PolyCollection(polys, facecolors=faces, edgecolors=faces, linewidths=0.15))
    if coastlines:
        lon, lat, count = coastline_grid()
        ax.contour(lon, lat, count, levels=[COAST_STEP * COAST_STEP / 2], colors="white", linewidths=0.5,
                   alpha=0.8)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude (degrees)")
    ax.set_ylabel("latitude (degrees)")
    ax.set_title(title)
    names = ("red", "green", "blue")
    handles = [Patch(color=c, label=f"{n}: principal component {i + 1} ({layer.explained[i]:.0%} of variance)")
               for i, (n, c) in enumerate(zip(names, ("#d62728", "#2ca02c", "#1f77b4")))]
    ax.legend(handles=handles, loc="lower left", fontsize=7, framealpha=0.85)
    fig.tight_layout()
    with atomic_path(output) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return output


def configure_map(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("atlas", help="atlas directory (or one dataset directory)")
    parser.add_argument("--res", type=int, default=None, help="H3 resolution (default: the finest built)")
    parser.add_argument("--model", default=None, help="dataset, when the atlas holds several models")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1800, help="image width in pixels (default 1800)")


def run_map(args: argparse.Namespace) -> int:
    import query

    path = render_png(query.open(args.atlas), args.output, res=args.res, model=args.model, width_px=args.width)
    print(f"wrote {path}")
    return 0
