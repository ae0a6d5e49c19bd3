"""GuestResource end-to-end: guest traps, failing downstreams, and clients that go away."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.web.client import ResponseFailed
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm import Execution, Guest

from .support import ServerTestCase, execution_variants
from .test_resource import GuestTestMixin, Strings, log_text, raw_connect, released
from .test_resource_response import HELLO, Chunks, hello


class DownstreamError(Exception):
    """What the failing downstreams below raise."""


class Raises(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        raise DownstreamError("downstream exploded")


class ErrbacksLater(Resource):
    """Fails asynchronously, the usual way: a Deferred errback into request.processingFailed."""

    isLeaf = True

    def __init__(self, write_first: bytes = b""):
        super().__init__()
        self.write_first = write_first

    def render_GET(self, request: Any) -> object:
        if self.write_first:
            request.write(self.write_first)

        def failed(reason: Any) -> None:
            request.processingFailed(reason)  # returns the failure; a Deferred must not keep it

        d: Deferred[None] = Deferred()
        d.addErrback(failed)
        reactor.callLater(0, d.errback, DownstreamError("async downstream failure"))  # type: ignore[attr-defined]
        return NOT_DONE_YET


class BadChild(Resource):
    """Traversal itself fails: getChild raises."""

    def getChild(self, path: bytes, request: Any) -> Resource:
        raise DownstreamError("no child for you")


class Abandoned(Resource):
    """Starts answering, is told the client went away, and then still writes and finishes,
    as a downstream that does not watch notifyFinish would."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: Deferred[None] = Deferred()
        self.late_calls_done: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> object:
        request.setHeader(b"content-type", b"text/plain")
        request.write(b"partial;")

        def lost(_: object) -> None:
            def late() -> None:
                request.write(b"too late")
                request.finish()
                self.late_calls_done.callback(None)

            reactor.callLater(0, late)  # type: ignore[attr-defined]

        request.notifyFinish().addErrback(lost)
        self.rendered.callback(None)
        return NOT_DONE_YET


# -- guests --------------------------------------------------------------------------------

S = Strings()
TRAP_IN_REQUEST = S.wrap(f"""
  ;; /trap...: a host-function trap whose reason names a secret; anything else passes
  (func (export "handle_request") (result i64)
    (drop (call $get_uri (i32.const 100) (i32.const 100)))
    (if (i32.eq (i32.load8_u (i32.const 101)) (i32.const 116))
      (then (call $set_header_value (i32.const 0) {S("s3cret name")} {S("v")})))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
""")


def trap_in_response(features: int) -> str:
    return f"""
  (func (export "handle_request") (result i64)
    (drop (call $enable_features (i32.const {features})))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32) (unreachable))
"""


def log_is_error(features: int) -> str:
    s = Strings()
    return s.wrap(f"""
  (func (export "handle_request") (result i64)
    (drop (call $enable_features (i32.const {features})))
    (i64.const 1))
  (func (export "handle_response") (param $ctx i32) (param $is_error i32)
    (if (local.get $is_error)
      (then (call $log (i32.const 0) {s("handle_response is_error=1")}))
      (else (call $log (i32.const 0) {s("handle_response is_error=0")}))))
""")


class TrapTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_trap_in_handle_request(self):
        """500 with a generic body; the reason is logged, not sent; the instance is discarded
        and the next request gets a fresh one."""
        events = self.capture_log()
        guest = self.guest(TRAP_IN_REQUEST)
        url = self.serve_guest(guest, hello())
        status, _, body, length = yield self.get(url + "/trap")
        self.assertEqual(status, 500)
        self.assertEqual(length, len(body))
        self.assertNotIn(b"s3cret", body)
        self.assertNotIn(b"set_header_value", body)
        text = log_text(events)
        self.assertIn("failed in handle_request", text)
        self.assertIn("s3cret", text)
        stats = guest.pool.stats
        self.assertEqual((stats.discarded, stats.in_use), (1, 0))
        status, _, body, _ = yield self.get(url + "/ok")
        self.assertEqual((status, body), (200, HELLO))
        self.assertEqual((stats.discarded, stats.in_use, stats.created), (1, 0, 2))

    @inlineCallbacks
    def test_trap_in_buffered_handle_response_answers_500(self):
        events = self.capture_log()
        guest = self.guest(trap_in_response(features=2))
        url = self.serve_guest(guest, hello())
        status, _, body, _ = yield self.get(url + "/")
        self.assertEqual(status, 500)
        self.assertNotIn(HELLO, body)
        self.assertNotIn(b"unreachable", body)
        self.assertIn("unreachable", log_text(events))
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (1, 0))

    @inlineCallbacks
    def test_trap_in_streamed_handle_response_cuts_the_response(self):
        """The downstream's status line is already sent: the only signal left is an incomplete response."""
        guest = self.guest(trap_in_response(features=0))
        url = self.serve_guest(guest, hello())
        yield self.assertFailure(self.get(url + "/"), ResponseFailed)
        url = self.serve_guest(guest, Chunks(b"one;", b"two"))
        yield self.assertFailure(self.get(url + "/"), ResponseFailed)
        self.assertEqual((guest.pool.stats.discarded, guest.pool.stats.in_use), (2, 0))


globals().update(execution_variants(TrapTestsMixin, ServerTestCase))


class DownstreamFailureTestsMixin(GuestTestMixin):
    features = 0

    @inlineCallbacks
    def check_failing_downstream(self, downstream: Resource) -> Any:
        events = self.capture_log()
        guest = self.guest(log_is_error(self.features))
        url = self.serve_guest(guest, downstream)
        status, _, body, _ = yield self.get(url + "/child")
        self.assertEqual(status, 500)
        self.assertIn(b"Processing Failed", body)  # Twisted's own answer to a failed resource
        self.assertNotIn(b"exploded", body)
        text = log_text(events)
        self.assertIn("handle_response is_error=1", text)
        self.assertNotIn("handle_response is_error=0", text)
        self.assertEqual(len(self.flushLoggedErrors(DownstreamError)), 1)  # type: ignore[attr-defined]
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.discarded, stats.idle), (0, 0, stats.created))

    def test_downstream_raises(self):
        return self.check_failing_downstream(Raises())

    def test_downstream_errbacks_later(self):
        return self.check_failing_downstream(ErrbacksLater())

    def test_downstream_traversal_raises(self):
        return self.check_failing_downstream(BadChild())

    @inlineCallbacks
    def test_healthy_downstream_is_not_an_error(self):
        events = self.capture_log()
        url = self.serve_guest(self.guest(log_is_error(self.features)), hello())
        status, _, body, _ = yield self.get(url + "/")
        self.assertEqual((status, body), (200, HELLO))
        self.assertIn("handle_response is_error=0", log_text(events))


globals().update(execution_variants(DownstreamFailureTestsMixin, ServerTestCase))


globals().update(
    execution_variants(DownstreamFailureTestsMixin, ServerTestCase, name="BufferedDownstreamFailure", features=2)
)


class PartialFailureTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_streamed_downstream_failing_after_writing_cuts_the_response(self):
        """Part of the body is sent when the downstream fails: the response is cut rather than
        completed with an error page glued to the partial body."""
        events = self.capture_log()
        guest = self.guest(log_is_error(0))
        url = self.serve_guest(guest, ErrbacksLater(write_first=b"partial;"))
        yield self.assertFailure(self.get(url + "/"), ResponseFailed)
        self.assertIn("handle_response is_error=1", log_text(events))
        self.assertEqual(len(self.flushLoggedErrors(DownstreamError)), 1)  # type: ignore[attr-defined]
        self.assertEqual((guest.pool.stats.in_use, guest.pool.stats.discarded), (0, 0))


globals().update(execution_variants(PartialFailureTestsMixin, ServerTestCase))


class DisconnectTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def check_client_goes_away(self, features: int) -> Any:
        guest = self.guest(log_is_error(features))
        downstream = Abandoned()
        url = self.serve_guest(guest, downstream)
        back_in_pool = released(guest)
        is_error_logged = self.wait_for_log("handle_response is_error=1")
        client = yield raw_connect(url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        yield downstream.rendered
        client.transport.abortConnection()
        yield is_error_logged
        yield back_in_pool
        yield downstream.late_calls_done  # they raised nothing (or the test errors)
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.discarded, stats.idle), (0, 0, stats.created))

    def test_client_gone_before_downstream_finished(self):
        """handle_response runs with is_error=1, the instance goes back to the pool, and the
        downstream's late write and finish are swallowed quietly."""
        return self.check_client_goes_away(features=0)

    def test_client_gone_while_response_buffered(self):
        return self.check_client_goes_away(features=2)


globals().update(execution_variants(DisconnectTestsMixin, ServerTestCase))


class ManualThreadPool:
    """A stand-in thread pool that runs each guest call only when the test says so."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []
        self.queued: Deferred[Any] = Deferred()

    def callInThreadWithCallback(self, on_result: Any, work: Any) -> None:
        self.calls.append((on_result, work))
        queued, self.queued = self.queued, Deferred()
        queued.callback(work)

    def run_next(self) -> None:
        from twisted.python.failure import Failure

        on_result, work = self.calls.pop(0)
        try:
            result = work()
        except BaseException:  # noqa: BLE001 - handed on, as a real thread pool does
            on_result(False, Failure())
        else:
            on_result(True, result)


S = Strings()
READ_BODY_THEN_NEXT = S.wrap(f"""
  (func (export "handle_request") (result i64)
    (drop (call $read_body (i32.const 0) (i32.const 1024) (i32.const 1024)))
    (i64.const 1))
  (func (export "handle_response") (param $ctx i32) (param $is_error i32)
    (if (local.get $is_error) (then (call $log (i32.const 0) {S("handle_response is_error=1")}))))
""")


#: Logs handle_response's is_error only; imports nothing else (so it cannot read the request body).
LOG_ONLY = b"""(module
  (import "http_handler" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "handle_response is_error=1")
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param $ctx i32) (param $is_error i32)
    (if (local.get $is_error) (then (call $log (i32.const 0) (i32.const 16) (i32.const 26))))))"""


class DisconnectDuringGuestCallTests(GuestTestMixin, ServerTestCase):
    execution = Execution.THREAD

    @inlineCallbacks
    def test_client_gone_while_handle_request_reads_the_body(self):
        """The client goes away while handle_request runs in a worker: Twisted closes the
        request body on disconnect, yet the guest still reads it without a host error, and
        handle_response runs with is_error=1 on the same instance, which goes back to the pool."""
        from twisted_httpwasm import GuestResource

        events = self.capture_log()
        guest = self.guest(READ_BODY_THEN_NEXT)
        threads = ManualThreadPool()
        url = self.serve(GuestResource(guest, hello(), threadpool=threads))  # type: ignore[arg-type]
        client = yield raw_connect(url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        work = yield threads.queued
        request = work.__self__.state.request  # the queued call is a method of the request's guest session
        self.assertIsNone(request.content)  # kept from Twisted, which closes it when the client leaves
        gone = request.notifyFinish()
        client.transport.abortConnection()
        yield self.assertFailure(gone, Exception)
        threads.run_next()  # handle_request, after the disconnect
        yield deferLater(reactor, 0, lambda: None)  # its continuation comes back through callFromThread
        self.assertEqual(len(threads.calls), 1, log_text(events))
        threads.run_next()  # handle_response
        # The calls ran on this thread, so the guest's log is already in.
        self.assertIn("handle_response is_error=1", log_text(events))
        text = log_text(events)
        self.assertNotIn("internal error", text)
        self.assertNotIn("failed in handle_request", text)
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.discarded, stats.idle), (0, 0, stats.created))


    @inlineCallbacks
    def test_a_guest_that_cannot_read_the_body_leaves_it_on_the_request(self):
        """A guest that imports neither read_body nor enable_features never reads the request body, so
        its call does not take the body off the request: Twisted closes it when the client leaves, and
        the request ends as for any client that left (handle_response with is_error=1)."""
        from twisted_httpwasm import GuestResource

        events = self.capture_log()
        guest = Guest(LOG_ONLY, execution=self.execution)
        self.assertFalse(guest.may_read_request_body)
        threads = ManualThreadPool()
        url = self.serve(GuestResource(guest, hello(), threadpool=threads))  # type: ignore[arg-type]
        client = yield raw_connect(url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        work = yield threads.queued
        request = work.__self__.state.request
        body = request.content
        self.assertIsNotNone(body)
        gone = request.notifyFinish()
        client.transport.abortConnection()
        yield self.assertFailure(gone, Exception)
        self.assertTrue(body.closed)
        threads.run_next()  # handle_request
        yield deferLater(reactor, 0, lambda: None)
        threads.run_next()  # handle_response
        self.assertIn("handle_response is_error=1", log_text(events))
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.discarded, stats.idle), (0, 0, stats.created))

    @inlineCallbacks
    def test_a_failure_on_hearing_the_client_left_is_logged_and_spares_the_other_watchers(self):
        """The filter hears a lost client among the request's finish notifications (not through a
        Deferred of its own): if that fails, the failure is logged and the notifications after it
        still fire, as they would after a failing Deferred."""
        from twisted_httpwasm import GuestResource
        from twisted_httpwasm.web.filter import RequestFilter

        def fails(self: Any, reason: Any) -> None:
            raise RuntimeError("ending failed")

        self.patch(RequestFilter, "_connection_lost", fails)
        events = self.capture_log()
        threads = ManualThreadPool()
        url = self.serve(GuestResource(self.guest(READ_BODY_THEN_NEXT), hello(), threadpool=threads))  # type: ignore[arg-type]
        client = yield raw_connect(url, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        work = yield threads.queued
        gone = work.__self__.state.request.notifyFinish()  # after the filter's
        client.transport.abortConnection()
        yield self.assertFailure(gone, Exception)
        self.assertIn("ending the request of a client that left failed", log_text(events))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class WithHttpStatus(Exception):
    http_status = 503


class FailsWithStatus(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        raise WithHttpStatus("backend unavailable")


class FailureStatusTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_failure_naming_a_status_is_answered_with_it(self):
        """A downstream failure whose exception has ``http_status`` (the proxy's BadGateway)
        gets that status and a short plain body; the guest still saw is_error=1.  It is an
        expected failure: logged as a warning with its reason, not as a traceback."""
        events = self.capture_log()
        guest = self.guest(log_is_error(0))
        url = self.serve_guest(guest, FailsWithStatus())
        status, headers, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (503, b"Service Unavailable\n", len(body)))
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertIn("handle_response is_error=1", log_text(events))
        self.assertIn("backend unavailable; answering 503", log_text(events))
        self.assertEqual(self.flushLoggedErrors(WithHttpStatus), [])  # type: ignore[attr-defined]
        self.assertEqual(guest.pool.stats.in_use, 0)


globals().update(execution_variants(FailureStatusTestsMixin, ServerTestCase))


class ChainedFailureTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_inner_guest_trap_leaves_outer_guest_whole(self):
        """An inner guest that traps in handle_request answers 500; the outer guest still
        runs handle_response on that answer and gets its instance back."""
        from twisted_httpwasm import GuestResource

        events = self.capture_log()
        outer = self.guest(log_is_error(0))
        inner = self.guest(TRAP_IN_REQUEST)
        url = self.serve(GuestResource(outer, GuestResource(inner, hello())))
        status, _, body, _ = yield self.get(url + "/trap")
        self.assertEqual(status, 500)
        self.assertNotIn(b"s3cret", body)
        self.assertIn("handle_response is_error=0", log_text(events))
        self.assertEqual((outer.pool.stats.in_use, inner.pool.stats.in_use), (0, 0))
        self.assertEqual((outer.pool.stats.discarded, inner.pool.stats.discarded), (0, 1))
        status, _, body, _ = yield self.get(url + "/ok")
        self.assertEqual((status, body), (200, HELLO))


globals().update(execution_variants(ChainedFailureTestsMixin, ServerTestCase))


class FailOpenTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_fail_open_trap_in_streamed_handle_response_completes_response(self):
        """fail-open: a trap in handle_response after a sized streamed response lets it finish whole."""
        from twisted_httpwasm import FailurePolicy, GuestResource

        guest = self.guest(trap_in_response(features=0))
        url = self.serve(GuestResource(guest, hello(), on_guest_error=FailurePolicy.FAIL_OPEN))
        status, _, body, length = yield self.get(url + "/")
        self.assertEqual((status, body, length), (200, HELLO, len(HELLO)))
        self.assertEqual((guest.pool.stats.in_use, guest.pool.stats.discarded), (0, 1))


globals().update(execution_variants(FailOpenTestsMixin, ServerTestCase))
