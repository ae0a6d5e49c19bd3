"""Embedding twisted-httpwasm: a guest in front of a WSGI application.

Run it::

    python examples/embed_wsgi.py                     # request_id.wat in front of a small app, port 8080
    python examples/embed_wsgi.py --guest examples/router.wat --port 0

or import it and put a guest in front of your own WSGI app::

    from embed_wsgi import build_site
    reactor.listenTCP(8080, build_site(my_wsgi_app))

The guest runs before the application: with ``request_id.wat`` the app sees the
request header ``X-Request-Id`` (``HTTP_X_REQUEST_ID`` in its environ) that the
guest set, and the client gets the same id as a response header.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

from twisted_httpwasm import Guest, GuestResource

HERE = Path(__file__).resolve().parent
DEFAULT_GUEST = HERE / "request_id.wat"

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def hello_app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    """A tiny WSGI app: tells, as JSON, the request it got (as the guest left it)."""
    size = int(environ.get("CONTENT_LENGTH") or 0)
    seen = {
        "method": environ["REQUEST_METHOD"],
        "path": environ.get("PATH_INFO", ""),
        "query": environ.get("QUERY_STRING", ""),
        "request_id": environ.get("HTTP_X_REQUEST_ID"),
        "body": environ["wsgi.input"].read(size).decode("utf-8", "replace"),
    }
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def build_site(
    app: Callable[..., Iterable[bytes]] = hello_app,
    guest: str | os.PathLike[str] | Guest = DEFAULT_GUEST,
    *,
    config: bytes = b"",
    reactor: Any = None,
) -> Site:
    """A Site running the WSGI ``app`` (in the reactor's thread pool) behind ``guest``."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    loaded = guest if isinstance(guest, Guest) else Guest.load(guest, config=config)
    wsgi = WSGIResource(reactor, reactor.getThreadPool(), app)
    return Site(GuestResource(loaded, wsgi, reactor=reactor))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a WSGI app with an http-wasm guest in front.")
    parser.add_argument("--guest", default=str(DEFAULT_GUEST), help="the guest (.wasm or .wat)")
    parser.add_argument("--config", default="", help="the guest's configuration (text)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    site = build_site(hello_app, args.guest, config=args.config.encode(), reactor=reactor)
    port = reactor.listenTCP(args.port, site, interface=args.interface)
    print(f"listening on http://{args.interface}:{port.getHost().port}/", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
