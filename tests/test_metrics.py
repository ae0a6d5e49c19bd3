"""Prometheus metrics per guest: a known mix of requests, scraped over HTTP, counted exactly."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.python import usage
from twisted.web.resource import Resource

from twisted_httpwasm import Execution, Guest, GuestResource, LogLimit
from twisted_httpwasm.service import observability
from twisted_httpwasm.service.tap import Options
from twisted_httpwasm.web import metrics as metrics_module
from twisted_httpwasm.web.metrics import GuestMetrics

from .support import NOOP_RESPONSE, ServerTestCase, TempFilesMixin, module, poll
from .test_twistd import DEADLINE, HEADER_GUEST, TwistdTestCase, free_port

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - the test extra installs it
    text_string_to_metric_families = None

#: By the first letter of the path: /t traps, /s spins past the time limit, /a answers itself
#: (logging two lines, one over a 1-message limit), anything else logs one line and passes on.
MIX_GUEST = (
    """
  (data (i32.const 200) "passed")
  (data (i32.const 220) "answered one")
  (data (i32.const 240) "answered two")
  (func (export "_initialize") (drop (call $enable_features (i32.const 1))))
  (func (export "handle_request") (result i64)
    (local $c i32)
    (drop (call $get_uri (i32.const 100) (i32.const 64)))
    (local.set $c (i32.load8_u (i32.const 101)))
    (if (i32.eq (local.get $c) (i32.const 116)) (then unreachable))
    (if (i32.eq (local.get $c) (i32.const 115)) (then (loop $spin (br $spin))))
    (if (i32.eq (local.get $c) (i32.const 97))
      (then
        (call $log (i32.const 0) (i32.const 220) (i32.const 12))
        (call $log (i32.const 0) (i32.const 240) (i32.const 12))
        (call $set_status_code (i32.const 200))
        (return (i64.const 0))))
    (call $log (i32.const 0) (i32.const 200) (i32.const 6))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)


class Leaf(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"downstream"


def scrape_values(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text scrape: (name, labels) -> value."""
    assert text_string_to_metric_families is not None
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def value(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return values[(name, frozenset(labels.items()))]


class MetricsMixin:
    """Scrapes a /metrics URL."""

    @inlineCallbacks
    def scrape(self, url: str) -> Generator[Any, Any, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
        status, headers, body = yield self.fetch("GET", url)  # type: ignore[attr-defined]
        assert status == 200, (status, body)
        assert headers.getRawHeaders("content-type")[0].startswith("text/plain"), headers
        return scrape_values(body.decode())


class GuestMetricsTests(TempFilesMixin, MetricsMixin, ServerTestCase):
    @inlineCallbacks
    def test_a_known_mix_is_counted_exactly(self) -> Generator[Any, Any, None]:
        """3 passed, 2 answered, 2 traps, 1 time-out and a 413 show up in the scrape as exactly that.

        Per outcome; histogram counts equal the requests and the guest calls; traps by phase;
        instances created and discarded; the pool; memory; the compile cache; guest log lines.
        """
        guest = Guest(
            module(MIX_GUEST),
            name="mix",
            execution=Execution.INLINE,
            timeout=0.2,
            max_buffer_bytes=16,
            log_limit=LogLimit(messages=1),
            cache=self.mktemp(),
        )
        metrics = GuestMetrics()
        metrics.watch(guest)
        url = self.serve(GuestResource(guest, Leaf()))
        metrics_url = self.serve(metrics.resource())

        expected = [("/trap", 500), ("/trap", 500), ("/spin", 500), ("/a", 200), ("/a", 200)]
        expected += [("/pass", 200)] * 3
        for path, status in expected:
            got, _, _ = yield self.fetch("GET", url + path)
            self.assertEqual(got, status, path)
        got, _, _ = yield self.fetch("POST", url + "/pass", data=b"x" * 100)  # over max_buffer_bytes
        self.assertEqual(got, 413)

        values = yield self.scrape(metrics_url)
        requests = {
            outcome: value(values, "httpwasm_requests_total", guest="mix", outcome=outcome)
            for outcome in ("passed", "answered", "trapped", "timed_out", "too_large", "fail_open", "unavailable")
        }
        self.assertEqual(
            requests,
            {
                "passed": 3,
                "answered": 2,
                "trapped": 2,
                "timed_out": 1,
                "too_large": 1,
                "fail_open": 0,
                "unavailable": 0,
            },
        )
        self.assertEqual(value(values, "httpwasm_request_duration_seconds_count", guest="mix"), 9)
        calls = "httpwasm_guest_call_duration_seconds_count"
        self.assertEqual(value(values, calls, guest="mix", phase="handle_request"), 8)
        self.assertEqual(value(values, calls, guest="mix", phase="handle_response"), 3)
        self.assertEqual(value(values, "httpwasm_guest_traps_total", guest="mix", phase="handle_request"), 3)
        self.assertEqual(value(values, "httpwasm_instances_created_total", guest="mix"), 4)
        self.assertEqual(value(values, "httpwasm_instances_trapped_total", guest="mix"), 3)
        self.assertEqual(value(values, "httpwasm_instances_retired_total", guest="mix"), 0)
        self.assertEqual(value(values, "httpwasm_instance_creation_failures_total", guest="mix"), 0)
        self.assertEqual(value(values, "httpwasm_pool_instances", guest="mix", state="idle"), 1)
        self.assertEqual(value(values, "httpwasm_pool_instances", guest="mix", state="in_use"), 0)
        self.assertEqual(value(values, "httpwasm_guest_memory_bytes", guest="mix"), 65536)
        self.assertEqual(value(values, "httpwasm_compile_cache_misses_total", guest="mix"), 1)
        self.assertEqual(value(values, "httpwasm_compile_cache_hits_total", guest="mix"), 0)
        self.assertEqual(value(values, "httpwasm_guest_log_messages_total", guest="mix"), 5)
        self.assertEqual(value(values, "httpwasm_guest_log_messages_dropped_total", guest="mix"), 2)

    def test_metric_names_follow_prometheus_conventions(self) -> None:
        """Counters end in _total, durations in _seconds, sizes in _bytes; no label carries a URI."""
        guest = Guest(module(MIX_GUEST), name="names", cache=False)
        metrics = GuestMetrics()
        metrics.watch(guest)
        from prometheus_client import generate_latest

        families = list(text_string_to_metric_families(generate_latest(metrics.registry).decode()))
        self.assertTrue(families)
        for family in families:
            self.assertTrue(family.name.startswith("httpwasm_"), family.name)
            if family.type == "counter":
                self.assertFalse(family.name.endswith("_total"), family.name)  # the parser strips it
            if family.type == "histogram":
                self.assertTrue(family.name.endswith("_seconds"), family.name)
            for sample in family.samples:
                self.assertLessEqual(set(sample.labels), {"guest", "phase", "outcome", "state", "le"}, sample)


class MetricsOptionTests(TempFilesMixin, ServerTestCase):
    def test_without_the_extra_the_option_says_how_to_install_it(self) -> None:
        """--metrics without prometheus_client is refused with the pip command that installs it."""
        self.patch(metrics_module, "available", lambda: False)
        options = Options()
        with self.assertRaises(usage.UsageError) as raised:
            options.parseOptions(["--guest", self.guest_file(HEADER_GUEST), "--metrics", "tcp:0"])
        self.assertIn("pip install 'twisted-httpwasm[metrics]'", str(raised.exception))

    def test_a_bad_endpoint_is_refused(self) -> None:
        """--metrics with an endpoint that cannot be parsed is a usage error naming it."""
        with self.assertRaises(usage.UsageError) as raised:
            observability.check_metrics_option("nonsense:1")
        self.assertIn("--metrics nonsense:1", str(raised.exception))


class Watched(Protocol):
    """A client connection that sends nothing by itself and remembers what it got and that it was closed."""

    lost = False
    received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


class TwistdMetricsTests(MetricsMixin, TwistdTestCase):
    @inlineCallbacks
    def start_with_metrics(self, *args: str) -> Generator[Any, Any, tuple[str, str]]:
        metrics_port = free_port()
        url = yield self.start_server(*args, "--metrics", f"tcp:{metrics_port}:interface=127.0.0.1")
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        from .test_twistd import accepts_connections

        if not (yield poll(lambda: accepts_connections(metrics_port), DEADLINE)):
            self.fail(f"--metrics is not served:\n{self.server.output()}")
        return url, metrics_url

    @inlineCallbacks
    def test_metrics_endpoint_of_twistd(self) -> Generator[Any, Any, None]:
        """twistd httpwasm --metrics serves /metrics on its own port; requests through the guest are counted."""
        path = self.guest_file(HEADER_GUEST)
        guest = Path(path).stem
        url, metrics_url = yield self.start_with_metrics("--guest", path, "--class", "tests.test_twistd.Hello")
        for _ in range(3):
            status, _, _ = yield self.fetch("GET", url + "/x")
            self.assertEqual(status, 200)
        values = yield self.scrape(metrics_url)
        self.assertEqual(value(values, "httpwasm_requests_total", guest=guest, outcome="passed"), 3)
        self.assertEqual(value(values, "httpwasm_request_duration_seconds_count", guest=guest), 3)
        self.assertIn("Prometheus metrics on tcp:", self.server.output())
        status, _, _ = yield self.fetch("GET", metrics_url.replace("/metrics", "/other"))
        self.assertEqual(status, 404)

    @inlineCallbacks
    def test_workers_sum_over_processes(self) -> Generator[Any, Any, None]:
        """With --workers 2, one scrape of the main process shows the requests both processes served."""
        path = self.guest_file(HEADER_GUEST)
        guest = Path(path).stem
        url, metrics_url = yield self.start_with_metrics(
            "--workers", "2", "--guest", path, "--class", "tests.test_workers.Pid"
        )
        server = self.server
        pids: list[int] = []

        @inlineCallbacks
        def both_answered() -> Generator[Any, Any, bool]:
            status, _, body = yield self.fetch("GET", url + "/pid")  # a fresh connection each time
            self.assertEqual(status, 200)
            pids.append(int(body))
            return len(set(pids)) >= 2

        if not (yield poll(both_answered, 30, interval=0.01)):
            self.fail(f"only {sorted(set(pids))} answered:\n{server.output()}")
        values = yield self.scrape(metrics_url)
        self.assertEqual(value(values, "httpwasm_requests_total", guest=guest, outcome="passed"), len(pids))
        self.assertEqual(value(values, "httpwasm_request_duration_seconds_count", guest=guest), len(pids))
        self.assertIn("(summed over every process)", server.output())

    @inlineCallbacks
    def test_metrics_listener_has_the_sites_deadlines(self) -> Generator[Any, Any, None]:
        """The --metrics listener closes idle connections after --idle-timeout and slow headers after
        --header-timeout, as the main site does (Twisted's default would keep them 12 hours, and enough of them
        take every file descriptor); its startup line says it listens on all interfaces when it does."""
        metrics_port = free_port()
        yield self.start_server(
            "--guest", self.guest_file(HEADER_GUEST), "--class", "tests.test_twistd.Hello",
            "--metrics", f"tcp:{metrics_port}", "--idle-timeout", "3", "--header-timeout", "1",
        )  # fmt: skip
        idle = []
        for _ in range(5):
            idle.append((yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", metrics_port), Watched())))
        slow = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", metrics_port), Watched())
        slow.transport.write(b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-slow: ")
        trickle = LoopingCall(lambda: slow.lost or slow.transport.write(b"a"))  # resets the idle timer
        trickle.start(0.25)
        self.addCleanup(lambda: trickle.running and trickle.stop())
        if not (yield poll(lambda: slow.lost, DEADLINE)):
            self.fail("headers that trickle were not cut at --header-timeout")
        if not (yield poll(lambda: all(connection.lost for connection in idle), DEADLINE)):
            self.fail("idle connections to the metrics port were not closed at --idle-timeout")
        self.assertIn(b"408", slow.received)
        self.assertIn(
            f"Prometheus metrics on tcp:{metrics_port} (all interfaces, port {metrics_port}: reachable from other"
            " machines; add :interface=127.0.0.1 to keep it on this one) at /metrics",
            self.server.output(),
        )

    @inlineCallbacks
    def test_stale_multiprocess_dirs_are_removed_at_the_next_start(self) -> Generator[Any, Any, None]:
        """After kill -9 of a --workers main process its multiprocess-metrics directory stays; the next start
        removes it, and only it: not one of a running process, nor one of another user."""
        tmp = Path(self.mktemp())
        tmp.mkdir()
        previous = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(tmp)  # the twistd processes' temporary directory (tempfile.gettempdir)
        self.addCleanup(lambda: os.environ.pop("TMPDIR") if previous is None else os.environ.update(TMPDIR=previous))
        args = ("--workers", "2", "--guest", self.guest_file(HEADER_GUEST), "--class", "tests.test_workers.Pid")
        yield self.start_with_metrics(*args)
        killed = self.server
        (stale,) = tmp.glob(f"httpwasm-metrics-{killed.process.pid}-*")
        killed.process.kill()
        killed.process.wait()
        self.assertTrue(stale.is_dir())
        alive = tmp / f"httpwasm-metrics-{os.getpid()}-running"  # this test's own process: alive
        alive.mkdir()
        others = tmp / f"httpwasm-metrics-{killed.process.pid}-others"
        others.mkdir()
        if os.geteuid() == 0:
            os.chown(others, 65534, -1)  # of another user: never ours to remove

        yield self.start_with_metrics(*args)
        self.assertIn(
            f"removed {stale}, the metrics of process {killed.process.pid}, which is gone", self.server.output()
        )
        self.assertFalse(stale.exists())
        self.assertTrue(alive.is_dir())
        self.assertEqual(others.is_dir(), os.geteuid() == 0)
        (current,) = tmp.glob(f"httpwasm-metrics-{self.server.process.pid}-*")
        self.assertTrue(current.is_dir())

    @inlineCallbacks
    def test_the_demo_mentions_metrics(self) -> Generator[Any, Any, None]:
        """twistd -n httpwasm (the demo) says in its startup log how to get metrics."""
        yield self.start_server()
        self.assertIn("add --metrics tcp:9100:interface=127.0.0.1", self.server.output())
