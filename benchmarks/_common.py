"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One benchmark result: a rate compared with a baseline measured in the same run."""

    group: str
    case: str
    value: float
    unit: str
    baseline_name: str
    baseline_value: float
    target: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.baseline_value if self.baseline_value else float("nan")


def best_rate(fn: Callable[[], object], items: int, *, repeats: int = 3, warmup: bool = True) -> float:
    """Items per second of the fastest of ``repeats`` calls (after one warm-up call)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def p50(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import torch

        threads = f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
    except ImportError:
        threads = ""
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}{threads}"


def _num(v: float) -> str:
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| benchmark | case | result | baseline (same run) | ratio | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.group} | {r.case} | {_num(r.value)} {r.unit} | {r.baseline_name}: {_num(r.baseline_value)} {r.unit} "
            f"| {r.ratio:.2f}x | {r.target} |"
        )
    return "\n".join(lines)
