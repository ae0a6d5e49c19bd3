"""The epoch clock that enforces guest time limits."""

from __future__ import annotations

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
