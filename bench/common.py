"""Timing helpers shared by the benchmark sections: medians of repeated runs, machine facts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable


def median_seconds(
    fn: Callable[[], object], *, repeats: int = 21, warmup: int = 3, min_time: float = 0.0
) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs.

    With `min_time`, each timed sample loops `fn` until at least that many seconds pass
    and reports the per-call time, so microsecond calls are not timer-bound.
    """
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        calls = 0
        start = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        samples.append(elapsed / calls)
    return statistics.median(samples)


def format_seconds(seconds: float | None) -> str:
    """Human units: us below 1 ms, ms below 1 s."""
    if seconds is None:
        return "n/a"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def machine() -> str:
    """One line naming the machine the numbers came from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
