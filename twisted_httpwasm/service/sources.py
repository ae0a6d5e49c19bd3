"""Where a ``--guest`` comes from: a local path, or an ``https://`` (or pinned ``http://``) URL.

A remote guest is fetched, checked against its ``--guest-sha256`` if one is
given, and cached on disk by digest in :func:`sources_dir` (``sources/`` in the
compile cache directory: ``$TWISTED_HTTPWASM_CACHE``, else
``$XDG_CACHE_HOME/twisted-httpwasm``), together with a note of the last
verified digest of each URL.  So:

- with a pinned digest whose copy is cached, nothing is fetched (the bytes
  cannot have changed);
- otherwise the URL is fetched; if that fails (server down, timeout, TLS
  error), the last verified copy is used and the log says so; without one,
  loading fails with the reason.

One fetch, the same at startup and at reload: a plain blocking HTTP(S)
request (the standard library's ``http.client``), run before the reactor at
startup (the process serves nothing yet) and in a thread of the reactor's pool
at reload (serving goes on meanwhile).  ``--guest-fetch-timeout`` is a deadline
for the whole of it (name resolution, connection, TLS handshake, headers, body,
redirects): a watchdog shuts the connection down when it passes, however slowly
the server trickles.  The body is streamed into a temporary file beside the
cache, hashed as it arrives, and refused once it exceeds ``--guest-fetch-max-size``;
so neither a huge answer nor a stalled one costs more than that bound in disk,
a few chunks in memory, and the deadline in time.  A reload that is superseded
(a newer SIGHUP) stops its fetch the same way.  TLS is verified against the
system's trust store, which honours ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import select
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol
from urllib.parse import urljoin, urlsplit

from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from ..runtime.cache import UntrustedCache, default_cache_dir, private_directory, trusted_file

__all__ = [
    "DEFAULT_FETCH_TIMEOUT",
    "MAX_GUEST_BYTES",
    "FetchedGuest",
    "SourceError",
    "is_remote",
    "resolve",
    "resolve_blocking",
]

_log = Logger(namespace="httpwasm")

#: Seconds a whole fetch of a remote guest may take (resolution, connection, headers, body).
DEFAULT_FETCH_TIMEOUT = 30.0

#: Largest remote guest fetched by default (a guest binary is far smaller): ``--guest-fetch-max-size``.
MAX_GUEST_BYTES = 256 * 1024 * 1024

#: Redirects a fetch follows.
MAX_REDIRECTS = 5

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")

#: Seconds between two looks at whether a fetch waiting for its resolver or connection was stopped.
_LOOK_AGAIN = 0.1

#: Bytes read from the connection at a time.
_CHUNK = 64 * 1024


class _LogFunction(Protocol):
    def __call__(self, level: LogLevel, text: str, **fields: Any) -> None: ...


class SourceError(Exception):
    """A remote guest cannot be had: not fetched and no verified copy, or its digest differs."""


class _Stopped(Exception):
    """The fetch was stopped by its watchdog or by the reload that superseded it."""


@dataclass(frozen=True)
class FetchedGuest:
    """The bytes of a remote guest, its name (the URL's file stem) and whether they came from the cache."""

    data: bytes
    name: str
    sha256: str
    cached: bool


def is_remote(location: str) -> bool:
    """True for an ``https://`` or ``http://`` URL."""
    return location.lower().startswith(("https://", "http://"))


def sources_dir() -> Path:
    """Where fetched guests are cached: ``sources/`` next to the compiled code."""
    return default_cache_dir() / "sources"


def resolve_blocking(
    url: str, sha256: str | None, timeout: float = DEFAULT_FETCH_TIMEOUT, *, max_bytes: int = MAX_GUEST_BYTES
) -> FetchedGuest:
    """The guest at ``url``, fetched with a blocking call (startup, before the reactor runs).

    Returns or raises within ``timeout`` seconds (plus the time to read a
    cached copy), however the server behaves.
    """
    return _resolve(url, sha256, _Fetch(url, timeout, max_bytes), _log_now)


def resolve(
    url: str,
    sha256: str | None,
    timeout: float = DEFAULT_FETCH_TIMEOUT,
    *,
    max_bytes: int = MAX_GUEST_BYTES,
    reactor: Any = None,
) -> defer.Deferred[FetchedGuest]:
    """The guest at ``url``, fetched in a thread of the reactor's pool (reload); fires within ``timeout``.

    All of it runs in the thread (reading a cached copy, fetching, hashing,
    caching), so the reactor goes on serving; log lines reach it with
    ``callFromThread``.  Cancelling the Deferred (a newer reload supersedes
    this one) stops the fetch: its connection is shut down, and the Deferred
    fails at once with ``CancelledError``.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from twisted.internet import threads

    fetch = _Fetch(url, timeout, max_bytes)
    result: defer.Deferred[FetchedGuest] = defer.Deferred(lambda _: fetch.stop(_SUPERSEDED))

    def log_later(level: LogLevel, text: str, **fields: Any) -> None:
        reactor.callFromThread(_log_now, level, text, **fields)

    def done(outcome: Any) -> None:
        if result.called:
            return  # cancelled: nobody waits any more
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    running = threads.deferToThreadPool(reactor, reactor.getThreadPool(), _resolve, url, sha256, fetch, log_later)
    running.addBoth(done)
    return result


_SUPERSEDED = "superseded by a newer reload"


def _log_now(level: LogLevel, text: str, **fields: Any) -> None:
    _log.emit(level, text, **fields)


def _resolve(url: str, sha256: str | None, fetch: _Fetch, log: _LogFunction) -> FetchedGuest:
    """The guest at ``url``: the pinned copy if cached, else fetched, else the last verified copy."""
    cached = _pinned_copy(url, sha256, log)
    if cached is not None:
        return cached
    try:
        data, digest = fetch.run()
    except (_Stopped, SourceError) as error:
        if fetch.stopped == _SUPERSEDED:
            raise  # nobody waits for it any more
        return _fallback(url, sha256, str(error), log)
    return _verified(url, sha256, data, digest, log)


# -- fetching ---------------------------------------------------------------------------


class _Fetch:
    """One fetch of ``url`` within ``timeout`` seconds and ``max_bytes`` bytes, streamed into a temporary file.

    :meth:`run` blocks (call it before the reactor runs, or in a thread);
    :meth:`stop`, from any thread, ends it at once: the connection is shut
    down, so whatever read was waiting returns.  A watchdog timer calls
    :meth:`stop` at the deadline.
    """

    def __init__(self, url: str, timeout: float, max_bytes: int):
        self.url = url
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._deadline = time.monotonic() + timeout
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []  # duplicates of the connections' sockets, to shut down
        self._stopped: str | None = None
        self._digest = ""

    def stop(self, reason: str) -> None:
        """End the fetch with ``reason`` (from any thread)."""
        with self._lock:
            if self._stopped is None:
                self._stopped = reason
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    @property
    def stopped(self) -> str | None:
        """Why the fetch was stopped, if it was."""
        return self._stopped

    def _check(self) -> None:
        if self._stopped is not None:
            raise _Stopped(self._stopped)

    def _remaining(self) -> float:
        self._check()
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            self.stop(self._timed_out())
            self._check()
        return remaining

    def _timed_out(self) -> str:
        return f"took longer than {self.timeout:g} s (--guest-fetch-timeout)"

    def _watch(self, sock: socket.socket) -> None:
        """Let :meth:`stop` shut ``sock``'s connection down (a duplicate descriptor: shutdown acts on the socket)."""
        duplicate = sock.dup()
        with self._lock:
            self._sockets.append(duplicate)
            stopped = self._stopped is not None
        if stopped:
            _shutdown(duplicate)

    def run(self) -> tuple[bytes, str]:
        """The body's bytes and their sha256 (hex); :class:`SourceError` or :class:`_Stopped` if not had."""
        watchdog = threading.Timer(max(self._deadline - time.monotonic(), 0), self.stop, (self._timed_out(),))
        watchdog.daemon = True
        watchdog.start()
        try:
            with _spool() as spool:
                digest = self._follow(spool)
                spool.seek(0)
                return spool.read(), digest
        except (OSError, http.client.HTTPException, ValueError) as error:
            self._check()  # a connection shut down by stop() fails in many ways: say why it was
            raise SourceError(_reason(error)) from None
        finally:
            watchdog.cancel()
            watchdog.join()  # no thread of ours outlives the fetch (twistd forks after a startup fetch)
            with self._lock:
                sockets, self._sockets = self._sockets, []
            for sock in sockets:
                sock.close()

    def _follow(self, spool: IO[bytes]) -> str:
        url = self.url
        for _ in range(MAX_REDIRECTS + 1):
            location = self._get(url, spool)
            if location is None:
                return self._digest
            target = urljoin(url, location)
            _check_redirect(self.url, target)
            url = target
        raise SourceError(f"more than {MAX_REDIRECTS} redirects")

    def _connect(self, url: str) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise SourceError(f"not an http or https URL: {url}")
        host = parts.hostname
        port = parts.port or (443 if scheme == "https" else 80)
        sock = self._open(*self._resolve(host, port))
        try:
            connection: http.client.HTTPConnection
            if scheme == "https":
                context = ssl.create_default_context()  # the system's trust store; SSL_CERT_FILE if set
                sock = context.wrap_socket(sock, server_hostname=host)  # the handshake: stop() shuts it down
                connection = http.client.HTTPSConnection(host, port, context=context)
            else:
                connection = http.client.HTTPConnection(host, port)
        except BaseException:
            sock.close()
            raise
        connection.sock = sock
        return connection

    def _slice(self) -> float:
        """Seconds to wait before looking again whether the fetch was stopped; raises once it was (or timed out)."""
        return min(self._remaining(), _LOOK_AGAIN)

    def _resolve(self, host: str, port: int) -> tuple[Any, ...]:
        """``host``'s first address (getaddrinfo's tuple), resolved in a thread: a slow resolver is abandoned at
        the deadline, or when the fetch is stopped."""
        found: list[Any] = []

        def lookup() -> None:
            try:
                found.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0])
            except OSError as error:
                found.append(error)

        resolver = threading.Thread(target=lookup, name="httpwasm-fetch-resolve", daemon=True)
        resolver.start()
        while resolver.is_alive():
            resolver.join(self._slice())
        self._check()
        if isinstance(found[0], OSError):
            raise found[0]
        return tuple(found[0])

    def _open(self, family: int, kind: int, proto: int, _: str, address: Any) -> socket.socket:
        """A socket connected to ``address``: a non-blocking connect, so that stop() and the deadline end it too."""
        sock = socket.socket(family, kind, proto)
        try:
            self._watch(sock)
            sock.setblocking(False)
            error = sock.connect_ex(address)
            if error in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
                waiting = select.poll()
                waiting.register(sock, select.POLLOUT)
                while not waiting.poll(self._slice() * 1000):
                    pass
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._check()
            if error:
                raise OSError(error, f"cannot connect to {address[0]} port {address[1]}: {os.strerror(error)}")
            sock.settimeout(self._remaining())  # blocking again, each operation bounded; the watchdog does the rest
        except BaseException:
            sock.close()
            raise
        return sock

    def _get(self, url: str, spool: IO[bytes]) -> str | None:
        """GET ``url`` into ``spool``; the redirect's Location, or None once the body is in."""
        connection = self._connect(url)
        try:
            parts = urlsplit(url)
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            connection.request("GET", target, headers={"User-Agent": "twisted-httpwasm", "Accept-Encoding": "identity"})
            response = connection.getresponse()
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                return response.getheader("Location")
            if response.status != 200:
                raise SourceError(f"HTTP status {response.status}")
            length = response.getheader("Content-Length")
            if length is not None and length.strip().isdigit() and int(length) > self.max_bytes:
                raise SourceError(f"larger than {self.max_bytes} bytes (--guest-fetch-max-size): {length} bytes")
            hasher = hashlib.sha256()
            spool.seek(0)
            spool.truncate()
            size = 0
            while True:
                self._remaining()
                chunk = response.read1(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_bytes:
                    raise SourceError(f"larger than {self.max_bytes} bytes (--guest-fetch-max-size)")
                hasher.update(chunk)
                spool.write(chunk)
            self._remaining()  # a connection shut down at the deadline ends like a body: it is not one
            if length is not None and length.strip().isdigit() and size != int(length):
                raise SourceError(f"the connection ended after {size} of {length} bytes")
            self._digest = hasher.hexdigest()
            return None
        finally:
            connection.close()


def _spool() -> IO[bytes]:
    """A temporary file for a body: in the sources cache if it can be used, else in the temporary directory."""
    try:
        return tempfile.TemporaryFile(dir=_sources_directory(), prefix=".fetch-")
    except (OSError, UntrustedCache):
        return tempfile.TemporaryFile(prefix="httpwasm-fetch-")


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # not connected (yet, or any more)


def _check_redirect(url: str, final: str) -> None:
    """An ``https://`` guest must not arrive over plain HTTP through a redirect."""
    if url.lower().startswith("https://") and not final.lower().startswith("https://"):
        raise SourceError(f"redirected to {final}, which is not https")


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS: {error.verify_message or error}"
    if isinstance(error, socket.timeout | TimeoutError):
        return "timed out"
    return str(error) or type(error).__name__


# -- the cache ------------------------------------------------------------------------------


def _name(url: str) -> str:
    return PurePosixPath(urlsplit(url).path).stem or "guest"


def _copy_path(digest: str) -> Path:
    return sources_dir() / f"{digest}.wasm"


def _note_path(url: str) -> Path:
    return sources_dir() / f"url-{hashlib.sha256(url.encode()).hexdigest()}"


def _cached(url: str, digest: str) -> FetchedGuest | None:
    """The cached copy with ``digest``, if there is one, it can be trusted, and its bytes still have that digest."""
    data = _trusted(_copy_path(digest))
    if data is None or hashlib.sha256(data).hexdigest() != digest:
        return None  # missing, not trusted (warned), or damaged: never used
    return FetchedGuest(data, _name(url), digest, cached=True)


def _trusted(path: Path) -> bytes | None:
    """``path``'s bytes if it and the cache's directories can be trusted (see :func:`private_directory`)."""
    try:
        _sources_directory()
    except (OSError, UntrustedCache):
        return None
    return trusted_file(path, "cached guest")


def _sources_directory() -> Path:
    """:func:`sources_dir`, made 0700 with the cache directory around it, both checked."""
    private_directory(default_cache_dir())
    return private_directory(sources_dir())


def _pinned_copy(url: str, sha256: str | None, log: _LogFunction) -> FetchedGuest | None:
    if sha256 is None:
        return None
    copy = _cached(url, sha256)
    if copy is not None:
        log(LogLevel.info, "httpwasm: {url}: using the cached copy with sha256 {digest}", url=url, digest=sha256)
    return copy


def _verified(url: str, sha256: str | None, data: bytes, digest: str, log: _LogFunction) -> FetchedGuest:
    if sha256 is not None and digest != sha256:
        raise SourceError(f"{url} has sha256 {digest}, not the expected {sha256}: refused")
    _store(url, digest, data, log)
    return FetchedGuest(data, _name(url), digest, cached=False)


def _fallback(url: str, sha256: str | None, reason: str, log: _LogFunction) -> FetchedGuest:
    """After a failed fetch: the last verified copy (logged), or :class:`SourceError`."""
    digest = sha256
    if digest is None:
        note = _trusted(_note_path(url))
        try:
            digest = note.decode("ascii").split()[0] if note is not None else None
        except (UnicodeDecodeError, IndexError):
            digest = None
        if digest is not None and not _HEX_DIGEST.fullmatch(digest):
            digest = None
    copy = _cached(url, digest) if digest is not None else None
    if copy is None:
        raise SourceError(f"cannot fetch {url}: {reason}; and no verified copy is cached in {sources_dir()}")
    log(
        LogLevel.warn,
        "httpwasm: cannot fetch {url}: {reason}; using the last verified copy (sha256 {digest})",
        url=url,
        reason=reason,
        digest=digest,
    )
    return copy


def _store(url: str, digest: str, data: bytes, log: _LogFunction) -> None:
    """Cache ``data`` by digest and note it as ``url``'s last verified copy; a cache that cannot be written is
    only a lost fallback."""
    try:
        _sources_directory()
        _write_atomically(_copy_path(digest), lambda out: out.write(data))
        _write_atomically(_note_path(url), lambda out: out.write(f"{digest} {url}\n".encode()))
    except UntrustedCache:
        pass  # warned about once already
    except OSError as error:
        log(
            LogLevel.warn, "httpwasm: cannot cache {url} in {where}: {error}", url=url, where=sources_dir(), error=error
        )


def _write_atomically(path: Path, write: Callable[[Any], object]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
