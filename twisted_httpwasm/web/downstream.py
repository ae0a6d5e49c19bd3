"""What the filter hands a downstream besides the request itself.

- :func:`unusable_path`: whether the request's path is one no downstream can
  take (the client's error, answered 400 by :class:`BadRequest`);
- :class:`BodyRemainder`: the unread rest of a request body a guest read part
  of, read where Twisted spooled it.
"""

from __future__ import annotations

import io
import re
from typing import Any, BinaryIO

from twisted.web.http import BAD_REQUEST
from twisted.web.resource import Resource
from twisted.web.server import Request

__all__ = ["BadRequest", "BodyRemainder", "unusable_path"]

#: What a request-target may hold (RFC 3986: printable ASCII), as ``set_uri`` requires of guests.
_URI_BYTES = re.compile(rb"[\x21-\x7e]*\Z")


def unusable_path(request: Request) -> str | None:
    """Why a downstream cannot take the request's path, if so: the client's error (400).

    Raw control, space, DEL or non-ASCII bytes are not part of any URI (Twisted's
    client, under ``--proxy``, raises on them).  A NUL byte (sent encoded, ``%00``)
    cannot be part of a file name, and most code handed one raises deep inside;
    ``static.File`` logs a traceback for every path segment that is not UTF-8 once
    percent-decoded.  A target that is not origin-form (``/...``, or ``*`` for
    ``OPTIONS``), which a guest set or a plain ``Site`` let through, is misread
    by traversal and would be glued to a ``--proxy`` backend's URL.
    """
    uri = request.uri or b""
    if not _URI_BYTES.match(uri):
        return "a byte that a URI cannot hold (not printable ASCII)"
    if uri[:1] != b"/" and not (uri == b"*" and request.method == b"OPTIONS"):
        # Traversal reads it as a path (Twisted drops its first byte), and a proxy would glue it to its URL.
        return "a request target that is not origin-form (/...)"
    if b"%" not in uri:
        return None  # printable ASCII that nothing decodes: no NUL, and UTF-8 as it is
    # "/" is never part of a multi-byte UTF-8 sequence: the segments decode alone if they decode together.
    path = b"/".join(request.postpath or ())
    if b"\x00" in path:
        return "a NUL byte in the path"
    try:
        path.decode("utf-8")
    except UnicodeDecodeError:
        return "a path segment that is not UTF-8"
    return None


class BadRequest(Resource):
    """Answers 400 with a short plain body, for a request no downstream can take."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: Request) -> bytes:
        request.setResponseCode(BAD_REQUEST)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Bad Request\n"


class BodyRemainder(io.RawIOBase):
    """A read-only window onto ``length`` bytes of ``source`` from ``start``: the unread rest of a
    request body, read where Twisted spooled it (a temporary file for large bodies), never copied.

    Positions are relative to the window, so the downstream sees a whole body of ``length`` bytes.
    """

    def __init__(self, source: BinaryIO, start: int, length: int):
        super().__init__()
        self._source = source
        self._start = start
        self._length = length
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        wanted = min(len(buffer), self._length - self._position)
        if wanted <= 0:
            return 0
        self._source.seek(self._start + self._position)
        data = self._source.read(wanted)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()
