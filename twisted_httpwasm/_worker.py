"""Dedicated guest threads with batched hand-offs back to the reactor.

``deferToThread`` costs a queue hand-off, a thread wake-up and a reactor
wake-up (``callFromThread`` writes to the waker pipe) for every call.  Under
load the reactor holds the GIL while it parses requests, so each lone
wake-up also waits for the GIL.  :class:`GuestWorkers` keeps the same
contract as the thread runner (work runs in a worker, continuations on the
reactor thread) with dedicated threads and a C queue, and results go back in
batches: one reactor wake-up serves every result that is ready by then.

Measured here, one thread gives the best throughput (more threads only fight
over the GIL), but one slow guest would then hold up every other request.  So
the pool starts with one thread and adds another (up to ``max_size``) when
work waits while every thread has been busy with one call for longer than
:data:`STALL` (a monitor thread looks every STALL while work is queued):
fast guests share one thread, slow ones cannot starve them.  Threads are
never removed, so the count stays stable under load.

No thread starts before the first call: ``twistd`` (without ``-n``) loads the
guests and then forks to daemonize, and threads do not survive a fork.  The
first :meth:`GuestWorkers.run` in a process starts them, and a forked child
forgets the parent's threads and queued work (``os.register_at_fork``).
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.logger import Logger

__all__ = ["STALL", "GuestWorkers", "workers_for"]

T = TypeVar("T")

_Item = tuple[Callable[[], Any], Callable[[Any], None], Callable[[BaseException], None]]
_STOP: Any = object()

#: Seconds one call may hold every worker before another thread is added.
STALL = 0.005
_log = Logger(namespace="httpwasm")


class GuestWorkers:
    """Daemon threads (1 to ``max_size``) that run guest calls for one reactor."""

    def __init__(self, reactor: Any, max_size: int = 8, name: str = "httpwasm-guest", clock: Any = time.monotonic):
        if max_size < 1:
            raise ValueError("a guest worker pool needs at least one thread")
        self._reactor: IReactorFromThreads = reactor
        self._name = name
        self._clock = clock
        self.max_size = max_size
        self._reset()
        _every_workers.add(self)
        if IReactorCore.providedBy(reactor):
            reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def _reset(self) -> None:
        """No thread, nothing queued: the state before the first call (and in a forked child)."""
        self._started = False
        self._calls: SimpleQueue[_Item] = SimpleQueue()
        self._done: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._wake_scheduled = False
        self._busy_since: list[float | None] = []  # per thread: when its current call began
        self._threads: list[threading.Thread] = []
        self._grow_lock = threading.Lock()
        self._stopping = threading.Event()
        self._queued = threading.Event()  # set while work may be waiting: the monitor watches

    def _start(self) -> None:
        """Start the first thread and the monitor (once per process, on the first call)."""
        with self._grow_lock:
            if self._started or self._stopping.is_set():
                return
            self._started = True
            threading.Thread(target=self._monitor, name=f"{self._name}-monitor", daemon=True).start()
        self._add_thread()

    @property
    def size(self) -> int:
        return len(self._threads)

    def _add_thread(self) -> None:
        with self._grow_lock:
            index = len(self._threads)
            self._busy_since.append(None)
            thread = threading.Thread(target=self._serve, args=(index,), name=f"{self._name}-{index}", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _stalled(self) -> bool:
        """Every thread has been inside one call for longer than STALL."""
        now = self._clock()
        return all(since is not None and now - since > STALL for since in self._busy_since)

    def _monitor(self) -> None:
        """While work is queued, add a thread once every thread has stalled.

        A plain thread, not a reactor timer: it needs no reactor, and it leaves
        no pending delayed call behind in tests.
        """
        queued, stopping = self._queued, self._stopping
        while not stopping.is_set():
            queued.wait()
            if stopping.wait(STALL):
                return
            queued.clear()  # cleared before looking, so work queued from now on sets it again
            if self._calls.empty():
                continue
            queued.set()
            if len(self._threads) < self.max_size and self._stalled():
                self._add_thread()

    def run(
        self,
        work: Callable[[], T],
        on_result: Callable[[T], None],
        on_error: Callable[[BaseException], None],
    ) -> None:
        """Queue ``work``; its continuation runs later on the reactor thread."""
        if not self._started:
            self._start()
        self._calls.put((work, on_result, on_error))
        if not self._queued.is_set():
            self._queued.set()

    def stop(self) -> None:
        """Let every thread finish what is queued, then exit."""
        self._stopping.set()
        self._queued.set()
        for _ in self._threads:
            self._calls.put(_STOP)

    def _serve(self, index: int) -> None:
        calls = self._calls
        done = self._done
        busy_since = self._busy_since
        clock = self._clock
        while True:
            item = calls.get()
            if item is _STOP:
                return
            work, on_result, on_error = item
            busy_since[index] = clock()
            try:
                done.append((on_result, work()))
            except BaseException as error:  # noqa: BLE001 - handed to the request, never lost
                done.append((on_error, error))
            busy_since[index] = None
            # One reactor wake-up serves every result that lands before the reactor runs it.
            if not self._wake_scheduled:
                self._wake_scheduled = True
                self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """Reactor side: run every continuation that is ready."""
        self._wake_scheduled = False  # cleared first, so a result appended from now on schedules another wake
        done = self._done
        while done:
            continuation, value = done.popleft()
            try:
                continuation(value)
            except Exception:  # noqa: BLE001 - one request's bug must not strand the others' results
                _log.failure("continuation of a guest call failed")


_every_workers: weakref.WeakSet[GuestWorkers] = weakref.WeakSet()


def _forget_threads_after_fork() -> None:
    """In a forked child: the parent's threads are gone; start afresh on the next call."""
    global _shared_lock
    _shared_lock = threading.Lock()  # a parent's thread may have held it at the fork
    for workers in list(_every_workers):
        workers._reset()


os.register_at_fork(after_in_child=_forget_threads_after_fork)

_shared: dict[int, GuestWorkers] = {}
_shared_lock = threading.Lock()


def workers_for(reactor: Any) -> GuestWorkers:
    """The guest workers every thread-mode resource on ``reactor`` shares."""
    with _shared_lock:
        workers = _shared.get(id(reactor))
        if workers is None:
            workers = _shared[id(reactor)] = GuestWorkers(reactor)
        return workers
