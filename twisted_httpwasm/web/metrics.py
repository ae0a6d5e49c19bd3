"""Prometheus metrics per guest (the ``metrics`` extra: ``pip install 'twisted-httpwasm[metrics]'``).

:class:`GuestMetrics` is an observer (:mod:`twisted_httpwasm.runtime.observe`)
and a Prometheus collector.  What happens per request (outcome, durations,
traps) is counted when the request path tells it a request is over; what the
runtime already counts (pool, compile cache, guest log) is read at scrape
time, so the hot path pays nothing for it::

    metrics = GuestMetrics()
    metrics.watch(guest)                       # before serving
    root.putChild(b"metrics", metrics.resource())

Under ``--workers N`` the processes share prometheus_client's multiprocess
mode (``PROMETHEUS_MULTIPROC_DIR``, set up by the main process before any
worker starts): every process writes its values to that directory and the
main process's ``/metrics`` sums them.  There, the runtime's counters are
copied into it once a second (:meth:`GuestMetrics.sync`), not read at scrape
time.  See docs/observability.md for every metric.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from time import monotonic as _monotonic
from typing import Any

from twisted.application import service
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .. import _optional
from ..runtime.observe import OUTCOMES, add_observer
from ..runtime.state import Phase
from .site import DEFAULT_HEADER_TIMEOUT, DEFAULT_IDLE_TIMEOUT, GuestSite

__all__ = [
    "CALL_BUCKETS",
    "INSTALL_HINT",
    "GuestMetrics",
    "MetricsResource",
    "MetricsSyncService",
    "available",
    "metrics_site",
    "multiprocess_dir",
]

#: What the ``--metrics`` option says when prometheus_client is missing.
INSTALL_HINT = _optional.refusal("--metrics", "metrics")

#: Histogram buckets (seconds) of one guest call: most take microseconds.
CALL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Histogram buckets (seconds) of a whole request through a guest (downstream included).
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_PHASES = {Phase.REQUEST: "handle_request", Phase.RESPONSE: "handle_response", Phase.INIT: "init"}

#: The runtime's own counters, read per guest: (metric name without _total, help, how to read it).
_RUNTIME_COUNTERS: tuple[tuple[str, str, Callable[[Any], float]], ...] = (
    ("httpwasm_instances_created", "Guest instances created.", lambda g: g.pool.stats.created),
    (
        "httpwasm_instances_retired",
        "Idle guest instances dropped after the idle timeout.",
        lambda g: g.pool.stats.retired,
    ),
    (
        "httpwasm_instances_trapped",
        "Guest instances discarded because a call trapped or hit its time limit.",
        lambda g: g.pool.stats.discarded,
    ),
    (
        "httpwasm_instance_creation_failures",
        "Guest instances that failed to initialise.",
        lambda g: g.pool.stats.creation_failures,
    ),
    (
        "httpwasm_compile_cache_hits",
        "Guest loads served from the compile cache.",
        lambda g: g.compile_cache.hits if g.compile_cache is not None else 0,
    ),
    (
        "httpwasm_compile_cache_misses",
        "Guest loads that had to compile.",
        lambda g: g.compile_cache.misses if g.compile_cache is not None else 0,
    ),
    ("httpwasm_guest_log_messages", "Guest log messages logged.", lambda g: g.log_messages),
    (
        "httpwasm_guest_log_messages_dropped",
        "Guest log messages dropped over a call's log limit.",
        lambda g: g.log_dropped,
    ),
)


def available() -> bool:
    """Whether prometheus_client is installed (without importing it)."""
    return _optional.installed("metrics")


def multiprocess_dir() -> str | None:
    """The directory of prometheus_client's multiprocess mode, if this process uses it."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def _memory_bytes(guest: Any) -> int:
    """The linear memory of ``guest``'s idle instances (in-use ones are busy in their thread)."""
    pool = guest.pool
    total = 0
    with pool._lock:  # idle instances cannot be lent while it is held
        for instance in pool._idle:
            try:
                total += instance.memory.size()
            except Exception:  # noqa: BLE001 - an instance being torn down: not counted
                continue
    return total


class GuestMetrics:
    """Per-guest Prometheus metrics: an observer for :class:`~twisted_httpwasm.runtime.guest.Guest`.

    ``registry`` is where the metrics are registered (a fresh
    ``CollectorRegistry`` by default; pass ``prometheus_client.REGISTRY`` to
    add them to the process's default one).  In multiprocess mode the
    per-request metrics go to the shared directory and the runtime's counters
    are kept in multiprocess metrics too (see :meth:`sync`).
    """

    def __init__(self, registry: Any = None):
        prom: Any = _optional.require("prometheus_client", "metrics", "Prometheus metrics")
        self._prom = prom
        self.multiprocess = multiprocess_dir() is not None
        if registry is None:
            registry = prom.CollectorRegistry(auto_describe=True)
        self.registry = registry
        #: The guests watched, by name: the latest one of each name (a reloaded guest replaces its old self).
        self._guests: dict[str, weakref.ref[Any]] = {}
        self.requests = prom.Counter(
            "httpwasm_requests", "Requests through a guest, by how they ended.", ["guest", "outcome"], registry=registry
        )
        self.request_seconds = prom.Histogram(
            "httpwasm_request_duration_seconds",
            "Time from the guest getting a request to the end of its part (downstream included).",
            ["guest"],
            registry=registry,
            buckets=REQUEST_BUCKETS,
        )
        self.call_seconds = prom.Histogram(
            "httpwasm_guest_call_duration_seconds",
            "Time of one guest call (handle_request or handle_response).",
            ["guest", "phase"],
            registry=registry,
            buckets=CALL_BUCKETS,
        )
        self.traps = prom.Counter(
            "httpwasm_guest_traps",
            "Guest calls that trapped or hit their time limit, by phase.",
            ["guest", "phase"],
            registry=registry,
        )
        self._synced: dict[tuple[str, str], float] = {}
        #: The labelled series already looked up, by (guest, outcome), guest, or (guest, phase).
        self._children: dict[Any, Any] = {}
        if self.multiprocess:
            # The runtime's counters cannot be read across processes at scrape time: copied here by sync().
            self._mp_counters = {
                name: prom.Counter(name, help_, ["guest"], registry=registry) for name, help_, _ in _RUNTIME_COUNTERS
            }
            self._mp_pool = prom.Gauge(
                "httpwasm_pool_instances",
                "Guest instances in the pool, idle or in use.",
                ["guest", "state"],
                registry=registry,
                multiprocess_mode="livesum",
            )
            self._mp_memory = prom.Gauge(
                "httpwasm_guest_memory_bytes",
                "Linear memory of the guest's idle instances.",
                ["guest"],
                registry=registry,
                multiprocess_mode="livesum",
            )
        else:
            registry.register(_RuntimeCollector(self))

    # -- guests ---------------------------------------------------------------------

    def watch(self, guest: Any) -> None:
        """Count ``guest``'s requests and read its runtime counters (its observer, kept with any other)."""
        add_observer(guest, self)
        self._guests[guest.name] = weakref.ref(guest)
        for outcome in OUTCOMES:
            self.requests.labels(guest.name, outcome)  # every series exists from the start, at 0

    def guests(self) -> Iterator[Any]:
        """The guests watched that still exist."""
        for ref in list(self._guests.values()):
            guest = ref()
            if guest is not None:
                yield guest

    # -- the observer -------------------------------------------------------------

    def request_finished(self, guest: Any, request: Any, state: Any, outcome: str, started: float) -> None:
        """Count the request by outcome and time it; time each guest call and count its traps."""
        name = guest.name
        known = self._guests.get(name)
        if known is None or known() is not guest:
            self._guests[name] = weakref.ref(guest)  # a reloaded guest goes on being read
        children = self._children
        key = (name, outcome)
        child = children.get(key)
        if child is None:
            child = children[key] = self.requests.labels(name, outcome)
        child.inc()
        child = children.get(name)
        if child is None:
            child = children[name] = self.request_seconds.labels(name)
        child.observe(max(0.0, _monotonic() - started))
        for phase, begun, ended, failed in getattr(state, "calls", ()):
            key = (name, phase)
            child = children.get(key)
            if child is None:
                child = children[key] = self.call_seconds.labels(name, _PHASES.get(phase, "other"))
            child.observe(max(0.0, ended - begun))
            if failed is not None:
                self.traps.labels(name, _PHASES.get(phase, "other")).inc()

    # -- scraping -----------------------------------------------------------------

    def sync(self) -> None:
        """Multiprocess mode: copy the runtime's counters and gauges of this process into the shared files."""
        if not self.multiprocess:
            return
        for guest in self.guests():
            name = guest.name
            for metric, _, read in _RUNTIME_COUNTERS:
                value = float(read(guest))
                key = (metric, name)
                before = self._synced.get(key, 0.0)
                if value > before:
                    self._mp_counters[metric].labels(name).inc(value - before)
                self._synced[key] = value
            stats = guest.pool.stats
            self._mp_pool.labels(name, "idle").set(stats.idle)
            self._mp_pool.labels(name, "in_use").set(stats.in_use)
            self._mp_memory.labels(name).set(_memory_bytes(guest))

    def exposition_registry(self) -> Any:
        """The registry a scrape reads: this one, or in multiprocess mode every process's values."""
        if not self.multiprocess:
            return self.registry
        from prometheus_client import multiprocess

        self.sync()
        _forget_dead_processes(multiprocess)
        registry = self._prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return registry

    def resource(self) -> MetricsResource:
        """A twisted.web resource answering GET with the metrics in Prometheus's text format."""
        return MetricsResource(self)


def _forget_dead_processes(multiprocess: Any) -> None:
    """Drop the live gauges of processes that ended (a replaced worker): they would count twice."""
    directory = multiprocess_dir()
    if directory is None:
        return
    for entry in os.listdir(directory):
        if not entry.startswith("gauge_live"):
            continue
        try:
            pid = int(entry.rsplit("_", 1)[1].split(".")[0])
            os.kill(pid, 0)
        except (ValueError, IndexError):
            continue
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, directory)
        except OSError:
            continue


#: A scrape is a GET: larger request bodies get 413, unread.
_MAX_SCRAPE_BODY = 64 * 1024


def metrics_site(
    metrics: GuestMetrics,
    *,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT,
) -> Site:
    """A ``Site`` serving ``/metrics`` only, without an access log line per scrape.

    It has the main site's connection deadlines (``idle_timeout``,
    ``header_timeout``: None for none), so that idle or slow connections to
    it cannot pile up and take the process's file descriptors.
    """
    root = Resource()
    child: Any = metrics.resource()
    root.putChild(b"metrics", child)
    site = _QuietSite(root, idle_timeout=idle_timeout, header_timeout=header_timeout, max_request_body=_MAX_SCRAPE_BODY)
    site.noisy = False
    return site


class _QuietSite(GuestSite):
    def log(self, request: Any) -> None:
        """A scrape is not worth an access log line."""


class _RuntimeCollector:
    """Reads the runtime's counters at scrape time (single-process mode)."""

    def __init__(self, metrics: GuestMetrics):
        self._metrics = weakref.ref(metrics)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        metrics = self._metrics()
        guests = list(metrics.guests()) if metrics is not None else []
        for name, help_, read in _RUNTIME_COUNTERS:
            family = CounterMetricFamily(name, help_, labels=["guest"])
            for guest in guests:
                family.add_metric([guest.name], float(read(guest)))
            yield family
        pool = GaugeMetricFamily(
            "httpwasm_pool_instances", "Guest instances in the pool, idle or in use.", labels=["guest", "state"]
        )
        memory = GaugeMetricFamily(
            "httpwasm_guest_memory_bytes", "Linear memory of the guest's idle instances.", labels=["guest"]
        )
        for guest in guests:
            stats = guest.pool.stats
            pool.add_metric([guest.name, "idle"], stats.idle)
            pool.add_metric([guest.name, "in_use"], stats.in_use)
            memory.add_metric([guest.name], _memory_bytes(guest))
        yield pool
        yield memory


class MetricsResource(Resource):
    """``/metrics``: the metrics of a :class:`GuestMetrics` (or any registry) in Prometheus's format.

    Rendered on the reactor thread: a scrape is a few hundred lines of text.
    """

    isLeaf = True

    def __init__(self, metrics: GuestMetrics | Any):
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        from prometheus_client.exposition import choose_encoder

        metrics = self.metrics
        registry = metrics.exposition_registry() if isinstance(metrics, GuestMetrics) else metrics
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body: bytes = encoder(registry)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return body


class MetricsSyncService(service.Service):
    """Multiprocess mode: keeps this process's runtime counters in the shared directory (every second)."""

    def __init__(self, metrics: GuestMetrics, interval: float = 1.0):
        self.metrics = metrics
        self.interval = interval
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        service.Service.startService(self)  # type: ignore[no-untyped-call]
        if self.metrics.multiprocess:
            self._loop = LoopingCall(self.metrics.sync)
            self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
