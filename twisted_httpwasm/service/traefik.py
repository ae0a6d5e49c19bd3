"""Traefik wasm plugins as guests: a plugin directory or release zip, its ``.traefik.yml`` and ``testData``.

Traefik loads a wasm middleware plugin from a directory that holds a
``.traefik.yml`` manifest and the module, at the manifest's ``wasmPath``
(``plugin.wasm`` if not given); the catalog serves it as a zip with that
directory at its root or one folder down.  ``--guest`` accepts all three: a
directory with ``.traefik.yml``, a local ``.zip``, or an ``https://`` URL of
one (fetched and pinned by :mod:`.sources`; ``--guest-sha256`` is the digest
of the zip as given, or, for a directory, of its module).

The manifest is checked as Traefik would use it, each refusal one line
naming the field: ``runtime`` must be ``wasm`` (an empty or ``yaegi`` runtime
is a Go source plugin for Traefik's interpreter), ``type`` must be
``middleware``, ``wasmPath`` must name a file inside the plugin (no absolute
path, no ``..``, no symlink out, no zip member that would land outside), and
the YAML must be well formed.  A zip is read in memory, bounded: at most
:data:`MAX_MEMBERS` members, the module and manifest at most
:data:`MAX_MODULE_BYTES` and :data:`MAX_MANIFEST_BYTES`; nothing is written
to disk.

The guest is named by the manifest's ``displayName`` (sanitised for log
namespaces and metric labels), and ``--guest-config-test-data`` gives it the
manifest's ``testData`` as its configuration, encoded as Traefik encodes it
(:mod:`.goconfig`).
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import wasmtime

from ..abi import WASI_MODULE
from ..runtime.guest import GuestLoadError
from . import goconfig

__all__ = [
    "DEFAULT_WASM_PATH",
    "MANIFEST",
    "CheckSource",
    "GuestSource",
    "Manifest",
    "Plugin",
    "PluginError",
    "check_source",
    "guest_source",
    "is_plugin",
    "load_plugin",
    "module_imports",
    "parse_manifest",
    "sanitise_name",
    "unprovided_wasi_imports",
    "wasi_import_problem",
    "watched_paths",
]

#: The manifest's file name, in the plugin's directory.
MANIFEST = ".traefik.yml"
#: The module's path when the manifest names none.
DEFAULT_WASM_PATH = "plugin.wasm"
#: Bounds on what a plugin zip may make us read.
MAX_ZIP_BYTES = 256 * 1024 * 1024
MAX_MEMBERS = 10_000
MAX_MODULE_BYTES = 256 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024

_NAME_JUNK = re.compile(r"[^A-Za-z0-9_-]+")

#: WasmEdge's socket extension: functions it adds to wasi_snapshot_preview1, which Traefik offers to plugins
#: that import them (outgoing HTTP calls from a plugin) and WASI preview 1 itself does not have.
WASMEDGE_SOCKETS = frozenset(
    {
        "sock_open",
        "sock_bind",
        "sock_connect",
        "sock_listen",
        "sock_getaddrinfo",
        "sock_getlocaladdr",
        "sock_getpeeraddr",
        "sock_getsockopt",
        "sock_setsockopt",
        "sock_recv_from",
        "sock_send_to",
    }
)


class PluginError(GuestLoadError):
    """A plugin that cannot be used: ``str()`` is one line naming the file and the field."""


@dataclass(frozen=True)
class Manifest:
    """What ``.traefik.yml`` says (the fields Traefik reads; ``testData`` decoded as yaml.v3 decodes it)."""

    display_name: str
    type: str
    runtime: str
    wasm_path: str
    summary: str
    test_data: dict[str, object] | None

    @property
    def test_config(self) -> bytes:
        """``testData`` as the guest's configuration: Go's ``json.Marshal`` of it (``null`` if absent)."""
        return goconfig.encode_mapping(self.test_data, f"{MANIFEST}: testData")


@dataclass(frozen=True)
class Plugin:
    """A plugin's manifest and module bytes, and the name its guest gets."""

    manifest: Manifest
    wasm: bytes
    name: str


@dataclass(frozen=True)
class GuestSource:
    """What a ``--guest`` loads: the source (a path, or bytes), its name, digest to check and configuration."""

    source: str | bytes
    name: str | None
    sha256: str | None
    config: bytes
    plugin: Plugin | None = None


def sanitise_name(text: str, fallback: str = "plugin") -> str:
    """``text`` fit for a log namespace and a metric label: letters, digits, ``-`` and ``_``, at most 64."""
    name = _NAME_JUNK.sub("-", text).strip("-")[:64].strip("-")
    return name or fallback


def is_plugin(location: str) -> bool:
    """Whether ``--guest location`` names a plugin: a directory, or a ``.zip`` (local path or URL)."""
    if location.lower().startswith(("https://", "http://")):
        return urlsplit(location).path.lower().endswith(".zip")
    return location.lower().endswith(".zip") or Path(location).is_dir()


def watched_paths(location: str) -> list[str]:
    """The files whose change reloads a plugin ``--guest`` under ``--watch`` (its manifest and module)."""
    root = Path(location)
    if not root.is_dir():
        return [location]
    paths = [location, str(root / MANIFEST)]
    try:
        manifest = parse_manifest((root / MANIFEST).read_bytes()[:MAX_MANIFEST_BYTES], MANIFEST)
        paths.append(str(root.joinpath(*_wasm_parts(manifest, MANIFEST))))
    except (OSError, PluginError):
        pass  # a broken plugin is reported when it is loaded
    return paths


def guest_source(entry: dict[str, Any], config: bytes, sha256: str | None, fetched: Any = None) -> GuestSource:
    """What the ``--guest`` of ``entry`` loads: ``path``, ``name`` if given (``--guest-name``), ``test-data`` if
    its testData is the configuration.

    ``fetched`` is a :class:`~.sources.FetchedGuest` for a remote ``--guest``
    (its bytes already checked against ``sha256``).  A plugin gives its module,
    its ``displayName`` and, with ``test-data``, its ``testData``; any other
    guest is passed on as it is.  Raises :class:`PluginError`.
    """
    location: str = entry["path"]
    name: str | None = entry.get("name")
    if not is_plugin(location):
        if entry.get("test-data"):
            raise PluginError(
                "--guest-config-test-data applies to a Traefik plugin (a directory with .traefik.yml, or a .zip)"
            )
        if fetched is None:
            return GuestSource(location, name, sha256, config)
        return GuestSource(fetched.data, name or fetched.name, sha256, config)
    plugin = load_plugin(
        location, sha256=None if fetched is not None else sha256, data=fetched and fetched.data, name=name or ""
    )
    unprovided = unprovided_wasi_imports(plugin.wasm)
    if unprovided:
        raise PluginError(_unprovided_message(unprovided))
    chosen = plugin.manifest.test_config if entry.get("test-data") else config
    return GuestSource(plugin.wasm, plugin.name, None, chosen, plugin)


@dataclass(frozen=True)
class CheckSource:
    """What ``python -m twisted_httpwasm check PLUGIN`` runs: the module, its name, configuration and origin."""

    data: bytes
    name: str
    config: bytes
    origin: str
    #: The WASI functions it imports that this host does not provide (:func:`wasi_import_problem` says why).
    unprovided: tuple[str, ...]


def check_source(spec: str, config: bytes | None = None) -> CheckSource | None:
    """For ``check``: the plugin at ``spec`` (directory or zip) with its ``testData`` as the configuration unless
    ``config`` is given; None if ``spec`` is not a plugin.  Raises :class:`PluginError`.
    """
    if not is_plugin(spec):
        return None
    plugin = load_plugin(spec)
    chosen = plugin.manifest.test_config if config is None else config
    origin = f"{spec} (Traefik plugin {plugin.manifest.display_name!r}, {plugin.manifest.wasm_path})"
    return CheckSource(plugin.wasm, plugin.name, chosen, origin, tuple(unprovided_wasi_imports(plugin.wasm)))


def load_plugin(location: str, *, sha256: str | None = None, data: bytes | None = None, name: str = "") -> Plugin:
    """The plugin at ``location``: a directory, or a zip (its bytes in ``data`` if already fetched).

    ``sha256``: the digest the zip (or a directory's module) must have.
    ``name``: the guest's name instead of the sanitised ``displayName``.
    Raises :class:`PluginError` with one line naming the problem.
    """
    stem = sanitise_name(PurePosixPath(urlsplit(location).path if "://" in location else location).stem)
    if data is None and not location.lower().endswith(".zip"):
        manifest, wasm = _from_directory(Path(location))
        pinned, what = wasm, "module"
    else:
        if data is None:
            data = _read_bounded(Path(location), MAX_ZIP_BYTES, "the zip")
        manifest, wasm = _from_zip(data)
        pinned, what = data, "zip"
    if sha256 is not None:
        digest = hashlib.sha256(pinned).hexdigest()
        if digest != sha256.strip().lower():
            raise PluginError(f"the plugin's {what} has sha256 {digest}, not the expected {sha256}: refused")
    return Plugin(manifest, wasm, name or sanitise_name(manifest.display_name, fallback=stem or "plugin"))


# -- the manifest --------------------------------------------------------------------------------


def parse_manifest(data: bytes, where: str = MANIFEST) -> Manifest:
    """The manifest in ``data``; :class:`PluginError` naming the field that makes it unusable here."""
    try:
        document = goconfig.decode_yaml(data, where)
    except goconfig.ConfigError as error:
        raise PluginError(str(error)) from None
    if not isinstance(document, dict):
        raise PluginError(f"{where}: not a manifest: the YAML must be a mapping (displayName, type, runtime, ...)")
    fields = {key: _string(document, key, where) for key in ("displayName", "type", "runtime", "wasmPath", "summary")}
    runtime = fields["runtime"]
    if runtime != "wasm":
        if runtime in ("", "yaegi"):
            said = "runtime is missing" if runtime == "" else "runtime is 'yaegi'"
            raise PluginError(
                f"{where}: {said}: a Yaegi plugin is Go source that only Traefik's interpreter runs; "
                "only runtime: wasm plugins run here"
            )
        raise PluginError(f"{where}: runtime is {runtime!r}: only runtime: wasm plugins run here")
    if fields["type"] != "middleware":
        raise PluginError(
            f"{where}: type is {fields['type']!r}: only type: middleware plugins run here"
            if fields["type"]
            else f"{where}: type is missing: only type: middleware plugins run here"
        )
    test_data = document.get("testData")
    if test_data is not None and not isinstance(test_data, dict):
        raise PluginError(f"{where}: testData must be a mapping (the plugin's configuration), not {_kind(test_data)}")
    manifest = Manifest(
        display_name=fields["displayName"],
        type=fields["type"],
        runtime=runtime,
        wasm_path=fields["wasmPath"] or DEFAULT_WASM_PATH,
        summary=fields["summary"],
        test_data=test_data,
    )
    _wasm_parts(manifest, where)  # refuses an escaping wasmPath now
    return manifest


def _string(document: dict[str, object], key: str, where: str) -> str:
    value = document.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise PluginError(f"{where}: {key} must be a string, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return {list: "a list", dict: "a mapping", bool: "a boolean"}.get(type(value), "a number")


def _wasm_parts(manifest: Manifest, where: str) -> tuple[str, ...]:
    """``wasmPath``'s components, relative to the plugin; :class:`PluginError` if it would leave the plugin."""
    text = manifest.wasm_path
    bad = (
        "\\" in text
        or "\0" in text
        or text.startswith("/")
        or re.match(r"[A-Za-z]:", text) is not None
        or ".." in PurePosixPath(text).parts
    )
    parts = tuple(part for part in PurePosixPath(text).parts if part != ".")
    if bad or not parts:
        raise PluginError(
            f"{where}: wasmPath {text!r} must be a path inside the plugin (relative, without '..'), like plugin.wasm"
        )
    return parts


# -- a directory -----------------------------------------------------------------------------------


def _from_directory(root: Path) -> tuple[Manifest, bytes]:
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise PluginError(f"no {MANIFEST} in {root}: a directory --guest must be a Traefik plugin")
    manifest = parse_manifest(_read_bounded(manifest_path, MAX_MANIFEST_BYTES, MANIFEST), MANIFEST)
    parts = _wasm_parts(manifest, MANIFEST)
    module = root.joinpath(*parts)
    try:
        real_root = root.resolve(strict=True)
        real = module.resolve(strict=True)
    except (OSError, RuntimeError):
        raise PluginError(f"{MANIFEST}: wasmPath {manifest.wasm_path!r}: no such file in the plugin") from None
    if not real.is_relative_to(real_root):
        raise PluginError(
            f"{MANIFEST}: wasmPath {manifest.wasm_path!r} leads outside the plugin (through a symlink): refused"
        )
    if not real.is_file():
        raise PluginError(f"{MANIFEST}: wasmPath {manifest.wasm_path!r} is not a file")
    return manifest, _read_bounded(real, MAX_MODULE_BYTES, f"wasmPath {manifest.wasm_path!r}")


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise PluginError(f"cannot read {what} ({path}): {error.strerror or error}") from None
    if len(data) > limit:
        raise PluginError(f"{what} is larger than {limit} bytes: refused")
    return data


# -- a zip -------------------------------------------------------------------------------------------


def _from_zip(data: bytes) -> tuple[Manifest, bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError) as error:
        raise PluginError(f"not a zip archive: {error}") from None
    with archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise PluginError(f"the zip has {len(members)} members, more than {MAX_MEMBERS}: refused")
        for member in members:
            if not _safe_member(member.filename):
                raise PluginError(f"the zip member {member.filename!r} would land outside the plugin: refused")
        by_name = {member.filename: member for member in members}
        prefix = _plugin_folder(by_name)
        where = prefix + MANIFEST
        manifest = parse_manifest(_member(archive, by_name[where], MAX_MANIFEST_BYTES, where), where)
        module_name = prefix + "/".join(_wasm_parts(manifest, where))
        module = by_name.get(module_name)
        if module is None or module.is_dir():
            raise PluginError(f"{where}: wasmPath {manifest.wasm_path!r}: no such file in the zip ({module_name})")
        return manifest, _member(archive, module, MAX_MODULE_BYTES, f"{where}: wasmPath {manifest.wasm_path!r}")


def _safe_member(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return not (name.startswith("/") or "\\" in name or "\0" in name or re.match(r"[A-Za-z]:", name) or ".." in parts)


def _plugin_folder(by_name: dict[str, zipfile.ZipInfo]) -> str:
    """Where the plugin is in the zip: ``""`` (its root) or ``"folder/"`` (one folder down)."""
    if MANIFEST in by_name:
        return ""
    found = sorted(name for name in by_name if name.endswith("/" + MANIFEST) and name.count("/") == 1)
    if not found:
        raise PluginError(f"no {MANIFEST} in the zip, at its root or one folder down: not a Traefik plugin")
    if len(found) > 1:
        raise PluginError(f"the zip holds several plugins ({', '.join(found)}): give one")
    return found[0][: -len(MANIFEST)]


def _member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, limit: int, what: str) -> bytes:
    if stat.S_ISLNK(member.external_attr >> 16):
        raise PluginError(f"{what} is a symlink in the zip: refused")
    if member.file_size > limit:
        raise PluginError(f"{what} is larger than {limit} bytes: refused")
    try:
        with archive.open(member) as handle:
            data = handle.read(limit + 1)
    except (zipfile.BadZipFile, OSError, NotImplementedError, RuntimeError) as error:
        raise PluginError(f"{what}: cannot be read from the zip: {error}") from None
    if len(data) > limit:
        raise PluginError(f"{what} is larger than {limit} bytes: refused")
    return data


# -- what a plugin imports ---------------------------------------------------------------------------


def module_imports(binary: bytes) -> list[tuple[str, str]]:
    """The (module, name) of every import of a wasm binary, read from its import section (nothing compiled).

    Empty for WAT text or a binary too malformed to read (loading reports those).
    """
    if not binary.startswith(b"\0asm"):
        return []
    try:
        return _ImportReader(binary).imports()
    except (IndexError, ValueError, UnicodeDecodeError):
        return []


class _ImportReader:
    def __init__(self, data: bytes):
        self.data = data
        self.at = 8  # after the magic and the version

    def byte(self) -> int:
        value = self.data[self.at]
        self.at += 1
        return value

    def uleb(self) -> int:
        result = shift = 0
        while True:
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    def name(self) -> str:
        length = self.uleb()
        text = self.data[self.at : self.at + length].decode("utf-8")
        if len(text.encode()) != length:
            raise ValueError("truncated name")
        self.at += length
        return text

    def limits(self) -> None:
        flags = self.byte()
        self.uleb()
        if flags & 1:
            self.uleb()

    def imports(self) -> list[tuple[str, str]]:
        while self.at < len(self.data):
            section, size = self.byte(), self.uleb()
            if section != 2:
                self.at += size
                continue
            found = []
            for _ in range(self.uleb()):
                module, name, kind = self.name(), self.name(), self.byte()
                if kind in (0, 4):  # a function (type index), a tag (attribute, type index)
                    if kind == 4:
                        self.byte()
                    self.uleb()
                elif kind == 1:  # a table: element type, limits
                    self.byte()
                    self.limits()
                elif kind == 2:  # a memory
                    self.limits()
                elif kind == 3:  # a global: value type, mutability
                    self.byte()
                    self.byte()
                else:
                    raise ValueError(f"import kind {kind}")
                found.append((module, name))
            return found
        return []


_wasi_provided: dict[str, bool] = {}
_wasi_linker: list[tuple[wasmtime.Linker, wasmtime.Store]] = []


def _provides_wasi(name: str) -> bool:
    """Whether this host's WASI (wasmtime's preview 1) defines ``wasi_snapshot_preview1.name``."""
    if name not in _wasi_provided:
        if not _wasi_linker:
            engine = wasmtime.Engine()
            linker = wasmtime.Linker(engine)
            linker.define_wasi()
            _wasi_linker.append((linker, wasmtime.Store(engine)))
        linker, store = _wasi_linker[0]
        try:
            linker.get(store, WASI_MODULE, name)
            _wasi_provided[name] = True
        except (wasmtime.WasmtimeError, LookupError, ValueError):
            _wasi_provided[name] = False
    return _wasi_provided[name]


def wasi_import_problem(name: str) -> str | None:
    """None if this host provides ``wasi_snapshot_preview1.name``; otherwise why not, plainly."""
    if _provides_wasi(name):
        return None
    if name in WASMEDGE_SOCKETS:
        return (
            "a WasmEdge socket extension function: this host does not provide WasmEdge socket extensions "
            "(WASI preview 1 has no way to open a socket)"
        )
    return "not a WASI preview 1 function this host provides"


def unprovided_wasi_imports(binary: bytes) -> list[str]:
    """The ``wasi_snapshot_preview1`` functions ``binary`` imports that this host does not provide."""
    return [name for module, name in module_imports(binary) if module == WASI_MODULE and wasi_import_problem(name)]


def _unprovided_message(names: list[str]) -> str:
    sockets = [name for name in names if name in WASMEDGE_SOCKETS]
    others = [name for name in names if name not in WASMEDGE_SOCKETS]
    parts = []
    if sockets:
        parts.append(
            f"{WASI_MODULE} {', '.join(sockets)}: WasmEdge socket extensions, which this host does not provide"
        )
    if others:
        parts.append(f"{WASI_MODULE} {', '.join(others)}, which this host's WASI does not provide")
    return "the plugin imports " + "; and ".join(parts)
