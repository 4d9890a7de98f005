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

__all__ = ["MapLayer", "configure_map", "map_layer", "principal_colors", "render_png", "run_map"]

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


def render_png(atlas: Any, output: str | Path, *, res: int | None = None, model: str | None = None,
               width_px: int = 1800) -> Path:
    """Draw one resolution as a world map (plate carree) to a PNG, with a title and legend.

    Returns the path written. Needs matplotlib (``pip install 'hexatlas[serve]'``).
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
    if output.suffix.lower() != ".png":
        raise InvalidArgumentError(f"output {str(output)!r} must end in .png")
    layer = map_layer(atlas, res, model)
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
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude (degrees)")
    ax.set_ylabel("latitude (degrees)")
    provenance = atlas._manifest(layer.model)["provenance"]
    ax.set_title(f"{provenance['model']} embeddings, H3 resolution {layer.res} ({len(layer.cells):,} cells)")
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
