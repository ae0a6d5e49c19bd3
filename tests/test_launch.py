"""The one launcher of ``twistd`` children (tests/launch.py), shared by the tests and the benchmarks."""

from __future__ import annotations

import http.client
import importlib
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from . import launch
from .support import TempFilesMixin
from .test_twistd import HEADER_GUEST

#: The benchmark modules that start ``twistd``.
BENCH_LAUNCHERS = ("bench.run", "bench.abuse", "bench.log_flood", "bench.reload")


class SharedLauncherTests(SynchronousTestCase):
    def test_one_way_to_start_twistd(self) -> None:
        """Only tests/launch.py spells out how twistd is started; tests and benches import it from there."""
        spelled = [
            str(path.relative_to(launch.REPO_ROOT))
            for folder in ("tests", "bench")
            for path in sorted((launch.REPO_ROOT / folder).rglob("*.py"))
            if launch.TWISTD in path.read_text(encoding="utf-8")
        ]
        self.assertEqual(spelled, ["tests/launch.py"])
        for name in BENCH_LAUNCHERS:
            module = importlib.import_module(name)
            self.assertIs(module.start_twistd, launch.start_twistd, name)  # type: ignore[attr-defined]
            self.assertIs(module.free_port, launch.free_port, name)  # type: ignore[attr-defined]
            self.assertNotIn("subprocess.Popen(", Path(module.__file__ or "").read_text(encoding="utf-8"), name)

    def test_children_run_this_interpreter_with_the_repository_first(self) -> None:
        """twistd runs under sys.executable (a virtualenv's python, not the base one), the repository first on
        PYTHONPATH, whatever PYTHONPATH was."""
        self.assertEqual(launch.twistd_command("--help")[:2], [sys.executable, "-c"])
        env = launch.child_env({"PYTHONPATH": "/elsewhere", "KEEP": "1"}, EXTRA="2")
        self.assertEqual(env["PYTHONPATH"], f"{launch.REPO_ROOT}:/elsewhere")
        self.assertEqual((env["KEEP"], env["EXTRA"]), ("1", "2"))
        self.assertEqual(launch.child_env({})["PYTHONPATH"], str(launch.REPO_ROOT))


class LaunchTwistdTests(TempFilesMixin, SynchronousTestCase):
    """The blocking launcher the benchmarks use, against a real ``twistd -n httpwasm``."""

    def test_start_wait_serve_stop(self) -> None:
        """start_twistd, wait_listening, a request, stop: SIGTERM ends twistd with status 0."""
        port = launch.free_port()
        output = self.mktemp()
        args = ["-n", "--pidfile=", "httpwasm", "--guest", self.guest_file(HEADER_GUEST)]
        args += ["--class", "tests.test_twistd.Hello", "--listen", f"tcp:{port}:interface={launch.HOST}"]
        process = launch.start_twistd(args, output)
        self.addCleanup(launch.stop, process)
        launch.wait_listening(process, port, 60, output)
        self.assertEqual(Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[0], sys.executable.encode())
        connection = http.client.HTTPConnection(launch.HOST, port, timeout=30)
        try:
            connection.request("GET", "/launched")
            response = connection.getresponse()
            self.assertEqual((response.status, response.read()), (200, b"downstream saw /launched"))
            self.assertEqual(response.getheader("x-guest"), "seen")
        finally:
            connection.close()
        self.assertEqual(launch.stop(process), 0)
        self.assertIn("httpwasm: listening on", Path(output).read_text())

    def test_a_server_that_exits_early_is_reported_with_its_output(self) -> None:
        """wait_listening fails at once when twistd exits (a guest that does not load), with its last lines."""
        output = self.mktemp()
        missing = self.mktemp() + ".wasm"
        process = launch.start_twistd(["-n", "--pidfile=", "httpwasm", "--guest", missing, "--path", "."], output)
        self.addCleanup(launch.stop, process)
        error = self.assertRaises(RuntimeError, launch.wait_listening, process, launch.free_port(), 60, output)
        self.assertIn("exited with status 1 before it listened", str(error))
        self.assertIn(missing, str(error))

    def test_stop_kills_what_ignores_sigterm(self) -> None:
        """A child that ignores SIGTERM gets SIGKILL once the timeout passed."""
        script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
        script += "time.sleep(60)"
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.addCleanup(process.stdout.close)  # type: ignore[union-attr]
        self.assertEqual(process.stdout.readline(), b"ready\n")  # type: ignore[union-attr]
        self.assertEqual(launch.stop(process, timeout=0.2), -signal.SIGKILL)
