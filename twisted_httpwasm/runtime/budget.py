"""A process-wide bound on the bytes held in buffered bodies.

Each request may buffer up to ``--max-buffer-bytes``; without a bound on the
sum, enough concurrent buffered requests hold any amount of memory (16
concurrent 15 MiB ``buffer_response`` requests held 458 MiB).  A
:class:`BufferBudget` counts what every buffered body of the process holds; a
request that would take the total past it is refused (HTTP 503 with
``Retry-After``) instead of growing the process.  Thread-safe: guest threads
and the reactor both reserve and release.
"""

from __future__ import annotations

import threading

__all__ = ["DEFAULT_MAX_BUFFERED_TOTAL", "PROCESS_BUDGET", "BufferBudget"]

#: Bytes all buffered bodies of one process may hold together, unless told otherwise.
DEFAULT_MAX_BUFFERED_TOTAL = 256 * 1024 * 1024


class BufferBudget:
    """Counts reserved bytes against ``total`` (``None``: no bound, only counted)."""

    __slots__ = ("_lock", "held", "total")

    def __init__(self, total: int | None = DEFAULT_MAX_BUFFERED_TOTAL):
        self.total = total
        self.held = 0
        self._lock = threading.Lock()

    # The lock is taken and released explicitly, not with `with`: in CPython 3.11 a with-block on
    # a lock costs about twice as much, and every buffered write reserves (see GuestPool.acquire).

    def reserve(self, size: int) -> bool:
        """Take ``size`` more bytes if they fit; False (and nothing taken) if they do not."""
        lock = self._lock
        lock.acquire()
        try:
            if self.total is not None and self.held + size > self.total:
                return False
            self.held += size
            return True
        finally:
            lock.release()

    def release(self, size: int) -> None:
        """Give back ``size`` bytes reserved earlier."""
        lock = self._lock
        lock.acquire()
        try:
            self.held -= size
        finally:
            lock.release()

    def __repr__(self) -> str:
        return f"<BufferBudget held={self.held} total={self.total}>"


#: The budget every ``GuestResource`` of the process shares unless given another.
PROCESS_BUDGET = BufferBudget()
