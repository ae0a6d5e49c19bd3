"""An in-memory client that runs requests through the real host path, for guest authors' tests.

:class:`GuestClient` puts one guest (or a chain) in front of a downstream the
way ``twistd httpwasm`` does - a :class:`~twisted_httpwasm.GuestSite` over
:class:`~twisted_httpwasm.GuestResource`, with the guest's own pool, pinning,
limits and execution mode - and talks HTTP/1.1 to it over an in-memory
transport instead of a socket.  Nothing needs a running reactor: the site runs
on a private memory reactor, and in thread mode the guest calls run in real
guest worker threads whose results come back through that reactor's
``callFromThread``, which :meth:`GuestClient.request` drains until the
response is complete.  In a running reactor (trial, pytest-twisted),
:meth:`GuestClient.request_async` returns a Deferred instead.

Each request gives an :class:`Exchange`: the response as the client received
it, what the downstream received, the guest's log lines, its trap, the host
functions it called (with their phase) and its features.
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, Union, cast

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel as TwistedLogLevel
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from ..abi import Feature, LogLevel
from ..runtime.guest import Execution, Guest
from ..runtime.observe import add_observer
from ..web.resource import FailurePolicy, GuestResource
from ..web.site import GuestSite

__all__ = [
    "DownstreamRequest",
    "Exchange",
    "GuestClient",
    "GuestSource",
    "GuestTestMixin",
    "Headers",
    "HostCall",
    "cached_guest",
    "init_calls",
    "load_guest",
]

#: What :class:`GuestClient` takes as a guest: a path (``.wasm``/``.wat``), the bytes of a binary or
#: text module, WAT text, or a loaded :class:`~twisted_httpwasm.Guest`.
GuestSource = Union[str, "os.PathLike[str]", bytes, Guest]
#: What a plain-callable downstream returns: (status, headers, body).
DownstreamAnswer = tuple[int, Mapping[Any, Any] | Iterable[tuple[Any, Any]], bytes | str]

_ALL_FEATURES = int(Feature.BUFFER_REQUEST | Feature.BUFFER_RESPONSE | Feature.TRAILERS)
#: Seconds a synchronous request waits for its response at least (guest calls end at their own time limit).
RESPONSE_WAIT = 30.0

_LEVELS = {
    TwistedLogLevel.debug: LogLevel.DEBUG,
    TwistedLogLevel.info: LogLevel.INFO,
    TwistedLogLevel.warn: LogLevel.WARN,
    TwistedLogLevel.error: LogLevel.ERROR,
    TwistedLogLevel.critical: LogLevel.ERROR,
}


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _raw(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


class Headers:
    """Header fields in order: names case-insensitive, several values per name.

    ``headers["x-id"]`` is the first value (KeyError if absent), ``get`` the
    same with a default, ``getall`` every value; names and values are ``str``
    (latin-1), and lookups take ``str`` or ``bytes``.
    """

    def __init__(self, fields: Iterable[tuple[str | bytes, str | bytes]] = ()):
        self._fields = [(_text(name), _text(value)) for name, value in fields]

    def getall(self, name: str | bytes) -> list[str]:
        key = _text(name).lower()
        return [value for field_name, value in self._fields if field_name.lower() == key]

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        values = self.getall(name)
        return values[0] if values else default

    def __getitem__(self, name: str | bytes) -> str:
        values = self.getall(name)
        if not values:
            raise KeyError(_text(name))
        return values[0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str | bytes) and bool(self.getall(name))

    def __iter__(self) -> Iterator[str]:
        """Each name once (lowercase), in the order first seen."""
        return iter(dict.fromkeys(name.lower() for name, _ in self._fields))

    def __len__(self) -> int:
        return len(self._fields)

    def items(self) -> list[tuple[str, str]]:
        """Every (name, value), in order, names as received."""
        return list(self._fields)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Headers):
            return [(n.lower(), v) for n, v in self._fields] == [(n.lower(), v) for n, v in other._fields]
        if isinstance(other, Mapping):
            return {name: self[name] for name in self} == {_text(k).lower(): _text(v) for k, v in other.items()}
        return NotImplemented

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


@dataclass(frozen=True)
class HostCall:
    """One host function call: the guest that made it, the phase it ran in, and the function's name.

    ``phase`` is ``"init"`` (``_initialize``/``_start``), ``"handle_request"`` or ``"handle_response"``.
    """

    guest: str
    phase: str
    function: str


@dataclass(frozen=True)
class DownstreamRequest:
    """What the downstream received (after the guests' changes)."""

    method: str
    uri: str
    headers: Headers
    body: bytes

    @property
    def path(self) -> str:
        """The URI without its query."""
        return self.uri.partition("?")[0]


@dataclass
class Exchange:
    """One request through a :class:`GuestClient`: the response, and what happened on the way.

    ``status``, ``headers`` and ``body`` are the response as the client received
    it (headers the host adds included).  ``downstream`` is what the downstream
    received, or None when it was not reached (the guest answered itself, or
    failed).  ``logs`` are the guests' log lines, ``(LogLevel, message)``.
    ``trap`` is the reason the first failing guest call failed (trap, time limit,
    refused host call), or None.  ``calls`` are the host functions the guests
    called, in order, each with its phase; None when no guest of the chain was
    loaded with a call trace (see :func:`load_guest`).  ``features`` are those the
    (outermost) guest had enabled for this request.  ``outcome`` says how the
    request ended for the outermost guest (``passed``, ``answered``, ``trapped``,
    ... as the metrics label it); ``complete`` is False when the host cut the
    response short (closed the connection).
    """

    status: int
    headers: Headers
    body: bytes
    downstream: DownstreamRequest | None
    logs: list[tuple[LogLevel, str]]
    trap: str | None
    calls: list[HostCall] | None
    features: Feature
    outcome: str | None = None
    complete: bool = True

    @property
    def text(self) -> str:
        """The body decoded as UTF-8."""
        return self.body.decode("utf-8", "replace")

    def called(self, function: str, phase: str | None = None) -> bool:
        """Whether a guest called host function ``function`` (in ``phase``, if given)."""
        return any(call.function == function and (phase is None or call.phase == phase) for call in self.calls or ())


# -- the memory reactor, with results from guest threads ------------------------------------------


class _Reactor(MemoryReactorClock):
    """A memory reactor whose ``callFromThread`` is real: calls queue up until :meth:`run_pending`.

    In a running reactor (``forward`` set), each queued call also wakes that
    reactor to run them.
    """

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._from_threads: SimpleQueue[tuple[Callable[..., object], tuple[Any, ...], dict[str, Any]]] = SimpleQueue()
        self.forward: Any = None

    def callFromThread(self, f: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        self._from_threads.put((f, args, kwargs))
        forward = self.forward
        if forward is not None:
            forward.callFromThread(self.run_pending)

    def run_pending(self, wait: float = 0.0) -> bool:
        """Run every call queued from threads (waiting up to ``wait`` seconds for the first); whether one ran."""
        ran = False
        queue = self._from_threads
        while True:
            try:
                f, args, kwargs = queue.get(timeout=wait) if wait > 0 and not ran else queue.get_nowait()
            except Empty:
                return ran
            ran = True
            f(*args, **kwargs)


#: One memory reactor for every client of the process, so that thread mode has one set of guest workers.
_REACTOR = _Reactor()


# -- what a guest did: logs, calls, outcome, per request ------------------------------------------


class _Record:
    """What one request collects while it runs, and its response bytes."""

    def __init__(self, client: GuestClient, method: bytes) -> None:
        self.client = client
        self.head = method == b"HEAD"
        self.logs: list[tuple[LogLevel, str]] = []
        self.calls: list[HostCall] = []
        self.finished: dict[Guest, tuple[Any, str]] = {}  # guest -> (state, outcome)
        self.downstream: DownstreamRequest | None = None
        self.response: tuple[int, list[tuple[bytes, bytes]], bytes, bool] | None = None
        self.waiting: Deferred[Exchange] | None = None
        self.transport: _Transport | None = None
        self.protocol: Any = None


class _Transport(StringTransport):
    """The client's end of one connection: tells its record when the response may be complete."""

    def __init__(self, record: _Record) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            hostAddress=IPv4Address("TCP", "127.0.0.1", 80), peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        self.record = record

    def write(self, data: bytes) -> None:
        super().write(data)  # type: ignore[no-untyped-call]
        self.record.client._progress(self)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        super().write(b"".join(data))  # type: ignore[no-untyped-call]
        self.record.client._progress(self)

    def loseConnection(self) -> None:
        super().loseConnection()  # type: ignore[no-untyped-call]
        self.record.client._progress(self)

    def abortConnection(self) -> None:
        self.loseConnection()


def _record_of(request: Any) -> _Record | None:
    transport = getattr(getattr(request, "channel", None), "transport", None)
    return transport.record if isinstance(transport, _Transport) else None


class _Watch:
    """Per guest, once: its log lines and request endings go to the records of requests in flight."""

    def __init__(self, guest: Guest) -> None:
        # No reference to the guest: the guest keeps its watch (as its observer), not the other way round.
        self.in_flight: set[_Record] = set()
        forward: Any = guest.log.observer

        def observe(event: dict[str, Any]) -> None:
            self.log_event(event)
            forward(event)

        guest.log.observer = observe  # type: ignore[assignment]
        add_observer(guest, self)

    def log_event(self, event: dict[str, Any]) -> None:
        if not self.in_flight:
            return
        level = _LEVELS.get(event.get("log_level"), LogLevel.INFO)
        text = event.get("text", event.get("summary"))
        if text is None:
            return
        for record in list(self.in_flight):
            record.logs.append((level, str(text)))

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None:
        record = _record_of(request)
        if record is not None:
            record.finished[guest] = (state, outcome)


_watches: weakref.WeakKeyDictionary[Guest, _Watch] = weakref.WeakKeyDictionary()
_watch_lock = threading.Lock()


def _watch(guest: Guest) -> _Watch:
    with _watch_lock:
        watch = _watches.get(guest)
        if watch is None:
            watch = _watches[guest] = _Watch(guest)
        return watch


#: Host calls made while a guest initialises an instance, by guest: those of its first instance.
_init_calls: weakref.WeakKeyDictionary[Guest, tuple[int, list[HostCall]]] = weakref.WeakKeyDictionary()


def _record_call(instance: Any, function: str) -> None:
    """The call-trace hook of guests the kit loads (``Guest(on_host_call=...)``)."""
    state = instance.state
    guest = instance.guest
    if state is None:
        first = _init_calls.setdefault(guest, (id(instance), []))
        if first[0] == id(instance):
            first[1].append(HostCall(guest.name, "init", function))
        return
    record = _record_of(getattr(state, "request", None))
    if record is not None:
        record.calls.append(HostCall(guest.name, state.phase.value, function))


def init_calls(guest: Guest) -> list[HostCall]:
    """The host functions ``guest``'s first instance called while it initialised (a traced guest)."""
    entry = _init_calls.get(guest)
    return list(entry[1]) if entry is not None else []


def load_guest(source: str | os.PathLike[str] | bytes, **options: Any) -> Guest:
    """Load a guest with its host calls traced (what :class:`GuestClient` does with a path or bytes).

    ``source`` is a path, the bytes of a binary or text module, or WAT text;
    ``options`` are :class:`~twisted_httpwasm.Guest`'s.  Load a guest yourself
    with this to share it between clients and still see ``Exchange.calls``.
    """
    if isinstance(source, str) and source.lstrip().startswith("("):
        source = source.encode()
    options.setdefault("on_host_call", _record_call)
    if "execution" in options:
        options["execution"] = Execution(options["execution"])
    return Guest(source, **options)


# -- downstreams ---------------------------------------------------------------------------


def _downstream_request(request: Request) -> DownstreamRequest:
    body = b""
    content = request.content
    if content is not None:
        position = content.tell()
        content.seek(0)
        body = content.read()
        content.seek(position)
    return DownstreamRequest(
        method=_text(request.method),
        uri=_text(request.uri),
        headers=Headers(_pairs(request.requestHeaders)),
        body=body,
    )


def _pairs(headers: Any) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, values in headers.getAllRawHeaders() for value in values]


class _Recorder(Resource):
    """In front of the downstream: notes what it received, then traverses to it as the site would."""

    def __init__(self, inner: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.inner = inner
        self.isLeaf = getattr(inner, "isLeaf", False)

    def _note(self, request: Request) -> None:
        record = _record_of(request)
        if record is not None and record.downstream is None:
            record.downstream = _downstream_request(request)

    def getChildWithDefault(self, path: bytes, request: Request) -> Any:
        self._note(request)
        return self.inner.getChildWithDefault(path, request)

    def render(self, request: Request) -> Any:
        self._note(request)
        return self.inner.render(request)


class _Answer(Resource):
    """A downstream made of a plain callable: ``answer(DownstreamRequest) -> (status, headers, body)``."""

    isLeaf = True

    def __init__(self, answer: Callable[[DownstreamRequest], DownstreamAnswer]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.answer = answer

    def render(self, request: Request) -> bytes:
        record = _record_of(request)
        seen = record.downstream if record is not None and record.downstream is not None else None
        status, headers, body = self.answer(seen or _downstream_request(request))
        request.setResponseCode(status)
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in pairs:
            request.responseHeaders.addRawHeader(_raw(name), _raw(value))
        return _raw(body)


def _ok(request: DownstreamRequest) -> DownstreamAnswer:
    return 200, {"content-type": "text/plain"}, b"ok"


# -- the response, parsed as a client would -------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?\Z")


def _parse(data: bytes, closed: bool, head: bool) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool] | None:
    """(status, headers, body, complete) once the response in ``data`` is whole (or the connection closed)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if closed:
            raise AssertionError(f"the host closed the connection before a whole response head: {data[:200]!r}")
        return None
    lines = data[:end].split(b"\r\n")
    match = _STATUS_LINE.match(lines[0])
    if match is None:
        raise AssertionError(f"not an HTTP/1.1 status line: {lines[0][:200]!r}")
    status = int(match.group(1))
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip(), value.strip()))
    rest = data[end + 4 :]
    names = {name.lower(): value for name, value in headers}
    if head or status in (204, 304) or 100 <= status < 200:
        return status, headers, b"", True
    if names.get(b"transfer-encoding", b"").lower() == b"chunked":
        body, position = bytearray(), 0
        while True:
            line_end = rest.find(b"\r\n", position)
            if line_end < 0:
                return (status, headers, bytes(body), False) if closed else None
            size = int(rest[position:line_end].split(b";")[0], 16)
            if size == 0:
                return status, headers, bytes(body), True
            chunk = rest[line_end + 2 : line_end + 2 + size]
            body += chunk
            if len(chunk) < size or len(rest) < line_end + 4 + size:
                return (status, headers, bytes(body), False) if closed else None
            position = line_end + 4 + size
    length = names.get(b"content-length")
    if length is not None:
        wanted = int(length)
        if len(rest) >= wanted:
            return status, headers, rest[:wanted], True
        return (status, headers, rest, False) if closed else None
    return (status, headers, rest, True) if closed else None


# -- the client -------------------------------------------------------------------------------------


class GuestClient:
    """Requests through ``guest`` (or a chain of guests) in front of ``downstream``, in memory.

    ``guest`` is a path (``.wasm`` or ``.wat``), the bytes of a binary or text
    module, WAT text, or a loaded :class:`~twisted_httpwasm.Guest`; a list of
    them is a chain, the first outermost.  ``config`` is the guest's
    configuration (what ``get_config`` returns), or for a chain a list with one
    per guest.  ``execution`` (``"inline"`` or ``"thread"``) and
    ``guest_options`` (``timeout``, ``memory_limit``, ``max_buffer_bytes``,
    ``log_level``, ...) are :class:`~twisted_httpwasm.Guest`'s options, for the
    guests the client loads.  ``downstream`` is an ``IResource``, or a callable
    taking a :class:`DownstreamRequest` and returning ``(status, headers,
    body)``; by default it answers ``200 ok``.  ``on_guest_error`` is
    :class:`~twisted_httpwasm.GuestResource`'s.

    :meth:`close` (or leaving a ``with`` block) frees the instances of the
    guests the client loaded.
    """

    def __init__(
        self,
        guest: GuestSource | Sequence[GuestSource],
        downstream: IResource | Resource | Callable[[DownstreamRequest], DownstreamAnswer] | None = None,
        *,
        config: bytes | str | Sequence[bytes | str] = b"",
        execution: Execution | str = "inline",
        on_guest_error: FailurePolicy | str = FailurePolicy.FAIL_CLOSED,
        **guest_options: Any,
    ):
        sources = list(guest) if isinstance(guest, list | tuple) else [guest]
        if not sources:
            raise ValueError("GuestClient needs at least one guest")
        if isinstance(config, bytes | str):
            if len(sources) > 1 and config:
                raise ValueError("a chain of guests takes a list of configs, one per guest")
            configs: list[bytes | str] = [config] * len(sources)
        else:
            configs = list(config)
            if len(configs) != len(sources):
                raise ValueError(f"{len(sources)} guests but {len(configs)} configs")
        self.execution = Execution(execution)
        self._owned: list[Guest] = []
        self._idle: list[tuple[_Transport, Any]] = []
        self._closed = False
        guests: list[Guest] = []
        try:
            for source, guest_config in zip(sources, configs, strict=True):
                if isinstance(source, Guest):
                    if guest_config:
                        raise ValueError(f"{source!r} is loaded already: give its config when loading it")
                    guests.append(source)
                else:
                    loaded = load_guest(
                        cast(Any, source), config=_raw(guest_config), execution=self.execution, **guest_options
                    )
                    self._owned.append(loaded)
                    guests.append(loaded)
        except BaseException:
            self.close()
            raise
        #: The guests, outermost first.
        self.guests = guests
        for each in guests:
            _watch(each)
        self._traced = any(each.on_host_call is not None for each in guests)
        self._threaded = any(each.execution is Execution.THREAD for each in guests)
        if downstream is None:
            downstream = _ok
        inner: Any = downstream if IResource.providedBy(downstream) else _Answer(cast(Any, downstream))
        resource: Any = _Recorder(inner)
        for each in reversed(guests):
            resource = GuestResource(each, resource, reactor=_REACTOR, on_guest_error=on_guest_error)
        #: The outermost GuestResource.
        self.resource: GuestResource = resource
        self.site = GuestSite(resource, reactor=_REACTOR)
        self._wait = max([RESPONSE_WAIT, *(3 * (each.timeout or 0) for each in guests)])

    def __enter__(self) -> GuestClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the instances of the guests this client loaded (idle ones now, the others as they finish)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for _, protocol in idle:
            protocol.connectionLost(Failure(ConnectionDone("the test client is closed")))
        owned, self._owned = self._owned, []
        for guest in owned:
            guest.retire()

    # -- requests ----------------------------------------------------------------------------------

    def get(self, uri: str | bytes = "/", headers: Any = None) -> Exchange:
        """``request("GET", uri, headers)``."""
        return self.request("GET", uri, headers)

    def post(self, uri: str | bytes = "/", body: bytes | str = b"", headers: Any = None) -> Exchange:
        """``request("POST", uri, headers, body)``."""
        return self.request("POST", uri, headers, body)

    def request(
        self, method: str | bytes, uri: str | bytes = "/", headers: Any = None, body: bytes | str = b""
    ) -> Exchange:
        """Send one request and wait for its whole response; no running reactor is needed.

        ``headers`` is a mapping or a list of (name, value) pairs (``str`` or
        ``bytes``).  Raises AssertionError when no response comes: a downstream
        that answers later, on the global reactor, needs :meth:`request_async`.
        """
        record = self._send(method, uri, headers, body)
        # Guest threads hand their results back through the memory reactor; inline, only a
        # downstream answering later would keep the response waiting, and it will not come.
        wait = self._wait if self._threaded else 1.0
        deadline = time.monotonic() + wait
        transport = record.transport
        assert transport is not None
        while True:
            # Parsed here, once per wake-up, rather than at every write of the host.
            record.response = _parse(transport.value(), transport.disconnecting, record.head)  # type: ignore[no-untyped-call]
            if record.response is not None:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                received = transport.value()  # type: ignore[no-untyped-call]
                self._finish(record)
                raise AssertionError(
                    f"no whole response to {_text(method)} {_text(uri)} within {wait:.0f} s "
                    f"(received {received[:200]!r}); a downstream that answers later needs request_async"
                )
            _REACTOR.run_pending(wait=min(left, 0.2))
        return self._finish(record)

    def request_async(
        self, method: str | bytes, uri: str | bytes = "/", headers: Any = None, body: bytes | str = b""
    ) -> Deferred[Exchange]:
        """As :meth:`request`, for a test in a running reactor: a Deferred that fires with the Exchange."""
        from twisted.internet import reactor

        _REACTOR.forward = reactor
        waiting: Deferred[Exchange] = Deferred()
        self._send(method, uri, headers, body, waiting)
        _REACTOR.run_pending()
        return waiting

    def _send(
        self,
        method: str | bytes,
        uri: str | bytes,
        headers: Any,
        body: bytes | str,
        waiting: Deferred[Exchange] | None = None,
    ) -> _Record:
        raw_method, raw_uri, raw_body = _raw(method).upper(), _raw(uri), _raw(body)
        fields = [(_raw(n), _raw(v)) for n, v in (headers.items() if isinstance(headers, Mapping) else headers or ())]
        names = {name.lower() for name, _ in fields}
        if b"host" not in names:
            fields.insert(0, (b"host", b"localhost"))
        if raw_body or raw_method in (b"POST", b"PUT", b"PATCH"):
            if b"content-length" not in names and b"transfer-encoding" not in names:
                fields.append((b"content-length", b"%d" % len(raw_body)))
        head = b"%s %s HTTP/1.1\r\n" % (raw_method, raw_uri) + b"".join(b"%s: %s\r\n" % pair for pair in fields)
        record = _Record(self, raw_method)
        record.waiting = waiting
        for guest in self.guests:
            _watch(guest).in_flight.add(record)
        if self._idle:  # a keep-alive connection, as a client would reuse it
            transport, protocol = self._idle.pop()
            transport.record = record
        else:
            transport = _Transport(record)
            protocol = self.site.buildProtocol(transport.getPeer())  # type: ignore[no-untyped-call]
            protocol.makeConnection(transport)
        record.transport, record.protocol = transport, protocol
        protocol.dataReceived(head + b"\r\n" + raw_body)
        return record

    def _progress(self, transport: _Transport) -> None:
        """The host wrote or closed: for a request_async, is the response whole yet?"""
        record = transport.record
        if record.response is not None or record.waiting is None:
            return  # a synchronous request parses when the host is done
        record.response = _parse(transport.value(), transport.disconnecting, record.head)  # type: ignore[no-untyped-call]
        if record.response is not None and record.waiting is not None:
            waiting, record.waiting = record.waiting, None
            # Called from inside the channel's write: finish once the host has returned.
            _REACTOR.callFromThread(lambda: waiting.callback(self._finish(record)))

    def _finish(self, record: _Record) -> Exchange:
        """The connection ends (as the client would close it), and the exchange is summed up."""
        protocol, record.protocol = record.protocol, None
        transport = record.transport
        if protocol is not None and transport is not None:
            if record.response is not None and record.response[3] and not transport.disconnecting and not self._closed:
                transport.clear()  # type: ignore[no-untyped-call]
                self._idle.append((transport, protocol))  # kept alive for the next request
            else:
                protocol.connectionLost(Failure(ConnectionDone("the test client is done")))
        for guest in self.guests:
            _watch(guest).in_flight.discard(record)
        if record.response is None:
            return None  # type: ignore[return-value]  # gave up: the caller raises
        status, fields, body, complete = record.response
        outer = record.finished.get(self.guests[0])
        trap = None
        for guest in self.guests:
            finished = record.finished.get(guest)
            if finished is not None and finished[0].trap_reason is not None:
                trap = finished[0].trap_reason
                break
        return Exchange(
            status=status,
            headers=Headers(fields),
            body=body,
            downstream=record.downstream,
            logs=record.logs,
            trap=trap,
            calls=record.calls if self._traced else None,
            features=Feature(outer[0].features & _ALL_FEATURES) if outer is not None else Feature.NONE,
            outcome=outer[1] if outer is not None else None,
            complete=complete,
        )

    def __repr__(self) -> str:
        return f"<GuestClient {[guest.name for guest in self.guests]} {self.execution.value}>"


# -- for trial (and unittest) test cases ------------------------------------------------------------

_guests: dict[tuple[str, tuple[tuple[str, Any], ...]], Guest] = {}


class GuestTestMixin:
    """Mix into a test case (``SynchronousTestCase``, ``TestCase``, ``unittest.TestCase``).

    ``self.guest_client(...)`` takes :class:`GuestClient`'s arguments and closes
    the client after the test; ``self.load_guest(path, **options)`` loads a
    guest once per process (with its calls traced) and hands the same one back
    to every test that asks for it with the same options.
    """

    def guest_client(
        self, guest: GuestSource | list[GuestSource], downstream: Any = None, **options: Any
    ) -> GuestClient:
        client = GuestClient(guest, downstream, **options)
        self.addCleanup(client.close)  # type: ignore[attr-defined]
        return client

    def load_guest(self, source: str | os.PathLike[str], **options: Any) -> Guest:
        return cached_guest(source, **options)


def cached_guest(source: str | os.PathLike[str], **options: Any) -> Guest:
    """The guest at path ``source`` with ``options``, loaded once per process (calls traced)."""
    key = (os.path.abspath(os.fspath(source)), tuple(sorted((name, repr(value)) for name, value in options.items())))
    guest = _guests.get(key)
    if guest is None:
        guest = _guests[key] = load_guest(source, **options)
    return guest
