"""Soak test: mixed good, trapping, slow, looping and aborted traffic for a bounded time.

Run it with one command (loopback only; it stops by itself)::

    python -m tests.soak --duration 60 --connections 64

It starts a server process with several guests mounted side by side, drives
it with a Twisted client, then prints the figures and checks the bounds:
zero unexpected responses, every guest instance back in its pool (idle no more
than the peak concurrency), RSS after warm-up grown by less than 10 %, and a
stable thread count.  Exit status 0 means every bound held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

# -- the server side ---------------------------------------------------------------

_HEADER_GUEST = """
  (data (i32.const 0) "x-soak")
  (data (i32.const 16) "1")
  (func (export "handle_request") (result i64)
    (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 6) (i32.const 16) (i32.const 1))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""

_TRAP_GUEST = """
  (func (export "handle_request") (result i64)
    (drop (call $get_uri (i32.const 100) (i32.const 200)))
    ;; "/trap?..." as seen by the guest: the 2nd byte is 't' (0x74)
    (if (i32.eq (i32.load8_u (i32.const 101)) (i32.const 0x74)) (then unreachable))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""

_SLOW_GUEST = """
  (func (export "handle_request") (result i64) (local $i i32)
    (local.set $i (i32.const 2000000))
    (loop $spin (local.set $i (i32.sub (local.get $i) (i32.const 1))) (br_if $spin (local.get $i)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""

_LOOP_GUEST = """
  (func (export "handle_request") (result i64) (loop $forever (br $forever)) (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""

_BODY_GUEST = """
  (func (export "_initialize") (drop (call $enable_features (i32.const 1))))
  (func (export "handle_request") (result i64) (local $r i64)
    (loop $more
      (local.set $r (call $read_body (i32.const 0) (i32.const 1024) (i32.const 16384)))
      (br_if $more (i64.eqz (i64.shr_u (local.get $r) (i64.const 32)))))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""


def serve(port_file: str) -> None:
    """Run the soak server until SIGTERM; write its port to ``port_file``."""
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    from tests.support import make_guest
    from twisted_httpwasm import Execution, GuestResource

    class Downstream(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            body = request.content.read() if request.content is not None else b""
            answer = b"ok %d\n" % len(body)

            def finish() -> None:
                if not request._disconnected and not request.finished:
                    request.setHeader(b"content-type", b"text/plain")
                    request.write(answer)
                    request.finish()

            reactor.callLater(random.random() * 0.005, finish)
            return NOT_DONE_YET

    downstream = Downstream()
    guests = {
        b"ok": make_guest(_HEADER_GUEST, name="ok"),
        b"ok-inline": make_guest(_HEADER_GUEST, name="ok-inline", execution=Execution.INLINE),
        b"trap": make_guest(_TRAP_GUEST, name="trap"),
        b"slow": make_guest(_SLOW_GUEST, name="slow"),
        b"loop": make_guest(_LOOP_GUEST, name="loop", timeout=0.1),
        b"body": make_guest(_BODY_GUEST, name="body", max_buffer_bytes=1024 * 1024),
    }
    root = Resource()
    for name, guest in guests.items():
        root.putChild(name, GuestResource(guest, downstream))

    class Stats(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(
                {
                    "rss": _rss(),
                    "threads": threading.active_count(),
                    "pools": {name.decode(): guest.pool.stats.as_dict() for name, guest in guests.items()},
                }
            ).encode()

    root.putChild(b"_stats", Stats())
    site = Site(root)
    site.log = lambda request: None  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    with open(port_file + ".tmp", "w") as file:
        file.write(str(port.getHost().port))
    os.replace(port_file + ".tmp", port_file)
    reactor.run()


def _rss() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the client side -----------------------------------------------------------------

#: Kind of request -> (method, path, body, expected statuses).
_KINDS: dict[str, tuple[bytes, bytes, bytes | None, tuple[int, ...]]] = {
    "ok": (b"GET", b"/ok/x", None, (200,)),
    "ok-inline": (b"GET", b"/ok-inline/x", None, (200,)),
    "trap": (b"GET", b"/trap/x", None, (500,)),
    "slow": (b"GET", b"/slow/x", None, (200,)),
    "loop": (b"GET", b"/loop/x", None, (500,)),
    "body": (b"POST", b"/body/x", b"b" * 256 * 1024, (200,)),
    "too-large": (b"POST", b"/body/x", b"b" * 2 * 1024 * 1024, (413,)),
}
_WEIGHTS = {"ok": 40, "ok-inline": 20, "trap": 10, "slow": 10, "loop": 1, "body": 5, "too-large": 1, "abort": 8}


def drive(port: int, duration: float, connections: int, warmup: float, seed: int) -> dict[str, Any]:
    """Load the server; return the figures."""
    from twisted.internet import defer, protocol, reactor
    from twisted.web.client import Agent, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IBodyProducer
    from zope.interface import implementer

    @implementer(IBodyProducer)
    class Body:
        def __init__(self, data: bytes):
            self.data = data
            self.length = len(data)

        def startProducing(self, consumer: Any) -> Any:
            consumer.write(self.data)
            return defer.succeed(None)

        def stopProducing(self) -> None:
            pass

        def pauseProducing(self) -> None:
            pass

        def resumeProducing(self) -> None:
            pass

    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning, message="Using readBody")
    rng = random.Random(seed)
    kinds = [kind for kind, weight in _WEIGHTS.items() for _ in range(weight)]
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = connections
    agent = Agent(reactor, pool=pool)
    base = f"http://127.0.0.1:{port}"
    counts: Counter[str] = Counter()
    unexpected: list[str] = []
    samples: dict[str, Any] = {}
    start = time.monotonic()
    deadline = start + duration

    def stats() -> Any:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"GET /_stats HTTP/1.0\r\nHost: soak\r\n\r\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return json.loads(data.split(b"\r\n\r\n", 1)[1])

    class Abort(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"GET /ok/x HTTP/1.1\r\nHost: soak\r\n\r\n")
            self.transport.abortConnection()

    @defer.inlineCallbacks
    def one(kind: str) -> Any:
        if kind == "abort":
            endpoint_protocol = yield protocol.ClientCreator(reactor, Abort).connectTCP("127.0.0.1", port)
            del endpoint_protocol
            counts["abort"] += 1
            return
        method, path, body, expected = _KINDS[kind]
        try:
            response = yield agent.request(
                method, (base.encode() + path), Headers({b"host": [b"soak"]}), Body(body) if body else None
            )
            yield readBody(response)
            status = response.code
        except Exception as error:  # noqa: BLE001 - every failure is counted and shown
            status = repr(error)[:120]
        counts[kind] += 1
        if status not in expected:
            unexpected.append(f"{kind}: {status}")

    @defer.inlineCallbacks
    def loop() -> Any:
        while time.monotonic() < deadline:
            yield one(rng.choice(kinds))

    @defer.inlineCallbacks
    def run() -> Any:
        warm = time.monotonic() + warmup
        loops = [loop() for _ in range(connections)]
        while time.monotonic() < warm:
            yield task_sleep(0.5)
        samples["warm"] = yield threads_call(stats)
        yield defer.DeferredList(loops)
        yield pool.closeCachedConnections()
        # Let the server see the last disconnects and finish in-flight work.
        for _ in range(50):
            final = yield threads_call(stats)
            if all(p["in_use"] == 0 for p in final["pools"].values()):
                break
            yield task_sleep(0.1)
        samples["end"] = final
        reactor.stop()

    def task_sleep(seconds: float) -> Any:
        from twisted.internet import task

        return task.deferLater(reactor, seconds, lambda: None)

    def threads_call(function: Any) -> Any:
        from twisted.internet import threads

        return threads.deferToThread(function)

    reactor.callWhenRunning(run)
    reactor.run()
    return {
        "elapsed": time.monotonic() - start,
        "counts": dict(counts),
        "unexpected": unexpected,
        "warm": samples["warm"],
        "end": samples["end"],
    }


def check(figures: dict[str, Any]) -> list[str]:
    """The bounds that failed (empty: all held)."""
    failures = []
    if figures["unexpected"]:
        failures.append(f"{len(figures['unexpected'])} unexpected responses, e.g. {figures['unexpected'][:5]}")
    warm, end = figures["warm"], figures["end"]
    growth = (end["rss"] - warm["rss"]) / warm["rss"]
    if growth >= 0.10:
        failures.append(f"RSS grew {growth:.1%} after warm-up (bound: < 10%)")
    if end["threads"] > warm["threads"] + 1:
        failures.append(f"thread count grew from {warm['threads']} to {end['threads']}")
    for name, pool in end["pools"].items():
        if pool["in_use"] != 0:
            failures.append(f"pool {name}: {pool['in_use']} instances still lent out")
        if pool["idle"] > max(pool["peak_in_use"], 1):
            failures.append(f"pool {name}: idle {pool['idle']} > peak concurrency {pool['peak_in_use']}")
    return failures


def report(figures: dict[str, Any]) -> None:
    warm, end = figures["warm"], figures["end"]
    total = sum(figures["counts"].values())
    print(f"soak: {total} requests in {figures['elapsed']:.1f} s ({total / figures['elapsed']:.0f}/s)")
    print("  by kind: " + ", ".join(f"{kind}={count}" for kind, count in sorted(figures["counts"].items())))
    print(f"  unexpected responses: {len(figures['unexpected'])}")
    growth = (end["rss"] - warm["rss"]) / warm["rss"]
    print(f"  RSS after warm-up: {warm['rss'] / 2**20:.1f} MiB -> end: {end['rss'] / 2**20:.1f} MiB ({growth:+.1%})")
    print(f"  threads after warm-up: {warm['threads']} -> end: {end['threads']}")
    for name, pool in sorted(end["pools"].items()):
        print(
            f"  pool {name}: created={pool['created']} discarded={pool['discarded']} in_use={pool['in_use']}"
            f" idle={pool['idle']} peak_in_use={pool['peak_in_use']}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return 0
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    port_file = os.path.join(tempfile.mkdtemp(prefix="httpwasm-soak-"), "port")
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen([sys.executable, "-m", "tests.soak", "--serve", port_file], cwd=root, env=env)
    try:
        ready_by = time.monotonic() + 60
        while not os.path.exists(port_file):
            if server.poll() is not None or time.monotonic() > ready_by:
                print("soak: the server did not start", file=sys.stderr)
                return 2
            time.sleep(0.05)
        with open(port_file) as file:
            port = int(file.read())
        figures = drive(port, args.duration, args.connections, min(args.warmup, args.duration / 2), args.seed)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
    report(figures)
    failures = check(figures)
    for failure in failures:
        print(f"  FAILED: {failure}")
    print("soak: all bounds held" if not failures else "soak: bounds failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
