"""Embedding twisted-httpwasm: a guest in front of a static directory.

Run it::

    python examples/embed_static.py                      # security_headers.wat over ., port 8080
    python examples/embed_static.py --guest examples/router.wat --path /some/dir --port 0

or import it and use :func:`build_site` in your own application::

    from embed_static import build_site
    reactor.listenTCP(8080, build_site("/some/dir"))

Every response of the directory then goes through the guest (here, by
default, ``security_headers.wat``, which adds three security headers).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.web.server import Site
from twisted.web.static import File

from twisted_httpwasm import Guest, GuestResource

HERE = Path(__file__).resolve().parent
DEFAULT_GUEST = HERE / "security_headers.wat"


def build_site(
    path: str | os.PathLike[str],
    guest: str | os.PathLike[str] | Guest = DEFAULT_GUEST,
    *,
    config: bytes = b"",
) -> Site:
    """A Site serving the directory ``path`` with ``guest`` (a path or a loaded Guest) in front."""
    loaded = guest if isinstance(guest, Guest) else Guest.load(guest, config=config)
    return Site(GuestResource(loaded, File(os.fspath(path))))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a directory with an http-wasm guest in front.")
    parser.add_argument("--guest", default=str(DEFAULT_GUEST), help="the guest (.wasm or .wat)")
    parser.add_argument("--config", default="", help="the guest's configuration (text)")
    parser.add_argument("--path", default=".", help="the directory to serve")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free port)")
    parser.add_argument("--interface", default="127.0.0.1", help="address to listen on")
    args = parser.parse_args(argv)

    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    site = build_site(args.path, args.guest, config=args.config.encode())
    port = reactor.listenTCP(args.port, site, interface=args.interface)
    print(f"listening on http://{args.interface}:{port.getHost().port}/", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
