"""Builds whose index tests can shape: an approximate index for small resolutions, and few
recall queries for tests where the index's bytes or the tuning's path are the point, not its
recall (a build's final recall passes search every query twice, most of such a test's time)."""

from __future__ import annotations

from typing import Any


def few_recall_queries(patch: Any) -> None:
    """Through ``patch`` (a ``pytest.MonkeyPatch``): 20 uniform queries and 10 of each other
    kind, not 200 and 100."""
    from builder import index, probes

    patch.setattr(index, "RECALL_QUERIES", 20)
    patch.setattr(probes, "PER_KIND", 10)


def approximate_above(patch: Any, cells: int, dim: int) -> None:
    """Through ``patch``: resolutions of more than ``cells`` cells of ``dim`` values get an
    approximate index (IVF-PQ), not the exact one (normally up to 2^18 cells of 256)."""
    from catalog import vector_index

    patch.setattr(vector_index, "EXACT_MAX_VALUES", cells * dim)
