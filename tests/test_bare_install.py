"""README's first command on a bare machine: ``pip install .`` in a fresh virtualenv, no extras.

The virtualenv is real (``python -m venv``, then ``pip install`` of a copy of
the package's sources), so that nothing of this test run's own environment
(OpenTelemetry, prometheus_client, h2, treq, hypothesis) is importable there.
In it: README's main job and the bare demo serve a request through their
guest; ``--otel`` and ``--metrics`` are one-line refusals naming the ``pip
install`` to run; ``OTEL_*`` variables without the extra are one warning line.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .readme_commands import commands, run_step

ROOT = Path(__file__).resolve().parent.parent

#: What ``pip install .`` needs of the checkout (a copy: the build must not write into the checkout).
SOURCES = ("setup.cfg", "setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "twisted_httpwasm", "twisted")

#: The extras' modules, none of which may be importable in the bare virtualenv.
EXTRA_MODULES = ("opentelemetry", "prometheus_client", "h2", "treq", "OpenSSL", "hypothesis", "yaml")

DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


class _Bare:
    """The fresh virtualenv, made once per test run (trial has no setUpClass) and removed at exit."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="httpwasm-bare-"))
        atexit.register(shutil.rmtree, self.workdir, True)
        source = self.workdir / "source"
        source.mkdir()
        for name in [*SOURCES, *(path.name for path in ROOT.glob("*.py"))]:  # top-level modules (py_modules)
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.wasm"))
            elif path.exists():
                shutil.copy2(path, source / name)
        self.venv = self.workdir / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(self.venv)], check=True, capture_output=True)
        installed = subprocess.run(
            [str(self.venv / "bin" / "pip"), "install", "-q", str(source)],
            capture_output=True,
            text=True,
            env=environment(self.venv),
            timeout=600,
        )
        self.failure: str | None = None
        self.skip: str | None = None
        if installed.returncode != 0:
            said = (installed.stderr or installed.stdout).strip()
            if "No matching distribution" in said or "Could not find a version" in said:
                # Offline, with no wheel cache: pip cannot get Twisted or wasmtime.
                self.skip = f"pip cannot install the package's requirements here: {said.splitlines()[-1]}"
            else:
                self.failure = f"pip install . failed in a fresh virtualenv:\n{said}"
        # README's main job serves "." (--path) and reads examples/: a directory with both, not the checkout
        # (from the checkout, Python could import the package from the source tree instead of the install).
        self.site = self.workdir / "site"
        self.site.mkdir()
        (self.site / "examples").symlink_to(ROOT / "examples")
        shutil.copy2(ROOT / "README.md", self.site / "README.md")


_bare: _Bare | None = None


def environment(venv: Path, **extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH and OTEL_* (they would leak this test run in), ``venv`` first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("OTEL_")}
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


class BareVirtualenvTests(SynchronousTestCase):
    """One fresh virtualenv with ``pip install`` of the package and nothing else, shared by these tests."""

    def setUp(self) -> None:
        global _bare
        if _bare is None:
            _bare = _Bare()
        if _bare.skip is not None:
            raise SkipTest(_bare.skip)
        if _bare.failure is not None:
            self.fail(_bare.failure)
        self.workdir, self.venv, self.site = _bare.workdir, _bare.venv, _bare.site

    def environment(self, **extra: str) -> dict[str, str]:
        return environment(self.venv, **extra)

    def start(self, command: str, port: int, **env: str) -> tuple[subprocess.Popen[bytes], Path]:
        """Run the shell ``command`` in the bare venv until it serves on ``port``; (process, its output file)."""
        output = self.workdir / f"twistd-{port}.log"
        with output.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", f"exec {command}"],
                cwd=self.site,
                env=self.environment(**env),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(self.stop, process)
        end = time.monotonic() + DEADLINE
        while time.monotonic() < end and process.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return process, output
            except OSError:
                time.sleep(0.1)
        self.fail(f"{command!r} did not serve on {port} (exit {process.poll()}):\n{output.read_text()}")

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def refusal(self, *args: str) -> tuple[int, list[str]]:
        """Exit status and output lines of ``twistd -n --pidfile= httpwasm ARGS`` in the bare venv."""
        result = subprocess.run(
            [str(self.venv / "bin" / "twistd"), "-n", "--pidfile=", "httpwasm", *args],
            cwd=self.site,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
        return result.returncode, (result.stdout + result.stderr).strip().splitlines()

    def test_no_extra_is_installed(self) -> None:
        """The virtualenv is bare: no extra's module can be imported, the package's every layer can."""
        script = (
            "import importlib.util, sys\n"
            f"found = [m for m in {EXTRA_MODULES!r} if importlib.util.find_spec(m) is not None]\n"
            "import twisted_httpwasm.service.tap, twisted_httpwasm.web.tracing, twisted_httpwasm.web.metrics\n"
            "import twisted_httpwasm.service.observability, twisted_httpwasm.service.sources\n"
            "print(found)\n"
        )
        result = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c", script],
            cwd=self.workdir,
            env=self.environment(),
            capture_output=True,
            text=True,
        )
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "[]"), result.stderr)

    def test_readme_main_job_serves_through_its_guest(self) -> None:
        """README's first command (its twistd part, verbatim but the port) serves README.md through the guest."""
        port = free_port()
        command = run_step(commands()["main"]).replace("tcp:8080:", f"tcp:{port}:")
        process, output = self.start(command, port)
        status, headers, body = fetch(f"http://127.0.0.1:{port}/README.md")
        self.assertEqual(status, 200)
        self.assertEqual(headers.get("x-content-type-options"), "nosniff")
        self.assertTrue(body.startswith(b"# twisted-httpwasm"))
        self.stop(process)
        self.assertNotIn("Traceback", output.read_text())

    def test_bare_demo_serves(self) -> None:
        """``twistd -n httpwasm`` alone serves the demo guest; no word of tracing or a traceback."""
        port = free_port()
        process, output = self.start(f"twistd -n --pidfile= httpwasm --listen tcp:{port}:interface=127.0.0.1", port)
        status, _, body = fetch(f"http://127.0.0.1:{port}/hello")
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"hello from the demo guest"), body)
        self.stop(process)
        text = output.read_text()
        self.assertNotIn("Traceback", text)
        self.assertNotIn("tracing on", text)

    def test_otel_environment_without_the_extra_is_one_warning(self) -> None:
        """OTEL_EXPORTER_OTLP_ENDPOINT set, OpenTelemetry absent: it serves, and one line says what to install."""
        port = free_port()
        process, output = self.start(
            f"twistd -n --pidfile= httpwasm --listen tcp:{port}:interface=127.0.0.1",
            port,
            OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318",
        )
        status, _, _ = fetch(f"http://127.0.0.1:{port}/hello")
        self.assertEqual(status, 200)
        self.stop(process)
        text = output.read_text()
        self.assertIn(
            "OTEL_* variables ask for traces, but tracing needs OpenTelemetry: pip install 'twisted-httpwasm[otel]'",
            text,
        )
        self.assertNotIn("Traceback", text)

    def check_refused(self, args: tuple[str, ...], last_line: str) -> None:
        status, lines = self.refusal(*args)
        self.assertEqual(status, 1, lines)
        self.assertTrue(lines[-1].endswith(last_line), lines)
        self.assertLessEqual(len(lines), 3, lines)  # the usage line, where the help is, the reason
        self.assertNotIn("Traceback", "\n".join(lines))

    def test_otel_is_refused_in_one_line(self) -> None:
        """``--otel`` without the extra: exit 1, the last line names ``pip install 'twisted-httpwasm[otel]'``."""
        self.check_refused(("--otel",), ": --otel needs OpenTelemetry: pip install 'twisted-httpwasm[otel]'")

    def test_metrics_is_refused_in_one_line(self) -> None:
        """``--metrics`` without the extra: exit 1, the last line names ``pip install 'twisted-httpwasm[metrics]'``."""
        self.check_refused(
            ("--metrics", "tcp:0:interface=127.0.0.1"),
            ": --metrics needs prometheus_client: pip install 'twisted-httpwasm[metrics]'",
        )

    def test_yaml_configuration_is_refused_in_one_line(self) -> None:
        """A YAML ``--guest-config-file`` without PyYAML: exit 1, the last line names ``pip install
        'twisted-httpwasm[yaml]'``; a Traefik plugin directory (its manifest is YAML) likewise."""
        config = self.workdir / "plugin-config.yaml"
        config.write_text("headers: {X-A: '1'}\n")
        self.check_refused(
            ("--guest", "examples/security_headers.wat", "--guest-config-file", str(config), "--path", "."),
            f": --guest-config-file: {config}: YAML needs PyYAML: pip install 'twisted-httpwasm[yaml]'",
        )
        plugin = self.workdir / "plugin"
        plugin.mkdir(exist_ok=True)
        (plugin / ".traefik.yml").write_text("displayName: p\ntype: middleware\nruntime: wasm\n")
        status, lines = self.refusal("--guest", str(plugin), "--path", ".")
        self.assertEqual(status, 1, lines)
        self.assertIn(".traefik.yml: YAML needs PyYAML: pip install 'twisted-httpwasm[yaml]'", lines[-1])
        self.assertNotIn("Traceback", "\n".join(lines))
