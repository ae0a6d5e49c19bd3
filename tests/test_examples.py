"""Every example of examples/ does what examples/README.md says, end to end.

Each guest is loaded from its source file (the C ones are built at test time
with examples/c/build.py into a temporary directory) and runs over a real
socket in front of a real downstream: a static directory with an echo
resource in it.  The embedding examples (embed_static.py, embed_wsgi.py) are
imported and also run as scripts.
"""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.static import File

from twisted_httpwasm import Execution, Guest, GuestLoadError

from .launch import child_env
from .support import (
    EXAMPLES,
    ROOT,
    ServerTestCase,
    c_build_module,
    c_guest_binary,
    execution_variants,
    guest_text,
    load_example_module,
    on_guest_log,
)


def c_guest(name: str) -> Path:
    """``examples/c/<name>`` built with examples/c/build.py (once per test run).

    Skips the test, saying what is missing, when clang or its WebAssembly tools are absent.
    """
    wasi = c_build_module().EXAMPLES[name]
    return c_guest_binary(EXAMPLES / "c" / name, wasi=wasi)


def watch_log(guest: Guest) -> list[tuple[str, str]]:
    """(level, message) of every line the guest logs from now on.

    The observer sits on the guest's own Logger, so only this guest's lines count.
    """
    lines: list[tuple[str, str]] = []
    on_guest_log(guest, lambda event: lines.append((event["log_level"].name, guest_text(event))))
    return lines


class Echo(Resource):
    """Answers with JSON: the URI and the x-request-id header it saw; counts its requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def render(self, request: Any) -> bytes:
        self.seen += 1
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"uri": request.uri.decode(), "x-request-id": (request.getHeader(b"x-request-id") or b"").decode()}
        ).encode()


class Fails(Resource):
    isLeaf = True

    def render(self, request: Any) -> object:
        request.processingFailed(Failure(RuntimeError("downstream failed on purpose")))
        return NOT_DONE_YET


class Served(NamedTuple):
    guest: Guest
    echo: Echo
    url: str


class ExampleMixin:
    """Helpers: a directory behind a guest, served on a loopback port."""

    execution: Execution
    timeout = 30

    def site_dir(self) -> Path:
        directory = Path(self.mktemp())  # type: ignore[attr-defined]
        directory.mkdir()
        (directory / "items").write_bytes(b"the items\n")
        (directory / "note.txt").write_bytes(b"the password is SECRET, SECRET!\n")
        (directory / "SECRETS.txt").write_bytes(b"x" * 5 + b"SECRET" + b"y" * 200_000 + b"SECRETSECRET\n")
        return directory

    def downstream(self) -> tuple[Resource, Echo]:
        root = File(str(self.site_dir()))
        echo = Echo()
        root.putChild(b"echo", echo)
        root.putChild(b"fails", Fails())
        return root, echo

    def serve_example(self, source: Path, config: bytes = b"") -> Served:
        guest = Guest(source, config=config, execution=self.execution)
        root, echo = self.downstream()
        return Served(guest, echo, self.serve_guest(guest, root))  # type: ignore[attr-defined]


# -- router --------------------------------------------------------------------------


class RouterMixin(ExampleMixin):
    def router(self) -> Path:
        raise NotImplementedError

    @inlineCallbacks
    def test_host_answered_by_guest(self) -> Any:
        """/host... gets 200 text/plain "hello from the guest" without the downstream."""
        served = self.serve_example(self.router())
        for path in ("/host", "/hosts", "/host?x=1"):
            status, headers, body = yield self.fetch("GET", served.url + path)  # type: ignore[attr-defined]
            self.assertEqual((status, body), (200, b"hello from the guest\n"), path)
            self.assertEqual(headers.getRawHeaders("content-type"), ["text/plain"])
        self.assertEqual(served.echo.seen, 0)
        self.assertEqual(served.guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_api_prefix_stripped(self) -> Any:
        """/api/items?x=1 is served as /items?x=1 by the directory."""
        served = self.serve_example(self.router())
        status, _, body = yield self.fetch("GET", served.url + "/api/items?x=1")  # type: ignore[attr-defined]
        self.assertEqual((status, body), (200, b"the items\n"))
        status, _, body = yield self.fetch("GET", served.url + "/api/echo?x=%20y")  # type: ignore[attr-defined]
        self.assertEqual((status, json.loads(body)["uri"]), (200, "/echo?x=%20y"))

    @inlineCallbacks
    def test_other_uris_unchanged(self) -> Any:
        """Anything else reaches the directory as it was."""
        served = self.serve_example(self.router())
        status, _, body = yield self.fetch("GET", served.url + "/items")  # type: ignore[attr-defined]
        self.assertEqual((status, body), (200, b"the items\n"))
        status, _, body = yield self.fetch("GET", served.url + "/apix/echo")  # type: ignore[attr-defined]
        self.assertEqual(status, 404)
        status, _, body = yield self.fetch("GET", served.url + "/echo?api/")  # type: ignore[attr-defined]
        self.assertEqual(json.loads(body)["uri"], "/echo?api/")

    @inlineCallbacks
    def test_long_uri(self) -> Any:
        """A URI longer than the guest's first buffer (2 KiB in router.c) is still routed."""
        served = self.serve_example(self.router())
        query = "q=" + "z" * 5000
        status, _, body = yield self.fetch("GET", served.url + "/api/echo?" + query)  # type: ignore[attr-defined]
        self.assertEqual((status, json.loads(body)["uri"]), (200, "/echo?" + query))


# -- auth -------------------------------------------------------------------------------


def basic(credentials: bytes, scheme: bytes = b"Basic") -> bytes:
    return scheme + b" " + base64.b64encode(credentials)


class AuthMixin(ExampleMixin):
    def auth(self) -> Path:
        raise NotImplementedError

    def assert_refused(self, status: int, headers: Any, body: bytes) -> None:
        self.assertEqual((status, body), (401, b"unauthorized\n"))  # type: ignore[attr-defined]
        self.assertEqual(headers.getRawHeaders("www-authenticate"), ['Basic realm="httpwasm"'])  # type: ignore[attr-defined]
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/plain"])  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_right_credentials_pass(self) -> Any:
        """Authorization: Basic base64(config) reaches the directory; the scheme in any case."""
        served = self.serve_example(self.auth(), config=b"alice:secret")
        for scheme in (b"Basic", b"bAsIc"):
            headers = {b"Authorization": [basic(b"alice:secret", scheme)]}
            status, _, body = yield self.fetch("GET", served.url + "/items", headers=headers)  # type: ignore[attr-defined]
            self.assertEqual((status, body), (200, b"the items\n"), scheme)
        # More than one space after the scheme is allowed too.
        headers = {b"Authorization": [b"Basic   " + base64.b64encode(b"alice:secret")]}
        status, _, _ = yield self.fetch("GET", served.url + "/items", headers=headers)  # type: ignore[attr-defined]
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_anything_else_refused(self) -> Any:
        """No header, a wrong password, another scheme, two headers: 401 from the guest."""
        served = self.serve_example(self.auth(), config=b"alice:secret")
        refused = [
            {},
            {b"Authorization": [basic(b"alice:wrong")]},
            {b"Authorization": [basic(b"alice:secret", b"Bearer")]},
            {b"Authorization": [basic(b"alice:secret"), basic(b"alice:secret")]},
            {b"Authorization": [b"Basic"]},
        ]
        for headers in refused:
            status, got, body = yield self.fetch("GET", served.url + "/echo", headers=headers)  # type: ignore[attr-defined]
            self.assert_refused(status, got, body)
        self.assertEqual(served.echo.seen, 0)
        self.assertEqual(served.guest.pool.stats.in_use, 0)

    def test_bad_config_refused_at_load(self) -> None:
        """An empty or over-long config: the guest traps at init, so it is never used."""
        source = self.auth()  # outside assertRaises: a C guest without clang skips, it does not fail
        for config in (b"", b"u:" + b"p" * 1023):
            with self.assertRaises(GuestLoadError) as caught:  # type: ignore[attr-defined]
                Guest(source, config=config, execution=self.execution)
            self.assertIn("failed to initialise", str(caught.exception))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_longest_config_accepted(self) -> Any:
        """A 1024-byte credential is the longest accepted."""
        credential = b"u:" + b"p" * 1022
        served = self.serve_example(self.auth(), config=credential)
        headers = {b"Authorization": [basic(credential)]}
        status, _, _ = yield self.fetch("GET", served.url + "/items", headers=headers)  # type: ignore[attr-defined]
        self.assertEqual(status, 200)


# -- request ids ------------------------------------------------------------------------


class RequestIdMixin(ExampleMixin):
    def request_id(self) -> Path:
        raise NotImplementedError

    @inlineCallbacks
    def test_ids_on_request_and_response(self) -> Any:
        """Sequential requests (one instance) get req-1, req-2: the downstream sees the id as
        a request header and the client as a response header; each is logged with its status."""
        served = self.serve_example(self.request_id())
        lines = watch_log(served.guest)
        for n in (1, 2):
            status, headers, body = yield self.fetch("GET", served.url + "/echo")  # type: ignore[attr-defined]
            self.assertEqual(status, 200)
            self.assertEqual(headers.getRawHeaders("x-request-id"), [f"req-{n}"])
            self.assertEqual(json.loads(body)["x-request-id"], f"req-{n}")
        status, headers, _ = yield self.fetch("GET", served.url + "/missing")  # type: ignore[attr-defined]
        self.assertEqual((status, headers.getRawHeaders("x-request-id")), (404, ["req-3"]))
        self.assertEqual(
            lines, [("info", "req-1 status=200"), ("info", "req-2 status=200"), ("info", "req-3 status=404")]
        )

    @inlineCallbacks
    def test_failed_downstream_logged(self) -> Any:
        """A failing next handler is logged as "req-<n> failed" at warn level."""
        served = self.serve_example(self.request_id())
        lines = watch_log(served.guest)
        status, _, _ = yield self.fetch("GET", served.url + "/fails")  # type: ignore[attr-defined]
        self.assertEqual(status, 500)
        self.flushLoggedErrors(RuntimeError)  # type: ignore[attr-defined]
        self.assertEqual(lines, [("warn", "req-1 failed")])

    @inlineCallbacks
    def test_concurrent_requests_use_separate_instances(self) -> Any:
        """Ids count per instance: two requests at once both get req-1 from two instances."""
        held: list[Deferred[None]] = []
        arrived: Deferred[None] = Deferred()

        class Held(Resource):
            isLeaf = True

            def render(self, request: Any) -> object:
                waiting: Deferred[None] = Deferred()
                waiting.addCallback(lambda _: (request.write(b"ok"), request.finish()))
                held.append(waiting)
                if len(held) == 2:
                    arrived.callback(None)
                return NOT_DONE_YET

        guest = Guest(self.request_id(), execution=self.execution)
        url = self.serve_guest(guest, Held())  # type: ignore[attr-defined]
        fetches = [self.fetch("GET", url + "/a"), self.fetch("GET", url + "/b")]  # type: ignore[attr-defined]
        yield arrived
        for waiting in held:
            waiting.callback(None)
        results = yield gatherResults(fetches)
        ids = sorted(headers.getRawHeaders("x-request-id")[0] for _, headers, _ in results)
        self.assertEqual(ids, ["req-1", "req-1"])
        self.assertEqual(guest.pool.stats.in_use, 0)


# -- the WAT examples --------------------------------------------------------------------


class WatRouterMixin(RouterMixin):
    def router(self) -> Path:
        return EXAMPLES / "router.wat"


class WatAuthMixin(AuthMixin):
    def auth(self) -> Path:
        return EXAMPLES / "auth.wat"


class WatRequestIdMixin(RequestIdMixin):
    def request_id(self) -> Path:
        return EXAMPLES / "request_id.wat"


class RedactMixin(ExampleMixin):
    @inlineCallbacks
    def test_secret_masked(self) -> Any:
        """Every SECRET in a response body becomes ******; the length does not change."""
        served = self.serve_example(EXAMPLES / "redact.wat")
        status, _, body = yield self.fetch("GET", served.url + "/note.txt")  # type: ignore[attr-defined]
        self.assertEqual((status, body), (200, b"the password is ******, ******!\n"))
        status, _, body = yield self.fetch("GET", served.url + "/items")  # type: ignore[attr-defined]
        self.assertEqual((status, body), (200, b"the items\n"))

    @inlineCallbacks
    def test_large_body_masked(self) -> Any:
        """A body larger than the guest's first memory page is read whole and masked."""
        served = self.serve_example(EXAMPLES / "redact.wat")
        status, _, body = yield self.fetch("GET", served.url + "/SECRETS.txt")  # type: ignore[attr-defined]
        self.assertEqual(status, 200)
        self.assertEqual(body, b"x" * 5 + b"******" + b"y" * 200_000 + b"************\n")
        self.assertEqual(served.guest.pool.stats.in_use, 0)

    @inlineCallbacks
    def test_failed_downstream_left_alone(self) -> Any:
        """A failing next handler's error response passes untouched."""
        served = self.serve_example(EXAMPLES / "redact.wat")
        status, _, _ = yield self.fetch("GET", served.url + "/fails")  # type: ignore[attr-defined]
        self.flushLoggedErrors(RuntimeError)  # type: ignore[attr-defined]
        self.assertEqual(status, 500)
        self.assertEqual(served.guest.pool.stats.in_use, 0)


class SecurityHeadersMixin(ExampleMixin):
    @inlineCallbacks
    def test_headers_on_every_response(self) -> Any:
        """The three headers are on a file, a 404 and the echo resource alike."""
        served = self.serve_example(EXAMPLES / "security_headers.wat")
        for path, expected in (("/items", 200), ("/nothing-here", 404), ("/echo", 200)):
            status, headers, _ = yield self.fetch("GET", served.url + path)  # type: ignore[attr-defined]
            self.assertEqual(status, expected, path)
            self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"], path)
            self.assertEqual(headers.getRawHeaders("x-frame-options"), ["DENY"], path)
            self.assertEqual(headers.getRawHeaders("referrer-policy"), ["no-referrer"], path)


# -- the C examples ----------------------------------------------------------------------


class CRouterMixin(RouterMixin):
    def router(self) -> Path:
        return c_guest("router.c")


class CAuthMixin(AuthMixin):
    def auth(self) -> Path:
        return c_guest("auth.c")


class CRequestIdWasiMixin(RequestIdMixin):
    def request_id(self) -> Path:
        return c_guest("request_id_wasi.c")

    def test_instance_announces_itself_on_stdout(self) -> None:
        """Each new instance prints "request_id_wasi: instance ready" through WASI fd_write,
        which reaches the log at info level."""
        guest = Guest(self.request_id(), execution=self.execution)
        lines = watch_log(guest)
        first = guest.pool.acquire()  # the instance made at load
        second = guest.pool.acquire()  # a new one: its _initialize prints
        guest.pool.release(first)
        guest.pool.release(second)
        self.assertEqual(lines, [("info", "[stdout] request_id_wasi: instance ready")])


_MIXINS = (
    WatRouterMixin,
    WatAuthMixin,
    WatRequestIdMixin,
    RedactMixin,
    SecurityHeadersMixin,
    CRouterMixin,
    CAuthMixin,
    CRequestIdWasiMixin,
)
for _mixin in _MIXINS:
    globals().update(execution_variants(_mixin, ServerTestCase))
del _mixin


# -- embedding examples -----------------------------------------------------------------


class _FirstLine(ProcessProtocol):
    """Collects a child's output; ``line`` fires with its first stdout line, ``ended`` at exit."""

    def __init__(self) -> None:
        self.line: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.out = b""
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.line.called:
            self.line.callback(self.out.split(b"\n", 1)[0].decode())

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        if not self.line.called:
            self.line.errback(RuntimeError(f"exited before listening: {self.err.decode(errors='replace')}"))
        self.ended.callback(None)


class EmbeddingTests(ServerTestCase):
    """examples/embed_static.py and examples/embed_wsgi.py, imported and run."""

    timeout = 60

    @inlineCallbacks
    def test_static_site(self) -> Any:
        """build_site(dir) serves the directory with the security headers added."""
        embed_static = load_example_module("embed_static")
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "hello.txt").write_bytes(b"hello, static\n")
        url = self.listen(embed_static.build_site(directory))
        status, headers, body = yield self.fetch("GET", url + "/hello.txt")
        self.assertEqual((status, body), (200, b"hello, static\n"))
        self.assertEqual(headers.getRawHeaders("x-frame-options"), ["DENY"])

    @inlineCallbacks
    def test_static_with_another_guest(self) -> Any:
        """build_site takes any guest, here router.wat routing /api/ into the directory."""
        embed_static = load_example_module("embed_static")
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "hello.txt").write_bytes(b"hello, static\n")
        url = self.listen(embed_static.build_site(directory, EXAMPLES / "router.wat"))
        status, _, body = yield self.fetch("GET", url + "/api/hello.txt")
        self.assertEqual((status, body), (200, b"hello, static\n"))
        status, _, body = yield self.fetch("GET", url + "/host")
        self.assertEqual((status, body), (200, b"hello from the guest\n"))

    @inlineCallbacks
    def test_wsgi_site(self) -> Any:
        """The WSGI app sees the guest's x-request-id (HTTP_X_REQUEST_ID), the path, query and
        body; the client gets the same id."""
        embed_wsgi = load_example_module("embed_wsgi")
        url = self.listen(embed_wsgi.build_site())
        status, headers, body = yield self.fetch("POST", url + "/app/path?x=1", data=b"posted")
        self.assertEqual(status, 200)
        seen = json.loads(body)
        self.assertEqual(
            seen,
            {"method": "POST", "path": "/app/path", "query": "x=1", "request_id": "req-1", "body": "posted"},
        )
        self.assertEqual(headers.getRawHeaders("x-request-id"), ["req-1"])

    @inlineCallbacks
    def run_script(self, name: str, *args: str) -> Any:
        """Start ``python examples/<name>.py --port 0 ...``; its URL once it listens."""
        protocol = _FirstLine()
        env = child_env()
        process = reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, str(EXAMPLES / f"{name}.py"), "--port", "0", *args],
            env=env,
            path=str(ROOT),
        )

        def stop() -> Deferred[None]:
            if protocol.ended.called:
                return protocol.ended
            process.signalProcess("TERM")
            return protocol.ended

        self.addCleanup(stop)
        line = yield protocol.line
        self.assertTrue(line.startswith("listening on http://127.0.0.1:"), line)
        return line.removeprefix("listening on ").rstrip("/")

    @inlineCallbacks
    def test_static_script(self) -> Any:
        """python examples/embed_static.py serves a directory behind the guest."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        (directory / "page.txt").write_bytes(b"from the script\n")
        url = yield self.run_script("embed_static", "--path", str(directory))
        status, headers, body = yield self.fetch("GET", url + "/page.txt")
        self.assertEqual((status, body), (200, b"from the script\n"))
        self.assertEqual(headers.getRawHeaders("referrer-policy"), ["no-referrer"])

    @inlineCallbacks
    def test_wsgi_script(self) -> Any:
        """python examples/embed_wsgi.py serves the WSGI app behind the guest."""
        url = yield self.run_script("embed_wsgi")
        status, headers, body = yield self.fetch("GET", url + "/hello")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["request_id"], "req-1")
        self.assertEqual(headers.getRawHeaders("x-request-id"), ["req-1"])
