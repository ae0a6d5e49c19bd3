"""``twistd httpwasm``: http-wasm guests in front of a twisted.web resource.

The options extend ``twistd web``'s (:class:`twisted.web.tap.Options`): the
downstream resource (``--path``, ``--class``, ``--wsgi``, ``--resource-script``)
and the endpoints (``--listen``) mean exactly what they mean there.  The guest
options are added on top.  :func:`makeService` loads the guests, puts them in
front of the downstream and listens on every endpoint.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from twisted.application import service, strports
from twisted.internet import interfaces
from twisted.logger import Logger
from twisted.python import usage
from twisted.web import static
from twisted.web import tap as web_tap
from twisted.web.resource import IResource
from twisted.web.server import Site

from .abi import LogLevel
from .guest import (
    DEFAULT_MAX_BUFFER_BYTES,
    DEFAULT_MEMORY_LIMIT,
    DEFAULT_TIMEOUT,
    Execution,
    Guest,
    GuestLoadError,
    Mount,
)
from .resource import FailurePolicy, GuestResource

__all__ = ["Options", "makeService", "parse_size"]

_log = Logger(namespace="httpwasm")

_SIZE = re.compile(r"\s*([0-9]+)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {"": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_DOWNSTREAM_OPTIONS = "--path, --class, --wsgi, --resource-script or --user"


def parse_size(text: str) -> int:
    """Bytes named by ``text``: a plain integer, or one with a KiB, MiB or GiB suffix (``64MiB``)."""
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size: give a number of bytes, optionally with a KiB, MiB or GiB suffix")
    size = int(match.group(1)) * _SIZE_UNITS[unit]
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def _format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        scale = _SIZE_UNITS[unit.lower()]
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


class Options(web_tap.Options):
    """Options of ``twistd httpwasm``: ``twistd web``'s, plus the guests'.

    ``self["guests"]`` lists one ``{"path": str, "config": bytes}`` per
    ``--guest``, in command-line order (the first is outermost); each
    ``--guest-config`` or ``--guest-config-file`` sets the config of the most
    recent ``--guest`` before it.  ``self["root"]`` is the downstream that
    ``twistd web``'s own option handlers built; ``self["downstream"]`` says
    which option named it.
    """

    synopsis = "--guest PATH [guest options] (--path DIR | --class FQPN | --wsgi FQPN | --resource-script PATH)"

    longdesc = """\
Runs http-wasm guests in front of a twisted.web resource. --guest loads a guest
(.wasm, or .wat text); give it several times for a chain, where the first is
outermost: it sees each request first and each response last.
--guest-config and --guest-config-file set the configuration (what get_config
returns) of the most recent preceding --guest, once per guest. The other guest
options apply to every guest. The downstream is exactly one of --path, --class,
--wsgi, --resource-script or --user, meaning what they mean for `twistd web`,
as do --index, --processor, --mime-type, --ignore-ext, --allow-ignore-ext,
--listen (repeatable), --logfile, --display-tracebacks, --add-header (added to
the downstream's responses, not to those a guest answers itself) and the
deprecated --port, --https, --certificate and --privkey. --personal is not
supported.
"""

    def __init__(self) -> None:
        web_tap.Options.__init__(self)
        self["guests"] = []
        self["downstream"] = None
        self["log-level"] = LogLevel.INFO
        self["execution"] = Execution.THREAD
        self["guest-timeout"] = DEFAULT_TIMEOUT
        self["guest-memory-limit"] = DEFAULT_MEMORY_LIMIT
        self["max-buffer-bytes"] = DEFAULT_MAX_BUFFER_BYTES
        self["on-guest-error"] = FailurePolicy.FAIL_CLOSED
        self["guest-env"] = []
        self["guest-mounts"] = []
        self._configured_guests: set[int] = set()

    # -- guests -------------------------------------------------------------------

    def opt_guest(self, path: str) -> None:
        """A guest (.wasm or .wat) in front of the downstream; repeat for a chain, the first outermost. Required."""
        self["guests"].append({"path": path, "config": b""})

    def opt_guest_config(self, text: str) -> None:
        """Configuration of the preceding --guest: these bytes are what its get_config returns. [default: empty]"""
        self._configure_last_guest("--guest-config", os.fsencode(text))

    def opt_guest_config_file(self, path: str) -> None:
        """Configuration of the preceding --guest, read from a file."""
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise usage.UsageError(f"--guest-config-file: cannot read {path!r}: {error.strerror or error}") from None
        self._configure_last_guest("--guest-config-file", data)

    def _configure_last_guest(self, option: str, data: bytes) -> None:
        if not self["guests"]:
            raise usage.UsageError(f"{option} must come after the --guest it configures")
        index = len(self["guests"]) - 1
        if index in self._configured_guests:
            path = self["guests"][index]["path"]
            raise usage.UsageError(
                f"{option}: guest {path!r} already has a configuration "
                "(give one --guest-config or --guest-config-file per --guest)"
            )
        self._configured_guests.add(index)
        self["guests"][index]["config"] = data

    def opt_log_level(self, level: str) -> None:
        """Lowest level of guest log messages to log: debug, info, warn, error or none. [default: info]"""
        try:
            self["log-level"] = LogLevel.parse(level)
        except ValueError as error:
            raise usage.UsageError(f"--log-level: {error}") from None

    def opt_execution(self, mode: str) -> None:
        """Where guest code runs: thread (a worker thread) or inline (the reactor thread). [default: thread]"""
        try:
            self["execution"] = Execution(mode.strip().lower())
        except ValueError:
            choices = ", ".join(item.value for item in Execution)
            raise usage.UsageError(f"--execution must be one of {choices}, not {mode!r}") from None

    def opt_guest_timeout(self, seconds: str) -> None:
        """Time limit of one guest call, in seconds. [default: 1]"""
        try:
            timeout = float(seconds)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise usage.UsageError(f"--guest-timeout must be a positive number of seconds, not {seconds!r}")
        self["guest-timeout"] = timeout

    def opt_guest_memory_limit(self, size: str) -> None:
        """Largest memory of one guest instance, in bytes or with a KiB, MiB or GiB suffix. [default: 64MiB]"""
        self["guest-memory-limit"] = self._size("--guest-memory-limit", size)

    def opt_max_buffer_bytes(self, size: str) -> None:
        """Largest body a guest may have buffered: bytes, or with a KiB, MiB or GiB suffix. [default: 16MiB]"""
        self["max-buffer-bytes"] = self._size("--max-buffer-bytes", size)

    @staticmethod
    def _size(option: str, text: str) -> int:
        try:
            return parse_size(text)
        except ValueError as error:
            raise usage.UsageError(f"{option}: {error}") from None

    def opt_on_guest_error(self, policy: str) -> None:
        """fail-closed (a failing guest's request gets 500) or fail-open (it is passed on). [default: fail-closed]"""
        if policy not in FailurePolicy.ALL:
            choices = ", ".join(FailurePolicy.ALL)
            raise usage.UsageError(f"--on-guest-error must be one of {choices}, not {policy!r}")
        self["on-guest-error"] = policy

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
        """HOST_DIR:GUEST_DIR[:ro], a host directory the guests see through WASI, writable unless :ro. Repeatable."""
        spec, read_only = mount, False
        for suffix, is_read_only in ((":ro", True), (":rw", False)):
            if mount.endswith(suffix):
                spec, read_only = mount[: -len(suffix)], is_read_only
                break
        host_dir, colon, guest_dir = spec.rpartition(":")
        if not (colon and host_dir and guest_dir):
            raise usage.UsageError(f"--guest-mount: expected HOST_DIR:GUEST_DIR[:ro], not {mount!r}")
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

    def opt_user(self) -> None:
        """Downstream: ~/public_html and ~/.twistd-web-pb of every user, as `twistd web --user`."""
        self._claim_downstream("--user")
        web_tap.Options.opt_user(self)

    opt_u = opt_user

    def postOptions(self) -> None:
        """Check that the guests, the downstream and the endpoints are usable."""
        if self["personal"]:
            raise usage.UsageError("--personal is not supported: httpwasm serves HTTP, not a PB resource publisher")
        web_tap.Options.postOptions(self)
        if not self["guests"]:
            raise usage.UsageError("give the guest to run with --guest PATH")
        if self["downstream"] is None:
            raise usage.UsageError(f"name the downstream resource with one of {_DOWNSTREAM_OPTIONS}")
        from twisted.internet import endpoints, reactor

        for description in self["ports"]:
            try:
                endpoints.serverFromString(reactor, description)  # type: ignore[no-untyped-call]
            except (ValueError, TypeError, KeyError, OSError) as error:
                raise usage.UsageError(f"--listen {description}: not a usable endpoint: {error}") from None


def _load_guests(config: Options) -> list[Guest]:
    """Every ``--guest``, loaded; a guest that cannot load ends ``twistd`` with its reason."""
    guests = []
    for entry in config["guests"]:
        try:
            guest = Guest(
                entry["path"],
                config=entry["config"],
                log_level=config["log-level"],
                execution=config["execution"],
                timeout=config["guest-timeout"],
                memory_limit=config["guest-memory-limit"],
                max_buffer_bytes=config["max-buffer-bytes"],
                env=config["guest-env"],
                mounts=config["guest-mounts"],
            )
        except GuestLoadError as error:
            # SystemExit with a message: twistd prints it to stderr and exits with status 1.
            raise SystemExit(f"twistd httpwasm: --guest {entry['path']}: {error}") from None
        guests.append(guest)
    return guests


def makeService(config: Options) -> service.MultiService:
    """The guests in front of the downstream, served by one ``Site`` on every ``--listen`` endpoint.

    Raises :class:`SystemExit` with the reason when a guest cannot be loaded.
    """
    top = service.MultiService()  # type: ignore[no-untyped-call]
    downstream: Any = config["root"]
    if config["indexes"]:
        downstream.indexNames = config["indexes"]
    if isinstance(downstream, static.File):
        downstream.registry.setComponent(interfaces.IServiceCollection, top)
    if config["extraHeaders"]:
        downstream = web_tap._AddHeadersResource(downstream, config["extraHeaders"])

    guests = _load_guests(config)
    root = downstream
    for guest in reversed(guests):
        root = GuestResource(guest, root, on_guest_error=config["on-guest-error"])

    site = Site(root, logPath=config["logfile"]) if config["logfile"] else Site(root)
    if config["display-tracebacks"]:
        site.displayTracebacks = True
    for description in config["ports"]:
        # Site provides IProtocolFactory; mypy cannot see zope interface declarations.
        strports.service(description, site).setServiceParent(top)  # type: ignore[arg-type, no-untyped-call]

    _log.info(
        "httpwasm: {guests} in front of {downstream}, listening on {endpoints}"
        " (execution {execution}, {policy}, guest memory limit {memory}, time limit {timeout} s)",
        guests=("guest " if len(guests) == 1 else "guests ") + " -> ".join(e["path"] for e in config["guests"]),
        downstream=config["downstream"],
        endpoints=", ".join(config["ports"]),
        execution=config["execution"].value,
        policy=config["on-guest-error"],
        memory=_format_size(config["guest-memory-limit"]),
        timeout=config["guest-timeout"],
    )
    return top
