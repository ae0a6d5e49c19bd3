"""The dedicated guest worker threads used by thread mode."""

from __future__ import annotations

import functools
import itertools
import os
import queue
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any
from unittest import skipUnless

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.static import Data

from twisted_httpwasm.runtime import accel, engine
from twisted_httpwasm.runtime.calllog import LogLimit
from twisted_httpwasm.runtime.guest import GuestTrap
from twisted_httpwasm.runtime.pool import GuestUnavailable
from twisted_httpwasm.web.guest_threads import FAST_THREADS, STALL, GuestWorkers

from .support import NOOP_RESPONSE, ServerTestCase, make_guest, poll, request_state
from .test_accel import MIXED, SessionCase, session_outcome
from .test_hostfuncs import BUF, NOT_CALLED, PAGE, call, guest, stored


def run_on(workers: GuestWorkers, work: object) -> Deferred[tuple[str, object, str]]:
    """Run ``work``; fire with (outcome, value, name of the thread the continuation ran on)."""
    done: Deferred[tuple[str, object, str]] = Deferred()
    workers.run(
        work,  # type: ignore[arg-type]
        lambda value: done.callback(("result", value, threading.current_thread().name)),
        lambda error: done.callback(("error", error, threading.current_thread().name)),
    )
    return done


class GuestWorkersTests(TestCase):
    """The workers' contract, on the accelerator's lane where it is built (see GuestWorkersPythonQueueTests)."""

    python_queue = False

    def run_on(self, workers: GuestWorkers, work: object) -> Deferred[tuple[str, object, str]]:
        return run_on(workers, work)

    def make_workers(self, **options: object) -> GuestWorkers:
        if self.python_queue:
            self.patch(accel, "module", None)
        workers = GuestWorkers(reactor, **options)  # type: ignore[arg-type]
        self.addCleanup(workers.stop)
        workers._start()  # what the first call does: the lane is made then
        self.assertEqual(workers._lane is None, self.python_queue or accel.module is None)
        return workers

    @inlineCallbacks
    def test_work_runs_in_a_worker_and_continues_on_the_reactor_thread(self):
        """The work sees a worker thread; its continuation runs on the reactor (main) thread."""
        workers = self.make_workers()
        outcome, value, continued_on = yield self.run_on(workers, lambda: threading.current_thread().name)
        self.assertEqual(outcome, "result")
        self.assertTrue(str(value).startswith("httpwasm-guest"))
        self.assertEqual(continued_on, threading.main_thread().name)

    @inlineCallbacks
    def test_exceptions_reach_on_error(self):
        """An exception from the work is handed to on_error, not lost."""
        workers = self.make_workers()

        def fail() -> None:
            raise ValueError("boom")

        outcome, value, _ = yield self.run_on(workers, fail)
        self.assertEqual(outcome, "error")
        self.assertIsInstance(value, ValueError)

    @inlineCallbacks
    def test_a_failing_continuation_does_not_strand_the_others(self):
        """Results delivered in one batch all run even if one continuation raises."""
        workers = self.make_workers()
        release = threading.Event()
        results: list[int] = []
        last: Deferred[None] = Deferred()

        def boom(_: object) -> None:
            raise RuntimeError("continuation bug")

        workers.run(release.wait, boom, lambda error: None)
        for index in range(5):
            workers.run(lambda index=index: index, results.append, lambda error: None)
        workers.run(lambda: None, last.callback, last.errback)
        release.set()
        yield last
        self.assertEqual(results, [0, 1, 2, 3, 4])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_a_stalled_worker_gets_company(self):
        """Work queued behind a call that holds the only thread too long runs on a new thread.

        The work is queued at once, before the slow call counts as stalled: the
        reactor looks again after STALL and adds the thread then.
        """
        workers = self.make_workers(max_size=3)
        release = threading.Event()
        self.addCleanup(release.set)
        slow = self.run_on(workers, lambda: release.wait(10))
        fast = yield self.run_on(workers, lambda: "fast")
        self.assertEqual(fast[:2], ("result", "fast"))
        self.assertFalse(release.is_set())  # the slow call was still running
        self.assertEqual(workers.size, 2)
        release.set()
        yield slow

    def test_size_never_exceeds_the_maximum(self):
        """With every thread stalled at the maximum, work waits instead of adding threads."""
        workers = self.make_workers(max_size=1)
        release = threading.Event()
        self.addCleanup(release.set)
        workers.run(lambda: release.wait(10), lambda value: None, lambda error: None)
        for _ in range(3):
            workers.run(lambda: None, lambda value: None, lambda error: None)
        self.assertEqual(workers.size, 1)

    def time_flies(self) -> Callable[[], float]:
        """A clock that is one second later at every reading: every running call looks stuck."""
        return functools.partial(next, itertools.count())

    def block(self, workers: GuestWorkers, count: int) -> tuple[threading.Event, list[Deferred[object]]]:
        """Start ``count`` calls that hold their threads until the returned event is set."""
        release = threading.Event()
        self.addCleanup(release.set)
        blocked = [self.run_on(workers, lambda: release.wait(30)) for _ in range(count)]
        return release, blocked

    @inlineCallbacks
    def test_a_fast_call_overtakes_calls_stuck_on_every_thread(self):
        """A fast call queued behind more stuck calls than FAST_THREADS completes while they are still stuck.

        The stuck calls hold every thread the pool has when the fast call comes;
        the pool adds threads (one per waiting call) instead of making it wait.
        """
        workers = self.make_workers(clock=self.time_flies())
        release, blocked = self.block(workers, FAST_THREADS + 4)
        fast = self.run_on(workers, lambda: "fast").addTimeout(20, reactor)
        outcome = yield fast
        self.assertEqual(outcome[:2], ("result", "fast"))
        self.assertFalse(any(call.called for call in blocked))  # all still stuck
        self.assertGreater(workers.size, FAST_THREADS)
        release.set()
        yield gatherResults(blocked)

    @inlineCallbacks
    def test_threads_stay_within_the_maximum_under_stuck_calls(self):
        """With more stuck calls than max_size, threads stop at max_size and the rest wait their turn."""
        workers = self.make_workers(max_size=FAST_THREADS + 2, clock=self.time_flies())
        release, _ = self.block(workers, FAST_THREADS + 6)
        self.assertTrue((yield poll(lambda: workers.size == FAST_THREADS + 2, timeout=20, interval=0.01)))
        waiting = self.run_on(workers, lambda: "waited")
        yield poll(lambda: workers.size > FAST_THREADS + 2, timeout=0.2, interval=0.01)  # give it a chance
        self.assertEqual(workers.size, FAST_THREADS + 2)
        self.assertFalse(waiting.called)
        release.set()
        outcome = yield waiting
        self.assertEqual(outcome[:2], ("result", "waited"))

    @skipUnless(sys.platform.startswith("linux"), "per-thread priority is Linux's")
    @inlineCallbacks
    def test_a_stuck_call_runs_at_the_lowest_priority_and_its_thread_ends(self):
        """A call past SLOW is demoted to nice 19 (the reactor and other calls first); its thread ends after it."""
        now = [0.0]
        workers = self.make_workers(clock=lambda: now[0])
        release = threading.Event()
        self.addCleanup(release.set)

        def stuck() -> tuple[int, threading.Thread]:
            release.wait(30)
            return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), threading.current_thread()

        call = self.run_on(workers, stuck)
        self.assertTrue((yield poll(lambda: workers.size == 1 and workers._workers[0].since is not None, 20, 0.01)))
        now[0] += 1  # the call has now run for a second
        self.assertTrue((yield poll(lambda: any(w.demoted for w in list(workers._workers)), timeout=20, interval=0.01)))
        release.set()
        outcome, (priority, thread), _ = yield call
        self.assertEqual((outcome, priority), ("result", 19))
        # The thread itself, not its name: other tests' workers may still run threads of the same names.
        self.assertTrue((yield poll(lambda: not thread.is_alive(), 20, 0.01)))
        # A fresh thread, at normal priority, serves the next call (the clock stands still: it is not stuck).
        _, (priority, _), _ = yield self.run_on(
            workers, lambda: (os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), "")
        )
        self.assertEqual(priority, os.getpriority(os.PRIO_PROCESS, 0))

    @inlineCallbacks
    def test_idle_threads_end_but_one_stays(self):
        """Threads added for a burst end once idle for idle_exit seconds; the last one stays."""
        workers = self.make_workers(max_size=4, idle_exit=0.05)
        release, blocked = self.block(workers, 3)
        self.assertTrue((yield poll(lambda: workers.size == 3, timeout=20, interval=0.01)))
        release.set()
        yield gatherResults(blocked)
        self.assertTrue((yield poll(lambda: workers.size == 1, timeout=20, interval=0.01)))
        outcome = yield self.run_on(workers, lambda: "still served")
        self.assertEqual(outcome[:2], ("result", "still served"))

    @inlineCallbacks
    def test_calls_no_longer_wanted_are_dropped_unstarted(self):
        """Calls whose still_wanted says no by the time a thread is free never run, nor their continuations."""
        workers = self.make_workers(max_size=1)
        release, blocked = self.block(workers, 1)
        ran: list[int] = []
        continued: list[object] = []
        wanted = [True] * 6
        for index in range(6):
            workers.run(
                lambda index=index: ran.append(index),
                continued.append,
                continued.append,
                lambda index=index: wanted[index],
            )
        for index in (0, 2, 3, 5):
            wanted[index] = False  # their clients left while the calls waited
        last = self.run_on(workers, lambda: "last")
        release.set()
        yield blocked[0]
        yield last
        self.assertEqual(ran, [1, 4])
        self.assertEqual(len(continued), 2)
        self.assertEqual(workers.dropped, 4)


class GuestWorkersPythonQueueTests(GuestWorkersTests):
    """The same contract on the Python queue, which serves where the accelerator is not built."""

    python_queue = True


class LaneTests(TestCase):
    """Thread mode's lane: a C session's call is prepared on the reactor thread, runs on a worker that
    does not take the GIL, and is finished on the reactor thread, coming out as on the pure path."""

    def setUp(self) -> None:
        if accel.compiled is None:
            raise SkipTest(f"compiled accelerator not in use: {accel.REASON}")
        self.patch(accel, "module", accel.compiled)
        if not engine.serving:  # the lane serves once the serving clock runs (the first call starts it)
            engine.serve_time_limits()

    @inlineCallbacks
    def make_workers(self, **options: object) -> Any:
        """Workers with their threads started and their lane's reader on the reactor."""
        workers = GuestWorkers(reactor, **options)  # type: ignore[arg-type]
        self.addCleanup(workers.stop)
        yield run_on(workers, lambda: None)
        self.assertIsNotNone(workers._lane)
        return workers

    @inlineCallbacks
    def test_a_session_call_runs_while_the_reactor_thread_holds_the_gil(self):
        """The guest runs and its result waits for the reactor while the reactor thread never lets the GIL go.

        The switch interval is 30 s: a thread that needs the GIL (a Python worker picking the call
        up) would wait that long for this loop, which never blocks, to give it up.
        """
        workers = yield self.make_workers()
        loaded = guest(request=[call("get_uri", BUF, 64, slot=0)], next=True)
        instance = loaded.pool.acquire()
        loaded.pool.release(instance)  # the session takes it again: the most recently returned is lent first
        session = loaded.session(request_state(uri=b"/p"))
        done = run_on(workers, session.handle_request)
        lane = workers._lane
        self.assertEqual(lane.ready(), 0)
        lane.flush()  # what the end of this reactor turn does
        interval = sys.getswitchinterval()
        sys.setswitchinterval(30)
        try:
            deadline = time.monotonic() + 10
            while not lane.ready() and time.monotonic() < deadline:
                pass
            ready = lane.ready()
        finally:
            sys.setswitchinterval(interval)
        self.assertEqual(ready, 1)
        outcome, value, continued_on = yield done
        self.assertEqual((outcome, value, continued_on), ("result", True, threading.main_thread().name))
        self.assertEqual(stored(instance), len(b"/p"))  # get_uri's result

    @inlineCallbacks
    def test_calls_come_out_as_on_the_pure_path(self):
        """Both calls of a request through the lane (C's answers, Python's, traps, the time limit): as inline, pure."""
        workers = yield self.make_workers()
        for statements, options in (
            (MIXED, {}),
            (MIXED, {"log_limit": LogLimit(messages=2, bytes=1024)}),
            ([call("get_uri", PAGE - 2, 64)], {}),
            (["(unreachable)"], {}),
            (["(loop $spin (br $spin))"], {"timeout": 0.05}),
        ):
            case = SessionCase(accel.compiled, statements, inline=False, **options)
            traps: list[str | None] = []
            outcome, value, _ = yield run_on(workers, case.session.handle_request)
            if outcome == "result":
                traps.append(None)
                case.state.enter_response_phase(200)
                outcome, value, _ = yield run_on(workers, case.session.handle_response)
                if outcome == "result":
                    traps.append(None)
            if outcome == "error":
                self.assertIsInstance(value, GuestTrap)
                traps.append(value.reason)  # type: ignore[attr-defined]
            self.assertEqual(case.outcome(traps), session_outcome(None, statements, **options), statements)
        self.assertEqual(workers._lane.dropped, 0)

    @inlineCallbacks
    def test_a_call_whose_client_left_is_dropped_and_its_instance_given_back(self):
        """still_wanted is asked on the worker of a call that waited; a no: not run, no continuation, instance back."""
        workers = yield self.make_workers(max_size=1)
        loaded = guest(request=[call("get_uri", BUF, 64, slot=0)], next=True)
        release = threading.Event()
        self.addCleanup(release.set)
        blocked = run_on(workers, lambda: release.wait(30))
        asked: list[str] = []
        continued: list[object] = []

        def still_wanted() -> bool:
            asked.append(threading.current_thread().name)
            return False

        session = loaded.session(request_state())
        workers.run(session.handle_request, continued.append, continued.append, still_wanted=still_wanted)
        self.assertEqual(loaded.pool.stats.in_use, 1)  # pinned on the reactor thread, for the queued call
        yield deferLater(reactor, STALL * 4, lambda: None)  # it waits: long enough to be asked
        release.set()
        yield blocked
        self.assertTrue((yield poll(lambda: loaded.pool.stats.in_use == 0, timeout=10, interval=0.01)))
        self.assertEqual((continued, workers.dropped, len(asked)), ([], 1, 1))
        self.assertTrue(asked[0].startswith("httpwasm-guest"), asked)
        instance = loaded.pool.acquire()
        self.assertEqual(stored(instance), NOT_CALLED)  # the guest never ran
        loaded.pool.release(instance)

    @inlineCallbacks
    def test_no_instance_is_made_on_the_reactor_thread(self):
        """With no idle instance, the call goes to a worker, which makes one (running guest code there)."""
        workers = yield self.make_workers()
        loaded = guest(next=True)
        held = []
        while loaded.pool.stats.idle:
            held.append(loaded.pool.acquire())
        made_in: list[str] = []
        factory = loaded.pool._factory

        def recording() -> Any:
            made_in.append(threading.current_thread().name)
            return factory()

        self.patch(loaded.pool, "_factory", recording)
        outcome, value, _ = yield run_on(workers, loaded.session(request_state()).handle_request)
        self.assertEqual((outcome, value), ("result", True))
        self.assertEqual(len(made_in), 1)
        self.assertTrue(made_in[0].startswith("httpwasm-guest"), made_in)
        for instance in held:
            loaded.pool.release(instance)

    @inlineCallbacks
    def test_a_failure_to_prepare_reaches_on_error_later(self):
        """An error while the reactor thread prepares the call reaches on_error as a call's: later, not in run()."""
        workers = yield self.make_workers()
        loaded = guest(next=True)

        def unavailable() -> None:
            raise GuestUnavailable("guest instances cannot be created: test", retry_after=1.0)

        self.patch(loaded.pool, "acquire_idle", unavailable)
        errors: list[BaseException] = []
        workers.run(loaded.session(request_state()).handle_request, errors.append, errors.append)
        self.assertEqual(errors, [])
        self.assertTrue((yield poll(lambda: errors, timeout=10, interval=0.01)))
        self.assertIsInstance(errors[0], GuestUnavailable)

    @inlineCallbacks
    def test_a_failing_continuation_does_not_strand_the_others(self):
        """A continuation that raises is logged; the other calls' continuations still run."""
        workers = yield self.make_workers()
        loaded = guest(next=True)
        results: list[object] = []

        def boom(_: object) -> None:
            raise RuntimeError("continuation bug")

        workers.run(loaded.session(request_state()).handle_request, boom, boom)
        workers.run(loaded.session(request_state()).handle_request, results.append, results.append)
        self.assertTrue((yield poll(lambda: results, timeout=10, interval=0.01)))
        self.assertEqual(results, [True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_the_lane_leaves_the_reactor_once_its_threads_end(self):
        """After stop(), once the last thread has ended, the lane's reader is off the reactor, its eventfd closed."""
        workers = yield self.make_workers()
        reader, lane = workers._reader, workers._lane
        self.assertIn(reader, reactor.getReaders())
        workers.stop()
        self.assertTrue((yield poll(lambda: reader not in reactor.getReaders(), timeout=10, interval=0.01)))
        self.assertEqual(lane.fileno(), -1)

    def test_workers_not_used_hold_no_file_descriptor(self):
        """The lane (and its eventfd) is made by the first call: workers made and never used open nothing."""
        before = len(os.listdir("/proc/self/fd"))
        made = [GuestWorkers(reactor) for _ in range(20)]
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        for workers in made:
            workers.stop()


class _QueueReactor:
    """Just enough reactor: ``callFromThread`` queues, and the test's thread runs what is queued."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[object, tuple[object, ...]]] = queue.SimpleQueue()

    def callFromThread(self, function: object, *args: object) -> None:
        self.calls.put((function, args))

    def run_until(self, done: list[object], timeout: float) -> None:
        while not done:
            function, args = self.calls.get(timeout=timeout)
            function(*args)  # type: ignore[operator]


def _serve_one_call_in_a_forked_child(workers: GuestWorkers, reactor: _QueueReactor) -> bytes:
    """Fork; the child runs one call through ``workers`` and writes what it got to a pipe.

    Returns the child's report, or b"" if it said nothing within 10 s (it is killed then).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into the test runner
        status = 1
        try:
            os.close(read_end)
            results: list[object] = []
            workers.run(os.getpid, results.append, results.append)
            reactor.run_until(results, timeout=8)
            os.write(write_end, b"ran in %d, child is %d" % (results[0], os.getpid()))  # type: ignore[str-bytes-safe]
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    report = b""
    try:
        watch = select.poll()  # not select(): the test process may hold more than 1024 descriptors
        watch.register(read_end, select.POLLIN)
        report = os.read(read_end, 200) if watch.poll(10_000) else b""
    finally:
        os.close(read_end)
        if not report:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    return report


class ForkTests(SynchronousTestCase):
    """twistd without -n loads the guests, then forks: the workers must serve in the child."""

    def make_workers(self) -> tuple[GuestWorkers, _QueueReactor]:
        reactor = _QueueReactor()
        workers = GuestWorkers(reactor)
        self.addCleanup(workers.stop)
        return workers, reactor

    def test_no_thread_starts_before_the_first_call(self):
        """Creating the workers starts nothing: a fork right after it has nothing to lose."""
        before = threading.active_count()
        workers, _ = self.make_workers()
        self.assertEqual((workers.size, threading.active_count()), (0, before))

    def test_workers_made_before_a_fork_serve_in_the_child(self):
        """Workers created (not yet used) before os.fork() run calls in the child, in the child."""
        workers, reactor = self.make_workers()
        report = _serve_one_call_in_a_forked_child(workers, reactor)
        self.assertTrue(report.startswith(b"ran in "), report)
        ran_in, child = report[len(b"ran in ") :].split(b", child is ")
        self.assertEqual(ran_in, child)

    def test_workers_used_before_a_fork_serve_in_the_child(self):
        """Workers whose threads ran in the parent start fresh threads in the child."""
        workers, reactor = self.make_workers()
        results: list[object] = []
        workers.run(lambda: "parent", results.append, results.append)
        reactor.run_until(results, timeout=10)
        self.assertEqual(results, ["parent"])
        report = _serve_one_call_in_a_forked_child(workers, reactor)
        self.assertTrue(report.startswith(b"ran in "), report)


SLOW_GUEST = """
  (func (export "handle_request") (result i64) (local $i i32)
    (drop (call $get_uri (i32.const 100) (i32.const 100)))
    ;; "/slow": spin for a while (well under the time limit)
    (if (i32.eq (i32.load8_u (i32.const 101)) (i32.const 0x73)) (then
      (local.set $i (i32.const 150000000))
      (loop $spin (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $spin (local.get $i)))))
    (i64.const 1))
"""


class SlowGuestTests(ServerTestCase):
    @inlineCallbacks
    def test_a_slow_guest_does_not_hold_up_other_requests(self):
        """In thread mode a fast request completes while a slow guest call is still running."""
        root = Resource()
        root.putChild(b"slow", Data(b"slow", "text/plain"))
        root.putChild(b"fast", Data(b"fast", "text/plain"))
        guest = make_guest(SLOW_GUEST, NOOP_RESPONSE, timeout=10)
        url = self.serve_guest(guest, root)
        finished: list[str] = []
        slow = self.fetch("GET", url + "/slow")
        slow.addCallback(lambda result: finished.append("slow") or result)
        # Once the slow call holds a worker, the fast request must get through first.
        yield poll(lambda: guest.pool.stats.in_use == 1, timeout=5, interval=0.002)
        status, _, body = yield self.fetch("GET", url + "/fast")
        finished.append("fast")
        self.assertEqual((status, body), (200, b"fast"))
        yield slow
        self.assertEqual(finished, ["fast", "slow"])
