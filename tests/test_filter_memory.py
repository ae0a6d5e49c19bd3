"""The request path driven in memory: no socket, no real thread, no running reactor.

``GuestResource`` is served through treq's ``StubTreq`` (``RequestTraversalAgent``
over an in-memory transport).  In thread mode the resource gets a thread pool
that only queues its work and a reactor whose ``callFromThread`` only queues
its calls: the test runs each hop itself, so it can see what the client got
between the guest's work and its result coming back to the reactor.  Real
sockets and real threads stay in the end-to-end tests (``test_resource*.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from twisted_httpwasm import Execution, Guest, GuestResource

from .support import NOOP_RESPONSE, execution_variants, make_guest

#: Answers by itself: 201, ``x-guest: yes``, ``from the guest``; the next handler is not called.
ANSWERS = (
    '(data (i32.const 0) "x-guest") (data (i32.const 16) "yes") (data (i32.const 32) "from the guest")',
    """(func (export "handle_request") (result i64)
         (call $set_status_code (i32.const 201))
         (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 7) (i32.const 16) (i32.const 3))
         (call $write_body (i32.const 1) (i32.const 32) (i32.const 14))
         (i64.const 0))""",
    NOOP_RESPONSE,
)

#: Rewrites the URI to ``/rewritten?q=1`` and adds ``x-added: 1`` before calling the next handler.
REWRITES_REQUEST = (
    '(data (i32.const 0) "/rewritten?q=1") (data (i32.const 16) "x-added") (data (i32.const 32) "1")',
    """(func (export "handle_request") (result i64)
         (call $set_uri (i32.const 0) (i32.const 14))
         (call $set_header_value (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 1))
         (i64.const 1))""",
    NOOP_RESPONSE,
)

#: Buffers the response, and replaces its body with ``replaced:`` and the body it read.
REWRITES_RESPONSE = (
    '(data (i32.const 0) "replaced:")',
    """(func (export "handle_request") (result i64)
         (drop (call $enable_features (i32.const 2)))
         (i64.const 1))""",
    """(func (export "handle_response") (param i32 i32)
         (local $read i64)
         (local.set $read (call $read_body (i32.const 1) (i32.const 1024) (i32.const 1024)))
         (call $write_body (i32.const 1) (i32.const 0) (i32.const 9))
         (call $write_body (i32.const 1) (i32.const 1024) (i32.wrap_i64 (local.get $read))))""",
)

#: Traps in handle_request.
TRAPS = ('(func (export "handle_request") (result i64) (unreachable))', NOOP_RESPONSE)


def has_result(result: Deferred[Any]) -> bool:
    """Whether ``result`` has its result (not merely called and waiting on another Deferred)."""
    return result.called and not isinstance(result.result, Deferred) and not result.paused


class Downstream(Resource):
    """The next handler: answers ``downstream`` and keeps the URI and ``x-added`` header it saw."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render(self, request: Request) -> bytes:
        self.seen.append((request.uri, request.getHeader(b"x-added")))
        return b"downstream"


class HopReactor(MemoryReactorClock):
    """A memory reactor whose ``callFromThread`` queues the call until the test runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: list[Callable[[], Any]] = []

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.from_threads.append(lambda: f(*args, **kwargs))

    def run_from_threads(self) -> int:
        """Run the queued calls (and any they queue); how many ran."""
        ran = 0
        while self.from_threads:
            self.from_threads.pop(0)()
            ran += 1
        return ran


class QueuedThreadPool:
    """A thread pool that only queues its work; :meth:`run_all` runs it on the calling thread."""

    def __init__(self) -> None:
        self.work: list[tuple[Callable[[bool, Any], None], Callable[[], Any]]] = []

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> None:
        self.work.append((on_result, lambda: f(*args, **kwargs)))

    def run_all(self) -> int:
        """Run the queued work, reporting each result as a pool thread would; how many ran."""
        ran = 0
        while self.work:
            on_result, work = self.work.pop(0)
            try:
                result = work()
            except BaseException:  # noqa: BLE001 - handed over like ThreadPool does
                on_result(False, Failure())
            else:
                on_result(True, result)
            ran += 1
        return ran


class InMemoryRequestPathMixin:
    """Each behaviour of the request path, through an in-memory client."""

    execution: Execution

    def setUp(self) -> None:
        self.reactor = HopReactor()
        self.threadpool = QueuedThreadPool()

    def resource(self, guest: Guest, downstream: Resource) -> GuestResource:
        return GuestResource(guest, downstream, reactor=self.reactor, threadpool=self.threadpool)

    def guest(self, *body: str) -> Guest:
        return make_guest(*body, execution=self.execution, cache=False)

    def settle(self, stub: StubTreq, result: Deferred[Any]) -> Any:
        """Run every hop (pool work, calls back to the reactor, the in-memory transport) until ``result`` fires."""
        for _ in range(100):
            stub.flush()
            if has_result(result):
                break
            if not self.threadpool.run_all() + self.reactor.run_from_threads():
                stub.flush()
                break
        return self.successResultOf(result)

    def fetch(self, resource: GuestResource, url: str = "http://example.com/original") -> tuple[int, Any, bytes]:
        """(status, response, body) of one GET through ``resource``."""
        stub = StubTreq(resource)
        response = self.settle(stub, stub.get(url))
        body = self.settle(stub, stub.content(response))
        return response.code, response, body

    def test_guest_answers_itself_without_the_next_handler(self) -> None:
        """A guest that returns next=0 sends its own status, headers and body; the next handler is not called."""
        downstream = Downstream()
        guest = self.guest(*ANSWERS)
        status, response, body = self.fetch(self.resource(guest, downstream))
        self.assertEqual((status, response.headers.getRawHeaders(b"x-guest"), body), (201, [b"yes"], b"from the guest"))
        self.assertEqual(downstream.seen, [])
        self.assertEqual(guest.pool.stats.in_use, 0)

    def test_next_handler_sees_the_rewritten_request(self) -> None:
        """The URI and request header the guest set are what the next handler sees."""
        downstream = Downstream()
        status, _, body = self.fetch(self.resource(self.guest(*REWRITES_REQUEST), downstream))
        self.assertEqual((status, body), (200, b"downstream"))
        self.assertEqual(downstream.seen, [(b"/rewritten?q=1", b"1")])

    def test_buffered_response_is_rewritten_with_its_new_length(self) -> None:
        """With buffer_response the guest reads the whole response body and replaces it; Content-Length follows."""
        guest = self.guest(*REWRITES_RESPONSE)
        status, response, body = self.fetch(self.resource(guest, Downstream()))
        self.assertEqual((status, body), (200, b"replaced:downstream"))
        self.assertEqual(response.length, 19)  # the client read the Content-Length header
        self.assertEqual(guest.pool.stats.in_use, 0)

    def test_trap_answers_500_and_discards_the_instance(self) -> None:
        """A trap in handle_request answers a plain 500, never calls the next handler, and discards the instance."""
        downstream = Downstream()
        guest = self.guest(*TRAPS)
        status, _, body = self.fetch(self.resource(guest, downstream))
        self.assertEqual((status, body), (500, b"Internal Server Error\n"))
        self.assertEqual(downstream.seen, [])
        self.assertEqual((guest.pool.stats.in_use, guest.pool.stats.discarded), (0, 1))


class ThreadHopsMixin:
    """Thread mode: the guest runs in the pool, and its result must come back through the reactor."""

    def test_nothing_happens_until_the_result_is_back_on_the_reactor(self) -> None:
        """The guest call waits in the pool; after it ran, the next handler is called only once the
        result came back through ``callFromThread``."""
        downstream = Downstream()
        stub = StubTreq(self.resource(self.guest(*REWRITES_REQUEST), downstream))
        result = stub.get("http://example.com/original")
        stub.flush()
        self.assertEqual((len(self.threadpool.work), downstream.seen, has_result(result)), (1, [], False))
        self.threadpool.run_all()
        self.assertEqual((len(self.reactor.from_threads), downstream.seen, has_result(result)), (1, [], False))
        self.reactor.run_from_threads()
        stub.flush()
        self.assertEqual(downstream.seen, [(b"/rewritten?q=1", b"1")])
        self.assertEqual(self.settle(stub, result).code, 200)  # handle_response takes its own hops


class InlineMixin:
    """Inline mode: the guest runs right where the request arrives, with no hop."""

    def test_guest_runs_without_the_pool_or_the_reactor(self) -> None:
        """Inline, the whole exchange completes with the transport alone: nothing is queued anywhere."""
        downstream = Downstream()
        stub = StubTreq(self.resource(self.guest(*REWRITES_REQUEST), downstream))
        result = stub.get("http://example.com/original")
        stub.flush()
        self.assertEqual((self.threadpool.work, self.reactor.from_threads), ([], []))
        self.assertEqual(self.successResultOf(result).code, 200)
        self.assertEqual(downstream.seen, [(b"/rewritten?q=1", b"1")])


globals().update(
    execution_variants(
        InMemoryRequestPathMixin,
        SynchronousTestCase,
        only={Execution.THREAD: ThreadHopsMixin, Execution.INLINE: InlineMixin},
    )
)
