"""Dedicated guest threads with batched hand-offs back to the reactor.

``deferToThread`` costs a queue hand-off, a thread wake-up and a reactor
wake-up (``callFromThread`` writes to the waker pipe) for every call.  Under
load the reactor holds the GIL while it parses requests, so each lone
wake-up also waits for the GIL.  :class:`GuestWorkers` keeps the same
contract as the thread runner (work runs in a worker, continuations on the
reactor thread) with dedicated threads and a C queue, and results go back in
batches: one reactor wake-up serves every result that is ready by then.

**Slow calls do not hold up fast ones.**  Measured here, one thread gives the
best throughput for fast guests (more threads only fight over the GIL), but a
call that spins until its time limit holds its thread for that long.  So the
pool starts with one thread and grows while work waits and every thread is
stuck in one call: one thread at a time while there are fewer than
:data:`FAST_THREADS` and every call has run for :data:`STALL`; past that, as
many threads as there are calls waiting once every call has run for
:data:`SLOW` (a fast guest waiting for the GIL is not mistaken for a stuck
one).  Wasm runs with the GIL released, so stuck calls cost CPU, not the GIL;
and a thread whose call has run for SLOW gets the lowest CPU priority (Linux:
nice 19 for that thread), so the reactor and the calls that have not stalled
get the CPU first, and ends after that call.  The pool never exceeds
``max_size`` threads (:data:`MAX_THREADS`); with that many calls stuck at
once, further calls wait their turn in order.  A thread idle for
``idle_exit`` seconds ends (the last one stays).

**With the compiled accelerator, a session's call never waits for the GIL.**
The queue is then the accelerator's lane (:class:`_accel.Lane`): the call of
a C session (an accelerated guest that nothing observes) is prepared on the
reactor thread, which holds the GIL anyway (an idle instance pinned, the
request's snapshot taken; a call that would have to make an instance, which
runs guest code, goes the Python way), the guest runs on a worker that does
not hold the GIL, and the worker wakes the reactor through the lane's
eventfd, registered as an internal reader, once per batch; the reactor
finishes each call and runs its continuation.  Everything else goes through
the same queue and the Python loop below, as without the accelerator.

**Calls for clients that left are not started.**  :meth:`GuestWorkers.run`
takes an optional ``still_wanted`` predicate, asked on the worker right before
the call would start; a call no longer wanted is dropped without running
(counted in :attr:`GuestWorkers.dropped`), and its continuations never run.
On the lane, a session's call is asked only once it has waited :data:`STALL`
for a thread (the client can only have left if time passed; asking means
taking the GIL, which the lane's calls otherwise never do).

No thread starts before the first call: ``twistd`` (without ``-n``) loads the
guests and then forks to daemonize, and threads do not survive a fork.  The
first :meth:`GuestWorkers.run` in a process starts them, and a forked child
forgets the parent's threads and queued work (``os.register_at_fork``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any, TypeVar

from twisted.internet.interfaces import IReactorCore, IReactorFromThreads, IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from ..runtime import accel as _accel
from .twisted_internals import add_internal_reader, can_add_internal_reader, remove_internal_reader

__all__ = ["FAST_THREADS", "IDLE_EXIT", "MAX_THREADS", "SLOW", "STALL", "GuestWorkers", "workers_for"]

T = TypeVar("T")

_Item = tuple[Callable[[], Any], Callable[[Any], None], Callable[[BaseException], None], Callable[[], bool] | None]
_STOP: Any = object()

#: Seconds every call must have run before a thread is added, while there are fewer than FAST_THREADS.
STALL = 0.005
#: Threads that fast guests may grow the pool to (waiting for the GIL can look like a stall).
FAST_THREADS = 8
#: Past FAST_THREADS: seconds every call must have run before threads are added, one per waiting call.
SLOW = 0.05
#: Most threads one pool runs: the number of stuck calls that cannot hold up others.
MAX_THREADS = 128
#: Seconds a thread (other than the first) waits for work before it ends.
IDLE_EXIT = 30.0
#: Linux sets the nice value of one thread with setpriority(PRIO_PROCESS, thread id); elsewhere it is a process.
_CAN_DEMOTE = sys.platform.startswith("linux") and hasattr(os, "setpriority")
_LOWEST_PRIORITY = 19
_log = Logger(namespace="httpwasm")


class _Worker:
    """One thread, and when its current call began (None while it waits for work)."""

    __slots__ = ("demoted", "native_id", "since")

    def __init__(self) -> None:
        self.since: float | None = None
        self.native_id: int | None = None
        self.demoted = False  # runs at the lowest CPU priority; ends after its call


class GuestWorkers:
    """Daemon threads (1 to ``max_size``) that run guest calls for one reactor."""

    def __init__(
        self,
        reactor: Any,
        max_size: int = MAX_THREADS,
        name: str = "httpwasm-guest",
        clock: Callable[[], float] = time.monotonic,
        idle_exit: float = IDLE_EXIT,
    ):
        if max_size < 1:
            raise ValueError("a guest worker pool needs at least one thread")
        self._reactor: IReactorFromThreads = reactor
        self._name = name
        self._clock = clock
        self._idle_exit = idle_exit
        self.max_size = max_size
        self._reset()
        _every_workers.add(self)
        if IReactorCore.providedBy(reactor):
            reactor.addSystemEventTrigger("during", "shutdown", self.stop)

    def _reset(self) -> None:
        """No thread, nothing queued: the state before the first call (and in a forked child)."""
        self.__dict__.pop("run", None)  # the lane's run, set by _start: the next call starts afresh
        self._started = False
        self._lane: Any = None  # the accelerator's lane, made by _start (its eventfd only while it serves)
        self._reader: _LaneReader | None = None
        self._calls: Any = SimpleQueue()
        self._done: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._wake_scheduled = False
        self._workers: list[_Worker] = []
        self._numbers = itertools.count()
        self._lock = threading.Lock()  # guards _workers and dropped
        self._stopping = threading.Event()
        self._queued = threading.Event()  # set while work may be waiting: the monitor watches
        self._dropped = 0

    def _make_lane(self) -> Any:
        """The accelerator's lane, where it can serve: the accelerator is built, the reactor has internal readers.

        The calls the lane runs in C are timed with the monotonic clock (``time.monotonic``'s), whatever
        ``clock`` is; ``clock`` times the calls the Python loop runs.
        """
        module = _accel.module
        if module is None or not can_add_internal_reader(self._reactor):
            return None
        self._seat = module.Seat  # the lane's workers (kept: the lane serves on if the module is swapped later)
        return module.Lane(STALL, _continuation_failed)

    @property
    def dropped(self) -> int:
        """Calls dropped because their ``still_wanted`` said no."""
        lane = self._lane
        return self._dropped + (0 if lane is None else lane.dropped)

    def _start(self) -> None:
        """Start the first thread and the monitor (once per process, on the first call)."""
        with self._lock:
            if self._started or self._stopping.is_set():
                return
            self._started = True
            lane = self._lane = self._make_lane()
            if lane is not None:
                self._calls = lane  # nothing is queued before the first call
                self._reader = _LaneReader(lane)
                add_internal_reader(self._reactor, self._reader)
                # From now on run() is the lane's, without a Python frame; it calls _flush_soon for the
                # first call of each reactor turn.
                lane.on_due = self._flush_soon
                self.run = lane.run  # type: ignore[method-assign]
            threading.Thread(target=self._monitor, name=f"{self._name}-monitor", daemon=True).start()
            self._add_thread()

    @property
    def size(self) -> int:
        """Threads running now."""
        return len(self._workers)

    def _add_thread(self) -> None:
        """Start one more thread; the caller holds the lock."""
        lane = self._lane
        worker: Any = _Worker() if lane is None else self._seat()
        self._workers.append(worker)
        name = f"{self._name}-{next(self._numbers)}"
        threading.Thread(target=self._serve, args=(worker,), name=name, daemon=True).start()

    def _demote_stuck(self) -> None:
        """Lowest CPU priority for threads stuck past SLOW, so the reactor and fast calls run first.

        A thread cannot get its priority back (that needs privileges), so a
        demoted thread ends after its call; new threads start at normal priority.
        """
        if not _CAN_DEMOTE:
            return
        now = self._clock()
        with self._lock:
            for worker in self._workers:
                since = worker.since
                if since is not None and now - since > SLOW and not worker.demoted and worker.native_id:
                    worker.demoted = True
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PROCESS, worker.native_id, _LOWEST_PRIORITY)

    def grow_if_stuck(self) -> int:
        """Add threads if work waits behind calls that are all stuck; returns how many were added.

        The monitor calls this every STALL while work is queued.
        """
        with self._lock:
            workers = self._workers
            room = self.max_size - len(workers)
            if room <= 0 or self._stopping.is_set() or self._calls.empty():
                return 0
            fast = len(workers) < FAST_THREADS
            threshold = STALL if fast else SLOW
            now = self._clock()
            for worker in workers:
                since = worker.since
                if since is None or now - since <= threshold:
                    return 0  # this thread is free, or will be soon
            count = 1 if fast else min(room, self._calls.qsize())
            for _ in range(count):
                self._add_thread()
            return count

    def _monitor(self) -> None:
        """Every STALL while calls run or wait: demote stuck calls, add threads when all are stuck.

        Sleeps while nothing runs and nothing waits.  A plain thread, not a
        reactor timer: it needs no reactor, and it leaves no pending delayed
        call behind in tests.
        """
        queued, stopping = self._queued, self._stopping
        while not stopping.is_set():
            queued.wait()
            if stopping.wait(STALL):
                return
            queued.clear()  # cleared before looking, so work queued from now on sets it again
            self._demote_stuck()
            if self._calls.empty() and all(worker.since is None for worker in list(self._workers)):
                continue
            queued.set()
            self.grow_if_stuck()

    def run(
        self,
        work: Callable[[], T],
        on_result: Callable[[T], None],
        on_error: Callable[[BaseException], None],
        still_wanted: Callable[[], bool] | None = None,
    ) -> None:
        """Queue ``work``; its continuation runs later on the reactor thread.

        ``still_wanted`` (called on the worker just before ``work`` would start)
        returning false drops the call: neither ``work`` nor a continuation runs.
        """
        if not self._started:
            self._start()
        if self._lane is not None:
            self._lane.run(work, on_result, on_error, still_wanted)  # as the lane's run is, once started
            return
        self._calls.put((work, on_result, on_error, still_wanted))
        if not self._queued.is_set():
            self._queued.set()

    def _flush_soon(self) -> None:
        """The lane's first call of a reactor turn: workers are woken once the turn is over.

        Every call of the turn reaches the workers in that one hand-off, as the GIL batched
        them on the Python queue; the monitor is told work waits (for every later call of
        the turn, this one told it).
        """
        lane = self._lane
        assert lane is not None
        self._reactor.callFromThread(lane.flush)
        if not self._queued.is_set():
            self._queued.set()

    def stop(self) -> None:
        """Let every thread finish what is queued, then exit."""
        self._stopping.set()
        self._queued.set()
        with self._lock:
            for _ in self._workers:
                self._calls.put(_STOP)

    def _leave(self, worker: Any, idle: bool) -> bool:
        """Take ``worker`` out of the pool; an idle one only if another thread stays."""
        with self._lock:
            if idle and (len(self._workers) <= 1 or self._stopping.is_set()):
                return False
            self._workers.remove(worker)
            if self._stopping.is_set() and not self._workers and self._reader is not None:
                self._reactor.callFromThread(self._close_lane, self._reader)
                self._reader = None
            return True

    def _close_lane(self, reader: _LaneReader) -> None:
        """Reactor side, once the last thread has stopped: the last results, then the lane's reader and eventfd go."""
        reader.doRead()
        remove_internal_reader(self._reactor, reader)
        reader.close()

    def _serve(self, worker: Any) -> None:
        """One worker: take calls until stopped, idle for ``idle_exit`` seconds (and not the last), or demoted.

        On the lane, ``get`` runs the sessions' calls itself, in C, and hands back only
        the other items, None when idle, or False when the worker was demoted after a
        call it ran.
        """
        lane = self._lane
        get = self._calls.get if lane is None else functools.partial(lane.get, worker)
        done = self._done
        clock = self._clock
        idle_exit = self._idle_exit
        worker.native_id = threading.get_native_id()
        while True:
            try:
                item = get(timeout=idle_exit)
            except Empty:
                item = None
            if item is None:
                if self._leave(worker, idle=True):
                    return
                continue
            if item is _STOP or item is False:
                self._leave(worker, idle=False)
                return
            ran = self._run_one(worker, item, done, clock)
            # A thread waiting for its next call must not keep the last request (its filter, its
            # buffered body) alive for up to idle_exit seconds: the call's references die in
            # _run_one's frame, and the item goes here.
            del item
            if not ran:
                continue
            # One reactor wake-up serves every result that lands before the reactor runs it.
            if not self._wake_scheduled:
                self._wake_scheduled = True
                self._reactor.callFromThread(self._deliver)
            if worker.demoted:
                self._leave(worker, idle=False)
                return

    def _run_one(self, worker: Any, item: _Item, done: Any, clock: Callable[[], float]) -> bool:
        """Run one queued call, its result going to ``done``; False if it was dropped unstarted."""
        work, on_result, on_error, still_wanted = item
        if still_wanted is not None and not still_wanted():
            with self._lock:
                self._dropped += 1
            return False
        worker.since = clock()
        try:
            done.append((on_result, work()))
        except BaseException as error:  # noqa: BLE001 - handed to the request, never lost
            done.append((on_error, error))
        worker.since = None
        return True

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


def _continuation_failed() -> None:
    """The lane's report of a continuation that raised (called as in an ``except`` block)."""
    _log.failure("continuation of a guest call failed")


@implementer(IReadDescriptor)
class _LaneReader:
    """The lane's eventfd on the reactor: readable while calls that ran wait to be finished."""

    def __init__(self, lane: Any) -> None:
        self.fileno = lane.fileno
        self.doRead = lane.deliver
        self.close = lane.close

    def logPrefix(self) -> str:
        return "httpwasm-guest-lane"

    def connectionLost(self, reason: object) -> None:
        """Nothing to close: the lane owns its file descriptor."""


_every_workers: weakref.WeakSet[GuestWorkers] = weakref.WeakSet()


def _forget_threads_after_fork() -> None:
    """In a forked child: the parent's threads are gone; start afresh on the next call."""
    global _shared_lock
    _shared_lock = threading.Lock()  # a parent's thread may have held it at the fork
    # A lane whose reader a parent's reactor was watching stays watched in the child's copy of
    # that reactor: taking it off would take it off the parent's epoll set too (an epoll instance
    # is shared across fork). twistd forks before any call, so there is none then.
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
