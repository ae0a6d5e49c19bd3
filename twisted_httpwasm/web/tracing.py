"""OpenTelemetry traces: a server span per request, a span per guest and per guest call.

(The ``otel`` extra: ``pip install 'twisted-httpwasm[otel]'``.)  When a request
arrives (:meth:`GuestTracing.request_arrived`, which a :class:`GuestSite` calls
for every request once :meth:`GuestTracing.install` ran) its server span
starts, as the child of the client's W3C ``traceparent`` if it sent one; its
``traceparent`` is then known, and a ``--proxy`` downstream sends it to the
backend (:func:`traceparent_of`).  The guests' spans are made when the request
path says a guest's part is over (the observer call ``request_finished``),
from the times the runtime recorded for each guest call, so tracing costs the
guest calls nothing::

    server span "GET"                        (kind SERVER; status code, outcome of the outermost guest)
      "guest auth"                           (httpwasm.guest, httpwasm.outcome, http.response.status_code)
        "handle_request", "handle_response"  (one per guest call; status ERROR if it trapped)
      "guest router" ...
      "downstream"                           (from the innermost guest's handle_request to its handle_response)

Without a provider given, :meth:`GuestTracing.start` makes one that exports
with OTLP (``OTEL_EXPORTER_OTLP_*`` configure it; ``OTEL_TRACES_EXPORTER=console``
prints spans, ``none`` exports nothing).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from .. import _optional
from ..runtime.observe import add_observer
from ..runtime.state import Phase
from .access_log import after_response

__all__ = [
    "DEFAULT_FLUSH_TIMEOUT",
    "INSTALL_HINT",
    "GuestTracing",
    "TracingService",
    "asked_by_environment",
    "available",
    "enabled_by_environment",
    "traceparent_of",
]

_log = Logger(namespace="httpwasm")

INSTALL_HINT = _optional.refusal("--otel", "otel")
ENVIRONMENT_HINT = _optional.refusal("tracing", "otel")

_TRACE = "_httpwasm_trace"
_TRACEPARENT = "_httpwasm_traceparent"
_PHASES = {Phase.REQUEST: "handle_request", Phase.RESPONSE: "handle_response", Phase.INIT: "init"}
_ENVIRONMENT = ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def available() -> bool:
    """Whether the OpenTelemetry SDK and its OTLP exporter are installed (without importing them)."""
    return _optional.installed("otel")


def asked_by_environment() -> bool:
    """The standard ``OTEL_*`` variables ask for traces (and ``OTEL_SDK_DISABLED`` does not forbid them)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(os.environ.get(name) for name in _ENVIRONMENT)


def enabled_by_environment() -> bool:
    """The ``OTEL_*`` variables ask for traces, and OpenTelemetry is installed."""
    return asked_by_environment() and available()


def traceparent_of(request: Request) -> bytes | None:
    """The W3C ``traceparent`` of ``request``'s server span (for a backend), if it is traced."""
    value: bytes | None = getattr(request, _TRACEPARENT, None)
    return value


def _epoch_ns(monotonic: float, offset: int) -> int:
    return int(monotonic * 1e9) + offset


class _Trace:
    """One request's server span and what its guests' spans hang from."""

    __slots__ = ("context", "downstream", "offset", "span")

    def __init__(self, span: Any, context: Any):
        self.span = span
        self.context = context
        #: Nanoseconds from time.monotonic() to the epoch: one per request, so its spans line up exactly.
        self.offset = time.time_ns() - time.monotonic_ns()
        #: The downstream's (start, end, guest): between the innermost guest's two calls.
        self.downstream: tuple[float, float, str] | None = None


class _HeaderGetter:
    """Reads twisted.web request headers for the W3C propagator."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = carrier.getRawHeaders(key.encode("latin-1"))
        return [value.decode("latin-1") for value in values] if values else None

    def keys(self, carrier: Any) -> list[str]:
        return [name.decode("latin-1").lower() for name, _ in carrier.getAllRawHeaders()]


class GuestTracing:
    """Spans per request, guest and guest call; an observer for :class:`~twisted_httpwasm.runtime.guest.Guest`.

    ``tracer_provider``: an OpenTelemetry ``TracerProvider`` (with an
    in-memory exporter in tests); without one, :meth:`start` makes the
    standard one.
    """

    def __init__(self, tracer_provider: Any = None, reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        self.provider = tracer_provider
        self._own_provider = tracer_provider is None
        self._tracer: Any = None
        if tracer_provider is not None:
            self._tracer = tracer_provider.get_tracer("twisted_httpwasm")
        propagation = _optional.require("opentelemetry.trace.propagation.tracecontext", "otel", "tracing")
        self._propagator = propagation.TraceContextTextMapPropagator()
        self._getter: Any = _HeaderGetter()

    def start(self) -> None:
        """Make the OTLP-exporting provider, if none was given (after twistd forked: it starts a thread).

        Says in one log line that tracing is on and where the spans go.
        """
        if self._tracer is not None:
            return
        _optional.require("opentelemetry.sdk.trace", "otel", "tracing")
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or "twisted-httpwasm"})
        # No atexit flush: TracingService flushes, bounded; an unreachable collector must not hold up the exit.
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
        exporter: SpanExporter | None = None
        if kind == "console":
            # One compact JSON line per span, as one log event (not one event per line of indented JSON).
            out: Any = _SpanLog(self.reactor)
            exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
            where = "to the log, one line per span (OTEL_TRACES_EXPORTER=console; for debugging)"
        elif kind == "none":
            where = "nowhere (OTEL_TRACES_EXPORTER=none)"
        else:
            exporting = _optional.require("opentelemetry.exporter.otlp.proto.http.trace_exporter", "otel", "tracing")
            exporter = exporting.OTLPSpanExporter()
            where = f"with OTLP/HTTP to {getattr(exporter, '_endpoint', None) or 'the OTLP endpoint'}"
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        self.provider = provider
        self._tracer = provider.get_tracer("twisted_httpwasm")
        _log.info("httpwasm: tracing on: spans exported {where}", where=where)

    def stop(self) -> None:
        """Export what is left and stop the provider this made (blocks: run it off the reactor thread)."""
        if self._own_provider and self.provider is not None:
            self.provider.shutdown()

    def watch(self, guest: Any) -> None:
        """Trace ``guest``'s requests (its observer, kept with any other)."""
        add_observer(guest, self)

    def install(self, site: Any) -> None:
        """Start a server span for every request ``site`` receives (a :class:`GuestSite`)."""
        hooks = list(getattr(site, "request_hooks", ()))
        hooks.append(self.request_arrived)
        site.request_hooks = tuple(hooks)

    # -- the server span ----------------------------------------------------------------

    def request_arrived(self, request: Request) -> None:
        """Start ``request``'s server span (child of the client's ``traceparent``) before any guest runs."""
        tracer = self._tracer
        if tracer is None or hasattr(request, _TRACE):
            return
        from opentelemetry import trace

        parent = self._propagator.extract(request.requestHeaders, getter=self._getter)
        method = request.method.decode("latin-1")
        span = tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER)
        span.set_attribute("http.request.method", method)
        span.set_attribute("url.path", request.path.decode("latin-1"))
        inside = trace.set_span_in_context(span)
        setattr(request, _TRACE, _Trace(span, inside))
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=inside)  # the W3C header, as OpenTelemetry writes it
        if "traceparent" in carrier:
            setattr(request, _TRACEPARENT, carrier["traceparent"].encode("ascii"))
        request.notifyFinish().addBoth(self._request_done, request)

    def _request_done(self, result: object, request: Request) -> None:
        # Ended once the guests' observers (told at the same moment) have set the outcome on it.
        self.reactor.callLater(0, self._end_server_span, result, request, time.time_ns())

    def _end_server_span(self, result: object, request: Request, ended: int) -> None:
        from opentelemetry.trace import Status, StatusCode

        record: _Trace = getattr(request, _TRACE)
        span = record.span
        code = int(request.code)
        span.set_attribute("http.response.status_code", code)
        if result is not None:  # a Failure: the client went away
            span.set_attribute("httpwasm.client_gone", True)
        if code >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=ended)

    # -- the observer -------------------------------------------------------------

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None:
        """The guest's span and its calls' spans, after the fact, with the times the runtime recorded."""
        if self._tracer is None:
            return
        now = time.monotonic()
        # The guest span carries the response's status, which may be set after the guest's part ended.
        after_response(request, lambda: self._guest_spans(guest, request, state, outcome, started, now))

    def _guest_spans(self, guest: Any, request: Any, state: Any, outcome: str, started: float, now: float) -> None:
        from opentelemetry.trace import Status, StatusCode

        tracer = self._tracer
        record: _Trace | None = getattr(request, _TRACE, None) if request is not None else None
        offset = record.offset if record is not None else time.time_ns() - time.monotonic_ns()
        parent = record.context if record is not None else None
        if record is not None and record.span.is_recording():
            record.span.set_attribute("httpwasm.outcome", outcome)  # the last guest to finish is the outermost
        span = tracer.start_span(f"guest {guest.name}", context=parent, start_time=_epoch_ns(started, offset))
        span.set_attribute("httpwasm.guest", guest.name)
        span.set_attribute("httpwasm.outcome", outcome)
        span.set_attribute("http.response.status_code", int(getattr(request, "code", 0) or 0))
        if outcome not in ("passed", "answered"):
            span.set_status(Status(StatusCode.ERROR, outcome))
        from opentelemetry import trace

        inside = trace.set_span_in_context(span)
        calls = list(getattr(state, "calls", ()))
        for phase, begun, ended, failed in calls:
            call = tracer.start_span(_PHASES.get(phase, "call"), context=inside, start_time=_epoch_ns(begun, offset))
            call.set_attribute("httpwasm.guest", guest.name)
            if failed is not None:
                call.set_attribute("httpwasm.error", failed)
                call.set_status(Status(StatusCode.ERROR, failed))
            call.end(end_time=_epoch_ns(ended, offset))
        request_calls = [c for c in calls if c[0] is Phase.REQUEST]
        response_calls = [c for c in calls if c[0] is Phase.RESPONSE]
        if record is not None and request_calls and response_calls:
            # Between a guest's two calls its downstream ran; the innermost guest's is the downstream itself.
            begun, ended = request_calls[-1][2], response_calls[0][1]
            if record.downstream is None:
                self.reactor.callLater(0, self._downstream_span, record)  # once every guest told
                record.downstream = (begun, ended, guest.name)
            elif begun >= record.downstream[0] and ended <= record.downstream[1]:
                record.downstream = (begun, ended, guest.name)
        span.end(end_time=_epoch_ns(now, offset))

    def _downstream_span(self, record: _Trace) -> None:
        if record.downstream is None:
            return
        begun, ended, guest = record.downstream
        offset = record.offset
        span = self._tracer.start_span("downstream", context=record.context, start_time=_epoch_ns(begun, offset))
        span.set_attribute("httpwasm.guest", guest)  # the innermost guest, in front of it
        span.end(end_time=_epoch_ns(ended, offset))


class _SpanLog:
    """A file for ConsoleSpanExporter: each line it writes (one span) is one log event, on the reactor thread.

    The exporter writes from its own thread; the events are logged in order, before
    the flush at shutdown is told it ended (``callFromThread`` keeps the order).
    """

    def __init__(self, reactor: Any):
        self.reactor = reactor

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                self.reactor.callFromThread(_log.info, "httpwasm: span {span}", span=line)
        return len(text)

    def flush(self) -> None:
        return None


#: Seconds the spans left at shutdown may take to export (at most --shutdown-timeout).
DEFAULT_FLUSH_TIMEOUT = 3.0


class TracingService(service.Service):
    """Starts the tracer provider when the server starts (after twistd forked), flushes it when it stops.

    The flush waits for ``site``'s drain (its requests' spans are exported
    too), runs in a thread of its own (an exporter blocks while it sends) and
    is given up after ``flush_timeout`` seconds: a collector that does not
    answer costs the shutdown that long at most, and the reactor goes on
    meanwhile (the listening ports are closed, requests in flight answered).
    """

    def __init__(
        self,
        tracing: GuestTracing,
        site: Any = None,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
    ):
        self.tracing = tracing
        self.site = site
        self.flush_timeout = flush_timeout

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        self.tracing.start()

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        reactor = self.tracing.reactor
        # One turn later: the services stopped after this one (the drain) have begun by then.
        waiting: Deferred[None] = deferLater(reactor, 0, lambda: None)
        waiting.addCallback(lambda _: self._drained())
        waiting.addCallback(lambda _: self._flush())
        return waiting

    def _drained(self) -> Deferred[Any] | None:
        in_flight = getattr(self.site, "_in_flight", None)
        if in_flight is None or not in_flight.draining:
            return None
        drained: Deferred[Any] = in_flight.drain(None)  # the drain under way (its timeout is the drain's)
        return drained

    def _flush(self) -> Deferred[None]:
        reactor = self.tracing.reactor
        done: Deferred[None] = Deferred()

        def finished(error: str | None) -> None:
            if done.called:
                return  # given up already
            if error is not None:
                _log.warn("httpwasm: tracing: exporting the last spans failed: {error}", error=error)
            done.callback(None)

        def flush() -> None:
            try:
                self.tracing.stop()
            except Exception as error:  # noqa: BLE001 - an exporter that cannot flush must not stop the shutdown
                reactor.callFromThread(finished, f"{type(error).__name__}: {error}")
            else:
                reactor.callFromThread(finished, None)

        threading.Thread(target=flush, name="httpwasm-trace-flush", daemon=True).start()

        def given_up(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            _log.warn(
                "httpwasm: tracing: the last spans were not exported within {timeout} s "
                "(is the collector reachable?); stopping without them",
                timeout=self.flush_timeout,
            )

        done.addTimeout(self.flush_timeout, reactor)
        done.addErrback(given_up)
        return done
