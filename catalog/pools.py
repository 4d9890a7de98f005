"""Thread pools shared by a process's remote reads (range requests wait on the network, so
threads overlap them). Each is made once: a pool made per call starts its threads every time,
which measured a quarter of a warm remote search's time (``benchmarks/remote_search.py``)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["map_in_pool"]

T = TypeVar("T")
R = TypeVar("R")
_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def map_in_pool(name: str, workers: int, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]``, run in the process's pool ``name`` (``workers`` threads, made
    on first use). ``fn`` must not wait on the same pool: its threads could all be waiting."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with _LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = _POOLS[name] = ThreadPoolExecutor(workers, thread_name_prefix=name)
    return list(pool.map(fn, items))
