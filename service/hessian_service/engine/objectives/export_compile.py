"""Compiled evaluation of a verified exported program (the server's --exported-compile flag).

The interpreter in `export_verify` dispatches one ATen call per node from Python. Here the
same verified nodes (never `torch.export.load`) become an `fx.Graph`; `make_fx` traces the
loss and its gradient (`torch.func.grad_and_value`) into plain ATen graphs, and
`torch.compile` (Inductor, static shapes) turns each into one native call. Each graph is a
new GraphModule with its own code object, so the process-global compile caches never mix
two problems; compiling is serialised by one lock and done once, when the objective is built
(the server's LRU of built problems then keeps it per problem). Compiled calls share that
lock, a compile takes it alone: `make_fx`'s tracing flag is process-wide, and a compiled
function called on another thread while it is set raises ("using FX to symbolically trace a
dynamo-optimized function"), which sent concurrent calls to the interpreter (not the same
bits as the same call alone).

What changes against the interpreter: a compiled call cannot be stopped between nodes, so
the cancel token and the wall-clock limit are checked before and after it (a call over the
limit is refused once it returns). Autograd graphs that need second derivatives (dense
Hessians, Hessian-vector products, Jacobians under torch.func) still run the interpreter.
Inductor's own C++ loops keep the OpenMP thread count of the thread that compiled them (the
ATen calls they make, such as matmul, use the calling thread's count).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from .. import cancel
from ..errors import ResourceLimitError
from .export_verify import Program, Ref

log = logging.getLogger(__name__)


class SharedLock:
    """Many holders of the shared side or one of the exclusive side; a waiting exclusive
    holder keeps new shared ones out, so a compile is not starved by a stream of calls."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0  # exclusive holders waiting

    @contextlib.contextmanager
    def shared(self, check: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Hold the shared side for the block; `check` runs every 50 ms of a wait for it (a
        cancel token's: a call need not wait out a compile it no longer wants)."""
        with self._cond:
            while self._exclusive or self._waiting:
                check()
                self._cond.wait(0.05)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the lock alone for the block."""
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


# dynamo/inductor compile state and make_fx's tracing flag are process-global: a compile
# holds this alone, compiled calls share it
_COMPILE_LOCK = SharedLock()
# programs of more nodes are interpreted: compiling takes time superlinear in the nodes
# (4 s at 250, 8 s at 500, 24 s at 1,000, 99 s at 6,000 here) while every compiled call of
# every problem waits for it, and the call that sent the program cannot stop it
COMPILE_MAX_NODES = 500


def graph_module(program: Program) -> fx.GraphModule:
    """The verified nodes as an fx graph taking (params, *data, *constants) in that order."""
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    names = [program.params_name, *program.data_names, *program.constants]
    for name in names:
        env[name] = graph.placeholder(f"in_{len(env)}")

    def bind(value: Any) -> Any:
        if isinstance(value, Ref):
            return env[value.name]
        if isinstance(value, list):
            return [bind(v) for v in value]
        return value

    for node in program.nodes:
        args = tuple(bind(a) for a in node.args)
        kwargs = {k: bind(v) for k, v in node.kwargs.items()}
        result = graph.call_function(node.op, args, kwargs)
        if node.outputs and node.outputs[0] == "*":
            outs = list(enumerate(node.outputs[1]))
        elif len(node.outputs) == 1:
            if node.outputs[0] is not None:
                env[node.outputs[0]] = result
            continue
        else:
            outs = list(enumerate(node.outputs))
        for i, name in outs:
            if name is not None:
                env[name] = graph.call_function(operator.getitem, (result, i))
    graph.output(env[program.output])
    return fx.GraphModule(torch.nn.Module(), graph)


class CompiledFailed(Exception):
    """A compiled call raised: the caller reruns the interpreter, which names the node."""


class CompiledProgram:
    """Inductor-compiled forward and loss-and-gradient of one verified program.

    `scalar` turns the program's output into the loss (identity, or the output loss of a
    Gauss-Newton objective); `inputs` are the data tensors and constants the program was
    verified with, in `graph_module`'s order. Calls run under no_grad and return new tensors.
    """

    def __init__(
        self,
        program: Program,
        inputs: Sequence[torch.Tensor],
        params_like: torch.Tensor,
        scalar: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.inputs = tuple(inputs)
        self.param_shape = tuple(params_like.shape)
        module = graph_module(program)

        def loss(params: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
            return scalar(module(params, *rest))

        example = (params_like, *self.inputs)
        with _COMPILE_LOCK.exclusive():
            forward = make_fx(module)(*example)
            both = make_fx(torch.func.grad_and_value(loss))(*example)
            self._forward = torch.compile(forward, fullgraph=True, dynamic=False)
            self._both = torch.compile(both, fullgraph=True, dynamic=False)
            with torch.no_grad():  # compile now, not on a request's first call
                self._forward(*example)
                self._both(*example)

    def forward(self, params: torch.Tensor, seconds: float) -> torch.Tensor:
        """The program's output at `params` (no autograd graph)."""
        return self._call(self._forward, params, seconds)

    def loss_and_grad(self, params: torch.Tensor, seconds: float) -> tuple[torch.Tensor, ...]:
        """(gradient shaped like `params`, loss) at `params`: one compiled call."""
        grad, value = self._call(self._both, params, seconds)
        return grad.reshape(params.shape), value

    def _call(self, fn: Callable[..., Any], params: torch.Tensor, seconds: float) -> Any:
        where = "evaluating an exported program"
        # a wait for another problem's compile is not this call's time, but may be cancelled
        with _COMPILE_LOCK.shared(lambda: cancel.check(where)):
            cancel.check(where)
            start = time.monotonic()
            try:
                with torch.no_grad():
                    args = (params.detach().reshape(self.param_shape).contiguous(), *self.inputs)
                    result = fn(*args)
            except Exception as exc:  # the program's own error (the interpreter names its node)
                raise CompiledFailed(f"{type(exc).__name__}: {exc}") from exc
            elapsed = time.monotonic() - start
        if elapsed > seconds:
            raise ResourceLimitError(
                "problem.exported",
                f"an evaluation took over the server's limit of {seconds:g} s (compiled)",
            )
        cancel.check(where)
        return result


class CompiledLoss(torch.autograd.Function):
    """The loss from the compiled program, its gradient from the same compiled call.

    A first-order backward returns the compiled gradient; a backward that builds a graph
    (create_graph: dense Hessians) recomputes a differentiable gradient with `interpreted`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        params: torch.Tensor,
        compiled: CompiledProgram,
        interpreted: Callable[[torch.Tensor], torch.Tensor],
        seconds: float,
    ) -> torch.Tensor:
        grad, value = compiled.loss_and_grad(params, seconds)
        ctx.save_for_backward(params, grad)
        ctx.interpreted = interpreted
        return value

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        params, grad = ctx.saved_tensors
        if torch.is_grad_enabled():
            loss = ctx.interpreted(params)
            (grad,) = torch.autograd.grad(loss, params, create_graph=True)
        return upstream * grad, None, None, None


def compile_or_none(
    program: Program,
    inputs: Sequence[torch.Tensor],
    params_like: torch.Tensor,
    scalar: Callable[[torch.Tensor], torch.Tensor],
) -> CompiledProgram | None:
    """The compiled program, or None (logged) where compiling fails (no C++ compiler, an op
    Inductor cannot lower) or would hold every compiled call back too long (a program of
    over COMPILE_MAX_NODES nodes): the interpreter then serves the problem as without the
    flag."""
    if len(program.nodes) > COMPILE_MAX_NODES:
        log.info(
            "exported program of %d nodes not compiled (over %d), interpreting it",
            len(program.nodes),
            COMPILE_MAX_NODES,
        )
        return None
    try:
        return CompiledProgram(program, inputs, params_like, scalar)
    except Exception as exc:  # the compiler's failure is not the caller's error
        log.warning("exported program not compiled, interpreting it: %s", exc)
        return None


def use_compiled(params: torch.Tensor) -> bool | None:
    """How a call may use the compiled program: None (no: a torch.func transform is tracing
    it), False (forward only: no autograd graph wanted), True (CompiledLoss)."""
    if torch._C._are_functorch_transforms_active():
        return None
    return torch.is_grad_enabled() and params.requires_grad
