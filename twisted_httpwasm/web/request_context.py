"""What the adapter keeps about one Twisted request: one object, in one attribute of the request.

The access log (the client's URI, the request id), the ``--proxy`` downstream
(the client's headers), tracing (the server span), the drain (that the host cut
the request) and the filter (the interception of a chained guest's downstream) each keep something about a
request for later; they keep it here, in the request's
:class:`RequestContext`, rather than in attributes of their own on Twisted's
``Request``.

The context is made on first use (by ``GuestSite``, before any guest runs) and
lives as long as the request.  It is read and set through ``getattr``/``setattr``,
never through ``request.__dict__``: reading an instance's ``__dict__`` makes
CPython (3.11+) move its attributes out of the object's inline values into a
dict for the rest of its life, and every later attribute access on the request
would miss its specialised fast path (about 15k instructions over a request).

For the same reason the adapter sets as few attribute names on a request as
it can: CPython keeps an object's attributes inline while its class has seen
at most 30 attribute names (its shared keys), and Twisted's ``Request`` uses
about 25 of them by the end of a request.  A request of a class past that
limit gets a dict (measured: ~3k instructions per request, no-op guest).  So
this context is one name, ``GuestSite`` counts a request body only when its
length is not declared, and the interception's hooks are removed after use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CONTEXT_ATTRIBUTE", "RequestContext", "context_of", "existing_context"]

#: The one attribute of Twisted's Request this package sets (read it with getattr on a hot path).
CONTEXT_ATTRIBUTE = "_httpwasm"
_ATTRIBUTE = CONTEXT_ATTRIBUTE


class RequestContext:
    """One request's notes; every field None until set (class attributes: made without an ``__init__``)."""

    #: The URI as the client sent it, before any guest rewrote it (the access log's).
    client_uri: bytes | None = None
    #: The headers object as the client sent it (a guest that changes headers gets a new one).
    client_headers: Any = None
    #: The id ``RequestLog`` gave the request when it arrived.
    request_id: str | None = None
    #: Tracing's record of the server span, and its W3C ``traceparent`` for a backend.
    trace: Any = None
    traceparent: bytes | None = None
    #: What cut the request if the host itself did (``the shutdown timeout (30 s)``).
    cut_by_host: str | None = None
    #: The innermost filter's interception of the downstream's calls (an outer guest's, when chained).
    interception: Any = None


def context_of(request: Any) -> RequestContext:
    """``request``'s context, made on first use."""
    context: RequestContext | None = getattr(request, _ATTRIBUTE, None)
    if context is None:
        context = RequestContext()
        setattr(request, _ATTRIBUTE, context)
    return context


def existing_context(request: Any) -> RequestContext | None:
    """``request``'s context if one was made (reading makes none)."""
    context: RequestContext | None = getattr(request, _ATTRIBUTE, None)
    return context
