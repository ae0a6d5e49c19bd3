"""The typed configuration of ``twistd httpwasm``: one :class:`HostConfig`, read by everything after the options.

``twistd httpwasm``'s options (:class:`~twisted_httpwasm.service.tap.Options`)
parse and check the command line, then make one :class:`HostConfig` of it
(:meth:`HostConfig.from_options`); :func:`~twisted_httpwasm.service.tap.makeService`,
:func:`~twisted_httpwasm.service.tap.make_site`, the guest loader (at startup,
at each reload and in each worker process), the observability wiring and the
``--workers`` service read that object, never the options.  A program may also
make one itself, without a command line, and hand it to ``makeService``.

Every class here is frozen: a configuration is made once and then only read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..abi import LogLevel
from ..runtime.budget import DEFAULT_MAX_BUFFERED_TOTAL
from ..runtime.calllog import LogLimit
from ..runtime.guest import DEFAULT_MAX_BUFFER_BYTES, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT, Execution, Mount
from ..web.drain import DEFAULT_SHUTDOWN_TIMEOUT
from ..web.policy import FailurePolicy
from ..web.site import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_REQUEST_BODY,
    DEFAULT_MAX_STREAMS_PER_CONNECTION,
)
from . import sources

__all__ = [
    "ConfigError",
    "DownstreamConfig",
    "GuestEntry",
    "GuestSettings",
    "HostConfig",
    "LimitsConfig",
    "ListenConfig",
    "ObservabilityConfig",
    "ReloadConfig",
    "WorkersConfig",
]

#: What ``--log-format`` takes.
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A configuration that cannot be served; the message is the one line the command line refuses it with."""


@dataclass(frozen=True, slots=True)
class GuestEntry:
    """One ``--guest``, with the options attached to it (the ones given after it, before the next ``--guest``).

    ``config`` is what its ``get_config`` returns (``--guest-config``, or what
    ``--guest-config-file`` held when the options were parsed); ``config_file``
    is read again at each reload; ``sha256`` (``--guest-sha256``) is the
    digest it must have; ``name`` (``--guest-name``) its name in logs and
    metrics; ``test_data`` (``--guest-config-test-data``): a Traefik plugin
    configured with its manifest's ``testData``.
    """

    path: str
    config: bytes = b""
    name: str | None = None
    sha256: str | None = None
    config_file: str | None = None
    test_data: bool = False

    def source_entry(self) -> dict[str, Any]:
        """What :func:`~twisted_httpwasm.service.traefik.guest_source` reads: ``path``, ``name``, ``test-data``."""
        entry: dict[str, Any] = {"path": self.path}
        if self.name is not None:
            entry["name"] = self.name
        if self.test_data:
            entry["test-data"] = True
        return entry


@dataclass(frozen=True, slots=True)
class GuestSettings:
    """What every guest of the chain is loaded with (the options that are not attached to one ``--guest``)."""

    log_level: LogLevel = LogLevel.INFO
    execution: Execution = Execution.THREAD
    timeout: float = DEFAULT_TIMEOUT
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES
    env: tuple[tuple[str, str], ...] = ()
    mounts: tuple[Mount, ...] = ()
    log_limit: LogLimit = field(default_factory=LogLimit)
    max_requests: int | None = None
    max_age: float | None = None
    fetch_timeout: float = sources.DEFAULT_FETCH_TIMEOUT
    fetch_max_size: int = sources.MAX_GUEST_BYTES


@dataclass(frozen=True, slots=True)
class DownstreamConfig:
    """What the guests are in front of: ``resource``, which ``description`` names in the log (``--path DIR``).

    ``demo``: the bundled demo guest in front of the demo page (no ``--guest``
    and no downstream were given).  ``indexes`` (``--index``), ``extra_headers``
    (``--add-header``) and ``keep_underscore_headers``
    (``--wsgi-keep-underscore-headers``) mean what they mean for ``twistd web``.
    The resource is compared by identity only, not as part of the configuration's value.
    """

    resource: Any = field(compare=False)  # an IResource; mypy cannot see zope declarations
    description: str
    demo: bool = False
    indexes: tuple[str, ...] = ()
    extra_headers: tuple[tuple[str, str], ...] = ()
    keep_underscore_headers: bool = False


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where and how the site listens: strports ``endpoints`` (``--listen``, TLS ones included), its access log."""

    endpoints: tuple[str, ...] = ()
    logfile: str | None = None
    display_tracebacks: bool = False


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The site's and the process's bounds (None: no bound)."""

    max_request_body: int | None = DEFAULT_MAX_REQUEST_BODY
    max_buffered_total: int | None = DEFAULT_MAX_BUFFERED_TOTAL
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT
    header_timeout: float | None = DEFAULT_HEADER_TIMEOUT
    max_streams_per_connection: int | None = DEFAULT_MAX_STREAMS_PER_CONNECTION


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    """``--metrics ENDPOINT``, ``--otel`` and ``--log-format text|json``."""

    metrics: str | None = None
    otel: bool = False
    log_format: str = "text"


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    """``--workers N``: ``count`` processes; each worker re-runs ``argv`` (the options) from the directory ``cwd``."""

    count: int = 1
    argv: tuple[str, ...] = ()
    cwd: str = "."


@dataclass(frozen=True, slots=True)
class ReloadConfig:
    """``--watch``: reload the guests when a watched file changes (SIGHUP always reloads them)."""

    watch: bool = False


@dataclass(frozen=True, slots=True)
class HostConfig:
    """Everything ``twistd httpwasm`` serves: the guest chain, its downstream, where and how.

    ``guests`` is the chain, outermost first; ``guest_settings`` is what every
    one of them is loaded with.  Made by :meth:`from_options` after the
    command line was parsed, or directly by a program (every group but the
    guests and the downstream has the command line's defaults); it is checked
    when it is made (:class:`ConfigError`, with the command line's one-line
    reasons).
    """

    guests: tuple[GuestEntry, ...]
    downstream: DownstreamConfig
    guest_settings: GuestSettings = field(default_factory=GuestSettings)
    on_guest_error: FailurePolicy = FailurePolicy.FAIL_CLOSED
    listen: ListenConfig = field(default_factory=ListenConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    reload: ReloadConfig = field(default_factory=ReloadConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.guests, tuple) or not all(isinstance(entry, GuestEntry) for entry in self.guests):
            raise TypeError("HostConfig.guests must be a tuple of GuestEntry")
        if not self.guests:
            raise ConfigError(no_guest_reason(self.downstream.description))
        for entry in self.guests:
            if entry.path.lower().startswith("http://") and entry.sha256 is None:
                raise ConfigError(
                    f"--guest {entry.path}: a guest fetched over plain http:// needs --guest-sha256 (or use https://)"
                )
        if self.workers.count < 1:
            raise ConfigError(f"--workers must be a positive number of processes, not {str(self.workers.count)!r}")
        if self.workers.count > 1:
            for description in self.listen.endpoints:
                if not _is_tcp(description):
                    raise ConfigError(
                        f"--workers {self.workers.count} shares tcp: and tcp6: endpoints between processes; "
                        f"--listen {description} is not one"
                    )
        if self.observability.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self.observability.log_format!r}"
            )

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> HostConfig:
        """The configuration that parsed ``twistd httpwasm`` options describe (their keys, their ``argv``/``cwd``).

        Per-guest options are attached to their ``--guest`` (the options keep
        ``--guest-sha256`` and ``--guest-config-file`` by the guest's index).
        """
        sha256: Mapping[int, str] = options["guest-sha256"]
        config_files: Mapping[int, str] = options["guest-config-files"]
        guests = tuple(
            GuestEntry(
                path=entry["path"],
                config=entry["config"],
                name=entry.get("name"),
                sha256=sha256.get(index),
                config_file=config_files.get(index),
                test_data=bool(entry.get("test-data", False)),
            )
            for index, entry in enumerate(options["guests"])
        )
        return cls(
            guests=guests,
            downstream=DownstreamConfig(
                resource=options["root"],
                description=options["downstream"],
                demo=bool(options["demo"]),
                indexes=tuple(options["indexes"]),
                extra_headers=tuple((name, value) for name, value in options["extraHeaders"]),
                keep_underscore_headers=bool(options["wsgi-keep-underscore-headers"]),
            ),
            guest_settings=GuestSettings(
                log_level=options["log-level"],
                execution=options["execution"],
                timeout=options["guest-timeout"],
                memory_limit=options["guest-memory-limit"],
                max_buffer_bytes=options["max-buffer-bytes"],
                env=tuple(options["guest-env"]),
                mounts=tuple(options["guest-mounts"]),
                log_limit=options["guest-log-limit"],
                max_requests=options["guest-max-requests"],
                max_age=options["guest-max-age"],
                fetch_timeout=options["guest-fetch-timeout"],
                fetch_max_size=options["guest-fetch-max-size"],
            ),
            on_guest_error=options["on-guest-error"],
            listen=ListenConfig(
                endpoints=tuple(options["ports"]),
                logfile=options["logfile"] or None,
                display_tracebacks=bool(options["display-tracebacks"]),
            ),
            limits=LimitsConfig(
                max_request_body=options["max-request-body"],
                max_buffered_total=options["max-buffered-total"],
                idle_timeout=options["idle-timeout"],
                header_timeout=options["header-timeout"],
                max_streams_per_connection=options["max-streams-per-connection"],
            ),
            observability=ObservabilityConfig(
                metrics=options["metrics"], otel=bool(options["otel"]), log_format=options["log-format"]
            ),
            shutdown_timeout=options["shutdown-timeout"],
            workers=WorkersConfig(
                count=options["workers"],
                argv=tuple(getattr(options, "argv", ())),
                cwd=getattr(options, "cwd", "."),
            ),
            reload=ReloadConfig(watch=bool(options["watch"])),
        )


def no_guest_reason(downstream: str) -> str:
    """Why a ``downstream`` (``--path DIR``) without a guest is refused: it would be served unfiltered."""
    return (
        f"give the guest to run in front of {downstream} with --guest PATH "
        "(without --guest and a downstream, httpwasm serves its demo)"
    )


def _is_tcp(description: str) -> bool:
    """Whether the strports ``description`` is a ``tcp:`` or ``tcp6:`` server endpoint."""
    from twisted.internet import endpoints, reactor

    try:
        endpoint = endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise ConfigError(f"--listen {description}: not a usable endpoint: {error}") from None
    return isinstance(endpoint, endpoints.TCP4ServerEndpoint | endpoints.TCP6ServerEndpoint)
