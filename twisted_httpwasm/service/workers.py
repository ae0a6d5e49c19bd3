"""Several processes serving the same listening sockets: ``twistd httpwasm --workers N``.

The main process binds every ``tcp:``/``tcp6:`` endpoint itself, serves them,
and starts ``N - 1`` worker processes (``python -m twisted_httpwasm.service.worker_main``)
that inherit the listening sockets and re-run the same command line, so that
each process loads its own guests and keeps its own instance pools.  The kernel
hands each new connection to whichever process accepts it first.

A worker's log events reach the main process's log through its stdout: the
worker writes them with Twisted's ``jsonFileLogObserver``, the main process
reads them back with ``eventFromJSON`` and logs them, marked with the worker's
number.  SIGHUP reloads the guests of the main process, then of every worker
(:meth:`WorkersService.reload_workers`).  No reload is lost for a worker that
is still loading when it comes (it would die of a SIGHUP before its handler is
set, and may have read the sources already): the main process counts reloads
(its *generation*), hands each worker the generation it starts at, and a worker
reports that generation when it is ready; one that started before the latest
reload is then signalled to reload once.
Workers end with the main process: it stops them when its service stops
(SIGTERM: each drains its requests in flight, as the main process does), and
if it dies without doing so, ``PR_SET_PDEATHSIG`` (Linux) and the end of the
worker's stdin pipe stop them too.  A worker that exits on its own after it was
ready is replaced.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError, ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel, eventFromJSON
from twisted.python.failure import Failure
from twisted.web.server import Site

from ..web.drain import DEFAULT_SHUTDOWN_TIMEOUT
from .config import HostConfig
from .twisted_internals import tcp_endpoint_address

__all__ = ["TCPListen", "WorkersService"]

_log = Logger(namespace="httpwasm")

#: The module a worker process runs.
WORKER_MODULE = "twisted_httpwasm.service.worker_main"

#: The environment variable that hands a worker its specification (JSON).
SPEC_VARIABLE = "HTTPWASM_WORKER_SPEC"

#: The first file descriptor of the inherited listening sockets in a worker.
FIRST_SOCKET_FD = 3

#: Seconds before a worker that exited on its own is replaced.
RESTART_DELAY = 1.0

#: Seconds a worker has to exit after SIGTERM, beyond the shutdown timeout its requests have, before SIGKILL.
STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class TCPListen:
    """A ``tcp:`` or ``tcp6:`` server endpoint, as the socket it binds."""

    description: str
    interface: str
    port: int
    backlog: int

    @classmethod
    def parse(cls, description: str) -> TCPListen | None:
        """The TCP endpoint ``description`` names, or None if it is another kind of endpoint.

        Raises what ``serverFromString`` raises for a description that does not parse.
        """
        from twisted.internet import endpoints, reactor

        endpoint = endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
        if not isinstance(endpoint, endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint):
            return None
        return cls(description, *tcp_endpoint_address(endpoint))

    @property
    def family(self) -> socket.AddressFamily:
        """IPv6 for an IPv6 interface (``tcp6:`` listens on ``::`` by default), else IPv4."""
        return socket.AF_INET6 if ":" in self.interface else socket.AF_INET

    def bind(self) -> socket.socket:
        """A non-blocking socket bound and listening as the endpoint would; :class:`CannotListenError` if not."""
        try:
            infos = socket.getaddrinfo(
                self.interface or None, self.port, self.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            family, kind, proto, _, address = infos[0]
            listening = socket.socket(family, kind, proto)
            try:
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listening.bind(address)
                listening.listen(self.backlog)
                listening.setblocking(False)
            except BaseException:
                listening.close()
                raise
        except OSError as error:
            raise CannotListenError(self.interface, self.port, error) from None  # type: ignore[no-untyped-call]
        return listening


class WorkersService(service.Service):
    """Serves ``site`` on ``listen`` in this process and in ``workers - 1`` worker processes.

    Each worker runs ``argv`` (the ``twistd httpwasm`` command line) from the
    directory ``cwd`` and serves the sockets this service bound.  The sockets
    are bound in :meth:`privilegedStartService` (before ``twistd`` drops
    privileges), the workers started in :meth:`startService`.  Stopping gives
    each worker ``shutdown_timeout`` seconds to drain its requests in flight,
    plus :data:`STOP_TIMEOUT` to exit, before it is killed.
    """

    def __init__(
        self,
        site: Site,
        listen: Sequence[TCPListen],
        workers: int,
        *,
        argv: Sequence[str],
        cwd: str,
        reactor: Any = None,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    ):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.site = site
        self.listen = tuple(listen)
        self.workers = workers
        self.argv = list(argv)
        self.cwd = cwd
        self.reactor = reactor
        #: Seconds a worker has to exit after SIGTERM before it gets SIGKILL.
        self.stop_timeout = shutdown_timeout + STOP_TIMEOUT
        self.sockets: list[socket.socket] = []
        self.ports: list[Any] = []  # IListeningPort
        #: The running worker processes, by worker number (2 to ``workers``).
        self.processes: dict[int, WorkerProtocol] = {}
        self._restarts: dict[int, Any] = {}  # IDelayedCall
        #: Reloads asked of the workers so far; a worker loads the sources of the generation it started at.
        self.generation = 0

    @classmethod
    def from_config(cls, site: Site, config: HostConfig, *, reactor: Any = None) -> WorkersService:
        """The service of ``config.workers``: its ``tcp:``/``tcp6:`` endpoints, its command line, its shutdown timeout.

        Each worker process re-runs ``config.workers.argv`` and so makes the same configuration
        (:func:`~twisted_httpwasm.service.worker_main.worker_config`).
        """
        listen = [endpoint for endpoint in map(TCPListen.parse, config.listen.endpoints) if endpoint is not None]
        return cls(
            site,
            listen,
            config.workers.count,
            argv=config.workers.argv,
            cwd=config.workers.cwd,
            reactor=reactor,
            shutdown_timeout=config.shutdown_timeout,
        )

    def _bind(self) -> None:
        if self.sockets:
            return
        try:
            for endpoint in self.listen:
                self.sockets.append(endpoint.bind())
        except BaseException:
            self._close_sockets()
            raise

    def _close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, []
        for listening in sockets:
            listening.close()

    def privilegedStartService(self) -> None:
        self._bind()
        service.Service.privilegedStartService(self)  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        self._bind()
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        for listening in self.sockets:
            self.ports.append(self.reactor.adoptStreamPort(listening.fileno(), listening.family, self.site))
        _log.info(
            "httpwasm worker 1 of {workers} (pid {pid}, the main process) serving {endpoints}",
            workers=self.workers,
            pid=os.getpid(),
            endpoints=", ".join(endpoint.description for endpoint in self.listen),
        )
        for number in range(2, self.workers + 1):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        self._restarts.pop(number, None)
        spec = {
            "argv": self.argv,
            "cwd": self.cwd,
            "sys_path": [entry for entry in sys.path if entry],
            "parent": os.getpid(),
            "worker": number,
            "workers": self.workers,
            "generation": self.generation,
            "listen": [
                {"fd": FIRST_SOCKET_FD + index, "family": int(listening.family), "description": endpoint.description}
                for index, (listening, endpoint) in enumerate(zip(self.sockets, self.listen, strict=True))
            ],
        }
        env = dict(os.environ)
        spec["pythonpath"] = env.get("PYTHONPATH")
        env[SPEC_VARIABLE] = json.dumps(spec)
        # The worker must import this package, wherever this process found it.
        package_root = str(Path(__file__).resolve().parents[2])  # twisted_httpwasm/service/workers.py
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        for index, listening in enumerate(self.sockets):
            child_fds[FIRST_SOCKET_FD + index] = listening.fileno()
        protocol = WorkerProtocol(self, number)
        self.processes[number] = protocol
        self.reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", WORKER_MODULE, f"--worker={number}"],
            env=env,
            path=self.cwd,
            childFDs=child_fds,
        )

    def reload_workers(self) -> None:
        """Ask every worker that is serving to reload its guests (SIGHUP); each logs how its reload went.

        A worker still starting is not signalled now (a SIGHUP before its handler is set would end it); it
        is when it reports ready, since the generation it loaded is older (:meth:`worker_ready`).
        """
        self.generation += 1
        ready = [protocol for protocol in self.processes.values() if protocol.ready and not protocol.stopping]
        for protocol in ready:
            protocol.generation = self.generation
            protocol.signal("HUP")
        if ready:
            _log.info(
                "httpwasm: asked {count} worker(s) to reload their guests (pids {pids})",
                count=len(ready),
                pids=", ".join(str(protocol.pid) for protocol in ready),
            )

    def worker_ready(self, protocol: WorkerProtocol, generation: int) -> None:
        """Worker ``protocol`` serves the guests of reload ``generation``: reload it once if that is not the latest."""
        protocol.generation = generation
        if generation < self.generation and not protocol.stopping and self.running:
            _log.info(
                "httpwasm: worker {number} (pid {pid}) was loading during a reload (generation {loaded} of {now});"
                " asking it to reload its guests",
                number=protocol.number,
                pid=protocol.pid,
                loaded=generation,
                now=self.generation,
            )
            protocol.generation = self.generation
            protocol.signal("HUP")

    def worker_ended(self, protocol: WorkerProtocol, reason: Failure) -> None:
        """A worker process ended: replace it if it served and was not asked to stop."""
        number = protocol.number
        if self.processes.get(number) is protocol:
            del self.processes[number]
        status = describe_exit(reason)
        if protocol.stopping or not self.running:
            _log.info(
                "httpwasm worker {number} (pid {pid}) stopped: {status}", number=number, pid=protocol.pid, status=status
            )
        elif protocol.ready:
            _log.warn(
                "httpwasm worker {number} (pid {pid}) {status}; starting another in {delay} s",
                number=number,
                pid=protocol.pid,
                status=status,
                delay=RESTART_DELAY,
            )
            self._restarts[number] = self.reactor.callLater(RESTART_DELAY, self._spawn, number)
        else:
            _log.error(
                "httpwasm worker {number} (pid {pid}) {status} before it was ready; not restarting it",
                number=number,
                pid=protocol.pid,
                status=status,
            )

    def stopService(self) -> defer.Deferred[None]:
        """Stop listening here, stop every worker (SIGTERM, then SIGKILL after a while); fires when all are gone."""
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        restarts, self._restarts = self._restarts, {}
        for call in restarts.values():
            if call.active():
                call.cancel()
        waiting: list[defer.Deferred[Any]] = []
        ports, self.ports = self.ports, []
        for port in ports:
            stopped = port.stopListening()
            if isinstance(stopped, defer.Deferred):
                waiting.append(stopped)
        for protocol in list(self.processes.values()):
            waiting.append(protocol.stop(self.stop_timeout))
        self._close_sockets()
        done: defer.Deferred[Any] = defer.gatherResults(waiting, consumeErrors=True)
        return done.addCallback(lambda _: None)


class WorkerProtocol(ProcessProtocol):
    """The main process's end of one worker: relays its log, notices its end, stops it."""

    def __init__(self, workers: WorkersService, number: int):
        self.workers = workers
        self.number = number
        self.pid: int | None = None
        self.ready = False
        #: The reload generation whose sources the worker loaded (or was asked to load).
        self.generation = workers.generation
        self.stopping = False
        self.ended = False
        self._buffers = {1: b"", 2: b""}
        self._waiting: list[defer.Deferred[None]] = []
        self._kill: Any = None  # IDelayedCall

    def connectionMade(self) -> None:
        self.pid = getattr(self.transport, "pid", None)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        *lines, self._buffers[childFD] = (self._buffers.get(childFD, b"") + data).split(b"\n")
        for line in lines:
            self._relay(childFD, line)

    def _relay(self, childFD: int, line: bytes) -> None:
        """One line of the worker's output into this process's log.

        On stdout, an event the worker's ``jsonFileLogObserver`` wrote goes on as
        that event (its level, format, fields, failure), its system prefixed
        with the worker; any other line (stderr, a stray print) as text.
        """
        text = line.decode("utf-8", "replace").rstrip()
        if not text:
            return
        system = f"worker {self.number}"
        if childFD == 1 and text.startswith(_RECORD_SEPARATOR):
            event = _event_from_json(text[len(_RECORD_SEPARATOR) :])
            if event is not None:
                ready_at: int | None = None
                if event.get("httpwasm_worker_ready"):
                    self.ready = True
                    generation = event.get("httpwasm_generation")
                    ready_at = generation if isinstance(generation, int) else self.generation
                level = event["log_level"]
                own = event.get("log_system") or f"{event.get('log_namespace', '-')}#{level.name}"
                event["log_system"] = f"{system}|{own}"
                publish: Any = _log.observer  # an ILogObserver; mypy cannot see zope declarations
                publish(event)
                if ready_at is not None:
                    self.workers.worker_ready(self, ready_at)
                return
        level = LogLevel.warn if childFD == 2 else LogLevel.info
        _log.emit(level, "{text}", text=text, log_system=system)

    def processEnded(self, reason: Failure) -> None:
        for childFD, rest in self._buffers.items():
            if rest:
                self._relay(childFD, rest)
        self._buffers = {1: b"", 2: b""}
        self.ended = True
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self.workers.worker_ended(self, reason)
        waiting, self._waiting = self._waiting, []
        for stopped in waiting:
            stopped.callback(None)

    def stop(self, timeout: float) -> defer.Deferred[None]:
        """SIGTERM and the end of stdin now, SIGKILL after ``timeout``; fires when the process ended."""
        if self.ended:
            return defer.succeed(None)
        stopped: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(stopped)
        if not self.stopping:
            self.stopping = True
            transport: Any = self.transport
            transport.closeStdin()
            self._signal("TERM")
            self._kill = self.workers.reactor.callLater(timeout, self._signal, "KILL")
        return stopped

    def signal(self, name: str) -> None:
        """Send the signal ``name`` (``"HUP"``, ...) to the worker, if it still runs."""
        self._signal(name)

    def _signal(self, name: str) -> None:
        transport: Any = self.transport
        try:
            transport.signalProcess(name)
        except ProcessExitedAlready:
            pass


#: What ``jsonFileLogObserver`` writes before each event.
_RECORD_SEPARATOR = "\x1e"


def _event_from_json(text: str) -> dict[str, Any] | None:
    """The event ``text`` (JSON from ``jsonFileLogObserver``) holds, or None if it is not one."""
    try:
        event = eventFromJSON(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("log_level"), type(LogLevel.info)):
        return None
    return event


def describe_exit(reason: Failure) -> str:
    """``exited with status 3``, ``was killed by signal 9``, ...: how a process ended."""
    if reason.check(ProcessDone):
        return "exited with status 0"
    value: Any = reason.value
    if getattr(value, "signal", None) is not None:
        return f"was killed by signal {value.signal}"
    if getattr(value, "exitCode", None) is not None:
        return f"exited with status {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"
