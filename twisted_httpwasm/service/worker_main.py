"""The worker process of ``twistd httpwasm --workers N``: ``python -m twisted_httpwasm.service.worker_main``.

The main process (:class:`~twisted_httpwasm.service.workers.WorkersService`)
starts this module with its listening sockets inherited and a JSON
specification in the environment.  It re-runs the same command line (its own
guests, its own instance pools), serves the inherited sockets
(``AdoptedStreamServerEndpoint``), and writes its log events on stdout with
Twisted's ``jsonFileLogObserver``, for the main process to relay
(``eventFromJSON``).  SIGHUP reloads its guests.  It ends
with the main process (``PR_SET_PDEATHSIG`` and the end of its stdin).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogBeginner, jsonFileLogObserver
from twisted.web.server import Site
from zope.interface import implementer

from .config import HostConfig
from .reload import RELOAD_SERVICE, WATCH_SERVICE
from .stopping import stop_reactor
from .workers import SPEC_VARIABLE

__all__ = ["main"]

_log = Logger(namespace="httpwasm")

_PR_SET_PDEATHSIG = 1


@implementer(ILogObserver)
class _StdoutGuard:
    """An observer that drops what cannot be written: the main process is gone, and the stdin watch stops us."""

    def __init__(self, observer: Any):  # an ILogObserver
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        try:
            self.observer(event)
        except (OSError, ValueError):
            pass


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the main process dies; exit now if it already did."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the stdin watch is the only guard
    if os.getppid() != parent:
        raise SystemExit("httpwasm worker: the main process is already gone")


def _watch_stdin(reactor: Any) -> None:
    """Stop the reactor when stdin (a pipe from the main process) ends: the main process is gone or stops us."""

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        reactor.callFromThread(_main_process_gone, reactor)

    threading.Thread(target=watch, name="httpwasm-main-process-watch", daemon=True).start()


def _main_process_gone(reactor: Any) -> None:
    # Often with a SIGTERM from the main process (or PR_SET_PDEATHSIG): whichever comes second only logs.
    stop_reactor(reactor, "httpwasm worker: the main process closed our stdin")


class _AdoptedPortsService(service.Service):
    """Serves ``site`` on listening sockets inherited from the main process."""

    def __init__(
        self, site: Site, sockets: Sequence[dict[str, Any]], number: int, workers: int, reactor: Any, generation: int
    ):
        self.site = site
        self.generation = generation
        self.sockets = list(sockets)
        self.number = number
        self.workers = workers
        self.reactor = reactor
        self.ports: list[Any] = []  # IListeningPort

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        for entry in self.sockets:
            # The endpoint adopts the socket, then closes our descriptor: the port holds its own duplicate.
            endpoint = AdoptedStreamServerEndpoint(self.reactor, entry["fd"], entry["family"])  # type: ignore[no-untyped-call]
            listening = endpoint.listen(self.site)  # type: ignore[no-untyped-call]  # fires at once
            listening.addCallback(self.ports.append)
        _log.info(
            "httpwasm worker {number} of {workers} (pid {pid}) serving {endpoints}",
            number=self.number,
            workers=self.workers,
            pid=os.getpid(),
            endpoints=", ".join(entry["description"] for entry in self.sockets),
            httpwasm_worker_ready=True,
            httpwasm_generation=self.generation,  # the main process's reload count when it started us
        )

    def stopService(self) -> defer.Deferred[Any] | None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        ports, self.ports = self.ports, []
        stopping = [port.stopListening() for port in ports]
        return defer.gatherResults([d for d in stopping if isinstance(d, defer.Deferred)], consumeErrors=True)


def worker_config(argv: Sequence[str]) -> HostConfig:
    """The configuration of the main process, made again from its command line (run from its directory).

    The same options give the same :class:`~twisted_httpwasm.service.config.HostConfig`
    (the guests, their settings, the limits, the workers' own ``argv`` and ``cwd``);
    raises ``usage.UsageError`` if they no longer parse (a configuration file went away, say).
    """
    from . import tap

    options = tap.Options()
    options.parseOptions(list(argv))
    return options.config()


def main() -> None:
    """Run one worker process, as the main process's :class:`WorkersService` describes it in the environment."""
    spec = json.loads(os.environ.pop(SPEC_VARIABLE))
    _die_with_parent(spec["parent"])
    # Processes this worker starts (CGI scripts, ...) get the main process's environment.
    if spec["pythonpath"] is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = spec["pythonpath"]
    for entry in reversed(spec["sys_path"]):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    stdout = sys.stdout
    observer: Any = _StdoutGuard(jsonFileLogObserver(stdout))  # an ILogObserver; mypy cannot see zope declarations
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=True)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    from twisted.python import usage

    from . import tap

    try:
        config = worker_config(spec["argv"])
    except usage.UsageError as error:
        _log.error("httpwasm worker {number}: {error}", number=spec["worker"], error=error)
        raise SystemExit(2) from None
    top = service.MultiService()  # type: ignore[no-untyped-call]
    try:
        site = tap.make_site(config, top)
    except SystemExit as error:
        _log.error("{reason}", reason=error.code)
        raise SystemExit(1) from None
    # SIGHUP from the main process: this worker reloads its guests and says how it went.
    reloading: Any = top.getServiceNamed(RELOAD_SERVICE)  # type: ignore[no-untyped-call]
    reloading.reloader.label = f"httpwasm worker {spec['worker']}"
    if config.reload.watch:
        # The main process watches the files and signals the workers: one reload each, not two.
        watching: Any = top.getServiceNamed(WATCH_SERVICE)  # type: ignore[no-untyped-call]
        watching.disownServiceParent()
    ports = _AdoptedPortsService(
        site, spec["listen"], spec["worker"], spec["workers"], reactor, spec.get("generation", 0)
    )
    ports.setServiceParent(top)  # type: ignore[no-untyped-call]
    _watch_stdin(reactor)
    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


if __name__ == "__main__":
    # Run the copy that ``tap`` imports too, not this ``__main__`` one: one module, one set of classes.
    from twisted_httpwasm.service.worker_main import main as worker_main

    worker_main()
