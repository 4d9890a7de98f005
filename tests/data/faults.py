"""Faults injected into a build, for the tests of what survives them."""

from __future__ import annotations

from collections.abc import Callable

import pytest


def crash_on_shard_write(monkeypatch: pytest.MonkeyPatch, nth: int,
                         message: str = "simulated crash") -> Callable[[], None]:
    """Make the builder's ``nth`` shard write (1-based) raise ``RuntimeError(message)``, as a
    crash of the build process would stop it there; returns the function that undoes it."""
    import builder.write as b

    real, calls = b.write_shard, {"n": 0}

    def crashing(*args):
        calls["n"] += 1
        if calls["n"] == nth:
            raise RuntimeError(message)
        return real(*args)

    monkeypatch.setattr(b, "write_shard", crashing)
    return lambda: monkeypatch.setattr(b, "write_shard", real)
