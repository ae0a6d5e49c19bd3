"""Where the downstream's response goes while a guest waits for it: one sink per request.

The filter picks the sink once, when the guest passes the request on and its
features are known (as http-wasm-host-go picks a buffering response writer):

- :class:`StreamedSink` (no ``buffer_response``): the body goes on to the
  client as the downstream writes it, except what would complete the
  response, which waits for ``handle_response``;
- :class:`BufferedSink` (``buffer_response``): the body is collected for
  ``handle_response`` to read and rewrite, up to the buffer limit, and the
  downstream's producer is driven here, since the transport never sees it.

The request's ``write`` (and, buffered, its producer methods) are the sink's
while the downstream runs; ``open`` goes False when the downstream's part is
over, and later writes go nowhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.logger import Logger
from twisted.web.http import NO_BODY_CODES, NO_CONTENT
from twisted.web.server import Request

from ..runtime.budget import BufferBudget
from .access_log import printable
from .twisted_internals import has_response_encoder, raw_header_map, stored_header_name

__all__ = ["BufferedSink", "PureStreamedSink", "StreamedSink", "abort", "is_bodiless"]

_log = Logger(namespace="httpwasm")
_CONTENT_LENGTH = stored_header_name(b"content-length")


def abort(request: Request) -> None:
    """Cut the response: reset the HTTP/2 stream, or abort the HTTP/1 connection."""
    abort_connection = getattr(request.channel, "abortConnection", None)  # H2Stream: RST_STREAM
    if abort_connection is None:
        transport = getattr(request.channel, "transport", None)
        abort_connection = getattr(transport, "abortConnection", None) or getattr(transport, "loseConnection", None)
    if abort_connection is not None:
        abort_connection()


def is_bodiless(request: Request) -> bool:
    """A response that never has body bytes: to HEAD, or with status 1xx, 204 or 304."""
    code = request.code
    return request.method == b"HEAD" or code in NO_BODY_CODES or 100 <= code < 200


class StreamedSink:
    """Sends the body on as it comes, holding back what would complete the response.

    Without buffer_response the response is on the wire before
    ``handle_response`` runs; holding back the write that completes it (or,
    when it has no body bytes at all, its headers) keeps a failure there
    visible to the client (a 500, or an incomplete response: :meth:`cut` sends
    all but the last byte of what was held, then cuts) instead of a complete
    response that hides it.  A body that does not match its own Content-Length cannot desync
    the connection: the excess is not sent, a short body cuts the connection.
    """

    # Its storage is a subclass's: :class:`PureStreamedSink` here, or the compiled fast path's (web/fast.py).
    if not TYPE_CHECKING:
        __slots__ = ()

    request: Request
    prefix: bytes
    guest_name: str
    open: bool
    forward: Callable[[bytes], None]
    _held: bytes
    _declared: int | None
    _accepted: int
    _mismatch_logged: bool

    buffered = False

    def __init__(self, request: Request, prefix: bytes, guest_name: str):
        self.request = request
        #: What the guest wrote as the response body before next: it goes first.
        self.prefix = prefix
        self.guest_name = guest_name
        self.open = True
        self.forward = request.write  # the request's own write, or an outer guest's sink
        self._held = b""
        self._declared: int | None = None
        self._accepted = 0  # body bytes the downstream wrote, sent or held
        self._mismatch_logged = False

    def write(self, data: bytes) -> None:
        if not self.open:
            return  # a late write from a downstream whose request already ended
        request = self.request
        if not request.startedWriting:
            if self.prefix:
                prefix, self.prefix = self.prefix, b""
                length = request.responseHeaders.getRawHeaders(b"content-length")
                if length and length[0].isdigit():
                    request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (int(length[0]) + len(prefix))])
                data = prefix + data
            code = request.code
            if request.method == b"HEAD" or code in NO_BODY_CODES or 100 <= code < 200:
                return  # bodiless: the headers are the whole response, finish() sends them
            # The Content-Length the body will be sent with, if it is sent as is
            # (an encoder, gzip, drops Content-Length and changes the length).
            encoded = has_response_encoder(request)
            length = None if encoded else raw_header_map(request.responseHeaders).get(_CONTENT_LENGTH)
            declared = self._declared = int(length[0]) if length and length[0].isdigit() else None
            if declared == 0:
                return  # likewise; bytes past a length of 0 would desync the connection
        else:
            declared = self._declared
        accepted = self._accepted = self._accepted + len(data)
        if declared is not None and accepted > declared:
            # Bytes past the announced length would be read as the start of the next response.
            data = data[: len(data) - (accepted - declared)]
            self._accepted = accepted = declared
            self._log_length_mismatch("wrote more than", "the excess is not sent")
        if declared is not None and accepted >= declared:
            # The write that completes the body waits whole for handle_response: one write then
            # instead of two, and a failure there still cuts a started response (see cut()).
            if data:
                self._held += data
            return
        if data or not request.startedWriting:
            self.forward(data)

    @property
    def started(self) -> bool:
        """Whether the response counts as on the wire: started, or its completing write held back."""
        return bool(self.request.startedWriting or self._held)

    def cut(self) -> None:
        """End the response as incomplete: all but the last byte of what was held back, then cut."""
        held, self._held = self._held, b""
        if held:
            self.forward(held[:-1])
        abort(self.request)

    def downstream_finished(self) -> None:
        """The downstream finished: a prefix it never followed with a write is the body."""
        prefix, self.prefix = self.prefix, b""
        if prefix:
            request = self.request
            if not request.startedWriting and not request.responseHeaders.hasHeader(b"content-length"):
                request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(prefix)])
            self.write(prefix)
        self.open = False

    def complete(self) -> None:
        """The guest is done with the response: send what was held back and finish."""
        request = self.request
        declared = self._declared
        if declared is not None and self._accepted < declared and request.startedWriting:
            # The client would wait for the missing bytes; cutting the connection says it is incomplete.
            self._log_length_mismatch("finished short of", "closing the connection")
            abort(request)
            return
        held, self._held = self._held, b""
        if held:
            request.write(held)
        elif not request.startedWriting:
            code = request.code
            if code == NO_CONTENT or 100 <= code < 200:
                # 1xx and 204 responses carry no Content-Length (RFC 9110 8.6); Twisted's render sets one.
                request.responseHeaders.removeHeader(b"content-length")
        request.finish()

    def _log_length_mismatch(self, what: str, action: str) -> None:
        if self._mismatch_logged:
            return
        self._mismatch_logged = True
        _log.warn(
            "downstream of guest {guest} {what} its Content-Length of {length} for {method} {uri}; {action}",
            guest=self.guest_name,
            what=what,
            length=self._declared,
            method=printable(self.request.method),
            uri=printable(self.request.uri),
            action=action,
        )

    def stop_producer(self) -> None:
        """Streamed, the downstream's producer is the transport's business."""


class PureStreamedSink(StreamedSink):
    """A :class:`StreamedSink` with its storage in slots: the pure-Python path's."""

    __slots__ = (
        "_accepted",
        "_declared",
        "_held",
        "_mismatch_logged",
        "forward",
        "guest_name",
        "open",
        "prefix",
        "request",
    )


class BufferedSink:
    """Collects the whole body for ``handle_response``, up to ``limit`` bytes.

    Past the limit ``on_overflow`` is called once and the sink closes; when the
    process-wide ``budget`` of buffered bytes has no room for a write,
    ``on_full`` is called once instead.  The bytes held are reserved in the
    budget until :meth:`release` (the request is over).  The downstream's
    producer is driven here: a pull producer is pumped once per reactor turn, a
    push producer writes on its own.
    """

    __slots__ = (
        "_budget",
        "_on_full",
        "_on_overflow",
        "_producer",
        "_reactor",
        "body",
        "forward",
        "limit",
        "open",
        "reserved",
    )

    buffered = True

    def __init__(
        self,
        prefix: bytes,
        limit: int,
        on_overflow: Callable[[], None],
        reactor: Any,
        budget: BufferBudget | None = None,
        on_full: Callable[[], None] | None = None,
    ):
        #: The body so far, starting with what the guest wrote before next.
        self.body = bytearray(prefix)
        self.limit = limit
        self.open = True
        self.forward: Callable[[bytes], None] | None = None
        self._on_overflow: Callable[[], None] = on_overflow
        self._on_full: Callable[[], None] = on_full or on_overflow
        self._budget = budget
        self.reserved = 0  # bytes of this body counted in the budget
        self._reactor = reactor
        self._producer: Any = None

    def write(self, data: bytes) -> None:
        if not self.open:
            return
        budget = self._budget
        if budget is not None:
            if not budget.reserve(len(data)):
                self._refuse(self._on_full)
                return
            self.reserved += len(data)
        body = self.body
        body += data
        if len(body) > self.limit:
            self._refuse(self._on_overflow)

    def _refuse(self, then: Callable[[], None]) -> None:
        self.close()
        then()

    def close(self) -> None:
        """No more body is wanted: drop what was collected and stop the downstream's producer.

        It also lets go of the filter's callbacks, so that the filter, its
        request and this sink form no reference cycle that only the cycle
        collector would free.
        """
        self.open = False
        self.body = bytearray()
        self.release()  # the bytes are gone: other requests may buffer them at once
        self._on_overflow = self._on_full = _nothing
        self.stop_producer()

    def release(self) -> None:
        """The request is over: give its bytes back to the budget (once)."""
        reserved, self.reserved = self.reserved, 0
        if reserved and self._budget is not None:
            self._budget.release(reserved)

    def register_producer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        if not streaming and IPullProducer.providedBy(producer):
            self._pump()

    def _pump(self) -> None:
        producer = self._producer
        if producer is None or not self.open:
            return
        producer.resumeProducing()
        if self._producer is producer:
            self._reactor.callLater(0, self._pump)

    def unregister_producer(self) -> None:
        self._producer = None

    def stop_producer(self) -> None:
        """Stop the downstream's producer: its response is not wanted any more."""
        producer, self._producer = self._producer, None
        if producer is not None and (IPushProducer.providedBy(producer) or IPullProducer.providedBy(producer)):
            try:
                producer.stopProducing()
            except Exception:  # noqa: BLE001 - the downstream's own problem; the request is ending
                _log.failure("stopping the downstream's producer failed")

    def take(self) -> bytearray:
        """The downstream finished: the whole body (the sink is closed; the bytes stay reserved)."""
        self.open = False
        self._on_overflow = self._on_full = _nothing
        body, self.body = self.body, bytearray()
        return body


def _nothing() -> None:
    """A closed sink's callback."""
