"""The ``Site`` that ``twistd httpwasm`` serves: twisted.web's, with the bounds an operator needs.

:class:`GuestSite` is an ordinary :class:`twisted.web.server.Site` (embedders may
use it or not).  It adds two things on top, each in its own section below:

- **limits** on what one connection or request may make the server hold
  (time to send the request headers, idle keep-alive time, request body size);
- **draining**: on shutdown, stop taking requests, let the ones in flight
  finish up to a deadline, close idle keep-alive connections.
"""

from __future__ import annotations

from typing import Any

from twisted.web.server import Site

__all__ = ["GuestSite"]


class GuestSite(Site):
    """A ``Site`` with connection/request limits and a graceful drain."""

    def __init__(self, resource: Any, *args: Any, **kwargs: Any):
        super().__init__(resource, *args, **kwargs)  # type: ignore[no-untyped-call]

    # -- limits ---------------------------------------------------------------------

    # -- draining -------------------------------------------------------------------
