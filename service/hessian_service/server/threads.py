"""Torch intra-op thread policy: the CPUs this process may use, and each call's thread count.

torch's OpenMP threads stall at every parallel region when another process holds a core
(a 10-step Newton run went from 2.6 ms to 148 ms on 2 busy cores), and a container's CPU
quota is invisible to `os.cpu_count()`. So the server sizes torch from the affinity mask and
the cgroup quota, divides that among its run workers, and runs small problems on one thread.

Mechanism: `torch.set_num_threads` (ATen's OpenMP backend) calls `omp_set_num_threads` and
`mkl_set_num_threads_local`, which set the *calling thread's* team size, and it stores a
process default that other threads copy on their first parallel region. `limited()` therefore
sets the calling thread's count explicitly on entry of every call and restores it after, so a
concurrent call in another thread never changes this one's count.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..engine.objectives.base import Objective
from .config import ServerConfig

log = logging.getLogger("hessian_service.server")
CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
PROC_CGROUP = pathlib.Path("/proc/self/cgroup")
V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: pathlib.Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroups(proc_cgroup: pathlib.Path) -> tuple[str | None, str | None]:
    """This process's cgroup v2 path and v1 cpu-controller path (from /proc/self/cgroup)."""
    v2 = v1 = None
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: pathlib.Path, path: str | None) -> list[pathlib.Path]:
    """`base/path` and every folder above it up to `base` (a parent's quota binds too)."""
    rel = pathlib.PurePosixPath((path or "/").lstrip("/"))
    out = [base / rel]
    out += [base / p for p in rel.parents]
    return list(dict.fromkeys(out))


def _ratio(quota: str | None, period: str | None) -> float | None:
    """quota / period in CPUs; None for no limit ("max", -1) or text that is not a number."""
    try:
        q, p = int(quota or ""), int(period or "")
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def _v2_quota(folder: pathlib.Path) -> float | None:
    quota, _, period = (_read(folder / "cpu.max") or "").partition(" ")
    return _ratio(quota, period)


def _v1_quota(folder: pathlib.Path) -> float | None:
    return _ratio(_read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us"))


def cgroup_cpu_limit(
    root: pathlib.Path = CGROUP_ROOT, proc_cgroup: pathlib.Path = PROC_CGROUP
) -> float | None:
    """The tightest CPU quota (in CPUs, e.g. 1.5) on this process's cgroup v2 or v1 path, or
    None when there is none. A container sees its own cgroup at the root, so the root counts."""
    v2, v1 = _own_cgroups(proc_cgroup)
    limits = [_v2_quota(f) for f in _ancestors(root, v2)]
    for name in V1_CPU_DIRS:
        if (root / name).is_dir():
            limits += [_v1_quota(f) for f in _ancestors(root / name, v1)]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def _cpus(count: float) -> str:
    """A CPU count in words: "1 CPU", "2 CPUs", "1.5 CPUs"."""
    return f"{count:g} CPU{'' if count == 1 else 's'}"


def cpu_budget(
    affinity: set[int] | None = None,
    root: pathlib.Path = CGROUP_ROOT,
    proc_cgroup: pathlib.Path = PROC_CGROUP,
) -> tuple[int, str]:
    """(CPUs this process may run on, where that count came from in words): its affinity
    mask, capped by the cgroup quota (rounded up: a 1.5-CPU quota lets two threads run part
    of the time), at least 1."""
    mask = len(os.sched_getaffinity(0) if affinity is None else affinity)
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is None:
        return max(mask, 1), f"the affinity mask's {_cpus(mask)} (no cgroup CPU quota)"
    if math.ceil(limit) < mask:
        rounded = "" if limit == math.ceil(limit) else ", rounded up"
        origin = f"the cgroup CPU quota of {_cpus(limit)}{rounded} (affinity mask: {_cpus(mask)})"
        return max(math.ceil(limit), 1), origin
    return max(mask, 1), f"the affinity mask's {_cpus(mask)} (cgroup CPU quota: {_cpus(limit)})"


def usable_cpus(
    affinity: set[int] | None = None,
    root: pathlib.Path = CGROUP_ROOT,
    proc_cgroup: pathlib.Path = PROC_CGROUP,
) -> int:
    """CPUs this process may run on (cpu_budget's count)."""
    return cpu_budget(affinity, root, proc_cgroup)[0]


def problem_size(objective: Objective) -> int:
    """A dense Newton step's work, roughly: max(rows, params) x params^2 (assembly, solve)."""
    n = objective.num_params
    return max(objective.num_rows, n) * n * n


@dataclass(frozen=True)
class ThreadPolicy:
    """`threads` intra-op threads per call; problems smaller than `single_thread_below` get 1."""

    cpus: int
    threads: int
    single_thread_below: int
    cpus_origin: str = ""  # where `cpus` came from (cpu_budget), for the start-up log

    def threads_for(self, objective: Objective) -> int:
        """The intra-op thread count a call on `objective` runs with."""
        return 1 if problem_size(objective) < self.single_thread_below else self.threads

    @contextlib.contextmanager
    def limited(self, objective: Objective) -> Iterator[None]:
        """Run the body with this thread's torch threads set for `objective`, then restore."""
        want = self.threads_for(objective)
        before = torch.get_num_threads()  # this thread's own count (omp_get_max_threads)
        if before != want:
            torch.set_num_threads(want)
        try:
            yield
        finally:
            if before != want:
                torch.set_num_threads(before)

    def install(self) -> None:
        """Make `threads` the process default (threads that never enter `limited` use it)."""
        torch.set_num_threads(self.threads)


@functools.lru_cache(maxsize=8)
def thread_policy(config: ServerConfig) -> ThreadPolicy:
    """The policy `config` asks for: --intra-op-threads, else usable CPUs / --workers."""
    cpus, origin = cpu_budget()
    threads = config.intra_op_threads or max(1, cpus // config.workers)
    return ThreadPolicy(cpus, threads, config.single_thread_below, origin)


def install_thread_policy(config: ServerConfig) -> ThreadPolicy:
    """Apply `config`'s policy as the process default at start-up, and return it; a
    --intra-op-threads past the usable CPUs is warned about (torch's threads then stall
    whenever a core is taken)."""
    policy = thread_policy(config)
    log.info(
        "%d usable CPUs, from %s: %d torch thread%s per call, one below size %d",
        policy.cpus,
        policy.cpus_origin,
        policy.threads,
        "" if policy.threads == 1 else "s",
        policy.single_thread_below,
    )
    if config.intra_op_threads * config.workers > policy.cpus:
        log.warning(
            "--intra-op-threads %d x --workers %d is more than the %d usable CPUs: torch's "
            "threads will wait for each other (0 divides the CPUs among the workers)",
            config.intra_op_threads,
            config.workers,
            policy.cpus,
        )
    policy.install()
    return policy
