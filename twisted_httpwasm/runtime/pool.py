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
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["IDLE_TIMEOUT", "GuestPool", "GuestUnavailable", "PoolStats"]


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

    __slots__ = ("created", "creation_failures", "discarded", "idle", "in_use", "peak_in_use", "retired")

    def __init__(self) -> None:
        self.created = 0
        self.discarded = 0
        self.retired = 0  # dropped after idle_timeout seconds unused
        self.in_use = 0
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
    ):
        self._factory = factory
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.min_idle = min_idle
        # The idle stack, most recently returned last, with when each was returned.
        self._idle: deque[InstanceT] = deque()
        self._idle_since: deque[float] = deque()
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0
        self._probing = False
        self._last_error = ""  # the reason only: keeping the exception would keep its frames alive
        self.stats = PoolStats()

    def acquire(self) -> InstanceT:
        """An idle instance, or a new one; raises :class:`GuestUnavailable` if none can be made.

        During a back-off no creation is attempted; once it is over, one caller
        tries while the others are still refused.
        """
        probing = False
        with self._lock:
            if self._idle:
                instance = self._idle.pop()
                self._idle_since.pop()
                self._lent()
                return instance
            if self._backoff:
                now = self._clock()
                if self._probing or now < self._retry_at:
                    raise GuestUnavailable(
                        f"guest instances cannot be created: {self._last_error}",
                        retry_after=max(self._retry_at - now, 0.0) or self._backoff,
                    )
                self._probing = probing = True  # this caller tries; the others are refused until it knows
        try:
            instance = self._factory()
        except Exception as error:
            with self._lock:
                self.stats.creation_failures += 1
                self._backoff = min(_MAX_BACKOFF, self._backoff * 2 or _FIRST_BACKOFF)
                self._retry_at = self._clock() + self._backoff
                self._last_error = str(error)
                backoff = self._backoff
            raise GuestUnavailable(f"guest instances cannot be created: {error}", retry_after=backoff) from error
        finally:
            if probing:
                self._probing = False
        with self._lock:
            self._backoff = 0.0
            self.stats.created += 1
            self._lent()
        return instance

    def _lent(self) -> None:
        stats = self.stats
        stats.in_use += 1
        stats.idle = len(self._idle)
        if stats.in_use > stats.peak_in_use:
            stats.peak_in_use = stats.in_use

    def release(self, instance: InstanceT) -> None:
        """Give back an instance; one that trapped is discarded, never lent again."""
        with self._lock:
            self.stats.in_use -= 1
            now = self._clock()
            if instance.trapped:
                self.stats.discarded += 1
            else:
                self._idle.append(instance)
                self._idle_since.append(now)
            self._retire_idle(now)
            self.stats.idle = len(self._idle)

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

    def clear(self) -> None:
        """Drop every idle instance (they are re-created on demand)."""
        with self._lock:
            self._idle.clear()
            self._idle_since.clear()
            self.stats.idle = 0
