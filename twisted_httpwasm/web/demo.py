"""The demo that ``twistd -n httpwasm`` serves when given no guest and no downstream.

:func:`bundled_guest` names a guest shipped as WebAssembly text in this package
(compiled when it is loaded, like any ``.wat`` guest); :class:`DemoPage` is a
downstream that shows each request as it arrived, after the guests in front of
it had their say.
"""

from __future__ import annotations

import html
from pathlib import Path

from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["BUNDLED_GUESTS", "DEMO_GUEST", "DemoPage", "bundled_guest"]

#: The directory of the guests shipped with the package, as ``.wat`` sources.
BUNDLED_GUESTS = Path(__file__).resolve().parent.parent / "guests"

#: The guest of the demo: answers ``/hello`` itself and marks everything else.
DEMO_GUEST = "demo"

_ABOUT_DEMO_GUEST = """\
The guest in front of it is the bundled demo guest ({path}),
compiled when the server started:

  - /hello is answered by the guest itself; this page never sees it;
  - any other request is passed on here with the request header
    x-httpwasm-guest: demo (look for it below), and every response
    gets the header x-httpwasm: demo (curl -i shows it).
"""

_ABOUT_OTHER_GUESTS = """\
The guests given with --guest stand in front of it: what they changed in
the request (method, URI, headers, body) is what you see below.
"""

_NEXT_STEPS = """\
Next: put your own guest in front of this page with
  twistd -n httpwasm --guest my_guest.wasm
or in front of a real downstream with --path DIR, --proxy URL, --class,
--wsgi or --resource-script (twistd httpwasm --help has the details).
"""


def bundled_guest(name: str) -> Path:
    """The source of the bundled guest ``name`` (``demo`` is ``guests/demo.wat``)."""
    path = BUNDLED_GUESTS / f"{name}.wat"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in BUNDLED_GUESTS.glob("*.wat")))
        raise ValueError(f"no bundled guest named {name!r} (bundled: {known})")
    return path


class DemoPage(Resource):
    """A downstream that describes the demo and echoes the request it received.

    Every method and path gets the same page: the request line, the headers
    and the body size as this resource saw them, in HTML for browsers and in
    plain text otherwise.  ``demo_guest`` says whether the bundled demo guest
    is in front (the page then explains what it does).
    """

    isLeaf = True

    def __init__(self, *, demo_guest: bool = True):
        super().__init__()  # type: ignore[no-untyped-call]
        self.demo_guest = demo_guest

    def __repr__(self) -> str:
        return "<DemoPage>"

    def describe(self, request: Request) -> str:
        """The page as text: what this is, and the request as it arrived here."""
        if self.demo_guest:
            about = _ABOUT_DEMO_GUEST.format(path=bundled_guest(DEMO_GUEST))
        else:
            about = _ABOUT_OTHER_GUESTS
        lines = [
            "twisted-httpwasm demo",
            "",
            "This page is the downstream: an ordinary twisted.web resource behind",
            "an http-wasm guest, which saw your request before this page did.",
            about,
            "The request as this page received it:",
            "",
            "  " + _text(request.method + b" " + request.uri + b" " + request.clientproto),
        ]
        for name, values in sorted(request.requestHeaders.getAllRawHeaders()):
            for value in values:
                lines.append(f"  {_text(name).lower()}: {_text(value)}")
        lines += ["", f"  (body: {_body_size(request)} bytes)", "", _NEXT_STEPS]
        return "\n".join(lines)

    def render(self, request: Request) -> bytes:
        text = self.describe(request)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"vary", b"accept")
        accept = request.getHeader(b"accept") or b""
        if b"text/html" in accept:
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            page = (
                '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>twisted-httpwasm demo</title></head>\n'
                f"<body><pre>{html.escape(text)}</pre></body></html>\n"
            )
            return page.encode("utf-8")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return text.encode("utf-8")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _body_size(request: Request) -> int:
    content = getattr(request, "content", None)
    if content is None:
        return 0
    position = content.tell()
    size = content.seek(0, 2)
    content.seek(position)
    return int(size)
