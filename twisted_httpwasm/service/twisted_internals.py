"""The one place the service layer uses Twisted's private names (``tests/test_twisted_fence.py`` keeps it so).

Like :mod:`twisted_httpwasm.web.twisted_internals` for twisted.web: each
reliance on a name Twisted may change without notice is a small function here,
with what it relies on; every one is there in each supported Twisted (from
24.7, the oldest, checked in CI, to 26.x) and ``tests/test_twisted_internals.py``
exercises each against the installed Twisted.
"""

from __future__ import annotations

import re
import sys
from typing import Any, NoReturn

from twisted.python import usage

from twisted import __version__ as twisted_version

__all__ = [
    "add_headers_resource",
    "endpoint_service",
    "exit_on_usage_error",
    "forget_option",
    "forget_short_option",
    "port_deferred",
    "tcp_endpoint_address",
]

#: The first Twisted whose ``twistd`` exits with status 1 after a usage error (before: 0, as if it had run).
TWISTD_EXITS_ON_USAGE_ERROR = (26, 10)


def exit_on_usage_error(options: usage.Options, error: usage.UsageError) -> None:
    """Under a ``twistd`` older than 26.10: refuse as 26.10 does (usage, the error, exit status 1).

    ``twistd`` before 26.10 printed the usage and the error and then exited
    with status 0, so a process manager or script took a refused command line
    for a clean run.  When ``options`` were parsed by ``twistd`` (they have the
    ``parent`` that ``usage.Options`` gives a subcommand's options), this does
    what ``twisted.application.app.run`` does from 26.10 on; otherwise (26.10
    and later, or options parsed by other code) it returns, and the caller
    raises ``error``.
    """
    if tuple(int(part) for part in twisted_version.split(".")[:2]) >= TWISTD_EXITS_ON_USAGE_ERROR:
        return
    parent: usage.Options | None = getattr(options, "parent", None)
    if parent is not None:
        _refuse_like_twistd(parent, error)


def _refuse_like_twistd(config: usage.Options, error: usage.UsageError) -> NoReturn:
    print(config)
    print(f"{' '.join(sys.argv[0:2])}: {error}")
    sys.exit(1)


def forget_option(options: usage.Options, name: str) -> None:
    """Make ``options`` forget its long option ``--name`` (declared by a base class) entirely.

    Relies on ``usage.Options._dispatch`` (the handler of each option, built
    in ``Options.__init__``) beside the public ``longOpt``, ``docs``,
    ``synonyms`` and ``defaults``.
    """
    options.longOpt.remove(name)
    for table in (options.docs, options.synonyms, options.defaults, options._dispatch):
        table.pop(name, None)
    del options[name]


def forget_short_option(options: usage.Options, short: str) -> None:
    """Make ``options`` forget the one-letter synonym ``-short`` (its long option stays).

    Relies on ``usage.Options.shortOpt``, the getopt string built in
    ``Options.__init__`` (public by name, undocumented).
    """
    del options.synonyms[short]
    options.shortOpt = re.sub(f"{short}:?", "", options.shortOpt)


def add_headers_resource(resource: Any, headers: list[tuple[str, str]]) -> Any:
    """``resource``, with ``twistd web --add-header``'s ``headers`` added to each response.

    Relies on ``twisted.web.tap._AddHeadersResource``, which is what ``twistd
    web`` wraps its root in for that option: the same behaviour, not a copy.
    """
    from twisted.web import tap as web_tap

    return web_tap._AddHeadersResource(resource, headers)


def endpoint_service(service: Any) -> Any:
    """``service`` (a ``StreamServerEndpointService`` just made) made to fail at start if it cannot listen.

    Relies on ``StreamServerEndpointService._raiseSynchronously``, which
    ``strports.service`` sets the same way: ``twistd`` learns at once that a
    port cannot be bound, rather than from a logged failure later.
    """
    service._raiseSynchronously = True
    return service


def port_deferred(service: Any) -> Any:
    """The Deferred of the port a started ``StreamServerEndpointService`` listens on (``_waitingForPort``)."""
    return service._waitingForPort


def tcp_endpoint_address(endpoint: Any) -> tuple[str, int, int]:
    """The interface, port and backlog a ``TCP4ServerEndpoint``/``TCP6ServerEndpoint`` listens with.

    Relies on the endpoints' ``_interface``, ``_port`` and ``_backlog``: the
    only parser of endpoint descriptions is ``serverFromString``, which gives
    the endpoint, not what it parsed.
    """
    return endpoint._interface, endpoint._port, endpoint._backlog
