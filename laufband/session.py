"""A worker's life: online (its row registered, its heartbeat beating), offline; the stop
signal it received; and what must happen at interpreter exit.

Signals: the handler only records the signal, and raises ``Preempted`` where that is
safe: while the loop body (user code) runs and is not inside a laufband call. Anywhere
else (our own store calls, waiting, the lock's internals, ``has_more_jobs``) the loop
acts on it at its next check, or a laufband call made from the loop body raises it on
its way out. No SQL and no waiting ever runs inside a handler; the hand-back happens on
the loop's one way out (graphband._Loop.end). SIGUSR1 asks for a drain instead: the
handler records why, and raises ``Drained`` (the same way) only if the running task does
not fit in the time left (the loop's ``fits``, computed from what is in memory).

Failures: when the loop body raises, the loop only learns that it was left (the
generator is closed while the exception unwinds; Python does not show it the
exception), so it records the failure with the place it happened. If the exception then
reaches the interpreter uncaught, ``sys.excepthook`` (and ``threading.excepthook``)
complete that record with the exception's type, message and traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import traceback
import types
import typing as t
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flufl.lock import Lock

from laufband.config import Settings
from laufband.errors import LaufbandError
from laufband.heartbeat import Heartbeat
from laufband.locking import after_release, in_lock_code
from laufband.signals import DRAIN_SIGNAL, Drained, Preempted
from laufband.states import WorkerState
from laufband.store import Claim, Store, WorkerInfo

log = logging.getLogger(__name__)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _pid_gone(hostname: str, pid: int) -> bool:
    """True if ``pid`` on this host no longer exists (a crashed earlier incarnation)."""
    if hostname != socket.gethostname():
        return False  # cannot tell for other hosts; the heartbeat timeout decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


#: What a worker records of the SLURM job it runs in (its environment variables).
SLURM_VARIABLES = {"job": "SLURM_JOB_ID", "array_job": "SLURM_ARRAY_JOB_ID",
                   "array_task": "SLURM_ARRAY_TASK_ID", "node": "SLURMD_NODENAME"}


def slurm_job() -> dict[str, str] | None:
    """The SLURM job this process runs in, if any."""
    found = {key: os.environ[var] for key, var in SLURM_VARIABLES.items()
             if os.environ.get(var)}
    return found or None


def user_frame() -> types.FrameType | None:
    """The innermost frame outside laufband's own code (where the loop was left)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_HERE):
        frame = frame.f_back
    return frame


def where(frame: types.FrameType | None) -> str:
    if frame is None:
        return "an unknown place"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


class Session:
    """One worker's presence in the database, and its signal and exit bookkeeping.
    Holds no reference to the ``Graphband`` (its finaliser runs ``at_exit``)."""

    def __init__(self, store: Store, settings: Settings, user_lock: Lock | t.Any,
                 allocation_end: float | None = None) -> None:
        self.store = store
        self.settings = settings
        self.allocation_end = allocation_end
        self.heartbeat = Heartbeat(store, settings.identifier, settings.heartbeat_interval,
                                   settings.heartbeat_timeout, settings.max_killed_retries,
                                   user_lock)
        self.online = False
        #: The stop signal received (sticky: a worker that got one runs no more loops).
        self.signal: int | None = None
        #: Why this worker drains: stops claiming and leaves with Drained once what it
        #: runs is done (SIGUSR1, its allocation about to end; sticky like ``signal``).
        self.drain: str | None = None
        #: The drain hands the running task back now (it does not fit in the time left).
        self.hand_back = False
        #: The running loop's "does the current task fit in the time left?" (held weakly).
        self._fits: weakref.WeakMethod | None = None
        #: The loop body runs in the main thread (a signal may raise there).
        self.in_user_code = False
        self._library = 0  # laufband calls in progress from the loop body
        self._main = threading.main_thread().ident
        self._loop_end: weakref.WeakMethod | None = None
        #: A loop has started and not finished its end: its end goes offline itself.
        self.loop_active = False
        self._failure: tuple[Claim, types.CodeType, int] | None = None
        _install_hooks()
        _SESSIONS.add(self)
        # A signal that came inside the lock's own code (a Monitor read in the loop
        # body, say) is raised once this thread holds no database lock any more.
        after_release.append(weakref.WeakMethod(self._raise_if_safe_at_release))

    def _raise_if_safe_at_release(self) -> None:
        if not in_lock_code():
            self._raise_if_safe()

    # ---------------------------------------------------------------- online
    def go_online(self) -> None:
        if self.online:
            return
        s = self.settings
        info = WorkerInfo(s.identifier, socket.gethostname(), os.getpid(), s.labels,
                          s.heartbeat_timeout, s.max_failed_retries, s.max_killed_retries,
                          slurm_job(), self.allocation_end)
        self.store.register_worker(info, _pid_gone)
        self.heartbeat.start()
        self.online = True

    def went_offline(self) -> None:
        """The database says we are offline (a loop's end recorded it): stop beating."""
        self.online = False
        self.heartbeat.stop()

    def go_offline(self) -> None:
        """Leave: hand back anything still held, mark the worker offline, stop beating."""
        if not self.online:
            return
        self.went_offline()
        try:
            self.store.leave(self.settings.identifier, [], WorkerState.OFFLINE)
        except LaufbandError as exc:
            # Often on the way out of an error (the database went bad): report it, but
            # let the error that ended the loop be the one the user sees. A worker not
            # marked offline is declared dead after its heartbeat timeout.
            log.error("could not mark worker %s offline: %s", self.settings.identifier, exc)

    # --------------------------------------------------------------- signals
    def on_signal(self, signum: int) -> None:
        """The stop-signal handler (main thread only)."""
        global _LAST_SIGNAL, _SIGNALS
        if signum == DRAIN_SIGNAL:
            self.start_drain(f"{signal.Signals(signum).name} received")
            return
        self.signal = _LAST_SIGNAL = signum
        _SIGNALS += 1
        self._raise_if_safe()

    def start_drain(self, why: str) -> None:
        """Stop claiming; hand the running task back at once if it does not fit in the
        time left (the first reason stays; safe in a signal handler: no SQL, no wait)."""
        if self.drain is None:
            self.drain = why
        fits = self._fits() if self._fits is not None else None
        if fits is not None and not fits():
            self.hand_back = True
            self._raise_if_safe()

    def follow(self, fits: Callable[[], bool] | None) -> None:
        """The running loop's fit check (a bound method: held weakly), or None."""
        self._fits = weakref.WeakMethod(fits) if fits is not None else None

    def _exit(self) -> SystemExit | None:
        """What to raise in user code now: the stop signal, or a drain's hand-back."""
        if self.signal is not None:
            return Preempted(self.signal)
        return drained(self.drain or "drained") if self.hand_back else None

    def _raise_if_safe(self) -> None:
        """Raise the stop signal received (or a drain's hand-back), if the main thread
        runs user code outside any laufband call and outside the database lock's own
        code (else a later safe point does: the end of the laufband call, the release
        of the lock, the task's end)."""
        if (self.in_user_code and self._library == 0 and not in_lock_code()
                and threading.get_ident() == self._main and (exc := self._exit())):
            self.in_user_code = False
            raise exc

    def enter_user_code(self) -> None:
        """Right before the loop yields a task: from here a signal raises at once."""
        self.in_user_code = True
        if self.signal is not None or self.drain is not None:
            # It came while we claimed: do not start the task.
            self.in_user_code = False
            raise self._exit() or drained(self.drain or "drained")

    def leave_user_code(self) -> None:
        self.in_user_code = False

    @contextmanager
    def library_call(self, raise_pending: bool = True) -> Iterator[None]:
        """Around a laufband call the loop body makes (has_more_jobs, worker.db_lock):
        a signal only records itself inside; it raises when the call returns."""
        if threading.get_ident() != self._main:
            yield
            return
        self._library += 1
        try:
            yield
        finally:
            self._library -= 1
        if raise_pending and self._library == 0 and self.in_user_code and (
                exc := self._exit()):
            self.in_user_code = False
            raise exc

    # ------------------------------------------------------- failures, exit
    def expect_error(self, claim: Claim, frame: types.FrameType | None) -> None:
        """The loop body left the loop at ``frame`` and ``claim`` was recorded failed:
        if an exception from there reaches the interpreter, add it to the record."""
        self._failure = None if frame is None else (claim, frame.f_code, id(frame))

    def add_exception(self, exc: BaseException) -> None:
        pending, self._failure = self._failure, None
        if pending is None or exc.__traceback__ is None:
            return
        claim, code, frame_id = pending
        frames = [frame for frame, _ in traceback.walk_tb(exc.__traceback__)]
        if not any(f.f_code is code and id(f) == frame_id for f in frames):
            return  # another exception than the one that left the loop
        error = traceback.format_exception_only(exc)[-1].strip()
        trace = "".join(traceback.format_exception(exc))
        try:
            self.store.add_error(self.settings.identifier, claim, error, trace)
        except LaufbandError as err:
            log.error("could not record the error of task %r: %s", claim.id, err)

    def track(self, end: Callable[[], None] | None) -> None:
        """The way to end the current loop at exit (a bound method: held weakly)."""
        self._loop_end = weakref.WeakMethod(end) if end is not None else None

    def at_exit(self) -> None:
        """The worker's object was collected, or the interpreter exits: end a loop left
        suspended while everything still works (not at the last garbage collection,
        when imports fail), then go offline.

        A collection can happen at any allocation, also in the middle of another
        worker's transaction on this thread (two workers in one process): going offline
        then would wait for a lock this thread holds. So a collection only starts a
        thread that goes offline; at interpreter exit (the main thread has ended) it is
        done here, and the interpreter waits for that thread too."""
        if threading.main_thread().is_alive():
            threading.Thread(target=self._at_exit, name="laufband-offline").start()
        else:
            self._at_exit()

    def _at_exit(self) -> None:
        # A stop signal now must not cut the hand-back short: record it only.
        with self.library_call(raise_pending=False):
            end = self._loop_end() if self._loop_end is not None else None
            if end is not None:
                try:
                    end()
                except Exception as exc:  # at exit, report and move on
                    log.warning("could not end the loop of worker %s: %s",
                                self.settings.identifier, exc)
            elif self.loop_active:
                # The loop was collected with the worker: its own end (perhaps on a
                # thread of its own) records what finished and goes offline. Going
                # offline here first would hand its completions back.
                return
            self.go_offline()


_SESSIONS: weakref.WeakSet[Session] = weakref.WeakSet()
#: Stop signals this process received, and the last one: a loop during which one
#: arrived hands its task back even if another loop's handler got it (an outer loop
#: whose body ran the inner loop that got it).
_SIGNALS = 0
_LAST_SIGNAL: int | None = None


def signals_received() -> tuple[int, int | None]:
    """How many stop signals this process received, and the last one."""
    return _SIGNALS, _LAST_SIGNAL


#: Drained exits made in this process: a loop whose body was left by one (an inner
#: loop's drain) hands its task back, as for a stop signal.
_DRAINS = 0


def drained(why: str) -> Drained:
    """The exit of a worker that drains (counted: see drains_raised)."""
    global _DRAINS
    _DRAINS += 1
    return Drained(why)


def drains_raised() -> int:
    return _DRAINS


_previous: dict[str, t.Any] = {}


def _install_hooks() -> None:
    """Chain our exception hooks in front of the current ones (once per process)."""
    if _previous:
        return
    _previous["sys"], _previous["threading"] = sys.excepthook, threading.excepthook

    def record(exc: BaseException | None) -> None:
        for session in list(_SESSIONS):
            try:
                session.add_exception(exc)  # type: ignore[arg-type]
            except Exception as err:  # never in the way of the user's own report
                log.error("laufband: could not record the error: %s", err)

    def excepthook(exc_type, exc, tb) -> None:
        record(exc)
        _previous["sys"](exc_type, exc, tb)

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            record(args.exc_value)
        _previous["threading"](args)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook
