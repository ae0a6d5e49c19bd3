"""The downstream resource every benchmark server serves.

``bench.downstream.Hello`` is what ``twistd web --class`` (plain Twisted) and
``twistd httpwasm --class`` (the same resource behind a wasm guest) both run,
so the only difference between the two sides of a comparison is the guest.
"""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request

HELLO = b"hello world\n"


class Hello(Resource):
    """Answer ``hello world`` to any GET, and the body's length to any POST."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render_GET(self, request: Request) -> bytes:
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
        return HELLO

    def render_POST(self, request: Request) -> bytes:
        content = request.content
        body = content.read() if content is not None else b""
        request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain"])
        return b"%d\n" % (len(body),)
