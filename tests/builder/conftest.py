"""Fixtures shared by the builder's tests."""

from __future__ import annotations

import pytest

from tests.data.recall import few_recall_queries as _few


@pytest.fixture
def few_recall_queries(monkeypatch):
    """Index builds measured on few queries (:func:`tests.data.recall.few_recall_queries`)."""
    _few(monkeypatch)
