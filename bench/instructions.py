"""Instructions per request, counted by valgrind: the deterministic twin of ``bench.inprocess``.

Run from the repository root (needs ``valgrind``; ``apt-get install valgrind``)::

    python -m bench.instructions                                  # noop, headers, rewrite_body; plain and inline
    python -m bench.instructions --scenarios noop --modes plain,inline,guestsite

Each case drives the same in-process server as ``bench.inprocess`` (``run_sync``:
raw request bytes into a channel on a ``StringTransport``) under
``valgrind --tool=cachegrind --cache-sim=no``, once for ``--low`` and once for
``--high`` requests, and reports the difference divided by the number of extra
requests: what one request costs, start-up and compilation excluded.  Hash
randomisation and address-space layout randomisation are turned off
(``PYTHONHASHSEED=0``, ``setarch -R``), so repeated runs agree to within a few
instructions, where timings on this shared machine move by 20 %.

Modes: ``plain`` (``Site(Hello())``, as ``twistd web --class``), ``inline`` (the
site ``twistd httpwasm --execution inline`` builds), ``guestsite`` (``GuestSite``
around ``Hello`` without a guest: what the site alone adds) and ``resource``
(``Site`` around the guest resource: what the guest adds, without ``GuestSite``),
and two that leave Twisted out to show the floor under the guest's share:
``session`` (a bare ``RequestState`` and ``guest.session(...)``: the pool, both
guest calls and their wrappers, as the filter uses them, inline) and ``calls``
(the two exports called straight through ``NativeFunc.call`` on one pinned
instance: what ctypes and wasmtime cost, with nothing of ours around them).
Under valgrind the server runs ~15-40 times slower than it does natively, while
the epoch clock still ticks every 10 ms of real time: a guest call would see far
more ticks per request than in a real run, and re-arm its time limit far more
often (a call reuses the deadline armed within the same tick, see
``NativeFunc.call``).  The process valgrind runs therefore stretches the epoch
interval by ``VALGRIND_SLOWDOWN``, so that ticks per request are about what
they are natively.

``thread`` (the site ``twistd httpwasm`` builds by default) and ``plain-thread``
(plain Twisted driven the same way) serve requests with 16 connections in flight
on a running reactor, as ``bench.inprocess`` drives thread mode, and count every
thread's instructions.  What they leave out is the kernel's share of the
hand-offs (context switches: ``bench.run`` reports them per request), and
valgrind runs one thread at a time, so the batching of hand-offs differs from a
real run; read them as the user-space work of a request, not its latency.  The
guest threads' monitor, which wakes every ``STALL`` of real time while calls run,
has its periods stretched by ``VALGRIND_SLOWDOWN`` too, for the same reason as
the epoch clock: unstretched, it woke ~30 times more often per request than in a
real run (~6k instructions per no-op request).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

from bench.run import SCENARIOS

MODES = ("plain", "inline", "guestsite", "resource", "session", "calls", "thread", "plain-thread")
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")
#: How much slower the server runs under valgrind (measured here: ~1.8 ms per no-op request against 45-130 µs).
VALGRIND_SLOWDOWN = 30


def _drive_runtime(scenario: str, mode: str, requests: int) -> None:
    """The runtime's share of a request, without Twisted: ``session`` or ``calls`` (see the module's doc)."""
    from bench.run import GUESTS
    from twisted_httpwasm.runtime import native
    from twisted_httpwasm.runtime.guest import Guest
    from twisted_httpwasm.runtime.state import RequestState

    case = {s.name: s for s in SCENARIOS}[scenario]
    options = {"config": case.guest_config.encode()} if case.guest_config else {}
    guest = Guest.load(str(GUESTS / case.guest), **options)
    if mode == "session":
        for _ in range(requests):
            state = RequestState(method=case.method.encode(), uri=case.path.encode(), body=None)
            session = guest.session(state, inline=True)
            if session.handle_request():
                state.enter_response_phase(200)
                session.handle_response()
        return
    # calls: the two exports alone, as the session calls them (GIL kept), on one pinned instance.
    instance = guest.pool.acquire()
    state = RequestState(method=case.method.encode(), uri=case.path.encode(), body=None)
    instance.state = state
    native.current.target = instance
    handle_request, handle_response = instance._handle_request, instance._handle_response
    accelerated = instance.accel
    if accelerated is not None:  # the compiled accelerator's call (TWISTED_HTTPWASM_PURE=1: the pure path's)
        call, request_export, response_export = (
            accelerated.call,
            handle_request.accelerated,
            handle_response.accelerated,
        )
        for _ in range(requests):
            call(request_export, True, instance, state)
            call(response_export, True, instance, state, 0, 0)
            if accelerated.pending:
                accelerated.take()
        return
    for _ in range(requests):
        handle_request.call(True)
        handle_response.call(True, 0, 0)


def _drive(scenario: str, mode: str, requests: int) -> None:
    """In the process valgrind runs: build the case's site and serve ``requests`` requests."""
    from twisted_httpwasm.runtime import engine

    engine.EPOCH_INTERVAL *= VALGRIND_SLOWDOWN  # ticks per request as in a real run (see the module's doc)
    if mode == "thread":  # likewise the guest threads' monitor, which wakes every STALL while calls run
        from twisted_httpwasm.web import guest_threads

        guest_threads.STALL *= VALGRIND_SLOWDOWN
        guest_threads.SLOW *= VALGRIND_SLOWDOWN
    if mode in ("session", "calls"):
        _drive_runtime(scenario, mode, requests)
        return
    from twisted.web.server import Site

    from bench import inprocess
    from bench.downstream import Hello

    by_name = {s.name: s for s in SCENARIOS}
    if mode in ("thread", "plain-thread"):
        case = inprocess.Case(by_name[scenario], mode)
        inprocess.run_threaded(case, inprocess.make_site(case), requests, 16)
        return
    case = inprocess.Case(by_name[scenario], "plain" if mode in ("plain", "guestsite") else "inline")
    site: Site
    if mode == "guestsite":
        from twisted_httpwasm.web.site import GuestSite

        site = GuestSite(Hello())
    elif mode == "resource":
        site = Site(inprocess.make_site(case).resource)
    else:
        site = inprocess.make_site(case)
    inprocess.run_sync(case, site, requests)


def _count(scenario: str, mode: str, requests: int) -> int:
    # sys.executable as the tests start their children: in a virtualenv it is the venv's python (a
    # symlink), which finds the venv's site-packages; its realpath would be the base interpreter.
    command = [
        "setarch",
        "-R",
        "valgrind",
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.instructions",
        "--_drive",
        f"{scenario}:{mode}:{requests}",
    ]
    env = dict(os.environ, PYTHONHASHSEED="0")
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    found = _REFS.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"{scenario}:{mode}: valgrind failed:\n{done.stdout}\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", default="noop,headers,rewrite_body")
    parser.add_argument("--modes", default="plain,inline", help=", ".join(MODES))
    parser.add_argument("--low", type=int, default=300, help="requests in the first count")
    parser.add_argument("--high", type=int, default=900, help="requests in the second count")
    parser.add_argument("--_drive", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._drive:
        scenario, mode, requests = args._drive.split(":")
        _drive(scenario, mode, int(requests))
        return 0
    if shutil.which("valgrind") is None or shutil.which("setarch") is None:
        raise SystemExit("needs valgrind and setarch: apt-get install valgrind util-linux")
    print(f"instructions per request (valgrind, ({args.high} - {args.low} requests) / {args.high - args.low})")
    print("| scenario | mode | instructions | over plain |")
    print("| --- | --- | --- | --- |")
    for scenario in [s for s in args.scenarios.split(",") if s]:
        plain = plain_thread = None
        for mode in [m for m in args.modes.split(",") if m]:
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}: {', '.join(MODES)}")
            if mode == "plain" and plain is not None:
                continue
            per_request = (_count(scenario, mode, args.high) - _count(scenario, mode, args.low)) / (
                args.high - args.low
            )
            if mode == "plain":
                plain = per_request
            elif mode == "plain-thread":
                plain_thread = per_request
            over = ""
            if plain and mode in ("inline", "guestsite", "resource"):
                over = f"+{per_request - plain:,.0f} ({per_request / plain - 1:+.0%})"
            elif plain_thread and mode == "thread":  # over plain Twisted driven the same way
                over = f"+{per_request - plain_thread:,.0f} ({per_request / plain_thread - 1:+.0%}, of plain-thread)"
            elif mode in ("session", "calls"):
                over = "(runtime only: no Twisted)"
            print(f"| {scenario} | {mode} | {per_request:,.0f} | {over} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
