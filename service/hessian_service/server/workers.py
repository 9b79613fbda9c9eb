"""Runs iterated in worker processes, so a run's Python work holds no lock the server needs.

With `--run-processes` a run whose objective the server evaluates (not an Optimize run)
iterates the engine's `Run` in a child process, one per `--workers`, spawned at start,
rather than on a thread of the server: the server's GIL stays free for the calls, the store
and the streams, and the runs' own Python work proceeds on other cores. A run that starts
while no other is queued or executing begins on a server thread instead and moves to a
child once it has iterated `--process-after-ms` (`MovingRun`), so a short job pays no hop
between processes.

`ProcessRun` is the server's side of one run. It iterates like an engine `Run` (records; then
`stop_reason`, `converged`, `message`, `last_record` and `checkpoint()`), so
`RunManager._execute` drives either the same way. The child sends records in batches: a
record goes as soon as BATCH_SECONDS have passed since the last send (or BATCH_RECORDS wait),
else within BATCH_SECONDS from the child's flusher thread, never held while the next
iteration runs; each with the checkpoint the server stores at its iteration (every
`checkpoint_every`), then the run's end. A child keeps up to
CACHED_OBJECTIVES objectives within --problem-cache-bytes, so the runs of one problem send
its data once; the server chooses which, and an objective it lets go of (a deleted problem)
leaves the children at their next run. A child that dies (killed, out of memory) ends its run
with `WorkerLost`, and a new child takes its place.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import logging
import math
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import torch

from ..engine import CancelToken, Checkpoint, MethodOptions, Run, StepRecord, StopCriteria
from ..engine.objectives.base import Objective
from ..engine.records import StopReason
from ..engine.solvers.asktell import RemoteObjective
from .logs import configure_logging
from .problems import objective_bytes

log = logging.getLogger(__name__)
NUMPY_DTYPES = (torch.float64, torch.float32, torch.int64, torch.int32, torch.bool, torch.uint8)
BATCH_RECORDS = 256  # records per message from a child, at most
BATCH_SECONDS = 0.005  # a record is sent at once when the last send is this old
CACHED_OBJECTIVES = 4  # objectives a child keeps for the next runs of the same problem
# the signals on which the server drains (its children ignore them: the server stops them)
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_SECONDS = 0.05  # how often a waiting server thread looks at its run's cancel token
CHILD_POLL_SECONDS = 0.001  # how often a child's run looks for a cancel message, at most
START_SECONDS = 120.0  # a child must be ready this soon after it is spawned
BEGIN_SECONDS = 30.0  # a child must have built a run sent to it this soon (else it is killed)
CANCEL_SECONDS = 60.0  # a child must end a cancelled run this soon (else it is killed)
RESPAWN_RETRY_SECONDS = 30.0  # after a child failed to spawn, the next try waits this long
UNANSWERED = "did not answer in time and was killed"  # how a child killed by the deadlines ended
CHILD = (  # a worker process's program; its arguments: its socket's descriptor, the server
    # (its pid) and the server's log format and level
    "import sys\n"
    "from multiprocessing.connection import Connection\n"
    f"from {__name__} import child_main\n"
    "child_main(Connection(int(sys.argv[1])), int(sys.argv[2]), *sys.argv[3:5])\n"
)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


class WorkerLost(Exception):
    """The child process iterating a run died (killed, out of memory): the run stops there."""


class _Pickler(pickle.Pickler):
    """Plain pickle (torch's multiprocessing reductions would send tensors as shared-memory
    handles that only a multiprocessing child may open), with CPU tensors of numpy's dtypes
    sent as numpy arrays: a tenth of the time of a tensor's own reduction, both ways."""

    def reducer_override(self, obj: Any) -> Any:
        if (
            type(obj) is torch.Tensor
            and obj.device.type == "cpu"
            and obj.dtype in NUMPY_DTYPES
            and not obj.requires_grad
        ):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


def _dumps(value: Any) -> memoryview:
    """`value` pickled by _Pickler."""
    buffer = io.BytesIO()
    _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getbuffer()


def _send(conn: Connection, *message: Any) -> None:
    """Send a message (pickled by _Pickler)."""
    conn.send_bytes(_dumps(message))


def _receive(conn: Connection) -> tuple[Any, ...]:
    """The next message `_send` sent."""
    return pickle.loads(conn.recv_bytes())


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling (with the child's traceback as a note), else a
    RuntimeError naming its type and message."""
    exc.add_note("in the run's worker process:\n" + "".join(traceback.format_exception(exc)))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


class _PolledToken(CancelToken):
    """A child's cancel token for one run: set by a cancel message, which it reads from the
    socket when asked (runs ask between iterations), at most every CHILD_POLL_SECONDS."""

    def __init__(self, conn: Connection, seq: int) -> None:
        super().__init__()
        self._conn, self._seq = conn, seq
        self._next_poll = 0.0

    @property
    def cancelled(self) -> bool:
        """Whether the server cancelled the run (or its deadline passed)."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + CHILD_POLL_SECONDS
            while self._conn.poll(0):
                _obey(_read(self._conn), self, self._seq)
        return super().cancelled


def _read(conn: Connection) -> tuple[Any, ...]:
    """The server's next message; the child exits when the server is gone."""
    try:
        return _receive(conn)
    except (EOFError, OSError):
        os._exit(0)  # nothing to report to


def _obey(message: tuple[Any, ...], token: CancelToken | None, seq: int) -> None:
    """Act on a message that is not a run: exit, or cancel run `seq` (a late cancel of a run
    that ended already names another run, and is ignored)."""
    if message[0] == "exit":
        os._exit(0)
    if message[0] == "cancel" and token is not None and message[1] == seq:
        token.cancel()


def _tell(conn: Connection, *message: Any) -> None:
    """A child's send: when the server is gone there is no one to tell, so exit quietly."""
    try:
        _send(conn, *message)
    except OSError:
        os._exit(0)


class _Outbox:
    """A child's messages to the server. A run's records go in batches: at once when the
    last send is BATCH_SECONDS old or BATCH_RECORDS wait, else by the flusher thread once
    the run has added none for BATCH_SECONDS, so a record does not wait on the next
    iteration (only on a call that holds the interpreter lock), and a fast run's thread
    is not interrupted to send what it would send itself (A/B: 2,000 gradient-descent
    records through the service in the same time as without the flusher). The record a
    run stops at stays for the end, which says which it is (ProcessRun finishes the run
    there). Records and checkpoints may be pickled while the next iteration runs: they are
    snapshots the run never changes."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._cond = threading.Condition()
        self._seq = 0
        self._batch: list[StepRecord] = []
        self._marks: list[tuple[int, Checkpoint]] = []  # (index in batch, checkpoint there)
        self._stop_index: int | None = None  # the record the run stopped at: held for the end
        self._sent = self._added = 0.0
        self._armed = False  # the flusher waits for the last send to age: no wake-up needed
        threading.Thread(target=self._flush_loop, name="records-flush", daemon=True).start()

    def tell(self, *message: Any) -> None:
        """Send a message now (nothing is queued before a run's first record)."""
        with self._cond:
            _tell(self._conn, *message)

    def begin(self, seq: int) -> None:
        """What follows is run `seq`'s."""
        with self._cond:
            self._seq, self._batch, self._marks, self._stop_index = seq, [], [], None
            self._sent = time.monotonic()

    def started(self, backend: str) -> None:
        """The run is built: its records follow."""
        self.tell("started", self._seq, backend)

    def add(self, record: StepRecord, checkpoint: Checkpoint | None, stops: bool) -> None:
        """Queue a record (with the checkpoint stored at it; `stops`: the run stopped there)."""
        with self._cond:
            self._batch.append(record)
            self._added = now = time.monotonic()
            if checkpoint is not None:
                self._marks.append((len(self._batch) - 1, checkpoint))
            if stops:
                self._stop_index = len(self._batch) - 1
            elif len(self._batch) >= BATCH_RECORDS or now - self._sent >= BATCH_SECONDS:
                self._send_batch()
            elif not self._armed:
                self._cond.notify()  # the flusher sends it when the last send is old enough

    def end(self, kind: str, *rest: Any) -> None:
        """The run's end with the records still queued: ("end", end) with the stop record's
        index, or ("error", checkpoint, exception)."""
        with self._cond:
            head = (kind, self._seq, self._batch, self._marks)
            if kind == "end":
                head += (self._stop_index,)
            _tell(self._conn, *head, *rest)
            self._batch, self._marks, self._stop_index = [], [], None

    def _send_batch(self) -> None:
        _tell(self._conn, "records", self._seq, self._batch, self._marks)
        self._batch, self._marks, self._sent = [], [], time.monotonic()

    def _flush_loop(self) -> None:
        with self._cond:
            while True:
                if not self._batch or self._stop_index is not None:
                    self._armed = False
                    self._cond.wait()
                    continue
                # only once the run has added nothing for BATCH_SECONDS (it is inside an
                # iteration): while records keep coming the run's thread sends them itself
                wait = max(self._sent, self._added) + BATCH_SECONDS - time.monotonic()
                if wait > 0:
                    # armed: records keep coming without waking it; it looks again then
                    self._armed = True
                    self._cond.wait(wait)
                    continue
                try:
                    self._send_batch()
                except Exception:  # records held for good would stall the run's watchers
                    log.exception("a run worker process could not send its records")
                    os._exit(1)  # the server ends the run INTERRUPTED and replaces the child


def _child_run(
    outbox: _Outbox, conn: Connection, job: tuple[Any, ...], cache: dict[int, Objective]
) -> None:
    """Iterate one run and send its records, checkpoints and end (or its error)."""
    (_, seq, key, objective, params, options, stopping, resume, threads, every, drop, keep,
     moved_after) = job  # fmt: skip
    for gone in drop:  # the server chose what this child keeps (Worker.forget, Worker.cache)
        cache.pop(gone, None)
    cancel = _PolledToken(conn, seq)
    outbox.begin(seq)
    run: Run | None = None
    try:
        if objective is None:
            objective = cache[key]
        elif keep:
            cache[key] = objective
        if threads and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        run = Run(
            objective,
            params,
            options,
            stopping,
            cancel=cancel,
            resume=resume,
            moved_after=moved_after,
        )
        outbox.started(run.backend)
        for record in run:
            stored = record.iteration > run.start_iteration and record.iteration % every == 0
            outbox.add(record, run.checkpoint() if stored else None, run.stop_reason is not None)
        end = (run.stop_reason, run.message, run.converged, run.last_record, run.checkpoint())
        outbox.end("end", end)
    except Exception as exc:  # reported to the server, which decides what it means
        checkpoint = run.checkpoint() if run is not None else None
        outbox.end("error", checkpoint, _portable(exc))


def _die_with(server: int) -> None:
    """Be killed when the server dies, even inside an iteration (Linux: PR_SET_PDEATHSIG; it
    follows the server thread that spawned the child, which lives as long as the server's
    run workers). Elsewhere the closed socket ends the child at its next look."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server:  # it died before the signal was asked for
        os._exit(0)


def child_main(conn: Connection, server: int, log_format: str, log_level: str) -> None:
    """A worker process of server `server` (its pid): iterate the runs it sends, one at a
    time, until it exits; it logs as the server does (`log_format`, `log_level`).

    Interrupts and terminations are the server's to handle (it stops its runs, then its
    children): a child ignores them, and exits when told, when the server's socket closes,
    or when the server dies."""
    for signum in DRAIN_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _die_with(server)
    configure_logging(log_format, log_level)
    log.info("run worker process %d of server %d ready", os.getpid(), server)
    cache: dict[int, Objective] = {}
    outbox = _Outbox(conn)
    outbox.tell("ready", 0)
    while True:
        message = _read(conn)
        if message[0] == "run":
            _child_run(outbox, conn, message, cache)
        else:
            _obey(message, None, 0)


class Worker:
    """One child process and the server's end of its socket; one run at a time.

    The child is a fresh interpreter running `child_main`, not a multiprocessing child:
    nothing of the server's main module runs again in it.
    """

    def __init__(self, logs: tuple[str, str]) -> None:
        """Spawn the child; it logs in the server's (format, level) `logs`."""
        ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(theirs.fileno()), str(os.getpid()), *logs],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C is the server's, not the child's
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.held: OrderedDict[int, int] = OrderedDict()  # objectives the child keeps: bytes
        self.lost = False
        self.unanswered = False  # killed for not answering in time

    def kill_unanswered(self) -> None:
        """Kill a child that has not answered in time (stopped or wedged): the server's
        blocked send or receive then fails, and the child is replaced."""
        self.unanswered = True
        with contextlib.suppress(OSError):
            self.process.kill()

    def wait_ready(self) -> None:
        """Wait for the child's first message (its imports done)."""
        if not self.conn.poll(START_SECONDS):
            raise RuntimeError(f"a run worker process did not start in {START_SECONDS:g} s")
        self.receive()

    def receive(self) -> tuple[Any, ...]:
        """The child's next message; WorkerLost when it has died (or sent what the server
        cannot read: the stream is then out of step, and the child is replaced)."""
        try:
            data = self.conn.recv_bytes()
        except (EOFError, OSError):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1.0)
            raise self.lose(self._ended_how()) from None
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise self.lose(f"sent a message the server cannot read ({exc})") from None

    def _ended_how(self) -> str:
        """How the child ended, for the error that ends its run."""
        code = self.process.returncode
        if self.unanswered:
            return UNANSWERED
        return f"was killed by signal {-code}" if code and code < 0 else f"exited ({code})"

    def lose(self, what: str) -> WorkerLost:
        """Mark the child lost (it is replaced) and return the error that ends its run."""
        self.lost = True
        return WorkerLost(f"the worker process iterating the run {what}")

    def send(self, *message: Any) -> None:
        """Send a message (an error pickling it is raised as is); WorkerLost when the child
        is gone."""
        data = _dumps(message)
        try:
            self.conn.send_bytes(data)
        except (OSError, ValueError):
            raise self.lose(UNANSWERED if self.unanswered else "is gone") from None

    def holds(self, key: int) -> bool:
        """Whether the child keeps objective `key` (then a run message need not carry it)."""
        if key in self.held:
            self.held.move_to_end(key)
            return True
        return False

    def forget(self, dead: set[int]) -> list[int]:
        """The keys of objectives the server no longer holds: the child lets go of them."""
        drop = [held for held in self.held if held in dead]
        for held in drop:
            del self.held[held]
        return drop

    def cache(self, key: int, nbytes: int, budget: int) -> tuple[list[int], bool]:
        """Account for a run of objective `key` (`nbytes`) that the child does not keep: the
        least recently used keys the child must let go of first, so that it fits in
        CACHED_OBJECTIVES and `budget` bytes, and whether the child keeps it (not one larger
        than the budget). The server decides and the child obeys: both hold the same keys."""
        drop, keep = [], nbytes <= budget
        while (
            keep
            and self.held
            and (len(self.held) >= CACHED_OBJECTIVES or sum(self.held.values()) + nbytes > budget)
        ):
            drop.append(self.held.popitem(last=False)[0])
        if keep:
            self.held[key] = nbytes
        return drop, keep

    def ask_exit(self) -> None:
        """Tell the child to exit (it does between runs, or when the socket closes)."""
        with contextlib.suppress(OSError, ValueError):
            _send(self.conn, "exit", 0)

    def stop(self, wait: float = 1.0) -> None:
        """Ask the child to exit; kill it if it has not within `wait` seconds (it may be
        inside an iteration). Never raises."""
        self.ask_exit()
        try:
            self.process.wait(wait)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(5.0)
        self.conn.close()


class ProcessRun:
    """The server's side of one run iterated by a worker: an engine Run's interface."""

    def __init__(
        self,
        worker: Worker,
        job: tuple[Any, ...],
        cancel: CancelToken,
        start: Checkpoint,
    ) -> None:
        """The run `job` (a "run" message) on `worker`, from `start`; `begin` sends it."""
        self._worker, self._job, self._seq, self._cancel = worker, job, job[1], cancel
        self._cancel_sent: float | None = None  # time.monotonic() when it was sent
        self.stop_reason: StopReason | None = None
        self.message = ""
        self.converged = False
        self.last_record: StepRecord | None = None
        self._checkpoint = start
        self.start_iteration = start.iteration
        self.ended = False
        self.sent = False
        self.backend = ""
        self._iterator = self._records()

    def begin(self) -> None:
        """Send the run and wait until the child has built it (raising what building it
        raised); a child that has not within BEGIN_SECONDS is killed (a stopped one would
        hold the send itself once the run fills the socket's buffer)."""
        lock, answered = threading.Lock(), [False]

        def unanswered() -> None:  # the timer's: never a child that has answered
            with lock:
                if not answered[0]:
                    self._worker.kill_unanswered()

        watchdog = threading.Timer(BEGIN_SECONDS, unanswered)
        watchdog.daemon = True
        watchdog.start()
        try:
            try:
                self._worker.send(*self._job)
            except Exception:  # unsent: the server's view of the child's cache is now wrong
                self._worker.lost = True
                raise
            self.sent = True
            started = self._receive()
        finally:
            with lock:
                answered[0] = True
            watchdog.cancel()
        if started[0] == "error":
            self._raise(started)
        self.backend = started[2]

    def __iter__(self) -> Iterator[StepRecord]:
        return self._iterator

    def __next__(self) -> StepRecord:
        return next(self._iterator)

    @property
    def pid(self) -> int:
        """The worker process's id."""
        return self._worker.process.pid

    def checkpoint(self) -> Checkpoint:
        """The latest checkpoint the worker sent (at a stored iteration, or the run's end)."""
        return self._checkpoint

    def _send_cancel(self) -> None:
        if self._cancel_sent is None:
            self._cancel_sent = time.monotonic()
            self._worker.send("cancel", self._seq)

    def _receive(self) -> tuple[Any, ...]:
        """The worker's next message; the run's cancel token is passed on (checked before
        each message, and every POLL_SECONDS while waiting). A child that has not ended a
        cancelled run CANCEL_SECONDS after the cancel is killed (WorkerLost): a stopped or
        wedged child must not hold the run's cancel for ever."""
        while True:
            if self._cancel_sent is None and self._cancel.cancelled:
                self._send_cancel()
            if self._worker.conn.poll(POLL_SECONDS):
                break
            cancelled_at = self._cancel_sent
            if cancelled_at is not None and time.monotonic() >= cancelled_at + CANCEL_SECONDS:
                self._worker.kill_unanswered()
                raise self._worker.lose(UNANSWERED)
        message = self._worker.receive()
        if message[1] != self._seq:
            raise self._worker.lose(f"sent {message[0]!r} of another run")
        if message[0] in ("end", "error"):
            self.ended = True
        return message

    def _raise(self, message: tuple[Any, ...]) -> None:
        """End with the child's error, at the checkpoint it had reached (if it had built
        its Run), as the engine's Run would."""
        *_, checkpoint, exc = message
        if checkpoint is not None:
            self._checkpoint = checkpoint
        raise exc

    def _records(self) -> Iterator[StepRecord]:
        while True:
            message = self._receive()
            kind, _, batch, marks = message[:4]
            stop_index, end = (message[4], message[5]) if kind == "end" else (None, None)
            checkpoints = dict(marks)
            for index, record in enumerate(batch):
                if index in checkpoints:
                    self._checkpoint = checkpoints[index]
                if index == stop_index:
                    self._finish(end)
                self.last_record = record
                yield record
            if kind == "error":
                self._raise(message)
            if kind == "end":
                self._finish(end)
                return

    def _finish(self, end: tuple[Any, ...]) -> None:
        self.stop_reason, self.message, self.converged, self.last_record, self._checkpoint = end

    def drain(self) -> None:
        """Wait for the worker to end this run (cancelled if the server stopped reading)."""
        if self.ended or not self.sent:
            return
        try:
            self._send_cancel()
            while not self.ended:
                self._receive()
        except Exception:  # whatever is left unread would be the next run's: replace it
            self._worker.lost = True


class MovingRun:
    """A run that starts on the calling thread (an engine Run) and moves to a worker process,
    from the checkpoint at its last record, once it has iterated `after` seconds and a
    worker is idle: a short run pays no hop between processes, a long one leaves the
    server's interpreter lock to the calls and the streams. Its records are the engine
    Run's either way: the moved run (Run's `moved_after`) repeats that record, which is
    dropped, without testing it again, and keeps the run's clock.

    The move repeats one iteration: it waits until that costs at most 1 / REPEAT_SHARE of
    the time the run has iterated (a run of long iterations spends little of its time in
    the per-record work a move takes off the server). A run stays where it is when it is
    cancelled, when no worker is idle (it looks again `after` seconds later) and, for good,
    once a worker failed to take it."""

    REPEAT_SHARE = 10

    def __init__(
        self,
        pool: WorkerPool,
        after: float,
        run_id: str,
        objective: Objective,
        params: torch.Tensor,
        options: MethodOptions,
        stopping: StopCriteria,
        *,
        cancel: CancelToken,
        resume: Checkpoint | None,
    ) -> None:
        self._pool, self._after, self._run_id, self._objective = pool, after, run_id, objective
        self._options, self._stopping, self._cancel = options, stopping, cancel
        here = Run(objective, params, options, stopping, cancel=cancel, resume=resume)
        self._run: Run | ProcessRun = here
        self._last_here: StepRecord | None = None
        self._due = time.perf_counter() + after
        self._held = contextlib.ExitStack()
        self.start_iteration = here.start_iteration
        self.backend = here.backend
        self._iterator = self._records(here)

    @property
    def moved(self) -> bool:
        """Whether the run iterates in a worker process now."""
        return isinstance(self._run, ProcessRun)

    @property
    def stop_reason(self) -> StopReason | None:
        return self._run.stop_reason

    @property
    def message(self) -> str:
        return self._run.message

    @property
    def converged(self) -> bool:
        return self._run.converged

    @property
    def last_record(self) -> StepRecord | None:
        return self._run.last_record or self._last_here

    def checkpoint(self) -> Checkpoint:
        """The latest checkpoint (the worker's once moved: at least the one it moved from)."""
        return self._run.checkpoint()

    def __iter__(self) -> Iterator[StepRecord]:
        return self._iterator

    def __next__(self) -> StepRecord:
        return next(self._iterator)

    def close(self) -> None:
        """Give the worker back, if the run took one (its run drained first)."""
        self._held.close()

    def _records(self, here: Run) -> Iterator[StepRecord]:
        for record in here:
            yield record
            if self._movable(here, record) and self._move(here, record):
                break
        else:
            return
        for moved in self._run:
            if moved.iteration > record.iteration:
                yield moved

    def _movable(self, here: Run, last: StepRecord) -> bool:
        """Whether to try a move now (after `last`, the run going on)."""
        return (
            time.perf_counter() >= self._due
            and here.stop_reason is None
            and not self._cancel.cancelled
            and last.iteration_seconds * self.REPEAT_SHARE <= last.cumulative_seconds
        )

    def _move(self, here: Run, last: StepRecord) -> bool:
        """Go on in an idle worker from the checkpoint at `last`, if one is idle and takes it;
        then let the run here go (its points and curvature)."""
        start = self._held.enter_context(self._pool.worker(wait=False))
        if start is None:
            self._held.close()
            self._due = time.perf_counter() + self._after
            return False
        checkpoint = here.checkpoint()
        try:
            moved = start(
                self._objective,
                checkpoint.params,
                self._options,
                self._stopping,
                cancel=self._cancel,
                resume=checkpoint,
                moved_after=last.cumulative_seconds,
            )
        except Exception as exc:  # the worker could not take it: it goes on here
            log.warning("run %s stays on its server thread: %s", self._run_id, exc)
            self._held.close()
            self._due = math.inf
            return False
        log.info(
            "run %s moved to worker process %d at iteration %d, after %.0f ms on a server thread",
            self._run_id,
            moved.pid,
            last.iteration,
            last.cumulative_seconds * 1e3,
        )
        self._run, self._last_here = moved, last
        here.close()
        return True


def _kept(key: int, workers: list[Worker]) -> bool:
    """Whether one of `workers`' children keeps objective `key`."""
    return any(key in worker.held for worker in workers)


class WorkerPool:
    """`count` worker processes; each server run thread holds one while its run iterates."""

    def __init__(
        self,
        count: int,
        checkpoint_every: int,
        threads: Callable[[Objective], int] | None = None,
        cache_bytes: int = 256 * 1024**2,
        logs: tuple[str, str] = ("json", "INFO"),
    ) -> None:
        """Spawn `count` children and wait until each is ready; a run's child sends the
        checkpoint of every `checkpoint_every`-th iteration; `threads(objective)` is the torch
        thread count its runs get (None: the child's default); each child keeps objectives
        of at most `cache_bytes` together (--problem-cache-bytes) and logs in the server's
        (--log-format, --log-level) `logs`."""
        self._every = checkpoint_every
        self._logs = logs
        self._threads = threads
        self._cache_bytes = cache_bytes
        # keys of objectives the server no longer holds that some child may still keep
        self._dead: set[int] = set()
        self._idle: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._seq = itertools.count(1)
        # (key, bytes) of each objective runs were sent for, while the server holds it
        self._keys: weakref.WeakKeyDictionary[Objective, tuple[int, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._key_seq = itertools.count(1)
        self._refused: weakref.WeakSet[Objective] = weakref.WeakSet()
        self._respawns: queue.SimpleQueue[Worker | None] = queue.SimpleQueue()
        self._respawner: threading.Thread | None = None
        self._respawn_retry = 0.0  # time.monotonic() before which a failed respawn waits
        self._all: list[Worker] = []
        try:
            for _ in range(count):
                self._all.append(Worker(logs))
            for worker in self._all:
                worker.wait_ready()
        except BaseException:
            self.close()
            raise
        for worker in self._all:
            self._idle.put(worker)

    def takes(self, objective: Objective) -> bool:
        """Whether runs of `objective` go to a worker: not an Optimize run's (its caller's
        stream lives here), and only an objective that survives pickling."""
        if isinstance(objective, RemoteObjective):
            return False
        with self._lock:
            if objective in self._keys:
                return True
            if objective in self._refused:
                return False
        try:
            pickle.loads(_dumps(objective))
        except Exception as exc:
            log.info("runs of a %s iterate on server threads: %s", type(objective).__name__, exc)
            with self._lock:
                self._refused.add(objective)
            return False
        with self._lock:
            if objective not in self._keys:
                key = next(self._key_seq)
                self._keys[objective] = key, objective_bytes(objective)
                # once the server lets go of it (deleted, evicted), so do the children
                weakref.finalize(objective, self._let_go, key)
        return True

    @contextlib.contextmanager
    def moving(self, after: float, run_id: str) -> Iterator[Callable[..., MovingRun]]:
        """Yields `start(objective, params, options, stopping, cancel=, resume=)` -> a
        MovingRun (of `run_id`, as its log lines say) that begins on this thread and moves to
        an idle worker once it has iterated `after` seconds; on exit its worker, if it took
        one, is drained and put back."""
        runs: list[MovingRun] = []

        def start(*args: Any, **kwargs: Any) -> MovingRun:  # the engine Run's arguments
            run = MovingRun(self, after, run_id, *args, **kwargs)
            runs.append(run)
            return run

        try:
            yield start
        finally:
            for run in runs:
                run.close()

    @contextlib.contextmanager
    def worker(self, wait: bool = True) -> Iterator[Callable[..., ProcessRun] | None]:
        """Hold a worker; yields `start(objective, params, options, stopping, cancel=,
        resume=, moved_after=)` -> ProcessRun (the engine Run's arguments), or None when no
        child can be had (the pool is closed, a child died and a new one would not start,
        or, not `wait`ing, none is idle and alive: the caller iterates on its thread). A run
        whose child is lost before it began goes to a fresh child, once. On exit the run is
        drained and the worker put back (a lost one replaced). Not `wait`ing, nothing is
        spawned on this thread (it takes seconds): a child found lost is replaced on a thread
        of its own (`_replace_soon`), and a run whose child is lost as it begins is not
        retried."""
        if self._closed:
            yield None
            return
        try:
            worker = self._idle.get(block=wait)
        except queue.Empty:
            yield None
            return
        dead = worker.lost or worker.process.poll() is not None  # lost, or died idle
        if dead and wait:  # a new child runs this one
            worker = self._replace(worker)
        elif dead and (not worker.lost or time.monotonic() >= self._respawn_retry):
            self._replace_soon(worker)
            yield None
            return
        if worker.lost:  # no new child started: tried again later
            self._idle.put(worker)
            yield None
            return
        runs: list[ProcessRun] = []

        def start(
            objective: Objective,
            params: torch.Tensor,
            options: MethodOptions,
            stopping: StopCriteria,
            *,
            cancel: CancelToken,
            resume: Checkpoint | None,
            moved_after: float | None = None,
        ) -> ProcessRun:
            nonlocal worker
            with self._lock:
                key, nbytes = self._keys[objective]
                dead = set(self._dead)
            threads = self._threads(objective) if self._threads is not None else 0
            origin = resume if resume is not None else Checkpoint(0, params, {})
            retried = False
            while True:
                carried, drop, keep = None, worker.forget(dead), False
                if drop:
                    self._prune_dead()
                if not worker.holds(key):
                    carried = objective
                    evicted, keep = worker.cache(key, nbytes, self._cache_bytes)
                    drop += evicted
                seq, every = next(self._seq), self._every
                job = ("run", seq, key, carried, params, options, stopping, resume, threads,
                       every, drop, keep, moved_after)  # fmt: skip
                run = ProcessRun(worker, job, cancel, origin)
                runs.append(run)  # drained on exit, even if it fails to begin
                try:
                    run.begin()
                    return run
                except WorkerLost as exc:
                    # Lost before the run began: most likely the child died while idle (a
                    # killed child's exit takes milliseconds to show, so the check above can
                    # miss it). The run has done nothing: a fresh child takes it, once (a
                    # run whose objective kills its child on arrival costs two children).
                    if retried or not wait:
                        raise
                    log.warning("%s before its run began; a fresh one takes the run", exc)
                    retried, worker = True, self._replace(worker)
                    if worker.lost:
                        raise

        try:
            yield start
        finally:
            for run in runs:
                run.drain()
            if worker.lost and not wait:
                self._replace_soon(worker)
            else:
                self._idle.put(self._replace(worker) if worker.lost else worker)

    def _let_go(self, key: int) -> None:
        """The server let go of objective `key`: children keeping it drop it at their next
        run (a key no child keeps is done with: keys are never reused). A finalizer: it
        may run inside any locked section of this thread, so it takes no lock (set.add
        and the lookups are atomic)."""
        if _kept(key, list(self._all)):
            self._dead.add(key)

    def _prune_dead(self) -> None:
        """Forget the dead keys no child keeps any more, in place (a key a finalizer adds
        meanwhile stays), so the set stays as small as the children's caches however many
        problems the server has let go of."""
        workers = list(self._all)
        self._dead.difference_update([k for k in list(self._dead) if not _kept(k, workers)])

    def _replace_soon(self, worker: Worker) -> None:
        """Kill a lost child and have the respawning thread replace it (spawning takes
        seconds, and the caller's run goes on meanwhile): the new child, or the lost one if
        none starts (for a caller that waits to try again), is put back once ready. A pool of
        one child, whose runs come one at a time, would otherwise never get it back."""
        with contextlib.suppress(OSError):
            worker.process.kill()
        worker.lost = True
        log.warning("a run worker process (pid %d) was lost; a new one is starting",
                    worker.process.pid)  # fmt: skip
        with self._lock:
            if self._respawner is None:
                # one thread for the pool's life: a child's PR_SET_PDEATHSIG fires when the
                # thread that spawned it exits, not only its process
                self._respawner = threading.Thread(
                    target=self._respawn_loop, name="hessian-worker-respawn", daemon=True
                )
                self._respawner.start()
        self._respawns.put(worker)

    def _respawn_loop(self) -> None:
        """Replace the lost children `_replace_soon` queues, until close() queues None (one
        that does not start is tried again RESPAWN_RETRY_SECONDS later)."""
        while (worker := self._respawns.get()) is not None:
            fresh = worker
            try:
                fresh = self._replace(worker)
            except Exception:  # never let this thread die: its children would go with it
                log.exception("replacing a run worker process failed")
            if fresh.lost:
                self._respawn_retry = time.monotonic() + RESPAWN_RETRY_SECONDS
            self._idle.put(fresh)

    def _replace(self, worker: Worker) -> Worker:
        """A new child in place of a lost one, spawned and ready (`worker` itself, marked
        lost, when the pool is closed or a new one does not start)."""
        worker.stop()
        worker.lost = True
        if self._closed:
            return worker
        try:
            fresh = Worker(self._logs)
        except Exception:
            log.exception("a run worker process could not be spawned")
            return worker
        try:
            fresh.wait_ready()
        except Exception:
            log.exception("a run worker process did not start")
            fresh.stop()
            return worker
        with self._lock:
            if self._closed or worker not in self._all:
                fresh.stop()
                return worker
            self._all[self._all.index(worker)] = fresh
        self._prune_dead()  # what only the lost child kept
        return fresh

    def close(self) -> None:
        """Stop every child: each is told to exit, and killed after a second if it is still
        inside an iteration. No child is spawned after this."""
        with self._lock:
            self._closed = True
            workers, self._all = self._all, []
        self._respawns.put(None)
        for worker in workers:
            worker.ask_exit()
        deadline = time.monotonic() + 1.0
        for worker in workers:
            worker.stop(max(deadline - time.monotonic(), 0.0))
