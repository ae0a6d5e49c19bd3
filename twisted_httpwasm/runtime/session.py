"""One request's pinned guest instance.

A guest instance is not thread-safe and keeps per-request state between its
two calls, so a request takes one instance from the guest's pool for
``handle_request`` and keeps it, pinned, for ``handle_response``, whenever and
in whichever thread that runs.  A :class:`GuestSession` is that pinning: the
only place that takes instances from the pool and gives them back, exactly
once (:meth:`GuestSession.close` is idempotent), so the twisted.web adapter
never touches the pool or an instance.

An accelerated guest's sessions are the compiled accelerator's ``Session``
(``_accel.c``), which does the same in C and makes its guest calls through the
accelerator's fast call: no Python runs between the filter and wasm unless
the guest does something Python must see (see ``GuestInstance._end_fast_call``).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..abi import Feature
from .state import RequestState

__all__ = ["GuestSession"]


class _Instance(Protocol):
    """What a session needs of a guest instance (a ``GuestInstance``)."""

    features: int

    def request_call(self, state: RequestState, inline: bool = False) -> int: ...

    def handle_response(self, state: RequestState, req_ctx: int, is_error: bool, inline: bool = False) -> None: ...


class _Pool(Protocol):
    """What a session needs of the guest's pool (a ``GuestPool``)."""

    def acquire(self) -> Any: ...

    def release(self, instance: Any) -> None: ...


_BUFFER_REQUEST = int(Feature.BUFFER_REQUEST)
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class GuestSession:
    """The guest calls of one request (``state``), on one pinned instance."""

    __slots__ = ("_instance", "_pool", "inline", "req_ctx", "state")

    def __init__(self, pool: _Pool, state: RequestState, inline: bool = False):
        self._pool = pool
        self._instance: _Instance | None = None
        self.state = state
        self.req_ctx = 0
        #: The calls are made on the reactor thread (they may keep the GIL while wasm runs).
        self.inline = inline

    def handle_request(self) -> bool:
        """Pin an instance and run ``handle_request``; True if the guest passes the request on (next).

        Raises :class:`~.pool.GuestUnavailable` when no instance can be had,
        :class:`~.state.BodyTooLarge` when the instance buffers every request
        body and this one is over the limit (the guest is not called), and
        :class:`~.guest.GuestTrap`.  The instance stays pinned only for a
        ``handle_response`` to come (next).
        """
        state = self.state
        instance: _Instance = self._pool.acquire()
        self._instance = instance
        try:
            if instance.features & _BUFFER_REQUEST:
                state.check_size(state.body_length)
            value = instance.request_call(state, self.inline) & _U64
        except BaseException:
            self.close()
            raise
        # As abi.unpack_ctx_next, without making a CtxNext: the low 32 bits are next, the high req_ctx.
        self.req_ctx = value >> 32
        if value & _U32 != 1:
            self.close()
            return False
        return True

    def handle_response(self) -> None:
        """Run ``handle_response`` (``state.is_error`` says how the next handler ended) and unpin."""
        instance = self._instance
        if instance is None:
            raise RuntimeError("handle_response without a pinned instance (handle_request did not pass it on)")
        try:
            instance.handle_response(self.state, self.req_ctx, self.state.is_error, self.inline)
        finally:
            self.close()

    def close(self) -> None:
        """Give the pinned instance back to the pool (a trapped one is discarded); again: nothing."""
        instance, self._instance = self._instance, None
        if instance is not None:
            self._pool.release(instance)
