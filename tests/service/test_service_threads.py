"""The thread policy: usable CPUs from affinity and cgroup v2/v1 quotas (fake files), the
per-thread torch count a call runs with, and the values GetServerInfo and `hessian info` report."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from conftest import start_server
from hessian_client import Client
from hessian_client.cli import main
from hessian_service.engine import MethodOptions, StopCriteria, make_objective
from hessian_service.engine.objectives.rosenbrock import Rosenbrock
from hessian_service.server import ServerConfig
from hessian_service.server import threads as policy_module
from hessian_service.server.runs import RunManager
from hessian_service.server.threads import (
    ThreadPolicy,
    cgroup_cpu_limit,
    cpu_budget,
    usable_cpus,
)
from hessian_service.store import SQLiteRunStore

EIGHT = set(range(8))


def _cgroup(tmp_path, own: str, files: dict[str, str]):
    """A fake /sys/fs/cgroup tree and /proc/self/cgroup naming `own` as this process's path."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(own + "\n")
    return root, proc


def test_no_quota_leaves_the_affinity_mask(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/", {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert usable_cpus(EIGHT, root, proc) == 8
    assert usable_cpus({3, 5}, root, proc) == 2
    assert cpu_budget({3, 5}, root, proc) == (2, "the affinity mask's 2 CPUs (no cgroup CPU quota)")


def test_unreadable_quota_text_counts_as_no_quota(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/", {"cpu.max": "garbage", "cpu/cpu.cfs_quota_us": ""})
    assert cgroup_cpu_limit(root, proc) is None
    assert usable_cpus({0, 1, 2}, root, proc) == 3


def test_a_v2_quota_caps_the_affinity_rounded_up(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/", {"cpu.max": "150000 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    assert usable_cpus(EIGHT, root, proc) == 2
    assert usable_cpus({0}, root, proc) == 1  # the mask is tighter than the quota
    quota = "the cgroup CPU quota of 1.5 CPUs, rounded up (affinity mask: 8 CPUs)"
    assert cpu_budget(EIGHT, root, proc) == (2, quota)
    assert cpu_budget({0}, root, proc) == (
        1,
        "the affinity mask's 1 CPU (cgroup CPU quota: 1.5 CPUs)",
    )


def test_a_whole_quota_is_not_said_to_be_rounded_up(tmp_path):
    root, proc = _cgroup(tmp_path, "0::/", {"cpu.max": "200000 100000"})
    quota = "the cgroup CPU quota of 2 CPUs (affinity mask: 8 CPUs)"
    assert cpu_budget(EIGHT, root, proc) == (2, quota)
    one_root, one_proc = _cgroup(tmp_path / "one", "0::/", {"cpu.max": "100000 100000"})
    assert cpu_budget(EIGHT, one_root, one_proc) == (
        1,
        "the cgroup CPU quota of 1 CPU (affinity mask: 8 CPUs)",
    )


def test_the_tightest_v2_quota_on_the_own_path_and_its_parents_binds(tmp_path):
    root, proc = _cgroup(
        tmp_path,
        "0::/kubepods/pod7/container",
        {
            "cpu.max": "max 100000",
            "kubepods/cpu.max": "600000 100000",
            "kubepods/pod7/cpu.max": "300000 100000",
            "kubepods/pod7/container/cpu.max": "max 100000",
            "elsewhere/cpu.max": "100000 100000",  # another cgroup's quota does not apply
        },
    )
    assert cgroup_cpu_limit(root, proc) == pytest.approx(3.0)
    assert usable_cpus(EIGHT, root, proc) == 3


def test_a_v1_cfs_quota_caps_and_minus_one_means_none(tmp_path):
    own = "4:memory:/x\n3:cpu,cpuacct:/docker/abc"
    root, proc = _cgroup(
        tmp_path,
        own,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        },
    )
    assert cgroup_cpu_limit(root, proc) == pytest.approx(0.5)
    assert usable_cpus(EIGHT, root, proc) == 1
    unlimited_root, unlimited_proc = _cgroup(
        tmp_path / "u",
        "3:cpu,cpuacct:/",
        {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"},
    )
    assert cgroup_cpu_limit(unlimited_root, unlimited_proc) is None
    assert usable_cpus(EIGHT, unlimited_root, unlimited_proc) == 8


def test_threads_are_usable_cpus_divided_among_workers_unless_set(monkeypatch):
    monkeypatch.setattr(policy_module, "cpu_budget", lambda: (8, "a test's 8 CPUs"))
    policy_module.thread_policy.cache_clear()
    try:
        assert policy_module.thread_policy(ServerConfig(workers=3)).threads == 2
        assert policy_module.thread_policy(ServerConfig(workers=16)).threads == 1
        assert policy_module.thread_policy(ServerConfig(intra_op_threads=5)).threads == 5
        assert policy_module.thread_policy(ServerConfig(workers=2)).cpus == 8
    finally:
        policy_module.thread_policy.cache_clear()


@pytest.mark.parametrize(
    ("intra", "workers", "warned"), [(3, 1, True), (2, 2, True), (1, 2, False), (0, 1, False)]
)
def test_more_torch_threads_than_usable_cpus_are_warned_about(
    monkeypatch, restore_torch_threads, caplog, intra, workers, warned
):
    monkeypatch.setattr(policy_module, "cpu_budget", lambda: (2, "a test's 2 CPUs"))
    policy_module.thread_policy.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="hessian_service.server"):
            policy_module.install_thread_policy(
                ServerConfig(intra_op_threads=intra, workers=workers)
            )
    finally:
        policy_module.thread_policy.cache_clear()
    messages = [r.getMessage() for r in caplog.records]
    assert any("more than the 2 usable CPUs" in m for m in messages) == warned, messages


def test_flags_and_environment_set_the_policy_and_bad_values_name_the_flag():
    env = {"HESSIAN_INTRA_OP_THREADS": "3", "HESSIAN_SINGLE_THREAD_BELOW": "77"}
    config = ServerConfig.from_args(["--single-thread-below", "0"], env)
    assert (config.intra_op_threads, config.single_thread_below) == (3, 0)
    with pytest.raises(ValueError, match="--intra-op-threads must be >= 0"):
        ServerConfig.from_args(["--intra-op-threads", "-1"], {})
    with pytest.raises(ValueError, match="--single-thread-below must be >= 0"):
        ServerConfig.from_args(["--single-thread-below", "-5"], {})


def test_each_call_gets_its_own_thread_count_while_another_runs():
    """Two calls at once in two threads, one small (1 thread) and one large (3 threads): each
    reads its own count inside, after the other has set its own; both are restored after."""
    policy = ThreadPolicy(cpus=4, threads=3, single_thread_below=100)
    small = make_objective("rosenbrock", {}, {"dim": 2})  # size 2 * 2^2 = 8
    large = make_objective("rosenbrock", {}, {"dim": 10})  # size 10 * 10^2 = 1000
    assert (policy.threads_for(small), policy.threads_for(large)) == (1, 3)
    inside = threading.Barrier(2, timeout=30)
    seen: dict[str, tuple[int, int, int]] = {}

    def call(name: str, objective, start: int) -> None:
        torch.set_num_threads(start)
        with policy.limited(objective):
            inside.wait()  # both are inside, each has set its count
            mine = torch.get_num_threads()
            inside.wait()
        seen[name] = (start, mine, torch.get_num_threads())

    workers = [
        threading.Thread(target=call, args=("small", small, 2)),
        threading.Thread(target=call, args=("large", large, 2)),
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert seen == {"small": (2, 1, 2), "large": (2, 3, 2)}


@pytest.fixture
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_server_reports_the_policy_it_applies(tmp_path, restore_torch_threads, capsys):
    handle = start_server(tmp_path, workers=1, intra_op_threads=3, single_thread_below=4321)
    try:
        assert torch.get_num_threads() == 3  # the process default it installed at start
        with Client(handle.address, timeout=30) as client:
            limits = client.info().limits
        assert (limits.intra_op_threads, limits.single_thread_below) == (3, 4321)
        assert limits.usable_cpus == usable_cpus() >= 1
        assert main(["--address", handle.address, "info"]) == 0
        out = capsys.readouterr().out
        cpus = f"{limits.usable_cpus} usable CPU{'' if limits.usable_cpus == 1 else 's'}"
        assert f"threads: {cpus}, 3 torch threads per call" in out
        assert "one thread below size 4321" in out
    finally:
        handle.stop(grace=1.0)


def test_hessian_info_says_one_torch_thread_in_the_singular(
    tmp_path, restore_torch_threads, capsys
):
    handle = start_server(tmp_path, workers=1, intra_op_threads=1)
    try:
        assert main(["--address", handle.address, "info"]) == 0
        out = capsys.readouterr().out
        assert ", 1 torch thread per call, one thread below size" in out, out
    finally:
        handle.stop(grace=1.0)


class CountingRosenbrock(Rosenbrock):
    """Rosenbrock that notes the calling thread's torch thread count at every loss."""

    def _setup(self, data, options) -> None:
        super()._setup(data, options)
        self.seen_threads: set[int] = set()

    def loss(self, params: torch.Tensor) -> torch.Tensor:
        self.seen_threads.add(torch.get_num_threads())
        return super().loss(params)


def test_a_run_executes_with_the_thread_count_the_policy_gives_its_problem(tmp_path):
    store = SQLiteRunStore(tmp_path, commit_interval_s=0.01)
    store.put_problem("p", b"")  # a run needs its problem stored, held by its (anonymous) owner
    policy = ThreadPolicy(cpus=4, threads=3, single_thread_below=100)
    manager = RunManager(
        store, workers=1, max_concurrent_runs=4, checkpoint_every=100, threads=policy
    )
    small = CountingRosenbrock({}, {"dim": 2})
    large = CountingRosenbrock({}, {"dim": 10})
    options = MethodOptions(method="gradient_descent", learning_rate=1e-4)
    stopping = StopCriteria(max_iterations=5)
    try:
        for objective in (small, large):
            row = manager.launch(
                problem_id="p",
                objective=objective,
                params=objective.init_params(),
                options=options,
                stopping=stopping,
            )
            live = manager.live(row.run_id)  # None: it has ended (and its end is stored)
            if live is not None:
                with live.cond:
                    assert live.cond.wait_for(lambda live=live: live.done, timeout=60)
            assert store.get_run(row.run_id).status == "FINISHED"
        assert (small.seen_threads, large.seen_threads) == ({1}, {3})
    finally:
        manager.shutdown(timeout=5)
        store.close()


def test_hessian_info_says_a_zero_threshold_is_none(tmp_path, restore_torch_threads, capsys):
    # "one thread below size 0" read as a threshold; 0 means every size gets the threads
    handle = start_server(tmp_path, workers=1, intra_op_threads=2, single_thread_below=0)
    try:
        assert main(["--address", handle.address, "info"]) == 0
        out = capsys.readouterr().out
        assert "2 torch threads per call at every size (no single-thread threshold)" in out, out
        assert "below size 0" not in out
    finally:
        handle.stop(grace=1.0)
