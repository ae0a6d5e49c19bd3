"""What the host tells observers (metrics, traces) about guests and requests.

The request path calls an observer at a few fixed points and never knows what
listens: :data:`NO_OBSERVER` by default, a Prometheus or OpenTelemetry observer
when the operator enables one.  An observer must be cheap and must not raise;
it is called on the reactor thread unless a method says otherwise.

This module is plain data and a protocol: it imports neither wasmtime nor
twisted.web, so every layer may use it.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["NO_OBSERVER", "OUTCOMES", "GuestObserver", "NullObserver", "Observers", "Outcome", "add_observer"]


class Outcome:
    """How a request through one guest ended (the ``outcome`` label of the metrics)."""

    PASSED = "passed"  # next=1: the downstream answered and handle_response ran
    ANSWERED = "answered"  # next=0: the guest answered itself
    TRAPPED = "trapped"  # a guest call trapped (fail-closed: 500, or the response was cut)
    TIMED_OUT = "timed_out"  # a guest call hit its time limit
    FAIL_OPEN = "fail_open"  # a guest call failed and the request went on without it
    TOO_LARGE = "too_large"  # 413: a body over a limit
    BAD_GATEWAY = "bad_gateway"  # 502: a buffered response over its limit, or the proxy's backend failed
    UNAVAILABLE = "unavailable"  # 503: no instance could be made
    CLIENT_GONE = "client_gone"  # the client left before the response was complete


OUTCOMES = tuple(value for name, value in vars(Outcome).items() if name.isupper())


class GuestObserver(Protocol):
    """Called by the request path; see :class:`NullObserver` for the meaning of each call."""

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None: ...


class NullObserver:
    """Observes nothing, at the cost of one method call per request."""

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None:
        """One request through ``guest`` ended with ``outcome`` (an :class:`Outcome` value).

        ``request`` is the twisted.web request, ``state`` the request's
        ``RequestState`` (the guest calls it saw), ``started`` the
        ``time.monotonic()`` at which the guest got the request.  Called once
        per request and guest, on the reactor thread, when the guest's part
        of the request is over.
        """


NO_OBSERVER: GuestObserver = NullObserver()


class Observers:
    """Several observers of one guest (metrics and traces), told in order; one that raises is skipped."""

    def __init__(self, *observers: GuestObserver):
        self.observers = tuple(observers)

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None:
        for observer in self.observers:
            try:
                observer.request_finished(guest, request, state, outcome, started)
            except Exception:  # noqa: BLE001 - an observer must not break the request path
                _report(observer)


def _report(observer: object) -> None:
    from twisted.logger import Logger

    Logger(namespace="httpwasm").failure("observer {observer!r} failed", observer=observer)


def add_observer(guest: Any, observer: GuestObserver) -> None:
    """Make ``observer`` hear about ``guest``'s requests too, keeping the observers it has."""
    current = guest.observer
    if current is NO_OBSERVER or current is observer:
        guest.observer = observer
    elif isinstance(current, Observers):
        if observer not in current.observers:
            guest.observer = Observers(*current.observers, observer)
    else:
        guest.observer = Observers(current, observer)
