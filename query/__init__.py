"""The torch-free query layer: open an atlas, look embeddings up, join, search, SQL.

Needs duckdb, pyarrow, numpy, h3 and (for similar-place search) faiss; never imports torch
or ``builder``.
"""

from __future__ import annotations

from query.atlas import Atlas, open_atlas
from query.sql import QueryError

open = open_atlas  # the documented entry point is query.open(path); shadows the builtin on purpose

__all__ = ["Atlas", "QueryError", "open", "open_atlas"]
