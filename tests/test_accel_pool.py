"""The compiled accelerator's lend and give-back of pool instances against ``GuestPool``'s own methods.

``_accel.c`` lends and takes back instances itself in the common case (a
plain pool, an idle instance, one that did not trap) and leaves every other
case, untouched, to ``GuestPool.acquire`` and ``GuestPool.release``, which
are the pure path.  These tests drive both with generated sequences and
compare what each pool holds and counts after every step, check each case the
C side must leave to Python, and run it from several threads at once.
"""

from __future__ import annotations

import threading
import time
from typing import Any
from unittest import SkipTest

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.runtime import accel
from twisted_httpwasm.runtime.pool import GuestPool, PoolStats


def _compiled() -> Any:
    if accel.compiled is None:
        raise SkipTest(f"compiled accelerator not in use: {accel.REASON}")
    return accel.compiled


class Item:
    """A pool instance: numbered in the order its pool made it."""

    def __init__(self, number: int):
        self.number = number
        self.trapped = False


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pool(clock: Any = time.monotonic, **options: Any) -> GuestPool[Item]:
    made = [0]

    def factory() -> Item:
        made[0] += 1
        return Item(made[0])

    return GuestPool(factory, clock, **options)


def _seen(pool: GuestPool[Item]) -> tuple[dict[str, int], list[int], int]:
    """What a pool holds and counts (not when each idle instance came back: two pools differ in that)."""
    return pool.stats.as_dict(), [item.number for item in pool._idle], len(pool._idle_since)


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("lend")),
        st.tuples(st.just("give"), st.integers(0, 7), st.booleans()),
        st.tuples(st.just("retire")),
    ),
    max_size=40,
)
OPTIONS = st.fixed_dictionaries(
    {
        "max_requests": st.sampled_from([None, 2]),
        "max_age": st.sampled_from([None, 1000.0]),
        "idle_timeout": st.sampled_from([None, -1.0, 3600.0]),
        "min_idle": st.integers(0, 2),
        "fake_clock": st.booleans(),
    }
)


class FastPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.accelerated = _compiled()

    def _lend(self, pool: GuestPool[Item]) -> tuple[Item, bool]:
        item = self.accelerated.pool_lend(pool)
        return (item, True) if item is not None else (pool.acquire(), False)

    def _give(self, pool: GuestPool[Item], item: Item) -> bool:
        if self.accelerated.pool_give(pool, item):
            return True
        pool.release(item)
        return False

    @settings(max_examples=300, deadline=None)
    @given(operations=OPERATIONS, options=OPTIONS)
    def test_the_same_as_the_methods(self, operations: list[tuple[Any, ...]], options: dict[str, Any]) -> None:
        """Any sequence of lends, give-backs (trapped or not) and retirements leaves both pools alike."""
        fake = options.pop("fake_clock")
        fast, pure = (
            _pool(FakeClock() if fake else time.monotonic, **options),
            _pool(FakeClock() if fake else time.monotonic, **options),
        )
        lent: list[tuple[Item, Item]] = []
        for operation in operations:
            if operation[0] == "lend":
                item, _ = self._lend(fast)
                twin = pure.acquire()
                self.assertEqual(item.number, twin.number)
                lent.append((item, twin))
            elif operation[0] == "give" and lent:
                item, twin = lent.pop(operation[1] % len(lent))
                item.trapped = twin.trapped = operation[2]
                self._give(fast, item)
                pure.release(twin)
            elif operation[0] == "retire":
                fast.retire()
                pure.retire()
            self.assertEqual(_seen(fast), _seen(pure), operation)

    def test_a_plain_pool_is_served_in_c(self) -> None:
        """An idle instance is lent, and one given back is kept, without the methods; the counts move as theirs."""
        pool = _pool()
        first, fast = self._lend(pool)
        self.assertFalse(fast)  # nothing idle yet: the method makes it
        self.assertTrue(self._give(pool, first))
        self.assertEqual(_seen(pool), ({**_counts(created=1, idle=1, peak_in_use=1)}, [1], 1))
        again, fast = self._lend(pool)
        self.assertTrue(fast)
        self.assertIs(again, first)
        self.assertEqual(_seen(pool), (_counts(created=1, in_use=1, peak_in_use=1), [], 0))
        second, _ = self._lend(pool)
        self.assertEqual(pool.stats.peak_in_use, 2)
        self.assertTrue(self._give(pool, second))
        self.assertTrue(self._give(pool, again))
        self.assertEqual([item.number for item in pool._idle], [2, 1])  # the most recently returned is lent first

    def _assert_left_to_python(self, pool: GuestPool[Item], item: Item | None = None) -> None:
        before = _seen(pool)
        self.assertIsNone(self.accelerated.pool_lend(pool))
        if item is not None:
            self.assertFalse(self.accelerated.pool_give(pool, item))
        self.assertEqual(_seen(pool), before)

    def _with_idle(self, pool: GuestPool[Item]) -> Item:
        """The pool with one idle instance, and one lent (returned)."""
        idle, lent = pool.acquire(), pool.acquire()
        pool.release(idle)
        return lent

    def test_what_is_left_to_the_methods(self) -> None:
        """Each case the C side does not serve changes nothing there, and the method decides."""
        cases: dict[str, Any] = {}

        class Subclass(GuestPool[Item]):
            pass

        cases["a subclass"] = Subclass(lambda: Item(1))
        cases["recycling by requests"] = _pool(max_requests=5)
        cases["recycling by age"] = _pool(max_age=60.0)
        retired = _pool()
        cases["retired"] = retired
        spied = _pool()
        cases["a method of its own"] = spied
        for name, pool in cases.items():
            with self.subTest(name):
                lent = self._with_idle(pool)
                if name == "retired":
                    pool.retire()
                    pool.release(Item(98))  # dropped, as the method drops it
                if name == "a method of its own":
                    pool.release = pool.release  # type: ignore[method-assign]
                self._assert_left_to_python(pool, lent)

    def test_a_busy_lock_leaves_it_to_the_methods(self) -> None:
        """With the pool's lock held (a method of another thread inside it), the C side does not wait: Python does."""
        pool = _pool()
        lent = self._with_idle(pool)
        pool._lock.acquire()
        try:
            self._assert_left_to_python(pool, lent)
        finally:
            pool._lock.release()
        self.assertIsNotNone(self.accelerated.pool_lend(pool))

    def test_what_give_back_leaves_to_the_method(self) -> None:
        """A trapped instance, a clock of the caller's, an idle instance due for retirement: the method's."""
        trapped_pool = _pool()
        trapped = self._with_idle(trapped_pool)
        trapped.trapped = True
        clocked = _pool(FakeClock())
        due = _pool(idle_timeout=-1.0, min_idle=0)
        for name, pool, item in [
            ("trapped", trapped_pool, trapped),
            ("another clock", clocked, self._with_idle(clocked)),
            ("an idle instance due", due, due.acquire()),
        ]:
            with self.subTest(name):
                before = _seen(pool)
                self.assertFalse(self.accelerated.pool_give(pool, item))
                self.assertEqual(_seen(pool), before)
                pool.release(item)  # and the method does what it does
        self.assertEqual(trapped_pool.stats.discarded, 1)
        self.assertEqual(due.stats.retired, 1)

    def test_an_empty_pool_is_left_to_the_method(self) -> None:
        """Nothing idle: the method makes an instance (or refuses), not the C side."""
        pool = _pool()
        self._assert_left_to_python(pool)
        self.assertEqual(pool.stats.created, 0)

    def test_threads_at_once(self) -> None:
        """Lends and give-backs in C and through the methods, from several threads: every count adds up."""
        pool = _pool()
        errors: list[BaseException] = []
        start = threading.Barrier(4)

        def work(through_c: bool) -> None:
            try:
                start.wait()
                for _ in range(2000):
                    if through_c:
                        item, _ = self._lend(pool)
                        self._give(pool, item)
                    else:
                        pool.release(pool.acquire())
            except BaseException as error:  # noqa: BLE001 - reported by the test
                errors.append(error)

        threads = [threading.Thread(target=work, args=(n % 2 == 0,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        stats = pool.stats
        self.assertEqual(stats.in_use, 0)
        self.assertEqual(stats.idle, len(pool._idle))
        self.assertEqual(len(pool._idle), len(pool._idle_since))
        self.assertEqual(stats.created, len(pool._idle))  # none lost, none counted twice
        self.assertLessEqual(stats.peak_in_use, 4)

    def test_setup_refuses_a_pool_without_its_slots(self) -> None:
        """A GuestPool whose fields are not slots (another version of pool.py) is refused at setup, with the name."""

        class Unslotted:
            pass

        try:
            with self.assertRaisesRegex(RuntimeError, "_idle is not a slot"):
                self.accelerated.setup_pool(Unslotted, PoolStats, time.monotonic)
            pool = _pool()
            lent = self._with_idle(pool)
            self._assert_left_to_python(pool, lent)  # no offsets known: nothing in C
        finally:
            self.accelerated.setup_pool(GuestPool, PoolStats, time.monotonic)
        self.assertIsNotNone(self.accelerated.pool_lend(pool))


def _counts(**given: int) -> dict[str, int]:
    counts = dict.fromkeys(PoolStats.__slots__, 0)
    counts.update(given)
    return counts
