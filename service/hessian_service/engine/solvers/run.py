"""Runs (a generator of step records with a cancel token) and unary steps.

One iteration yields one record: the iterate x_k, then the step from it. Stopping tests
run at the top of each iteration, on what the previous step did, so a cancel or a time
limit takes effect between iterations and the final record is the point the run ended on.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator

import torch

from ..backends.native.fused import fused_newton_step, validated_options
from ..cancel import Cancelled, CancelToken, scope
from ..errors import ValidationError
from ..linalg import (
    all_finite,
    classify,
    count_negative,
    definite_by_a_margin,
    loss_rounding,
    off_gauge,
    rounding_factor,
    symmetrise,
    vector_norm,
)
from ..objectives.base import Objective
from ..options import MethodOptions, StopCriteria
from ..records import Checkpoint, StepRecord, StepResult, StopReason
from .methods import LineSearchFailed, NoProgress, Point, RoundingStall, Step, Stepper

# accepted steps in a row that return x, and the step's state (damping, trust radius), to
# one of their last RECENT values (bit for bit, each step at the scale of rounding: below
# the rounding of x, or a cycle among neighbours in the last bits) before a run whose
# gradient test is on ends no_progress: a deterministic step from the same x and state
# repeats itself; a state that still moves (a radius growing from a tiny start) is no cycle
UNCHANGED_STEPS = 3
RECENT = 8
RECENT_KEYS = tuple(f"recent_x_{i}" for i in range(RECENT))
# accepted steps in a row, each small (under sqrt(eps) |x|), not held back by its policy
# and changing the loss within its rounding (or what the policy took as noise), over which
# the loss falls no further than that below where they started and the gradient max-norm
# no lower than FLAT_GRADIENT_LOW of its low there, before a run whose gradient test is on
# ends no_progress: steps driven by rounding noise (float32 Newton-CG near its minimum took
# 95 of 100 steps at a bit-identical loss, each too large for the cycle test above; a
# float32 trust region on a quadratic of condition 1e4 wandered in a band of 4e-6 of its
# loss, setting a gradient low 20% under the last now and then, to max_iterations). Slow
# convergence lowers the gradient steadily, past that fraction within a few steps, which
# the loss near a minimum (quadratic in the distance) no longer shows; gradient descent's
# steps are lr x gradient, whose slow progress can lower the gradient by less than its
# rounding a step: not judged.
FLAT_STEPS = 10
FLAT_GRADIENT_LOW = 0.75
FLAT_KEYS = ("flat_steps", "flat_loss", "flat_gradient")
# the keys a Run adds to its stepper's state in a checkpoint (Run._state)
RUN_KEYS = ("previous_loss", "unchanged_steps", *FLAT_KEYS, *RECENT_KEYS)


def _digest(x: torch.Tensor, state: dict[str, float]) -> float:
    """A 48-bit digest of x's bytes and the step's state, exact as a float (checkpoint state
    holds floats); the one-shot request cg_tight (made by the stop test after a point's
    digest) is not the point's state and is left out."""
    kept = sorted((k, v) for k, v in state.items() if k != "cg_tight")
    raw = x.detach().cpu().contiguous().numpy().tobytes() + repr(kept).encode()
    return float(int.from_bytes(hashlib.blake2b(raw, digest_size=6).digest(), "big"))


def _record(
    k: int, point: Point, previous_loss: float | None, backend: str, step: Step | None
) -> StepRecord:
    """The record of x_k (`point`) and the step from it (None: the run stopped there), built
    in one constructor call once the step is known: positional, in StepRecord's field order
    (0.7 us a record less than keywords; test_record_fields_land_in_their_own_fields checks
    the order)."""
    gnorm, gmax = point.grad_norms
    change = 0.0 if previous_loss is None else previous_loss - point.loss
    if step is None:
        return StepRecord(k, point.loss, change, gnorm, gmax, backend=backend)
    return StepRecord(
        k,
        point.loss,
        change,
        gnorm,
        gmax,
        step.step_norm,
        step.step_size,
        step.damping,
        step.gain_ratio,
        step.accepted,
        step.negative_eigenvalues,
        step.solver_attempts,
        step.function_evaluations,
        step.cg_iterations,
        step.cg_residual,
        step.negative_curvature,
        step.trust_radius,
        step.gradient_batch_size,
        step.step_damped,
        "",
        backend,
    )


def _second_order_verdict(
    stop: tuple[StopReason, str], record: StepRecord
) -> tuple[StopReason, str, bool]:
    """`stop` and whether it is convergence, at a point whose dense Hessian `record` judged:
    the first-order condition met where the Hessian has a negative eigenvalue is not, and
    the message then says so."""
    reason, message = stop
    count = record.negative_eigenvalues
    if not (reason.converged and count > 0):
        return reason, message, reason.converged
    kind = f"a {record.end_point} point" if record.end_point != "flat" else "semi-definite"
    message = message.replace("converged: ", "stationary point: ", 1) + (
        f"; not a minimum: the Hessian there has {count} negative eigenvalue"
        f"{'s' if count > 1 else ''} ({kind}), so the run has not converged"
    )
    return reason, message, False


def _resolved(tol: float, eps: float, dtype: torch.dtype, name: str) -> tuple[float, str]:
    """A stall tolerance as tested: 0 (off) as is, one below `eps` raised to it; with the
    note its stop message adds ("" when the tolerance is as given)."""
    if 0 < tol < eps:
        dtype_name = str(dtype).removeprefix("torch.")
        return eps, f"({name} {tol:g} raised to the {dtype_name} eps {eps:.3g}) "
    return tol, ""


def end_point(
    h: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    convex: bool = False,
    rows: int = 0,
) -> tuple[str, int]:
    """The second-order test at a point from its dense Hessian, and its negative count.

    linalg.classify's verdict (minimum, saddle, maximum or flat: inconclusive) with
    eigenvalues within max(n, log2(rows)) eps max|lambda| of 0 (`negative_tolerance`; `rows`:
    the data rows the Hessian's entries sum over) counted as 0. For a
    `convex` objective (Objective.convex) H is positive semi-definite, so every negative
    eigenvalue is rounding (near a separable limit the entries of a softmax Hessian cancel to
    1e-10 with absolute errors of 1e-16): minimum or flat, no negatives.
    `project`: the objective's projection off its gauge directions (project_step), along
    which the loss is invariant: the test is taken on the rest (linalg.off_gauge), where the
    gauge's zero eigenvalues say nothing about the point. A Cholesky factorisation answers a
    clear minimum (linalg.definite_by_a_margin); the eigenvalues are computed otherwise.
    """
    m, gauge = (symmetrise(h), 0) if project is None else off_gauge(h, project)
    if m.numel() and definite_by_a_margin(m, h):
        return "minimum", 0
    evals = torch.linalg.eigvalsh(m)[: h.shape[0] - gauge]
    if evals.numel() == 0:
        return "flat", 0
    relative = rounding_factor(evals.numel(), rows) * torch.finfo(h.dtype).eps
    if convex:
        evals = evals.clamp(min=0.0)
    verdict, _ = classify(float(evals[0]), float(evals[-1]), relative, 0.0)
    return verdict, count_negative(evals, h.dtype, rows)


def take_step(
    objective: Objective,
    params: torch.Tensor,
    options: MethodOptions | None = None,
    cancel: CancelToken | None = None,
) -> StepResult:
    """One step from `params`: the new parameters and the record of x and the step from it.

    A rejected Levenberg-Marquardt trial returns the input parameters unchanged (the
    record says so and carries the increased damping to try next). `cancel`: a token the
    step's loops check (raising cancel.Cancelled once it is cancelled or past its deadline).
    """
    with scope(cancel):
        result = _take_step(objective, params, options)
    if not all_finite(result.params):  # a fixed step past the dtype's range
        raise ValidationError(
            "options.learning_rate",
            "a step size whose new parameters are finite",
            f"x + {result.record.step_size:.3g} d overflowed",
        )
    return result


def _take_step(
    objective: Objective, params: torch.Tensor, options: MethodOptions | None
) -> StepResult:
    fused = fused_newton_step(objective, params, options)
    if fused is not None:  # the native fused op did the whole Newton step
        return fused
    options = validated_options(options)
    x = objective.check_params(params)
    stepper = Stepper(objective, options, x)
    point = stepper.evaluate(x)
    if not point.is_finite():
        raise ValidationError(
            "params", "a point where the loss and its derivatives are finite", "non-finite values"
        )
    start = time.perf_counter()
    try:
        step = stepper.step(point)
    except RoundingStall as exc:  # a valid request: the answer is that no step was taken
        step = exc.step
    except LineSearchFailed as exc:
        field = "options.learning_rate" if exc.overflowed else "options.step_policy"
        raise ValidationError(field, "a descent step from params", str(exc)) from exc
    except NoProgress as exc:
        raise exc.refusal() from exc
    except (FloatingPointError, torch.linalg.LinAlgError) as exc:  # the curvature overflowed
        raise ValidationError("params", "a point where the step's solve works", str(exc)) from exc
    record = _record(0, point, None, stepper.backend_label, step)
    if not step.accepted:
        record.damping = stepper.state["damping"]
    record.iteration_seconds = record.cumulative_seconds = time.perf_counter() - start
    return StepResult(
        step.x_new if step.accepted else x, record, stepper.options.method, stepper.method_note
    )


class Run:
    """An optimisation run: iterate it for step records; `params` and `stop_reason` follow.

    `params` is always the last accepted finite iterate. `checkpoint()` gives what
    `Run(..., resume=...)` needs to continue deterministically; a resumed run yields the
    checkpoint's record again (same values) and carries on from there.
    """

    def __init__(
        self,
        objective: Objective,
        params: torch.Tensor,
        options: MethodOptions | None = None,
        stopping: StopCriteria | None = None,
        cancel: CancelToken | None = None,
        resume: Checkpoint | None = None,
        moved_after: float | None = None,
    ) -> None:
        """`moved_after`: the run moved here from another process after iterating that many
        seconds there, and `resume` is the checkpoint at the last record it yielded there:
        that iteration, already tested and yielded, is not tested again (its record repeats
        it), and the clock (time_limit_seconds, cumulative_seconds) goes on from there once
        it is redone. None: a fresh run, or a resume, whose clock starts at 0."""
        if moved_after is not None:
            if resume is None:
                raise ValidationError("resume", "the checkpoint a moved run goes on from", None)
            if not (math.isfinite(moved_after) and moved_after >= 0):
                raise ValidationError("moved_after", "a finite number of seconds >= 0", moved_after)
        self.objective = objective
        self._moved_after = moved_after
        self.options = (options or MethodOptions()).validated()
        self.cancel_token = cancel or CancelToken()
        self.params = objective.check_params(params)
        self.start_iteration = 0
        self._previous_loss: float | None = None
        self._unchanged = 0  # accepted steps in a row back to a recent x (UNCHANGED_STEPS)
        self._recent: list[float] = []  # digests of the last RECENT x, the loss staying put
        self._flat = (0.0, math.nan, math.nan)  # FLAT_KEYS: steps, their loss, lowest max|g|
        # an objective evaluated elsewhere (asktell.RemoteObjective) brings its own Stepper
        stepper_class = getattr(objective, "stepper_class", Stepper)
        self.stepper = stepper_class(
            objective, self.options, self.params, reuse_trials=True, cancel_token=self.cancel_token
        )
        self.stopping = (
            (stopping or StopCriteria()).validated().for_method(self.method, self.params.dtype)
        )
        # a stall tolerance finer than the dtype's resolution could never fire on a change
        # that is rounding: it is raised to eps (and the stop message says so)
        eps = torch.finfo(self.params.dtype).eps if self.params.is_floating_point() else 0.0
        dtype, stopping = self.params.dtype, self.stopping
        self._ftol = _resolved(stopping.function_tolerance, eps, dtype, "function_tolerance")
        self._xtol = _resolved(stopping.parameter_tolerance, eps, dtype, "parameter_tolerance")
        if resume is not None:
            self.params = objective.check_params(resume.params, "checkpoint.params")
            self.start_iteration = resume.iteration
            state = dict(resume.state)
            previous = state.pop("previous_loss", math.nan)
            self._previous_loss = None if math.isnan(previous) else previous
            self._unchanged = int(state.pop("unchanged_steps", 0))
            self._flat = tuple(
                state.pop(key, d) for key, d in zip(FLAT_KEYS, self._flat, strict=True)
            )
            self._recent = [state.pop(key) for key in RECENT_KEYS if key in state]
            self.stepper.state.update(state)
        self.stop_reason: StopReason | None = None
        self.message = ""
        self._converged = False
        self.last_record: StepRecord | None = None
        self._checkpoint = Checkpoint(
            self.start_iteration, self.params.clone(), self._state(self._previous_loss)
        )
        self._iterator = self._iterate()

    @property
    def method(self) -> str:
        """The method the steps use (method auto resolved by size)."""
        return self.stepper.options.method

    @property
    def method_note(self) -> str:
        """Why method auto chose `method` ("" when it was not auto)."""
        return self.stepper.method_note

    @property
    def backend(self) -> str:
        """Which backend assembles and solves (as written in the records)."""
        return self.stepper.backend_label

    def __iter__(self) -> Iterator[StepRecord]:
        return self._iterator

    def __next__(self) -> StepRecord:
        return next(self._iterator)

    def cancel(self) -> None:
        """Stop before the next iteration."""
        self.cancel_token.cancel()

    def checkpoint(self) -> Checkpoint:
        """The state at the latest record, before its step."""
        return self._checkpoint

    def close(self) -> None:
        """Stop iterating here and let the points (and their curvature) go: the run goes on
        elsewhere (a worker process resumed it from `checkpoint()`)."""
        self._iterator.close()
        self.stepper.drop_trial()

    def run_to_end(self) -> list[StepRecord]:
        """Iterate to the end and return every record."""
        return list(self._iterator)

    def _state(self, previous_loss: float | None) -> dict[str, float]:
        state = dict(self.stepper.state)
        state["previous_loss"] = math.nan if previous_loss is None else previous_loss
        if self._unchanged:
            state["unchanged_steps"] = float(self._unchanged)
        if self._flat[0]:
            state.update(zip(FLAT_KEYS, self._flat, strict=True))
        state.update(zip(RECENT_KEYS, self._recent, strict=False))
        return state

    @property
    def converged(self) -> bool:
        """The run ended on the first-order condition at a point not known to be other than a
        minimum: a gradient-tolerance stop whose dense Hessian has a negative eigenvalue (a
        saddle, a maximum, or a semi-definite "flat" verdict with a negative direction) is a
        stationary point, not convergence."""
        return self._converged

    def _finish(self, reason: StopReason, message: str, converged: bool | None = None) -> None:
        self.stop_reason = reason
        self.message = message
        self._converged = reason.converged if converged is None else converged

    def _stop_test(
        self, k: int, point: Point, previous: Point | None, elapsed: float, last: Step | None
    ) -> tuple[StopReason, str] | None:
        """Why the run stops at `point` (None: it goes on). `last`: the step from `previous`.
        One held back by a policy that started cautious and has let go since
        (Step.held_back) is not judged by the stall tests (a trust radius of 1e-9 or a
        damping of 1e9 stopped a run "stalled" after its first good step); one from a partial
        CG solve (Step.partial_solve) that looks stalled has the next solve made to
        cg_tolerance instead, which judges it (a badly scaled least squares stopped
        "stalled" at 6,000x its minimum after a one-iteration CG step along its stiff
        column)."""
        s = self.stopping
        gmax = point.grad_norms[1]
        stall = None
        if previous is not None and last is not None and not last.held_back:
            stall = self._stall_test(point, previous, gmax)
            if stall is not None and last.partial_solve:
                # first, whatever stops the run below: the checkpoint taken after this test
                # (the one a resume starts from) then asks for the same solve
                self.stepper.state["cg_tight"] = 1.0
                stall = None
        if gmax <= s.gradient_tolerance and s.gradient_tolerance > 0:
            return StopReason.GRADIENT_TOLERANCE, (
                f"converged: gradient max-norm {gmax:.3g} <= gradient_tolerance "
                f"{s.gradient_tolerance:g}"
            )
        if stall is not None:
            return stall
        # after the tests the point itself ends the run by: a cancel (or a shutdown) that
        # lands where the run ends anyway lets it end so, as it would uninterrupted; a
        # checkpoint taken here would resume without the step the stall tests judge
        if self.cancel_token.cancelled:
            return StopReason.CANCELLED, f"cancelled before iteration {k}"
        if self._unchanged >= UNCHANGED_STEPS and s.gradient_tolerance > 0:
            # the gradient test can no longer be met (with every test off, the caller asked
            # for max_iterations steps, and gets them)
            return StopReason.NO_PROGRESS, (
                f"no further progress possible at machine precision: the last "
                f"{self._unchanged} accepted steps returned the parameters to one of their last "
                f"{RECENT} values (steps at or below their rounding; the loss changed within "
                f"its own), while the gradient max-norm {gmax:.3g} > gradient_tolerance"
            )
        steps, flat_loss, lowest = self._flat
        if steps >= FLAT_STEPS and s.gradient_tolerance > 0:
            return StopReason.NO_PROGRESS, (
                f"no measurable progress at {str(point.x.dtype).removeprefix('torch.')} "
                f"precision: the last {steps:.0f} accepted steps, each under sqrt(eps) |x|, "
                f"left the loss within its rounding of {flat_loss:.10g} and the gradient "
                f"max-norm above its low of {lowest:.3g} (steps driven by rounding noise), "
                f"while the gradient max-norm {gmax:.3g} > gradient_tolerance"
            )
        if k >= s.max_iterations:
            return StopReason.MAX_ITERATIONS, f"reached max_iterations = {s.max_iterations}"
        if s.time_limit_seconds is not None and elapsed >= s.time_limit_seconds:
            return StopReason.TIME_LIMIT, f"ran {elapsed:.3g} s >= time_limit_seconds"
        return None

    def _stall_test(
        self, point: Point, previous: Point, gmax: float
    ) -> tuple[StopReason, str] | None:
        """The function and parameter tests on the step from `previous` to `point`. A step
        that raised the loss past its rounding is no stall: a diverging fixed step (x growing
        geometrically, each step a tiny fraction of |x|) stopped "parameters_stalled" with the
        loss at 1e205 and climbing, as SciPy and Ceres test only steps that lowered it."""
        # rounding absolute near 0 (16 eps max(|loss|, 1)): a float32 exact fit's
        # loss is noise of its own size (a rise of 6% of 8e-11 there is no divergence, and
        # exempting it let two points alternate until max_iterations)
        if point.loss - previous.loss > loss_rounding(previous.loss, point.x.dtype, floor=1.0):
            return None
        still = (  # formatted on a stop
            "while the gradient max-norm {:.3g} > gradient_tolerance"
            if self.stopping.gradient_tolerance > 0
            else "(gradient max-norm {:.3g}; the gradient test is off: gradient_tolerance 0)"
        )
        change = abs(previous.loss - point.loss)
        (ftol, fnote), (xtol, xnote) = self._ftol, self._xtol
        if ftol > 0 and change <= ftol * abs(previous.loss):
            return StopReason.FUNCTION_STALLED, (
                f"stalled: |loss change| {change:.3g} <= function_tolerance x |loss| "
                + fnote
                + still.format(gmax)
            )
        if xtol > 0:  # a tolerance of 0 disables the test: no norms computed for it
            dx = vector_norm(point.x - previous.x)
            if dx <= xtol * (vector_norm(previous.x) + xtol):
                return StopReason.PARAMETERS_STALLED, (
                    f"stalled: step norm {dx:.3g} <= parameter_tolerance x (|x| + "
                    "parameter_tolerance) " + xnote + still.format(gmax)
                )
        return None

    def _note_flat(self, point: Point, new_point: Point, step: Step) -> None:
        """Count an accepted step towards FLAT_STEPS, or start the count again."""
        dtype = point.x.dtype
        steps, flat_loss, lowest = self._flat
        gmax = new_point.grad_norms[1]
        noise = step.loss_noise  # what the step's policy took as noise, if more
        flat = abs(new_point.loss - point.loss) <= max(loss_rounding(point.loss, dtype), noise)
        # the step's size only where it can matter (the loss tests first: they are floats)
        if step.held_back or not flat or not self._small(point.x, new_point.x):
            self._flat = (0.0, math.nan, math.nan)
        elif (  # the count goes on: no lower loss past its rounding, no clearly lower gradient
            steps
            and new_point.loss >= flat_loss - max(loss_rounding(flat_loss, dtype), noise)
            and gmax >= FLAT_GRADIENT_LOW * lowest
        ):
            self._flat = (steps + 1, flat_loss, lowest)
        else:
            self._flat = (1.0, point.loss, min(point.grad_norms[1], gmax))

    @staticmethod
    def _small(x: torch.Tensor, new_x: torch.Tensor) -> bool:
        """Whether the step from x to new_x is below sqrt(eps) |x|."""
        return vector_norm(new_x - x) <= torch.finfo(x.dtype).eps ** 0.5 * vector_norm(x)

    def _note_unchanged(self, point: Point, new_point: Point) -> None:
        """Count an accepted step that brings x back to one of its last RECENT values. Only a
        step at the scale of rounding is looked at (the loss changed within loss_rounding, a
        float compare first; then x moved by at most about an ulp, 2 eps |x|), so the
        digests are taken only there: steps may cycle among points whose losses differ in the
        last bits."""
        dtype = point.x.dtype
        if abs(new_point.loss - point.loss) > loss_rounding(point.loss, dtype) or (
            vector_norm(new_point.x - point.x) > 2 * torch.finfo(dtype).eps * vector_norm(point.x)
        ):
            self._unchanged, self._recent = 0, []
            return
        state = self.stepper.state  # as the next step will find it
        if not self._recent:  # point.x's, with the state its step found (its checkpoint's)
            before = {k: v for k, v in self._checkpoint.state.items() if k not in RUN_KEYS}
            self._recent = [_digest(point.x, before)]
        new = _digest(new_point.x, state)
        self._unchanged = self._unchanged + 1 if new in self._recent else 0
        self._recent = [*self._recent[1 - RECENT :], new]

    def _iterate(self) -> Iterator[StepRecord]:
        repeat = self._moved_after is not None  # the checkpoint's iteration: tested already
        started = time.perf_counter()
        k = self.start_iteration
        label = self.stepper.backend_label
        point = self.stepper.evaluate(self.params)
        if not point.is_finite():
            self._finish(
                StopReason.NON_FINITE,
                "the loss or its derivatives are not finite at the initial parameters",
            )
            return
        previous_loss = self._previous_loss
        previous: Point | None = None
        last: Step | None = None  # the step from `previous`
        while True:
            t0 = time.perf_counter()
            stop = None if repeat else self._stop_test(k, point, previous, t0 - started, last)
            # after the stop test, which may ask the next solve for more (cg_tight)
            self._checkpoint = Checkpoint(k, point.x, self._state(previous_loss))
            step: Step | None = None
            damping = None  # the damping past the cap, when the step gave up on it
            if stop is None:
                try:
                    step = self.stepper.step(point)
                except RoundingStall as exc:
                    stop = StopReason.NO_PROGRESS, str(exc)
                except LineSearchFailed as exc:
                    stop = StopReason.LINE_SEARCH_FAILED, str(exc)
                except NoProgress as exc:
                    stop = StopReason.NO_PROGRESS, str(exc)
                    damping = exc.damping
                except (FloatingPointError, torch.linalg.LinAlgError) as exc:
                    stop = StopReason.SOLVER_FAILED, str(exc)
                except Cancelled as exc:  # an evaluation elsewhere was cancelled (asktell)
                    stop = StopReason.CANCELLED, f"cancelled during iteration {k}: {exc}"
            new_point: Point | None = None
            if step is not None and step.accepted:
                try:
                    new_point = self.stepper.evaluate(step.x_new)
                except Cancelled as exc:
                    stop = StopReason.CANCELLED, f"cancelled during iteration {k}: {exc}"
                    step = None
                if new_point is not None and not new_point.is_finite():
                    stop = (
                        StopReason.NON_FINITE,
                        (
                            f"the step from iteration {k} reached a non-finite loss or "
                            f"derivative; parameters of iteration {k} kept"
                        ),
                    )
                    new_point = None
            record = _record(k, point, previous_loss, label, step)
            if damping is not None:
                record.damping = damping
            now = time.perf_counter()
            record.iteration_seconds = now - t0
            record.cumulative_seconds = now - started
            if repeat:  # redone here: its time was counted where the run moved from
                repeat, started = False, now - self._moved_after
            self.last_record = record
            if stop is not None:
                if point.curvature is not None and self.stepper.options.curvature == "hessian":
                    gauge = self.objective.project_step if self.objective.has_gauge else None
                    verdict, record.negative_eigenvalues = end_point(
                        point.curvature, gauge, self.objective.convex, self.objective.num_rows
                    )
                    # the verdict says what a stationary point is: only where the first-order
                    # condition holds (elsewhere "minimum" would describe H alone)
                    record.end_point = verdict if stop[0].converged else ""
                    self._finish(*_second_order_verdict(stop, record))
                else:
                    self._finish(*stop)
                yield record
                return
            yield record
            previous_loss = point.loss
            if new_point is not None:
                self._note_unchanged(point, new_point)
                if self.method != "gradient_descent":  # not judged by FLAT_STEPS
                    self._note_flat(point, new_point, step)
                previous, point, last = point, new_point, step
                self.params = point.x
            else:
                previous = None
                point = self.stepper.revisit(point)
            k += 1
