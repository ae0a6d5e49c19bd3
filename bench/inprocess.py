"""In-process benchmark: µs per request through Twisted's HTTP server, without sockets.

Run from the repository root::

    python -m bench.inprocess                       # every scenario, both modes
    python -m bench.inprocess --scenarios noop --requests 20000
    python -m bench.inprocess --profile noop:inline # cProfile of one case, top 30 by own time

Each case builds the same server ``twistd`` would (plain: ``Site(Hello())`` as
``twistd web --class bench.downstream.Hello``; wasm: ``tap.make_site`` from the
``twistd httpwasm`` command line of the same scenario), connects a
``StringTransport`` to a channel from ``Site.buildProtocol`` and feeds it raw
request bytes: the HTTP parser, the ``Request``, the guest, the downstream and
the response bytes all run; only the socket system calls do not.  It reports
the median over ``--rounds`` of µs per request, for plain Twisted and for the
guest, and the difference (what the host adds to each request).

Plain and inline requests complete inside ``dataReceived``, so they are driven
in a plain loop.  Thread-mode requests complete on the reactor after a guest
thread ran, so they are driven by a running reactor with ``--concurrency``
channels in flight (like ``wrk -c``).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application import service
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.web.server import Request, Site
from zope.interface import implementer

from bench.downstream import Hello
from bench.run import GUESTS, SCENARIOS, Scenario

MODES = ("inline", "thread")


@dataclass
class Case:
    scenario: Scenario
    mode: str  # "plain" (driven like inline), "plain-thread" (driven like thread), "inline" or "thread"


def request_bytes(scenario: Scenario) -> bytes:
    """The raw HTTP/1.1 request of ``scenario`` (keep-alive)."""
    head = f"{scenario.method} {scenario.path} HTTP/1.1\r\nHost: bench\r\nUser-Agent: inprocess\r\n"
    if scenario.body:
        head += f"Content-Length: {len(scenario.body)}\r\n"
    return head.encode("ascii") + b"\r\n" + scenario.body


def make_site(case: Case) -> Site:
    """The server ``twistd`` would build for ``case``."""
    if case.mode.startswith("plain"):
        return Site(Hello())
    from twisted_httpwasm.service import tap

    argv = ["--guest", str(GUESTS / case.scenario.guest)]
    if case.scenario.guest_config is not None:
        argv += ["--guest-config", case.scenario.guest_config]
    argv += ["--execution", case.mode, "--class", "bench.downstream.Hello", "--listen", "tcp:0"]
    config = tap.Options()
    config.parseOptions(argv)
    return tap.make_site(config, service.MultiService())  # type: ignore[no-untyped-call]


class _Connection:
    """One keep-alive connection: a channel of ``site`` on a StringTransport."""

    def __init__(self, site: Site, number: int):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + number))
        self.channel: Any = site.buildProtocol(self.transport.getPeer())
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def take_response(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data


def _check(case: Case, response: bytes) -> None:
    status = response.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise SystemExit(f"{case.scenario.name}/{case.mode}: unexpected response {response[:200]!r}")


def run_sync(case: Case, site: Site, requests: int) -> float:
    """µs per request for a case whose responses complete inside ``dataReceived``."""
    connection = _Connection(site, 0)
    data = request_bytes(case.scenario)
    connection.send(data)
    _check(case, connection.take_response())
    send = connection.send
    clear: Callable[[], None] = connection.transport.clear
    gc.collect()
    start = time.perf_counter()
    for _ in range(requests):
        send(data)
        clear()
    elapsed = time.perf_counter() - start
    connection.send(data)
    _check(case, connection.take_response())
    return elapsed / requests * 1e6


def _finishing(base: type[Request]) -> Any:
    """``base`` (the site's own request class), telling the driver when a response is complete."""

    @implementer()  # as GuestSite's request class: zope.interface's fast providedBy (see web/site.py)
    class Finishing(base):  # type: ignore[valid-type,misc]
        on_finished: Callable[[Any], None] | None = None

        def finish(self) -> None:
            channel = self.channel  # finish() lets go of it
            super().finish()
            if self.on_finished is not None:
                self.on_finished(channel)

    return Finishing


def run_threaded(case: Case, site: Site, requests: int, concurrency: int) -> float:
    """µs per request with ``concurrency`` connections in flight on a running reactor."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor  # zope's interfaces carry no annotations mypy reads
    finishing = site.requestFactory = _finishing(site.requestFactory)
    data = request_bytes(case.scenario)
    connections = [_Connection(site, number) for number in range(concurrency)]
    by_channel = {id(c.channel): c for c in connections}
    by_channel.update({id(getattr(c.channel, "_channel", None)): c for c in connections})
    state: dict[str, Any] = {"sent": 0, "done": 0, "start": 0.0, "end": 0.0, "error": ""}

    def next_request(connection: _Connection) -> None:
        if state["sent"] >= requests:
            return
        state["sent"] += 1
        connection.send(data)

    def finished(channel: Any) -> None:
        connection = by_channel.get(id(channel))
        if connection is None:
            state["error"] = f"a response on an unknown channel {channel!r}"
            reactor.stop()
            return
        state["done"] += 1
        reactor.callLater(0, after, connection)

    def after(connection: _Connection) -> None:
        response = connection.take_response()
        if state["done"] <= concurrency:
            _check(case, response)
        if state["done"] >= requests:
            if not state["end"]:  # the last responses may complete in one reactor turn: stop once
                state["end"] = time.perf_counter()
                reactor.stop()
            return
        next_request(connection)

    def begin() -> None:
        state["start"] = time.perf_counter()
        for connection in connections:
            next_request(connection)

    finishing.on_finished = staticmethod(finished)
    gc.collect()
    reactor.callWhenRunning(begin)
    reactor.run()
    if state["error"]:
        raise SystemExit(str(state["error"]))
    return (float(state["end"]) - float(state["start"])) / requests * 1e6


def measure(case: Case, requests: int, concurrency: int) -> float:
    site = make_site(case)
    if case.mode in ("thread", "plain-thread"):
        return run_threaded(case, site, requests, concurrency)
    return run_sync(case, site, requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default=",".join(s.name for s in SCENARIOS))
    parser.add_argument("--modes", default=",".join(MODES), help="inline, thread (plain is always measured)")
    parser.add_argument("--requests", type=int, default=5000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per case; the median is reported")
    parser.add_argument("--concurrency", type=int, default=16, help="connections in flight in thread mode")
    parser.add_argument("--profile", metavar="SCENARIO:MODE", help="profile one case instead (cProfile, own time)")
    parser.add_argument("--_one", metavar="SCENARIO:MODE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    by_name = {s.name: s for s in SCENARIOS}

    if args._one or args.profile:
        name, _, mode = (args._one or args.profile).partition(":")
        case = Case(by_name[name], mode)
        if args.profile:
            site = make_site(case)
            profiler = cProfile.Profile()
            profiler.enable()
            if mode in ("thread", "plain-thread"):
                run_threaded(case, site, args.requests, args.concurrency)
            else:
                run_sync(case, site, args.requests)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
            return 0
        print(f"{measure(case, args.requests, args.concurrency):.2f}")
        return 0

    import subprocess

    def one(case: Case) -> float:
        """Each measurement in a fresh process: the reactor runs once per process, and state stays apart."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.inprocess",
                "--_one",
                f"{case.scenario.name}:{case.mode}",
                "--requests",
                str(args.requests),
                "--concurrency",
                str(args.concurrency),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        return float(out.stdout.strip().splitlines()[-1])

    modes = [m for m in args.modes.split(",") if m]
    print(f"in-process µs per request (median of {args.rounds} rounds of {args.requests} requests)")
    print("| scenario | mode | plain µs | wasm µs | added µs | throughput wasm/plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in args.scenarios.split(","):
        scenario = by_name[name]
        for mode in modes:
            plain, wasm = [], []
            for _ in range(args.rounds):  # alternating, so drift hits both sides alike
                plain.append(one(Case(scenario, "plain" if mode == "inline" else "plain-thread")))
                wasm.append(one(Case(scenario, mode)))
            p, w = statistics.median(plain), statistics.median(wasm)
            print(f"| {name} | {mode} | {p:.1f} | {w:.1f} | {w - p:.1f} | {p / w:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
