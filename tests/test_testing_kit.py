"""twisted_httpwasm.testing: GuestClient runs requests through the real host path, in memory.

Each behaviour is checked in both execution modes; thread mode really runs the
guest in a guest worker thread, and nothing needs a running reactor (see
``test_no_reactor_runs``, in a fresh process).
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import unittest
import weakref
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm import Execution, Feature, GuestLoadError, LogLevel
from twisted_httpwasm.testing import (
    DownstreamRequest,
    GuestClient,
    GuestTestMixin,
    Headers,
    HostCall,
    init_calls,
    load_guest,
)

from .support import EXAMPLES, ROOT, execution_variants, module

#: Logs "hello" at info in handle_request, adds `x-seen: <config>` to the request, passes it on; in
#: handle_response adds `x-after: 1` (buffer_response is enabled at init, so it may).
TAGGER = module(
    '(data (i32.const 0) "hello") (data (i32.const 16) "x-seen")',
    '(data (i32.const 32) "x-after") (data (i32.const 48) "1")',
    '(func (export "_initialize") (drop (call $enable_features (i32.const 2))))',
    """(func (export "handle_request") (result i64) (local $n i32)
         (call $log (i32.const 0) (i32.const 0) (i32.const 5))
         (local.set $n (call $get_config (i32.const 256) (i32.const 256)))
         (call $add_header_value (i32.const 0) (i32.const 16) (i32.const 6) (i32.const 256) (local.get $n))
         (i64.const 1))""",
    """(func (export "handle_response") (param i32 i32)
         (call $set_header_value (i32.const 1) (i32.const 32) (i32.const 7) (i32.const 48) (i32.const 1)))""",
)

#: Traps in handle_request with `unreachable`, after logging a warning.
TRAPPER = module(
    '(data (i32.const 0) "about to fail")',
    """(func (export "handle_request") (result i64)
         (call $log (i32.const 1) (i32.const 0) (i32.const 13))
         unreachable)""",
    '(func (export "handle_response") (param i32 i32))',
)

#: Answers every request itself: 418 and the body "teapot".
TEAPOT = module(
    '(data (i32.const 0) "teapot")',
    """(func (export "handle_request") (result i64)
         (call $set_status_code (i32.const 418))
         (call $write_body (i32.const 1) (i32.const 0) (i32.const 6))
         (i64.const 0))""",
    '(func (export "handle_response") (param i32 i32))',
)


class KitTestsMixin:
    execution: Execution

    def client(self, guest: Any, downstream: Any = None, **options: Any) -> GuestClient:
        client = GuestClient(guest, downstream, execution=self.execution, **options)
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client

    def test_passes_on_with_changes_logs_and_calls(self) -> None:
        exchange = self.client(TAGGER, config=b"alice").get("/a?b=1", {"X-Seen": "client"})
        self.assertEqual((exchange.status, exchange.body), (200, b"ok"))  # type: ignore[attr-defined]
        self.assertEqual(exchange.headers["X-AFTER"], "1")  # type: ignore[attr-defined]
        downstream = exchange.downstream
        assert downstream is not None
        self.assertEqual((downstream.method, downstream.uri, downstream.path), ("GET", "/a?b=1", "/a"))  # type: ignore[attr-defined]
        self.assertEqual(downstream.headers.getall("x-seen"), ["client", "alice"])  # type: ignore[attr-defined]
        self.assertEqual(exchange.logs, [(LogLevel.INFO, "hello")])  # type: ignore[attr-defined]
        self.assertIsNone(exchange.trap)  # type: ignore[attr-defined]
        self.assertEqual(exchange.outcome, "passed")  # type: ignore[attr-defined]
        self.assertEqual(exchange.features, Feature.BUFFER_RESPONSE)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            [(call.phase, call.function) for call in exchange.calls or ()],
            [
                ("handle_request", "log"),
                ("handle_request", "get_config"),
                ("handle_request", "add_header_value"),
                ("handle_response", "set_header_value"),
            ],
        )
        self.assertTrue(exchange.called("set_header_value", "handle_response"))  # type: ignore[attr-defined]
        self.assertFalse(exchange.called("set_header_value", "handle_request"))  # type: ignore[attr-defined]

    def test_init_calls_are_kept_apart(self) -> None:
        client = self.client(TAGGER)
        self.assertEqual(init_calls(client.guests[0]), [HostCall("guest", "init", "enable_features")])  # type: ignore[attr-defined]
        self.assertFalse(client.get("/").called("enable_features"))  # type: ignore[attr-defined]

    def test_trap(self) -> None:
        exchange = self.client(TRAPPER).get("/")
        self.assertEqual(exchange.status, 500)  # type: ignore[attr-defined]
        self.assertIsNone(exchange.downstream)  # type: ignore[attr-defined]
        self.assertIn("unreachable", exchange.trap or "")  # type: ignore[attr-defined]
        self.assertEqual(exchange.outcome, "trapped")  # type: ignore[attr-defined]
        self.assertEqual(exchange.logs, [(LogLevel.WARN, "about to fail")])  # type: ignore[attr-defined]
        self.assertNotIn(b"unreachable", exchange.body)  # type: ignore[attr-defined]  # never to the client

    def test_trap_fail_open(self) -> None:
        exchange = self.client(TRAPPER, on_guest_error="fail-open").post("/x", b"payload")
        self.assertEqual((exchange.status, exchange.body), (200, b"ok"))  # type: ignore[attr-defined]
        assert exchange.downstream is not None
        self.assertEqual(exchange.downstream.body, b"payload")  # type: ignore[attr-defined]
        self.assertIsNotNone(exchange.trap)  # type: ignore[attr-defined]

    def test_trap_after_the_response_started(self) -> None:
        """A trap in handle_response once the streamed response began: the connection is cut."""
        late = module(
            '(func (export "handle_request") (result i64) (i64.const 1))',
            '(func (export "handle_response") (param i32 i32) unreachable)',
        )
        exchange = self.client(late, Streamed()).get("/")
        self.assertFalse(exchange.complete)  # type: ignore[attr-defined]
        self.assertEqual((exchange.status, exchange.body[:5]), (200, b"xxxxx"))  # type: ignore[attr-defined]
        self.assertIn("unreachable", exchange.trap or "")  # type: ignore[attr-defined]
        self.assertEqual(exchange.outcome, "trapped")  # type: ignore[attr-defined]

    def test_time_limit(self) -> None:
        spin = module('(func (export "handle_request") (result i64) (loop (br 0)) (i64.const 1))', NOOP)
        exchange = self.client(spin, timeout=0.2).get("/")
        self.assertEqual(exchange.status, 500)  # type: ignore[attr-defined]
        self.assertIn("time limit", exchange.trap or "")  # type: ignore[attr-defined]

    def test_connections(self) -> None:
        """Requests share a keep-alive connection, as a client's would; one the client closes is not reused."""
        client = self.client(TEAPOT)
        statuses = [client.get("/", {"connection": close}).status for close in ("close", "keep-alive", "close", "")]
        self.assertEqual(statuses, [418] * 4)  # type: ignore[attr-defined]
        self.assertEqual(len(client._idle), 1)  # type: ignore[attr-defined]
        client.close()
        self.assertEqual(client._idle, [])  # type: ignore[attr-defined]

    def test_an_empty_response(self) -> None:
        """A response whose head is all there is (Twisted writes it in one writeSequence) is whole."""
        status = module(
            '(func (export "handle_request") (result i64) (call $set_status_code (i32.const 204)) (i64.const 0))', NOOP
        )
        self.assertEqual(self.client(status).get("/").status, 204)  # type: ignore[attr-defined]
        passing = module('(func (export "handle_request") (result i64) (i64.const 1))', NOOP)
        exchange = self.client(passing, lambda r: (200, {}, b"")).get("/")
        self.assertEqual((exchange.status, exchange.body), (200, b""))  # type: ignore[attr-defined]

    def test_guest_answers_itself(self) -> None:
        exchange = self.client(TEAPOT).get("/")
        self.assertEqual((exchange.status, exchange.body, exchange.downstream), (418, b"teapot", None))  # type: ignore[attr-defined]
        self.assertEqual(exchange.outcome, "answered")  # type: ignore[attr-defined]

    def test_chain_with_a_config_each(self) -> None:
        client = self.client([TAGGER, TAGGER], config=[b"outer", b"inner"])
        exchange = client.get("/")
        assert exchange.downstream is not None
        self.assertEqual(exchange.downstream.headers.getall("x-seen"), ["outer", "inner"])  # type: ignore[attr-defined]
        self.assertEqual(exchange.logs, [(LogLevel.INFO, "hello")] * 2)  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            [call.phase for call in exchange.calls or () if call.function == "set_header_value"],
            ["handle_response"] * 2,
        )

    def test_chain_inner_guest_answers(self) -> None:
        exchange = self.client([TAGGER, TEAPOT], config=[b"x", b""]).get("/")
        self.assertEqual((exchange.status, exchange.downstream), (418, None))  # type: ignore[attr-defined]
        self.assertEqual(exchange.headers["x-after"], "1")  # type: ignore[attr-defined]  # the outer guest saw the answer

    def test_callable_downstream(self) -> None:
        seen: list[DownstreamRequest] = []

        def answer(request: DownstreamRequest) -> Any:
            seen.append(request)
            return 201, [("Set-Cookie", "a=1"), ("set-cookie", "b=2")], "made " + request.body.decode()

        exchange = self.client(TAGGER, answer).request("put", "/thing", body=b"it")
        self.assertEqual((exchange.status, exchange.text), (201, "made it"))  # type: ignore[attr-defined]
        self.assertEqual(exchange.headers.getall("SET-COOKIE"), ["a=1", "b=2"])  # type: ignore[attr-defined]
        self.assertEqual([request.method for request in seen], ["PUT"])  # type: ignore[attr-defined]

    def test_resource_downstream_is_traversed(self) -> None:
        root, leaf = Resource(), Leaf()
        root.putChild(b"leaf", leaf)
        client = self.client(TAGGER, root)
        self.assertEqual(client.get("/leaf").body, b"leaf GET")  # type: ignore[attr-defined]
        self.assertEqual(client.get("/nothing").status, 404)  # type: ignore[attr-defined]

    def test_a_loaded_guest_is_shared(self) -> None:
        guest = load_guest(TEAPOT, execution=self.execution)
        for _ in range(2):
            with GuestClient(guest) as client:
                exchange = client.get("/")
                self.assertEqual(
                    (exchange.status, exchange.calls),
                    (
                        418,
                        [  # type: ignore[attr-defined]
                            HostCall("guest", "handle_request", "set_status_code"),
                            HostCall("guest", "handle_request", "write_body"),
                        ],
                    ),
                )


NOOP = '(func (export "handle_response") (param i32 i32))'


class Streamed(Resource):
    isLeaf = True

    def render(self, request: Any) -> object:
        for _ in range(3):
            request.write(b"x" * 1000)
        request.finish()
        return NOT_DONE_YET


class Never(Resource):
    isLeaf = True

    def render(self, request: Any) -> object:
        return NOT_DONE_YET


class Leaf(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"leaf " + request.method


globals().update(execution_variants(KitTestsMixin, SynchronousTestCase, name="Kit"))


class ThreadModeTests(SynchronousTestCase):
    def test_guest_calls_run_in_a_guest_thread(self) -> None:
        threads: list[str] = []
        guest = load_guest(
            TAGGER,
            execution="thread",
            on_host_call=lambda instance, name: instance.state and threads.append(threading.current_thread().name),
        )
        self.assertEqual(GuestClient(guest).get("/").status, 200)
        self.assertTrue(threads)
        self.assertTrue(all(name.startswith("httpwasm-guest") for name in threads), threads)


class AsyncTests(TestCase):
    """request_async in a running reactor (trial's)."""

    @inlineCallbacks
    def test_request_async(self) -> Any:
        for execution in ("thread", "inline"):
            with GuestClient(TAGGER, execution=execution, config=b"c") as client:
                exchange = yield client.request_async("GET", "/")
                self.assertEqual(exchange.status, 200)
                assert exchange.downstream is not None
                self.assertEqual(exchange.downstream.headers["x-seen"], "c")

    @inlineCallbacks
    def test_a_downstream_that_answers_later(self) -> Any:
        for execution in ("thread", "inline"):
            with GuestClient(TAGGER, Later(), execution=execution, config=b"c") as client:
                exchange = yield client.request_async("POST", "/slow", body=b"x")
                self.assertEqual((exchange.status, exchange.body), (200, b"later POST"))
                self.assertEqual(exchange.headers["x-after"], "1")


class Later(Resource):
    """Answers from a reactor timer, after render returned."""

    isLeaf = True

    def render(self, request: Any) -> object:
        from twisted.internet import reactor

        reactor.callLater(0.01, lambda: (request.write(b"later " + request.method), request.finish()))
        return NOT_DONE_YET


class MixinTests(GuestTestMixin, SynchronousTestCase):
    def test_mixin(self) -> None:
        guest = self.load_guest(EXAMPLES / "router.wat")
        self.assertIs(guest, self.load_guest(str(EXAMPLES / "router.wat")))
        self.assertEqual(self.guest_client(guest).get("/host").text, "hello from the guest\n")


class PlainUnittestTests(GuestTestMixin, unittest.TestCase):
    def test_works_in_unittest_too(self) -> None:
        self.assertEqual(self.guest_client(TEAPOT).get("/").status, 418)


class EdgeTests(SynchronousTestCase):
    def test_headers(self) -> None:
        headers = Headers([(b"A", b"1"), ("a", "2"), ("B", "3")])
        self.assertEqual((headers["a"], headers.getall(b"A"), list(headers)), ("1", ["1", "2"], ["a", "b"]))
        self.assertIn("b", headers)
        self.assertNotIn("c", headers)
        self.assertIsNone(headers.get("c"))
        self.assertRaises(KeyError, lambda: headers["c"])

    def test_a_guest_that_cannot_load(self) -> None:
        bad = b'(module (import "http_handler" "streams_read" (func)) (memory (export "memory") 1))'
        error = self.assertRaises(GuestLoadError, GuestClient, bad)
        self.assertIn("streams_read", str(error))

    def test_a_response_that_never_comes(self) -> None:
        """Synchronously, a downstream waiting for the reactor cannot answer: a clear error, not a hang."""
        with GuestClient(TEAPOT.replace(b"i64.const 0", b"i64.const 1"), Never()) as client:
            error = self.assertRaises(AssertionError, client.get, "/")
        self.assertIn("needs request_async", str(error))

    def test_a_closed_client_lets_its_guests_go(self) -> None:
        """Thousands of tests make thousands of clients: a closed one keeps no guest (nor its instances) alive."""
        for execution in ("inline", "thread"):
            client = GuestClient(TAGGER, execution=execution)
            client.get("/")
            guest = weakref.ref(client.guests[0])
            client.close()
            del client
            gc.collect()
            self.assertIsNone(guest(), execution)

    def test_untraced_guests_link_the_plain_host_functions(self) -> None:
        """The call trace costs nothing unless asked for: without on_host_call, no host function is wrapped."""
        from twisted_httpwasm import Guest
        from twisted_httpwasm.runtime import guest as guest_module

        wrapped: list[str] = []
        real = guest_module.traced
        self.patch(guest_module, "traced", lambda name, *rest: wrapped.append(name) or real(name, *rest))
        Guest(TAGGER)
        self.assertEqual(wrapped, [])
        load_guest(TAGGER)
        self.assertIn("get_config", wrapped)

    def test_chain_configs_must_match(self) -> None:
        self.assertRaises(ValueError, GuestClient, [TEAPOT, TEAPOT], config=b"x")
        self.assertRaises(ValueError, GuestClient, [TEAPOT, TEAPOT], config=[b"x"])

    def test_a_path(self) -> None:
        with GuestClient(str(EXAMPLES / "security_headers.wat")) as client:
            self.assertEqual(client.get("/").headers.get("x-content-type-options"), "nosniff")

    def test_no_reactor_runs(self) -> None:
        """In a fresh process, thread mode included: the global reactor is never started."""
        probe = (
            "from twisted_httpwasm.testing import GuestClient\n"
            "from twisted.internet import reactor\n"
            "with GuestClient('examples/router.wat', execution='thread') as c:\n"
            "    e = c.get('/host')\n"
            "print(e.status, e.body, reactor.running)\n"
        )
        output = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(output.stdout.strip(), "200 b'hello from the guest\\n' False", output.stderr)
