"""Problems from the wire: content-addressed ids, objective construction, an LRU of built ones."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from hessian_client.proto import problem_pb2

from ..engine.errors import ResourceLimitError, ValidationError
from ..engine.objectives import OBJECTIVES, Objective, make_objective
from ..store import RunStore
from .codec import decode_tensor
from .errors import NotFoundError

OBJECTIVE_FIELDS = [
    f.name for f in problem_pb2.Problem.DESCRIPTOR.oneofs_by_name["objective"].fields
]


def problem_id(problem: problem_pb2.Problem) -> str:
    """The content address: sha256 of the deterministic serialisation (same problem, same id)."""
    return "p-" + hashlib.sha256(problem.SerializeToString(deterministic=True)).hexdigest()[:40]


def _renamed(exc: ValidationError, field: str) -> ValidationError:
    """The same error reported under the wire's field path."""
    return exc.renamed(field)


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
    problem: problem_pb2.Problem, max_params: int, max_data_bytes: int | None = None
) -> Objective:
    """Decode the objective's options and data tensors and build the engine objective."""
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
    options: dict[str, Any] = {}
    for fd, value in spec.ListFields():
        repeated = isinstance(value, Iterable) and not isinstance(value, str)
        options[fd.name] = list(value) if repeated else value
    data = {
        name: decode_tensor(problem.data[name], f"problem.data.{name}")
        for name in sorted(problem.data)
    }
    try:
        objective = make_objective(which, data, options)
    except ValidationError as exc:
        field = exc.field
        if field.startswith("options."):
            field = f"problem.{which}." + field.removeprefix("options.")
        elif field.startswith("data."):
            field = "problem." + field
        raise _renamed(exc, field) from exc
    if objective.num_params > max_params:
        raise ResourceLimitError(
            "problem",
            f"{objective.num_params} parameters, over the server limit of {max_params}",
        )
    return objective


class ProblemRegistry:
    """Resolves a request's problem (inline or by id) to an objective; keeps recent ones built."""

    def __init__(
        self,
        store: RunStore,
        max_params: int,
        cache_size: int = 64,
        max_data_bytes: int | None = None,
    ) -> None:
        self.store = store
        self.max_params = max_params
        self.max_data_bytes = max_data_bytes
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Objective] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, pid: str) -> Objective | None:
        with self._lock:
            objective = self._cache.get(pid)
            if objective is not None:
                self._cache.move_to_end(pid)
            return objective

    def _remember(self, pid: str, objective: Objective) -> None:
        with self._lock:
            self._cache[pid] = objective
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def create(self, problem: problem_pb2.Problem) -> tuple[str, Objective]:
        """Validate and store a problem; return its id and objective."""
        pid = problem_id(problem)
        objective = self._cached(pid)
        if objective is None:
            objective = build_objective(problem, self.max_params, self.max_data_bytes)
            self._remember(pid, objective)
        self.store.put_problem(pid, problem.SerializeToString(deterministic=True))
        return pid, objective

    def by_id(self, pid: str, field: str = "problem_id") -> Objective:
        """The objective of a stored problem (NOT_FOUND when unknown)."""
        objective = self._cached(pid)
        if objective is not None:
            return objective
        blob = self.store.get_problem(pid) if pid else None
        if blob is None:
            raise NotFoundError(field, f"problem with id {pid!r}")
        objective = build_objective(problem_pb2.Problem.FromString(blob), self.max_params)
        self._remember(pid, objective)
        return objective

    def resolve(self, request: Any, *, persist: bool = False) -> tuple[str, Objective]:
        """(id, objective) for a request with `oneof problem_source { problem; problem_id }`."""
        source = request.WhichOneof("problem_source")
        if source == "problem_id":
            return request.problem_id, self.by_id(request.problem_id)
        if source is None:
            raise ValidationError("problem", "a problem or a problem_id", "neither")
        if persist:
            return self.create(request.problem)
        pid = problem_id(request.problem)
        objective = self._cached(pid)
        if objective is None:
            objective = build_objective(request.problem, self.max_params, self.max_data_bytes)
            self._remember(pid, objective)
        return pid, objective
