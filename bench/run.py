"""Load benchmark: plain Twisted vs twisted-httpwasm, side by side in one run.

Run from the repository root::

    python -m bench.run                      # everything, 10 s per measurement
    python bench/run.py --duration 3 --scenarios noop,router_guest
    python bench/run.py --plain-only --duration 3

For every scenario and every execution mode it starts ``twistd web`` (plain) and
``twistd httpwasm`` (the same ``bench.downstream.Hello`` resource behind a guest)
one after the other, ``--rounds`` times, alternating plain and wasm, loads each
with ``wrk`` over loopback, and reports the median of the rounds and the ratios
wasm/plain, and the server's CPU time per request (user + system, from /proc),
whose plain/wasm ratio is what the throughput ratio would be for a server with
a core to itself: wrk shares the two cores, and other load on this machine moves
throughput far more than it moves CPU time per request. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

if not __package__:  # python bench/run.py: the repository root, for tests.launch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.launch import HOST, child_env, free_port, start_twistd, stop, twistd_command, wait_listening

REPO = Path(__file__).resolve().parent.parent
GUESTS = REPO / "bench" / "guests"
DOWNSTREAM = "bench.downstream.Hello"
POST_BODY_SIZE = 4096

READY_TIMEOUT = 30.0  # seconds for a server to accept connections
STOP_TIMEOUT = 10.0  # seconds between SIGTERM and SIGKILL
PROBE_TIMEOUT = 10.0  # seconds for the one correctness request
WRK_GRACE = 30.0  # seconds wrk may run past its --duration before it is killed

MODES = ("thread", "inline")


# ---------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One request shape, and the guest that handles it on the wasm side."""

    name: str
    guest: str
    path: str
    description: str
    method: str = "GET"
    body: bytes = b""
    guest_config: str | None = None
    # what a correct wasm answer looks like (checked once before loading)
    wasm_body: bytes = b"hello world\n"
    wasm_headers: tuple[tuple[str, str], ...] = ()

    @property
    def plain_body(self) -> bytes:
        if self.method == "POST":
            return b"%d\n" % (len(self.body),)
        return b"hello world\n"


POST_BODY = b"x" * POST_BODY_SIZE

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "noop",
        "noop.wat",
        "/",
        "guest returns next=1 and does nothing: the fixed cost of the host",
    ),
    Scenario(
        "router_guest",
        "router.wat",
        "/guest",
        "guest reads the URI and answers itself (downstream never runs)",
        wasm_body=b"hello from the guest\n",
    ),
    Scenario(
        "router_pass",
        "router.wat",
        "/other",
        "guest reads the URI and passes the request on",
    ),
    Scenario(
        "headers",
        "headers.wat",
        "/",
        "guest sets 2 response headers, reads 1 request header (3 host calls)",
        wasm_headers=(("x-bench-guest", "headers"), ("x-bench-seen", "yes")),
    ),
    Scenario(
        "plugin",
        "plugin.wat",
        "/",
        "models a real plugin: log x3 (debug), WASI clock, reads 1 request header, adds 1 response header",
        wasm_headers=(("x-plugin", "catalog"),),
    ),
    Scenario(
        "rewrite_body",
        "rewrite_body.wat",
        "/",
        "buffer_response; guest reads the response body and writes it upper-cased",
        wasm_body=b"HELLO WORLD\n",
    ),
    Scenario(
        "read_body",
        "read_body.wat",
        "/",
        "POST 4 KiB; buffer_request; guest reads the whole request body",
        method="POST",
        body=POST_BODY,
        wasm_body=b"%d\n" % (POST_BODY_SIZE,),
    ),
)


# ------------------------------------------------------------------ results


@dataclass
class WrkResult:
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    #: The server process's CPU time (user + system, all threads) per request it answered to wrk.
    cpu_us_per_request: float | None = None
    #: Voluntary context switches of the server's threads per request (thread hand-offs, GIL waits).
    switches_per_request: float | None = None


@dataclass
class Pair:
    """All rounds of one scenario in one execution mode, and their medians."""

    scenario: str
    mode: str
    plain: list[WrkResult] = field(default_factory=list)
    wasm: list[WrkResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def median(self, side: str, attr: str) -> float | None:
        runs: list[WrkResult] = getattr(self, side)
        values = [float(value) for r in runs if (value := getattr(r, attr)) is not None]
        if not values:
            return None
        return float(statistics.median(values))

    def paired_ratio(self, attr: str, invert: bool = False) -> float | None:
        """The median over rounds of wasm/plain (plain/wasm if ``invert``), each round's two runs side by side.

        Each round measures plain and then the guest, seconds apart, so a change in
        the machine's speed between rounds cancels out of that round's ratio.
        """
        ratios = []
        for plain, wasm in zip(self.plain, self.wasm, strict=False):
            a, b = getattr(wasm, attr), getattr(plain, attr)
            if invert:
                a, b = b, a
            if a is not None and b:
                ratios.append(a / b)
        return float(statistics.median(ratios)) if ratios else None

    def errors(self, side: str) -> int:
        runs: list[WrkResult] = getattr(self, side)
        return sum(r.non_2xx + r.socket_errors for r in runs)


# ------------------------------------------------------------------ helpers


def log(message: str) -> None:
    print(message, flush=True)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    commands = [["apt-get", "install", "-y", "wrk"]]
    commands.append(["apt-get", "update"])
    commands.append(["apt-get", "install", "-y", "wrk"])
    for command in commands:
        log(f"wrk not found; running: {' '.join(command)}")
        try:
            apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            done = subprocess.run(command, check=False, timeout=600, env=apt_env)
        except (OSError, subprocess.TimeoutExpired) as e:
            sys.exit(f"could not run {command[0]}: {e}; install wrk by hand")
        found = shutil.which("wrk")
        if found:
            return found
        if done.returncode != 0:
            log(f"{' '.join(command)} exited {done.returncode}")
    sys.exit("wrk is still missing; install it by hand (apt-get install -y wrk)")


def plugin_available() -> bool:
    """True when ``twistd --help`` lists the httpwasm plugin."""
    try:
        done = subprocess.run(
            twistd_command("--help"),
            env=child_env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return re.search(r"^\s*httpwasm\b", done.stdout, re.MULTILINE) is not None


def version_of(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(wrk: str) -> dict[str, str]:
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        wrk_version = subprocess.run(
            [wrk, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.splitlines()[0]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        wrk_version = "?"
    try:
        nproc = str(len(os.sched_getaffinity(0)))
    except AttributeError:
        nproc = str(os.cpu_count())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "nproc": nproc,
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "wasmtime": version_of("wasmtime"),
        "twisted": version_of("twisted"),
        "twisted-httpwasm": version_of("twisted-httpwasm"),
        "wrk": wrk_version,
        "platform": platform.platform(),
        "loadavg at start": load,
    }


# ------------------------------------------------------------------ servers


def server_command(side: str, scenario: Scenario, mode: str, port: int) -> list[str]:
    listen = f"tcp:{port}:interface={HOST}"
    if side == "plain":
        return [
            "-n",
            "--pidfile=",
            "web",
            "--listen",
            listen,
            "--class",
            DOWNSTREAM,
        ]
    command = [
        "-n",
        "--pidfile=",
        "httpwasm",
        "--guest",
        str(GUESTS / scenario.guest),
    ]
    if scenario.guest_config is not None:
        command += ["--guest-config", scenario.guest_config]
    command += ["--execution", mode, "--listen", listen, "--class", DOWNSTREAM]
    return command


@contextlib.contextmanager
def server(args: Sequence[str], port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``twistd ARGS`` (:func:`tests.launch.start_twistd`), once it accepts connections; stopped afterwards."""
    proc = start_twistd(args, log_path)
    try:
        wait_listening(proc, port, READY_TIMEOUT, log_path)
        yield proc
    finally:
        stop(proc, STOP_TIMEOUT)


def probe(port: int, scenario: Scenario, side: str) -> None:
    """One request with http.client: refuse to measure a server that answers wrong."""
    conn = http.client.HTTPConnection(HOST, port, timeout=PROBE_TIMEOUT)
    try:
        headers = {"User-Agent": "bench-probe"}
        if scenario.method == "POST":
            headers["Content-Type"] = "application/octet-stream"
        conn.request(scenario.method, scenario.path, body=scenario.body or None, headers=headers)
        response = conn.getresponse()
        body = response.read()
        want = scenario.wasm_body if side == "wasm" else scenario.plain_body
        problems = []
        if response.status != 200:
            problems.append(f"status {response.status}")
        if body != want:
            problems.append(f"body {body[:200]!r}, expected {want!r}")
        if side == "wasm":
            for name, value in scenario.wasm_headers:
                got = response.getheader(name)
                if got != value:
                    problems.append(f"header {name}: {got!r}, expected {value!r}")
        if problems:
            raise RuntimeError(
                f"{side} server answered {scenario.method} {scenario.path} wrongly: {'; '.join(problems)}"
            )
    finally:
        conn.close()


# --------------------------------------------------------------------- wrk

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unparsable wrk time {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    total = re.search(r"^\s+(\d+) requests in", output, re.MULTILINE)
    if not (rps and p50 and p99 and total):
        raise ValueError(f"could not parse wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        p50_ms=_ms(p50.group(1)),
        p99_ms=_ms(p99.group(1)),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


POST_LUA = f"""\
wrk.method = "POST"
wrk.body = string.rep("x", {POST_BODY_SIZE})
wrk.headers["Content-Type"] = "application/octet-stream"
"""


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process (all its threads) has used; None where /proc has no answer."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")" closing the command name, utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def voluntary_switches(pid: int) -> int | None:
    """Voluntary context switches of all the process's threads so far (threads that ended are not counted)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    except OSError:
        return None
    return total


def run_wrk(
    wrk: str,
    args: argparse.Namespace,
    port: int,
    scenario: Scenario,
    duration: int,
    lua: Path | None,
) -> WrkResult:
    command = [
        wrk,
        f"-t{args.threads}",
        f"-c{args.connections}",
        f"-d{duration}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    if scenario.method == "POST":
        assert lua is not None
        command += ["-s", str(lua)]
    command.append(f"http://{HOST}:{port}{scenario.path}")
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=duration + WRK_GRACE,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout)


# -------------------------------------------------------------------- main


def measure(
    wrk: str,
    args: argparse.Namespace,
    side: str,
    scenario: Scenario,
    mode: str,
    workdir: Path,
    lua: Path,
) -> WrkResult:
    port = free_port()
    log_path = workdir / f"{scenario.name}-{mode}-{side}.log"
    with server(server_command(side, scenario, mode, port), port, log_path) as proc:
        probe(port, scenario, side)
        if args.warmup > 0:
            run_wrk(wrk, args, port, scenario, args.warmup, lua)
        cpu_before, switches_before = cpu_seconds(proc.pid), voluntary_switches(proc.pid)
        result = run_wrk(wrk, args, port, scenario, args.duration, lua)
        cpu_after, switches_after = cpu_seconds(proc.pid), voluntary_switches(proc.pid)
    if cpu_before is not None and cpu_after is not None and result.requests:
        result.cpu_us_per_request = (cpu_after - cpu_before) / result.requests * 1e6
    if switches_before is not None and switches_after is not None and result.requests:
        result.switches_per_request = (switches_after - switches_before) / result.requests
    # both sides log one access line per request: ~15 MB per 10 s; keep only failures
    log_path.unlink(missing_ok=True)
    errors = result.non_2xx + result.socket_errors
    note = f", {errors} errors" if errors else ""
    cpu = f"  cpu {fmt(result.cpu_us_per_request, '6.1f')} us/req  {fmt(result.switches_per_request, '5.2f')} cs/req"
    log(
        f"  {scenario.name:<13} {mode:<6} {side:<5} {result.requests_per_sec:9.1f} req/s"
        f"  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms{cpu}{note}"
    )
    return result


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(pairs: Sequence[Pair]) -> str:
    headers = (
        "scenario",
        "mode",
        "plain req/s",
        "wasm req/s",
        "wasm/plain",
        "paired",
        "plain p50/p99 ms",
        "wasm p50/p99 ms",
        "p99 wasm/plain",
        "cpu us/req plain/wasm",
        "plain/wasm cpu",
        "cs/req plain/wasm",
    )
    rows: list[tuple[str, ...]] = [headers]
    for p in pairs:
        prps, wrps = (
            p.median("plain", "requests_per_sec"),
            p.median("wasm", "requests_per_sec"),
        )
        p50, p99 = p.median("plain", "p50_ms"), p.median("plain", "p99_ms")
        w50, w99 = p.median("wasm", "p50_ms"), p.median("wasm", "p99_ms")
        pcpu, wcpu = p.median("plain", "cpu_us_per_request"), p.median("wasm", "cpu_us_per_request")
        flag = " !" if p.errors("plain") or p.errors("wasm") else ""
        flag += " FAILED" if p.failures else ""
        rows.append(
            (
                p.scenario + flag,
                p.mode,
                fmt(prps, ".1f"),
                fmt(wrps, ".1f"),
                fmt(ratio(wrps, prps), ".3f"),
                fmt(p.paired_ratio("requests_per_sec"), ".3f"),
                f"{fmt(p50, '.2f')}/{fmt(p99, '.2f')}",
                f"{fmt(w50, '.2f')}/{fmt(w99, '.2f')}",
                fmt(ratio(w99, p99), ".3f"),
                f"{fmt(pcpu, '.1f')}/{fmt(wcpu, '.1f')}",
                fmt(p.paired_ratio("cpu_us_per_request", invert=True), ".3f"),
                f"{fmt(p.median('plain', 'switches_per_request'), '.2f')}/"
                f"{fmt(p.median('wasm', 'switches_per_request'), '.2f')}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def csv_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {text!r})")
        return items

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [s.name for s in SCENARIOS]
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Load-benchmark plain Twisted against twisted-httpwasm, in the same run.",
    )
    parser.add_argument(
        "--duration",
        type=int,
        default=10,
        help="whole seconds per measurement (wrk takes whole seconds) (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="whole seconds of load before each measurement, 0 for none (default 2)",
    )
    parser.add_argument("--connections", type=int, default=16, help="wrk connections (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="plain/wasm alternations per pair; medians reported (default 2)",
    )
    parser.add_argument(
        "--scenarios",
        type=csv_list(names),
        default=names,
        help=f"comma-separated subset of {','.join(names)}",
    )
    parser.add_argument(
        "--modes",
        type=csv_list(MODES),
        default=list(MODES),
        help="comma-separated subset of thread,inline",
    )
    parser.add_argument(
        "--plain-only",
        action="store_true",
        help="measure plain Twisted only (no httpwasm plugin needed)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="also write all rounds and medians to this JSON file",
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.warmup < 0 or args.rounds < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--duration > 0, --warmup >= 0, --rounds/--connections/--threads >= 1")
    if args.threads > args.connections:
        parser.error("wrk needs --connections >= --threads")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    wrk = ensure_wrk()
    if not args.plain_only and not plugin_available():
        log("the `twistd httpwasm` plugin is not available (twistd --help does not list it, with the")
        log(f"repository root {REPO} on PYTHONPATH); use --plain-only to measure plain Twisted alone.")
        return 2

    info = machine_info(wrk)
    log("machine:")
    for key, value in info.items():
        log(f"  {key:<17} {value}")
    log(
        f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration}s --latency,"
        f" {args.warmup}s warm-up, {args.rounds} round(s), loopback {HOST}"
    )

    scenarios = [s for s in SCENARIOS if s.name in args.scenarios]
    modes: list[str] = ["-"] if args.plain_only else args.modes
    sides = ["plain"] if args.plain_only else ["plain", "wasm"]
    pairs: list[Pair] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="httpwasm-bench-") as tmp:
        workdir = Path(tmp)
        lua = workdir / "post.lua"
        lua.write_text(POST_LUA)
        for scenario in scenarios:
            for mode in modes:
                pair = Pair(scenario.name, mode)
                pairs.append(pair)
                for _ in range(args.rounds):
                    for side in sides:
                        try:
                            result = measure(wrk, args, side, scenario, mode, workdir, lua)
                        except (
                            RuntimeError,
                            ValueError,
                            subprocess.TimeoutExpired,
                        ) as e:
                            log(f"  {scenario.name:<13} {mode:<6} {side:<5} FAILED: {e}")
                            pair.failures.append(f"{side}: {e}")
                            continue
                        getattr(pair, side).append(result)

    log("")
    log(f"medians of {args.rounds} round(s), {time.monotonic() - started:.0f}s in all:")
    log(table(pairs))
    if any(p.errors("plain") or p.errors("wasm") for p in pairs):
        log("! = wrk saw non-2xx responses or socket errors in that row (see the per-run lines above)")
    failed = [p for p in pairs if p.failures]
    if failed:
        log(f"FAILED = {sum(len(p.failures) for p in failed)} measurement(s) failed; the medians use the rest")

    if args.output:
        report = {
            "machine": info,
            "settings": {
                "duration": args.duration,
                "warmup": args.warmup,
                "connections": args.connections,
                "threads": args.threads,
                "rounds": args.rounds,
                "plain_only": args.plain_only,
            },
            "scenarios": {s.name: s.description for s in scenarios},
            "results": [
                {
                    "scenario": p.scenario,
                    "mode": p.mode,
                    "plain": [asdict(r) for r in p.plain],
                    "wasm": [asdict(r) for r in p.wasm],
                    "failures": p.failures,
                    "median": {
                        side: {
                            attr: p.median(side, attr)
                            for attr in (
                                "requests_per_sec",
                                "p50_ms",
                                "p99_ms",
                                "cpu_us_per_request",
                                "switches_per_request",
                            )
                        }
                        for side in sides
                    },
                    "ratio_rps": ratio(
                        p.median("wasm", "requests_per_sec"),
                        p.median("plain", "requests_per_sec"),
                    ),
                    "ratio_p99": ratio(p.median("wasm", "p99_ms"), p.median("plain", "p99_ms")),
                    # The same ratio, round by round (each round's two runs were seconds apart).
                    "ratio_rps_paired": p.paired_ratio("requests_per_sec"),
                    # Plain's CPU per request over the guest's, round by round: the throughput ratio
                    # of a server that has a core to itself.
                    "ratio_cpu": p.paired_ratio("cpu_us_per_request", invert=True),
                }
                for p in pairs
            ],
        }
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
