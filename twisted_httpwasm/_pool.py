"""The pool of initialised guest instances.

Uncapped, as the seed design says: the server's own concurrency limits how
many instances exist.  Thread-safe, because thread mode acquires and releases
in worker threads.  When new instances cannot be made (the guest's init
traps), creation is retried only after a growing back-off, so a broken guest
cannot make every request pay for a failing instantiation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

__all__ = ["GuestPool", "GuestUnavailable", "PoolStats"]


class _Instance(Protocol):
    trapped: bool


InstanceT = TypeVar("InstanceT", bound=_Instance)

_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 30.0


class GuestUnavailable(Exception):
    """No instance can be created right now; retry later (HTTP 503)."""


class PoolStats:
    """Counters an operator and the tests can read."""

    __slots__ = ("created", "creation_failures", "discarded", "idle", "in_use", "peak_in_use")

    def __init__(self) -> None:
        self.created = 0
        self.discarded = 0
        self.in_use = 0
        self.peak_in_use = 0
        self.idle = 0
        self.creation_failures = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class GuestPool(Generic[InstanceT]):
    """Lends instances one request at a time and takes back the healthy ones."""

    def __init__(self, factory: Callable[[], InstanceT], clock: Callable[[], float] = time.monotonic):
        self._factory = factory
        self._clock = clock
        self._idle: list[InstanceT] = []
        self._lock = threading.Lock()
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error: BaseException | None = None
        self.stats = PoolStats()

    def acquire(self) -> InstanceT:
        """An idle instance, or a new one; raises the factory's error or GuestUnavailable."""
        with self._lock:
            if self._idle:
                instance = self._idle.pop()
                self._lent()
                return instance
            if self._backoff and self._clock() < self._retry_at:
                raise GuestUnavailable(f"guest instances cannot be created: {self._last_error}")
        try:
            instance = self._factory()
        except BaseException as error:
            with self._lock:
                self.stats.creation_failures += 1
                self._backoff = min(_MAX_BACKOFF, self._backoff * 2 or _FIRST_BACKOFF)
                self._retry_at = self._clock() + self._backoff
                self._last_error = error
            raise
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
            if instance.trapped:
                self.stats.discarded += 1
            else:
                self._idle.append(instance)
            self.stats.idle = len(self._idle)

    def clear(self) -> None:
        """Drop every idle instance (they are re-created on demand)."""
        with self._lock:
            self._idle.clear()
            self.stats.idle = 0
