"""Instance recycling (``max_requests``, ``max_age``), retired pools, and what the pool says about failing inits."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twisted_httpwasm.runtime.pool import GuestPool, GuestUnavailable
from twisted_httpwasm.service.tap import Options

from .support import NOOP_RESPONSE, LogCapture, ServerTestCase, make_guest

#: Counts the requests its instance served in a global and answers with the count (x-count).
COUNTING_GUEST = (
    """
  (global $count (mut i32) (i32.const 0))
  (data (i32.const 0) "x-count")
  (func (export "handle_request") (result i64)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (i32.store8 (i32.const 16) (i32.add (i32.const 48) (global.get $count)))
    (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 1))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)


class Plain(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok"


class Instance:
    trapped = False


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecyclingTests(ServerTestCase):
    @inlineCallbacks
    def test_max_requests_bounds_what_one_instance_serves(self) -> Generator[Any, Any, None]:
        """With max_requests=3, a guest counting its requests in memory never sees more than 3: the instance is
        replaced between requests, and its successor starts counting from 1."""
        guest = make_guest(COUNTING_GUEST, max_requests=3)
        url = self.serve_guest(guest, Plain())
        counts = []
        for _ in range(10):
            _, headers, _ = yield self.fetch("GET", url + "/")
            counts.append(int(headers.getRawHeaders("x-count")[0]))
        self.assertEqual(counts, [1, 2, 3] * 3 + [1])  # fresh instances, each serving 3 requests
        self.assertGreaterEqual(guest.pool.stats.recycled, 2)

    @inlineCallbacks
    def test_without_recycling_an_instance_serves_on(self) -> Generator[Any, Any, None]:
        """The default keeps instances: the same one counts past 3 (what max_requests changes)."""
        guest = make_guest(COUNTING_GUEST)
        url = self.serve_guest(guest, Plain())
        counts = []
        for _ in range(5):
            _, headers, _ = yield self.fetch("GET", url + "/")
            counts.append(int(headers.getRawHeaders("x-count")[0]))
        self.assertGreater(max(counts), 3)
        self.assertEqual(guest.pool.stats.recycled, 0)


class PoolTests(SynchronousTestCase):
    def test_max_age_retires_between_requests(self) -> None:
        """An instance older than max_age is dropped when it comes back, or when found idle; never while lent."""
        clock = FakeClock()
        pool: GuestPool[Instance] = GuestPool(Instance, clock=clock, max_age=10.0)
        first = pool.acquire()
        clock.now = 11.0
        pool.release(first)  # too old: dropped, not pooled
        self.assertEqual((pool.stats.idle, pool.stats.recycled), (0, 1))
        second = pool.acquire()
        self.assertIsNot(second, first)
        pool.release(second)
        clock.now = 22.0  # aged while idle
        self.assertIsNot(pool.acquire(), second)
        self.assertEqual(pool.stats.recycled, 2)

    def test_retired_pool_keeps_nothing(self) -> None:
        """retire() drops the idle instances at once and each lent one when it comes back."""
        pool: GuestPool[Instance] = GuestPool(Instance)
        lent, idle = pool.acquire(), pool.acquire()
        pool.release(idle)
        pool.retire()
        self.assertEqual(pool.stats.idle, 0)
        pool.release(lent)
        self.assertEqual((pool.stats.idle, pool.stats.in_use, pool.stats.recycled), (0, 0, 2))

    def test_an_instance_being_made_counts_as_in_use(self) -> None:
        """An instance given back while another is being made must not leave more idle instances than were ever
        in use at once: the one being made is counted from the start (the soak's bound, which a thread releasing
        during a creation broke)."""
        first = Instance()
        made: list[Instance] = [first]
        pool: GuestPool[Instance] = GuestPool(lambda: made.pop())
        self.assertIs(pool.acquire(), first)

        def factory() -> Instance:
            self.assertEqual(pool.stats.in_use, 2)  # the caller waiting for this one is counted
            pool.release(first)  # meanwhile, another thread gives its instance back
            return Instance()

        pool._factory = factory
        second = pool.acquire()
        pool.release(second)
        stats = pool.stats
        self.assertEqual((stats.in_use, stats.idle, stats.created), (0, 2, 2))
        self.assertEqual(stats.peak_in_use, 2)

    def test_a_failed_creation_is_not_counted_in_use(self) -> None:
        def factory() -> Instance:
            raise KeyboardInterrupt

        pool: GuestPool[Instance] = GuestPool(factory)
        with self.assertRaises(KeyboardInterrupt):
            pool.acquire()
        self.assertEqual(pool.stats.in_use, 0)

    def test_failures_and_recovery_are_told_once_each(self) -> None:
        """A failing factory is reported once per back-off step (not per refused request), and the first success
        after failures is reported as a recovery, once."""
        clock = FakeClock()
        events: list[tuple[str, str]] = []
        failing = [True]

        def factory() -> Instance:
            if failing[0]:
                raise RuntimeError("init trapped")
            return Instance()

        pool: GuestPool[Instance] = GuestPool(factory, clock=clock, on_event=lambda *event: events.append(event))
        for _step in range(2):
            with self.assertRaises(GuestUnavailable):
                pool.acquire()
            for _ in range(5):  # refused during the back-off: nothing more is said
                with self.assertRaises(GuestUnavailable):
                    pool.acquire()
            clock.now += 60
        self.assertEqual([level for level, _ in events], ["error", "error"])
        self.assertIn("init trapped", events[0][1])
        self.assertIn("(2 in a row)", events[1][1])
        failing[0] = False
        pool.release(pool.acquire())
        pool.release(pool.acquire())
        self.assertEqual(events[2:], [("info", "recovered: a new instance initialised after 2 failed attempt(s)")])


class RecoveryLogTests(SynchronousTestCase):
    def test_guest_logs_recovery(self) -> None:
        """A guest whose instances failed to initialise says in its log, once, that it recovered."""
        guest = make_guest(COUNTING_GUEST, name="flaky")
        logged = LogCapture(self, "flaky")
        factory = guest.pool._factory
        guest.pool.clear()
        guest.pool._factory = lambda: (_ for _ in ()).throw(RuntimeError("no memory"))
        with self.assertRaises(GuestUnavailable):
            guest.pool.acquire()
        guest.pool._factory = factory
        guest.pool._retry_at = 0.0  # the back-off is over
        guest.pool.release(guest.pool.acquire())
        texts = [text for _, text in logged.messages()]
        self.assertEqual(len(texts), 2)
        self.assertIn("guest flaky: new instances fail to initialise (1 in a row): no memory", texts[0])
        self.assertIn("guest flaky: recovered", texts[1])


class OptionTests(SynchronousTestCase):
    def test_recycling_options(self) -> None:
        """--guest-max-requests and --guest-max-age set the recycling limits; both are off by default."""
        options = Options()
        options.parseOptions(["--guest", "g.wat", "--class", "tests.test_twistd.Hello"])
        self.assertEqual((options["guest-max-requests"], options["guest-max-age"]), (None, None))
        options = Options()
        options.parseOptions(
            [
                "--guest",
                "g.wat",
                "--guest-max-requests",
                "3",
                "--guest-max-age",
                "60",
                "--class",
                "tests.test_twistd.Hello",
            ]
        )
        self.assertEqual((options["guest-max-requests"], options["guest-max-age"]), (3, 60.0))

    def test_bad_recycling_options(self) -> None:
        from twisted.python.usage import UsageError

        for args in (["--guest-max-requests", "0"], ["--guest-max-age", "-1"], ["--guest-sha256", "abc"]):
            with self.assertRaises(UsageError):
                Options().parseOptions(["--guest", "g.wat", *args, "--class", "tests.test_twistd.Hello"])
