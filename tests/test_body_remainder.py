"""After a guest read part of the request body (without buffer_request), the rest streams.

The downstream gets the unread rest as a file-like window onto where Twisted
spooled the body (a temporary file for a large upload), with a Content-Length
that matches it: no whole-body copy in memory.  The memory figure for a 512 MiB
upload is in docs/reliability.md; these tests pin the behaviour.
"""

from __future__ import annotations

import io
import random
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource

from .support import ServerTestCase, execution_variants
from .test_resource import GuestTestMixin, log_text, read_four


class Recorder(Resource):
    """Keeps what the downstream was handed: the body object, its bytes, the Content-Length."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        content = request.content
        first = content.read(3)
        rest = content.read()
        content.seek(0)
        again = content.read()
        self.seen.append(
            {
                "content": content,
                "body": first + rest,
                "again": again,
                "length": request.getHeader(b"content-length"),
                "tell_end": content.seek(0, io.SEEK_END),
            }
        )
        return b"ok"


#: Larger than Twisted's in-memory limit (100,000 bytes): the upload is spooled to a temporary file.
#: The guest copies the first 4 bytes into a header, so they are printable; the rest is any byte.
UPLOAD = b"head" + random.Random(7).randbytes(299_996)


class BodyRemainderTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_downstream_gets_exactly_the_unread_rest_without_a_copy(self):
        """The guest read 4 bytes: the downstream reads the other 299,996, seekable, with their length,
        from an object that is not an in-memory copy (no BytesIO)."""
        events = self.capture_log()
        recorder = Recorder()
        url = self.serve_guest(self.guest(read_four(0)), recorder)
        status, _, body = yield self.fetch("POST", url + "/", data=UPLOAD)
        self.assertEqual((status, body), (200, b"ok"), log_text(events))
        [seen] = recorder.seen
        self.assertEqual(seen["body"], UPLOAD[4:])
        self.assertEqual(seen["again"], UPLOAD[4:])
        self.assertEqual(seen["length"], b"%d" % (len(UPLOAD) - 4))
        self.assertEqual(seen["tell_end"], len(UPLOAD) - 4)
        self.assertNotIsInstance(seen["content"], io.BytesIO)

    @inlineCallbacks
    def test_small_body_read_in_part(self):
        """A body Twisted holds in memory: still the exact rest and its length."""
        recorder = Recorder()
        url = self.serve_guest(self.guest(read_four(0)), recorder)
        status, _, _ = yield self.fetch("POST", url + "/", data=b"0123456789")
        self.assertEqual(status, 200)
        [seen] = recorder.seen
        self.assertEqual((seen["body"], seen["length"]), (b"456789", b"6"))

    @inlineCallbacks
    def test_body_read_to_its_end_leaves_an_empty_body(self):
        recorder = Recorder()
        url = self.serve_guest(self.guest(read_four(0)), recorder)
        status, _, _ = yield self.fetch("POST", url + "/", data=b"0123")
        self.assertEqual(status, 200)
        [seen] = recorder.seen
        self.assertEqual((seen["body"], seen["length"]), (b"", b"0"))


globals().update(execution_variants(BodyRemainderTestsMixin, ServerTestCase))
