"""Hot reload of a process's guests: ``kill -HUP <pid>``.

A :class:`GuestReloader` knows the :class:`~twisted_httpwasm.web.resource.GuestResource`
chain of one process and a ``load`` function that loads every guest afresh
from the command line's sources (guest files or URLs, configuration files).
:meth:`GuestReloader.reload` loads the whole chain first (compiled, validated,
one instance initialised each); only if every guest loaded does it swap them,
all in one turn of the reactor, so no request starts on a half-reloaded chain.
Requests in flight finish on the instances they pinned; the old guests are
retired, and their instances freed once their last request ended.  If any
guest fails to load, nothing changes and one error line says why.

:class:`HangupService` runs a reload on ``SIGHUP`` while it runs.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from ..runtime.guest import Guest
from ..web.resource import GuestResource

__all__ = ["RELOAD_SERVICE", "GuestReloader", "HangupService", "ReloadError"]

_log = Logger(namespace="httpwasm")

#: The name of the :class:`HangupService` in a ``twistd httpwasm`` service tree.
RELOAD_SERVICE = "httpwasm-reload"


class ReloadError(Exception):
    """A guest of the chain cannot be reloaded; the message names it and says why."""


class GuestReloader:
    """Reloads the guests of ``resources`` (outermost first) with what ``load`` returns.

    ``load`` returns the new guests, in the same order, or a Deferred firing
    with them; it raises :class:`ReloadError` (or fails with it) if one cannot
    be loaded.  ``label`` starts each log line (``httpwasm``, ``httpwasm worker 2``).
    ``after_reload`` callables run after each reload, whatever its outcome
    (the main process of ``--workers`` signals its workers there).
    """

    def __init__(
        self,
        resources: Sequence[GuestResource],
        load: Callable[[], Sequence[Guest] | defer.Deferred[Sequence[Guest]]],
        *,
        label: str = "httpwasm",
    ):
        self.resources = list(resources)
        self.load = load
        self.label = label
        self.after_reload: list[Callable[[], object]] = []
        self._running: defer.Deferred[bool] | None = None
        self._again = False

    @property
    def guests(self) -> list[Guest]:
        """The guests serving now, outermost first."""
        return [resource.guest for resource in self.resources]

    def reload(self) -> defer.Deferred[bool]:
        """Load every guest afresh and swap them in if all loaded; fires with whether they were swapped.

        A reload asked for while one runs runs once more after it (sources
        may have changed again in the meantime).
        """
        if self._running is not None:
            self._again = True
            return self._running
        done = defer.ensureDeferred(self._reload_until_settled())
        if not done.called:  # a load that did not finish at once (a fetch)
            self._running = done
        return done

    async def _reload_until_settled(self) -> bool:
        try:
            while True:
                self._again = False
                swapped = await self._reload_once()
                if not self._again:
                    return swapped
        finally:
            self._running = None

    async def _reload_once(self) -> bool:
        try:
            loaded = self.load()
            guests = list(await loaded if isinstance(loaded, defer.Deferred) else loaded)
            if len(guests) != len(self.resources):
                raise ReloadError(f"{len(guests)} guests loaded for a chain of {len(self.resources)}")
        except ReloadError as error:
            _log.error(
                "{label}: reload failed, the running guests keep serving: {reason}", label=self.label, reason=error
            )
            swapped = False
        except Exception:  # noqa: BLE001  # a bug, not a bad guest: still never a half-reloaded chain
            _log.failure("{label}: reload failed, the running guests keep serving", label=self.label)
            swapped = False
        else:
            for resource, guest in zip(self.resources, guests, strict=True):
                resource.replace_guest(guest)
            _log.info(
                "{label}: reloaded {guests}",
                label=self.label,
                guests=" -> ".join(f"{guest.name} (sha256 {guest.sha256})" for guest in guests),
            )
            swapped = True
        for hook in self.after_reload:
            hook()
        return swapped


class HangupService(service.Service):
    """Runs ``reloader.reload()`` on each ``SIGHUP`` while the service runs."""

    def __init__(self, reloader: GuestReloader, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reloader = reloader
        self.reactor = reactor
        self._previous: Any = None
        self.setName(RELOAD_SERVICE)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, number: int, frame: Any) -> None:
        # A signal handler: hand the work to the reactor (safe from here, and it wakes the reactor up).
        self.reactor.callFromThread(self.reloader.reload)
