"""Bodies a guest builds itself count against ``--max-buffered-total`` (the process's buffer budget).

- A guest's own answer (``write_body``, then ``next=0``): its bytes are counted
  from the end of ``handle_request`` until the body is written out or the
  client is gone; it is handed to the transport a chunk at a time as the client
  reads, so a client that does not read holds the budget, not more memory.
- A body written before ``next``: counted while the guest's part of the
  request runs.

Past the budget, the request gets 503 with ``Retry-After``, as a buffered
response does.  Real loopback sockets; clients that do not read.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm import Execution, GuestResource
from twisted_httpwasm.runtime.budget import BufferBudget

from .support import NOOP_RESPONSE, ServerTestCase, make_guest, poll
from .test_http2_bounds import rss_of
from .test_twistd import TwistdTestCase

MiB = 1024 * 1024
#: What the guest writes: 96 writes of 64 KiB (its whole first page, zeros).
BODY = 96 * 64 * 1024
BUDGET = 8 * MiB  # room for one such body, not two


def writing_guest(next_: int) -> str:
    """Writes BODY bytes of response body in handle_request, then returns next=``next_``."""
    return (
        f"""
  (func (export "handle_request") (result i64)
    (local $i i32)
    (loop $again
      (call $write_body (i32.const 1) (i32.const 0) (i32.const 65536))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const {BODY // 65536}))))
    (i64.const {next_}))
"""
        + NOOP_RESPONSE
    )


class Held(Resource):
    """A downstream that answers (an empty 200) only when ``release`` fires."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.release: Deferred[None] = Deferred()

    def render(self, request: Any) -> object:
        def answer(_: object) -> None:
            if not request._disconnected:
                request.finish()

        self.release.addCallback(answer)
        return NOT_DONE_YET


def stalled_client(port: int) -> tuple[socket.socket, bytes]:
    """A GET whose client reads the status line and then nothing (a 4 KiB receive buffer)."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.settimeout(10)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    return client, client.recv(12)


class GuestBodyBudgetTests(ServerTestCase):
    timeout = 60

    def serve_with_budget(self, guest_wat: str, downstream: Resource) -> tuple[BufferBudget, str]:
        budget = BufferBudget(BUDGET)
        guest = make_guest(guest_wat, execution=Execution.INLINE)
        return budget, self.serve(GuestResource(guest, downstream, buffer_budget=budget))

    @inlineCallbacks
    def test_an_answer_a_client_does_not_read_holds_the_budget(self) -> Generator[Any, Any, None]:
        budget, url = self.serve_with_budget(writing_guest(0), Resource())
        port = int(url.rsplit(":", 1)[1])
        client, status_line = yield deferToThread(stalled_client, port)
        self.addCleanup(client.close)
        self.assertEqual(status_line, b"HTTP/1.1 200")
        # The body waits for the client in the guest's answer, counted, not copied into the transport.
        self.assertTrue((yield poll(lambda: budget.held == BODY, 10)), budget)
        status, headers, _ = yield self.fetch("GET", url + "/")
        self.assertEqual((status, headers.getRawHeaders("retry-after")), (503, ["1"]))
        self.assertEqual(budget.held, BODY)  # the refused answer took nothing
        client.close()  # the stalled client leaves: its bytes go back
        self.assertTrue((yield poll(lambda: budget.held == 0, 10)), budget)
        status, _, body = yield self.fetch("GET", url + "/")
        self.assertEqual((status, len(body)), (200, BODY))
        self.assertEqual(budget.held, 0)

    @inlineCallbacks
    def test_a_body_written_before_next_holds_the_budget(self) -> Generator[Any, Any, None]:
        downstream = Held()
        budget, url = self.serve_with_budget(writing_guest(1), downstream)
        first = self.fetch("GET", url + "/")
        self.assertTrue((yield poll(lambda: budget.held == BODY, 10)), budget)
        status, headers, _ = yield self.fetch("GET", url + "/")
        self.assertEqual((status, headers.getRawHeaders("retry-after")), (503, ["1"]))
        self.assertEqual(budget.held, BODY)
        downstream.release.callback(None)
        status, _, body = yield first
        self.assertEqual((status, len(body)), (200, BODY))
        self.assertTrue((yield poll(lambda: budget.held == 0, 10)), budget)


# -- end to end: twistd, clients that do not read, the server's memory --------------------------


class TwistdGuestBodyBudgetTests(TwistdTestCase):
    """``twistd httpwasm --max-buffered-total 16MiB``, a guest answering 6 MiB itself, 12 clients that do not read."""

    timeout = 120
    skip = None if sys.platform.startswith("linux") else "reads /proc/PID/status"

    @inlineCallbacks
    def test_clients_that_do_not_read_cannot_grow_the_process_past_the_budget(self) -> Generator[Any, Any, None]:
        url = yield self.start_server(
            "--guest",
            self.guest_file(writing_guest(0)),
            "--class",
            "tests.test_twistd.Hello",
            "--max-buffered-total",
            "16MiB",
        )
        port = int(url.rsplit(":", 1)[1])
        pid = self.server.process.pid
        before, _ = rss_of(pid)
        clients = []
        statuses = []
        for _ in range(12):
            client, status_line = yield deferToThread(stalled_client, port)
            clients.append(client)
            statuses.append(status_line)
        _, peak = rss_of(pid)
        for client in clients:
            client.close()
        answered = statuses.count(b"HTTP/1.1 200")
        self.assertEqual(answered + statuses.count(b"HTTP/1.1 503"), 12, statuses)
        self.assertLessEqual(answered, 2, statuses)  # 16 MiB holds two 6 MiB answers
        self.assertGreaterEqual(answered, 1, statuses)
        # Before, each stalled answer held its body two or three times over (~200 MiB for these 12).
        self.assertLess(peak - before, 64 * MiB, (before, peak))
        self.assertIn("no room for its own answer", self.server.output())
