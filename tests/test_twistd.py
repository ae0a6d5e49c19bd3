"""End to end: the ``twistd httpwasm`` plugin in a real ``twistd`` subprocess, over loopback."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.web.resource import Resource

from .launch import REPO_ROOT, TWISTD, free_port, start_twistd
from .support import NOOP_RESPONSE, ServerTestCase, TempFilesMixin, poll

__all__ = ["REPO_ROOT", "TWISTD", "Twistd", "TwistdTestCase", "accepts_connections", "free_port"]

#: How long twistd may take to start listening, or to exit.
DEADLINE = 60.0

#: Sets ``x-guest: seen`` on every response and passes the request on.
HEADER_GUEST = (
    """
  (data (i32.const 0) "x-guest")
  (data (i32.const 16) "seen")
  (func (export "handle_request") (result i64)
    (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 4))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: Answers ``/guest...`` itself: status 418, its configuration as the body.  Passes anything else on.
ANSWERING_GUEST = (
    """
  (func (export "handle_request") (result i64)
    (local $len i32)
    (drop (call $get_uri (i32.const 100) (i32.const 100)))
    (if (i32.eq (i32.load8_u (i32.const 101)) (i32.const 103))
      (then
        (local.set $len (call $get_config (i32.const 1024) (i32.const 1024)))
        (call $set_status_code (i32.const 418))
        (call $write_body (i32.const 1) (i32.const 1024) (local.get $len))
        (return (i64.const 0))))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: Refused at load: no handle_response.
BROKEN_GUEST = """
  (func (export "handle_request") (result i64) (i64.const 1))
"""


class Hello(Resource):
    """The downstream that twistd serves with ``--class tests.test_twistd.Hello``."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"downstream saw " + request.uri


class Backend(Resource):
    """A backend for --proxy, served by the test process: says what it received."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"x-backend", b"yes")
        host = request.getHeader(b"host") or b""
        guest_mark = request.getHeader(b"x-httpwasm-guest") or b"-"
        return b"backend saw %s %s host=%s guest=%s" % (request.method, request.uri, host, guest_mark)


class Twistd:
    """One ``twistd -n httpwasm ...`` subprocess (:func:`tests.launch.start_twistd`), its output collected in a file."""

    def __init__(self, args: list[str], output_path: str):
        self.output_path = output_path
        self.process = start_twistd(["-n", "--pidfile=", "httpwasm", *args], output_path)

    def output(self) -> str:
        return Path(self.output_path).read_text(errors="replace")

    def exited(self) -> bool:
        return self.process.poll() is not None


@inlineCallbacks
def accepts_connections(port: int) -> Generator[Any, Any, bool]:
    """True if something accepts TCP connections on 127.0.0.1:``port`` now."""
    try:
        protocol = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), Protocol())
    except ConnectError:
        return False
    protocol.transport.loseConnection()
    return True


class TwistdTestCase(TempFilesMixin, ServerTestCase):
    """Start ``twistd httpwasm`` subprocesses; each is stopped after its test."""

    def twistd(self, *args: str) -> Twistd:
        server = Twistd(list(args), self.mktemp() + ".log")
        self.addCleanup(self.stop, server)
        return server

    @inlineCallbacks
    def stop(self, server: Twistd) -> Generator[Any, Any, None]:
        """SIGTERM, wait a bounded time, then SIGKILL."""
        if server.exited():
            return
        server.process.terminate()
        if not (yield poll(server.exited, 10)):
            server.process.kill()
            server.process.wait()

    @inlineCallbacks
    def start_server(self, *args: str) -> Generator[Any, Any, str]:
        """Start twistd with ``args`` on a free loopback port; return its base URL once it accepts connections."""
        port = free_port()
        server = self.twistd(*args, "--listen", f"tcp:{port}:interface=127.0.0.1")
        ready = yield poll(lambda: server.exited() or accepts_connections(port), DEADLINE)
        if server.exited() or not ready:
            self.fail(
                f"twistd did not start listening on {port} (exit status {server.process.poll()}):\n{server.output()}"
            )
        self.server = server
        return f"http://127.0.0.1:{port}"

    @inlineCallbacks
    def exit_status(self, *args: str) -> Generator[Any, Any, tuple[int, str]]:
        """Run twistd with ``args`` to its end; return its exit status and output."""
        server = self.twistd(*args)
        if not (yield poll(server.exited, DEADLINE)):
            self.fail(f"twistd still runs after {DEADLINE} s:\n{server.output()}")
        return server.process.returncode, server.output()


class ServingTests(TwistdTestCase):
    @inlineCallbacks
    def check_guest_chain(self, execution: str) -> Generator[Any, Any, None]:
        """Two guests in front of a --class downstream: both act, in order, with their own config."""
        url = yield self.start_server(
            "--guest",
            self.guest_file(HEADER_GUEST),
            "--guest",
            self.guest_file(ANSWERING_GUEST),
            "--guest-config",
            "answered by the guest",
            "--class",
            f"{__name__}.Hello",
            "--execution",
            execution,
        )
        status, headers, body = yield self.fetch("GET", url + "/hello?x=1")
        self.assertEqual((status, body), (200, b"downstream saw /hello?x=1"))
        self.assertEqual(headers.getRawHeaders("x-guest"), ["seen"])

        status, _, body = yield self.fetch("GET", url + "/guest")
        self.assertEqual((status, body), (418, b"answered by the guest"))

        output = self.server.output()
        self.assertIn("httpwasm: guests ", output)
        self.assertIn(f"in front of --class {__name__}.Hello", output)
        self.assertIn(f"execution {execution}", output)

    def test_thread_execution(self) -> Deferred[None]:
        """In the default thread mode, twistd serves the guests in front of the downstream."""
        return self.check_guest_chain("thread")

    def test_inline_execution(self) -> Deferred[None]:
        """With --execution inline, twistd serves the guests in front of the downstream."""
        return self.check_guest_chain("inline")

    @inlineCallbacks
    def test_outer_headers_kept_when_inner_guest_answers(self) -> Generator[Any, Any, None]:
        """Headers the outer guest set before next stay on the response the inner guest answers with."""
        url = yield self.start_server(
            "--guest",
            self.guest_file(HEADER_GUEST),
            "--guest",
            self.guest_file(ANSWERING_GUEST),
            "--class",
            f"{__name__}.Hello",
        )
        status, headers, _ = yield self.fetch("GET", url + "/guest")
        self.assertEqual(status, 418)
        self.assertEqual(headers.getRawHeaders("x-guest"), ["seen"])

    @inlineCallbacks
    def test_static_path_downstream(self) -> Generator[Any, Any, None]:
        """--path serves a directory behind the guest, as twistd web --path does."""
        directory = self.mktemp()
        os.makedirs(directory)
        Path(directory, "page.txt").write_bytes(b"static page")
        url = yield self.start_server("--guest", self.guest_file(HEADER_GUEST), "--path", directory)
        status, headers, body = yield self.fetch("GET", url + "/page.txt")
        self.assertEqual((status, body), (200, b"static page"))
        self.assertEqual(headers.getRawHeaders("x-guest"), ["seen"])


class DemoTests(TwistdTestCase):
    @inlineCallbacks
    def test_no_guest_and_no_downstream_serve_the_demo(self) -> Generator[Any, Any, None]:
        """Without --guest and a downstream, twistd serves the bundled guest in front of the demo page."""
        url = yield self.start_server()

        status, headers, body = yield self.fetch("GET", url + "/hello?name=x")
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"hello from the demo guest"), body)
        self.assertEqual(headers.getRawHeaders("x-httpwasm"), ["demo"])

        status, headers, body = yield self.fetch("GET", url + "/some/path?x=1", headers={"X-Test": "yes"})
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("x-httpwasm"), ["demo"])
        self.assertIn(b"  GET /some/path?x=1 HTTP/1.1\n", body)
        self.assertIn(b"  x-httpwasm-guest: demo\n", body)
        self.assertIn(b"  x-test: yes\n", body)

        self.assertIn(
            f"httpwasm demo: guest 'demo' in front of the demo page on {url}/ \u2014 try: curl -i {url}/hello",
            self.server.output(),
        )

    @inlineCallbacks
    def test_guest_without_downstream_fronts_the_demo_page(self) -> Generator[Any, Any, None]:
        """--guest alone puts that guest in front of the demo page, which shows what the guest changed."""
        url = yield self.start_server("--guest", self.guest_file(HEADER_GUEST))
        status, headers, body = yield self.fetch("GET", url + "/anything")
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders("x-guest"), ["seen"])
        self.assertIsNone(headers.getRawHeaders("x-httpwasm"))
        self.assertIn(b"  GET /anything HTTP/1.1\n", body)
        self.assertIn("in front of the demo page, to serve on tcp:", self.server.output())
        self.assertIn(f"httpwasm: listening on tcp:{url.rsplit(':', 1)[1]}:interface=127.0.0.1", self.server.output())


class ProxyTests(TwistdTestCase):
    @inlineCallbacks
    def test_guest_in_front_of_a_proxied_backend(self) -> Generator[Any, Any, None]:
        """--proxy URL forwards what the guest let through to a real backend, below the URL's path."""
        backend = self.serve(Backend())
        url = yield self.start_server("--guest", self.guest_file(HEADER_GUEST), "--proxy", backend + "/base")
        status, headers, body = yield self.fetch("GET", url + "/path?q=1")
        self.assertEqual(status, 200)
        backend_host = backend.removeprefix("http://").encode()
        self.assertEqual(body, b"backend saw GET /base/path?q=1 host=" + backend_host + b" guest=-")
        self.assertEqual(headers.getRawHeaders("x-backend"), ["yes"])
        self.assertEqual(headers.getRawHeaders("x-guest"), ["seen"])
        self.assertIn(f"in front of --proxy {backend}/base", self.server.output())

    @inlineCallbacks
    def test_demo_guest_in_front_of_a_proxy(self) -> Generator[Any, Any, None]:
        """The bundled guest, like any, may front a proxy: its request header reaches the backend."""
        backend = self.serve(Backend())
        demo_guest = str(REPO_ROOT / "twisted_httpwasm" / "guests" / "demo.wat")
        url = yield self.start_server("--guest", demo_guest, "--proxy", backend)
        status, headers, body = yield self.fetch("POST", url + "/x", data=b"payload")
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"backend saw POST /x host="), body)
        self.assertTrue(body.endswith(b" guest=demo"), body)
        self.assertEqual(headers.getRawHeaders("x-httpwasm"), ["demo"])

    @inlineCallbacks
    def test_unreachable_backend(self) -> Generator[Any, Any, None]:
        """A backend that refuses connections makes a 502 Bad Gateway."""
        url = yield self.start_server(
            "--guest", self.guest_file(HEADER_GUEST), "--proxy", f"http://127.0.0.1:{free_port()}"
        )
        status, _, _ = yield self.fetch("GET", url + "/")
        self.assertEqual(status, 502)


class StartupFailureTests(TwistdTestCase):
    @inlineCallbacks
    def test_broken_guest_exits_nonzero_with_reason(self) -> Generator[Any, Any, None]:
        """A guest that cannot load makes twistd exit non-zero, printing which guest and why."""
        broken = self.guest_file(BROKEN_GUEST)
        status, output = yield self.exit_status(
            "--guest", broken, "--class", f"{__name__}.Hello", "--listen", f"tcp:{free_port()}:interface=127.0.0.1"
        )
        self.assertNotEqual(status, 0, output)
        self.assertIn(f"--guest {broken}", output)
        self.assertIn("does not export handle_response", output)
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_invalid_option_exits_nonzero_with_reason(self) -> Generator[Any, Any, None]:
        """An invalid option value makes twistd exit non-zero, printing the usage error."""
        status, output = yield self.exit_status(
            "--guest", self.guest_file(HEADER_GUEST), "--path", ".", "--guest-memory-limit", "64MB"
        )
        self.assertNotEqual(status, 0, output)
        self.assertIn("--guest-memory-limit: '64MB' is not a size", output)

    @inlineCallbacks
    def test_help_lists_the_guest_options(self) -> Generator[Any, Any, None]:
        """``twistd httpwasm --help`` documents the guest options next to twistd web's."""
        status, output = yield self.exit_status("--help")
        self.assertEqual(status, 0, output)
        for option in (
            "--guest=",
            "--guest-config=",
            "--guest-mount=",
            "--on-guest-error=",
            "--listen=",
            "--path=",
            "--proxy=",
            "--workers=",
        ):
            self.assertIn(option, output)
        self.assertIn("With no --guest and no downstream", output)

    @inlineCallbacks
    def test_downstream_without_guest_exits_nonzero(self) -> Generator[Any, Any, None]:
        """A downstream without --guest is refused, rather than served unfiltered."""
        status, output = yield self.exit_status("--path", ".")
        self.assertNotEqual(status, 0, output)
        self.assertIn("give the guest to run in front of --path . with --guest PATH", output)
