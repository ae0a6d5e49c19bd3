"""The per-request filter: pins one guest instance from request to response.

A :class:`RequestFilter` is made for each request that reaches a
:class:`~twisted_httpwasm.web.resource.GuestResource`.  It

1. snapshots the request as plain data and runs ``handle_request`` (in a
   worker thread or inline) on an instance it takes from the pool and pins;
2. applies what the guest changed to the real ``Request`` on the reactor
   thread, redoes resource traversal on the (possibly rewritten) path and
   renders the downstream resource, watching its ``write``/``finish``;
3. runs ``handle_response`` on the *same* instance when the downstream is
   done, failed, or the client went away, then gives the instance back to the
   pool exactly once.
"""

from __future__ import annotations

import enum
import io
import math
import re
import time
from collections.abc import Iterable
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote_to_bytes

from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource, _IEncodingResource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from ..abi import Feature
from ..runtime.guest import Guest, GuestInstance, GuestTrap
from ..runtime.observe import NO_OBSERVER, Outcome
from ..runtime.pool import GuestUnavailable
from ..runtime.state import BodyTooLarge, RequestState
from .backend_request import remember_client_headers
from .runners import Runner

__all__ = ["FilterSettings", "RequestFilter"]


class FilterSettings(Protocol):
    """What a filter needs from the resource that made it (a ``GuestResource``)."""

    guest: Guest
    downstream: Any
    reactor: Any
    runner: Runner
    fail_open: bool
    noted_framing_headers: set[bytes]


_log = Logger(namespace="httpwasm")

_ERROR_BODIES = {
    http.INTERNAL_SERVER_ERROR: b"Internal Server Error\n",
    http.BAD_GATEWAY: b"Bad Gateway\n",
    http.SERVICE_UNAVAILABLE: b"Service Unavailable\n",
    http.REQUEST_ENTITY_TOO_LARGE: b"Request Entity Too Large\n",
}

#: Response headers that frame the message or describe the connection: only the host sets
#: them, to match the bytes it sends (RFC 9112 6, RFC 9110 7.6.1). A guest's are dropped.
_FRAMING_HEADERS = frozenset(
    {
        b"connection",
        b"content-length",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_HOOKED = ("write", "finish", "processingFailed", "registerProducer", "unregisterProducer")
_BUFFER_REQUEST = int(Feature.BUFFER_REQUEST)
_BUFFER_RESPONSE = int(Feature.BUFFER_RESPONSE)


class _Stage(enum.Enum):
    GUEST_REQUEST = "handle_request"
    DOWNSTREAM = "downstream"
    GUEST_RESPONSE = "handle_response"
    DONE = "done"


def _source_addr(request: Request) -> bytes:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return b""
    if ":" in host:
        return f"[{host}]:{port}".encode()
    return f"{host}:{port}".encode()


def _protocol(request: Request) -> bytes:
    proto = request.clientproto or b"HTTP/1.0"
    return b"HTTP/2.0" if proto in (b"HTTP/2", b"HTTP/2.0") else proto


def _abort(request: Request) -> None:
    """Cut the response: reset the HTTP/2 stream, or abort the HTTP/1 connection."""
    abort = getattr(request.channel, "abortConnection", None)  # H2Stream: RST_STREAM
    if abort is None:
        transport = getattr(request.channel, "transport", None)
        abort = getattr(transport, "abortConnection", None) or getattr(transport, "loseConnection", None)
    if abort is not None:
        abort()


def _ignore(*args: object) -> None:
    """Stands in for the request methods of a downstream the filter has cut off."""


#: What a request-target may hold (RFC 3986: printable ASCII), as ``set_uri`` requires of guests.
_URI_BYTES = re.compile(rb"[\x21-\x7e]*\Z")


def _unusable_path(request: Request) -> str | None:
    """Why a downstream cannot take the request's path, if so: the client's error (400).

    Raw control, space, DEL or non-ASCII bytes are not part of any URI (Twisted's
    client, under ``--proxy``, raises on them).  A NUL byte (sent encoded, ``%00``)
    cannot be part of a file name, and most code handed one raises deep inside;
    ``static.File`` logs a traceback for every path segment that is not UTF-8 once
    percent-decoded.
    """
    if not _URI_BYTES.match(request.uri or b""):
        return "a byte that a URI cannot hold (not printable ASCII)"
    for segment in request.postpath or ():
        if b"\x00" in segment:
            return "a NUL byte in the path"
        try:
            segment.decode("utf-8")
        except UnicodeDecodeError:
            return "a path segment that is not UTF-8"
    return None


class _BadRequest(Resource):
    """Answers 400 with a short plain body, for a request no downstream can take."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: Request) -> bytes:
        request.setResponseCode(http.BAD_REQUEST)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Bad Request\n"


class _BodyRemainder(io.RawIOBase):
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


def _raw_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Every (name, value) pair, in order; RequestState lowercases the names."""
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


class RequestFilter:
    """One request's passage through a guest, holding its pinned instance."""

    def __init__(self, wrapper: FilterSettings, request: Request):
        # Before any guest changes them: a proxy downstream tells the client's headers from a guest's.
        remember_client_headers(request)
        self.wrapper = wrapper
        self.guest = wrapper.guest
        self.request = request
        self.instance: GuestInstance | None = None
        self.stage = _Stage.GUEST_REQUEST
        self.req_ctx = 0
        self.next_called = False
        self.client_gone = False
        self.downstream_failure: Failure | None = None
        self._buffering = False
        self._buffer = bytearray()
        self._prefix = b""
        self._held = b""  # the last byte of a sized streamed response, sent once handle_response succeeded
        self._declared_length: int | None = None
        self._accepted = 0  # body bytes the downstream wrote, sent or held
        self._length_mismatch_logged = False
        self._original_response: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        self._producer: Any = None
        self._detached_body: Any = None
        self._hooked = False
        self._saved_hooks: dict[str, Any] = {}
        self._forward_write: Any = None
        self._cut_off = False  # the downstream was stopped mid-response (buffer limit)
        self._mount = list(request.prepath or [])
        # Twisted's own Connection header (close, when the client asked for it), set before rendering.
        self._host_connection = request.responseHeaders.getRawHeaders(b"connection")
        body = request.content
        self._content_length = 0  # the body as received: Twisted holds all of it by now, sized or chunked
        if body is not None:
            self._content_length = body.seek(0, io.SEEK_END)
            body.seek(0)
        self.state = RequestState(
            method=request.method,
            uri=request.uri,
            protocol=_protocol(request),
            source_addr=_source_addr(request),
            headers=_raw_headers(request.requestHeaders),
            body=body,
            max_buffer_bytes=self.guest.max_buffer_bytes,
        )
        if self.guest.observer is not NO_OBSERVER:
            self._observed_from = time.monotonic()
            request.notifyFinish().addBoth(self._tell_observer)

    def _tell_observer(self, result: object) -> None:
        """INTERIM (issue 13), until the request path reports each ending itself: the outcome, inferred."""
        state, request = self.state, self.request
        failed = {kind for _, _, _, kind in state.calls if kind is not None}
        code = request.code
        outcome = Outcome.PASSED
        if failed:
            outcome = Outcome.TIMED_OUT if "timeout" in failed else Outcome.TRAPPED
            if self.wrapper.fail_open and code != http.INTERNAL_SERVER_ERROR:
                outcome = Outcome.FAIL_OPEN
        elif code == http.REQUEST_ENTITY_TOO_LARGE:
            outcome = Outcome.TOO_LARGE
        elif code == http.SERVICE_UNAVAILABLE and not state.calls:
            outcome = Outcome.UNAVAILABLE
        elif code == http.BAD_GATEWAY:
            outcome = Outcome.BAD_GATEWAY
        elif isinstance(result, Failure):
            outcome = Outcome.CLIENT_GONE
        elif state.calls and not self.next_called:
            outcome = Outcome.ANSWERED
        self.guest.observer.request_finished(self.guest, request, state, outcome, self._observed_from)

    # -- 1. handle_request ---------------------------------------------------------

    def start(self) -> object:
        """Render entry point: always answers asynchronously (NOT_DONE_YET)."""
        # Twisted closes request.content when the client goes away, which must not
        # happen under a guest reading it in a worker: the request has no body
        # until handle_request is over.
        self._detached_body = self.request.content
        self.request.content = None
        self.request.notifyFinish().addErrback(self._connection_lost)
        self.wrapper.runner.run(
            self._run_handle_request, self._after_handle_request, self._handle_request_failed, self._client_there
        )
        return NOT_DONE_YET

    def _client_there(self) -> bool:
        """Asked before a queued handle_request starts: a call for a client that left is dropped."""
        return not self.client_gone

    def _run_handle_request(self) -> bool:
        """Worker side: pin an instance and run ``handle_request``."""
        instance = self.guest.pool.acquire()
        self.instance = instance
        if instance.features & _BUFFER_REQUEST:
            self._check_request_size()
        ctx = instance.handle_request(self.state)
        self.req_ctx = ctx.req_ctx
        if not ctx.next:
            self._release()
        return ctx.next

    def _check_request_size(self) -> None:
        self.state.check_size(self._content_length)

    def _reattach_body(self) -> None:
        """Give the request its body back for the downstream (kept by the filter if the client left)."""
        if not self.client_gone:
            self.request.content, self._detached_body = self._detached_body, None

    def _handle_request_failed(self, error: BaseException) -> None:
        self._reattach_body()
        if isinstance(error, BodyTooLarge):
            self._release()
            self._log_refusal("request body too large for buffer_request", error)
            self._fail(http.REQUEST_ENTITY_TOO_LARGE)
            return
        self._release()
        if isinstance(error, GuestUnavailable):
            self._log_refusal("no guest instance available", error)
            # When the pool will try to create an instance again (whole seconds, at least 1).
            self.request.setHeader(b"retry-after", b"%d" % max(1, math.ceil(error.retry_after)))
            self._fail(http.SERVICE_UNAVAILABLE)
            return
        self._log_guest_failure("handle_request", error)
        if self.wrapper.fail_open and not self.client_gone:
            # Pass the untouched request on, without the guest.
            self.stage = _Stage.DOWNSTREAM
            if self.request.content is not None:
                self.request.content.seek(0)
            self._render_downstream(hooked=False)
            return
        self._fail(http.INTERNAL_SERVER_ERROR)

    def _after_handle_request(self, next_: bool) -> None:
        self._reattach_body()
        if not next_:
            self.stage = _Stage.DONE
            if not self.client_gone:
                self._send_guest_response()
            return
        self.next_called = True
        state = self.state
        if self.client_gone:
            self._enter_response_phase(self.request.code, [], None)
            self._run_handle_response(is_error=True)
            return
        if state.features & _BUFFER_REQUEST:
            try:
                self._check_request_size()
            except BodyTooLarge as error:
                self._log_refusal("request body too large for buffer_request", error)
                self._enter_response_phase(http.REQUEST_ENTITY_TOO_LARGE, [], None)
                self._run_handle_response(is_error=True, then_status=http.REQUEST_ENTITY_TOO_LARGE)
                return
        self._apply_request_changes()
        self.stage = _Stage.DOWNSTREAM
        self._render_downstream(hooked=True)

    def _send_guest_response(self) -> None:
        request, state = self.request, self.state
        if state.status < 200:
            # An interim status as the whole answer: the client would read the next response as its end.
            _log.error(
                "guest {guest} answered {method} {uri} with the interim status {status}, "
                "which cannot end a response; answering 500",
                guest=self.guest.name,
                method=request.method,
                uri=request.uri,
                status=state.status,
            )
            self._fail(http.INTERNAL_SERVER_ERROR)
            return
        request.setResponseCode(state.status)
        self._merge_guest_response_headers()  # over an outer guest's, when chained
        body = bytes(state.response_body or b"")
        request.responseHeaders.removeHeader(b"transfer-encoding")
        if self._has_body_status(request.code):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            request.write(body)
        else:
            request.responseHeaders.removeHeader(b"content-length")
        request.finish()

    @staticmethod
    def _has_body_status(status: int) -> bool:
        """False for the statuses that never have a body: 1xx, 204, 304."""
        return status >= 200 and status not in http.NO_BODY_CODES

    # -- 2. the downstream -------------------------------------------------------------

    def _apply_request_changes(self) -> None:
        request, state = self.request, self.state
        if state.method_changed:
            request.method = state.method
        if state.request_headers.changed:
            headers = Headers()
            for name, value in state.request_headers.items():
                headers.addRawHeader(name, value)
            request.requestHeaders = headers
        body: Any = None
        length = 0
        if state.request_body is not None:
            body = io.BytesIO(state.request_body)
            length = len(state.request_body)
        elif state.request_reader.consumed and not state.features & _BUFFER_REQUEST and request.content is not None:
            # What the guest read is gone; the rest is read from where Twisted spooled it, not copied.
            start = state.request_reader.consumed
            length = max(0, self._content_length - start)
            body = io.BufferedReader(_BodyRemainder(request.content, start, length))
        if body is not None:
            request.content = body
            request.requestHeaders.removeHeader(b"transfer-encoding")
            request.requestHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        elif request.content is not None:
            request.content.seek(0)
        if state.uri_changed:
            request.uri = state.uri
            path, _, query = state.uri.partition(b"?")
            request.path = path
            request.args = http.parse_qs(query, 1)
            segments = [unquote_to_bytes(segment) for segment in path[1:].split(b"/")]
            mount = self._mount
            if segments[: len(mount)] == mount:
                segments = segments[len(mount) :]
            request.prepath = list(mount)
            request.postpath = segments
        # What the guest set on the response before next is part of the final response.
        self._merge_guest_response_headers()
        if state.status_changed:
            if state.status >= 200:
                request.setResponseCode(state.status)
            else:
                self._note_dropped(b":status", f"set the interim status {state.status} on the response")
        self._prefix = bytes(state.response_body or b"")
        self._buffering = bool(state.features & _BUFFER_RESPONSE)
        if self._buffering:
            self._buffer = bytearray(self._prefix)
            self._prefix = b""

    def _merge_guest_response_headers(self) -> None:
        """Set each response header the guest set in handle_request, over what the request has.

        Framing and connection headers are left out: the host sets those for the bytes it sends.
        """
        headers = self.state.response_headers
        for name in headers.names():
            if name in _FRAMING_HEADERS:
                self._note_dropped(name, f"set the response header {name.decode('latin-1')}")
            else:
                self.request.responseHeaders.setRawHeaders(name, headers.values(name))

    def _note_dropped(self, key: bytes, what: str) -> None:
        """Say once per resource and ``key`` why something a guest set for framing is not sent."""
        noted = self.wrapper.noted_framing_headers
        if key not in noted:
            noted.add(key)
            _log.debug(
                "guest {guest} {what}; the host frames responses itself and does not send it (reported once)",
                guest=self.guest.name,
                what=what,
            )

    def _fresh_response_headers(self, headers: Iterable[tuple[bytes, bytes]] = ()) -> Headers:
        """``headers`` without framing headers, plus Twisted's own Connection header."""
        fresh = Headers()
        for name, value in headers:
            if name.lower() not in _FRAMING_HEADERS:
                fresh.addRawHeader(name, value)
        if self._host_connection:
            fresh.setRawHeaders(b"connection", self._host_connection)
        return fresh

    def _render_downstream(self, hooked: bool) -> None:
        """Traverse and render the downstream as ``Request.process`` would have."""
        request = self.request
        if hooked:
            self._hook()
        try:
            refusal = _unusable_path(request)
            if refusal is not None:
                # The client's error: one line, no traceback (a traceback per request floods the log).
                _log.info(
                    "refusing {method} {uri}: {refusal}; answering 400",
                    method=repr(request.method)[2:-1],  # escaped: these are the client's bytes
                    uri=repr(request.uri)[2:-1],
                    refusal=refusal,
                )
                resource: Any = _BadRequest()
            else:
                resource = getChildForRequest(self.wrapper.downstream, request)
            if _IEncodingResource.providedBy(resource):
                encoder = resource.getEncoder(request)
                if encoder is not None:
                    request._encoder = encoder
            request.render(resource)
        except BaseException:  # noqa: BLE001 - as Request.process: any failure is the request's 500
            request.processingFailed(Failure())

    def _hook(self) -> None:
        """Watch the downstream's writes and ending.

        What was there before is kept and forwarded to: the request's own methods,
        or the hooks of an outer guest's filter when guests are chained.
        """
        request: Any = self.request
        self._hooked = True
        attributes = request.__dict__
        if "write" in attributes or "finish" in attributes:  # an outer guest's hooks
            self._saved_hooks = {name: attributes[name] for name in _HOOKED if name in attributes}
        self._forward_write = request.write
        request.write = self._downstream_write
        request.finish = self._downstream_finish
        request.processingFailed = self._downstream_failed
        if self._buffering:
            request.registerProducer = self._register_producer
            request.unregisterProducer = self._unregister_producer

    def _unhook(self) -> None:
        if not self._hooked:
            return  # never touch hooks that are not ours (an outer guest's, when chained)
        self._hooked = False
        request: Any = self.request
        for name in _HOOKED:
            if name in self._saved_hooks:
                setattr(request, name, self._saved_hooks[name])
            else:
                request.__dict__.pop(name, None)

    def _downstream_write(self, data: bytes) -> None:
        if self.stage is not _Stage.DOWNSTREAM or self.client_gone:
            return  # late write from a downstream whose request already ended
        if self._buffering:
            self._buffer += data
            if len(self._buffer) > self.guest.max_buffer_bytes:
                self._buffer_overflow()
            return
        if self._prefix:
            prefix, self._prefix = self._prefix, b""
            length = self.request.responseHeaders.getRawHeaders(b"content-length")
            if length and length[0].isdigit():
                self.request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (int(length[0]) + len(prefix))])
            data = prefix + data
        self._stream(data)

    def _stream(self, data: bytes) -> None:
        """Send body bytes on, holding back what would complete the response.

        Without buffer_response the response is on the wire before ``handle_response``
        runs; holding back its last byte (or, when it has no body bytes at all, its
        headers) keeps a failure there visible to the client (a 500, or an incomplete
        response) instead of a complete response that hides it.
        """
        request = self.request
        if not request.startedWriting:
            if self._bodiless():
                return  # the headers are the whole response: finish() sends them
            self._declared_length = self._sized_body_length()
            if self._declared_length == 0:
                return  # likewise; bytes past a length of 0 would desync the connection
        self._accepted += len(data)
        declared = self._declared_length
        if declared is not None and self._accepted > declared:
            # Bytes past the announced length would be read as the start of the next response.
            data = data[: len(data) - (self._accepted - declared)]
            self._accepted = declared
            self._log_length_mismatch("wrote more than", "the excess is not sent")
        data, self._held = self._held + data, b""
        if declared is not None and self._accepted >= declared and data:
            data, self._held = data[:-1], data[-1:]
        if data or not request.startedWriting:
            self._forward_write(data)

    def _bodiless(self) -> bool:
        """A response that never has body bytes: to HEAD, or with status 1xx, 204 or 304."""
        request = self.request
        return request.method == b"HEAD" or request.code in http.NO_BODY_CODES or 100 <= request.code < 200

    def _sized_body_length(self) -> int | None:
        """The Content-Length the body will be sent with, if it is sent as is."""
        request = self.request
        if getattr(request, "_encoder", None) is not None:
            return None  # an encoder (gzip) drops Content-Length and changes the length
        length = request.responseHeaders.getRawHeaders(b"content-length")
        return int(length[0]) if length and length[0].isdigit() else None

    def _finish_streamed(self) -> None:
        """The streamed response succeeded: send what was held back and finish."""
        declared = self._declared_length
        if declared is not None and self._accepted < declared and self.request.startedWriting:
            # The client would wait for the missing bytes; cutting the connection says it is incomplete.
            self._log_length_mismatch("finished short of", "closing the connection")
            _abort(self.request)
            return
        held, self._held = self._held, b""
        if held:
            self.request.write(held)
        elif not self.request.startedWriting:
            self._drop_length_of_no_content()
        self.request.finish()

    def _log_length_mismatch(self, what: str, action: str) -> None:
        if self._length_mismatch_logged:
            return
        self._length_mismatch_logged = True
        _log.warn(
            "downstream of guest {guest} {what} its Content-Length of {length} for {method} {uri}; {action}",
            guest=self.guest.name,
            what=what,
            length=self._declared_length,
            method=self.request.method,
            uri=self.request.uri,
            action=action,
        )

    def _drop_length_of_no_content(self) -> None:
        """1xx and 204 responses carry no Content-Length (RFC 9110 8.6); Twisted's render sets one."""
        request = self.request
        if request.code == http.NO_CONTENT or 100 <= request.code < 200:
            request.responseHeaders.removeHeader(b"content-length")

    def _buffer_overflow(self) -> None:
        _log.error(
            "guest {guest}: buffered response for {uri} exceeds {limit} bytes; answering 502",
            guest=self.guest.name,
            uri=self.request.uri,
            limit=self.guest.max_buffer_bytes,
        )
        self._buffer = bytearray()
        self._cut_off = True
        self._stop_producer()
        self.stage = _Stage.GUEST_RESPONSE
        self._enter_response_phase(http.BAD_GATEWAY, [], None)
        self._run_handle_response(is_error=True, then_status=http.BAD_GATEWAY)

    def _downstream_finish(self) -> None:
        if self.stage is not _Stage.DOWNSTREAM or self.client_gone:
            return
        self.stage = _Stage.GUEST_RESPONSE
        if self._prefix and not self._buffering:
            self._downstream_write_prefix_only()
        request = self.request
        headers = _raw_headers(request.responseHeaders)
        headers += [(b"set-cookie", cookie) for cookie in request.cookies]
        if self._buffering:
            body = bytes(self._buffer)
            self._buffer = bytearray()
            self._original_response = (request.code, headers, body)
            self._enter_response_phase(request.code, headers, body)
        else:
            self._enter_response_phase(request.code, headers, None)
        self._run_handle_response(is_error=False)

    def _downstream_write_prefix_only(self) -> None:
        prefix, self._prefix = self._prefix, b""
        if not self.request.startedWriting and not self.request.responseHeaders.hasHeader(b"content-length"):
            self.request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(prefix)])
        self._stream(prefix)

    def _downstream_failed(self, reason: Failure) -> Failure:
        if self.stage is not _Stage.DOWNSTREAM or self.client_gone:
            return reason
        self.stage = _Stage.GUEST_RESPONSE
        self.downstream_failure = reason
        self._stop_producer()
        self._enter_response_phase(http.INTERNAL_SERVER_ERROR, [], None)
        self._run_handle_response(is_error=True)
        return reason

    def _register_producer(self, producer: Any, streaming: bool) -> None:
        """Buffer mode: the transport never sees the bytes, so drive producers here."""
        self._producer = producer
        if not streaming and IPullProducer.providedBy(producer):
            self._pump()

    def _pump(self) -> None:
        producer = self._producer
        if producer is None or self.stage is not _Stage.DOWNSTREAM:
            return
        producer.resumeProducing()
        if self._producer is producer:
            self.wrapper.reactor.callLater(0, self._pump)

    def _unregister_producer(self) -> None:
        self._producer = None

    def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None and (IPushProducer.providedBy(producer) or IPullProducer.providedBy(producer)):
            try:
                producer.stopProducing()
            except Exception:  # noqa: BLE001 - the downstream's own problem; the request is ending
                _log.failure("stopping the downstream's producer failed")

    # -- 3. handle_response --------------------------------------------------------------

    def _enter_response_phase(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes | None) -> None:
        self.stage = _Stage.GUEST_RESPONSE
        self.state.enter_response_phase(status, headers, body)

    def _run_handle_response(self, *, is_error: bool, then_status: int | None = None) -> None:
        def work() -> None:
            instance = self.instance
            assert instance is not None
            try:
                instance.handle_response(self.state, self.req_ctx, is_error)
            finally:
                self._release()

        def done(_: None) -> None:
            self._after_handle_response(then_status)

        def failed(error: BaseException) -> None:
            self._handle_response_failed(error, then_status)

        self.state.is_error = is_error
        self.wrapper.runner.run(work, done, failed)

    def _after_handle_response(self, then_status: int | None) -> None:
        self.stage = _Stage.DONE
        if self.client_gone:
            return  # the hooks stay: they swallow the downstream's late writes and finish
        self._unhook()
        if then_status is not None:
            self._fail(then_status)
        elif self.downstream_failure is not None:
            self._answer_downstream_failure(self.downstream_failure)
        elif self._buffering:
            self._send_buffered(
                self.state.status, self.state.response_headers.items(), bytes(self.state.response_body or b"")
            )
        else:
            self._finish_streamed()

    def _answer_downstream_failure(self, failure: Failure) -> None:
        """Twisted's usual 500, unless part of the downstream's response is already sent.

        A failure whose exception names an ``http_status`` (the proxy's ``BadGateway``)
        is answered with that status and a short plain body instead.
        """
        request = self.request
        status = getattr(failure.value, "http_status", None)
        if not request.startedWriting and isinstance(status, int) and 400 <= status <= 599:
            # An expected failure (the proxy's dead backend): a warning, not a traceback.
            _log.warn(
                "downstream of guest {guest} failed for {method} {uri}: {reason}; answering {status}",
                guest=self.guest.name,
                method=request.method,
                uri=request.uri,
                reason=failure.getErrorMessage(),
                status=status,
            )
            self._fail(status)
            return
        if not request.startedWriting:
            request.processingFailed(failure)
            return
        # An error page glued to a partial body would pass for a whole response.
        _log.failure(
            "downstream of guest {guest} failed after starting its response to {method} {uri}; closing",
            failure=failure,
            guest=self.guest.name,
            method=request.method,
            uri=request.uri,
        )
        _abort(request)

    def _send_buffered(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        request = self.request
        if status < 200:  # an interim status cannot end a response: keep the downstream's
            self._note_dropped(b":status", f"set the interim status {status} on the response")
            downstream = self._original_response
            status = downstream[0] if downstream is not None and downstream[0] >= 200 else http.INTERNAL_SERVER_ERROR
        request.setResponseCode(status)
        request.cookies = []
        request.responseHeaders = self._fresh_response_headers(headers)
        if self._has_body_status(status):
            if request.method != b"HEAD" or body:
                request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            else:
                # A HEAD response has no body to measure: it keeps the Content-Length a GET
                # would have, as the downstream set it.
                original = self._original_response[1] if self._original_response is not None else []
                lengths = [value for name, value in original if name.lower() == b"content-length"]
                if lengths:
                    request.responseHeaders.setRawHeaders(b"content-length", lengths[-1:])
            request.write(body)
        request.finish()

    def _handle_response_failed(self, error: BaseException, then_status: int | None) -> None:
        self.stage = _Stage.DONE
        self._log_guest_failure("handle_response", error)
        if self.client_gone:
            return  # the hooks stay: they swallow the downstream's late writes and finish
        self._unhook()
        request = self.request
        if then_status is not None:
            self._fail(then_status)
        elif self.downstream_failure is not None:
            self._answer_downstream_failure(self.downstream_failure)
        elif self.wrapper.fail_open and self._original_response is not None:
            self._send_buffered(*self._original_response)
        elif self.wrapper.fail_open and not self._buffering:
            self._finish_streamed()
        elif request.startedWriting:
            # Part of the response is on the wire: the only honest signal left is to cut it.
            _abort(request)
        else:
            self._fail(http.INTERNAL_SERVER_ERROR)

    # -- endings ----------------------------------------------------------------------------

    def _release(self) -> None:
        """Give the pinned instance back, exactly once (thread-safe: pool is locked)."""
        instance, self.instance = self.instance, None
        if instance is not None:
            self.guest.pool.release(instance)
        if self.client_gone and self._detached_body is not None:
            # No guest call and no downstream will read it any more.
            body, self._detached_body = self._detached_body, None
            body.close()

    def _fail(self, status: int) -> None:
        request = self.request
        if self.client_gone or request.finished:
            return
        self._unhook()
        body = _ERROR_BODIES.get(status, b"Error\n")
        request.setResponseCode(status)
        request.cookies = []
        retry_after = request.responseHeaders.getRawHeaders(b"retry-after")
        request.responseHeaders = self._fresh_response_headers([(b"content-type", b"text/plain; charset=utf-8")])
        if retry_after:
            request.responseHeaders.setRawHeaders(b"retry-after", retry_after)
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        request.write(body)
        request.finish()
        if self._cut_off:
            # A downstream that was cut off may still write and finish: those calls go nowhere.
            request.write = request.finish = request.unregisterProducer = _ignore  # type: ignore[method-assign]

    def _log_guest_failure(self, phase: str, error: BaseException) -> None:
        """The reason a guest call failed goes to the log (never to the client)."""
        _log.error(
            "guest {guest} failed in {phase} for {method} {uri}: {reason}",
            guest=self.guest.name,
            phase=phase,
            method=self.request.method,
            uri=self.request.uri,
            reason=error.reason if isinstance(error, GuestTrap) else repr(error),
        )

    def _log_refusal(self, what: str, error: BaseException) -> None:
        _log.warn(
            "guest {guest}: {what} for {uri}: {error}",
            guest=self.guest.name,
            what=what,
            uri=self.request.uri,
            error=error,
        )

    def _connection_lost(self, reason: Failure) -> None:
        """The client went away: release everything without writing again."""
        self.client_gone = True
        self._stop_producer()
        if self.stage is _Stage.DOWNSTREAM:
            # The hooks stay on: a downstream that does not watch notifyFinish may still
            # write and finish, which Twisted would answer with RuntimeError.
            if self.next_called:
                self._enter_response_phase(self.request.code, [], None)
                self._run_handle_response(is_error=True)
            else:
                self.stage = _Stage.DONE
        # GUEST_REQUEST / GUEST_RESPONSE: the running call sees client_gone when it returns.
