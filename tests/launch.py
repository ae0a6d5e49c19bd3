"""Starting ``twistd`` (and other Python children) the one way the tests and the benchmarks share.

Standard library only, so that ``bench/`` can import it without pytest or
trial: ``from tests.launch import ...``.  Every child runs this very
interpreter (``sys.executable``: a virtualenv's, with its packages), from the
repository root, with the repository root first on ``PYTHONPATH`` (the
``twisted/plugins`` dropin, ``tests.*`` and ``bench.*`` resources importable).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "HOST",
    "REPO_ROOT",
    "TWISTD",
    "accepts",
    "child_env",
    "free_port",
    "start_twistd",
    "stop",
    "tail",
    "twistd_command",
    "wait_listening",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The loopback address every launched server listens on.
HOST = "127.0.0.1"

#: Runs twistd in this interpreter; argv[0] makes its messages say "twistd".
#: (``python -m twisted`` is ``twist``, not ``twistd``: this calls twistd's entry point.)
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"

#: Seconds a stopped child has after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 10.0


def twistd_command(*args: str) -> list[str]:
    """``twistd ARGS`` run by this very interpreter (so its packages and versions are the ones reported)."""
    return [sys.executable, "-c", TWISTD, *args]


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """``base`` (default: this environment) plus ``extra``, with the repository root first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def start_twistd(
    args: Sequence[str],
    output: str | Path | int | IO[Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path = REPO_ROOT,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """``twistd ARGS`` (twistd's own options first: ``-n``, ``--pidfile=``, then ``httpwasm ...``), started.

    ``output``: a path (its stdout and stderr go to that file), a file or
    ``subprocess.DEVNULL``; None inherits this process's.  ``env`` defaults to
    :func:`child_env`; stdin is ``/dev/null``.  ``popen`` goes to ``Popen``
    (``preexec_fn``, say).
    """
    popen.setdefault("stdin", subprocess.DEVNULL)
    command = twistd_command(*args)
    environment = child_env() if env is None else dict(env)
    if isinstance(output, str | Path):
        with open(output, "wb") as out:
            return subprocess.Popen(command, cwd=cwd, env=environment, stdout=out, stderr=subprocess.STDOUT, **popen)
    if output is None:
        return subprocess.Popen(command, cwd=cwd, env=environment, **popen)
    return subprocess.Popen(command, cwd=cwd, env=environment, stdout=output, stderr=subprocess.STDOUT, **popen)


def accepts(port: int, host: str = HOST) -> bool:
    """True if something accepts TCP connections on ``host:port`` now (a blocking connect, 1 s at most)."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def tail(path: str | Path, lines: int = 30) -> str:
    """The last ``lines`` lines of the file at ``path`` (a child's output), or ``(no output)``."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def wait_listening(
    process: subprocess.Popen[bytes], port: int, timeout: float, output: str | Path | None = None, host: str = HOST
) -> None:
    """Block until ``host:port`` accepts connections; RuntimeError if ``process`` exits first or ``timeout`` passes.

    The error ends with the tail of ``output`` (the child's output file), if given.
    """

    def said() -> str:
        return f"; its output:\n{tail(output)}" if output is not None else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it listened{said()}")
        if accepts(port, host):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the server did not accept connections on {host}:{port} within {timeout:g} s{said()}")


def stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM, then SIGKILL if ``process`` is still there after ``timeout`` seconds; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"pid {process.pid} ignored SIGTERM for {timeout:g} s; killing it", file=sys.stderr, flush=True)
            process.kill()
            process.wait(timeout=timeout)
    return process.returncode
