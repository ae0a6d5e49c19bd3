"""What ``twistd httpwasm`` sets up for ``--metrics`` and ``--otel``.

Kept apart from :mod:`~twisted_httpwasm.service.tap` (which calls these at a
few points) so that the options and the service stay readable.  Neither
prometheus_client nor OpenTelemetry is imported unless its option asks for it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from twisted.application import service, strports
from twisted.logger import Logger
from twisted.python import usage

from ..web import metrics as _metrics
from ..web import tracing as _tracing
from ..web.access_log import RequestLog

__all__ = ["check_metrics_option", "observe_site", "prepare_processes", "serve_metrics"]

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


LOG_FORMATS = ("text", "json")


def set_log_format(options: Any, log_format: str) -> str:
    """``--log-format text|json``: json makes twistd log JSON lines (where ``--logfile`` says, as twistd would)."""
    if log_format not in LOG_FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    twistd = getattr(options, "parent", None)
    if log_format == "json" and twistd is not None:
        from . import jsonlog

        # twistd imports its --logger (a name) once this command line was parsed, and calls it to start logging.
        jsonlog.configure(twistd.get("logfile"), bool(twistd.get("nodaemon")))
        twistd["logger"] = "twisted_httpwasm.service.jsonlog.twistd_observer"
    return log_format


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


def prepare_processes(config: Any, top: service.MultiService) -> None:
    """``--metrics`` with ``--workers N``: prometheus_client's multiprocess mode for every process.

    Must run before prometheus_client is imported (it chooses its mode then):
    the directory is made here and handed to the workers in the environment;
    it is removed when the main process stops.  An operator's own
    ``PROMETHEUS_MULTIPROC_DIR`` is used as it is.
    """
    if not config["metrics"] or config["workers"] <= 1 or _metrics.multiprocess_dir() is not None:
        return
    directory = tempfile.mkdtemp(prefix="httpwasm-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    _RemoveDirectory(directory).setServiceParent(top)  # type: ignore[no-untyped-call]


def observe_site(config: Any, site: Any, guests: list[Any], parent: service.MultiService) -> None:
    """Watch ``guests`` for ``--metrics`` and ``--otel`` (in every process: the main one and each worker)."""
    if config["metrics"]:
        metrics = _metrics.GuestMetrics()
        for guest in guests:
            metrics.watch(guest)
        site.guest_metrics = metrics
        _metrics.MetricsSyncService(metrics).setServiceParent(parent)  # type: ignore[no-untyped-call]
    if config["log-format"] == "json":
        request_log = RequestLog()
        for guest in guests:
            request_log.watch(guest)
        request_log.install(site)
    if config["otel"] or _tracing.enabled_by_environment():
        tracing = _tracing.GuestTracing()
        for guest in guests:
            tracing.watch(guest)
        tracing.install(site)
        flush_timeout = min(config["shutdown-timeout"], _tracing.DEFAULT_FLUSH_TIMEOUT)
        _tracing.TracingService(tracing, site, flush_timeout).setServiceParent(parent)  # type: ignore[no-untyped-call]
    elif _tracing.asked_by_environment():
        _log.warn("httpwasm: OTEL_* variables ask for traces, but {refusal}", refusal=_tracing.ENVIRONMENT_HINT)


def serve_metrics(config: Any, site: Any, top: service.MultiService) -> None:
    """Serve ``/metrics`` on ``--metrics ENDPOINT`` (main process only); the demo says how to."""
    description = config["metrics"]
    if description:
        endpoint = strports.service(description, _metrics.metrics_site(site.guest_metrics))  # type: ignore[arg-type]
        endpoint.setServiceParent(top)  # type: ignore[no-untyped-call]
        mode = " (summed over every process)" if config["workers"] > 1 else ""
        _log.info("httpwasm: Prometheus metrics on {endpoint} at /metrics{mode}", endpoint=description, mode=mode)
    elif config["demo"] and _metrics.available():
        _log.info(
            "httpwasm demo: for Prometheus metrics per guest, add --metrics {endpoint} (then curl {url})",
            endpoint=DEMO_METRICS,
            url="http://127.0.0.1:9100/metrics",
        )
