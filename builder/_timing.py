"""Seconds per stage and progress bars, shared by the build's stages."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["Timer", "progress_bar", "timed"]


class Timer:
    """Seconds per stage, from any thread; a stage nested in another (in the same thread) is
    taken out of the outer one's time, so that each second counts once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        nested = self._local.__dict__.setdefault("nested", [])  # per open stage: seconds in inner stages
        nested.append(0.0)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = nested.pop()
            if nested:
                nested[-1] += elapsed
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed - inner


def progress_bar(progress: bool | None, total: int, desc: str) -> Any:
    """A progress bar of cells (cells/s, ETA); ``progress`` None: only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="cell", desc=desc, disable=not progress if progress is not None else None,
                smoothing=0.1)


def timed(timer: Timer, stage: str, fn: Any, *args: Any) -> Any:
    with timer(stage):
        return fn(*args)


