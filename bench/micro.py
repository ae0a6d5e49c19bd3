"""Micro benchmarks of the host itself, with timeit (no server, no sockets).

Run from the repository root::

    python -m bench.micro
    python bench/micro.py --loop 100000 --instances 1000 --output micro.json

What it measures (each figure is the minimum over --repeat timeit repeats):

* host call: ``loop_host.wat`` calls ``get_method(buf, 0)`` N times inside one
  ``handle_request``; ``loop_pure.wat`` runs the same loop without the call.
  (host - pure) / N is the cost of one guest-to-host call, host function included.
* guest call: one ``handle_request`` of ``noop.wat`` through the host's instance
  wrapper (Python to wasm and back, ctx_next unpacked), and the same export
  called through plain wasmtime-py for reference; plus a whole request cycle
  (handle_request, entering the response phase, handle_response).
* new instance: one more initialised instance of an already compiled guest
  (what the pool pays when it grows), and a whole ``Guest.load`` (WAT to wasm,
  compile or fetch from the host's on-disk compile cache, validate, first
  instance), without and with that cache.
* memory: resident-set growth per idle instance, from /proc/self/statm, over
  --instances instances held alive at once.

The host's Python API is young: everything this file uses from it is in the
"host adapter" section below, so a rename only touches that section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import timeit
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "bench" / "guests"

if TYPE_CHECKING:
    from twisted_httpwasm.runtime.guest import Guest, GuestInstance
    from twisted_httpwasm.runtime.state import RequestState


# ------------------------------------------------------------ host adapter
#
# Uses, besides the public ``Guest.load``:
#   guest.pool.acquire()                 an initialised instance
#   GuestInstance.handle_request(state)  one handle_request call
#   GuestInstance.handle_response(state, req_ctx, is_error)
#   RequestState(...), state.enter_response_phase(...)
#   guest._new_instance()                a new initialised instance (private)
#   Guest.load(..., timeout=None, cache=False)
# TODO(host): ask for a public "new instance" hook if _new_instance is renamed.


def _import_host() -> None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def load_guest(name: str, config: bytes = b"", cache: bool = True) -> Guest:
    _import_host()
    # twisted_httpwasm re-exports this Guest; import it from where it is defined
    from twisted_httpwasm.runtime.guest import Guest

    # no time limit: the host-call loop may legitimately run for a while
    # cache: the host's on-disk cache of compiled guests (cache=False compiles every time)
    return Guest.load(GUESTS / name, config=config, timeout=None, cache=cache)


def request_state() -> RequestState:
    _import_host()
    from twisted_httpwasm.runtime.state import RequestState

    return RequestState(
        method=b"GET",
        uri=b"/",
        protocol=b"HTTP/1.1",
        source_addr=b"127.0.0.1:40000",
        headers=[(b"host", b"127.0.0.1"), (b"user-agent", b"bench-micro")],
        body=None,
    )


def instance_of(guest: Guest) -> GuestInstance:
    return guest.pool.acquire()


def new_instance(guest: Guest) -> GuestInstance:
    return guest._new_instance()


def call_request(instance: GuestInstance, state: RequestState) -> None:
    instance.handle_request(state)


def call_cycle(instance: GuestInstance) -> None:
    """One whole request as the resource drives it, minus Twisted."""
    state = request_state()
    ctx = instance.handle_request(state)
    state.enter_response_phase(200, [(b"content-type", b"text/plain")], b"hello world\n")
    instance.handle_response(state, ctx.req_ctx, False)


# ----------------------------------------------------------------- helpers


def best(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Seconds per call: the minimum over ``repeat`` runs of ``number`` calls."""
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    fields = Path("/proc/self/statm").read_text().split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


def human_time(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.0f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


# -------------------------------------------------------------- benchmarks


def bench_host_call(loop: int, repeat: int) -> dict[str, float]:
    config = str(loop).encode()
    host = instance_of(load_guest("loop_host.wat", config))
    pure = instance_of(load_guest("loop_pure.wat", config))
    state = request_state()
    with_calls = best(lambda: call_request(host, state), 1, repeat)
    without = best(lambda: call_request(pure, state), 1, repeat)
    return {
        "loop": loop,
        "loop_with_host_calls_s": with_calls,
        "loop_without_host_calls_s": without,
        "per_host_call_s": (with_calls - without) / loop,
    }


def bench_guest_call(number: int, repeat: int) -> dict[str, float]:
    import wasmtime

    guest = load_guest("noop.wat")
    instance = instance_of(guest)
    state = request_state()
    via_host = best(lambda: call_request(instance, state), number, repeat)
    cycle = best(lambda: call_cycle(instance), number, repeat)

    # the same export through plain wasmtime-py (noop imports nothing)
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module.from_file(engine, str(GUESTS / "noop.wat"))
    raw = wasmtime.Instance(store, module, []).exports(store)["handle_request"]
    assert isinstance(raw, wasmtime.Func)
    plain = best(lambda: raw(store), number, repeat)
    return {
        "handle_request_via_host_s": via_host,
        "request_cycle_via_host_s": cycle,
        "handle_request_wasmtime_py_s": plain,
    }


def _time_new_instances(guest: Guest, number: int, repeat: int) -> float:
    keep: list[GuestInstance] = []  # keep them alive: time creation, not teardown

    def make() -> None:
        keep.append(new_instance(guest))

    return best(make, number, repeat)


def bench_new_instance(number: int, repeat: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in MEMORY_GUESTS:
        guest = load_guest(name)
        out[f"new_instance_{name}_s"] = _time_new_instances(guest, number, repeat)
        gc.collect()
    loads = max(1, number // 20)
    out["guest_load_noop.wat_uncached_s"] = best(lambda: load_guest("noop.wat", cache=False), loads, repeat)
    load_guest("noop.wat")  # make sure the compile cache holds it
    out["guest_load_noop.wat_cached_s"] = best(lambda: load_guest("noop.wat"), loads, repeat)
    return out


# rewrite_body.wat touches a page of its memory on each request, noop.wat none
MEMORY_GUESTS = ("noop.wat", "rewrite_body.wat")


def memory_child(name: str, count: int, used: bool) -> dict[str, float]:
    """In a fresh process: RSS growth per instance held alive (``used``: after one request)."""
    guest = load_guest(name)
    for _ in range(10):  # warm allocator caches before the baseline
        instance = new_instance(guest)
        if used:
            call_cycle(instance)
    gc.collect()
    before = rss_bytes()
    instances = [new_instance(guest) for _ in range(count)]
    if used:
        for instance in instances:
            call_cycle(instance)
    gc.collect()
    after = rss_bytes()
    return {"rss_per_instance_bytes": (after - before) / count}


def bench_memory(count: int) -> dict[str, float]:
    """One child process per figure, so earlier allocations cannot hide growth."""
    out: dict[str, float] = {}
    for name in MEMORY_GUESTS:
        for used in (False, True):
            command = [sys.executable, __file__, "--memory-child", name]
            command += ["--instances", str(count)] + (["--used"] if used else [])
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
            figure = json.loads(done.stdout.splitlines()[-1])["rss_per_instance_bytes"]
            state = "after_1_request" if used else "fresh"
            out[f"rss_per_instance_{name}_{state}_bytes"] = figure
    return out


# -------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.micro",
        description="Micro-benchmarks of the twisted-httpwasm host (timeit).",
    )
    parser.add_argument("--loop", type=int, default=100_000, help="host calls per loop (default 100000)")
    parser.add_argument("--number", type=int, default=2000, help="calls per timeit run (default 2000)")
    parser.add_argument("--repeat", type=int, default=5, help="timeit runs, minimum kept (default 5)")
    parser.add_argument(
        "--instances",
        type=int,
        default=1000,
        help="instances held for the memory figure (default 1000)",
    )
    parser.add_argument("--output", type=Path, help="also write the figures as JSON")
    parser.add_argument("--memory-child", metavar="GUEST", help=argparse.SUPPRESS)
    parser.add_argument("--used", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.loop, args.number, args.repeat, args.instances) < 1:
        parser.error("--loop, --number, --repeat and --instances must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        figure = memory_child(args.memory_child, args.instances, args.used)
        print(json.dumps(figure))
        return 0
    from importlib.metadata import PackageNotFoundError, version

    def ver(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    info = {
        "nproc": str(len(os.sched_getaffinity(0))),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "wasmtime": ver("wasmtime"),
        "twisted": ver("twisted"),
    }
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    figures: dict[str, float] = {}
    steps: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("host call", lambda: bench_host_call(args.loop, args.repeat)),
        ("guest call", lambda: bench_guest_call(args.number, args.repeat)),
        (
            "new instance",
            lambda: bench_new_instance(max(1, args.number // 10), args.repeat),
        ),
        ("memory", lambda: bench_memory(args.instances)),
    ]
    for title, step in steps:
        print(f"{title} ...", flush=True)
        result = step()
        figures.update(result)
        for key, value in result.items():
            if key.endswith("_s"):
                shown = human_time(value)
            elif key.endswith("_bytes"):
                shown = f"{value / 1024:.1f} KiB"
            else:
                shown = f"{value:g}"
            print(f"  {key:<52} {shown:>10}", flush=True)

    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"machine": info, "figures": figures}, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
