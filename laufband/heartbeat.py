"""The background heartbeat: proves this worker alive and declares silent ones dead.

It runs in a daemon thread so the loop body never waits for it, and it never holds the
database lock while user code runs (each beat is one short transaction). Stopping it
never waits for a beat that waits for the database lock: that beat is called off.
"""

from __future__ import annotations

import logging
import threading
import time

from flufl.lock import Lock, LockState

from laufband.errors import LaufbandError
from laufband.locking import Cancelled
from laufband.store import Me, Store

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, store: Store, worker: str, interval: float, timeout: float,
                 max_killed_retries: int, user_lock: Lock | None) -> None:
        self._store = store
        self._worker = worker
        self._interval = interval
        # A gap between our own beats beyond this means we were stalled (see
        # store/workers.heartbeat): halfway between the normal gap and the timeout.
        self._stalled_after = interval + (timeout - interval) / 2
        self._max_killed_retries = max_killed_retries
        self._user_lock = user_lock
        #: The worker's loop state (store.Me), set once it exists: a worker whose
        #: allocation ends reads its runtime estimates at every beat.
        self.me: Me | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Held for each beat: stop() waits for a beat in progress (a daemon thread must
        # not be cut off at exit inside a transaction, holding the lock file) but not
        # for the thread to wake and end, which under load costs a scheduling round.
        self._beating = threading.Lock()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()  # per thread: a stopped one may not have seen it yet
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name=f"laufband-heartbeat-{self._worker}",
            daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        """No beat runs once this returns (a beat that waits for the database lock,
        which the caller may hold, is called off rather than waited for)."""
        stop = self._stop
        stop.set()
        thread, self._thread = self._thread, None
        if thread is None or thread is threading.current_thread():
            return
        lock = self._store.lock
        if lock is not None and lock.held_here():
            return  # the beat cannot be inside a transaction; it gives up waiting
        with self._beating:
            pass

    def _run(self, stop: threading.Event) -> None:
        # Wake at least every refresh interval of the database lock, to keep a long
        # legitimate hold of it by this process alive (the loop body holding
        # worker.db_lock, a huge registration); beat every heartbeat interval.
        lock = self._store.lock
        refresh = lock.refresh_interval if lock is not None else self._interval
        next_beat = time.monotonic() + self._interval
        while not stop.wait(max(0.0, min(refresh, next_beat - time.monotonic()))):
            with self._beating:
                if stop.is_set():
                    return
                if lock is not None:
                    lock.refresh()
                if time.monotonic() >= next_beat:
                    self.beat(stop)
                    next_beat = time.monotonic() + self._interval

    def beat(self, stop: threading.Event | None = None) -> None:
        """One heartbeat: refresh ours, reap dead workers, keep our user lock alive."""
        try:
            alive = self._store.heartbeat(self._worker, self._max_killed_retries,
                                          self._stalled_after,
                                          cancel=stop.is_set if stop is not None else None,
                                          me=self.me)
            if not alive:
                log.warning(
                    "worker %s had been declared dead (paused longer than its heartbeat "
                    "timeout?); its running task was handed to another worker and its late "
                    "result will be rejected", self._worker)
        except Cancelled:
            return
        except LaufbandError as exc:
            # Keep beating: a transient NFS hiccup must not silence a live worker.
            log.error("heartbeat of worker %s failed: %s", self._worker, exc)
        lock = self._user_lock
        try:
            if isinstance(lock, Lock) and lock.state == LockState.ours:
                # A user critical section may outlast the lock lifetime; while we are
                # alive it stays ours, and if we die it expires.
                lock.refresh(unconditionally=True)
        except OSError as exc:  # keep the thread alive; the user's code will see it
            log.error("could not refresh the lock %s: %s", lock.lockfile, exc)
