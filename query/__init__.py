"""The torch-free query layer over built atlases (lookups, SQL joins, similar places).

Its public API is added with the query-layer issue; it never imports torch or ``builder``.
"""

from __future__ import annotations

__all__: list[str] = []
