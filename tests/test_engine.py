"""The epoch clock that enforces guest time limits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.runtime import engine as _engine


class _Wakeups:
    """Stands in for the clock's stop event: each wait returns at the next of ``times``, then stops."""

    def __init__(self, clock: list[float], times: list[float]):
        self.clock = clock
        self.times = list(times)

    def wait(self, timeout: float) -> bool:
        if not self.times:
            return True  # stopping
        self.clock[0] = self.times.pop(0)
        return False


class EpochClockTests(SynchronousTestCase):
    def run_clock(self, wakeups: list[float]) -> int:
        """The ticks a clock gives when its thread wakes at ``wakeups`` (seconds after it started)."""
        now = [0.0]
        ticks: list[Any] = []
        self.patch(_engine.time, "monotonic", lambda: now[0])
        self.patch(_engine._native, "increment_epoch", ticks.append)
        clock = _engine._EpochClock(_engine.shared_engine())
        clock.stopping = _Wakeups(now, wakeups)  # type: ignore[assignment]
        clock.run()  # on this thread: it returns once the wakeups are used up
        return len(ticks)

    def test_ticks_follow_the_time_that_passed(self) -> None:
        """Woken on time, the clock ticks once per interval."""
        interval = _engine.EPOCH_INTERVAL
        self.assertEqual(self.run_clock([interval * n for n in range(1, 6)]), 5)

    def test_a_late_wakeup_catches_up(self) -> None:
        """A thread that got the GIL late (one wake-up after 50 intervals) still gives 50 ticks,
        so a guest that keeps the GIL busy cannot stretch its own time limit."""
        interval = _engine.EPOCH_INTERVAL
        self.assertEqual(self.run_clock([interval * 50.5]), 50)


#: Calls a looping guest inline (keeping the GIL when the clock allows) and not, then on another
#: thread, and reports what stopped each call and which Python threads the clock needed.
SERVING_CLOCK_SCRIPT = """
import os, sys, threading, time
from tests.support import module, request_state
from tests.test_daemon import LOOPING_GUEST
from twisted_httpwasm import Guest, GuestTrap
from twisted_httpwasm.runtime import engine, native

guest = Guest(module(LOOPING_GUEST), timeout=0.3, cache=False)
instance = guest.pool.acquire()
for inline in (True, False):
    # Quick calls first, then the looping one at once: it may reuse the deadline they armed.
    for _ in range(100):
        instance.handle_request(request_state(uri=b"/"), inline)
    started = time.monotonic()
    try:
        instance.handle_request(request_state(uri=b"/loop"), inline)
    except GuestTrap as trap:
        took = time.monotonic() - started
        print("inline" if inline else "released", trap.timed_out, trap.reason, flush=True)
        print("got at least its limit:", took >= 0.3, "and not much more:", took < 0.3 + 2.0, flush=True)
    instance = guest.pool.acquire()
print("may hold gil:", engine.calls_may_hold_gil, flush=True)
print("rearm window:", native.rearm_window, flush=True)
print("python threads:", sorted(t.name for t in threading.enumerate()), flush=True)
# A guest call on another thread (thread mode) is stopped by the same clock.
def other() -> None:
    try:
        guest.pool.acquire().handle_request(request_state(uri=b"/loop"))
    except GuestTrap as trap:
        print("other thread", trap.timed_out, flush=True)
worker = threading.Thread(target=other)
worker.start()
worker.join(20)
"""


class ServingClockTests(SynchronousTestCase):
    """The clock that runs while guests are served, in a fresh interpreter (its state is per process)."""

    def run_script(self, **env: str) -> str:
        root = Path(__file__).resolve().parent.parent
        environment = {k: v for k, v in os.environ.items() if k != "TWISTED_HTTPWASM_PYTHON_CLOCK"}
        environment.update(PYTHONPATH=str(root), **env)
        done = subprocess.run(
            [sys.executable, "-c", SERVING_CLOCK_SCRIPT],
            cwd=root,
            env=environment,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        return done.stdout

    def test_a_looping_inline_call_that_keeps_the_gil_is_stopped_without_a_python_clock(self) -> None:
        """On Linux the serving clock is a POSIX timer: inline calls keep the GIL, no Python thread ticks,
        and a looping guest still ends at its time limit, inline, released, and on another thread."""
        if not sys.platform.startswith("linux"):
            self.skipTest("POSIX timers with SIGEV_THREAD: Linux")
        out = self.run_script()
        self.assertIn("inline True guest exceeded its time limit of 0.3 s\n", out)
        self.assertIn("released True guest exceeded its time limit of 0.3 s\n", out)
        self.assertIn("other thread True\n", out)
        self.assertIn("may hold gil: True\n", out)
        self.assertIn("python threads: ['MainThread']\n", out)
        # Calls within a tick reuse the deadline armed last, and a looping call still gets its whole limit.
        self.assertIn(f"rearm window: {_engine.EPOCH_INTERVAL}\n", out)
        self.assertEqual(out.count("got at least its limit: True and not much more: True\n"), 2, out)

    def test_the_python_clock_still_stops_looping_guests(self) -> None:
        """Where there is no such timer (forced here), the clock is a Python thread and calls release the GIL."""
        out = self.run_script(TWISTED_HTTPWASM_PYTHON_CLOCK="1")
        self.assertIn("inline True guest exceeded its time limit of 0.3 s\n", out)
        self.assertIn("released True guest exceeded its time limit of 0.3 s\n", out)
        self.assertIn("other thread True\n", out)
        self.assertIn("may hold gil: False\n", out)
        self.assertIn("python threads: ['MainThread', 'httpwasm-epoch']\n", out)
        # The Python clock catches up in bursts: every call arms its own deadline.
        self.assertIn("rearm window: 0.0\n", out)
        self.assertEqual(out.count("got at least its limit: True and not much more: True\n"), 2, out)
