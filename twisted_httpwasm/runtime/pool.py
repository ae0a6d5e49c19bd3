"""The pool of initialised guest instances.

Uncapped, as the seed design says: the server's own concurrency limits how
many instances exist.  Thread-safe, because thread mode acquires and releases
in worker threads.  When new instances cannot be made (the guest's init
traps), every request that needs one is refused with :class:`GuestUnavailable`
(HTTP 503), and creation is retried only after a growing back-off, by one
caller at a time, so a broken guest cannot make every request pay for a
failing instantiation.

Idle instances are given back: the pool lends the most recently returned one
first, so the instances at the bottom of the idle stack are the ones recent
concurrency did not need.  Any that has been idle for ``idle_timeout`` seconds
(:data:`IDLE_TIMEOUT`) is dropped (its store and memory freed) by
:meth:`GuestPool.retire_idle`, which each release calls, and a timer should
call while traffic is quiet (``twistd httpwasm``'s site does, every few
seconds); ``min_idle`` instances always stay.

Recycling (``max_requests``, ``max_age``; both off by default): an instance
that has served ``max_requests`` requests, or was created ``max_age`` seconds
ago, is dropped when it is given back (between requests, never during one) and
a fresh one is made when next needed.  That bounds what a guest with a leaking
allocator can hold.

A pool whose guest was replaced (hot reload) is *retired*
(:meth:`GuestPool.retire`): its idle instances are dropped at once, and each
instance still lent out is dropped when its request gives it back, so the
memory of the old guest returns once its last request ended.

``on_event(level, message)`` hears what an operator must know about the pool:
each failed creation (one per back-off step, since only one caller tries per
step) and the first success after failures ("recovered").  It may be called
from any thread.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar, overload

__all__ = ["IDLE_TIMEOUT", "GuestPool", "GuestUnavailable", "PoolStats"]

#: ``on_event`` levels.
INFO = "info"
ERROR = "error"


class _Instance(Protocol):
    trapped: bool


InstanceT = TypeVar("InstanceT", bound=_Instance)

#: Seconds an instance may stay idle before the pool drops it (beyond ``min_idle``).
IDLE_TIMEOUT = 30.0
_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 30.0


class GuestUnavailable(Exception):
    """No instance can be created right now; retry later (HTTP 503).

    ``retry_after`` is the number of seconds until the pool tries again.  When
    raised for a failed creation, the factory's error is the ``__cause__``.
    """

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class PoolStats:
    """Counters an operator and the tests can read."""

    __slots__ = ("created", "creation_failures", "discarded", "idle", "in_use", "peak_in_use", "recycled", "retired")

    def __init__(self) -> None:
        self.created = 0
        self.discarded = 0
        self.retired = 0  # dropped after idle_timeout seconds unused
        self.recycled = 0  # dropped for max_requests/max_age, or because the pool itself was retired
        self.in_use = 0  # lent out, or being made for a caller
        self.peak_in_use = 0
        self.idle = 0
        self.creation_failures = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class GuestPool(Generic[InstanceT]):
    """Lends instances one request at a time and takes back the healthy ones."""

    def __init__(
        self,
        factory: Callable[[], InstanceT],
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float | None = IDLE_TIMEOUT,
        min_idle: int = 1,
        *,
        max_requests: int | None = None,
        max_age: float | None = None,
        on_event: Callable[[str, str], None] | None = None,
    ):
        self._factory = factory
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.min_idle = min_idle
        self.max_requests = max_requests
        self.max_age = max_age
        self._on_event = on_event
        #: True once :meth:`retire` was called: instances given back are dropped, not pooled.
        self.retired = False
        # Per instance, when recycling is on: [requests lent for, creation time].
        self._usage: weakref.WeakKeyDictionary[InstanceT, list[float]] = weakref.WeakKeyDictionary()
        # The idle stack, most recently returned last, with when each was returned.
        self._idle: deque[InstanceT] = deque()
        self._idle_since: deque[float] = deque()
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0
        self._probing = False
        self._last_error = ""  # the reason only: keeping the exception would keep its frames alive
        self._failures = 0  # failed creations since the last success
        self.stats = PoolStats()

    @overload
    def acquire(self, *, for_request: bool = True) -> InstanceT: ...

    @overload
    def acquire(self, *, for_request: bool = True, make: bool) -> InstanceT | None: ...

    def acquire(self, *, for_request: bool = True, make: bool = True) -> InstanceT | None:
        """An idle instance, or a new one; raises :class:`GuestUnavailable` if none can be made.

        ``make=False``: None rather than a new instance (see :meth:`acquire_idle`).

        During a back-off no creation is attempted; once it is over, one caller
        tries while the others are still refused.  ``for_request=False``: a
        look at the instance (its features, say) that does not count towards
        ``max_requests``.
        """
        probing = False
        # An explicit acquire and release, not `with`: in CPython 3.11 a with-block on a lock costs
        # about twice as much (~1.9k instructions against ~1k), and a request takes the pool's twice.
        lock = self._lock
        lock.acquire()
        try:
            idle = self._idle
            while idle:
                instance = idle.pop()
                self._idle_since.pop()
                if self.max_requests is not None or self.max_age is not None:  # recycling: count, or drop the aged
                    if self.max_age is not None and self._worn_out(instance, self._clock()):
                        self._usage.pop(instance, None)
                        self.stats.recycled += 1
                        continue
                    self._lent(instance, for_request)
                    return instance
                stats = self.stats  # the common case, without recycling: what _lent does, in line (hot path)
                stats.in_use = in_use = stats.in_use + 1
                stats.idle = len(idle)
                if in_use > stats.peak_in_use:
                    stats.peak_in_use = in_use
                return instance
            stats = self.stats
            stats.idle = 0
            if not make:
                return None
            if self._backoff:
                now = self._clock()
                if self._probing or now < self._retry_at:
                    raise GuestUnavailable(
                        f"guest instances cannot be created: {self._last_error}",
                        retry_after=max(self._retry_at - now, 0.0) or self._backoff,
                    )
                self._probing = probing = True  # this caller tries; the others are refused until it knows
            # The instance being made counts as lent from now: an instance given
            # back while it is made must not make the pool look bigger than the
            # concurrency that needed it (in_use + idle is every live instance).
            self._count_in_use()
        finally:
            lock.release()
        try:
            instance = self._factory()
        except Exception as error:
            with self._lock:
                self.stats.in_use -= 1
                self.stats.creation_failures += 1
                self._failures += 1
                failures = self._failures
                self._backoff = min(_MAX_BACKOFF, self._backoff * 2 or _FIRST_BACKOFF)
                self._retry_at = self._clock() + self._backoff
                self._last_error = str(error)
                backoff = self._backoff
            self._tell(
                ERROR,
                f"new instances fail to initialise ({failures} in a row): {error}; "
                f"requests that need one get 503 until the next try in {backoff:g} s",
            )
            raise GuestUnavailable(f"guest instances cannot be created: {error}", retry_after=backoff) from error
        except BaseException:
            with self._lock:
                self.stats.in_use -= 1
            raise
        finally:
            if probing:
                self._probing = False
        with self._lock:
            self._backoff = 0.0
            failures, self._failures = self._failures, 0
            self.stats.created += 1
            if self.max_requests is not None or self.max_age is not None:
                self._usage[instance] = [1 if for_request else 0, self._clock()]
        if failures:
            self._tell(INFO, f"recovered: a new instance initialised after {failures} failed attempt(s)")
        return instance

    def acquire_idle(self) -> InstanceT | None:
        """An idle instance, lent as :meth:`acquire` lends it, or None when none is idle.

        Nothing is made: making an instance runs guest code (``_start``), which
        thread mode keeps off the reactor thread, where its lane pins instances.
        """
        return self.acquire(make=False)

    def _tell(self, level: str, message: str) -> None:
        if self._on_event is not None:
            self._on_event(level, message)

    def _lent(self, instance: InstanceT, for_request: bool) -> None:
        usage = self._usage.get(instance)
        if usage is not None and for_request:
            usage[0] += 1
        self._count_in_use()
        self.stats.idle = len(self._idle)

    def _count_in_use(self) -> None:
        """One more instance lent (or being made); the caller holds the lock."""
        stats = self.stats
        stats.in_use = in_use = stats.in_use + 1
        if in_use > stats.peak_in_use:
            stats.peak_in_use = in_use

    def release(self, instance: InstanceT) -> None:
        """Give back an instance; one that trapped is discarded, never lent again.

        One that reached ``max_requests`` or ``max_age``, or any when the pool
        is retired, is dropped too (its store and memory freed).
        """
        lock = self._lock
        lock.acquire()  # not `with`, as in acquire()
        try:
            stats = self.stats
            stats.in_use -= 1
            now = self._clock()
            idle, since = self._idle, self._idle_since
            if instance.trapped:
                stats.discarded += 1
            elif self.retired or (
                (self.max_requests is not None or self.max_age is not None) and self._worn_out(instance, now)
            ):
                self._usage.pop(instance, None)
                stats.recycled += 1
            else:
                idle.append(instance)
                since.append(now)
            timeout = self.idle_timeout
            if timeout is not None and len(idle) > self.min_idle and now - since[0] > timeout:
                self._retire_idle(now)
            stats.idle = len(idle)
        finally:
            lock.release()

    def _worn_out(self, instance: InstanceT, now: float) -> bool:
        usage = self._usage.get(instance)
        if usage is None:
            return False
        served, born = usage
        return (self.max_requests is not None and served >= self.max_requests) or (
            self.max_age is not None and now - born >= self.max_age
        )

    def retire(self) -> None:
        """Stop pooling: drop the idle instances now and every lent one when it is given back.

        For a pool whose guest was replaced: it can still lend (a request of
        the old guest that needs a second instance gets a fresh one), but
        nothing stays once the last request ended.
        """
        with self._lock:
            self.retired = True
            self.stats.recycled += len(self._idle)
            self._idle.clear()
            self._idle_since.clear()
            self.stats.idle = 0

    def retire_idle(self) -> int:
        """Drop the instances idle for longer than ``idle_timeout`` (keeping ``min_idle``); how many went."""
        with self._lock:
            retired = self._retire_idle(self._clock())
            self.stats.idle = len(self._idle)
            return retired

    def _retire_idle(self, now: float) -> int:
        timeout = self.idle_timeout
        if timeout is None:
            return 0
        idle, since = self._idle, self._idle_since
        retired = 0
        # The oldest idle instances are at the bottom of the stack.
        while len(idle) > self.min_idle and now - since[0] > timeout:
            idle.popleft()
            since.popleft()
            retired += 1
        self.stats.retired += retired
        return retired

    def sum_idle(self, measure: Callable[[InstanceT], int]) -> int:
        """The sum of ``measure`` over the idle instances, none of which can be lent meanwhile.

        An instance whose ``measure`` raises (being torn down) is not counted.
        """
        total = 0
        with self._lock:
            for instance in self._idle:
                try:
                    total += measure(instance)
                except Exception:  # noqa: BLE001 - not counted, as documented
                    continue
        return total

    def clear(self) -> None:
        """Drop every idle instance (they are re-created on demand)."""
        with self._lock:
            self._idle.clear()
            self._idle_since.clear()
            self.stats.idle = 0
