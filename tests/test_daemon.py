"""``twistd`` the way operators run it: without ``-n`` (daemonized), with a pidfile and a logfile.

``twistd`` loads the guests, then forks twice to daemonize: whatever runs in
threads at load time (the epoch clock that enforces time limits, guest worker
threads) is gone in the daemon.  These tests run real daemons on loopback
ports and stop them through their pidfile, the way an init script does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks

from .launch import REPO_ROOT, child_env, start_twistd
from .support import NOOP_RESPONSE, ServerTestCase, TempFilesMixin, poll
from .test_twistd import DEADLINE, accepts_connections, free_port
from .test_workers import alive

#: Answers ``x-guest: seen`` on every response; loops forever on ``/loop...`` (first URI byte after / is 'l').
LOOPING_GUEST = (
    """
  (data (i32.const 0) "x-guest")
  (data (i32.const 16) "seen")
  (func (export "handle_request") (result i64)
    (drop (call $get_uri (i32.const 100) (i32.const 100)))
    (if (i32.eq (i32.load8_u (i32.const 101)) (i32.const 108))
      (then (loop $forever (br $forever))))
    (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 4))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: Loops forever in its ``_start``: only a time limit at load ends it.
LOOPING_START_GUEST = (
    """
  (func (export "_start") (loop $forever (br $forever)))
  (func (export "handle_request") (result i64) (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: A short time limit keeps the looping requests short.
GUEST_TIMEOUT = "0.5"

_WORKER_READY = re.compile(r"httpwasm worker (\d+) of \d+ \(pid (\d+)[,)]")


def pid_in(pidfile: str) -> int | None:
    """The PID a pidfile names, or None if there is none (yet, or any more)."""
    try:
        return int(Path(pidfile).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


class Daemon:
    """A ``twistd --pidfile P --logfile L ARGS`` launch (no ``-n``) in a temporary directory."""

    def __init__(self, directory: str, args: list[str]):
        self.pidfile = os.path.join(directory, "twistd.pid")
        self.logfile = os.path.join(directory, "twistd.log")
        self.output_path = os.path.join(directory, "launcher.out")
        self.launcher = start_twistd(
            [f"--pidfile={self.pidfile}", f"--logfile={self.logfile}", *args], self.output_path
        )

    @property
    def pid(self) -> int | None:
        return pid_in(self.pidfile)

    def log(self) -> str:
        try:
            return Path(self.logfile).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        """What the launcher printed, and the daemon's log."""
        return f"launcher:\n{Path(self.output_path).read_text(errors='replace')}\nlog:\n{self.log()}"

    def worker_pids(self) -> set[int]:
        return {int(pid) for _, pid in _WORKER_READY.findall(self.log())}

    def kill_leftovers(self) -> None:
        """SIGKILL the daemon and its workers if a test left them running."""
        if self.launcher.poll() is None:
            self.launcher.kill()
            self.launcher.wait()
        pids = self.worker_pids()
        if self.pid is not None:
            pids.add(self.pid)
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


class DaemonTestCase(TempFilesMixin, ServerTestCase):
    """Starts daemons and makes sure none outlives its test."""

    def daemon(self, *args: str) -> Daemon:
        daemon = Daemon(os.path.dirname(self.mktemp()), list(args))
        self.addCleanup(daemon.kill_leftovers)
        return daemon

    @inlineCallbacks
    def launched(self, daemon: Daemon) -> Generator[Any, Any, int]:
        """Wait for the launcher to return (it does once the daemon started); its exit status."""
        if not (yield poll(lambda: daemon.launcher.poll() is not None, DEADLINE)):
            self.fail(f"the twistd launcher still runs after {DEADLINE} s:\n{daemon.output()}")
        status: int = daemon.launcher.returncode
        return status

    @inlineCallbacks
    def start_daemon(self, *args: str) -> Generator[Any, Any, tuple[str, Daemon]]:
        """``twistd ARGS --listen tcp:PORT`` daemonized; its base URL and the daemon once it accepts connections."""
        port = free_port()
        daemon = self.daemon(*args, "--listen", f"tcp:{port}:interface=127.0.0.1")
        status = yield self.launched(daemon)
        self.assertEqual(status, 0, daemon.output())
        self.assertIsNotNone(daemon.pid, daemon.output())
        self.assertNotEqual(daemon.pid, daemon.launcher.pid, "twistd did not daemonize")
        if not (yield poll(lambda: accepts_connections(port), DEADLINE)):
            self.fail(f"the daemon does not accept connections on {port}:\n{daemon.output()}")
        return f"http://127.0.0.1:{port}", daemon

    @inlineCallbacks
    def start_tac(self, source: str, port: int) -> Generator[Any, Any, Daemon]:
        """``twistd -y`` (daemonized) of a ``.tac`` file holding ``source``; the daemon once it accepts on ``port``."""
        tac = self.mktemp() + ".tac"
        Path(tac).write_text(textwrap.dedent(source))
        daemon = self.daemon("-y", tac)
        status = yield self.launched(daemon)
        self.assertEqual(status, 0, daemon.output())
        if not (yield poll(lambda: accepts_connections(port), DEADLINE)):
            self.fail(f"the daemon does not accept connections on {port}:\n{daemon.output()}")
        return daemon

    @inlineCallbacks
    def stop_through_pidfile(self, daemon: Daemon) -> Generator[Any, Any, None]:
        """SIGTERM to the PID in the pidfile, as an init script does; the daemon (and its workers) end."""
        pid = daemon.pid
        assert pid is not None
        workers = daemon.worker_pids() - {pid}
        os.kill(pid, signal.SIGTERM)
        if not (yield poll(lambda: not alive(pid), DEADLINE)):
            self.fail(f"the daemon (pid {pid}) outlived SIGTERM:\n{daemon.output()}")
        self.assertIsNone(daemon.pid, "the pidfile outlived the daemon")
        self.assertIn("Server Shut Down.", daemon.log())
        gone = yield poll(lambda: not any(alive(worker) for worker in workers), 10)
        self.assertTrue(gone, f"workers {sorted(workers)} outlived the daemon:\n{daemon.output()}")

    @inlineCallbacks
    def check_serves_and_enforces_time_limits(self, url: str, daemon: Daemon) -> Generator[Any, Any, None]:
        """A plain request gets the guest's header; looping requests get a 5xx within the guest's time limit."""
        status, headers, _ = yield self.fetch("GET", url + "/hello", timeout=DEADLINE)
        self.assertEqual(status, 200, daemon.output())
        self.assertEqual(headers.getRawHeaders("x-guest"), ["seen"])
        looping = yield gatherResults([self.fetch("GET", url + "/loop", timeout=DEADLINE) for _ in range(3)])
        self.assertEqual([status for status, _, _ in looping], [500] * 3, daemon.output())
        self.assertIn(f"guest exceeded its time limit of {float(GUEST_TIMEOUT)} s", daemon.log())


class DaemonTests(DaemonTestCase):
    """``twistd httpwasm`` daemonized: serves, enforces time limits, stops through its pidfile."""

    @inlineCallbacks
    def check_daemon(self, *options: str) -> Generator[Any, Any, None]:
        url, daemon = yield self.start_daemon(
            "httpwasm",
            "--guest",
            self.guest_file(LOOPING_GUEST),
            "--guest-timeout",
            GUEST_TIMEOUT,
            "--class",
            "tests.test_twistd.Hello",
            *options,
        )
        yield self.check_serves_and_enforces_time_limits(url, daemon)
        yield self.stop_through_pidfile(daemon)

    def test_thread_mode(self) -> Any:
        """Thread mode, daemonized: requests are answered, a looping guest gets a 500, SIGTERM via the pidfile stops it.

        The guest worker threads and the epoch clock start in the daemon, not before its fork.
        """
        return self.check_daemon("--execution", "thread")

    def test_inline_mode(self) -> Any:
        """Inline mode, daemonized: a looping guest is stopped by its time limit (it would pin the reactor)."""
        return self.check_daemon("--execution", "inline")

    @inlineCallbacks
    def test_workers(self) -> Generator[Any, Any, None]:
        """``--workers 2`` daemonized: both processes answer and enforce time limits; the pidfile stops both."""
        url, daemon = yield self.start_daemon(
            "httpwasm",
            "--guest",
            self.guest_file(LOOPING_GUEST),
            "--guest-timeout",
            GUEST_TIMEOUT,
            "--class",
            "tests.test_workers.Pid",
            "--workers",
            "2",
        )
        if not (yield poll(lambda: len(daemon.worker_pids()) >= 2, DEADLINE)):
            self.fail(f"worker 2 did not start:\n{daemon.output()}")
        seen: set[int] = set()

        @inlineCallbacks
        def batch() -> Generator[Any, Any, bool]:
            responses = yield gatherResults([self.fetch("GET", url + "/pid", timeout=DEADLINE) for _ in range(8)])
            for status, _, body in responses:
                self.assertEqual(status, 200, daemon.output())
                seen.add(int(body))
            return len(seen) >= 2

        if not (yield poll(batch, 20)):
            self.fail(f"only {sorted(seen)} answered:\n{daemon.output()}")
        self.assertEqual(seen, daemon.worker_pids())
        yield self.check_serves_and_enforces_time_limits(url, daemon)
        yield self.stop_through_pidfile(daemon)

    @inlineCallbacks
    def test_tac_file(self) -> Generator[Any, Any, None]:
        """A ``.tac`` file that builds a GuestResource, run by ``twistd -y`` daemonized, serves and enforces limits."""
        port = free_port()
        daemon = yield self.start_tac(
            f"""\
            from twisted.application import service, strports
            from twisted.web.server import Site

            from tests.test_twistd import Hello
            from twisted_httpwasm import Guest, GuestResource

            application = service.Application("httpwasm-tac")
            guest = Guest.load({self.guest_file(LOOPING_GUEST)!r}, timeout={GUEST_TIMEOUT})
            site = Site(GuestResource(guest, Hello()))
            strports.service("tcp:{port}:interface=127.0.0.1", site).setServiceParent(application)
            """,
            port,
        )
        yield self.check_serves_and_enforces_time_limits(f"http://127.0.0.1:{port}", daemon)
        yield self.stop_through_pidfile(daemon)

    @inlineCallbacks
    def test_start_function_has_a_time_limit_before_the_fork(self) -> Generator[Any, Any, None]:
        """A guest whose ``_start`` loops is refused at load, before daemonizing: twistd exits non-zero."""
        daemon = self.daemon(
            "httpwasm",
            "--guest",
            self.guest_file(LOOPING_START_GUEST),
            "--guest-timeout",
            GUEST_TIMEOUT,
            "--class",
            "tests.test_twistd.Hello",
        )
        status = yield self.launched(daemon)
        self.assertNotEqual(status, 0, daemon.output())
        self.assertIn("_start failed: wasm trap: interrupt", daemon.output())
        self.assertIsNone(daemon.pid, "a daemon was started")


#: Loads a guest (looping in handle_request), counts threads, forks, and calls the guest in the child.
FORK_SCRIPT = """
import os, signal, threading
from tests.support import module, request_state
from tests.test_daemon import LOOPING_GUEST
from twisted_httpwasm import Guest, GuestTrap

guest = Guest(module(LOOPING_GUEST), timeout=0.2, cache=False)
print("threads after load:", threading.active_count(), flush=True)
child = os.fork()
if child == 0:
    signal.alarm(20)  # a hung child must not outlive the test
    instance = guest.pool.acquire()
    try:
        instance.handle_request(request_state(uri=b"/loop"))
    except GuestTrap as trap:
        print("child:", trap.reason, flush=True)
    os._exit(0)
os.waitpid(child, 0)
"""


#: Builds what twistd httpwasm builds before it daemonizes, and counts the OS threads then.
MAKE_SERVICE_SCRIPT = """
import os, sys
from twisted_httpwasm.service import tap

options = tap.Options()
options.parseOptions(sys.argv[1:])
tap.makeService(options)
# A thread that was joined may still be leaving the kernel for a moment (Python's join returns
# just before the OS thread ends): give it a second; a thread that still runs stays counted.
import time
deadline = time.monotonic() + 1
while len(os.listdir("/proc/self/task")) > 1 and time.monotonic() < deadline:
    time.sleep(0.01)
print("OS threads after makeService:", len(os.listdir("/proc/self/task")), flush=True)
"""


class ForkTests(TempFilesMixin, ServerTestCase):
    """Threads across a fork, in a fresh interpreter (the test process has threads of its own)."""

    @inlineCallbacks
    def run_script(self, script: str, *args: str) -> Generator[Any, Any, str]:
        env = child_env(TWISTED_HTTPWASM_CACHE=self.mktemp())  # an empty compile cache: the guests are compiled here
        output_path = self.mktemp()
        with open(output_path, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", script, *args], cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT
            )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        ended = yield poll(lambda: process.poll() is not None, DEADLINE)
        text = Path(output_path).read_text()
        self.assertTrue(ended, f"the script still runs after {DEADLINE} s:\n{text}")
        return text

    @inlineCallbacks
    def test_no_thread_outlives_loading_and_a_forked_child_enforces_time_limits(self) -> Generator[Any, Any, None]:
        """Loading leaves only the main thread; a child forked after loading still stops a looping guest."""
        text = yield self.run_script(FORK_SCRIPT)
        self.assertIn("threads after load: 1\n", text)
        self.assertIn("child: guest exceeded its time limit of 0.2 s\n", text)

    @inlineCallbacks
    def test_make_service_starts_no_thread(self) -> Generator[Any, Any, None]:
        """What twistd builds before it forks (guests loaded, --proxy, --workers) leaves one OS thread, no more."""
        guest = self.guest_file(LOOPING_GUEST)
        for args in (
            ["--guest", guest, "--class", "tests.test_twistd.Hello"],
            ["--guest", guest, "--proxy", "http://127.0.0.1:9", "--workers", "2", "--execution", "inline"],
        ):
            text = yield self.run_script(MAKE_SERVICE_SCRIPT, *args)
            self.assertIn("OS threads after makeService: 1\n", text, args)


class TwistdOptionAfterHttpwasmTests(DaemonTestCase):
    """A ``twistd`` option given after ``httpwasm`` is a usage error that says where it goes."""

    @inlineCallbacks
    def test_n_after_httpwasm_is_refused_and_nothing_runs(self) -> Generator[Any, Any, None]:
        """``twistd httpwasm -n ...`` exits non-zero, last line the hint, and neither daemonizes nor listens."""
        port = free_port()
        daemon = self.daemon(
            "httpwasm",
            "-n",
            "--guest",
            self.guest_file(LOOPING_GUEST),
            "--class",
            "tests.test_twistd.Hello",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        )
        status = yield self.launched(daemon)
        self.assertNotEqual(status, 0, daemon.output())
        last_line = Path(daemon.output_path).read_text().strip().splitlines()[-1]
        self.assertIn("-n is a twistd option (--nodaemon), not an httpwasm one", last_line)
        self.assertIn("twistd -n httpwasm ...", last_line)
        self.assertIsNone(daemon.pid, "a daemon was started")
        self.assertFalse(Path(daemon.logfile).exists(), "twistd started logging")
        self.assertFalse((yield accepts_connections(port)))

    def test_twistd_options_after_httpwasm_name_their_place(self) -> None:
        """-n, -p, --pidfile after httpwasm: refused, naming twistd's option and where it goes; --port still works."""
        from twisted.python import usage

        from twisted_httpwasm.service.tap import Options

        for args, hint in [
            (["-n"], "-n is a twistd option (--nodaemon), not an httpwasm one: put it before httpwasm"),
            (["-p", "8080"], "twistd -p VALUE httpwasm ...; to give httpwasm a port, use --listen tcp:PORT"),
            (["--pidfile=x.pid"], "--pidfile is a twistd option, not an httpwasm one"),
            (["--notracebacks"], "option --notracebacks not recognized"),
        ]:
            error = self.assertRaises(usage.UsageError, Options().parseOptions, args)
            self.assertIn(hint, str(error))
        options = Options()
        options.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--guest", self.guest_file(LOOPING_GUEST)])
        self.assertEqual(options["port"], "tcp:0:interface=127.0.0.1")
