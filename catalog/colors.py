"""One colouring per dataset: a principal-component basis, and coarse overview levels made with it.

A map shows each cell's embedding as a colour: its first three principal components, each
stretched between its 2nd and 98th percentile, as red, green and blue (SatCLIP's own figure).
The basis (the mean, the three components and their ranges) is fitted once per dataset, on a
seeded sample of its finest resolution's stored embeddings, and recorded in the manifest
(``"colors"``), so that every resolution, every part of the globe and every zoom level is
coloured alike.

A fine atlas (resolution 7 has 98.8M cells on the globe) cannot be drawn whole, so the build
also stores coarser **overview levels**: each cell of a level is coloured by the mean of the
principal-component scores of its descendants at the finest resolution (the projection is
linear, so this is the colour of their mean embedding). They are computed by streaming the
finest resolution's parts once, in cell order (a parent's children are one run of it), and
stored small: ``overview/res=<r>.npy``, 11 bytes a cell (the cell id and three bytes of
colour), listed in the manifest with their sha256 (``"overview"``).

Only numpy here: the builder stores the basis and the levels, the query layer reads them (or,
for an atlas built before them, computes the same with these functions and caches them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from catalog.cells import cells_to_parent
from catalog.errors import InvalidArgumentError
from catalog.tables import dequantize

if TYPE_CHECKING:
    from catalog.blocks import ResolutionReader

__all__ = ["OVERVIEW_DTYPE", "OVERVIEW_MAX_CELLS", "SAMPLE_BLOCKS", "SAMPLE_CELLS", "apply_basis", "fit_basis",
           "overview_levels", "planned_levels", "sample_vectors", "scores", "to_rgb"]

SAMPLE_CELLS = 16_384  # embeddings the basis is fitted on
SAMPLE_BLOCKS = 256  # ... taken from this many blocks spread over the resolution (a block is one place)
SAMPLE_SEED = 0
MIN_SHARE = 1e-6  # of the variance: a component with less is left out (black), not stretched
# An overview level is stored only up to this many cells (23 MB): resolution 5 of the globe
# (2,016,842) fits, resolution 6 (14M) does not; the map reads a finer level in place instead.
OVERVIEW_MAX_CELLS = 2_100_000
OVERVIEW_DTYPE = np.dtype([("cell", "<u8"), ("rgb", "u1", (3,))])  # 11 bytes a cell, packed


def _short(value: float) -> float:
    return float(f"{value:.8g}")  # ~float32 precision: the manifest stays small (a 512-d basis ~ 40 KB)


def fit_basis(vectors: NDArray[np.floating], *, res: int | None = None) -> dict[str, Any]:
    """The colour basis of ``vectors`` (n, dim), float: as the manifest's ``"colors"`` records it.

    ``mean`` (dim,), ``components`` (3, dim; unit rows, the first three principal axes, each
    signed so that its largest loading is positive, which makes colours reproducible; rows of
    zeros when dim < 3), ``low`` and ``high`` (3,: the 2nd and 98th percentile of each
    component's score over ``vectors``), ``explained`` (3,: each component's share of the
    variance), ``sample`` (how many vectors, and from which resolution). Numbers are rounded to
    8 significant digits; colours are always computed from the rounded basis.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2 or not np.isfinite(x).all():
        raise InvalidArgumentError(f"principal components need at least 2 finite vectors, got shape {x.shape}")
    mean = x.mean(axis=0)
    centred = x - mean
    values, vecs = np.linalg.eigh(centred.T @ centred)  # d x d: cheap for d = 256 or 512, any n
    order = np.argsort(values)[::-1][:3]
    values, vecs = values[order], vecs[:, order]
    vecs *= np.sign(vecs[np.abs(vecs).argmax(axis=0), np.arange(vecs.shape[1])])
    total = float(np.einsum("ij,ij->", centred, centred))  # all the variance, not only the top three
    explained = [float(v / total) if total > 0 else 0.0 for v in np.pad(values, (0, 3 - len(values)))]
    components = np.zeros((3, x.shape[1]))
    components[: vecs.shape[1]] = vecs.T
    # a component with next to no variance (an encoder of rank < 3) is rounding noise: dark, not speckled
    components[[share < MIN_SHARE for share in explained]] = 0.0
    basis = {"method": "pca3", "mean": [_short(v) for v in mean],
             "components": [[_short(v) for v in row] for row in components],
             "low": [0.0] * 3, "high": [0.0] * 3, "explained": [_short(max(v, 0.0)) for v in explained],
             "sample": {"cells": len(x), **({"res": int(res)} if res is not None else {})}}
    lo, hi = np.percentile(scores(x.astype(np.float32), basis), [2, 98], axis=0)
    basis["low"], basis["high"] = [_short(v) for v in lo], [_short(v) for v in hi]
    return basis


def scores(vectors: NDArray[np.floating], basis: dict[str, Any]) -> NDArray[np.float32]:
    """(n, 3) float32 principal-component scores of ``vectors`` (n, dim) in ``basis``."""
    components = np.asarray(basis["components"], np.float32)
    # centred first: a small spread around a large mean keeps its float32 digits
    return (np.asarray(vectors, np.float32) - np.asarray(basis["mean"], np.float32)) @ components.T


def to_rgb(values: NDArray[np.floating], basis: dict[str, Any]) -> NDArray[np.uint8]:
    """(n, 3) uint8 colours of scores (n, 3): each stretched from ``low`` (0) to ``high`` (255)."""
    lo, hi = np.asarray(basis["low"], np.float64), np.asarray(basis["high"], np.float64)
    scaled = (np.asarray(values, np.float64) - lo) / np.where(hi > lo, hi - lo, 1.0)
    return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def apply_basis(vectors: NDArray[np.floating], basis: dict[str, Any]) -> NDArray[np.uint8]:
    """(n, 3) uint8 colours of ``vectors`` (n, dim)."""
    return to_rgb(scores(vectors, basis), basis)


def _decoded(stored: NDArray[Any], quantization: dict[str, Any] | None) -> NDArray[np.float32]:
    if quantization is None:
        return stored.astype(np.float32)
    return dequantize(stored, np.asarray(quantization["scale"], np.float32),
                      np.asarray(quantization["offset"], np.float32))


def sample_vectors(reader: ResolutionReader, quantization: dict[str, Any] | None = None, *,
                   cells: int = SAMPLE_CELLS, blocks: int = SAMPLE_BLOCKS,
                   seed: int = SAMPLE_SEED) -> NDArray[np.float32]:
    """A seeded sample of a resolution's embeddings (float32, (m, dim), m <= ``cells``), read in
    place: ``blocks`` blocks drawn at random over all the parts (cells are in H3 order, so
    a block is one neighbourhood and the blocks spread over the area), rows drawn in each."""
    from catalog.blocks import STORED_DTYPES, block_rows

    rng = np.random.default_rng(seed)
    size = block_rows(reader.dim, next(k for k, v in STORED_DTYPES.items() if v == reader.dtype))
    counts = np.array([-(-p.rows // size) for p in reader.infos], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.empty((0, reader.dim), np.float32)
    every = total <= blocks  # a small resolution: all of its blocks, then the rows drawn among them all
    chosen = np.arange(total) if every else np.sort(rng.choice(total, size=blocks, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    per_block = -(-cells // len(chosen))
    out = []
    for flat in chosen.tolist():
        p = int(np.searchsorted(starts, flat, side="right") - 1)
        _, stored = reader.part(p).block(flat - int(starts[p]))
        rows = np.arange(len(stored)) if every else rng.choice(len(stored), size=min(per_block, len(stored)),
                                                                replace=False)
        out.append(_decoded(stored[np.sort(rows)], quantization))
    sample = np.concatenate(out)
    if every and len(sample) > cells:
        sample = sample[np.sort(rng.choice(len(sample), size=cells, replace=False))]
    return sample[:cells]


def planned_levels(finest: int, cells: int, held: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """The overview levels a dataset whose finest resolution ``finest`` holds ``cells`` cells
    stores: every coarser level it does not hold whose cells cannot exceed
    :data:`OVERVIEW_MAX_CELLS` (at most the level's H3 count, and at most ``cells``)."""
    return [r for r in range(finest) if r not in held and min(2 + 120 * 7 ** r, cells) <= OVERVIEW_MAX_CELLS]


class _Means:
    """Sums and counts of scores per parent cell at one level, fed cells in ascending order."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.cells: list[NDArray[np.uint64]] = []
        self.sums: list[NDArray[np.float64]] = []
        self.counts: list[NDArray[np.int64]] = []

    def add(self, cells: NDArray[np.uint64], values: NDArray[np.float32]) -> None:
        parents = cells_to_parent(cells, self.level)  # sorted, as the cells are
        starts = np.flatnonzero(np.concatenate([[True], parents[1:] != parents[:-1]]))
        self.cells.append(parents[starts])
        self.sums.append(np.add.reduceat(values.astype(np.float64), starts, axis=0))
        self.counts.append(np.diff(np.append(starts, len(parents))))

    def result(self, basis: dict[str, Any]) -> NDArray[Any]:
        if not self.cells:
            return np.empty(0, OVERVIEW_DTYPE)
        cells, sums, counts = (np.concatenate(x) for x in (self.cells, self.sums, self.counts))
        # a parent whose children span two runs (blocks, parts) appears twice, side by side
        starts = np.flatnonzero(np.concatenate([[True], cells[1:] != cells[:-1]]))
        sums, counts = np.add.reduceat(sums, starts, axis=0), np.add.reduceat(counts, starts)
        out = np.empty(len(starts), OVERVIEW_DTYPE)
        out["cell"] = cells[starts]
        out["rgb"] = to_rgb(sums / counts[:, None], basis)
        return out


def overview_levels(reader: ResolutionReader, basis: dict[str, Any], levels: list[int],
                    quantization: dict[str, Any] | None = None,
                    progress: Callable[[int], Any] | None = None) -> dict[int, NDArray[Any]]:
    """Each of ``levels`` (coarser than the reader's resolution) as an :data:`OVERVIEW_DTYPE`
    array, sorted by cell: every cell with a descendant in the resolution, coloured by the mean
    score of those descendants. One pass over the parts, block by block (each checked against
    its CRC); memory is the levels' cells plus one block. ``progress(rows)`` after each block."""
    means = [_Means(level) for level in levels]
    if not means:
        return {}
    for p in range(len(reader.infos)):
        part = reader.part(p)
        for b in range(len(part.blocks)):
            cells, stored = part.block(b)
            values = scores(_decoded(stored, quantization), basis)
            for m in means:
                m.add(cells, values)
            if progress is not None:
                progress(len(cells))
    return {m.level: m.result(basis) for m in means}
