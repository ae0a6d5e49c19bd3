"""Hot reload of a process's guests: ``kill -HUP <pid>``.

A :class:`GuestReloader` knows the :class:`~twisted_httpwasm.web.resource.GuestResource`
chain of one process and a ``load`` function that loads every guest afresh
from the command line's sources (guest files or URLs, configuration files).
:meth:`GuestReloader.reload` loads the whole chain first (compiled, validated,
one instance initialised each); only if every guest loaded does it swap them,
all in one turn of the reactor, so no request starts on a half-reloaded chain.
Requests in flight finish on the instances they pinned; the old guests are
retired, and their instances freed once their last request ended.  If any
guest fails to load, nothing changes and one error line says why.  A reload
asked for while one still loads supersedes it: the reloader calls its
``interrupt`` (which stops a guest fetch in progress: its load then fails with
``CancelledError``) and loads once more when the running load ended, so a stuck
catalog can never hold a later reload back, while a load that is compiling is
let finish rather than piled up under a SIGHUP storm.

:class:`HangupService` runs a reload on ``SIGHUP`` while it runs;
:class:`WatchService` (``--watch``) runs one when a watched file changed and
then stayed unchanged for a polling interval (debounced, so a file being
written is not loaded half-way).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from ..runtime.guest import Guest
from ..web.resource import GuestResource

__all__ = ["RELOAD_SERVICE", "WATCH_SERVICE", "GuestReloader", "HangupService", "ReloadError", "WatchService"]

_log = Logger(namespace="httpwasm")

#: The name of the :class:`HangupService` in a ``twistd httpwasm`` service tree.
RELOAD_SERVICE = "httpwasm-reload"

#: The name of the :class:`WatchService` (``--watch``) in a ``twistd httpwasm`` service tree.
WATCH_SERVICE = "httpwasm-watch"

#: Seconds between two looks at the watched files; a change is acted on once it held for one interval.
WATCH_INTERVAL = 1.0


class ReloadError(Exception):
    """A guest of the chain cannot be reloaded; the message names it and says why."""


class GuestReloader:
    """Reloads the guests of ``resources`` (outermost first) with what ``load`` returns.

    ``load`` returns the new guests, in the same order, or a Deferred firing
    with them; it raises :class:`ReloadError` (or fails with it) if one cannot
    be loaded.  ``label`` starts each log line (``httpwasm``, ``httpwasm worker 2``).
    ``after_reload`` callables run after each reload, whatever its outcome
    (the main process of ``--workers`` signals its workers there).
    ``interrupt``, if given, is called when a reload is asked for while one
    runs: it should make the running load end soon (a fetch cancelled).
    """

    def __init__(
        self,
        resources: Sequence[GuestResource],
        load: Callable[[], Sequence[Guest] | defer.Deferred[Sequence[Guest]]],
        *,
        label: str = "httpwasm",
        interrupt: Callable[[], object] | None = None,
    ):
        self.resources = list(resources)
        self.load = load
        self.label = label
        self.interrupt = interrupt
        self.after_reload: list[Callable[[], object]] = []
        self._running: defer.Deferred[bool] | None = None
        self._again = False

    @property
    def guests(self) -> list[Guest]:
        """The guests serving now, outermost first."""
        return [resource.guest for resource in self.resources]

    def reload(self) -> defer.Deferred[bool]:
        """Load every guest afresh and swap them in if all loaded; fires with whether they were swapped.

        A reload asked for while one runs supersedes it: ``interrupt`` stops
        what can be stopped of the running one (a fetch), and the sources are
        loaded once more, as they are then.
        """
        if self._running is not None:
            self._again = True
            if self.interrupt is not None:
                self.interrupt()
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
        except defer.CancelledError:
            _log.info("{label}: reload superseded by a newer one", label=self.label)
            return False  # the newer one runs next, and tells the hooks
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
        self._installed = False
        self.setName(RELOAD_SERVICE)  # type: ignore[no-untyped-call]

    def privilegedStartService(self) -> None:
        # Before the ports listen (twistd binds them here, before startService): a SIGHUP sent as soon as the
        # server accepts connections must reload, not end the process (SIGHUP's default action).
        service.Service.privilegedStartService(self)  # type: ignore[no-untyped-call]
        self._install()

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        self._install()

    def _install(self) -> None:
        if not self._installed:
            self._installed = True
            self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._installed:
            self._installed = False
            signal.signal(signal.SIGHUP, self._previous if self._previous is not None else signal.SIG_DFL)
            self._previous = None

    def _hangup(self, number: int, frame: Any) -> None:
        # A signal handler: hand the work to the reactor (safe from here, and it wakes the reactor up).
        self.reactor.callFromThread(self.reloader.reload)


class WatchService(service.Service):
    """Reloads when one of ``paths`` changed (modification time, size, inode, existence), debounced.

    The files are polled every ``interval`` seconds; a reload runs once a
    change has been seen and the files then stayed the same for one interval.
    """

    def __init__(
        self, reloader: GuestReloader, paths: Sequence[str], interval: float = WATCH_INTERVAL, reactor: Any = None
    ):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reloader = reloader
        self.paths = list(dict.fromkeys(paths))
        self.interval = interval
        self.reactor = reactor
        self._seen: tuple[tuple[str, tuple[int, ...] | None], ...] = ()
        self._changed: list[str] = []  # seen changing, not yet reloaded
        self._loop: task.LoopingCall | None = None
        self.setName(WATCH_SERVICE)  # type: ignore[no-untyped-call]

    def _signature(self) -> tuple[tuple[str, tuple[int, ...] | None], ...]:
        signature: list[tuple[str, tuple[int, ...] | None]] = []
        for path in self.paths:
            try:
                status = os.stat(path)
            except OSError:
                signature.append((path, None))
            else:
                signature.append((path, (status.st_mtime_ns, status.st_size, status.st_ino)))
        return tuple(signature)

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        self._seen = self._signature()
        self._loop = task.LoopingCall(self._check)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _check(self) -> None:
        current = self._signature()
        if current != self._seen:
            for (path, before), (_, now) in zip(self._seen, current, strict=True):
                if before != now and path not in self._changed:
                    self._changed.append(path)
            self._seen = current
            return  # wait until the files hold still for an interval
        if self._changed:
            changed, self._changed = self._changed, []
            _log.info("{label}: {paths} changed; reloading", label=self.reloader.label, paths=", ".join(changed))
            self.reloader.reload()
