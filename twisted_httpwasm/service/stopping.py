"""Stopping the process: the service that drains a site, and the stop signals.

:class:`DrainService` drains its site (:meth:`GuestSite.drain
<twisted_httpwasm.web.site.GuestSite.drain>`) when the service tree stops,
which is how ``twistd`` stops on SIGTERM or SIGINT.  It also takes over those
two signals from the reactor: Twisted's own handlers stop the reactor a second
time on a second signal (a ``ReactorNotRunning`` traceback, logged critical)
and make ``twistd`` exit with the signal, so a clean shutdown looked like a
crash to process managers.  With these handlers, a repeated signal is only
logged, and ``twistd`` exits with status 0 once the drain is over.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

from ..web.drain import DEFAULT_SHUTDOWN_TIMEOUT

__all__ = ["DrainService", "stop_reactor", "take_over_stop_signals"]

_log = Logger(namespace="httpwasm")


class DrainService(service.Service):
    """Drains ``site`` (a :class:`~twisted_httpwasm.web.site.GuestSite`) when the service stops.

    Put it in the same service collection as the services that listen for
    ``site``: they stop listening while this one waits, up to ``timeout``
    seconds, for the requests in flight.  With ``stop_signals`` (the default),
    SIGTERM and SIGINT stop the reactor once (a repeated signal is logged, not a
    critical ``ReactorNotRunning``), and ``twistd`` exits with status 0.
    """

    def __init__(
        self,
        site: Any,
        timeout: float | None = DEFAULT_SHUTDOWN_TIMEOUT,
        *,
        reactor: Any = None,
        stop_signals: bool = True,
    ):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.site = site
        self.timeout = timeout
        self.reactor = reactor
        self.stop_signals = stop_signals

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        if self.stop_signals:
            self.reactor.callWhenRunning(take_over_stop_signals, self.reactor)

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        drained: Deferred[bool] = self.site.drain(self.timeout)
        return drained.addCallback(lambda _: None)


def stop_reactor(reactor: Any, why: str) -> None:
    """Stop ``reactor`` unless it is stopping already (then only log ``why``)."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        _log.info("{why}; already stopping", why=why)
        return
    _log.info("{why}; stopping", why=why)


def take_over_stop_signals(reactor: Any) -> None:
    """SIGTERM and SIGINT stop ``reactor`` through :func:`stop_reactor`, wherever the reactor handled them.

    Only the handlers the reactor installed are replaced (not SIG_IGN, not an
    application's own), and only from the main thread, where signals are handled.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for number in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(number)
        if getattr(current, "__self__", None) is not reactor:
            continue
        signal.signal(number, _stop_handler(reactor, f"Received {signal.Signals(number).name}"))


def _stop_handler(reactor: Any, why: str) -> Callable[[int, FrameType | None], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(stop_reactor, reactor, why)

    return handler
