"""Server memory for a large upload when the guest reads only the first bytes of the body.

Run from the repository root (loopback only)::

    python -m bench.partial_read --size-mib 512

A child process serves a guest that reads 16 bytes of the request body without
``buffer_request``, in front of a downstream that reads what is left in 1 MiB
pieces and answers with the byte count.  This process uploads ``--size-mib``
MiB with a Content-Length and prints the server's RSS before the upload, its
peak (VmHWM) and its RSS after the answer.  Twisted spools the upload to a
temporary file either way; the question is what the host adds on top.

Figures go to docs/reliability.md; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

SERVER = r"""
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted_httpwasm import Execution, Guest, GuestResource

GUEST = '''
(module
  (import "http_handler" "read_body" (func $read_body (param i32 i32 i32) (result i64)))
  (memory (export "memory") 1)
  (func (export "handle_request") (result i64)
    (drop (call $read_body (i32.const 0) (i32.const 0) (i32.const 16)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)))
'''


class Count(Resource):
    isLeaf = True

    def render_POST(self, request):
        total = 0
        while True:
            piece = request.content.read(1 << 20)
            if not piece:
                break
            total += len(piece)
        return b"%d" % total


port = reactor.listenTCP(0, Site(GuestResource(Guest(GUEST.encode(), execution=Execution.THREAD), Count())),
                         interface="127.0.0.1")
print(port.getHost().port, flush=True)
reactor.run()
"""


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid``, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0])
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    options = parser.parse_args()
    size = options.size_mib << 20
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        before = memory(server.pid)
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size)
            piece = b"x" * (1 << 20)
            for _ in range(options.size_mib):
                connection.sendall(piece)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        elapsed = time.monotonic() - started
        after = memory(server.pid)
        status_line, _, rest = answer.partition(b"\r\n")
        read = rest.rpartition(b"\r\n")[2].decode()
        peak, start = after["VmHWM"] / 1024, before["VmRSS"] / 1024
        print(f"upload: {options.size_mib} MiB in {elapsed:.1f} s; answer: {status_line.decode()}")
        print(f"  downstream read: {read} bytes (expected {size - 16})")
        print(f"  server RSS before: {start:.0f} MiB")
        print(f"  server peak RSS:   {peak:.0f} MiB (+{peak - start:.0f})")
        print(f"  server RSS after:  {after['VmRSS'] / 1024:.0f} MiB")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
