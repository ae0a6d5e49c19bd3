"""``--workers N``: several processes serving the same listening sockets.

Unit tests drive :class:`WorkersService` with a fake reactor that records the
processes it would spawn; the end-to-end tests run a real ``twistd`` whose
workers answer with their PID.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.internet.error import CannotListenError, ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, eventAsText, formatEvent, jsonFileLogObserver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_httpwasm.service import workers
from twisted_httpwasm.service.workers import (
    SPEC_VARIABLE,
    STOP_TIMEOUT,
    TCPListen,
    WorkerProtocol,
    WorkersService,
    describe_exit,
)
from twisted_httpwasm.web.drain import DEFAULT_SHUTDOWN_TIMEOUT

from .support import poll
from .test_twistd import DEADLINE, HEADER_GUEST, Twistd, TwistdTestCase


class Pid(Resource):
    """The downstream of the end-to-end tests: answers with the PID of the process that served it."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return str(os.getpid()).encode()


# -- unit tests: a fake reactor ---------------------------------------------------------


class FakeProcess:
    """The transport of a process the fake reactor pretends to have spawned."""

    def __init__(self, pid: int, protocol: Any, args: list[str], env: dict[str, str], path: str, child_fds: Any):
        self.pid = pid
        self.protocol = protocol
        self.args = args
        self.env = env
        self.path = path
        self.child_fds = child_fds
        self.signals: list[str] = []
        self.stdin_closed = False
        self.ended = False

    @property
    def spec(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.env[SPEC_VARIABLE])
        return result

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)

    def end(self, reason: Failure) -> None:
        self.ended = True
        self.protocol.processEnded(reason)


class ProcessReactor(MemoryReactorClock):
    """A memory reactor with a clock that records ``spawnProcess`` calls."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []

    def spawnProcess(
        self,
        processProtocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str],
        path: str,
        childFDs: Any = None,
        **ignored: Any,
    ) -> FakeProcess:
        process = FakeProcess(1000 + len(self.processes), processProtocol, args, env, path, childFDs)
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process


def killed(signal_number: int = signal.SIGKILL) -> Failure:
    return Failure(ProcessTerminated(signal=signal_number))


def exited(status: int = 0) -> Failure:
    return Failure(ProcessDone(0) if status == 0 else ProcessTerminated(exitCode=status))


class WorkersServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.events: list[dict[str, Any]] = []
        self.patch(workers, "_log", Logger(namespace="httpwasm", observer=self.events.append))
        self.site = Site(Resource())

    def service(self, workers: int = 3, *descriptions: str) -> WorkersService:
        listen = [TCPListen.parse(d) for d in descriptions or ("tcp:0:interface=127.0.0.1",)]
        service = WorkersService(
            self.site,
            [endpoint for endpoint in listen if endpoint is not None],
            workers,
            argv=["--guest", "g.wat", "--workers", str(workers)],
            cwd="/srv/site",
            reactor=self.reactor,
        )
        self.addCleanup(service._close_sockets)
        return service

    def start(self, service: WorkersService) -> None:
        service.privilegedStartService()
        service.startService()

    def texts(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    def test_start_binds_serves_and_spawns_workers(self) -> None:
        """Start binds each endpoint, serves it here, and spawns N-1 workers that inherit the sockets as fd 3, 4..."""
        service = self.service(3, "tcp:0:interface=127.0.0.1", "tcp:0:interface=127.0.0.1:backlog=5")
        self.start(service)
        first, second = service.sockets
        self.assertNotEqual(first.getsockname()[1], 0)
        self.assertEqual(first.family, socket.AF_INET)
        self.assertEqual(
            self.reactor.adoptedPorts,
            [(first.fileno(), socket.AF_INET, self.site), (second.fileno(), socket.AF_INET, self.site)],
        )
        self.assertEqual(len(self.reactor.processes), 2)
        for number, process in enumerate(self.reactor.processes, start=2):
            self.assertEqual(
                process.args, [sys.executable, "-m", "twisted_httpwasm.service.worker_main", f"--worker={number}"]
            )
            self.assertEqual(process.path, "/srv/site")
            self.assertEqual(process.child_fds, {0: "w", 1: "r", 2: "r", 3: first.fileno(), 4: second.fileno()})
            spec = process.spec
            self.assertEqual(spec["argv"], ["--guest", "g.wat", "--workers", "3"])
            self.assertEqual((spec["cwd"], spec["worker"], spec["workers"]), ("/srv/site", number, 3))
            self.assertEqual(spec["parent"], os.getpid())
            self.assertEqual(
                spec["listen"],
                [
                    {"fd": 3, "family": socket.AF_INET, "description": "tcp:0:interface=127.0.0.1"},
                    {"fd": 4, "family": socket.AF_INET, "description": "tcp:0:interface=127.0.0.1:backlog=5"},
                ],
            )
            self.assertIn(str(Path(workers.__file__).resolve().parents[2]), process.env["PYTHONPATH"])
            self.assertEqual(spec["pythonpath"], os.environ.get("PYTHONPATH"))
        self.assertEqual(
            self.texts(),
            [
                f"httpwasm worker 1 of 3 (pid {os.getpid()}, the main process) serving"
                " tcp:0:interface=127.0.0.1, tcp:0:interface=127.0.0.1:backlog=5"
            ],
        )

    def test_sockets_are_listening(self) -> None:
        """The bound socket accepts connections (the kernel queues them for whichever process accepts)."""
        service = self.service(2)
        service.privilegedStartService()
        (listening,) = service.sockets
        with socket.create_connection(listening.getsockname(), timeout=5):
            pass

    def test_bind_failure_closes_what_was_bound(self) -> None:
        """An endpoint that cannot be bound is a CannotListenError, and the sockets bound before it are closed."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            service = self.service(2, "tcp:0:interface=127.0.0.1", f"tcp:{port}:interface=127.0.0.1")
            error = self.assertRaises(CannotListenError, service.privilegedStartService)
            self.assertEqual(error.port, port)
        self.assertEqual(service.sockets, [])

    def test_worker_log_is_relayed(self) -> None:
        """Events a worker's jsonFileLogObserver writes on its stdout become the same events here (level, text),
        marked with the worker's number; other output is relayed as text."""
        self.start(self.service(2))
        (process,) = self.reactor.processes
        protocol: WorkerProtocol = process.protocol
        out = io.StringIO()
        Logger(namespace="httpwasm.guest.g", observer=jsonFileLogObserver(out)).warn("careful\nsecond line")
        line = out.getvalue().encode()
        protocol.childDataReceived(1, line[:10])
        protocol.childDataReceived(1, line[10:] + b"not json\n")
        protocol.childDataReceived(2, b"Traceback: on stderr\npartial")
        relayed = self.events[1:]
        self.assertEqual(
            [(e["log_level"], e["log_system"], formatEvent(e)) for e in relayed],
            [
                (LogLevel.warn, "worker 2|httpwasm.guest.g#warn", "careful\nsecond line"),
                (LogLevel.info, "worker 2", "not json"),
                (LogLevel.warn, "worker 2", "Traceback: on stderr"),
            ],
        )
        self.assertFalse(protocol.ready)
        out = io.StringIO()
        Logger(namespace="httpwasm", observer=jsonFileLogObserver(out)).info("serving", httpwasm_worker_ready=True)
        protocol.childDataReceived(1, out.getvalue().encode())
        self.assertTrue(protocol.ready)
        process.end(exited(0))
        self.assertIn("partial", [formatEvent(e) for e in self.events])

    def test_worker_log_events_round_trip(self) -> None:
        """What a worker logs arrives as events: format and fields, level, readiness, and a failure's traceback."""
        out = io.StringIO()
        worker_log = Logger(namespace="httpwasm.test", observer=jsonFileLogObserver(out))
        worker_log.warn("hello {who}", who="you")
        worker_log.info("serving", httpwasm_worker_ready=True)
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            worker_log.failure("boom")

        self.start(self.service(2))
        protocol: WorkerProtocol = self.reactor.processes[0].protocol
        protocol.childDataReceived(1, out.getvalue().encode())
        relayed = self.events[1:]
        self.assertEqual([e["log_level"] for e in relayed], [LogLevel.warn, LogLevel.info, LogLevel.critical])
        self.assertEqual([formatEvent(e) for e in relayed], ["hello you", "serving", "boom"])
        self.assertEqual(relayed[0]["log_system"], "worker 2|httpwasm.test#warn")
        self.assertIn("ZeroDivisionError", eventAsText(relayed[2]))
        self.assertTrue(protocol.ready)

    def report_ready(self, protocol: WorkerProtocol, generation: int | None) -> None:
        out = io.StringIO()
        fields: dict[str, Any] = {"httpwasm_worker_ready": True}
        if generation is not None:
            fields["httpwasm_generation"] = generation
        Logger(namespace="httpwasm", observer=jsonFileLogObserver(out)).info("serving", **fields)
        protocol.childDataReceived(1, out.getvalue().encode())

    def test_reload_generation_is_not_lost_for_a_loading_worker(self) -> None:
        """Each reload moves the generation on; a worker starts with the current one in its spec; one that was
        loading (not signalled: a SIGHUP would end it) and reports an older generation is signalled once."""
        service = self.service(3)
        self.start(service)
        first, second = self.reactor.processes
        self.assertEqual([first.spec["generation"], second.spec["generation"]], [0, 0])
        self.report_ready(first.protocol, 0)
        self.assertEqual((first.signals, second.signals), ([], []))

        service.reload_workers()  # the second is still loading
        self.assertEqual((service.generation, first.signals, second.signals), (1, ["HUP"], []))
        self.report_ready(second.protocol, 0)
        self.assertEqual(second.signals, ["HUP"])
        self.assertIn("was loading during a reload (generation 0 of 1)", self.texts()[-1])

        service.reload_workers()
        self.assertEqual((first.signals, second.signals), (["HUP", "HUP"], ["HUP", "HUP"]))
        # A replacement starts at the current generation: ready, it is not signalled again.
        first.protocol.ready = True
        first.end(killed())
        self.reactor.advance(workers.RESTART_DELAY)
        third = self.reactor.processes[2]
        self.assertEqual(third.spec["generation"], 2)
        self.report_ready(third.protocol, 2)
        self.assertEqual(third.signals, [])

    def test_ready_worker_that_dies_is_replaced(self) -> None:
        """A worker that was serving and dies is replaced after a short delay, under the same number."""
        service = self.service(2)
        self.start(service)
        (process,) = self.reactor.processes
        process.protocol.ready = True
        process.end(killed())
        self.assertEqual(service.processes, {})
        self.assertIn("httpwasm worker 2 (pid 1000) was killed by signal 9; starting another in 1.0 s", self.texts())
        self.assertEqual(len(self.reactor.processes), 1)
        self.reactor.advance(workers.RESTART_DELAY)
        self.assertEqual(len(self.reactor.processes), 2)
        self.assertEqual(self.reactor.processes[1].spec["worker"], 2)
        self.assertIs(service.processes[2], self.reactor.processes[1].protocol)

    def test_worker_that_fails_to_start_is_not_replaced(self) -> None:
        """A worker that exits before it was ready would fail again: it is reported, not restarted."""
        self.start(self.service(2))
        (process,) = self.reactor.processes
        process.end(exited(1))
        self.assertIn(
            "httpwasm worker 2 (pid 1000) exited with status 1 before it was ready; not restarting it", self.texts()
        )
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 1)

    def test_stop_terminates_workers_then_kills_them(self) -> None:
        """Stopping sends SIGTERM, closes stdin; a worker alive after shutdown timeout + STOP_TIMEOUT gets SIGKILL."""
        service = self.service(3)
        self.start(service)
        first, second = self.reactor.processes
        stopped = service.stopService()
        self.assertNoResult(stopped)
        for process in (first, second):
            self.assertEqual(process.signals, ["TERM"])
            self.assertTrue(process.stdin_closed)
        self.assertEqual(service.sockets, [])
        first.end(exited(0))
        self.assertNoResult(stopped)
        self.assertEqual(service.stop_timeout, DEFAULT_SHUTDOWN_TIMEOUT + STOP_TIMEOUT)
        self.reactor.advance(service.stop_timeout - 0.1)
        self.assertEqual(second.signals, ["TERM"])  # the shutdown timeout to drain, and STOP_TIMEOUT to exit
        self.reactor.advance(0.1)
        self.assertEqual(first.signals, ["TERM"])
        self.assertEqual(second.signals, ["TERM", "KILL"])
        second.end(killed())
        self.successResultOf(stopped)
        self.assertIn("httpwasm worker 2 (pid 1000) stopped: exited with status 0", self.texts())
        self.assertIn("httpwasm worker 3 (pid 1001) stopped: was killed by signal 9", self.texts())
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_stop_cancels_a_pending_replacement(self) -> None:
        """A worker waiting to be replaced when the service stops is not started."""
        service = self.service(2)
        self.start(service)
        (process,) = self.reactor.processes
        process.protocol.ready = True
        process.end(killed())
        self.successResultOf(service.stopService())
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.processes), 1)

    def test_describe_exit(self) -> None:
        """Exit statuses and signals are described in words."""
        self.assertEqual(describe_exit(exited(0)), "exited with status 0")
        self.assertEqual(describe_exit(exited(3)), "exited with status 3")
        self.assertEqual(describe_exit(killed(15)), "was killed by signal 15")

    def test_at_least_one_worker(self) -> None:
        """Zero workers is a programming error."""
        self.assertRaises(ValueError, self.service, 0)


# -- end to end: a real twistd ----------------------------------------------------------


def alive(pid: int) -> bool:
    """True while ``pid`` is a live process (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


class WorkersEndToEndTests(TwistdTestCase):
    READY = re.compile(r"httpwasm worker (\d+) of (\d+) \(pid (\d+)\) serving")

    def worker_pids(self, server: Twistd) -> dict[int, list[int]]:
        """The PIDs each worker number was served by so far, from the ready lines in the log."""
        pids: dict[int, list[int]] = {}
        for number, _, pid in self.READY.findall(server.output()):
            pids.setdefault(int(number), []).append(int(pid))
        return pids

    @inlineCallbacks
    def wait_for_worker(
        self, server: Twistd, number: int, exclude: frozenset[int] = frozenset()
    ) -> Generator[Any, Any, int]:
        """The PID of worker ``number`` once it reported ready, not one of ``exclude``."""

        def ready() -> bool:
            return any(pid not in exclude for pid in self.worker_pids(server).get(number, []))

        if not (yield poll(lambda: server.exited() or ready(), DEADLINE)) or server.exited():
            self.fail(f"worker {number} did not start:\n{server.output()}")
        return next(pid for pid in reversed(self.worker_pids(server)[number]) if pid not in exclude)

    @inlineCallbacks
    def pids_serving(self, url: str, expected: int) -> Generator[Any, Any, set[int]]:
        """Send batches of concurrent requests on fresh connections until ``expected`` PIDs answered."""
        seen: set[int] = set()

        @inlineCallbacks
        def batch() -> Generator[Any, Any, bool]:
            responses = yield gatherResults([self.fetch("GET", url + "/pid") for _ in range(8)])
            for status, headers, body in responses:
                self.assertEqual(status, 200)
                self.assertEqual(headers.getRawHeaders("x-guest"), ["seen"])
                seen.add(int(body))
            return len(seen) >= expected

        if not (yield poll(batch, DEADLINE)):
            self.fail(f"only {sorted(seen)} answered, expected {expected} processes")
        return seen

    @inlineCallbacks
    def start_workers(self, workers: int) -> Generator[Any, Any, tuple[str, Twistd]]:
        url = yield self.start_server(
            "--workers", str(workers), "--guest", self.guest_file(HEADER_GUEST), "--class", f"{__name__}.Pid"
        )
        return url, self.server

    @inlineCallbacks
    def test_workers_share_the_port_and_stop_with_the_main_process(self) -> Generator[Any, Any, None]:
        """Two processes answer through the guest; a killed worker is replaced; SIGTERM leaves no worker behind."""
        url, server = yield self.start_workers(2)
        worker = yield self.wait_for_worker(server, 2)
        self.assertIn(f"httpwasm worker 1 of 2 (pid {server.process.pid}, the main process)", server.output())
        seen = yield self.pids_serving(url, 2)
        self.assertEqual(seen, {server.process.pid, worker})

        os.kill(worker, signal.SIGKILL)
        replacement = yield self.wait_for_worker(server, 2, exclude=frozenset({worker}))
        self.assertIn(f"httpwasm worker 2 (pid {worker}) was killed by signal 9; starting another", server.output())
        seen = yield self.pids_serving(url, 2)
        self.assertEqual(seen, {server.process.pid, replacement})

        server.process.terminate()
        if not (yield poll(server.exited, DEADLINE)):
            self.fail(f"twistd did not stop:\n{server.output()}")
        # A SIGTERM shutdown drains and ends with status 0 (twistd used to re-raise the signal: -15).
        self.assertEqual(server.process.returncode, 0, server.output())
        self.assertIn("Server Shut Down.", server.output())
        gone = yield poll(lambda: not alive(replacement), 10)
        self.assertTrue(gone, f"worker {replacement} outlived the main process")
        self.assertIn(f"httpwasm worker 2 (pid {replacement}) stopped: exited with status 0", server.output())

    @inlineCallbacks
    def test_workers_die_with_a_killed_main_process(self) -> Generator[Any, Any, None]:
        """A main process killed without a chance to stop its workers still takes them down."""
        _, server = yield self.start_workers(3)
        pids = []
        for number in (2, 3):
            pids.append((yield self.wait_for_worker(server, number)))
        server.process.kill()
        server.process.wait()
        gone = yield poll(lambda: not any(alive(pid) for pid in pids), 10)
        self.assertTrue(gone, f"workers {[pid for pid in pids if alive(pid)]} outlived the main process")

    @inlineCallbacks
    def test_workers_refuse_other_endpoints(self) -> Generator[Any, Any, None]:
        """--workers with a unix: endpoint is refused before anything starts."""
        status, output = yield self.exit_status(
            "--workers", "2", "--guest", self.guest_file(HEADER_GUEST), "--listen", f"unix:{self.mktemp()}"
        )
        self.assertNotEqual(status, 0, output)
        self.assertIn("--workers 2 shares tcp: and tcp6: endpoints between processes", output)
