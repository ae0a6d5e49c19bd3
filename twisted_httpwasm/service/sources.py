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

At startup, before the reactor runs, the fetch is a blocking ``urllib`` call
(the process serves nothing yet); at reload it is a ``treq`` request on the
running reactor (``pip install 'twisted-httpwasm[remote]'``: treq and
Twisted's TLS).  Both verify TLS against the system's trust store, which
honours ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from .. import _optional
from ..runtime.cache import default_cache_dir

__all__ = ["DEFAULT_FETCH_TIMEOUT", "FetchedGuest", "SourceError", "is_remote", "resolve", "resolve_blocking"]

_log = Logger(namespace="httpwasm")

#: Seconds a fetch of a remote guest may take.
DEFAULT_FETCH_TIMEOUT = 30.0

#: Largest remote guest fetched (a guest binary is far smaller).
MAX_GUEST_BYTES = 256 * 1024 * 1024


class SourceError(Exception):
    """A remote guest cannot be had: not fetched and no verified copy, or its digest differs."""


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


def resolve_blocking(url: str, sha256: str | None, timeout: float = DEFAULT_FETCH_TIMEOUT) -> FetchedGuest:
    """The guest at ``url``, fetched with a blocking call (startup, before the reactor runs)."""
    cached = _pinned_copy(url, sha256)
    if cached is not None:
        return cached
    try:
        data = _fetch_blocking(url, timeout)
    except (OSError, ValueError, SourceError) as error:
        return _fallback(url, sha256, _reason(error))
    return _verified(url, sha256, data)


def resolve(
    url: str, sha256: str | None, timeout: float = DEFAULT_FETCH_TIMEOUT, *, reactor: Any = None
) -> defer.Deferred[FetchedGuest]:
    """The guest at ``url``, fetched with treq on the running reactor (reload)."""
    cached = _pinned_copy(url, sha256)
    if cached is not None:
        return defer.succeed(cached)

    async def fetch() -> FetchedGuest:
        try:
            data = await _fetch_treq(url, timeout, reactor)
        except Exception as error:  # noqa: BLE001  # any failure to fetch falls back to the cache
            return _fallback(url, sha256, _reason(error))
        return _verified(url, sha256, data)

    return defer.ensureDeferred(fetch())


# -- fetching ---------------------------------------------------------------------------


def _fetch_blocking(url: str, timeout: float) -> bytes:
    context = ssl.create_default_context()  # the system's trust store; SSL_CERT_FILE if set
    request = urllib.request.Request(url, headers={"User-Agent": "twisted-httpwasm"})
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        if response.status != 200:
            raise SourceError(f"HTTP status {response.status}")
        _check_redirect(url, response.url)
        data: bytes = response.read(MAX_GUEST_BYTES + 1)
    if len(data) > MAX_GUEST_BYTES:
        raise SourceError(f"larger than {MAX_GUEST_BYTES} bytes")
    return data


async def _fetch_treq(url: str, timeout: float, reactor: Any) -> bytes:
    try:
        treq_client = _optional.require("treq.client", "remote", "fetching a guest at reload")
        if url.lower().startswith("https://"):
            _optional.require("OpenSSL", "remote", "fetching an https:// guest at reload")
    except _optional.ExtraMissing as error:
        raise SourceError(str(error)) from None
    HTTPClient = treq_client.HTTPClient
    from twisted.web.client import Agent
    from twisted.web.http_headers import Headers

    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    agent: Any = Agent(reactor, connectTimeout=timeout)  # an IAgent; mypy cannot see zope declarations
    client = HTTPClient(agent)
    response = await client.get(url, timeout=timeout, headers=Headers({b"User-Agent": [b"twisted-httpwasm"]}))
    if response.code != 200:
        await response.content()
        raise SourceError(f"HTTP status {response.code}")
    _check_redirect(url, response.request.absoluteURI.decode("ascii", "replace"))
    data: bytes = await response.content()
    if len(data) > MAX_GUEST_BYTES:
        raise SourceError(f"larger than {MAX_GUEST_BYTES} bytes")
    return data


def _check_redirect(url: str, final: str) -> None:
    """An ``https://`` guest must not arrive over plain HTTP through a redirect."""
    if url.lower().startswith("https://") and not final.lower().startswith("https://"):
        raise SourceError(f"redirected to {final}, which is not https")


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP status {error.code}"
    if isinstance(error, urllib.error.URLError):
        return f"{error.reason}"
    return str(error) or type(error).__name__


# -- the cache ------------------------------------------------------------------------------


def _name(url: str) -> str:
    return PurePosixPath(urlsplit(url).path).stem or "guest"


def _copy_path(digest: str) -> Path:
    return sources_dir() / f"{digest}.wasm"


def _note_path(url: str) -> Path:
    return sources_dir() / f"url-{hashlib.sha256(url.encode()).hexdigest()}"


def _cached(url: str, digest: str) -> FetchedGuest | None:
    """The cached copy with ``digest``, if there is one and its bytes still have that digest."""
    try:
        data = _copy_path(digest).read_bytes()
    except OSError:
        return None
    if hashlib.sha256(data).hexdigest() != digest:
        return None  # damaged: never used
    return FetchedGuest(data, _name(url), digest, cached=True)


def _pinned_copy(url: str, sha256: str | None) -> FetchedGuest | None:
    if sha256 is None:
        return None
    copy = _cached(url, sha256)
    if copy is not None:
        _log.info("httpwasm: {url}: using the cached copy with sha256 {digest}", url=url, digest=sha256)
    return copy


def _verified(url: str, sha256: str | None, data: bytes) -> FetchedGuest:
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise SourceError(f"{url} has sha256 {digest}, not the expected {sha256}: refused")
    _store(url, digest, data)
    return FetchedGuest(data, _name(url), digest, cached=False)


def _fallback(url: str, sha256: str | None, reason: str) -> FetchedGuest:
    """After a failed fetch: the last verified copy (logged), or :class:`SourceError`."""
    digest = sha256
    if digest is None:
        try:
            digest = _note_path(url).read_text().split()[0]
        except (OSError, IndexError):
            digest = None
    copy = _cached(url, digest) if digest is not None else None
    if copy is None:
        raise SourceError(f"cannot fetch {url}: {reason}; and no verified copy is cached in {sources_dir()}")
    _log.warn(
        "httpwasm: cannot fetch {url}: {reason}; using the last verified copy (sha256 {digest})",
        url=url,
        reason=reason,
        digest=digest,
    )
    return copy


def _store(url: str, digest: str, data: bytes) -> None:
    """Cache ``data`` by digest and note it as ``url``'s last verified copy; a cache that cannot be written is
    only a lost fallback."""
    try:
        directory = sources_dir()
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(_copy_path(digest), lambda out: out.write(data))
        _write_atomically(_note_path(url), lambda out: out.write(f"{digest} {url}\n".encode()))
    except OSError as error:
        _log.warn("httpwasm: cannot cache {url} in {where}: {error}", url=url, where=sources_dir(), error=error)


def _write_atomically(path: Path, write: Callable[[Any], object]) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            write(out)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
