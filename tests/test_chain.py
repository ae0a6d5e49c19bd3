"""Two guests in a row: GuestResource(A, GuestResource(B, downstream)).

The result must be the composition of both: A sees the request first and the
response last, B in between, and each guest pins and gives back its own
instances.  Every behaviour runs in both execution modes.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm import Execution, GuestResource

from .support import ServerTestCase, execution_variants, guest_text, make_guest, on_guest_log

#: Outer guest: request header x-order += "a", response header x-a: 1, "/x..." -> "/y...";
#: handle_response adds x-order-response += "a" (buffer_response, so it may) and logs "A done".
GUEST_A = """
  (data (i32.const 0) "/x")
  (data (i32.const 8) "/y")
  (data (i32.const 16) "x-order")
  (data (i32.const 32) "a")
  (data (i32.const 48) "x-a")
  (data (i32.const 56) "1")
  (data (i32.const 64) "x-order-response")
  (data (i32.const 96) "A done")
  (func (export "_initialize") (drop (call $enable_features (i32.const 2))))
  (func (export "handle_request") (result i64)
    (local $len i32)
    (local.set $len (call $get_uri (i32.const 1024) (i32.const 4096)))
    (if (i32.and (i32.ge_u (local.get $len) (i32.const 2))
                 (i32.eq (i32.load16_u (i32.const 1024)) (i32.load16_u (i32.const 0))))
      (then
        (i32.store16 (i32.const 1024) (i32.load16_u (i32.const 8)))
        (call $set_uri (i32.const 1024) (local.get $len))))
    (call $add_header_value (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 1))
    (call $set_header_value (i32.const 1) (i32.const 48) (i32.const 3) (i32.const 56) (i32.const 1))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)
    (call $add_header_value (i32.const 1) (i32.const 64) (i32.const 16) (i32.const 32) (i32.const 1))
    (call $log (i32.const 0) (i32.const 96) (i32.const 6)))
"""

#: Inner guest: request header x-order += "b", response header x-b: 1; answers "/y/guest"
#: itself with 200 "answered by B"; handle_response adds x-order-response += "b" and
#: logs "B done".
GUEST_B = """
  (data (i32.const 0) "/y/guest")
  (data (i32.const 16) "x-order")
  (data (i32.const 32) "b")
  (data (i32.const 48) "x-b")
  (data (i32.const 56) "1")
  (data (i32.const 64) "x-order-response")
  (data (i32.const 96) "B done")
  (data (i32.const 112) "answered by B")
  (func (export "_initialize") (drop (call $enable_features (i32.const 2))))
  (func (export "handle_request") (result i64)
    (local $len i32)
    (local.set $len (call $get_uri (i32.const 1024) (i32.const 4096)))
    (call $add_header_value (i32.const 0) (i32.const 16) (i32.const 7) (i32.const 32) (i32.const 1))
    (call $set_header_value (i32.const 1) (i32.const 48) (i32.const 3) (i32.const 56) (i32.const 1))
    (if (i32.and (i32.eq (local.get $len) (i32.const 8))
                 (i64.eq (i64.load (i32.const 1024)) (i64.load (i32.const 0))))
      (then
        (call $write_body (i32.const 1) (i32.const 112) (i32.const 13))
        (return (i64.const 0))))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)
    (call $add_header_value (i32.const 1) (i32.const 64) (i32.const 16) (i32.const 32) (i32.const 1))
    (call $log (i32.const 0) (i32.const 96) (i32.const 6)))
"""


class Echo(Resource):
    """Answers with JSON: the path and the x-order request header it saw."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        seen = {
            "path": request.path.decode(),
            "x-order": [value.decode() for value in request.requestHeaders.getRawHeaders(b"x-order", [])],
        }
        return json.dumps(seen).encode()


class Held(Resource):
    """Answers only when the test fires ``release``; ``arrived`` counts requests."""

    isLeaf = True

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.release: Deferred[None] = Deferred()
        self.all_arrived: Deferred[None] = Deferred()
        self.expected = expected
        self.arrived = 0

    def render(self, request: Any) -> object:
        def answer(_: None) -> None:
            request.write(b"held")
            request.finish()

        self.release.addCallback(answer)
        self.arrived += 1
        if self.arrived == self.expected:
            self.all_arrived.callback(None)
        return NOT_DONE_YET


class ChainMixin:
    """A (outer) in front of B (inner) in front of a downstream."""

    execution: Execution
    timeout = 15

    def chain(self, downstream: Resource) -> tuple[Any, Any, str, list[str]]:
        """(guest A, guest B, URL, the guests' log messages in order)."""
        a = make_guest(GUEST_A, name="A", execution=self.execution)
        b = make_guest(GUEST_B, name="B", execution=self.execution)
        messages: list[str] = []
        for guest in (a, b):
            on_guest_log(guest, lambda event: messages.append(guest_text(event)))
        url = self.serve(GuestResource(a, GuestResource(b, downstream)))  # type: ignore[attr-defined]
        return a, b, url, messages

    def tree(self) -> Resource:
        root = Resource()
        y = Resource()
        root.putChild(b"y", y)
        y.putChild(b"down", Echo())
        return root

    @inlineCallbacks
    def test_rewrite_and_headers_compose(self) -> Any:
        """/x/down reaches the downstream as /y/down (A's rewrite), with A's request header
        before B's; the response carries both guests' headers, handle_response ran inner
        (B) first, then outer (A)."""
        a, b, url, messages = self.chain(self.tree())
        status, headers, body = yield self.fetch("GET", url + "/x/down")  # type: ignore[attr-defined]
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), {"path": "/y/down", "x-order": ["a", "b"]})
        self.assertEqual(headers.getRawHeaders("x-a"), ["1"])
        self.assertEqual(headers.getRawHeaders("x-b"), ["1"])
        self.assertEqual(headers.getRawHeaders("x-order-response"), ["b", "a"])
        self.assertEqual(messages, ["B done", "A done"])
        self.assertEqual((a.pool.stats.in_use, b.pool.stats.in_use), (0, 0))

    @inlineCallbacks
    def test_inner_guest_answers_after_outer_rewrite(self) -> Any:
        """/x/guest becomes /y/guest in A, which B answers itself; A still wraps B's
        answer (its header, its handle_response)."""
        a, b, url, messages = self.chain(self.tree())
        status, headers, body = yield self.fetch("GET", url + "/x/guest")  # type: ignore[attr-defined]
        self.assertEqual((status, body), (200, b"answered by B"))
        self.assertEqual(headers.getRawHeaders("x-a"), ["1"])
        self.assertEqual(headers.getRawHeaders("x-b"), ["1"])
        # B answered (next=0), so only A's handle_response ran.
        self.assertEqual(headers.getRawHeaders("x-order-response"), ["a"])
        self.assertEqual(messages, ["A done"])
        self.assertEqual((a.pool.stats.in_use, b.pool.stats.in_use), (0, 0))

    @inlineCallbacks
    def test_each_guest_pins_its_own_instances(self) -> Any:
        """Two requests held in the downstream pin two instances of each guest; both pools
        are back to 0 in use once they are answered."""
        held = Held(expected=2)
        a, b, url, _ = self.chain(held)
        fetches = [self.fetch("GET", url + "/hold/1"), self.fetch("GET", url + "/hold/2")]  # type: ignore[attr-defined]
        yield held.all_arrived
        self.assertEqual((a.pool.stats.in_use, b.pool.stats.in_use), (2, 2))
        held.release.callback(None)
        results = yield gatherResults(fetches)
        self.assertEqual([(status, body) for status, _, body in results], [(200, b"held"), (200, b"held")])
        self.assertEqual((a.pool.stats.in_use, b.pool.stats.in_use), (0, 0))


globals().update(execution_variants(ChainMixin, ServerTestCase))
