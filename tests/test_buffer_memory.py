"""Buffered bodies give their memory back (issue 10.6).

- A request whose buffered response was aborted by its client is not kept alive
  by reference cycles: it is freed by reference counting alone (the tests run
  with the cyclic garbage collector off), so its buffered body goes with it.
- A process-wide bound on bytes held in ``buffer_response`` buffers: a request
  that would take the total past it is answered 503 with ``Retry-After``.
"""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm import Execution, GuestResource
from twisted_httpwasm.runtime.budget import BufferBudget
from twisted_httpwasm.web.sinks import BufferedSink

from .support import NOOP_RESPONSE, ServerTestCase, execution_variants, make_guest, poll

#: Turns on buffer_response at init and passes every request on.
BUFFERING = (
    '(func (export "_initialize") (drop (call $enable_features (i32.const 2))))'
    '(func (export "handle_request") (result i64) (i64.const 1))' + NOOP_RESPONSE
)

CHUNK = b"x" * 256 * 1024


class SlowBody(Resource):
    """Writes one chunk at once and then one every few milliseconds, ``chunks`` in all.

    With ``together``, the chunks after the first wait until that many requests have arrived, so
    that their bodies overlap however late the scheduler lets the later ones in.
    """

    isLeaf = True

    def __init__(self, chunks: int, every: float = 0.005, together: int = 1):
        super().__init__()
        self.chunks = chunks
        self.every = every
        self.together = together
        self.requests: list[weakref.ref[Any]] = []
        self.started: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> object:
        self.requests.append(weakref.ref(request))
        request.setHeader(b"content-length", b"%d" % (len(CHUNK) * self.chunks))
        self._write(request, self.chunks)
        if not self.started.called:
            self.started.callback(None)
        return NOT_DONE_YET

    def _write(self, request: Any, left: int) -> None:
        if left == 0:
            request.finish()
            if not self.ended.called:
                self.ended.callback(None)
            return
        if left < self.chunks and len(self.requests) < self.together:
            reactor.callLater(self.every, self._write, request, left)
            return
        request.write(CHUNK)
        reactor.callLater(self.every, self._write, request, left - 1)


def raw_get(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return client


class AbortedBufferedDownloadTestsMixin:
    execution: Execution

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_request_is_freed_without_the_cycle_collector(self) -> Any:
        """A client that leaves in the middle of a buffered download: once the downstream is done,
        nothing keeps its Request (and with it the buffered body) alive; reference counting frees it."""
        downstream = SlowBody(chunks=20)
        guest = make_guest(BUFFERING, execution=self.execution)
        url = self.serve_guest(guest, downstream)  # type: ignore[attr-defined]
        client = raw_get(int(url.rsplit(":", 1)[1]))
        yield downstream.started
        client.close()
        yield downstream.ended
        (request,) = downstream.requests
        freed = yield poll(lambda: request() is None, timeout=10)
        holders = [] if freed else [type(r).__name__ for r in gc.get_referrers(request())]
        self.assertTrue(freed, f"the aborted request is still referenced by {holders}")  # type: ignore[attr-defined]


globals().update(execution_variants(AbortedBufferedDownloadTestsMixin, ServerTestCase))


class BufferBudgetTests(ServerTestCase):
    def test_reserve_and_release(self) -> None:
        """Reservations add up to the total; past it they are refused until bytes are released."""
        budget = BufferBudget(100)
        self.assertTrue(budget.reserve(60))
        self.assertFalse(budget.reserve(41))
        self.assertTrue(budget.reserve(40))
        budget.release(60)
        self.assertEqual(budget.held, 40)
        self.assertTrue(budget.reserve(60))

    def test_a_refused_sink_gives_its_bytes_back_at_once(self) -> None:
        """A buffered response that does not fit any more drops what it held at once, so the requests
        still buffering can use it (they do not all fail together)."""
        budget = BufferBudget(10)
        refused: list[str] = []
        first = BufferedSink(b"", 100, lambda: refused.append("overflow"), None, budget, lambda: refused.append("1"))
        second = BufferedSink(b"", 100, lambda: refused.append("overflow"), None, budget, lambda: refused.append("2"))
        first.write(b"x" * 8)
        second.write(b"y" * 2)
        second.write(b"y")
        self.assertEqual(refused, ["2"])
        self.assertEqual(budget.held, 8)
        first.write(b"x" * 2)
        self.assertEqual(bytes(first.take()), b"x" * 10)
        first.release()
        self.assertEqual(budget.held, 0)

    def test_no_limit(self) -> None:
        """``None``: every reservation is granted (and still counted)."""
        budget = BufferBudget(None)
        self.assertTrue(budget.reserve(10**12))
        self.assertEqual(budget.held, 10**12)

    @inlineCallbacks
    def test_a_downstream_still_writing_after_its_503_writes_nowhere(self) -> Any:
        """A response refused mid-way because the buffers are full gets 503; the downstream's later
        writes and its finish go nowhere (Twisted would raise on a write after finish)."""
        budget = BufferBudget(len(CHUNK) + len(CHUNK) // 2)  # the second chunk does not fit
        guest = make_guest(BUFFERING, execution=Execution.INLINE)
        downstream = SlowBody(chunks=4)
        url = self.serve(GuestResource(guest, downstream, buffer_budget=budget))
        status, headers, _ = yield self.fetch("GET", url + "/")
        self.assertEqual((status, headers.getRawHeaders("retry-after")), (503, ["1"]))
        finished = yield poll(lambda: downstream.ended.called, 10)
        self.assertTrue(finished, "the downstream's writes after the 503 did not all return")
        self.assertEqual(budget.held, 0)

    @inlineCallbacks
    def test_buffered_responses_over_the_total_get_503(self) -> Any:
        """With 1 MiB for all buffered responses, two concurrent 768 KiB buffered responses: one is
        answered, the other gets 503 with Retry-After; afterwards nothing is held."""
        budget = BufferBudget(1024 * 1024)
        guest = make_guest(BUFFERING, execution=Execution.INLINE)
        resource = GuestResource(guest, SlowBody(chunks=3, together=2), buffer_budget=budget)
        url = self.serve(resource)
        first = self.fetch("GET", url + "/")
        second = self.fetch("GET", url + "/")
        status1, headers1, body1 = yield first
        status2, headers2, body2 = yield second
        statuses = sorted([status1, status2])
        self.assertEqual(statuses, [200, 503])
        refused = headers1 if status1 == 503 else headers2
        self.assertEqual(refused.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(len(body1 if status1 == 200 else body2), 3 * len(CHUNK))
        self.assertEqual(budget.held, 0)
