"""Bounded under hostile load: work for clients that left, and what one connection may make the server hold."""

from __future__ import annotations

import socket
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.server import Request

from twisted_httpwasm import GuestResource
from twisted_httpwasm._worker import GuestWorkers

from .support import NOOP_RESPONSE, ServerTestCase, make_guest, on_guest_log, poll

LOGGING_GUEST = """
  (data (i32.const 0) "ran")
  (func (export "handle_request") (result i64)
    (call $log (i32.const 1) (i32.const 0) (i32.const 3))
    (i64.const 1))
"""


class _Ok(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"ok"


class _Watched(Resource):
    """Renders ``inner`` and counts the requests it got and the clients that went away."""

    isLeaf = True

    def __init__(self, inner: Resource):
        super().__init__()
        self.inner = inner
        self.rendered = 0
        self.lost = 0

    def render(self, request: Request) -> Any:
        self.rendered += 1
        request.notifyFinish().addErrback(lambda _: setattr(self, "lost", self.lost + 1))
        return self.inner.render(request)


class AbandonedWorkTests(ServerTestCase):
    @inlineCallbacks
    def test_guest_calls_for_clients_that_left_are_not_started(self):
        """Requests queued behind a busy worker whose clients leave never run the guest; nothing leaks.

        The only worker thread is held; five clients send a request and hang up
        while their guest calls wait. Once the worker is free, those calls are
        dropped unstarted (the guest logs nothing for them), no instance is lent
        out, and the next request is served as usual.
        """
        guest = make_guest(LOGGING_GUEST, NOOP_RESPONSE)
        runs: list[object] = []
        on_guest_log(guest, runs.append)
        resource = GuestResource(guest, _Ok())
        workers = GuestWorkers(reactor, max_size=1)
        self.addCleanup(workers.stop)
        resource.runner = workers
        watched = _Watched(resource)
        url = self.serve(watched)
        port = int(url.rsplit(":", 1)[1])

        release = threading.Event()
        self.addCleanup(release.set)
        workers.run(lambda: release.wait(30), lambda _: None, lambda _: None)
        clients = []
        for _ in range(5):
            client = socket.create_connection(("127.0.0.1", port), timeout=5)
            self.addCleanup(client.close)
            client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            clients.append(client)
        self.assertTrue((yield poll(lambda: watched.rendered == 5, timeout=10, interval=0.01)))
        for client in clients:
            client.close()
        self.assertTrue((yield poll(lambda: watched.lost == 5, timeout=10, interval=0.01)))

        release.set()
        status, _, body = yield self.fetch("GET", url + "/")
        self.assertEqual((status, body), (200, b"ok"))
        self.assertEqual(len(runs), 1)  # the good request only
        self.assertEqual(workers.dropped, 5)
        stats = guest.pool.stats
        self.assertEqual(stats.in_use, 0)
        self.assertEqual(stats.idle, stats.created - stats.discarded)
