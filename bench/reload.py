"""Memory across a hot reload (SIGHUP) under load.

Run from the repository root::

    python -m bench.reload --clients 100

Starts ``twistd httpwasm`` with a guest whose every instance grows its memory by
2 MiB and touches it (``bench.abuse.BURST_GUEST``), in front of a downstream that
answers after 1 s (``bench.abuse.Slow``), so ``--clients`` client loops keep
about as many instances pinned.  Under that steady load it rewrites the guest
file and sends SIGHUP, and reports the server's RSS: before the load, under
load before the reload, its peak while old and new instances overlap, and
after the reload (the old guest's instances freed once their last requests
ended).  Every request's status is counted: a reload must fail none.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.abuse import BURST_GUEST, _request, _rss_mib
from tests.launch import HOST, free_port, start_twistd, stop, wait_listening


async def _load(port: int, clients: int, pid: int, guest: Path, duration: float) -> None:
    await _request(port, "/", 10)
    await asyncio.sleep(1)
    idle = _rss_mib(pid)
    statuses: list[int] = []
    stop_at = time.monotonic() + duration

    async def client() -> None:
        while time.monotonic() < stop_at:
            statuses.append(await _request(port, "/", 30))

    running = asyncio.gather(*(client() for _ in range(clients)))
    await asyncio.sleep(duration / 3)
    loaded = _rss_mib(pid)
    # The new guest: the same, with one more data segment (so another digest); written atomically.
    new = guest.with_suffix(".new")
    new.write_text(BURST_GUEST.replace("(memory (export", '(data (i32.const 8) "v2")\n  (memory (export', 1))
    os.replace(new, guest)
    os.kill(pid, signal.SIGHUP)
    peak = loaded
    samples = []
    started = time.monotonic()
    while time.monotonic() - started < duration / 3:
        rss = _rss_mib(pid)
        peak = max(peak, rss)
        samples.append(rss)
        await asyncio.sleep(0.1)
    after = _rss_mib(pid)
    await running
    await asyncio.sleep(1)
    print(f"reload under load: {clients} client loops, {len(statuses)} requests, statuses {sorted(set(statuses))}")
    print(f"  RSS idle {idle:.0f} MiB, under load {loaded:.0f} MiB")
    print(f"  after SIGHUP: peak {peak:.0f} MiB, {duration / 3:.0f} s later {after:.0f} MiB")
    print(f"  after the load ended: {_rss_mib(pid):.0f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra twistd httpwasm argument")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        guest = Path(directory) / "guest.wat"
        guest.write_text(BURST_GUEST)
        port = free_port()
        log = Path(directory) / "twistd.log"
        command = ["-n", "--pidfile=", "httpwasm", "--guest", str(guest), "--class", "bench.abuse.Slow"]
        server = start_twistd([*command, "--listen", f"tcp:{port}:interface={HOST}", *args.server_arg], log)
        try:
            wait_listening(server, port, 30, log)
            asyncio.run(_load(port, args.clients, server.pid, guest, args.duration))
            reloads = [line for line in log.read_text().splitlines() if "reload" in line]
            print("  log: " + ("\n  log: ".join(reloads) or "no reload line"))
        finally:
            stop(server)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
