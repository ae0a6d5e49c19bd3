"""``twistd httpwasm``: http-wasm guests in front of a twisted.web resource.

The options extend ``twistd web``'s (:class:`twisted.web.tap.Options`): the
downstream resource (``--path``, ``--class``, ``--wsgi``, ``--resource-script``)
and the endpoints (``--listen``) mean exactly what they mean there.  The guest
options, ``--proxy`` (a reverse-proxy downstream) and ``--workers`` are added on
top.  Parsed, they make one typed configuration
(:class:`~twisted_httpwasm.service.config.HostConfig`, :meth:`Options.config`);
:func:`makeService` reads it, loads the guests, puts them in front of the
downstream and listens on every endpoint.  Without a guest and a downstream it
serves the bundled demo (:mod:`twisted_httpwasm.web.demo`).
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import interfaces
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import static
from twisted.web import tap as web_tap
from twisted.web.resource import IResource
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

from ..abi import Feature, LogLevel
from ..runtime.budget import DEFAULT_MAX_BUFFERED_TOTAL, BufferBudget
from ..runtime.guest import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_TIMEOUT,
    Execution,
    Guest,
    LogLimit,
    Mount,
)
from ..web import fast
from ..web.access_log import address_text
from ..web.demo import DEMO_GUEST, DemoPage, bundled_guest
from ..web.drain import DEFAULT_SHUTDOWN_TIMEOUT
from ..web.proxy import ProxyResource
from ..web.resource import FailurePolicy, GuestResource
from ..web.site import (
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_REQUEST_BODY,
    DEFAULT_MAX_STREAMS_PER_CONNECTION,
    GuestSite,
)
from ..web.wsgi import UnderscoreHeaderGuard
from . import coercers, goconfig, observability, sources, traefik
from .coercers import parse_size
from .config import ConfigError, HostConfig, no_guest_reason
from .guest_loader import GuestLoader
from .reload import RELOAD_SERVICE, GuestReloader, HangupService, WatchService
from .stopping import DrainService
from .twisted_internals import (
    add_headers_resource,
    endpoint_service,
    exit_on_usage_error,
    forget_option,
    forget_short_option,
    port_deferred,
)
from .workers import TCPListen, WorkersService

__all__ = ["DEMO_LISTEN", "HostConfig", "Options", "makeService", "make_site", "parse_size"]

_log = Logger(namespace="httpwasm")

_DEMO_PAGE = "the demo page"

#: Where the demo listens when no --listen is given: this machine only.
DEMO_LISTEN = "tcp:8080:interface=127.0.0.1"

#: What a usage error says instead of every option.
HELP_HINT = "Run 'twistd httpwasm --help' to see every option."


def _log_limit(text: str) -> LogLimit:
    """``--guest-log-limit MESSAGES[/SIZE]``."""
    messages, _, size = text.partition("/")
    try:
        count = int(messages)
        if count < 0:
            raise ValueError(messages)
    except ValueError:
        raise usage.UsageError(
            f"--guest-log-limit: expected MESSAGES[/SIZE] (a count, then bytes or KiB/MiB), not {text!r}"
        ) from None
    return LogLimit(count, coercers.size("--guest-log-limit")(size) if size else LogLimit().bytes)


def _log_level(text: str) -> LogLevel:
    try:
        return LogLevel.parse(text)
    except ValueError as error:
        raise usage.UsageError(f"--log-level: {error}") from None


class Options(web_tap.Options):
    """Options of ``twistd httpwasm``: ``twistd web``'s, plus the guests'.

    ``self["guests"]`` lists one ``{"path": str, "config": bytes}`` per
    ``--guest``, in command-line order (the first is outermost); each
    ``--guest-config`` or ``--guest-config-file`` sets the config of the most
    recent ``--guest`` before it.  ``self["root"]`` is the downstream that
    ``twistd web``'s own option handlers (or ``--proxy``) built;
    ``self["downstream"]`` says which option named it.  ``self["demo"]`` is
    true when neither a guest nor a downstream was given: the bundled demo
    guest and page are served.  ``argv`` and ``cwd`` are the command line and
    the working directory it was parsed in, which worker processes re-run.
    Once parsed, they make the typed configuration everything after them reads
    (:meth:`config`, a :class:`~twisted_httpwasm.service.config.HostConfig`).
    """

    synopsis = (
        "[--guest PATH [guest options]...]"
        " [--path DIR | --proxy URL | --class FQPN | --wsgi FQPN | --resource-script PATH]"
        " [--listen ENDPOINT]... [--workers N]"
    )

    longdesc = """\
Runs http-wasm guests in front of a twisted.web resource. --guest loads a guest
(.wasm, or .wat text); give it several times for a chain, where the first is
outermost: it sees each request first and each response last.
--guest-config and --guest-config-file set the configuration (what get_config
returns) of the most recent preceding --guest, once per guest. The other guest
options apply to every guest. The downstream is exactly one of --path, --class,
--wsgi, --resource-script, --proxy or --user; all but --proxy mean what they
mean for `twistd web`, as do --index, --processor, --mime-type, --ignore-ext,
--allow-ignore-ext, --listen (repeatable), --logfile, --display-tracebacks,
--add-header (added to the downstream's responses, not to those a guest answers
itself) and the deprecated --port, --https, --certificate and --privkey.
--personal is not supported.

With no --guest and no downstream, `twistd -n httpwasm` serves a demo: the
bundled guest 'demo' (answers /hello itself, marks everything else with
x-httpwasm: demo) in front of a page that shows each request as it arrived,
on tcp:8080:interface=127.0.0.1 unless --listen says otherwise. --guest without
a downstream puts those guests in front of the demo page (same default
endpoint), which is a quick way to watch what a guest does to requests. A
downstream without --guest is refused, so that a forgotten --guest never
serves the downstream unfiltered.

--workers N serves the same endpoints from N processes (tcp: and tcp6:
endpoints only): this one and N-1 workers that inherit its listening sockets,
re-run this command line from the same directory (reading the guests and
configuration files again, as the user twistd runs as) and keep their own
guest instances. Their log goes to this process's log. Workers stop with the
main process, and one that dies is replaced.

On SIGTERM or SIGINT every process stops listening, closes idle keep-alive
connections and lets the requests in flight finish (guest calls, downstream,
--proxy backend) for up to --shutdown-timeout seconds; requests still running
then are cut and logged. twistd then exits with status 0.
"""

    # Options that take one value: [name, short, default as typed, doc, coerce] (the default is coerced too).
    optParameters: list[Any] = [
        ["log-level", None, "info", "Lowest level of guest log messages to log: debug, info, warn, error or none.",
         _log_level],
        ["guest-log-limit", None, "100/64KiB",
         "MESSAGES[/SIZE]: what one guest call may log; the rest is dropped and counted.", _log_limit],
        ["execution", None, Execution.THREAD.value,
         "Where guest code runs: thread (a worker thread) or inline (the reactor thread).",
         coercers.choice("--execution", Execution, normalise=True)],
        ["guest-timeout", None, f"{DEFAULT_TIMEOUT:g}", "Time limit of one guest call, in seconds.",
         coercers.seconds("--guest-timeout")],
        ["guest-memory-limit", None, coercers.format_size(DEFAULT_MEMORY_LIMIT),
         "Largest memory of one guest instance, in bytes or with a KiB, MiB or GiB suffix.",
         coercers.size("--guest-memory-limit")],
        ["max-buffer-bytes", None, coercers.format_size(DEFAULT_MAX_BUFFER_BYTES),
         "Largest body a guest may have buffered: bytes, or with a KiB, MiB or GiB suffix.",
         coercers.size("--max-buffer-bytes")],
        ["max-request-body", None, coercers.format_size(DEFAULT_MAX_REQUEST_BODY),
         "Largest request body: bytes or with a KiB, MiB or GiB suffix; 0 or none for no limit. Larger ones get "
         "413 before they are read.", coercers.size("--max-request-body", unlimited=True)],
        ["max-buffered-total", None, coercers.format_size(DEFAULT_MAX_BUFFERED_TOTAL),
         "Bytes all buffered responses of a process may hold together: bytes or with a KiB, MiB or GiB suffix; "
         "0 or none for no bound. Past it a buffered response gets 503 with Retry-After.",
         coercers.size("--max-buffered-total", unlimited=True)],
        ["idle-timeout", None, f"{DEFAULT_IDLE_TIMEOUT:g}",
         "Seconds a connection may stay silent before it is closed; 0 or none for never.",
         coercers.seconds("--idle-timeout", unlimited=True)],
        ["header-timeout", None, f"{DEFAULT_HEADER_TIMEOUT:g}",
         "Seconds from a request's first byte to the end of its headers, or the connection is closed; 0 or none "
         "for no deadline.", coercers.seconds("--header-timeout", unlimited=True)],
        ["max-streams-per-connection", None, str(DEFAULT_MAX_STREAMS_PER_CONNECTION),
         "HTTP/2 streams one connection may have open at once (advertised; more are refused, REFUSED_STREAM); 0 or "
         "none for h2's own 100.",
         coercers.count("--max-streams-per-connection", "streams", unlimited=True, expected="a number of streams")],
        ["on-guest-error", None, FailurePolicy.FAIL_CLOSED.value,
         "fail-closed (a failing guest's request gets 500) or fail-open (it is passed on).",
         coercers.choice("--on-guest-error", FailurePolicy)],
        ["guest-fetch-timeout", None, f"{sources.DEFAULT_FETCH_TIMEOUT:g}",
         "Seconds a whole fetch of a --guest https:// URL may take (connect, headers, body), at startup and at "
         "reload.", coercers.seconds("--guest-fetch-timeout")],
        ["guest-fetch-max-size", None, coercers.format_size(sources.MAX_GUEST_BYTES),
         "Largest --guest https:// answer fetched: bytes, or with a KiB, MiB or GiB suffix.",
         coercers.size("--guest-fetch-max-size")],
        ["guest-max-requests", None, None,
         "Recycle each guest instance after it served this many requests (between requests). [default: off]",
         coercers.count("--guest-max-requests", "requests")],
        ["guest-max-age", None, None,
         "Recycle each guest instance this many seconds after it was made (between requests). [default: off]",
         coercers.seconds("--guest-max-age")],
        ["workers", None, "1", "Processes serving the endpoints: this one and N-1 workers sharing its tcp: sockets.",
         coercers.count("--workers", "processes")],
        ["shutdown-timeout", None, f"{DEFAULT_SHUTDOWN_TIMEOUT:g}",
         "Seconds the requests in flight have to finish on SIGTERM or SIGINT before they are cut.",
         coercers.seconds("--shutdown-timeout", zero=True)],
        ["metrics", None, None,
         "Serve Prometheus metrics per guest at /metrics on this endpoint (strports, e.g. "
         "tcp:9100:interface=127.0.0.1); with --workers, summed over every process. Needs the metrics extra.",
         observability.check_metrics_option],
        ["log-format", None, "text",
         "text, or json: JSON lines with request_id, guest, phase, outcome fields, one event per request and guest.",
         observability.log_format_option],
    ]  # fmt: skip

    optFlags: list[Any] = [
        ["watch", None,
         "Reload the guests when a --guest or --guest-config-file file changes (polled every second, debounced)."],
        ["wsgi-keep-underscore-headers", None,
         "Pass request headers with _ in their names to --wsgi. [default: dropped: WSGI reads X_User as X-User]"],
        ["proxy-trust-forwarded", None,
         "With --proxy: clients are proxies you trust; keep their Forwarded, X-Forwarded-*, X-Real-IP and append."],
        ["otel", None,
         "OpenTelemetry traces: a server span per request, spans per guest call, exported with OTLP "
         "(OTEL_EXPORTER_OTLP_* configure it; any of them enables tracing too). Needs the otel extra."],
    ]  # fmt: skip

    def __init__(self) -> None:
        web_tap.Options.__init__(self)
        for name, _, default, _, coerce in self.optParameters:
            if isinstance(default, str):
                self[name] = coerce(default)  # as if given: the same value as the option would make
        self["guests"] = []
        self["downstream"] = None
        self["demo"] = False
        self["guest-env"] = []
        self["guest-mounts"] = []
        #: By --guest index: the --guest-sha256 and --guest-config-file given for it.
        self["guest-sha256"] = {}
        self["guest-config-files"] = {}
        self._configured_guests: set[int] = set()
        self._refused = False
        self._config: HostConfig | None = None
        self.argv: list[str] = []
        self.cwd = os.getcwd()
        _drop_twistd_collisions(self)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse ``options`` (default: ``sys.argv[1:]``), remembering them for worker processes."""
        self.argv = list(sys.argv[1:] if options is None else options)
        self.cwd = os.getcwd()
        try:
            web_tap.Options.parseOptions(self, options)
        except usage.UsageError as error:
            self._refused = True
            parent = getattr(self, "parent", None)
            if parent is not None:
                # twistd prints its own synopsis, then getUsage(), then the reason: make the first
                # line this command's synopsis (getSynopsis reads the parent's, so compute it first).
                parent.synopsis = self.getSynopsis()
            refusal = usage.UsageError(_with_twistd_hint(str(error)))
            exit_on_usage_error(self, refusal)  # an older twistd would exit with status 0
            raise refusal from None

    def getUsage(self, width: int | None = None) -> str:
        """Every option (``--help``); after a usage error, only where to find them.

        On a usage error twistd prints the synopsis, this, and the reason, last;
        the ~180 lines of every option would bury the reason.
        """
        if self._refused:
            return HELP_HINT
        usage_text: str = web_tap.Options.getUsage(self, width)
        return usage_text

    # -- guests -------------------------------------------------------------------

    def opt_guest(self, path: str) -> None:
        """A guest (.wasm or .wat file, a Traefik plugin directory or .zip, or an https:// URL of one) in front of
        the downstream; repeat for a chain, the first outermost.
        """
        self["guests"].append({"path": path, "config": b""})

    def opt_guest_name(self, name: str) -> None:
        """Name of the preceding --guest in logs and metrics. [default: a plugin's displayName, else the file's stem]"""
        if not self["guests"]:
            raise usage.UsageError("--guest-name must come after the --guest it names")
        if not name or traefik.sanitise_name(name, fallback="") != name:
            raise usage.UsageError(f"--guest-name must be letters, digits, - and _ (at most 64), not {name!r}")
        self["guests"][-1]["name"] = name

    def opt_guest_sha256(self, digest: str) -> None:
        """sha256 (64 hex digits) the preceding --guest must have; a guest whose digest differs is refused."""
        digest = digest.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise usage.UsageError(f"--guest-sha256 must be 64 hexadecimal digits, not {digest!r}")
        if not self["guests"]:
            raise usage.UsageError("--guest-sha256 must come after the --guest it applies to")
        self["guest-sha256"][len(self["guests"]) - 1] = digest

    def opt_guest_config(self, text: str) -> None:
        """Configuration of the preceding --guest: these bytes are what its get_config returns. [default: empty]"""
        self._configure_last_guest("--guest-config", os.fsencode(text))

    def opt_guest_config_file(self, path: str) -> None:
        """Configuration of the preceding --guest, read from a file; .yaml, .yml, .json and .toml are read as a
        mapping and passed JSON-encoded, as Traefik passes a plugin's configuration.
        """
        try:
            data = goconfig.read_config_file(path)
        except OSError as error:
            raise usage.UsageError(f"--guest-config-file: cannot read {path!r}: {error.strerror or error}") from None
        except goconfig.ConfigError as error:
            raise usage.UsageError(f"--guest-config-file: {error}") from None
        self._configure_last_guest("--guest-config-file", data)
        self["guest-config-files"][len(self["guests"]) - 1] = path  # read again at each reload (SIGHUP)

    def opt_guest_config_test_data(self) -> None:
        """Configuration of the preceding --guest, a Traefik plugin: its manifest's testData, JSON-encoded."""
        self._configure_last_guest("--guest-config-test-data", b"")
        self["guests"][-1]["test-data"] = True

    def _configure_last_guest(self, option: str, data: bytes) -> None:
        if not self["guests"]:
            raise usage.UsageError(f"{option} must come after the --guest it configures")
        index = len(self["guests"]) - 1
        if index in self._configured_guests:
            path = self["guests"][index]["path"]
            raise usage.UsageError(
                f"{option}: guest {path!r} already has a configuration "
                "(give one --guest-config, --guest-config-file or --guest-config-test-data per --guest)"
            )
        self._configured_guests.add(index)
        self["guests"][index]["config"] = data

    def opt_guest_env(self, variable: str) -> None:
        """NAME=VALUE, a WASI environment variable for the guests; NAME alone passes on this one's. Repeatable."""
        name, equals, value = variable.partition("=")
        if not name:
            raise usage.UsageError(f"--guest-env: expected NAME or NAME=VALUE, not {variable!r}")
        if not equals:
            if name not in os.environ:
                raise usage.UsageError(f"--guest-env {name}: {name} is not set in this environment")
            value = os.environ[name]
        self["guest-env"].append((name, value))

    def opt_guest_mount(self, mount: str) -> None:
        """HOST_DIR[:GUEST_DIR][:ro], a host directory the guests see through WASI (at GUEST_DIR, else at the same
        path, as Traefik's mounts), writable unless :ro. Repeatable.
        """
        spec, read_only = mount, False
        for suffix, is_read_only in ((":ro", True), (":rw", False)):
            if mount.endswith(suffix):
                spec, read_only = mount[: -len(suffix)], is_read_only
                break
        host_dir, colon, guest_dir = spec.rpartition(":")
        if not colon:
            host_dir = guest_dir = spec  # Traefik's HOST form: the same path inside
        if not (host_dir and guest_dir):
            raise usage.UsageError(f"--guest-mount: expected HOST_DIR[:GUEST_DIR][:ro], not {mount!r}")
        if not os.path.isdir(host_dir):
            raise usage.UsageError(f"--guest-mount: {host_dir!r} is not a directory")
        self["guest-mounts"].append(Mount(os.path.abspath(host_dir), guest_dir, read_only))

    # -- the downstream: twistd web's options, one of them only -------------------

    def _claim_downstream(self, description: str) -> None:
        if self["downstream"] is not None:
            raise usage.UsageError(
                f"{description}: only one downstream may be given, and {self['downstream']} already is"
            )
        self["downstream"] = description

    def opt_path(self, path: str) -> None:
        """Downstream: this file or directory, as `twistd web --path` (with its .rpy, .epy and .cgi processors)."""
        self._claim_downstream(f"--path {path}")
        web_tap.Options.opt_path(self, path)

    def opt_class(self, className: str) -> None:
        """Downstream: an instance of this zero-argument Resource class (FQPN), as `twistd web --class`."""
        self._claim_downstream(f"--class {className}")
        try:
            web_tap.Options.opt_class(self, className)
        except (ImportError, AttributeError, ValueError, TypeError) as error:
            raise usage.UsageError(
                f"--class {className}: not a Resource class with a zero-argument constructor: {error}"
            ) from None
        if not IResource.providedBy(self["root"]):
            raise usage.UsageError(f"--class {className}: {self['root']!r} is not a twisted.web resource")

    def opt_wsgi(self, name: str) -> None:
        """Downstream: this WSGI application (fully qualified name), as `twistd web --wsgi`."""
        self._claim_downstream(f"--wsgi {name}")
        web_tap.Options.opt_wsgi(self, name)

    def opt_resource_script(self, name: str) -> None:
        """Downstream: the resource of this .rpy script, as `twistd web --resource-script`."""
        self._claim_downstream(f"--resource-script {name}")
        web_tap.Options.opt_resource_script(self, name)

    def opt_proxy(self, url: str) -> None:
        """Downstream: the HTTP server at this http:// or https:// URL, as a reverse proxy; its path prefixes URIs."""
        self._claim_downstream(f"--proxy {url}")
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise usage.UsageError(f"--proxy {url}: not a valid port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise usage.UsageError(
                f"--proxy {url}: give the backend's URL with an http or https scheme and a host, "
                "e.g. http://127.0.0.1:8081"
            )
        if port == 0:
            raise usage.UsageError(f"--proxy {url}: port 0 is not a backend's port")
        try:
            self["root"] = ProxyResource(url)
        except ValueError as error:
            raise usage.UsageError(f"--proxy {url}: {error}") from None

    def opt_listen(self, description: str) -> None:
        """An endpoint to serve on (strports description); repeatable. [default: tcp:8080; for the demo page
        tcp:8080:interface=127.0.0.1]
        """
        web_tap.Options.opt_listen(self, description)

    def opt_user(self) -> None:
        """Downstream: ~/public_html and ~/.twistd-web-pb of every user, as `twistd web --user`."""
        self._claim_downstream("--user")
        web_tap.Options.opt_user(self)

    opt_u = opt_user

    def postOptions(self) -> None:
        """Fill in the demo defaults; check that the guests, the downstream and the endpoints are usable."""
        if self["personal"]:
            raise usage.UsageError("--personal is not supported: httpwasm serves HTTP, not a PB resource publisher")
        if self["otel"]:
            observability.check_otel_option()
        if self["downstream"] is None:
            if self["guests"]:
                self["root"] = DemoPage(demo_guest=False)
            else:
                self["demo"] = True
                self["guests"].append({"path": str(bundled_guest(DEMO_GUEST)), "config": b""})
                self["root"] = DemoPage(demo_guest=True)
            self["downstream"] = _DEMO_PAGE
            if not (self["ports"] or self["port"] or self["https"]):
                self["ports"].append(DEMO_LISTEN)
        elif not self["guests"]:
            raise usage.UsageError(no_guest_reason(self["downstream"]))
        web_tap.Options.postOptions(self)
        self._check_downstream_flags()
        self._check_writable_mounts()
        from twisted.internet import endpoints, reactor

        for description in self["ports"]:
            try:
                endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
            except (ValueError, TypeError, KeyError, OSError) as error:
                raise usage.UsageError(f"--listen {description}: not a usable endpoint: {error}") from None
        observability.start_log_format(self, self["log-format"])
        try:
            # Checks what holds the whole configuration together (a plain http:// guest needs its digest,
            # --workers needs tcp: endpoints), with the same one-line reasons as the options.
            self._config = HostConfig.from_options(self)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None

    def config(self) -> HostConfig:
        """The typed configuration these options describe, made once they were parsed (:meth:`postOptions`)."""
        if self._config is None:
            raise RuntimeError("the options make their configuration when they are parsed: call parseOptions first")
        return self._config

    def _check_downstream_flags(self) -> None:
        """Flags that only mean something for one kind of downstream need that downstream."""
        if self["proxy-trust-forwarded"]:
            if not isinstance(self["root"], ProxyResource):
                raise usage.UsageError(f"--proxy-trust-forwarded applies to --proxy, not to {self['downstream']}")
            self["root"].trust_forwarded = True
        if self["wsgi-keep-underscore-headers"] and not isinstance(self["root"], WSGIResource):
            raise usage.UsageError(f"--wsgi-keep-underscore-headers applies to --wsgi, not to {self['downstream']}")

    def _check_writable_mounts(self) -> None:
        """Refuse a writable --guest-mount inside (or around) the --path that is served.

        A guest may create symlinks in a writable mount; wasmtime does not follow
        them, but twisted.web's static.File does, so --path would serve whatever
        they point to (/etc/passwd, the server's keys).
        """
        if not isinstance(self["root"], static.File):
            return
        served = os.path.realpath(self["root"].path)
        for mount in self["guest-mounts"]:
            if mount.read_only:
                continue
            mounted = os.path.realpath(mount.host_dir)
            if os.path.commonpath([served, mounted]) in (served, mounted):
                where = "inside" if os.path.commonpath([served, mounted]) == served else "around"
                raise usage.UsageError(
                    f"--guest-mount {mount.host_dir}:{mount.guest_dir} is writable and {where} the --path "
                    f"{self['root'].path} that is served: a guest could create symlinks there (to /etc/passwd, say) "
                    "that --path would follow and serve. Mount it read-only (:ro) or serve another directory."
                )


#: ``twistd web``'s deprecated options whose short names are ``twistd``'s own flags (-n: --nodaemon,
#: -p: --profile): ``twistd httpwasm -n`` meant "don't daemonize", so it must not be taken as one of them.
_DROPPED_NOTRACEBACKS = "notracebacks"  # -n, deprecated, and without any effect
_DROPPED_SHORT_NAMES = {"n": "", "p": "; to give httpwasm a port, use --listen tcp:PORT"}  # --port stays

_UNKNOWN_OPTION = re.compile(r"option (-[^-]|--[^=\s]+) not recognized")


def _drop_twistd_collisions(options: usage.Options) -> None:
    """Forget the deprecated ``twistd web`` options that collide with ``twistd`` flags (see above)."""
    forget_option(options, _DROPPED_NOTRACEBACKS)
    for short in _DROPPED_SHORT_NAMES:
        forget_short_option(options, short)


def _with_twistd_hint(reason: str) -> str:
    """``reason``, plus where to put the option if it is one of ``twistd``'s (``-n`` after ``httpwasm``, say)."""
    match = _UNKNOWN_OPTION.fullmatch(reason)
    if match is None:
        return reason
    from twisted.scripts import twistd as twistd_script

    option = match.group(1)
    twistd = twistd_script.ServerOptions()  # type: ignore[attr-defined, no-untyped-call]  # -n on POSIX
    long_name = twistd.synonyms.get(option.lstrip("-"))
    if long_name is None:
        return reason
    meaning = "" if option == f"--{long_name}" else f" (--{long_name})"
    value = " VALUE" if f"{long_name}=" in twistd.longOpt else ""
    return (
        f"{option} is a twistd option{meaning}, not an httpwasm one: "
        f"put it before httpwasm, as in: twistd {option}{value} httpwasm ...{_DROPPED_SHORT_NAMES.get(option[1:], '')}"
    )


def host_config(config: Options | HostConfig) -> HostConfig:
    """The typed configuration: ``config`` itself, or the one parsed options made (:meth:`Options.config`)."""
    return config if isinstance(config, HostConfig) else config.config()


def make_site(config: Options | HostConfig, parent: service.MultiService) -> Site:
    """The ``Site`` of ``config``: its guests in front of its downstream.

    ``config`` is a :class:`~twisted_httpwasm.service.config.HostConfig`, or
    parsed :class:`Options` (their :meth:`~Options.config` is used).
    ``parent`` is the service collection that ``--path`` resources may reach
    (as under ``twistd web``), that closes a ``--proxy`` downstream's
    connections when it stops, and that drains the site's requests in flight
    (``--shutdown-timeout``) when it stops.  Raises :class:`SystemExit` with the reason
    when a guest cannot be loaded.
    """
    config = host_config(config)
    wanted = config.downstream
    downstream: Any = wanted.resource
    if wanted.indexes:
        downstream.indexNames = list(wanted.indexes)
    if isinstance(downstream, static.File):
        downstream.registry.setComponent(interfaces.IServiceCollection, parent)
    if isinstance(downstream, ProxyResource):
        _ClosingService(downstream).setServiceParent(parent)  # type: ignore[no-untyped-call]
    if isinstance(downstream, WSGIResource) and not wanted.keep_underscore_headers:
        downstream = UnderscoreHeaderGuard(downstream)
    if wanted.extra_headers:
        downstream = add_headers_resource(downstream, list(wanted.extra_headers))

    root = downstream
    loader = GuestLoader.from_config(config)  # the same loader at startup and at each reload
    guests = loader.at_startup()
    resources: list[GuestResource] = []
    budget = BufferBudget(config.limits.max_buffered_total)  # one for all guests of this process
    for guest in reversed(guests):
        root = GuestResource(guest, root, on_guest_error=config.on_guest_error, buffer_budget=budget)
        resources.insert(0, root)
    # SIGHUP reloads every guest (the service is found by name: RELOAD_SERVICE).
    reloader = GuestReloader(resources, loader.reload, interrupt=loader.fetches.stop)
    HangupService(reloader).setServiceParent(parent)  # type: ignore[no-untyped-call]
    if config.reload.watch:
        WatchService(reloader, loader.watched_files()).setServiceParent(parent)  # type: ignore[no-untyped-call]

    site = GuestSite(
        root,
        max_request_body=_request_body_limit(config, guests),
        idle_timeout=config.limits.idle_timeout,
        header_timeout=config.limits.header_timeout,
        max_streams_per_connection=config.limits.max_streams_per_connection,
        # Instances a burst needed go back once idle (a timer that runs while the site listens).
        housekeeping=functools.partial(_retire_idle_instances, reloader),
        **({"logPath": config.listen.logfile} if config.listen.logfile else {}),
    )
    if config.listen.display_tracebacks:
        site.displayTracebacks = True
    DrainService(site, config.shutdown_timeout).setServiceParent(parent)  # type: ignore[no-untyped-call]
    observability.observe_site(config, site, guests, parent)  # --metrics, --otel
    return site


def _retire_idle_instances(reloader: GuestReloader) -> None:
    for guest in reloader.guests:  # the guests serving now, after any reload
        guest.pool.retire_idle()


def _request_body_limit(config: HostConfig, guests: list[Guest]) -> int | None:
    """``--max-request-body``, or ``--max-buffer-bytes`` if smaller and a guest buffers every request body.

    A guest that enables buffer_request when it initialises refuses larger
    bodies anyway (413): the site refuses them from the headers, unread.
    """
    limit = config.limits.max_request_body
    for guest in guests:
        buffers = bool(guest.features & Feature.BUFFER_REQUEST)
        if buffers and (limit is None or guest.max_buffer_bytes < limit):
            limit = guest.max_buffer_bytes
    return limit


class _ClosingService(service.Service):
    """Closes a proxy downstream's idle backend connections when the server stops."""

    def __init__(self, proxy: ProxyResource):
        self.proxy = proxy

    def stopService(self) -> Any:
        service.Service.stopService(self)  # type: ignore[no-untyped-call]
        return self.proxy.close()


def makeService(config: Options | HostConfig) -> service.MultiService:
    """The guests in front of the downstream, served by one ``Site`` on every ``--listen`` endpoint.

    ``config`` is parsed :class:`Options` (as ``twistd`` passes them), or a
    :class:`~twisted_httpwasm.service.config.HostConfig` a program made.
    With ``--workers N`` (N > 1) the endpoints are served by this process and
    N-1 worker processes (:class:`~twisted_httpwasm.service.workers.WorkersService`).
    Raises :class:`SystemExit` with the reason when a guest cannot be loaded, or,
    under ``twistd`` (``config.parent`` is its options), when a ``tcp:`` port is taken.
    """
    options, config = config, host_config(config)
    if getattr(options, "parent", None) is not None:
        # Under twistd, which forks after this: a port in use is one line on the terminal, also for a daemon.
        # (Not for a makeService of a program's own, which binds when it starts its services.)
        metrics = config.observability.metrics
        check_ports_free([*config.listen.endpoints, *([metrics] if metrics else [])])
    top = service.MultiService()  # type: ignore[no-untyped-call]
    observability.prepare_processes(config, top)  # before any metric exists: --workers share them
    site = make_site(config, top)
    endpoints = list(config.listen.endpoints)
    workers = config.workers.count
    if workers > 1:
        shared = WorkersService.from_config(site, config)
        shared.setServiceParent(top)  # type: ignore[no-untyped-call]
        # SIGHUP: this process reloads its guests, then asks every worker to reload theirs.
        reloading: Any = top.getServiceNamed(RELOAD_SERVICE)  # type: ignore[no-untyped-call]
        reloading.reloader.after_reload.append(shared.reload_workers)
        _WorkersListening(endpoints).setServiceParent(top)  # type: ignore[no-untyped-call]
    else:
        for description in endpoints:
            _Listening(description, site).setServiceParent(top)  # type: ignore[no-untyped-call]

    observability.serve_metrics(config, site, top)
    processes = f", {workers} processes" if workers > 1 else ""
    if config.downstream.demo:
        url = _url_of(endpoints[0])
        _log.info(
            "httpwasm demo: guest {guest!r} in front of the demo page on {where}{processes} \u2014 try: {try_it}",
            guest=DEMO_GUEST,
            where=url or endpoints[0],
            processes=processes,
            try_it=f"curl -i {url}hello" if url else "a request for /hello",
        )
        return top
    settings = config.guest_settings
    _log.info(
        "httpwasm: {guests} in front of {downstream}, to serve on {endpoints}"
        " (execution {execution}, {calls}, {policy}, guest memory limit {memory}, time limit {timeout} s{processes});"
        " sha256 {digests}",
        guests=("guest " if len(config.guests) == 1 else "guests ") + " -> ".join(e.path for e in config.guests),
        digests=" -> ".join(guest.sha256 for guest in reloading_guests(top)),
        downstream=config.downstream.description,
        endpoints=", ".join(endpoints),
        execution=settings.execution.value,
        calls=fast.describe(),  # which paths serve: the compiled accelerator or pure Python
        policy=config.on_guest_error,
        memory=coercers.format_size(settings.memory_limit),
        timeout=settings.timeout,
        processes=processes,
    )
    return top


def _cannot_listen(description: str, error: CannotListenError) -> str:
    """``cannot listen on tcp:8090:interface=127.0.0.1: address already in use``."""
    cause: Any = error.socketError
    reason = getattr(cause, "strerror", None) or str(cause)
    return f"cannot listen on {description}: {reason[:1].lower()}{reason[1:]}"


def check_ports_free(descriptions: Sequence[str]) -> None:
    """Each ``tcp:``/``tcp6:`` endpoint with a fixed port can be bound now; else :class:`SystemExit` with one line.

    Run before ``twistd`` forks (``makeService`` is): a daemon's own failure to
    listen reaches the terminal only through twistd's 100-byte status pipe,
    cut mid-word.  The sockets are closed again at once; the services bind
    for real when they start (and say so in one line if it fails then).
    """
    for description in descriptions:
        endpoint = TCPListen.parse(description)
        if endpoint is None or endpoint.port == 0:
            continue
        try:
            endpoint.bind().close()
        except CannotListenError as error:
            raise SystemExit(_cannot_listen(description, error)) from None


class _Listening(StreamServerEndpointService):
    """``strports.service(description, site)`` that says ``listening on`` once bound, or why it could not bind.

    A port that cannot be bound ends ``twistd`` with one line (SystemExit),
    also logged: in daemon mode the log is where it can be read then.
    """

    def __init__(self, description: str, site: Site):
        from twisted.internet import endpoints, reactor

        endpoint = endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
        StreamServerEndpointService.__init__(self, endpoint, site)  # type: ignore[no-untyped-call]
        endpoint_service(self)  # as strports.service: twistd learns at once that it cannot listen
        self.description = description

    def privilegedStartService(self) -> None:
        try:
            StreamServerEndpointService.privilegedStartService(self)  # type: ignore[no-untyped-call]
        except CannotListenError as error:
            line = _cannot_listen(self.description, error)
            _log.error("httpwasm: {line}", line=line)
            raise SystemExit(line) from None
        waiting: Any = port_deferred(self)  # fired already
        waiting.addCallback(self._bound)

    def _bound(self, port: Any) -> Any:
        address = address_text(port.getHost())  # 127.0.0.1:8080, [::1]:8080, a UNIX socket's path
        _log.info("httpwasm: listening on {endpoint} ({address})", endpoint=self.description, address=address)
        return port


class _WorkersListening(service.Service):
    """Says ``listening on`` for ``--workers``' endpoints, once the WorkersService started before it bound them."""

    def __init__(self, descriptions: list[str]):
        self.descriptions = descriptions

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)  # type: ignore[no-untyped-call]
        for description in self.descriptions:
            _log.info("httpwasm: listening on {endpoint}", endpoint=description)


def reloading_guests(top: service.MultiService) -> list[Guest]:
    """The guests that the service tree ``top`` (from :func:`makeService` or :func:`make_site`) serves now."""
    reloading: Any = top.getServiceNamed(RELOAD_SERVICE)  # type: ignore[no-untyped-call]
    guests: list[Guest] = reloading.reloader.guests
    return guests


def _url_of(description: str) -> str | None:
    """``http://host:port/`` for a TCP endpoint with a fixed port; None otherwise."""
    try:
        endpoint = TCPListen.parse(description)
    except (ValueError, TypeError, KeyError):
        return None
    if endpoint is None or endpoint.port == 0:
        return None
    host = endpoint.interface
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{endpoint.port}/"
