"""A GuestResource rendered with twisted.web's own DummyRequest, as an embedder's unit test would."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from twisted_httpwasm import Execution, Guest, GuestResource

from .support import EXAMPLES


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"hello from downstream"


@inlineCallbacks
def render(resource: Any, request: DummyRequest) -> Generator[Any, Any, None]:
    """Render as twisted.web would, and wait for the response to finish."""
    result = resource.render(request)
    if result is NOT_DONE_YET:
        if not request.finished:
            yield request.notifyFinish()
    else:
        request.write(result)
        request.finish()


class DummyRequestTests(TestCase):
    @inlineCallbacks
    def check(self, execution: Execution) -> Generator[Any, Any, None]:
        headers_guest = GuestResource(Guest(EXAMPLES / "security_headers.wat", execution=execution), Hello())
        request = DummyRequest([b""])  # no `content`: an empty body
        yield render(headers_guest, request)
        self.assertEqual(b"".join(request.written), b"hello from downstream")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"x-content-type-options"), [b"nosniff"])
        self.assertEqual(request.finished, 1)

        router = GuestResource(Guest(EXAMPLES / "router.wat", execution=execution), Hello())
        request = DummyRequest([b"host"])
        request.uri = request.path = b"/host"
        yield render(router, request)
        self.assertEqual(b"".join(request.written), b"hello from the guest\n")  # the guest answered itself
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/plain"])

    def test_inline(self) -> Any:
        return self.check(Execution.INLINE)

    def test_thread(self) -> Any:
        return self.check(Execution.THREAD)
