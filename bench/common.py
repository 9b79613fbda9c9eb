"""Timing helpers shared by the benchmark sections: medians of repeated and interleaved runs,
machine facts, the load others put on the machine while a section runs, and a CPU burner for
the loaded variant of a run (`bench/run.py --loaded`).

`HESSIAN_BENCH_QUICK=1` cuts repetitions and sizes to a smoke run of a few seconds per
section: it proves the code and the computed verdicts, not the numbers.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

QUICK = os.environ.get("HESSIAN_BENCH_QUICK", "") == "1"
LOAD_MOVE_LIMIT = 1.0
VARIANT = ""  # "_loaded" while bench/run.py --loaded runs: names files a section writes


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


def quick(full, reduced):
    """`reduced` in a HESSIAN_BENCH_QUICK=1 smoke run, else `full`."""
    return reduced if QUICK else full


def interleaved_medians(
    calls: dict[str, Callable[[], object]], *, rounds: int, min_time: float = 0.0, warmup: int = 1
) -> dict[str, float]:
    """Per-call median seconds, every call timed once per round, the order reversed every
    other round, so load drift and order effects hit the compared calls alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(
                median_seconds(calls[name], repeats=1, warmup=0, min_time=min_time)
            )
    return {name: statistics.median(v) for name, v in samples.items()}


def rounds_for(calls: dict[str, Callable[[], object]], budget: float, most: int = 15) -> int:
    """How many interleaved rounds fit `budget` seconds, from one timed call of each (>= 3)."""
    once = 0.0
    for fn in calls.values():
        start = time.perf_counter()
        fn()
        once += time.perf_counter() - start
    return max(3, min(quick(most, 3), int(budget / max(once, 1e-9))))


def _proc_stat(pid: str) -> tuple[str, int] | None:
    """(state, parent pid) of a process or thread, from /proc; None once it is gone."""
    try:
        text = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


BURNER_MARK = "hessian-bench-burner"


def _own_running(root: int) -> int:
    """Running threads of process `root` and its descendants, burners excluded."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (stat := _proc_stat(entry.name)) is not None:
            parents[int(entry.name)] = stat[1]
    own, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, ppid in parents.items():
            if ppid == parent and pid not in own:
                with contextlib.suppress(OSError):
                    if BURNER_MARK in pathlib.Path(f"/proc/{pid}/cmdline").read_text():
                        continue
                own.add(pid)
                frontier.append(pid)
    running = 0
    for pid in own:
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{pid}/task"):
                stat = _proc_stat(f"{pid}/task/{task.name}")
                running += stat is not None and stat[0] == "R"
    return running


def _sample_others_load(root: int, path: pathlib.Path, period: float, tau: float) -> None:
    """The sampler process's loop: write the others' load average to `path` every period."""
    value, decay = os.getloadavg()[0], math.exp(-period / tau)
    while os.getppid() == root:
        with open("/proc/stat") as f:
            total = next(int(line.split()[1]) for line in f if line.startswith("procs_running"))
        value = decay * value + (1 - decay) * max(0, total - _own_running(root))
        path.with_suffix(".tmp").write_text(f"{value}")
        path.with_suffix(".tmp").replace(path)
        time.sleep(period)


class OthersLoad:
    """The machine's load without this benchmark: runnable tasks (procs_running) minus the
    running threads of this process and its children (the sampler included, burners not),
    averaged like the kernel's 1-minute load average (exponential, tau = 60 s) from samples
    every 0.25 s, in a separate process so sampling takes no GIL from the timed code.

    The kernel's own figure counts the benchmark's threads, so it rises by about the thread
    count during any section; this one moves only when other work (or a burner) does.
    """

    TAU = 60.0
    PERIOD = 0.25

    def __init__(self) -> None:
        self.path = pathlib.Path(tempfile.mkdtemp(prefix="bench-load-")) / "others"
        self.path.write_text(f"{os.getloadavg()[0]}")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--others-load", str(os.getpid()), str(self.path)]
        )

    @property
    def value(self) -> float:
        """The current others' load average."""
        return float(self.path.read_text())

    def close(self) -> None:
        """Stop sampling and remove the sampler's file."""
        self.proc.kill()
        self.proc.wait(30)
        shutil.rmtree(self.path.parent, ignore_errors=True)


def load_line(before: float, after: float, kernel: tuple[float, float]) -> str:
    """The section's load report, and the warning when other load moved by more than 1."""
    moved = abs(after - before)
    text = (
        f"Load from other processes (1-minute average, this benchmark's own threads excluded): "
        f"{before:.2f} before the section, {after:.2f} after (kernel load average, ours "
        f"included: {kernel[0]:.2f} -> {kernel[1]:.2f})."
    )
    if moved > LOAD_MOVE_LIMIT:
        text += (
            f" **Unreliable**: the load from other processes moved by {moved:.2f} (> "
            f"{LOAD_MOVE_LIMIT:g}) during this section."
        )
    return text


class CpuBurner:
    """One busy-looping subprocess per core: the loaded variant of a run (`--loaded`)."""

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or os.cpu_count() or 1
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        """Start spinning on every core."""
        self.procs = [
            subprocess.Popen([sys.executable, "-c", "while True: pass", BURNER_MARK])
            for _ in range(self.processes)
        ]

    def stop(self) -> None:
        """Kill the burners and reap them."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait(30)
        self.procs = []

    @contextlib.contextmanager
    def running(self, load: OthersLoad | None = None, settle_s: float = 0.0) -> Iterator[None]:
        """Burn around a block; with `load`, first wait (up to `settle_s`) until the others'
        load average has risen by the burner count less 0.5 (the average lags by a minute)."""
        baseline = load.value if load is not None else 0.0
        self.start()
        try:
            deadline = time.monotonic() + settle_s
            while load is not None and time.monotonic() < deadline:
                if load.value >= baseline + self.processes - 0.5:
                    break
                time.sleep(1.0)
            yield
        finally:
            self.stop()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--others-load":
        _sample_others_load(
            int(sys.argv[2]), pathlib.Path(sys.argv[3]), OthersLoad.PERIOD, OthersLoad.TAU
        )
