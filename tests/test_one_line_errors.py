"""Startup errors are one line, last, that says what to do: usage errors and ports that cannot be bound.

Real ``twistd`` runs, in the foreground (``-n``) and as a daemon; the
assertions are on the last line printed and on the absence of a traceback.
"""

from __future__ import annotations

import socket
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks

from .test_daemon import DaemonTestCase
from .test_twistd import HEADER_GUEST, TwistdTestCase, accepts_connections, free_port

HELP_HINT = "Run 'twistd httpwasm --help' to see every option."


def taken_port(test: Any) -> int:
    """A loopback port something else listens on until the end of ``test``."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    test.addCleanup(holder.close)
    port: int = holder.getsockname()[1]
    return port


class UsageErrorTests(TwistdTestCase):
    """A usage error prints the usage line, where the help is, and the reason, last: not ~180 lines of help."""

    @inlineCallbacks
    def check_usage_error(self, *args: str, reason: str) -> Generator[Any, Any, None]:
        status, output = yield self.exit_status(*args)
        lines = output.strip().splitlines()
        self.assertEqual(status, 1, output)
        self.assertEqual(len(lines), 3, output)
        self.assertTrue(lines[0].startswith("Usage: twistd [options] httpwasm [--guest PATH"), output)
        self.assertEqual(lines[1], HELP_HINT)
        self.assertTrue(lines[-1].endswith(f": {reason}"), output)
        self.assertNotIn("Traceback", output)

    def test_workers_zero(self) -> Any:
        """--workers 0."""
        return self.check_usage_error(
            "--workers", "0", reason="--workers must be a positive number of processes, not '0'"
        )

    def test_bad_listen(self) -> Any:
        """A --listen that is not an endpoint."""
        return self.check_usage_error(
            "--listen",
            "nonsense:1",
            reason="--listen nonsense:1: not a usable endpoint: Unknown endpoint type: 'nonsense'",
        )

    def test_unknown_option(self) -> Any:
        """An option httpwasm does not have."""
        return self.check_usage_error("--no-such-option", reason="option --no-such-option not recognized")

    def test_missing_guest_config_file(self) -> Any:
        """A --guest-config-file that does not exist."""
        missing = self.mktemp()
        return self.check_usage_error(
            "--guest",
            self.guest_file(HEADER_GUEST),
            "--guest-config-file",
            missing,
            reason=f"--guest-config-file: cannot read '{missing}': No such file or directory",
        )

    @inlineCallbacks
    def test_help_still_lists_every_option(self) -> Generator[Any, Any, None]:
        """--help is not a usage error: every option is listed."""
        status, output = yield self.exit_status("--help")
        self.assertEqual(status, 0, output)
        self.assertIn("--guest-config-file=", output)
        self.assertNotIn(HELP_HINT, output)


class PortInUseTests(TwistdTestCase, DaemonTestCase):
    """A port that cannot be bound: one line, exit 1, in the foreground and as a daemon; never 'listening on'."""

    @inlineCallbacks
    def test_foreground(self) -> Generator[Any, Any, None]:
        port = taken_port(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        status, output = yield self.exit_status("--guest", self.guest_file(HEADER_GUEST), "--listen", endpoint)
        self.assertEqual(status, 1, output)
        self.assertEqual(output.strip().splitlines()[-1], f"cannot listen on {endpoint}: address already in use")
        self.assertNotIn("Traceback", output)
        self.assertNotIn("listening on", output)

    @inlineCallbacks
    def test_metrics_port(self) -> Generator[Any, Any, None]:
        """--metrics on a taken port: the same one line."""
        port = taken_port(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        status, output = yield self.exit_status(
            "--guest", self.guest_file(HEADER_GUEST), "--metrics", endpoint, "--listen", f"tcp:{free_port()}"
        )
        self.assertEqual(status, 1, output)
        self.assertEqual(output.strip().splitlines()[-1], f"cannot listen on {endpoint}: address already in use")
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_daemon(self) -> Generator[Any, Any, None]:
        """twistd without -n: the launcher prints the whole line (not twistd's 100-byte status, cut mid-word)."""
        port = taken_port(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        daemon = self.daemon("httpwasm", "--guest", self.guest_file(HEADER_GUEST), "--listen", endpoint)
        status = yield self.launched(daemon)
        self.assertEqual(status, 1, daemon.output())
        printed = Path(daemon.output_path).read_text()
        self.assertEqual(printed.strip().splitlines()[-1], f"cannot listen on {endpoint}: address already in use")
        self.assertNotIn("Traceback", daemon.output())
        self.assertNotIn("listening on", daemon.output())
        self.assertIsNone(daemon.pid, "a daemon was left running")

    @inlineCallbacks
    def test_listening_is_logged_once_bound_with_the_address(self) -> Generator[Any, Any, None]:
        """'listening on' names the endpoint and the address it was bound to, after the bind."""
        url = yield self.start_server("--guest", self.guest_file(HEADER_GUEST))
        port = url.rsplit(":", 1)[1]
        self.assertTrue((yield accepts_connections(int(port))))
        self.assertIn(f"httpwasm: listening on tcp:{port}:interface=127.0.0.1 (127.0.0.1:{port})", self.server.output())

    def test_ports_are_checked_before_forking(self) -> None:
        """makeService under twistd (run before it forks) refuses a taken port with the one line, as SystemExit;
        a program's own makeService leaves binding to its services."""
        from twisted.scripts.twistd import ServerOptions

        from twisted_httpwasm.service import tap

        port = taken_port(self)
        endpoint = f"tcp:{port}:interface=127.0.0.1"
        config = tap.Options()
        config.parseOptions(["--guest", self.guest_file(HEADER_GUEST), "--listen", endpoint])
        tap.makeService(config)  # no twistd: nothing bound yet
        config.parent = ServerOptions()  # type: ignore[no-untyped-call]
        error = self.assertRaises(SystemExit, tap.makeService, config)
        self.assertEqual(error.code, f"cannot listen on {endpoint}: address already in use")

    def test_listening_on_a_unix_socket_names_its_path(self) -> None:
        """A unix: endpoint's 'listening on' line names the socket's path (it has no host:port)."""
        from twisted.logger import formatEvent, globalLogPublisher
        from twisted.web.server import Site

        from twisted_httpwasm.service.tap import _Listening

        from .test_twistd import Hello

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        path = self.mktemp() + ".sock"
        listening = _Listening(f"unix:{path}", Site(Hello()))
        listening.privilegedStartService()
        self.addCleanup(listening.stopService)
        lines = [formatEvent(event) for event in events if "listening on" in formatEvent(event)]
        self.assertEqual(lines, [f"httpwasm: listening on unix:{path} ({path})"])
