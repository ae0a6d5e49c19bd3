"""The compiled fast path of the twisted.web side (``web/_fast.c``) against the pure-Python classes.

The whole suite runs a request's filter, sink and interception both ways (the
accelerated variants use the compiled ones, the pure variants the Python
ones).  These tests add what the suite cannot see from outside: the C side's
hot methods, driven straight with generated inputs, leave exactly what the
Python methods leave (the calls made on the request, its headers, the
object's fields, the log), the common request runs none of the Python methods
the C side stands in for, and the other requests run them.
"""

from __future__ import annotations

import functools
import gc
import os
import subprocess
import sys
from typing import Any
from unittest import SkipTest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_httpwasm import Execution, GuestResource
from twisted_httpwasm.runtime import accel
from twisted_httpwasm.web import fast
from twisted_httpwasm.web.filter import PureRequestFilter, RequestFilter
from twisted_httpwasm.web.interception import Interception, PureInterception
from twisted_httpwasm.web.request_context import RequestContext
from twisted_httpwasm.web.sinks import BufferedSink, PureStreamedSink, StreamedSink

from .support import NOOP_RESPONSE, make_guest


def _compiled() -> Any:
    """The compiled filter class; the test is skipped, with the reason, where it is not in use."""
    if not fast.FAST or accel.compiled is None:
        raise SkipTest(f"compiled fast path not in use: {fast.REASON if not fast.FAST else accel.REASON}")
    return fast._FAST_FILTER


class _Channel:
    def __init__(self, calls: list[Any]):
        self._calls = calls

    def abortConnection(self) -> None:
        self._calls.append(("abort",))


class _Request:
    """What a sink and an interception use of twisted.web's ``Request``, recording each call."""

    def __init__(self, method: bytes, code: int, length: list[bytes] | None, encoder: bool, started: int):
        self.calls: list[Any] = []
        self.method = method
        self.uri = b"/p"
        self.code = code
        self.responseHeaders = Headers()
        if length is not None:
            self.responseHeaders.setRawHeaders(b"content-length", length)
        if encoder:
            self._encoder = "gzip"
        self.startedWriting = started
        self.channel = _Channel(self.calls)

    def write(self, data: bytes) -> None:
        self.calls.append(("write", bytes(data)))
        self.startedWriting = 1

    def finish(self) -> None:
        self.calls.append(("finish",))

    def processingFailed(self, reason: Any) -> None:
        self.calls.append(("processingFailed",))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.calls.append(("registerProducer",))

    def unregisterProducer(self) -> None:
        self.calls.append(("unregisterProducer",))


_LENGTHS = st.one_of(
    st.none(),
    st.builds(lambda n: [b"%d" % n], st.integers(0, 40)),
    st.sampled_from([[b""], [b"abc"], [b"12", b"34"], [b"0"], [b"1" * 25], [b" 5"], [b"\xd9\xa3"], []]),
)
_DATA = st.one_of(
    st.binary(max_size=24),
    st.binary(max_size=24).map(bytearray),
    st.binary(max_size=24).map(memoryview),
)
_STEPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _DATA),
        st.tuples(st.just("close"), st.none()),
        st.tuples(st.just("downstream_finished"), st.none()),
    ),
    max_size=5,
)
_ENDINGS = st.sampled_from(["complete", "cut", "none"])


def _observe(calls: list[Any]) -> Any:
    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "httpwasm":
            calls.append(("log", event["log_format"], event.get("what"), event.get("length"), event.get("action")))

    return observer


def _run_sink(
    sink_type: Any,
    method: bytes,
    code: int,
    length: Any,
    encoder: bool,
    started: int,
    prefix: bytes,
    steps: Any,
    end: str,
) -> tuple[Any, ...]:
    request = _Request(method, code, None if length is None else list(length), encoder, started)
    sink = sink_type(request, prefix, "g")
    events: list[Any] = []
    observer = _observe(events)
    globalLogPublisher.addObserver(observer)
    try:
        for what, data in [*steps, (end, None)]:
            try:
                if what == "write":
                    sink.write(data)
                elif what == "close":
                    sink.open = False
                elif what in ("downstream_finished", "complete", "cut"):
                    getattr(sink, what)()
            except Exception as error:  # noqa: BLE001 - both sides must fail alike
                request.calls.append(("raised", type(error).__name__, str(error)))
    finally:
        globalLogPublisher.removeObserver(observer)
    fields = tuple(
        getattr(sink, name)
        for name in ("prefix", "open", "_held", "_declared", "_accepted", "_mismatch_logged", "started")
    )
    return request.calls, list(request.responseHeaders.getAllRawHeaders()), fields, events


class SinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fast_sink = _compiled().sink_type

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
        code=st.sampled_from([200, 204, 304, 100, 101, 199, 404, 500]),
        length=_LENGTHS,
        encoder=st.booleans(),
        started=st.sampled_from([0, 1]),
        prefix=st.sampled_from([b"", b"pre"]),
        steps=_STEPS,
        end=_ENDINGS,
    )
    def test_the_same_as_the_pure_sink(self, **case: Any) -> None:
        """Any response, any writes: the same calls, headers, fields and log lines as the Python sink."""
        pure = _run_sink(PureStreamedSink, **case)
        compiled = _run_sink(self.fast_sink, **case)
        self.assertEqual(compiled, pure)

    def test_a_body_past_its_length_is_cut_and_logged_once(self) -> None:
        """The case above that matters most, spelled out: the excess is not sent, the held write completes."""
        for sink_type in (PureStreamedSink, self.fast_sink):
            calls, _, fields, events = _run_sink(
                sink_type, b"GET", 200, [b"5"], False, 0, b"", [("write", b"abc"), ("write", b"defgh")], "complete"
            )
            self.assertEqual(calls, [("write", b"abc"), ("write", b"de"), ("finish",)], sink_type)
            self.assertEqual(fields[4], 5)
            self.assertEqual([event[2] for event in events], ["wrote more than"])

    def test_a_field_deleted_from_python(self) -> None:
        """What Python would raise, never a crash: the C side hands such an object to the Python method."""
        for name in ("_held", "_declared", "_accepted", "open", "request", "forward", "prefix"):
            outcomes = []
            for sink_type in (PureStreamedSink, self.fast_sink):
                sink = sink_type(_Request(b"GET", 200, [b"3"], False, 0), b"", "g")
                delattr(sink, name)
                outcome = []
                for call in (functools.partial(sink.write, b"abc"), sink.complete):
                    try:
                        call()
                    except AttributeError as error:
                        outcome.append(str(error).split("'")[-2])  # the attribute named
                    else:
                        outcome.append(None)
                outcomes.append(outcome)
            self.assertEqual(outcomes[1], outcomes[0], name)
            if name not in ("_declared", "forward"):  # written before read, or not read by this response
                self.assertIn(name, outcomes[0])

    def test_a_cycle_through_it_is_collected(self) -> None:
        """The request holds the sink's write and the sink holds the request: the collector frees both."""
        gc.collect()
        before = sum(type(o) is self.fast_sink for o in gc.get_objects())
        for _ in range(100):
            request = _Request(b"GET", 200, None, False, 0)
            sink = self.fast_sink(request, b"", "g")
            request.write = sink.write  # type: ignore[method-assign]
        del request, sink
        gc.collect()
        self.assertEqual(sum(type(o) is self.fast_sink for o in gc.get_objects()), before)

    def test_is_a_streamed_sink(self) -> None:
        self.assertTrue(issubclass(self.fast_sink, StreamedSink))
        self.assertFalse(self.fast_sink.buffered)


def _install(
    interception_type: Any, buffered: bool, chained: bool, context_made: bool
) -> tuple[_Request, Any, Any, Any]:
    request = _Request(b"GET", 200, None, False, 0)
    if context_made:
        request._httpwasm = RequestContext()  # type: ignore[attr-defined]
    outer = None
    if chained:
        outer_sink = PureStreamedSink(request, b"", "outer")  # type: ignore[arg-type]
        outer = interception_type(request, outer_sink, lambda: None, lambda reason: reason)
    sink: Any = (
        BufferedSink(b"", 100, lambda: None, None, None, lambda: None)
        if buffered
        else PureStreamedSink(request, b"", "inner")  # type: ignore[arg-type]
    )

    def finish() -> None:
        pass

    def failed(reason: Any) -> Any:
        return reason

    interception = interception_type(request, sink, finish, failed)
    return request, sink, outer, interception


def _hooks(request: _Request, sink: Any, outer: Any, interception: Any) -> dict[str, Any]:
    """What sits on the request, named by what it is rather than by identity."""
    named: dict[str, Any] = {}
    for name in ("write", "finish", "processingFailed", "registerProducer", "unregisterProducer"):
        value = vars(request).get(name)
        if value is None:
            named[name] = "own"
        elif outer is not None and value == outer.sink.write:
            named[name] = "outer sink"
        elif value == getattr(sink, "write", None) or getattr(value, "__self__", None) is sink:
            named[name] = f"sink.{value.__name__}"
        else:
            named[name] = getattr(value, "__name__", repr(value))
    context = request._httpwasm  # type: ignore[attr-defined]
    named["context"] = (
        "inner"
        if context.interception is interception
        else ("outer" if context.interception is outer and outer is not None else repr(context.interception))
    )
    named["forward"] = getattr(getattr(sink, "forward", None), "__name__", None)
    named["installed"] = interception.installed
    named["saved"] = sorted(interception.saved) if interception.saved is not None else None
    return named


class InterceptionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fast_interception = _compiled().interception_type

    def test_the_same_as_the_pure_interception(self) -> None:
        """Installed and removed, streamed or buffered, alone or over an outer guest's: as the Python one."""
        for buffered in (False, True):
            for chained in (False, True):
                for context_made in (False, True):
                    results = []
                    for interception_type in (PureInterception, self.fast_interception):
                        request, sink, outer, interception = _install(
                            interception_type, buffered, chained, context_made
                        )
                        installed = _hooks(request, sink, outer, interception)
                        interception.remove()
                        removed = _hooks(request, sink, outer, interception)
                        interception.remove()  # again: nothing
                        again = _hooks(request, sink, outer, interception)
                        results.append((installed, removed, again))
                    self.assertEqual(results[1], results[0], (buffered, chained, context_made))

    def test_a_cycle_through_it_is_collected(self) -> None:
        """Installed and never removed (the request, its context and the interception hold each other)."""
        gc.collect()
        before = sum(type(o) is self.fast_interception for o in gc.get_objects())
        for _ in range(100):
            _install(self.fast_interception, False, False, True)
        gc.collect()
        self.assertEqual(sum(type(o) is self.fast_interception for o in gc.get_objects()), before)

    def test_is_an_interception(self) -> None:
        self.assertTrue(issubclass(self.fast_interception, Interception))


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


#: Turns buffer_response on: the request leaves the common case.
BUFFERS = (
    """(func (export "handle_request") (result i64)
         (drop (call $enable_features (i32.const 2)))
         (i64.const 1))""",
    NOOP_RESPONSE,
)
PASSES = ('(func (export "handle_request") (result i64) (i64.const 1))', NOOP_RESPONSE)


class _Queued:
    """A thread pool and a reactor that queue what they are given, for the test to run in order."""

    def __init__(self, queue: list[Any]):
        self._queue = queue

    def callInThreadWithCallback(self, on_result: Any, work: Any) -> None:
        def run() -> None:
            try:
                result = work()
            except Exception as error:  # noqa: BLE001 - handed on, as the thread pool does
                on_result(False, Failure(error))
            else:
                on_result(True, result)

        self._queue.append(run)

    def callFromThread(self, function: Any, *args: Any) -> None:
        self._queue.append(lambda: function(*args))


class FilterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fast_filter = _compiled()
        self.patch(accel, "module", accel.compiled)

    def _serve(self, guest_parts: tuple[str, ...], execution: Execution = Execution.INLINE) -> tuple[bytes, set[str]]:
        """One request through a real ``Site``, and the Python methods of the filter's classes it ran.

        Thread mode runs on a thread pool and a reactor that only queue what they are given; the
        test runs each hop itself, in order, on this thread.
        """
        queue: list[Any] = []
        threaded: dict[str, Any] = {}
        if execution is Execution.THREAD:
            threaded = {"reactor": _Queued(queue), "threadpool": _Queued(queue)}
        resource = GuestResource(make_guest(*guest_parts, execution=execution), _Hello(), **threaded)
        self.assertIs(resource.filter_type, self.fast_filter)
        # No idle timeout: nothing is left on the global reactor for the tests that run after this one.
        channel = Site(resource, timeout=None).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        channel.makeConnection(transport)
        methods = ("__init__", "start", "_after_handle_request", "_downstream_finish", "_after_handle_response")
        watched = {getattr(RequestFilter, name).__code__: f"RequestFilter.{name}" for name in methods}
        for owner, name in [(StreamedSink, n) for n in ("__init__", "write", "complete")] + [
            (Interception, n) for n in ("__init__", "remove")
        ]:
            watched[getattr(owner, name).__code__] = f"{owner.__name__}.{name}"
        ran: set[str] = set()

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code in watched:
                ran.add(watched[frame.f_code])

        sys.setprofile(profile)
        try:
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            while queue:
                queue.pop(0)()
        finally:
            sys.setprofile(None)
            channel.connectionLost(Failure(ConnectionDone()))
        return transport.value(), ran

    def test_the_common_request_runs_none_of_the_python_methods(self) -> None:
        """A guest that passes the request on: the C side does the hot methods itself."""
        response, ran = self._serve(PASSES)
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response)
        self.assertTrue(response.endswith(b"\r\n\r\nhello"), response)
        self.assertEqual(ran, set())

    def test_the_common_request_in_thread_mode(self) -> None:
        """Thread mode too: its start (the body left or detached, the client watched) is in C."""
        response, ran = self._serve(PASSES, Execution.THREAD)
        self.assertTrue(response.endswith(b"\r\n\r\nhello"), response)
        self.assertEqual(ran, set())

    def test_nothing_of_a_request_stays(self) -> None:
        """Once the response is out, its filter, sink and interception are freed (by the collector if need be)."""
        gc.collect()
        types = (self.fast_filter, self.fast_filter.sink_type, self.fast_filter.interception_type)
        before = [sum(type(o) is t for o in gc.get_objects()) for t in types]
        for parts, execution in [(PASSES, Execution.INLINE), (BUFFERS, Execution.INLINE), (PASSES, Execution.THREAD)]:
            self._serve(parts, execution)
        gc.collect()
        self.assertEqual([sum(type(o) is t for o in gc.get_objects()) for t in types], before)

    def test_another_request_runs_them(self) -> None:
        """A guest that buffers the response: the C side hands the request to the Python methods."""
        response, ran = self._serve(BUFFERS)
        self.assertTrue(response.endswith(b"\r\n\r\nhello"), response)
        self.assertEqual(
            ran,
            {
                "RequestFilter._after_handle_request",
                "RequestFilter._downstream_finish",
                "RequestFilter._after_handle_response",
            },
        )


class ChoosingTests(SynchronousTestCase):
    def test_the_filter_follows_the_accelerator(self) -> None:
        """The compiled filter serves with the guest-call accelerator; the pure one without it."""
        compiled = _compiled()
        guest = make_guest(*PASSES)
        self.patch(accel, "module", None)
        self.assertIs(GuestResource(guest, _Hello()).filter_type, PureRequestFilter)
        self.patch(accel, "module", accel.compiled)
        self.assertIs(GuestResource(guest, _Hello()).filter_type, compiled)

    def test_the_startup_line_names_a_pure_web_side(self) -> None:
        """The accelerator built without the fast path (a build that half failed): the startup line says so."""
        if accel.compiled is None:
            raise SkipTest(f"compiled accelerator not in use: {accel.REASON}")
        self.patch(accel, "module", accel.compiled)
        self.patch(fast, "_FAST_FILTER", None)
        self.patch(fast, "REASON", "the compiled fast path is not built (no C compiler at install)")
        self.assertEqual(
            fast.describe(),
            "guest calls: compiled accelerator; twisted.web side: pure Python"
            " (the compiled fast path is not built (no C compiler at install))",
        )
        self.assertIs(GuestResource(make_guest(*PASSES), _Hello()).filter_type, PureRequestFilter)

    def test_the_environment_forces_the_pure_path(self) -> None:
        script = "from twisted_httpwasm.web import fast; print(fast.FAST, fast.REASON, fast.filter_type().__name__)"
        env = dict(os.environ, TWISTED_HTTPWASM_PURE="1")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        self.assertEqual(done.stdout.strip(), "False TWISTED_HTTPWASM_PURE is set PureRequestFilter")

    def test_a_core_type_before_setup_refuses(self) -> None:
        """The C types are only usable once set up: before that, an error rather than a crash."""
        _compiled()
        # The extension alone, without the package (whose import sets it up).
        script = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('_fast', {fast._fast.__file__!r})\n"
            "_fast = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(_fast)\n"
            "assert 'twisted_httpwasm' not in sys.modules\n"
            "try:\n"
            "    _fast.StreamedSinkCore(None, b'', 'g')\n"
            "except RuntimeError as error:\n"
            "    print(error)\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
        self.assertEqual(done.stdout.strip(), "twisted_httpwasm.web._fast: setup() was not called")
