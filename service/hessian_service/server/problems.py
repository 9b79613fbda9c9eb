"""Problems from the wire: content-addressed ids, objective construction, an LRU of built ones.

A stored problem belongs to the tenants that created it (the store keeps one copy of the
bytes per content id); by id, a tenant reaches only its own (admins: any). Built objectives
are cached by bytes of tensors they hold, shared by tenants (a cache hit still checks the
caller's hold on the id). On the embedded SQLite store, which only this process changes, a
hold once read is remembered with the cached objective until the problem is deleted or
evicted here; on a shared store another replica may delete it, so every call reads it.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

from hessian_client.proto import problem_pb2

from ..engine.errors import ResourceLimitError, ValidationError
from ..engine.objectives import OBJECTIVES, Objective, make_objective
from ..store import RunStore, SQLiteRunStore
from .auth import Tenant
from .codec import decode_tensor
from .errors import NotFoundError, require_id

OBJECT_OVERHEAD_BYTES = 4096  # an objective's Python objects, counted on top of its tensors

OBJECTIVE_FIELDS = [
    f.name for f in problem_pb2.Problem.DESCRIPTOR.oneofs_by_name["objective"].fields
]


def problem_id(problem: problem_pb2.Problem) -> str:
    """The content address: sha256 of the deterministic serialisation (same problem, same id)."""
    return blob_id(problem.SerializeToString(deterministic=True))


def blob_id(blob: bytes) -> str:
    """The content address of a problem's deterministic serialisation `blob`."""
    return "p-" + hashlib.sha256(blob).hexdigest()[:40]


def check_data_size(problem: problem_pb2.Problem, max_data_bytes: int) -> None:
    """Refuse, before decoding anything, a problem whose data tensors exceed the limit."""
    total = sum(len(t.data) for t in problem.data.values())
    if total > max_data_bytes:
        raise ResourceLimitError(
            "problem.data",
            f"{total} bytes of data tensors, over the server limit of {max_data_bytes} "
            "(--max-data-bytes)",
        )


def build_objective(
    problem: problem_pb2.Problem,
    max_params: int,
    max_data_bytes: int | None = None,
    exported_settings: Mapping[str, Any] | None = None,
) -> Objective:
    """Decode the objective's options and data tensors and build the engine objective.

    `exported_settings` are the server's options for exported programs (compile,
    evaluation_seconds), added to the problem's own.
    """
    if max_data_bytes is not None:
        check_data_size(problem, max_data_bytes)
    which = problem.WhichOneof("objective")
    if which is None:
        raise ValidationError(
            "problem.objective",
            f"one of {OBJECTIVE_FIELDS}",
            "nothing (unset, or an objective this server does not know)",
        )
    assert which in OBJECTIVES, which
    spec = getattr(problem, which)
    # (sizes below 1 are the loader's refusal: a product of negatives is no parameter count)
    if (
        which == "exported"
        and all(s >= 1 for s in spec.param_shape)
        and math.prod(spec.param_shape) > max_params
    ):
        raise ResourceLimitError(
            "problem.exported.param_shape",
            f"{math.prod(spec.param_shape)} parameters, over the server limit of {max_params}",
        )
    options: dict[str, Any] = {}
    for fd, value in spec.ListFields():
        repeated = isinstance(value, Iterable) and not isinstance(value, (str, bytes))
        options[fd.name] = list(value) if repeated else value
    if which == "exported":
        options.update(exported_settings or {})
    data = {
        name: decode_tensor(problem.data[name], f"problem.data.{name}")
        for name in sorted(problem.data)
    }
    try:
        objective = make_objective(which, data, options)
    except (ValidationError, ResourceLimitError) as exc:
        field = exc.field
        if field.startswith("options."):
            field = f"problem.{which}." + field.removeprefix("options.")
        elif field.startswith("data."):
            field = "problem." + field
        raise exc.renamed(field) from exc
    if objective.num_params > max_params:
        raise ResourceLimitError(
            "problem",
            f"{objective.num_params} parameters, over the server limit of {max_params}",
        )
    return objective


def objective_bytes(objective: Objective) -> int:
    """Memory an objective holds: its tensors' storages (each counted once) and an overhead."""
    storages = {}
    for value in objective.held_tensors():
        storage = value.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) + OBJECT_OVERHEAD_BYTES


ANY_SCOPE = object()  # `peek` without an access check (an inline problem needs none)


class ProblemRegistry:
    """Resolves a request's problem (inline or by id) to an objective; keeps recent ones built.

    `cache_bytes` bounds the built objectives kept in memory (least recently used go first;
    one larger than the whole cache is not kept). `max_stored_bytes` (0: off) bounds the
    stored problems: past it the least recently used that no pinning run needs are deleted.
    """

    def __init__(
        self,
        store: RunStore,
        max_params: int,
        cache_bytes: int = 256 * 1024**2,
        max_data_bytes: int | None = None,
        max_stored_bytes: int = 0,
        exported_settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.exported_settings = dict(exported_settings or {})
        self.max_params = max_params
        self.max_data_bytes = max_data_bytes
        self.cache_bytes = cache_bytes
        self.max_stored_bytes = max_stored_bytes
        # pid -> (objective, bytes, the scopes whose hold on pid was read from the store)
        self._cache: OrderedDict[str, tuple[Objective, int, set[str | None]]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._remember_holds = isinstance(store, SQLiteRunStore)
        self._forgotten = 0  # counts forget() calls: a hold read before one is not remembered
        # problems stored for a StartRun whose run row (which pins them) is not yet written:
        # the stored-problems cap must not evict them meanwhile
        self._claimed: Counter[str] = Counter()
        # pid -> [lock, waiters, objective] of a build under way (_built)
        self._building: dict[str, list[Any]] = {}

    @property
    def cached_bytes(self) -> int:
        """Bytes the cached objectives hold now (at most `cache_bytes`)."""
        with self._lock:
            return self._cached_bytes

    def _cached(self, pid: str) -> Objective | None:
        with self._lock:
            entry = self._cache.get(pid)
            if entry is None:
                return None
            self._cache.move_to_end(pid)
            return entry[0]

    def _built(self, pid: str, build: Callable[[], Objective]) -> Objective:
        """The cached objective of `pid`, else `build()`'s, built once: concurrent requests
        for one new problem wait for the first build (an exported program compiles for
        seconds, and each would compile its own) and take it from the cache."""
        objective = self._cached(pid)
        if objective is not None:
            return objective
        with self._lock:  # [lock, waiters, the objective built under it]
            gate = self._building.setdefault(pid, [threading.Lock(), 0, None])
            gate[1] += 1
        try:
            with gate[0]:
                # the build's own result first: the cache may not keep it (off, or too big)
                objective = gate[2] if gate[2] is not None else self._cached(pid)
                if objective is None:
                    objective = gate[2] = build()
                    self._remember(pid, objective)
                return objective
        finally:
            with self._lock:
                gate[1] -= 1
                if not gate[1]:
                    del self._building[pid]

    def _remember(self, pid: str, objective: Objective) -> None:
        size = objective_bytes(objective)
        with self._lock:
            old = self._cache.pop(pid, None)
            self._cached_bytes -= old[1] if old else 0
            if size > self.cache_bytes:
                return
            self._cache[pid] = (objective, size, set())
            self._cached_bytes += size
            while self._cached_bytes > self.cache_bytes:
                _, (_, evicted, _) = self._cache.popitem(last=False)
                self._cached_bytes -= evicted

    def peek(self, pid: str, scope: str | object | None = ANY_SCOPE) -> Objective | None:
        """The built objective of `pid` if it is cached, without reading the store; given a
        `scope`, only when that scope's hold on it is already remembered."""
        with self._lock:
            entry = self._cache.get(pid)
            if entry is None or (scope is not ANY_SCOPE and scope not in entry[2]):
                return None
            return entry[0]

    def forget(self, pids: Iterable[str]) -> None:
        """Drop deleted problems from the cache."""
        with self._lock:
            self._forgotten += 1
            for pid in pids:
                entry = self._cache.pop(pid, None)
                self._cached_bytes -= entry[1] if entry else 0

    def _cached_for(self, pid: str, scope: str | None) -> tuple[Objective | None, bool, int]:
        """`_cached(pid)`, whether `scope`'s hold on it is remembered, and the forget count
        now: one lookup under the lock."""
        with self._lock:
            entry = self._cache.get(pid)
            if entry is None:
                return None, False, self._forgotten
            self._cache.move_to_end(pid)
            return entry[0], scope in entry[2], self._forgotten

    def _hold(self, pid: str, scope: str | None, forgotten: int) -> None:
        """Remember `scope`'s hold, read from the store when the forget count was
        `forgotten`: a problem deleted since may have been read before its deletion."""
        with self._lock:
            entry = self._cache.get(pid)
            if entry is not None and self._forgotten == forgotten:
                entry[2].add(scope)

    def create(self, problem: problem_pb2.Problem, owner: str) -> tuple[str, Objective]:
        """Validate and store a problem for `owner`; return its id and objective."""
        pid, blob, objective = self._checked(problem)
        self._put(pid, blob, owner)
        return pid, objective

    def _checked(self, problem: problem_pb2.Problem) -> tuple[str, bytes, Objective]:
        """A problem to store, validated: (id, serialised bytes, objective)."""
        blob = problem.SerializeToString(deterministic=True)
        pid = blob_id(blob)
        if self.max_stored_bytes and len(blob) > self.max_stored_bytes:
            raise ResourceLimitError(
                "problem",
                f"{len(blob)} bytes serialised, over the server's limit of "
                f"{self.max_stored_bytes} for stored problems (--max-problem-bytes)",
            )
        objective = self._built(
            pid,
            lambda: build_objective(
                problem, self.max_params, self.max_data_bytes, self.exported_settings
            ),
        )
        return pid, blob, objective

    def _put(self, pid: str, blob: bytes, owner: str) -> None:
        """Store a checked problem for `owner`, then apply the stored-problems cap (never to
        it, nor to problems claimed by runs being created)."""
        self.store.put_problem(pid, blob, owner)
        if self.max_stored_bytes:
            with self._lock:
                keep = [pid, *self._claimed]
            self.forget(self.store.enforce_problem_retention(self.max_stored_bytes, keep=keep))

    @contextlib.contextmanager
    def _claiming(self, pid: str, store: Callable[[], None]) -> Iterator[None]:
        """Run `store` (the problem's hold) and keep `pid` from the stored-problems cap until
        the block ends (the run row that pins it is written inside it)."""
        with self._lock:
            self._claimed[pid] += 1
        try:
            store()
            yield
        finally:
            with self._lock:
                self._claimed[pid] -= 1
                if not self._claimed[pid]:
                    del self._claimed[pid]

    def by_id(self, pid: str, scope: str | None, field: str = "problem_id") -> Objective:
        """The objective of a problem stored by `scope` (None: anyone); NOT_FOUND otherwise,
        also when another tenant has it (the message is the same)."""
        if not pid:
            raise NotFoundError(field, f"problem with id {pid!r}")
        objective, known, forgotten = self._cached_for(pid, scope)
        if objective is not None:
            if known:
                return objective
            if self.store.has_problem(pid, scope):
                if self._remember_holds:
                    self._hold(pid, scope, forgotten)
                return objective
        blob = self.store.get_problem(pid, scope)
        if blob is None:
            raise NotFoundError(field, f"problem with id {pid!r}")
        return self._built(
            pid,
            lambda: build_objective(
                problem_pb2.Problem.FromString(blob), self.max_params, None, self.exported_settings
            ),
        )

    def delete(self, pid: str, scope: str | None) -> None:
        """Delete `scope`'s hold on a problem (None: everyone's); NOT_FOUND when it has none."""
        if not self.store.delete_problem(require_id("problem_id", pid, "CreateProblem"), scope):
            raise NotFoundError("problem_id", f"problem with id {pid!r}")
        self.forget([pid])

    def claim(
        self, request: Any, tenant: Tenant
    ) -> tuple[str, Objective, Callable[[], AbstractContextManager[None]]]:
        """StartRun's problem: (id, objective, hold), checked as `resolve` checks it; `with
        hold():` stores it for the tenant (an admin starting a run on another tenant's problem
        id takes its own hold, so the run keeps it) and keeps it from the stored-problems cap
        while the run row is written inside the block. The run enters it once it is
        admitted: a refused StartRun stores nothing."""
        if request.WhichOneof("problem_source") != "problem":
            pid, objective = self.resolve(request, tenant)

            def admin_hold() -> None:
                blob = self.store.get_problem(pid) if tenant.admin else None
                if blob is not None:
                    self.store.put_problem(pid, blob, tenant.name)

            return pid, objective, lambda: self._claiming(pid, admin_hold)
        pid, blob, objective = self._checked(request.problem)
        owner = tenant.name
        return pid, objective, lambda: self._claiming(pid, lambda: self._put(pid, blob, owner))

    def resolve(self, request: Any, tenant: Tenant) -> tuple[str, Objective]:
        """(id, objective) for a request with `oneof problem_source { problem; problem_id }`."""
        source = request.WhichOneof("problem_source")
        if source == "problem_id":
            pid = request.problem_id
            return pid, self.by_id(require_id("problem_id", pid, "CreateProblem"), tenant.scope)
        if source is None:
            raise ValidationError("problem", "a problem or a problem_id", "neither")
        pid = problem_id(request.problem)
        objective = self._built(
            pid,
            lambda: build_objective(
                request.problem, self.max_params, self.max_data_bytes, self.exported_settings
            ),
        )
        return pid, objective
