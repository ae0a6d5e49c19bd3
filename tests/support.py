"""Shared test helpers: WAT guests written inline, real loopback servers, clients.

Tests are ``twisted.trial`` test cases, so the suite runs under ``trial tests``
and under ``pytest`` alike.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource
from twisted.web.server import Site

from twisted_httpwasm import Execution, Guest, GuestResource
from twisted_httpwasm._state import RequestState

#: Every http_handler import, named after the function, for inline WAT guests.
IMPORTS = """
  (import "http_handler" "enable_features" (func $enable_features (param i32) (result i32)))
  (import "http_handler" "get_config" (func $get_config (param i32 i32) (result i32)))
  (import "http_handler" "log" (func $log (param i32 i32 i32)))
  (import "http_handler" "log_enabled" (func $log_enabled (param i32) (result i32)))
  (import "http_handler" "get_method" (func $get_method (param i32 i32) (result i32)))
  (import "http_handler" "set_method" (func $set_method (param i32 i32)))
  (import "http_handler" "get_uri" (func $get_uri (param i32 i32) (result i32)))
  (import "http_handler" "set_uri" (func $set_uri (param i32 i32)))
  (import "http_handler" "get_protocol_version" (func $get_protocol_version (param i32 i32) (result i32)))
  (import "http_handler" "get_source_addr" (func $get_source_addr (param i32 i32) (result i32)))
  (import "http_handler" "get_header_names" (func $get_header_names (param i32 i32 i32) (result i64)))
  (import "http_handler" "get_header_values" (func $get_header_values (param i32 i32 i32 i32 i32) (result i64)))
  (import "http_handler" "set_header_value" (func $set_header_value (param i32 i32 i32 i32 i32)))
  (import "http_handler" "add_header_value" (func $add_header_value (param i32 i32 i32 i32 i32)))
  (import "http_handler" "remove_header" (func $remove_header (param i32 i32 i32)))
  (import "http_handler" "read_body" (func $read_body (param i32 i32 i32) (result i64)))
  (import "http_handler" "write_body" (func $write_body (param i32 i32 i32)))
  (import "http_handler" "get_status_code" (func $get_status_code (result i32)))
  (import "http_handler" "set_status_code" (func $set_status_code (param i32)))
"""

NOOP_RESPONSE = '(func (export "handle_response") (param i32 i32))'


def module(*body: str, memory_pages: int = 1) -> bytes:
    """A WAT guest with every import, one exported memory and ``body``."""
    return ("(module" + IMPORTS + f'(memory (export "memory") {memory_pages})\n' + "\n".join(body) + ")").encode()


def make_guest(*body: str, **options: Any) -> Guest:
    return Guest(module(*body), **options)


def request_state(
    method: bytes = b"GET",
    uri: bytes = b"/",
    protocol: bytes = b"HTTP/1.1",
    source_addr: bytes = b"127.0.0.1:4321",
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes | None = None,
) -> RequestState:
    """Plain per-request data, as the filter would build it."""
    return RequestState(
        method=method,
        uri=uri,
        protocol=protocol,
        source_addr=source_addr,
        headers=headers,
        body=io.BytesIO(body) if body is not None else None,
    )


class ServerTestCase(TestCase):
    """A trial test case with real loopback servers and a clean HTTP client."""

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(global_reactor, persistent=False)
        self.http = HTTPClient(Agent(global_reactor, pool=self.pool))
        self.addCleanup(self.pool.closeCachedConnections)

    def serve(self, resource: IResource) -> str:
        """Listen on a loopback port; return its base URL."""
        port = global_reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def serve_guest(self, guest: Guest, downstream: IResource, **options: Any) -> str:
        return self.serve(GuestResource(guest, downstream, **options))

    @inlineCallbacks
    def fetch(self, method: str, url: str, **kwargs: Any) -> Any:
        """(status, headers, body) of one request."""
        response = yield self.http.request(method, url, **kwargs)
        body = yield response.content()
        return response.code, response.headers, body


EXECUTIONS = (Execution.THREAD, Execution.INLINE)


def deferred_later(seconds: float, value: Any = None) -> Deferred[Any]:
    from twisted.internet import task

    return task.deferLater(global_reactor, seconds, lambda: value)
