"""HTTP/2 as :class:`~twisted_httpwasm.web.site.GuestSite` serves it: nothing read after a GOAWAY, few streams.

Twisted serves HTTP/2 with its private ``H2Connection`` (on the ``h2``
library), swapped in by its private ``_GenericHTTPChannelProtocol`` when TLS
negotiates ``h2``.  Two of its behaviours let one client cost the server more
than it should, and this module bounds them (through
:mod:`.twisted_internals`, where what it reads of those private classes is):

- **After a GOAWAY** (a protocol error such as a CONTINUATION flood, the idle
  timeout, the client's own), Twisted keeps reading the connection while TLS
  waits for the client's close_notify, and ``h2`` appends every byte it is
  given to a buffer it no longer parses: a client that keeps sending grows the
  server's memory without bound, until the idle timeout (plus its abort
  timeout) cuts the connection.  :class:`GuardedChannelProtocol` stops
  reading a connection once its GOAWAY is out (what was already read is
  dropped) and aborts it :data:`GOAWAY_GRACE` seconds later.
- **Concurrent streams**: ``h2`` lets a client open 100 streams at once on one
  connection, each pinning a guest instance while it runs.
  :func:`limit_streams` advertises a lower ``SETTINGS_MAX_CONCURRENT_STREAMS``
  and :func:`too_many_streams` / :func:`refuse_stream` reset with
  ``REFUSED_STREAM`` (RFC 9113 8.7: not processed, safe to retry) a stream
  opened past it (before the client acknowledged the setting, or ignoring it).

``h2`` is imported only once a connection negotiated it (it is optional), through
:func:`twisted_httpwasm._optional.require`.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from .. import _optional
from .access_log import address_text
from .twisted_internals import (
    ChannelSwitch,
    flush_h2_control_data,
    forget_h2_stream,
    h2_connection_of,
    transport_aborted,
)

__all__ = [
    "DEFAULT_MAX_STREAMS_PER_CONNECTION",
    "GOAWAY_GRACE",
    "GuardedChannelProtocol",
    "goaway_sent",
    "limit_streams",
    "refuse_stream",
    "too_many_streams",
]

_log = Logger(namespace="httpwasm")

#: Seconds between the end of reading a connection that sent GOAWAY and its abort.
GOAWAY_GRACE = 3.0
#: Streams of one HTTP/2 connection that may be open at once (h2's own default is 100).
DEFAULT_MAX_STREAMS_PER_CONNECTION = 16


def goaway_sent(channel: Any) -> bool:
    """Whether ``channel`` is an HTTP/2 connection whose GOAWAY was sent (or the client's received).

    Reads the state machine of the ``h2`` connection inside Twisted's
    ``H2Connection`` (its ``conn``): ``CLOSED`` once ``h2`` queued a GOAWAY,
    whichever path queued it (a protocol error, the idle timeout, a reset
    flood, the client's own GOAWAY).
    """
    machine = getattr(getattr(channel, "conn", None), "state_machine", None)
    if machine is None:
        return False
    h2_connection = _optional.require("h2.connection", "http2", "HTTP/2")  # loaded already: an h2 connection
    return bool(machine.state is h2_connection.ConnectionState.CLOSED)


def limit_streams(channel: Any, limit: int) -> None:
    """Advertise ``SETTINGS_MAX_CONCURRENT_STREAMS = limit`` on a Twisted ``H2Connection`` just made."""
    h2_settings = _optional.require("h2.settings", "http2", "HTTP/2")
    channel.conn.update_settings({h2_settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
    flush_h2_control_data(channel)


def too_many_streams(stream: Any, limit: int) -> bool:
    """Whether the HTTP/2 ``stream`` being made (its request's ``gotLength``) has ``limit`` others open."""
    connection = h2_connection_of(stream)
    return connection is not None and len(getattr(connection, "streams", ())) >= limit


def refuse_stream(stream: Any) -> None:
    """Reset ``stream`` with ``REFUSED_STREAM`` and forget it: none of it was processed, the client may retry."""
    h2_errors = _optional.require("h2.errors", "http2", "HTTP/2")
    h2_exceptions = _optional.require("h2.exceptions", "http2", "HTTP/2")
    connection = h2_connection_of(stream)
    stream_id = stream.streamID
    if stream_id not in connection.streams:
        return  # the connection or the stream is gone already
    try:
        connection.conn.reset_stream(stream_id, error_code=h2_errors.ErrorCodes.REFUSED_STREAM)
    except h2_exceptions.StreamClosedError:
        pass
    if flush_h2_control_data(connection):
        forget_h2_stream(connection, stream_id)


class GuardedChannelProtocol(ChannelSwitch):
    """Twisted's HTTP/1-or-2 protocol switch, with the HTTP/2 bounds above.

    Over HTTP/1 it only passes bytes on, and after the first read it steps out of
    the way: the connection's reads go to the HTTP/1 channel itself.  ``max_streams`` (None: h2's own 100)
    is advertised as soon as HTTP/2 is negotiated, before the client's first
    frame is read.
    """

    _fenced = False
    _seen_protocol: bytes | None = None
    _abort_call: Any = None
    max_streams: int | None = None

    def dataReceived(self, data: bytes) -> None:
        if self._fenced:
            return  # read before reading stopped: dropped
        negotiated = self._seen_protocol  # read once from Twisted, after the first bytes (it never changes)
        if negotiated is None:
            transport = getattr(self.current_channel, "transport", None)
            if getattr(transport, "negotiatedProtocol", None) == b"h2":
                # Let Twisted make its H2Connection now, so that the limit goes out before any stream opens.
                ChannelSwitch.dataReceived(self, b"")  # type: ignore[no-untyped-call]
                if self.max_streams is not None:
                    limit_streams(self.current_channel, self.max_streams)
        elif negotiated == b"h2" and goaway_sent(self.current_channel):
            self._fence()  # GOAWAY went out since the last read (the idle timeout, say)
            return
        ChannelSwitch.dataReceived(self, data)  # type: ignore[no-untyped-call]
        if negotiated is None:
            negotiated = self._seen_protocol = self.negotiated
            if negotiated != b"h2":
                # HTTP/1 for the rest of the connection: neither this guard nor Twisted's switch has anything
                # more to do, so later reads go straight to the channel (two Python frames fewer per read).
                self.dataReceived = self.current_channel.dataReceived  # type: ignore[method-assign]
                return
        if negotiated == b"h2" and goaway_sent(self.current_channel):
            self._fence()

    def _fence(self) -> None:
        """Stop reading this connection, and abort it after GOAWAY_GRACE seconds (time for the GOAWAY to go out)."""
        self._fenced = True
        transport: Any = self.current_channel.transport
        if transport is None or not getattr(transport, "connected", True):
            return
        transport.pauseProducing()  # the TCP transport stops reading (through TLS, which delegates it)
        reactor: Any = getattr(self.owning_site, "reactor", None)
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        _log.info(
            "HTTP/2 connection from {peer} sent GOAWAY: reading stopped, closing it within {grace} s",
            peer=address_text(transport.getPeer()),
            grace=GOAWAY_GRACE,
        )
        self._abort_call = reactor.callLater(GOAWAY_GRACE, self._abort, transport)

    def _abort(self, transport: Any) -> None:
        self._abort_call = None
        if getattr(transport, "connected", True) and not transport_aborted(transport):
            transport.abortConnection()

    def connectionLost(self, reason: Any) -> None:
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._abort_call = None
        ChannelSwitch.connectionLost(self, reason)
