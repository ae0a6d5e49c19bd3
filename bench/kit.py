"""What a request through the test kit's GuestClient costs, next to the in-process request path.

Run from the repository root::

    python -m bench.kit                          # noop and headers, inline and thread
    python -m bench.kit --scenarios noop --requests 5000

For each scenario and mode it alternates, each in a fresh process: ``bench.inprocess``
(the server ``twistd`` builds, driven over a StringTransport; thread mode with one
connection, so one request at a time, as a test makes them) and ``GuestClient.get``
on the same guest, and prints the median µs per request of each and their ratio.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time

from bench.run import GUESTS, SCENARIOS


def measure_client(name: str, mode: str, requests: int) -> float:
    """µs per request of ``GuestClient.request`` for scenario ``name`` in ``mode``."""
    from twisted_httpwasm.testing import GuestClient

    scenario = {s.name: s for s in SCENARIOS}[name]
    config = (scenario.guest_config or "").encode()
    with GuestClient(str(GUESTS / scenario.guest), config=config, execution=mode) as client:
        for _ in range(100):
            client.request(scenario.method, scenario.path, body=scenario.body)
        gc.collect()
        start = time.perf_counter()
        for _ in range(requests):
            client.request(scenario.method, scenario.path, body=scenario.body)
        return (time.perf_counter() - start) / requests * 1e6


def _fresh(argv: list[str]) -> float:
    out = subprocess.run([sys.executable, "-m", *argv], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="noop,headers")
    parser.add_argument("--modes", default="inline,thread")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--_one", metavar="SCENARIO:MODE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._one:
        name, _, mode = args._one.partition(":")
        print(f"{measure_client(name, mode, args.requests):.2f}")
        return 0
    print(f"µs per request (median of {args.rounds} rounds of {args.requests} requests, one at a time)")
    print("| scenario | mode | in-process µs | GuestClient µs | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.scenarios.split(","):
        for mode in args.modes.split(","):
            path, kit = [], []
            for _ in range(args.rounds):
                common = ["--requests", str(args.requests)]
                path.append(_fresh(["bench.inprocess", "--_one", f"{name}:{mode}", "--concurrency", "1", *common]))
                kit.append(_fresh(["bench.kit", "--_one", f"{name}:{mode}", *common]))
            p, k = statistics.median(path), statistics.median(kit)
            print(f"| {name} | {mode} | {p:.1f} | {k:.1f} | {k / p:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
