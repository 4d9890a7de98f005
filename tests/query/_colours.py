"""Map colours computed independently of the map code: from an atlas's embeddings (read by SQL)
and its manifest's basis, with plain numpy and h3-py, for the map tests."""

from __future__ import annotations

from pathlib import Path

import h3
import numpy as np

import query
from catalog.manifest import read_manifest


def reference(atlas_dir: Path, model: str = "toy", res: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Every cell of ``res`` (uint64, sorted), its embedding, its scores in the manifest's basis, the basis."""
    atlas = query.open(atlas_dir)
    table = atlas.sql(f"SELECT cell, embedding FROM embeddings WHERE res = {res} ORDER BY cell")
    cells = table.column("cell").to_numpy()
    emb = np.array(table.column("embedding").to_pylist(), dtype=np.float64)
    basis = read_manifest(atlas_dir / model)["colors"]
    scores = (emb - np.asarray(basis["mean"])) @ np.asarray(basis["components"]).T
    return cells, emb, scores, basis


def rgb(scores: np.ndarray, basis: dict) -> np.ndarray:
    """Scores stretched from the basis's low (0) to its high (255), as int."""
    lo, hi = np.asarray(basis["low"]), np.asarray(basis["high"])
    return np.round(np.clip((scores - lo) / np.where(hi > lo, hi - lo, 1.0), 0, 1) * 255).astype(int)


def held_colours(ref) -> dict[int, np.ndarray]:
    cells, _, scores, basis = ref
    return dict(zip(cells.tolist(), rgb(scores, basis)))


def level_colours(ref, level: int) -> dict[int, np.ndarray]:
    """Each cell of ``level`` with a descendant: the colour of its descendants' mean score."""
    cells, _, scores, basis = ref
    parents = np.array([h3.str_to_int(h3.cell_to_parent(h3.int_to_str(int(c)), level)) for c in cells], np.uint64)
    order = np.argsort(parents, kind="stable")
    parents, scores = parents[order], scores[order]
    starts = np.flatnonzero(np.concatenate([[True], parents[1:] != parents[:-1]]))
    means = np.add.reduceat(scores, starts, axis=0) / np.diff(np.append(starts, len(parents)))[:, None]
    return dict(zip(parents[starts].tolist(), rgb(means, basis)))
