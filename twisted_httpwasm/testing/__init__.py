"""A test kit for http-wasm guests and the applications that embed them.

:class:`GuestClient` runs requests through the real host path, in memory::

    from twisted_httpwasm.testing import GuestClient

    def test_rejects_without_key():
        with GuestClient("auth.wasm", config=b"alice:secret") as client:
            assert client.get("/").status == 401

The pytest fixtures (``httpwasm_client``, ``httpwasm_guest``) come with the
package (:mod:`.pytest_plugin`); :class:`GuestTestMixin` gives trial test
cases the same helpers.  docs/testing.md tells the whole story.
"""

from .client import (
    DownstreamRequest,
    Exchange,
    GuestClient,
    GuestSource,
    GuestTestMixin,
    Headers,
    HostCall,
    cached_guest,
    init_calls,
    load_guest,
)

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
