"""The one place twisted.web's private names are used (``tests/test_twisted_fence.py`` keeps it so).

Twisted may rename or drop any name starting with ``_`` in any release, without
a deprecation.  Each reliance of the adapter on one is a small function (or
class) here, whose docstring says what it relies on; every one is there in
each supported Twisted, from 24.7 (the oldest, checked in CI) to 26.x; the
supported range is declared in ``setup.cfg`` (``twisted >= 24.7, < 27``) and
``tests/test_twisted_internals.py`` exercises every function here against the
installed Twisted, so a release that breaks one fails there, by name, rather
than somewhere in a request.  CI runs those tests on the oldest and the newest
supported Twisted (``.ci/oldest-newest``).

The service layer's own (``twistd`` options, endpoints) are in
:mod:`twisted_httpwasm.service.twisted_internals`.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorFDSet
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, _IEncodingResource

__all__ = [
    "ChannelSwitch",
    "ContinueVetoChannel",
    "add_internal_reader",
    "can_add_internal_reader",
    "channel_of",
    "escape_log_field",
    "flush_h2_control_data",
    "forget_h2_stream",
    "h2_connection_of",
    "has_response_encoder",
    "http_channel_protocol",
    "install_response_encoder",
    "is_encoding_resource",
    "quiet_connection_pool",
    "raw_header_map",
    "receiving_headers",
    "remove_internal_reader",
    "request_disconnected",
    "reset_h2_stream_after_cleanup",
    "stored_header_name",
    "stream_requests",
    "transport_aborted",
    "watch_finish",
]


def escape_log_field(text: bytes | str) -> str:
    """``text`` escaped as twisted.web's combined access log escapes a field.

    Relies on ``twisted.web.http._escape``, so that a
    field this adapter appends reads like the ones Twisted writes.
    """
    escaped: str = http._escape(text)
    return escaped


# -- the reactor -------------------------------------------------------------------


def can_add_internal_reader(reactor: Any) -> bool:
    """Whether :func:`add_internal_reader` works on ``reactor`` (a POSIX reactor's ``_internalReaders``)."""
    return IReactorFDSet.providedBy(reactor) and isinstance(getattr(reactor, "_internalReaders", None), set)


def add_internal_reader(reactor: Any, reader: Any) -> None:
    """Watch ``reader`` as the reactor watches its own waker.

    Relies on ``PosixReactorBase._internalReaders``: ``removeAll`` (trial's
    clean-up between tests, ``disconnectAll`` at shutdown) leaves such readers
    in place, so a process-wide reader (the guest workers' lane) is not taken
    for a test's leftover and removed while calls still need it.
    """
    reactor._internalReaders.add(reader)
    reactor.addReader(reader)


def remove_internal_reader(reactor: Any, reader: Any) -> None:
    """Stop watching a reader added with :func:`add_internal_reader`."""
    reactor.removeReader(reader)
    reactor._internalReaders.discard(reader)


# -- requests --------------------------------------------------------------------


def request_disconnected(request: Any) -> bool:
    """Whether ``request``'s connection was lost (``Request._disconnected``).

    A request whose client went away is not finished, and ``notifyFinish`` has
    fired for it already: the drain and the filter must not wait for it.  Any
    object without the attribute (a test double) counts as connected.
    """
    return bool(getattr(request, "_disconnected", False))


#: A ``Headers``' own map of header names to their lists of values (``Headers._rawHeaders``), read
#: without a Python frame: ``raw_header_map(headers).get(stored_header_name(b"connection"))`` is what
#: ``headers.getRawHeaders(b"connection")`` returns (or an empty list for None), without its two
#: frames (~2k instructions), for the headers the filter reads on every request.
raw_header_map: Callable[[Headers], dict[bytes, list[bytes]]] = operator.attrgetter("_rawHeaders")


def stored_header_name(name: bytes) -> bytes:
    """How ``Headers`` stores the header ``name`` in its map (Twisted 24.7 lower-cases names, 26.x capitalises them).

    Found by storing it, once per name: relies on the map's keys being the only
    thing a header adds to it.
    """
    headers = Headers()
    headers.setRawHeaders(name, [b""])
    (stored,) = raw_header_map(headers)
    return stored


class FinishWatcher(Protocol):
    """What :func:`watch_finish` tells of a request's end: ``notifyFinish``'s Deferred's two methods."""

    def callback(self, result: None) -> object: ...

    def errback(self, reason: Failure) -> object: ...


def watch_finish(request: Any, watcher: FinishWatcher) -> None:
    """Have ``watcher`` told of ``request``'s end, as the Deferred of ``notifyFinish`` would be.

    ``callback(None)`` once the response is finished, ``errback(reason)`` if
    the connection is lost first; nothing if the request has ended already.
    ``notifyFinish`` makes a Deferred for this, whose callbacks cost a request
    ~10k instructions (thread mode watches every request).  Relies on
    ``Request.notifications``, the list ``notifyFinish`` appends its Deferred
    to, and on ``Request._cleanup`` and ``connectionLost`` calling only
    ``callback(None)`` or ``errback(reason)`` on its items, once each, and
    nothing else.  ``watcher`` must not raise: that would stop the request's
    other notifications.  A request without that list (twisted.web's
    ``DummyRequest`` of unit tests) is watched through ``notifyFinish``.
    """
    notifications = getattr(request, "notifications", None)
    if notifications is None:
        request.notifyFinish().addCallbacks(watcher.callback, watcher.errback)
        return
    notifications.append(watcher)


#: Whether a resource may encode its responses (gzip): ``twisted.web.resource._IEncodingResource``'s
#: ``providedBy`` (a C method: no Python frame, it is asked for every request's downstream).
is_encoding_resource: Callable[[object], bool] = _IEncodingResource.providedBy


def install_response_encoder(resource: IResource, request: Any) -> None:
    """Let an encoding ``resource`` encode ``request``'s response (gzip), as ``Request.process`` does.

    Relies on ``twisted.web.resource._IEncodingResource`` (see
    :data:`is_encoding_resource`, asked first) and on the request's
    ``_encoder`` attribute, which ``Request.write``/``finish`` pass the body
    through.
    """
    if _IEncodingResource.providedBy(resource):
        encoder = resource.getEncoder(request)
        if encoder is not None:
            request._encoder = encoder


#: The attribute of a request that holds its response encoder (gzip), if any (``Request._encoder``).
RESPONSE_ENCODER_ATTRIBUTE = "_encoder"


def has_response_encoder(request: Any) -> bool:
    """Whether an encoder (gzip) sits on ``request``: the body sent is not the one written (``_encoder``)."""
    return getattr(request, RESPONSE_ENCODER_ATTRIBUTE, None) is not None


# -- HTTP/1 channels ---------------------------------------------------------------


def http_channel_protocol(channel: HTTPChannel) -> Any:
    """What ``Site.protocol`` builds around an HTTP/1 ``channel``: HTTP/1, or HTTP/2 if TLS negotiates h2.

    Relies on ``twisted.web.http._GenericHTTPChannelProtocol``, which
    ``HTTPFactory.protocol`` is built from: a site that wants its own HTTP/1
    channel class has no public way to keep the h2 upgrade.
    """
    return http._GenericHTTPChannelProtocol(channel)


class ChannelSwitch(http._GenericHTTPChannelProtocol):
    """Twisted's HTTP/1-or-HTTP/2 protocol (what ``Site.protocol`` builds), for a subclass to extend.

    Relies on ``twisted.web.http._GenericHTTPChannelProtocol`` and its
    ``_channel`` (the HTTPChannel, replaced by an ``H2Connection`` once TLS
    negotiates h2), ``_negotiatedProtocol`` (None until the first bytes are
    read, then ``b"h2"`` or ``b"http/1.1"``) and ``_site``; a subclass reads
    them through the properties here.
    """

    # Properties over C getters (no Python frame): read on every chunk of data a connection receives.
    #: The channel serving the connection now: an ``HTTPChannel``, or an ``H2Connection``.
    current_channel: Any = property(operator.attrgetter("_channel"))
    #: The protocol negotiated: None until the first bytes are read, then ``b"h2"`` or ``b"http/1.1"``.
    negotiated: bytes | None = property(operator.attrgetter("_negotiatedProtocol"))  # type: ignore[assignment]
    #: The ``Site`` that built this protocol (None before its ``site`` is set).
    owning_site: Any = property(operator.attrgetter("_site"))


def channel_of(connection: Any) -> Any:
    """The channel behind what ``Site.buildProtocol`` built: an ``HTTPChannel``, or an ``H2Connection``.

    Relies on ``_GenericHTTPChannelProtocol._channel``,
    which it swaps when TLS negotiates h2, so the result must be read each
    time.  Anything else (not built by a Site) is returned as it is.
    """
    return getattr(connection, "_channel", connection)


def receiving_headers(channel: HTTPChannel) -> object | None:
    """If ``channel`` is receiving a request's headers: an object that stands for that request, else None.

    A channel is receiving headers when it parses lines (not a body), handles
    no request, and has bytes of the next request: a partial line buffered, or
    the request line (or the one empty line HTTP/1 tolerates before it) parsed.
    The object returned is the channel's list of bytes held back while a
    request is handled, which ``HTTPChannel.requestDone`` replaces after each
    request: the same object means the same request.

    Relies on ``HTTPChannel``'s ``_buffer`` (the unparsed line, from
    ``LineReceiver``), ``__first_line`` (name-mangled), ``_handlingRequest``
    and ``_dataBuffer`` .
    """
    state: Any = channel
    if not (state._buffer or state._HTTPChannel__first_line != 1):
        return None
    if not channel.line_mode or state._handlingRequest:
        return None
    marker: object = state._dataBuffer
    return marker


class ContinueVetoChannel(HTTPChannel):
    """An ``HTTPChannel`` that may decline to send ``100 Continue`` (see :meth:`continue_refused`).

    Relies on ``HTTPChannel._send100Continue``, which the
    channel calls when a request's headers end with ``Expect: 100-continue``.
    """

    def continue_refused(self) -> bool:
        """True: do not invite the client to send the body (it was refused already)."""
        return False

    def _send100Continue(self) -> None:
        if not self.continue_refused():
            super()._send100Continue()  # type: ignore[no-untyped-call]


# -- HTTP/2 ----------------------------------------------------------------------


def stream_requests(connection: Any) -> Iterator[tuple[Any, Any]]:
    """The requests an ``H2Connection`` has started, each with its ``H2Stream``.

    Relies on ``H2Stream._request``: the public
    ``streams`` mapping gives the streams, not their requests.
    """
    for stream in list(getattr(connection, "streams", {}).values()):
        request = getattr(stream, "_request", None)
        if request is not None:
            yield request, stream


def reset_h2_stream_after_cleanup(stream: Any, reset: Callable[[int, Any], object]) -> bool:
    """Once Twisted has ended ``stream``, call ``reset(stream_id, h2_connection)``; False if it cannot.

    Relies on ``H2Stream._conn`` and ``H2Connection._streamCleanupCallbacks``
    (a Deferred per stream that fires when the connection forgets it).
    ``reset`` sends its frames with :func:`flush_h2_control_data`.
    """
    connection = getattr(stream, "_conn", None)
    cleaned_up = getattr(connection, "_streamCleanupCallbacks", {}).get(stream.streamID)
    if cleaned_up is None:
        return False
    cleaned_up.addCallback(reset, connection)
    return True


def flush_h2_control_data(connection: Any) -> bool:
    """Send the frames the h2 state machine has queued (RST_STREAM, SETTINGS) on ``connection``.

    Relies on ``H2Connection._tryToWriteControlData``; False if the
    connection's buffer of control frames was full and it was aborted.
    """
    return bool(connection._tryToWriteControlData())


def h2_connection_of(stream: Any) -> Any:
    """The ``H2Connection`` of an ``H2Stream`` (None for anything else). Relies on ``H2Stream._conn``."""
    return getattr(stream, "_conn", None)


def forget_h2_stream(connection: Any, stream_id: int) -> None:
    """Make ``connection`` forget a stream it will not serve (reset already), as when it ends.

    Relies on ``H2Connection._requestDone``, which drops the stream's state
    and fires its cleanup callbacks.
    """
    connection._requestDone(stream_id)


def transport_aborted(transport: Any) -> bool:
    """Whether ``abortConnection`` was called on ``transport`` already. Relies on the transports' ``_aborted``."""
    return bool(getattr(transport, "_aborted", False))


# -- the HTTP client ---------------------------------------------------------------


def quiet_connection_pool(pool: Any) -> Any:
    """``pool``, whose connections do not log their start and stop (two lines per proxied request).

    Relies on ``HTTPConnectionPool._factory`` and
    ``twisted.web.client._HTTP11ClientFactory``: the pool has no public way to choose its connections' factory.
    """
    pool._factory = _quiet_client_factory()
    return pool


@functools.cache
def _quiet_client_factory() -> type:
    from twisted.web.client import _HTTP11ClientFactory

    class QuietClientFactory(_HTTP11ClientFactory):
        noisy = False

    return QuietClientFactory
