"""What a reverse proxy sends its backend: a path kept below the base, headers as proxies send them.

:class:`~twisted_httpwasm.web.proxy.ProxyResource` forwards the request its guests
left.  Three things must not be decided by that final request alone:

- the **authority**: the backend's scheme, host and port are the operator's.
  Only an origin-form target (``/path?query``) is appended to the backend URL;
  an absolute-form URL that names this server is reduced to its path first,
  and any other target (``a:1/``, ``host:443``, ``http://other/x``) is refused
  (:func:`origin_form`);
- the **path**: whatever ``..`` a client or a guest put in the URI, the
  backend is asked for a path below the base path of the backend URL
  (:func:`path_inside_base`), or the request is refused;
- the **client's hop-by-hop headers**: the names the *client's* ``Connection``
  header lists are removed as the client sent them, never a header a guest
  set; and the forwarding headers (``Forwarded``, ``X-Forwarded-*``,
  ``X-Real-IP``) the client sent are not believed unless the operator says
  the client side is a trusted proxy.  For that the headers the client sent
  are remembered before any guest runs (:func:`remember_client_headers`,
  which the outermost ``GuestResource`` calls).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from twisted.web.http_headers import Headers
from twisted.web.server import Request

from .tracing import traceparent_of

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "NotOriginForm",
    "PathOutsideBase",
    "backend_headers",
    "client_headers",
    "connection_tokens",
    "is_hop_by_hop",
    "origin_form",
    "path_inside_base",
    "remember_client_headers",
]

#: Headers that describe one connection, not the message: never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: What a client (or a proxy before this one) says about the hops before the backend.
FORWARDING_HEADERS = frozenset(
    {b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip"}
)

#: Never passed on as the request has them: hop-by-hop, or set by the proxy (Host) or by the
#: HTTP client from the body it sends (Content-Length).
_NOT_FORWARDED = HOP_BY_HOP_HEADERS | {b"host", b"content-length"}

#: The forwarding headers this hop adds to (or, for X-Forwarded-Host/-Proto, sets).
_DESCRIBE_THE_HOPS = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto"})

_ENCODED_DOT = re.compile(rb"%2e", re.IGNORECASE)
_DOT_SEGMENTS = (b".", b"..")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUOTABLE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")

# -- the request target ----------------------------------------------------------------------

#: An absolute-form target of http(s): scheme, authority (no userinfo, no fragment after), path and query.
_ABSOLUTE_FORM = re.compile(rb"(https?)://([^/?#@]*)([/?][^#]*)?\Z", re.IGNORECASE)
_PORT = re.compile(rb"[0-9]{1,5}")


class NotOriginForm(ValueError):
    """A request target that is neither origin-form nor this server's own URL: the client's error (400)."""

    http_status = 400


def _authority_key(authority: bytes, default_port: int) -> tuple[bytes, int] | None:
    """(lowercase host, port) of ``host[:port]`` or ``[v6][:port]``; None if it is not one."""
    authority = authority.lower()
    if authority.startswith(b"["):
        end = authority.find(b"]") + 1
        if not end:
            return None
        host, port = authority[:end], authority[end:]
    else:
        colon = authority.find(b":")
        host, port = (authority, b"") if colon < 0 else (authority[:colon], authority[colon:])
    if not host:
        return None
    if not port:
        return host, default_port
    if not _PORT.fullmatch(port, 1):
        return None  # ":" with no port, a second ":", anything else after the host
    number = int(port[1:])
    return host, number


def origin_form(target: bytes, *, method: bytes, host: bytes | None, secure: bool, local: bytes) -> bytes:
    """The origin-form (``/path?query``) of a request ``target``, or ``*`` for ``OPTIONS *``.

    - an origin-form target (it starts with ``/``) is returned as it is;
    - ``*`` is kept for ``OPTIONS`` only (asterisk-form, RFC 9112 3.2.4);
    - an absolute-form URL (RFC 9112 3.2.2) is reduced to its path and query
      if it names this server exactly: the scheme of the connection (``http``,
      or ``https`` over TLS), no userinfo, and the authority of the request's
      ``host`` header (or, without one, the ``local`` address), ports compared
      with the scheme's default filled in;
    - anything else (authority-form, a scheme with no ``//`` such as ``a:1/``,
      another host, port or scheme, a fragment) raises :class:`NotOriginForm`.

    The result is always ``*`` or starts with ``/``: nothing of it can extend
    the authority of a URL it is appended to.
    """
    if target[:1] == b"/":
        return target
    if target == b"*":
        if method == b"OPTIONS":
            return target
        raise NotOriginForm("the asterisk-form is for OPTIONS only")
    match = _ABSOLUTE_FORM.match(target)
    if match is None:
        raise NotOriginForm("a request target that is neither origin-form (/...) nor an http(s) URL")
    scheme, authority, rest = match.groups()
    expected = b"https" if secure else b"http"
    if scheme.lower() != expected:
        raise NotOriginForm(f"an {scheme.decode('ascii').lower()} URL on an {expected.decode('ascii')} connection")
    default_port = 443 if secure else 80
    named = _authority_key(authority, default_port)
    own = _authority_key(host if host is not None else local, default_port)
    if named is None or named != own:
        raise NotOriginForm("an absolute URL for another authority than this server's (its Host)")
    rest = rest or b""
    return rest if rest.startswith(b"/") else b"/" + rest


# -- the path ------------------------------------------------------------------------------


class PathOutsideBase(ValueError):
    """The request's path climbs above the backend's base path: the client's error (400)."""

    http_status = 400


def path_inside_base(path: bytes) -> bytes:
    """``path`` (absolute, without query) with its dot segments removed, as RFC 3986 5.2.4 does.

    ``%2E``/``%2e`` are decoded first (an encoded unreserved character is the
    character itself, RFC 3986 6.2.2.2), so ``%2e%2e`` is ``..``; ``%2F`` stays
    data, inside its segment.  A ``..`` that would climb above ``/`` raises
    :class:`PathOutsideBase`, and so does a dot segment with parameters
    (``..;x``), which some servers read as ``..``.  Empty segments are kept.
    """
    if b"/." not in path and b"%2e" not in path and b"%2E" not in path:
        return path  # no segment can be a dot segment (the common case)
    segments = _ENCODED_DOT.sub(b".", path).split(b"/")[1:]
    kept: list[bytes] = []
    ends_in_directory = False
    for segment in segments:
        if segment.partition(b";")[0] in _DOT_SEGMENTS and segment not in _DOT_SEGMENTS:
            raise PathOutsideBase(f"ambiguous dot segment {segment!r}")
        ends_in_directory = segment in _DOT_SEGMENTS
        if segment == b"..":
            if not kept:
                raise PathOutsideBase("the path climbs above the base path")
            kept.pop()
        elif segment != b".":
            kept.append(segment)
    normal = b"/" + b"/".join(kept)
    if ends_in_directory and kept:
        normal += b"/"
    return normal


# -- what the client sent --------------------------------------------------------------------

_CLIENT_HEADERS = "_httpwasm_client_headers"


def remember_client_headers(request: Request) -> None:
    """Keep the request's headers object as the client's, if none is kept yet.

    Call it before any guest runs: the outermost
    :class:`~twisted_httpwasm.web.resource.GuestResource`'s filter does.  A guest
    that changes headers gets a new headers object, so the kept one stays as
    the client sent it.
    """
    # getattr/setattr, not request.__dict__: reading that slows every later attribute access (see access_log).
    if getattr(request, _CLIENT_HEADERS, None) is None:
        setattr(request, _CLIENT_HEADERS, request.requestHeaders)


def client_headers(request: Request) -> Headers:
    """The headers the client sent, if they were remembered; else the request's headers now."""
    headers: Headers | None = getattr(request, _CLIENT_HEADERS, None)
    return headers if headers is not None else request.requestHeaders


# -- the headers sent -------------------------------------------------------------------------


def is_hop_by_hop(name: bytes, named_by_connection: frozenset[bytes] = frozenset()) -> bool:
    """Whether the (lowercase) header ``name`` describes one connection only."""
    return name in HOP_BY_HOP_HEADERS or name.startswith(b"proxy-") or name in named_by_connection


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in ``Connection``: hop-by-hop for this message too."""
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(token.strip().lower() for token in value.split(b","))
    tokens.discard(b"")
    return frozenset(tokens)


def _not_sent_by(values: Sequence[bytes], sent: Sequence[bytes]) -> list[bytes]:
    """``values`` without those ``sent`` (each sent value cancels one equal value)."""
    left = Counter(sent)
    kept = []
    for value in values:
        if left[value]:
            left[value] -= 1
        else:
            kept.append(value)
    return kept


def _forwarded_value(text: bytes) -> bytes:
    """An RFC 7239 value: a token as is, anything else as a quoted string."""
    if _TOKEN.fullmatch(text):
        return text
    return b'"' + text.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _forwarded_element(peer: str | None, host: bytes | None, proto: bytes) -> bytes:
    """``for=...;host=...;proto=...``, this hop as RFC 7239 describes it."""
    if peer is None:
        node = b"unknown"
    elif ":" in peer:
        node = _forwarded_value(b"[" + peer.encode("ascii") + b"]")
    else:
        node = _forwarded_value(peer.encode("ascii"))
    pairs = [b"for=" + node]
    if host is not None and _QUOTABLE.fullmatch(host):
        pairs.append(b"host=" + _forwarded_value(host))
    pairs.append(b"proto=" + proto)
    return b";".join(pairs)


def backend_headers(request: Request, backend_host: bytes, *, trust_forwarded: bool) -> Headers:
    """The headers a reverse proxy sends for ``request`` (as its guests left it).

    - Hop-by-hop headers are dropped, and of the names that the *client's*
      ``Connection`` header lists, the values the client sent (a guest's stay).
    - ``Host`` is ``backend_host``; ``Content-Length`` is the HTTP client's to set.
    - Unless ``trust_forwarded``: the values of ``Forwarded``, ``X-Forwarded-*``
      and ``X-Real-IP`` that the client sent are dropped (a guest's stay).
    - ``X-Forwarded-For`` and ``Forwarded`` get this hop appended (the client's
      address, the Host it asked for, the scheme); ``X-Forwarded-Host`` and
      ``X-Forwarded-Proto`` are set from the request, or with
      ``trust_forwarded`` kept when the request has them.
    """
    received = client_headers(request)
    by_client = connection_tokens(received)
    not_believed = by_client if trust_forwarded else by_client | FORWARDING_HEADERS
    headers = Headers()
    described: dict[bytes, Sequence[bytes]] = {}  # Forwarded and X-Forwarded-*, kept for this hop's values
    for name, values in request.requestHeaders.getAllRawHeaders():
        lowered = name.lower()
        if lowered in _NOT_FORWARDED or lowered.startswith((b":", b"proxy-")):
            continue
        if lowered in not_believed:
            values = _not_sent_by(values, received.getRawHeaders(lowered, ()))
            if not values:
                continue
        if lowered in _DESCRIBE_THE_HOPS:
            described[lowered] = values
        else:
            headers.setRawHeaders(lowered, values)

    peer: str | None = getattr(request.getClientAddress(), "host", None)
    host = request.getHeader(b"host")
    proto = b"https" if request.isSecure() else b"http"
    forwarded_for = list(described.get(b"x-forwarded-for", ()))
    if peer is not None:
        forwarded_for.append(peer.encode("ascii"))
    if forwarded_for:
        headers.setRawHeaders(b"x-forwarded-for", [b", ".join(forwarded_for)])
    forwarded = [*described.get(b"forwarded", ()), _forwarded_element(peer, host, proto)]
    headers.setRawHeaders(b"forwarded", [b", ".join(forwarded)])
    forwarded_host = described.get(b"x-forwarded-host") if trust_forwarded else None
    if forwarded_host:
        headers.setRawHeaders(b"x-forwarded-host", forwarded_host)
    elif host is not None:
        headers.setRawHeaders(b"x-forwarded-host", [host])
    forwarded_proto = described.get(b"x-forwarded-proto") if trust_forwarded else None
    headers.setRawHeaders(b"x-forwarded-proto", forwarded_proto or [proto])
    traceparent = traceparent_of(request)
    if traceparent is not None:  # traced (--otel): the backend's spans join this request's trace
        headers.setRawHeaders(b"traceparent", [traceparent])
    headers.setRawHeaders(b"host", [backend_host])
    return headers
