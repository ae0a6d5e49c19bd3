"""Hostile-load scenarios: what good requests see while other clients abuse the server.

Run from the repository root (loopback only; each scenario stops by itself)::

    python -m bench.abuse spin --spinners 16 --duration 15
    python -m bench.abuse spin --spinners 64 --duration 15
    python -m bench.abuse abandon --spinners 200
    python -m bench.abuse burst --clients 300
    python -m bench.abuse slowloris --clients 1100 --duration 60
    python -m bench.abuse buffered --clients 16
    python -m bench.abuse buffered --clients 16 --server-arg=--max-buffered-total --server-arg=none

``spin``: a real ``twistd -n httpwasm`` (thread mode, ``--guest-timeout 1``) with
one guest in front of ``bench.downstream.Hello``.  The guest spins until its
time limit on paths starting with ``/spin`` and passes everything else on.
``--spinners`` clients each keep one ``/spin`` request in flight (a new one as
soon as the last was answered); meanwhile one client sends good requests
(``GET /``) one after the other and records their latency.  Prints the good
requests' percentiles and failures (non-200 or no answer within 10 s).

``abandon``: ``--spinners`` clients each send one ``/spin`` request and leave
after 2 s; then one good request is timed (how long the server keeps running
work for clients that are gone).

``burst``: a guest that touches 2 MiB of memory in each instance, in front of a
downstream that answers after 1 s (``bench.abuse.Slow``); ``--clients`` requests
at once make as many instances, then the server's RSS is sampled every 5 s for
60 s (idle instances are retired after 30 s idle).

``slowloris``: the server may hold 1024 open files (``RLIMIT_NOFILE``);
``--clients`` connections each send a request line and then one header line
a second, never finishing the headers, while one client sends a good request
every 0.25 s (2 s timeout).  Prints, per 10 s, how many good requests
succeeded and how many slow connections the server had closed.

``buffered``: a guest that enables ``buffer_response`` in front of a downstream
that answers 15 MiB (``bench.abuse.Big``, written in 1 MiB pieces); ``--clients``
requests at once.  Prints the statuses (200, or 503 past ``--max-buffered-total``)
and the server's RSS before, at its peak and 5 s after.

Figures go to docs/reliability.md; nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.launch import HOST, free_port, start_twistd, stop, wait_listening

SPIN_GUEST = """\
(module
  (import "http_handler" "get_uri" (func $get_uri (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; "/spin...": loop until the time limit ends the call; anything else goes on
  (func (export "handle_request") (result i64)
    (drop (call $get_uri (i32.const 0) (i32.const 256)))
    (if (i32.and (i32.eq (i32.load8_u (i32.const 1)) (i32.const 0x73))
                 (i32.eq (i32.load8_u (i32.const 2)) (i32.const 0x70)))
      (then (loop $forever (br $forever))))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)))
"""

BURST_GUEST = """\
(module
  (memory (export "memory") 1)
  ;; every instance grows its memory by 2 MiB and touches each page of it
  (func (export "_initialize") (local $p i32)
    (drop (memory.grow (i32.const 32)))
    (local.set $p (i32.const 65536))
    (loop $touch
      (i32.store (local.get $p) (i32.const 1))
      (local.set $p (i32.add (local.get $p) (i32.const 4096)))
      (br_if $touch (i32.lt_u (local.get $p) (i32.const 2162688)))))
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32)))
"""

BUFFERING_GUEST = """\
(module
  (import "http_handler" "enable_features" (func $enable_features (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_initialize") (drop (call $enable_features (i32.const 2))))
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32)))
"""

BIG_PIECE = b"b" * (1024 * 1024)
BIG_PIECES = 15

GOOD_TIMEOUT = 10.0


class Big(Resource):
    """A downstream that answers 15 MiB, a 1 MiB piece per reactor turn."""

    isLeaf = True

    def render(self, request: Request) -> object:
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor  # zope's interfaces carry no annotations mypy reads
        request.setHeader(b"content-length", b"%d" % (len(BIG_PIECE) * BIG_PIECES))

        def piece(left: int) -> None:
            if request.finished or request._disconnected:
                return
            if left == 0:
                request.finish()
                return
            request.write(BIG_PIECE)
            reactor.callLater(0, piece, left - 1)

        piece(BIG_PIECES)
        return NOT_DONE_YET


class Slow(Resource):
    """A downstream that answers every request after one second (keeps instances pinned)."""

    isLeaf = True

    def render(self, request: Request) -> object:
        from twisted.internet import reactor as global_reactor

        reactor: Any = global_reactor

        def answer() -> None:
            if not request.finished and not request._disconnected:
                request.write(b"slow\n")
                request.finish()

        reactor.callLater(1.0, answer)
        return NOT_DONE_YET


async def _request(port: int, path: str, timeout: float) -> int:
    """One GET on a fresh connection; the status, or 0 for no complete answer in time."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
                await writer.drain()
                response = await reader.read()
            finally:
                writer.close()
    except (TimeoutError, OSError):
        return 0
    try:
        return int(response.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _spin(port: int, spinners: int, duration: float) -> None:
    stop_at = time.monotonic() + duration
    spins: list[int] = []

    async def spinner() -> None:
        while time.monotonic() < stop_at:
            spins.append(await _request(port, "/spin", 30))

    tasks = [asyncio.create_task(spinner()) for _ in range(spinners)]
    await asyncio.sleep(min(2.0, duration / 4))  # let the spinners fill the server
    latencies: list[float] = []
    failures = 0
    while time.monotonic() < stop_at:
        started = time.monotonic()
        status = await _request(port, "/", GOOD_TIMEOUT)
        latencies.append(time.monotonic() - started)
        if status != 200:
            failures += 1
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"spin: {spinners} spinning clients, {len(spins)} spin calls answered ({spins.count(500)} with 500)")
    if latencies:
        print(
            f"  good requests: {len(latencies)}, failed {failures};"
            f" latency p50 {_percentile(latencies, 0.5) * 1000:.0f} ms,"
            f" p90 {_percentile(latencies, 0.9) * 1000:.0f} ms,"
            f" max {max(latencies) * 1000:.0f} ms, mean {statistics.fmean(latencies) * 1000:.0f} ms"
        )


async def _abandon(port: int, spinners: int) -> None:
    async def leave_early() -> None:
        await _request(port, "/spin", 2.0)

    await asyncio.gather(*(leave_early() for _ in range(spinners)))
    started = time.monotonic()
    status = await _request(port, "/", 60)
    print(
        f"abandon: {spinners} clients left after 2 s;"
        f" the next good request: {status} in {(time.monotonic() - started) * 1000:.0f} ms"
    )


async def _slowloris(port: int, clients: int, duration: float) -> None:
    started = time.monotonic()
    closed_at: list[float] = []
    opened = 0

    async def slow() -> None:
        nonlocal opened
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            return
        opened += 1
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n")
            for number in range(int(duration) + 5):
                await asyncio.sleep(1)
                if reader.at_eof():
                    break
                writer.write(b"X-Slow-%d: 1\r\n" % number)
                await writer.drain()
                try:
                    await asyncio.wait_for(reader.read(1024), 0.001)
                except TimeoutError:
                    continue
        except OSError:
            pass
        finally:
            closed_at.append(time.monotonic() - started)
            writer.close()

    tasks = [asyncio.create_task(slow()) for _ in range(clients)]
    await asyncio.sleep(3)  # let them connect
    results: list[tuple[float, bool]] = []
    while time.monotonic() - started < duration:
        at = time.monotonic() - started
        results.append((at, await _request(port, "/", 2.0) == 200))
        await asyncio.sleep(0.25)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"slowloris: {opened} of {clients} slow connections opened; server limited to 1024 open files")
    for window in range(0, int(duration), 10):
        inside = [ok for at, ok in results if window <= at < window + 10]
        gone = sum(1 for at in closed_at if at < window + 10)
        ok = f"{sum(inside)}/{len(inside)}"
        print(f"  {window:>3}-{window + 10} s: good requests {ok} ok; slow connections closed so far: {gone}")


def _limit_open_files() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _at_once(port: int, clients: int, pid: int, interval: float) -> tuple[float, float, list[int]]:
    """``clients`` GETs at once after one warm-up request: RSS before, peak RSS while they run, statuses."""
    await _request(port, "/", 30)
    await asyncio.sleep(1)
    before = peak = _rss_mib(pid)
    running = asyncio.gather(*(_request(port, "/", 60) for _ in range(clients)))
    while not running.done():
        peak = max(peak, _rss_mib(pid))
        await asyncio.sleep(interval)
    return before, peak, await running


async def _burst(port: int, clients: int, pid: int) -> None:
    before, peak, statuses = await _at_once(port, clients, pid, 0.1)
    answered = statuses.count(200)
    print(f"burst: {clients} requests at once, {answered} answered 200")
    print(f"  RSS before {before:.0f} MiB, peak {peak:.0f} MiB")
    samples = []
    for seconds in range(5, 65, 5):
        await asyncio.sleep(5)
        samples.append(f"{seconds} s: {_rss_mib(pid):.0f}")
    print(f"  RSS (MiB) after the burst: {', '.join(samples)}")


async def _buffered(port: int, clients: int, pid: int) -> None:
    before, peak, statuses = await _at_once(port, clients, pid, 0.05)
    counts = {status: statuses.count(status) for status in sorted(set(statuses))}
    await asyncio.sleep(5)
    print(f"buffered: {clients} requests of 15 MiB at once: statuses {counts}")
    print(f"  RSS before {before:.0f} MiB, peak {peak:.0f} MiB, 5 s after {_rss_mib(pid):.0f} MiB")


def _serve(
    guest: Path, port: int, extra: list[str], downstream: str = "bench.downstream.Hello", limit_files: bool = False
) -> subprocess.Popen[bytes]:
    args = [
        "-n",
        "--pidfile=",
        "httpwasm",
        "--guest",
        str(guest),
        "--guest-timeout",
        "1",
        "--class",
        downstream,
        "--listen",
        f"tcp:{port}:interface={HOST}",
        *extra,
    ]
    return start_twistd(args, subprocess.DEVNULL, preexec_fn=_limit_open_files if limit_files else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=("spin", "abandon", "burst", "slowloris", "buffered"))
    parser.add_argument("--spinners", type=int, default=16)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra twistd httpwasm argument")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        guest = Path(directory) / "guest.wat"
        guests = {"burst": BURST_GUEST, "buffered": BUFFERING_GUEST}
        guest.write_text(guests.get(args.scenario, SPIN_GUEST))
        port = free_port()
        downstreams = {"burst": "bench.abuse.Slow", "buffered": "bench.abuse.Big"}
        downstream = downstreams.get(args.scenario, "bench.downstream.Hello")
        server = _serve(guest, port, args.server_arg, downstream, limit_files=args.scenario == "slowloris")
        try:
            wait_listening(server, port, 30)
            if args.scenario == "spin":
                asyncio.run(_spin(port, args.spinners, args.duration))
            elif args.scenario == "slowloris":
                asyncio.run(_slowloris(port, args.clients, args.duration))
            elif args.scenario == "burst":
                asyncio.run(_burst(port, args.clients, server.pid))
            elif args.scenario == "buffered":
                asyncio.run(_buffered(port, args.clients, server.pid))
            else:
                asyncio.run(_abandon(port, args.spinners))
        finally:
            stop(server)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
