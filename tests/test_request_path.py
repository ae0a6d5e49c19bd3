"""The request path's parts: the guest session (pinning), the failure policy, and what observers hear."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from tests.support import (
    NOOP_RESPONSE,
    ServerTestCase,
    execution_variants,
    guest_path_variants,
    make_guest,
    request_state,
)
from twisted_httpwasm import Execution, FailurePolicy, GuestResource
from twisted_httpwasm.runtime.guest import GuestTrap
from twisted_httpwasm.runtime.observe import Outcome
from twisted_httpwasm.runtime.state import BodyTooLarge

PASS_ON = '(func (export "handle_request") (result i64) (i64.const 1))'
ANSWER = '(func (export "handle_request") (result i64) (i64.const 0))'
TRAP_IN_REQUEST = '(func (export "handle_request") (result i64) (unreachable))'


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello\n"


class GuestSessionTests(SynchronousTestCase):
    def test_instance_stays_pinned_until_handle_response(self) -> None:
        """A guest that passes the request on keeps its instance until handle_response ran."""
        guest = make_guest(PASS_ON, NOOP_RESPONSE)
        state = request_state()
        session = guest.session(state)
        self.assertTrue(session.handle_request())
        self.assertEqual(guest.pool.stats.in_use, 1)
        state.enter_response_phase(200)
        session.handle_response()
        self.assertEqual(guest.pool.stats.in_use, 0)

    def test_answering_guest_gives_the_instance_back_at_once(self) -> None:
        """next=0: no handle_response follows, so the instance goes back with handle_request's result."""
        guest = make_guest(ANSWER, NOOP_RESPONSE)
        session = guest.session(request_state())
        self.assertFalse(session.handle_request())
        self.assertEqual(guest.pool.stats.in_use, 0)

    def test_close_is_idempotent(self) -> None:
        """close() gives the instance back once, however often it is called (every ending calls it)."""
        guest = make_guest(PASS_ON, NOOP_RESPONSE)
        session = guest.session(request_state())
        session.handle_request()
        session.close()
        session.close()
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.idle), (0, 1))

    def test_trap_discards_the_instance(self) -> None:
        """A trapping call unpins its instance and the pool discards it, never lends it again."""
        guest = make_guest(TRAP_IN_REQUEST, NOOP_RESPONSE)
        session = guest.session(request_state())
        self.assertRaises(GuestTrap, session.handle_request)
        session.close()
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.discarded), (0, 1))

    def test_the_pool_s_bookkeeping(self) -> None:
        """Sessions keep the pool's counts, and a release drops the instances idle past the timeout."""
        guest = make_guest(PASS_ON, NOOP_RESPONSE)
        now = [0.0]
        guest.pool._clock = lambda: now[0]
        sessions = [guest.session(request_state()) for _ in range(3)]
        for session in sessions:
            self.assertTrue(session.handle_request())
        stats = guest.pool.stats
        self.assertEqual((stats.created, stats.in_use, stats.peak_in_use, stats.idle), (3, 3, 3, 0))
        for session in sessions:
            session.state.enter_response_phase(200)
            session.handle_response()
        self.assertEqual((stats.in_use, stats.idle), (0, 3))
        now[0] = 100.0  # the two instances below the top of the idle stack are past the idle timeout
        session = guest.session(request_state())
        session.handle_request()
        self.assertEqual((stats.in_use, stats.idle), (1, 2))
        session.state.enter_response_phase(200)
        session.handle_response()
        self.assertEqual((stats.in_use, stats.idle, stats.retired, stats.created), (0, 1, 2, 3))

    def test_a_pool_method_of_its_own_is_called(self) -> None:
        """A pool's acquire or release replaced on the pool itself (as tests do) is what the session calls."""
        guest = make_guest(PASS_ON, NOOP_RESPONSE)
        pool = guest.pool
        calls: list[str] = []
        acquire, release = pool.acquire, pool.release

        def own_acquire() -> Any:
            calls.append("acquire")
            return acquire()

        def own_release(instance: Any) -> None:
            calls.append("release")
            release(instance)

        pool.acquire, pool.release = own_acquire, own_release  # type: ignore[method-assign]
        session = guest.session(request_state())
        session.handle_request()
        session.state.enter_response_phase(200)
        session.handle_response()
        self.assertEqual(calls, ["acquire", "release"])

    def test_handle_response_gets_what_handle_request_returned(self) -> None:
        """The high 32 bits of handle_request's result reach handle_response as its req_ctx, with is_error."""
        guest = make_guest(
            '(func (export "handle_request") (result i64) (i64.const 0xfffffffe00000001))',
            '(func (export "handle_response") (param $ctx i32) (param $error i32)'
            " (i32.store (i32.const 0) (local.get $ctx)) (i32.store (i32.const 4) (local.get $error)))",
        )
        instance = guest.pool.acquire()
        guest.pool.release(instance)  # lent again to the session: the most recently returned goes first
        state = request_state()
        session = guest.session(state)
        self.assertTrue(session.handle_request())
        self.assertEqual(session.req_ctx, 0xFFFFFFFE)
        state.enter_response_phase(500, ())
        state.is_error = True
        session.handle_response()
        self.assertEqual(instance.memory.read(0, 8), (-2).to_bytes(4, "little", signed=True) + b"\x01\0\0\0")
        self.assertEqual(guest.pool.stats.in_use, 0)

    def test_handle_response_without_a_pinned_instance(self) -> None:
        """An answering guest's session has nothing left to call: handle_response says so."""
        guest = make_guest(ANSWER, NOOP_RESPONSE)
        session = guest.session(request_state())
        self.assertFalse(session.handle_request())
        error = self.assertRaises(RuntimeError, session.handle_response)
        self.assertIn("without a pinned instance", str(error))

    def test_a_body_over_the_limit_of_a_buffering_instance(self) -> None:
        """An instance that buffers every request body refuses one over the limit uncalled, and is given back."""
        guest = make_guest(
            '(func (export "_initialize") (drop (call $enable_features (i32.const 1))))',
            TRAP_IN_REQUEST,
            NOOP_RESPONSE,
        )
        state = request_state(body=b"x" * 100)
        state.max_buffer_bytes = 10
        session = guest.session(state)
        self.assertRaises(BodyTooLarge, session.handle_request)
        stats = guest.pool.stats
        self.assertEqual((stats.in_use, stats.idle, stats.discarded), (0, 1, 0))


class FailurePolicyTests(SynchronousTestCase):
    def test_names_and_members_are_accepted(self) -> None:
        """on_guest_error takes the enum or its name; the members equal the names the CLI uses."""
        guest = make_guest(PASS_ON, NOOP_RESPONSE)
        self.assertIs(GuestResource(guest, _Hello(), on_guest_error="fail-open").policy, FailurePolicy.FAIL_OPEN)
        resource = GuestResource(guest, _Hello(), on_guest_error=FailurePolicy.FAIL_CLOSED)
        self.assertIs(resource.policy, FailurePolicy.FAIL_CLOSED)
        self.assertEqual(FailurePolicy.FAIL_OPEN, "fail-open")
        self.assertEqual(f"{FailurePolicy.FAIL_CLOSED}", "fail-closed")

    def test_unknown_policy_is_refused_with_the_choices(self) -> None:
        guest = make_guest(PASS_ON, NOOP_RESPONSE)
        error = self.assertRaises(ValueError, GuestResource, guest, _Hello(), on_guest_error="ignore")
        self.assertIn("fail-closed, fail-open", str(error))


class _Recorder:
    def __init__(self) -> None:
        self.outcomes: list[str] = []

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None:
        self.outcomes.append(outcome)


class ObserverTestsMixin:
    """Each request through a guest is reported once, with how it ended."""

    execution: Any

    @inlineCallbacks
    def check(self, body: str, policy: FailurePolicy, expected: str, status: int) -> Any:
        guest = make_guest(body, NOOP_RESPONSE, execution=self.execution)
        recorder = _Recorder()
        guest.observer = recorder
        url = self.serve(GuestResource(guest, _Hello(), on_guest_error=policy))  # type: ignore[attr-defined]
        got, _, _ = yield self.fetch("GET", url + "/")  # type: ignore[attr-defined]
        self.assertEqual(got, status)  # type: ignore[attr-defined]
        self.assertEqual(recorder.outcomes, [expected])  # type: ignore[attr-defined]

    def test_passed_on(self) -> Any:
        return self.check(PASS_ON, FailurePolicy.FAIL_CLOSED, Outcome.PASSED, 200)

    def test_answered(self) -> Any:
        return self.check(ANSWER, FailurePolicy.FAIL_CLOSED, Outcome.ANSWERED, 200)

    def test_trapped_fail_closed(self) -> Any:
        return self.check(TRAP_IN_REQUEST, FailurePolicy.FAIL_CLOSED, Outcome.TRAPPED, 500)

    def test_trapped_fail_open_passes_the_request_on(self) -> Any:
        return self.check(TRAP_IN_REQUEST, FailurePolicy.FAIL_OPEN, Outcome.FAIL_OPEN, 200)


globals().update(execution_variants(ObserverTestsMixin, ServerTestCase))


class RequestHeaderLookupTests(SynchronousTestCase):
    """A guest reading one request header gets it from Twisted's own header map, without a copy of them all."""

    def state(self) -> Any:
        from twisted.web.http_headers import Headers

        from twisted_httpwasm.web.request_changes import TwistedRequestState

        state = TwistedRequestState(method=b"GET", uri=b"/", body=None)
        state.client_headers = Headers({b"X-Multi": [b"a", b"b"], b"User-Agent": [b"ua"]})
        return state

    def test_values_in_any_case_in_order_without_copying_the_headers(self) -> None:
        state = self.state()
        self.assertEqual(state.request_header_values(b"x-multi"), [b"a", b"b"])
        self.assertEqual(state.request_header_values(b"USER-AGENT"), [b"ua"])
        self.assertEqual(state.request_header_values(b"x-absent"), [])
        self.assertIsNone(state._request_headers)
        self.assertFalse(state.touched())

    def test_a_name_no_header_can_have_matches_nothing(self) -> None:
        """Twisted would raise on such a name; the guest sees no value."""
        state = self.state()
        for name in (b"bad name", b"x\x00y", b"x:y"):
            self.assertEqual(state.request_header_values(name), [], name)

    def test_after_a_change_the_changed_headers_answer(self) -> None:
        state = self.state()
        state.request_headers.set(b"X-Multi", b"c")
        self.assertEqual(state.request_header_values(b"x-multi"), [b"c"])
        self.assertEqual(state.request_header_values(b"user-agent"), [b"ua"])
        self.assertTrue(state.touched())


guest_path_variants(globals())


class _Body(Resource):
    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        return request.content.read()


def _echo_site(execution: Execution, **options: Any) -> Any:
    """A ``GuestSite`` (``options``) on a memory clock: the pass-on guest in front of :class:`_Body`."""
    from twisted.internet.testing import MemoryReactorClock

    from twisted_httpwasm import GuestSite

    clock = MemoryReactorClock()
    guest = make_guest(PASS_ON, NOOP_RESPONSE, execution=execution)
    return GuestSite(GuestResource(guest, _Body(), reactor=clock), reactor=clock, **options)


def _connect(site: Any) -> tuple[Any, Any]:
    """One connection to ``site`` over a StringTransport: (the protocol the site built, the transport)."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    protocol = site.buildProtocol(transport.getPeer())
    protocol.makeConnection(transport)
    return protocol, transport


class RequestAttributesTests(SynchronousTestCase):
    """What the adapter leaves on Twisted's request: as little as it can.

    CPython (3.11+) keeps an object's attributes inline while its class has seen at most 30
    attribute names; past that, each new request's attributes move into a dict, and every
    access to them, Twisted's included, costs more (measured: ~3k instructions per request).
    Twisted's own request uses about 25 of those names.
    """

    def serve(self, data: bytes) -> tuple[bytes, set[str]]:
        site = _echo_site(self.execution, max_request_body=1024)
        seen: list[Any] = []
        factory = site.requestFactory

        class Recording(factory):  # type: ignore[misc, valid-type]
            def finish(self) -> None:
                seen.append(self)
                factory.finish(self)

        site.requestFactory = Recording
        channel, transport = _connect(site)
        channel.dataReceived(data)
        return transport.value(), set(vars(seen[-1])) if seen else set()

    execution = Execution.INLINE

    def test_a_request_with_a_declared_length_keeps_one_name(self) -> None:
        """A body of a declared length is not counted by GuestSite: the context is the only name added."""
        response, names = self.serve(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        self.assertTrue(response.endswith(b"\r\n\r\nabc"), response)
        self.assertIn("method", names)  # the request, read after it ended
        self.assertEqual({name for name in names if "httpwasm" in name or name.startswith("_body")}, {"_httpwasm"})

    def test_a_chunked_body_is_still_held_to_the_limit(self) -> None:
        """A body without a declared length is counted as it comes, and refused past the limit (413)."""
        response, _ = self.serve(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"400\r\n"
            + b"x" * 1024
            + b"\r\n1\r\nx\r\n0\r\n\r\n"
        )
        self.assertIn(b" 413 ", response.split(b"\r\n", 1)[0])


class Http1ReadsTests(SynchronousTestCase):
    """Over HTTP/1 the site's HTTP/1-or-2 switch steps out after the first read: reads go to the channel."""

    def test_reads_after_the_first_go_straight_to_the_channel(self) -> None:
        """After one read the protocol's dataReceived is the HTTP/1 channel's; requests split over reads,
        and pipelined ones, are all answered in order."""
        protocol, transport = _connect(_echo_site(Execution.INLINE))
        self.assertNotEqual(protocol.dataReceived, protocol.current_channel.dataReceived)
        protocol.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-")
        self.assertEqual(protocol.dataReceived, protocol.current_channel.dataReceived)
        protocol.dataReceived(b"Length: 1\r\n\r\n1POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n22")
        responses = transport.value().split(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(len(responses), 3, transport.value())
        self.assertTrue(responses[1].endswith(b"\r\n\r\n1"), responses[1])
        self.assertTrue(responses[2].endswith(b"\r\n\r\n22"), responses[2])
