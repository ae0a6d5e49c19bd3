"""Malformed input is the client's error, answered quietly, end-to-end over real sockets.

A client can send bytes that a downstream cannot take (an encoded NUL in the
path: a file name cannot hold one).  That is a 4xx for the client and at most
one short log line, never a 500 with a traceback per request: a traceback per
request is a cheap way to flood the log.  A hypothesis test sends raw request
bytes (method, URI, header names and values) over a real socket to a guest in
front of a static.File and of a simple resource.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.web.resource import Resource
from twisted.web.static import File

from twisted_httpwasm import ProxyResource

from .support import ServerTestCase, TempFilesMixin, execution_variants
from .test_resource import GuestTestMixin, Strings, event_text, port_of

S = Strings()
#: Reads what a guest can read of the request (method, URI, every header name and value, the body).
READER = S.wrap("""
  (func (export "handle_request") (result i64)
    (local $names i64)
    (drop (call $get_method (i32.const 0) (i32.const 1024)))
    (drop (call $get_uri (i32.const 0) (i32.const 4096)))
    (drop (call $get_protocol_version (i32.const 0) (i32.const 64)))
    (drop (call $get_source_addr (i32.const 0) (i32.const 64)))
    (local.set $names (call $get_header_names (i32.const 0) (i32.const 0) (i32.const 16384)))
    (drop (call $read_body (i32.const 0) (i32.const 16384) (i32.const 1024)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
""")


#: What URIs are made of: encoded NUL, dot segments, bad escapes, non-ASCII, delimiters; raw
#: bytes that Twisted refuses itself come up less often, so that most requests reach the guest.
URI_PIECES = [b"a", b"/", b"%00", b"%2e", b"%2E", b"%2f", b"%5c", b"%ff", b"%", b"%g", b"..", b".", b"?", b"#"]
URI_PIECES += [b"&", b"=", b";", b"%c3%a9", b"~", b"*", b"a.txt", b"%0d%0a", b"%20", b"+", b"%01", b"%7f"]
URI_PIECES = URI_PIECES * 4 + [b"\x00", b"\x01", b"\x7f", b"\xff", b"\xc3\xa9"]
METHODS = [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"get", b"BREW", b"X-Y"] * 3
METHODS += [b"G\x00T", b"\xff"]


class Simple(Resource):
    """Answers every path with a short text, whatever the method."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"simple " + request.method


def downstream(directory: Path, proxy: Resource) -> Resource:
    root = Resource()
    root.putChild(b"static", File(str(directory)))
    root.putChild(b"simple", Simple())
    root.putChild(b"proxy", proxy)
    return root


def exchange(port: int, raw: bytes, timeout: float = 5) -> bytes:
    """Send ``raw`` on a fresh connection; everything received until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(raw)
        received = bytearray()
        while True:
            try:
                data = connection.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            received += data
    return bytes(received)


def status_of(response: bytes) -> int | None:
    """The status code of the first response in ``response``; None when nothing came back."""
    if not response:
        return None
    line = response.split(b"\r\n", 1)[0].split(b" ")
    return int(line[1])


def noisy(events: list[dict[str, Any]]) -> list[str]:
    """The events a client alone should never cause: errors and tracebacks."""
    return [
        event_text(event)
        for event in events
        if "log_failure" in event or event.get("log_level") in (LogLevel.error, LogLevel.critical)
    ]


class MalformedInputTestsMixin(GuestTestMixin):
    timeout = 60

    def serve_files(self) -> int:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "a.txt").write_bytes(b"a file\n")
        proxy = ProxyResource(self.serve(Simple()))  # type: ignore[attr-defined]
        self.addCleanup(proxy.close)  # type: ignore[attr-defined]
        return port_of(self.serve_guest(self.guest(READER), downstream(directory, proxy)))  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_encoded_nul_in_the_path_is_a_quiet_400(self):
        """``%00`` in the path, a segment that is not UTF-8, a raw byte no URI may hold (before a
        static.File, a simple resource, a proxy): 400 for each, at most one short line each, no traceback."""
        events = self.capture_log()
        port = self.serve_files()
        paths = [b"/static/a%00.txt", b"/static/%00", b"/simple/x%00y", b"/static/a.txt%00/b", b"/proxy/%00"]
        paths += [b"/static/%ff", b"/proxy/a\x7fb", b"/static/caf\xc3\xa9", b"/simple/\x01"]
        for path in paths:
            raw = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            response = yield deferToThread(exchange, port, raw)
            self.assertEqual(status_of(response), 400, response)
            self.assertNotIn(b"Traceback", response)
        self.assertEqual(noisy(events), [])
        lines = [event_text(event) for event in events if str(event.get("log_namespace")).startswith("httpwasm")]
        self.assertLessEqual(len(lines), len(paths), lines)
        self.assertFalse([line for line in lines if "\n" in line], lines)
        self.assertIn("refusing GET /static/a%00.txt: a NUL byte in the path; answering 400", lines)
        self.assertIn("refusing GET /proxy/a\\x7fb: a byte that a URI cannot hold", "\n".join(lines))
        # The server still serves well-formed requests.
        response = yield deferToThread(exchange, port, b"GET /static/a.txt HTTP/1.0\r\nHost: x\r\n\r\n")
        self.assertEqual((status_of(response), response.endswith(b"a file\n")), (200, True))

    @inlineCallbacks
    def test_no_5xx_and_no_traceback_for_malformed_requests(self):
        """Hypothesis over method, URI bytes, header names and values, sent raw over a socket."""
        events = self.capture_log()
        port = self.serve_files()
        methods = st.sampled_from(METHODS)
        pieces = st.sampled_from(URI_PIECES)
        prefixes = st.sampled_from([b"/static/", b"/simple/", b"/proxy/", b"/", b"", b"*", b"http://x/static/", b"//"])
        uris = st.builds(lambda prefix, rest: prefix + b"".join(rest), prefixes, st.lists(pieces, max_size=8))
        token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789!#$%&'*+.^`|~", min_size=1, max_size=12)
        # A Content-Length or Transfer-Encoding would make the server wait for a body that never comes.
        known = [b"content-type", b"expect", b"range", b"if-modified-since", b"x-user", b"cookie", b"host"]
        names = st.one_of(
            st.sampled_from(known),
            token.map(str.encode),
            st.binary(min_size=1, max_size=8).filter(lambda name: not set(name) & set(b"\r\n:")),
        ).filter(lambda name: name.strip().lower() not in (b"content-length", b"transfer-encoding"))
        special = [b"0", b"-1", b"abc", b"chunked", b"gzip", b"bytes=5-1", b"bytes=a-", b"9" * 30, b"a=b; c"]
        values = st.one_of(
            st.sampled_from(special),
            st.text(max_size=16).map(lambda text: text.encode("utf-8", "replace")),
            st.binary(max_size=16),
        ).filter(lambda value: not set(value) & set(b"\r\n"))
        headers = st.lists(st.tuples(names, values), max_size=2)
        versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"])
        failures: list[str] = []

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(methods, uris, versions, headers)
        @example(b"GET", b"/static/a%00.txt", b"HTTP/1.1", [])  # each once answered 500 or logged a traceback
        @example(b"HEAD", b"/static/%ff", b"HTTP/1.0", [(b"x-user", b"\xff")])
        @example(b"POST", b"/proxy/a.txt%2e\x7f+%g%5c", b"HTTP/1.1", [])
        def check(method: bytes, uri: bytes, version: bytes, headers: list[tuple[bytes, bytes]]) -> None:
            lines = [method + b" " + uri + b" " + version, b"Host: x", b"Connection: close"]
            lines += [name + b": " + value for name, value in headers]
            raw = b"\r\n".join(lines) + b"\r\n\r\n"
            seen = len(events)
            status = status_of(exchange(port, raw))
            # 501 is what RFC 9110 (15.6.2) prescribes for a method the server does not know.
            if (status is not None and status >= 500 and status != 501) or noisy(events[seen:]):
                failures.append(f"{raw!r}: {status}: {noisy(events[seen:])[:1]}")
                raise AssertionError(failures[-1])

        yield deferToThread(check)
        self.assertEqual(failures, [])
        self.assertEqual(noisy(events), [])


globals().update(execution_variants(MalformedInputTestsMixin, TempFilesMixin, ServerTestCase))
