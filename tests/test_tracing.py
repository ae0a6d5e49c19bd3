"""OpenTelemetry traces: a server span per request, spans per guest and guest call, traceparent to --proxy."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Generator
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource

from twisted_httpwasm import Guest, GuestResource
from twisted_httpwasm.web.proxy import ProxyResource
from twisted_httpwasm.web.site import GuestSite
from twisted_httpwasm.web.tracing import GuestTracing

from .support import NOOP_RESPONSE, ServerTestCase, module, poll
from .test_twistd import DEADLINE, HEADER_GUEST, TwistdTestCase, accepts_connections

#: Passes every request on.
PASS_GUEST = '(func (export "handle_request") (result i64) (i64.const 1))' + NOOP_RESPONSE

#: Traps in handle_request.
TRAP_GUEST = '(func (export "handle_request") (result i64) unreachable)' + NOOP_RESPONSE

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CLIENT_HEADERS = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}


class TraceparentBackend(Resource):
    """A --proxy backend that keeps the traceparent headers it received."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[bytes | None] = []

    def render(self, request: Any) -> bytes:
        self.received.append(request.getHeader(b"traceparent"))
        return b"backend"


def traceparents(backend: TraceparentBackend) -> list[tuple[str, str]]:
    """(trace id, parent span id) of each W3C traceparent the backend received (version 00)."""
    found = []
    for header in backend.received:
        assert header is not None
        version, trace_id, span_id, flags = header.decode().split("-")
        assert version == "00" and len(flags) == 2, header
        found.append((trace_id, span_id))
    return found


class TracingTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = GuestTracing(provider)

    def serve_traced(self, guests: list[Guest], downstream: Any) -> str:
        root = downstream
        for guest in reversed(guests):
            root = GuestResource(guest, root)
            self.tracing.watch(guest)
        site = GuestSite(root)
        self.tracing.install(site)
        return self.listen(site)

    @inlineCallbacks
    def finished_spans(self, count: int) -> Generator[Any, Any, list[Any]]:
        """The spans exported, once there are ``count`` (guest spans end after the response)."""
        if not (yield poll(lambda: len(self.exporter.get_finished_spans()) >= count, 5)):
            self.fail(f"spans: {[span.name for span in self.exporter.get_finished_spans()]}")
        return list(self.exporter.get_finished_spans())

    @inlineCallbacks
    def test_chain_of_two_guests_and_a_proxy(self) -> Generator[Any, Any, None]:
        """One request through two guests and --proxy: the span tree, and the backend gets the same trace id.

        server (child of the client's traceparent) -> guest outer, guest inner, downstream;
        each guest -> handle_request, handle_response.
        """
        backend = TraceparentBackend()
        proxy = ProxyResource(self.serve(backend), timeout=10)
        self.addCleanup(proxy.close)
        outer = Guest(module(PASS_GUEST), name="outer", cache=False)
        inner = Guest(module(PASS_GUEST), name="inner", cache=False)
        url = self.serve_traced([outer, inner], proxy)

        status, _, body = yield self.fetch(
            "GET", url + "/path", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
        self.assertEqual((status, body), (200, b"backend"))
        spans = yield self.finished_spans(8)
        self.assertEqual(len(spans), 8, [span.name for span in spans])
        by_name: dict[str, list[Any]] = {}
        for span in spans:
            by_name.setdefault(span.name, []).append(span)
        (server,) = by_name["GET"]
        self.assertEqual(server.kind, SpanKind.SERVER)
        self.assertEqual(format(server.context.trace_id, "032x"), CLIENT_TRACE)
        self.assertEqual(format(server.parent.span_id, "016x"), CLIENT_SPAN)
        self.assertEqual(server.attributes["http.response.status_code"], 200)
        self.assertEqual(server.attributes["httpwasm.outcome"], "passed")
        for span in spans:
            self.assertEqual(span.context.trace_id, server.context.trace_id, span.name)

        guests = {span.attributes["httpwasm.guest"]: span for span in by_name["guest outer"] + by_name["guest inner"]}
        self.assertEqual(set(guests), {"outer", "inner"})
        for name, span in guests.items():
            self.assertEqual(span.parent.span_id, server.context.span_id, name)
            self.assertEqual(span.attributes["httpwasm.outcome"], "passed")
            self.assertEqual(span.attributes["http.response.status_code"], 200)
            calls = sorted(
                call.name for call in spans if call.parent is not None and call.parent.span_id == span.context.span_id
            )
            self.assertEqual(calls, ["handle_request", "handle_response"], name)
        (downstream,) = by_name["downstream"]
        self.assertEqual(downstream.parent.span_id, server.context.span_id)
        self.assertEqual(downstream.attributes["httpwasm.guest"], "inner")
        inner_calls = {call.name: call for call in spans if call.parent.span_id == guests["inner"].context.span_id}
        self.assertLessEqual(inner_calls["handle_request"].end_time, downstream.start_time)
        self.assertLessEqual(downstream.end_time, inner_calls["handle_response"].start_time)

        self.assertEqual(traceparents(backend), [(CLIENT_TRACE, f"{server.context.span_id:016x}")])

    @inlineCallbacks
    def test_a_request_without_traceparent_starts_a_trace(self) -> Generator[Any, Any, None]:
        """No traceparent from the client: a new trace, whose id the backend receives."""
        backend = TraceparentBackend()
        proxy = ProxyResource(self.serve(backend), timeout=10)
        self.addCleanup(proxy.close)
        url = self.serve_traced([Guest(module(PASS_GUEST), name="only", cache=False)], proxy)
        status, _, _ = yield self.fetch("GET", url + "/")
        self.assertEqual(status, 200)
        spans = yield self.finished_spans(5)
        (server,) = [span for span in spans if span.kind == SpanKind.SERVER]
        self.assertIsNone(server.parent)
        context = server.context
        self.assertEqual(traceparents(backend), [(f"{context.trace_id:032x}", f"{context.span_id:016x}")])

    @inlineCallbacks
    def test_a_trap_marks_its_spans_as_errors(self) -> Generator[Any, Any, None]:
        """A guest that traps: its call span and guest span have status ERROR, the server span too (500)."""
        url = self.serve_traced([Guest(module(TRAP_GUEST), name="trap", cache=False)], Resource())
        status, _, _ = yield self.fetch("GET", url + "/")
        self.assertEqual(status, 500)
        spans = yield self.finished_spans(3)
        by_name = {span.name: span for span in spans}
        self.assertEqual(set(by_name), {"GET", "guest trap", "handle_request"})
        self.assertEqual(by_name["handle_request"].attributes["httpwasm.error"], "trap")
        for span in spans:
            self.assertEqual(span.status.status_code, StatusCode.ERROR, span.name)
        self.assertEqual(by_name["guest trap"].attributes["httpwasm.outcome"], "trapped")


class TwistdTracingTests(TwistdTestCase):
    @inlineCallbacks
    def test_otel_option_passes_the_trace_to_the_proxy_backend(self) -> Generator[Any, Any, None]:
        """twistd httpwasm --otel --proxy: the backend receives the client's trace id in a fresh traceparent."""
        os.environ["OTEL_TRACES_EXPORTER"] = "none"  # traced, exported nowhere
        self.addCleanup(os.environ.pop, "OTEL_TRACES_EXPORTER", None)
        backend = TraceparentBackend()
        url = yield self.start_server(
            "--otel", "--guest", self.guest_file(HEADER_GUEST), "--proxy", self.serve(backend)
        )
        status, _, _ = yield self.fetch(
            "GET", url + "/", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
        self.assertEqual(status, 200)
        ((trace_id, parent),) = traceparents(backend)
        self.assertEqual(trace_id, CLIENT_TRACE)
        self.assertNotEqual(parent, CLIENT_SPAN)  # the server span's id: this hop is part of the trace

    @inlineCallbacks
    def test_without_otel_the_clients_traceparent_passes_untouched(self) -> Generator[Any, Any, None]:
        """Without --otel (and no OTEL_* variables) the proxy forwards the client's traceparent as it is."""
        backend = TraceparentBackend()
        url = yield self.start_server("--guest", self.guest_file(HEADER_GUEST), "--proxy", self.serve(backend))
        status, _, _ = yield self.fetch(
            "GET", url + "/", headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(traceparents(backend), [(CLIENT_TRACE, CLIENT_SPAN)])


def closed_port() -> int:
    """A loopback port nothing listens on (a collector that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class TracingVisibleAndNeverBlockingTests(TwistdTestCase):
    """Under real twistd: tracing says where spans go; an unreachable collector never blocks the shutdown."""

    def environ(self, **variables: str) -> None:
        for name, value in variables.items():
            self.addCleanup(os.environ.pop, name, None)
            os.environ[name] = value

    @inlineCallbacks
    def test_unreachable_collector(self) -> Generator[Any, Any, None]:
        """Startup names the collector; at SIGTERM the port closes first, a request then is refused, the
        flush is given up after the (bounded) flush timeout, and twistd exits."""
        collector = f"http://127.0.0.1:{closed_port()}/v1/traces"
        self.environ(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=collector)
        url = yield self.start_server(
            "--otel", "--guest", self.guest_file(HEADER_GUEST), "--class", "tests.test_twistd.Hello",
            "--shutdown-timeout", "2",
        )  # fmt: skip
        port = int(url.rsplit(":", 1)[1])
        status, _, _ = yield self.fetch("GET", url + "/traced")  # a span to export
        self.assertEqual(status, 200)
        self.assertIn(f"httpwasm: tracing on: spans exported with OTLP/HTTP to {collector}", self.server.output())

        self.server.process.terminate()
        closed = f"Port {port} Closed"
        self.assertTrue((yield poll(lambda: closed in self.server.output() or self.server.exited(), DEADLINE)))
        # While the exporter tries the collector, the port is closed: a new request is refused, not left waiting.
        self.assertFalse((yield accepts_connections(port)))
        self.assertTrue((yield poll(self.server.exited, DEADLINE)), self.server.output())
        output = self.server.output()
        self.assertEqual(self.server.process.returncode, 0, output)
        given_up = "httpwasm: tracing: the last spans were not exported within 2.0 s"
        self.assertIn(given_up, output)
        self.assertLess(output.index(closed), output.index(given_up))  # listening stopped before the flush
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_console_exporter_is_one_log_event_per_span(self) -> Generator[Any, Any, None]:
        """OTEL_TRACES_EXPORTER=console: each span is one log line of JSON, not one event per line of JSON."""
        self.environ(OTEL_TRACES_EXPORTER="console")
        url = yield self.start_server(
            "--otel", "--guest", self.guest_file(HEADER_GUEST), "--class", "tests.test_twistd.Hello"
        )
        for path in ("/one", "/two"):
            status, _, _ = yield self.fetch("GET", url + path)
            self.assertEqual(status, 200)
        self.assertIn("httpwasm: tracing on: spans exported to the log, one line per span", self.server.output())
        self.server.process.terminate()
        self.assertTrue((yield poll(self.server.exited, DEADLINE)))
        lines = self.server.output().splitlines()
        spans = [json.loads(line.split("httpwasm: span ", 1)[1]) for line in lines if "httpwasm: span " in line]
        # Per request: the server span, the guest's, its two calls', the downstream's.
        self.assertEqual(len(spans), 10, "\n".join(lines))
        names = {span["name"] for span in spans}
        self.assertLessEqual({"GET", "handle_request", "handle_response", "downstream"}, names)
        # Nothing else of the spans' JSON reached the log (a line of indented JSON would be an event of its own).
        self.assertEqual([line for line in lines if '"span_id"' in line and "httpwasm: span {" not in line], [])
        self.assertEqual([line for line in lines if line.split("] ", 1)[-1].strip() in ("{", "}", "},", "]", "],")], [])
