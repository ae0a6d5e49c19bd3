"""Text logs are text: addresses as ``host:port``, failures as their one-line reason, and a request cut by
the host's own shutdown logged as that, never as a backend failure.  Real ``twistd``, real sockets."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm.web.proxy import ProxyResource

from .support import ServerTestCase, deferred_later, poll
from .test_twistd import DEADLINE, HEADER_GUEST, TwistdTestCase


class NeverAnswers(Resource):
    """A backend that takes requests and never answers them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Any] = []

    def render(self, request: Any) -> Any:
        self.received.append(request)
        return NOT_DONE_YET


class ShutdownCutTests(TwistdTestCase):
    @inlineCallbacks
    def test_a_request_cut_by_the_shutdown_timeout_is_logged_as_that(self) -> Generator[Any, Any, None]:
        """--proxy to a backend that never answers, SIGTERM with --shutdown-timeout 1: the cut is logged with the
        client's address as 127.0.0.1:PORT, and the proxy does not blame the backend for the host's own cut."""
        backend = NeverAnswers()
        url = yield self.start_server(
            "--guest", self.guest_file(HEADER_GUEST), "--proxy", self.serve(backend), "--shutdown-timeout", "1"
        )
        pending = self.http.get(url + "/slow")
        pending.addErrback(lambda _: None)  # cut: the client sees the connection go
        self.assertTrue((yield poll(lambda: backend.received, DEADLINE)))
        self.server.process.terminate()
        self.assertTrue((yield poll(self.server.exited, DEADLINE)), self.server.output())
        yield deferred_later(0)
        output = self.server.output()
        (cut,) = [line for line in output.splitlines() if "cutting GET /slow" in line]
        self.assertRegex(cut, r"httpwasm: shutdown timeout \(1\.0 s\): cutting GET /slow from 127\.0\.0\.1:\d+ after ")
        for wrong in ("IPv4Address", "Failure", "unreachable", "failed while sending", "Traceback"):
            self.assertNotIn(wrong, output)


class DropsTheConnection(Resource):
    """A backend that drops the connection of every request, answering nothing."""

    isLeaf = True

    def render(self, request: Any) -> Any:
        request.transport.abortConnection()
        return NOT_DONE_YET


class ProxyFailureTextTests(ServerTestCase):
    @inlineCallbacks
    def test_a_failing_backend_is_logged_with_its_one_line_reason(self) -> Generator[Any, Any, None]:
        """A backend that drops the connection: 502, and one line with the reason as text, not a list of reprs."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        backend = self.serve(DropsTheConnection())
        url = self.serve(ProxyResource(backend))
        status, _, _ = yield self.fetch("GET", url + "/drop")
        self.assertEqual(status, 502)
        (line,) = [formatEvent(event) for event in events if event.get("log_namespace") == "httpwasm.proxy"]
        self.assertEqual(
            line,
            f"backend {backend}/drop unreachable for GET /drop: "
            "Connection to the other side was lost in a non-clean fashion.",
        )

    @inlineCallbacks
    def test_a_backend_past_the_proxy_timeout_is_logged_as_that(self) -> Generator[Any, Any, None]:
        """The proxy's own deadline: one line saying the backend did not answer within it (not a list of reprs)."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        backend = NeverAnswers()
        base = self.serve(backend)
        url = self.serve(ProxyResource(base, timeout=0.5))
        status, _, _ = yield self.fetch("GET", url + "/slow")
        self.assertEqual(status, 502)
        (line,) = [formatEvent(event) for event in events if event.get("log_namespace") == "httpwasm.proxy"]
        self.assertEqual(line, f"backend {base}/slow did not answer GET /slow within 0.5 s")
        for request in backend.received:  # let the backend's side of the abandoned request go
            request.finish()
