"""What ``twistd httpwasm`` sets up for ``--metrics`` and ``--otel``.

Kept apart from :mod:`~twisted_httpwasm.service.tap` (which calls these at a
few points) so that the options and the service stay readable.  Neither
prometheus_client nor OpenTelemetry is imported unless its option asks for it.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from typing import Any

from twisted.application import service, strports
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage

from ..web import metrics as _metrics
from ..web import tracing as _tracing
from ..web.access_log import RequestLog
from .config import LOG_FORMATS, HostConfig

__all__ = [
    "MetricsSyncService",
    "check_metrics_option",
    "log_format_option",
    "observe_site",
    "prepare_processes",
    "serve_metrics",
    "start_log_format",
]

_log = Logger(namespace="httpwasm")

#: Where the demo suggests serving metrics.
DEMO_METRICS = "tcp:9100:interface=127.0.0.1"


def check_metrics_option(description: str) -> str:
    """``--metrics ENDPOINT``: the extra must be installed and the endpoint usable."""
    if not _metrics.available():
        raise usage.UsageError(_metrics.INSTALL_HINT)
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise usage.UsageError(f"--metrics {description}: not a usable endpoint: {error}") from None
    return description


def log_format_option(log_format: str) -> str:
    """``--log-format text|json``: one of :data:`~twisted_httpwasm.service.config.LOG_FORMATS`."""
    if log_format not in LOG_FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    return log_format


def start_log_format(options: Any, log_format: str) -> None:
    """``--log-format json`` under twistd makes it log JSON lines (where ``--logfile`` says, as twistd would)."""
    twistd = getattr(options, "parent", None)
    if log_format == "json" and twistd is not None:
        from . import jsonlog

        # twistd imports its --logger (a name) once this command line was parsed, and calls it to start logging.
        jsonlog.configure(twistd.get("logfile"), bool(twistd.get("nodaemon")))
        twistd["logger"] = "twisted_httpwasm.service.jsonlog.twistd_observer"


def check_otel_option() -> None:
    """``--otel``: the extra must be installed."""
    if not _tracing.available():
        raise usage.UsageError(_tracing.INSTALL_HINT)


class _RemoveDirectory(service.Service):
    def __init__(self, path: str):
        self.path = path

    def stopService(self) -> None:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        shutil.rmtree(self.path, ignore_errors=True)


#: Our multiprocess-metrics directories in the temporary directory: ``httpwasm-metrics-<main pid>-<random>``.
METRICS_DIR_PREFIX = "httpwasm-metrics-"
_METRICS_DIR = re.compile(re.escape(METRICS_DIR_PREFIX) + r"(\d+)-[A-Za-z0-9_]+")


def remove_stale_metrics_dirs(where: str | None = None) -> list[str]:
    """Remove the multiprocess-metrics directories that a killed main process left (``kill -9``); their paths.

    Only ours: named ``httpwasm-metrics-<pid>-...``, a directory (not a
    link) owned by this user, and ``<pid>`` is no running process.
    """
    where = where or tempfile.gettempdir()
    removed: list[str] = []
    try:
        names = os.listdir(where)
    except OSError:
        return removed
    for name in names:
        match = _METRICS_DIR.fullmatch(name)
        if match is None:
            continue
        path = os.path.join(where, name)
        try:
            status = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid() or _running(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        _log.info("httpwasm: removed {path}, the metrics of process {pid}, which is gone", path=path, pid=match[1])
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process: running
    return True


def prepare_processes(config: HostConfig, top: service.MultiService) -> None:
    """``--metrics`` with ``--workers N``: prometheus_client's multiprocess mode for every process.

    Must run before prometheus_client is imported (it chooses its mode then):
    the directory is made here and handed to the workers in the environment;
    it is removed when the main process stops, and at the next start if that
    process was killed (:func:`remove_stale_metrics_dirs`).  An operator's own
    ``PROMETHEUS_MULTIPROC_DIR`` is used as it is.
    """
    if not config.observability.metrics:
        return
    remove_stale_metrics_dirs()
    if config.workers.count <= 1 or _metrics.multiprocess_dir() is not None:
        return
    directory = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    _RemoveDirectory(directory).setServiceParent(top)  # type: ignore[no-untyped-call]


def observe_site(config: HostConfig, site: Any, guests: list[Any], parent: service.MultiService) -> None:
    """Watch ``guests`` for ``--metrics`` and ``--otel`` (in every process: the main one and each worker)."""
    wanted = config.observability
    if wanted.metrics:
        metrics = _metrics.GuestMetrics()
        for guest in guests:
            metrics.watch(guest)
        site.guest_metrics = metrics
        MetricsSyncService(metrics).setServiceParent(parent)  # type: ignore[no-untyped-call]
    if wanted.log_format == "json":
        request_log = RequestLog()
        for guest in guests:
            request_log.watch(guest)
        request_log.install(site)
    if wanted.otel or _tracing.enabled_by_environment():
        tracing = _tracing.GuestTracing()
        for guest in guests:
            tracing.watch(guest)
        tracing.install(site)
        flush_timeout = min(config.shutdown_timeout, _tracing.DEFAULT_FLUSH_TIMEOUT)
        _tracing.TracingService(tracing, site, flush_timeout).setServiceParent(parent)  # type: ignore[no-untyped-call]
    elif _tracing.asked_by_environment():
        _log.warn("httpwasm: OTEL_* variables ask for traces, but {refusal}", refusal=_tracing.ENVIRONMENT_HINT)


def _where(description: str) -> str:
    """Where a TCP endpoint listens, said plainly: all interfaces (reachable from other machines) or which one."""
    from .workers import TCPListen

    try:
        endpoint = TCPListen.parse(description)
    except (ValueError, TypeError, KeyError):
        return ""
    if endpoint is None:
        return ""
    if endpoint.interface in ("", "0.0.0.0", "::"):
        return (
            f" (all interfaces, port {endpoint.port}: reachable from other machines;"
            " add :interface=127.0.0.1 to keep it on this one)"
        )
    return f" (interface {endpoint.interface}, port {endpoint.port})"


def serve_metrics(config: HostConfig, site: Any, top: service.MultiService) -> None:
    """Serve ``/metrics`` on ``--metrics ENDPOINT`` (main process only); the demo says how to."""
    description = config.observability.metrics
    if description:
        # The main site's connection deadlines: idle or slow scrapers cannot pile up and take every descriptor.
        metrics_site = _metrics.metrics_site(
            site.guest_metrics, idle_timeout=config.limits.idle_timeout, header_timeout=config.limits.header_timeout
        )
        endpoint = strports.service(description, metrics_site)  # type: ignore[arg-type]
        endpoint.setServiceParent(top)  # type: ignore[no-untyped-call]
        mode = " (summed over every process)" if config.workers.count > 1 else ""
        _log.info(
            "httpwasm: Prometheus metrics on {endpoint}{where} at /metrics{mode}",
            endpoint=description,
            where=_where(description),
            mode=mode,
        )
    elif config.downstream.demo and _metrics.available():
        _log.info(
            "httpwasm demo: for Prometheus metrics per guest, add --metrics {endpoint} (then curl {url})",
            endpoint=DEMO_METRICS,
            url="http://127.0.0.1:9100/metrics",
        )


class MetricsSyncService(service.Service):
    """Under ``--workers``: keeps this process's runtime counters in the metrics directory (every second)."""

    def __init__(self, metrics: _metrics.GuestMetrics, interval: float = 1.0):
        self.metrics: _metrics.GuestMetrics = metrics
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
