"""``python -m twisted_httpwasm check GUEST``: will this guest run here, and if not, why.

It reads the guest as ``twistd httpwasm`` would, then says, for a person (or
as JSON with ``--json``): each import (provided here, or unknown), the exports
with their signatures, the start function and what it did (host calls,
features enabled, config read, log lines), the memory, and the outcome of one
smoke request (``GET /``) through :class:`~.client.GuestClient`.  The exit
status is 0 when the guest can run here, 1 when it cannot, with the reason on
the last line.

:func:`resolve_guest` is the one place that turns the ``GUEST`` argument into
bytes, a name and a configuration: other kinds of guest (a plugin directory, a
zip) are added there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import wasmtime
from twisted.logger import globalLogPublisher

from ..abi import HOST_FUNCTIONS, HOST_MODULE, WASI_MODULE, Feature, LogLevel
from ..runtime.engine import shared_engine
from ..runtime.guest import DEFAULT_MEMORY_LIMIT, Guest, GuestLoadError
from .client import _LEVELS, GuestClient, _record_call

__all__ = ["CheckError", "ResolvedGuest", "check", "main", "resolve_guest"]

_PAGE = 65536
_REQUIRED = {"memory": None, "handle_request": "() -> (i64)", "handle_response": "(i32 i32) -> ()"}
_START_FUNCTIONS = ("_start", "_initialize")  # the order they run in


class CheckError(Exception):
    """The guest cannot be checked at all (unreadable file, bad config option); the message says why."""


@dataclass(frozen=True)
class ResolvedGuest:
    """What ``GUEST`` stands for: the module's bytes (binary or WAT), its name, its config, where it came from."""

    data: bytes
    name: str
    config: bytes
    origin: str


def resolve_guest(spec: str, config: bytes | None = None, config_file: str | None = None) -> ResolvedGuest:
    """The guest named on the command line: a ``.wasm`` or ``.wat`` file, or a Traefik plugin (directory or
    ``.zip``: its module, named by its ``displayName``, with its ``testData`` unless a configuration is given),
    with ``--config``/``--config-file`` (a ``.yaml``/``.json``/``.toml`` file encoded as ``twistd httpwasm``
    encodes it).

    Raises :class:`CheckError`.  The seam for other kinds of guest: resolve
    them here to bytes, a name and a config.
    """
    from ..service import goconfig, traefik

    if config_file is not None:
        try:
            config = goconfig.read_config_file(config_file)
        except OSError as error:
            raise CheckError(f"cannot read --config-file {config_file!r}: {error.strerror or error}") from None
        except goconfig.ConfigError as error:
            raise CheckError(f"--config-file: {error}") from None
    try:
        plugin = traefik.check_source(spec, config)
    except traefik.PluginError as error:
        raise CheckError(f"{spec}: {error}") from None
    if plugin is not None:
        return ResolvedGuest(data=plugin.data, name=plugin.name, config=plugin.config, origin=plugin.origin)
    path = Path(spec)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckError(f"cannot read guest {spec!r}: {error.strerror or error}") from None
    return ResolvedGuest(data=data, name=path.stem, config=config or b"", origin=str(path))


@dataclass
class Report:
    """What ``check`` found; ``ok`` False means the guest cannot run here, for ``reason``."""

    guest: dict[str, Any]
    imports: list[dict[str, Any]] = field(default_factory=list)
    exports: list[dict[str, Any]] = field(default_factory=list)
    start: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    smoke: dict[str, Any] | None = None
    ok: bool = False
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "guest": self.guest,
            "imports": self.imports,
            "exports": self.exports,
            "start": self.start,
            "memory": self.memory,
            "smoke": self.smoke,
            "ok": self.ok,
            "reason": self.reason,
        }


def _signature(ty: wasmtime.FuncType) -> str:
    return f"({' '.join(str(p) for p in ty.params)}) -> ({' '.join(str(r) for r in ty.results)})"


def _describe(ty: Any) -> tuple[str, str]:
    """(kind, description) of an import's or export's type."""
    if isinstance(ty, wasmtime.FuncType):
        return "func", _signature(ty)
    if isinstance(ty, wasmtime.MemoryType):
        limits = ty.limits
        top = "no maximum" if limits.max is None else f"at most {_pages(limits.max)}"
        return "memory", f"{_pages(limits.min)} at start, {top}"
    if isinstance(ty, wasmtime.GlobalType):
        return "global", f"{ty.content}{' (mutable)' if ty.mutable else ''}"
    if isinstance(ty, wasmtime.TableType):
        return "table", str(ty.element)
    return type(ty).__name__.lower(), ""


def _pages(count: int) -> str:
    return f"{count} page{'' if count == 1 else 's'}"


def _import_verdict(module: str, name: str, ty: Any) -> str | None:
    """None if this host provides the import; otherwise why not."""
    if module == WASI_MODULE:
        from ..service.traefik import wasi_import_problem

        return wasi_import_problem(name)  # wasmtime's WASI preview 1; WasmEdge's socket functions are said plainly
    if module != HOST_MODULE:
        return f"module {module!r} is not offered by this host (it offers {HOST_MODULE} and {WASI_MODULE})"
    spec = next((spec for spec in HOST_FUNCTIONS if spec.name == name), None)
    if spec is None:
        return f"{HOST_MODULE} has no function {name!r}"
    if not isinstance(ty, wasmtime.FuncType) or _signature(ty) != spec.signature:
        got = _signature(ty) if isinstance(ty, wasmtime.FuncType) else type(ty).__name__
        return f"imported as {got}; the ABI says {spec.signature}"
    return None


def _feature_names(features: int) -> list[str]:
    return [flag.name.lower() for flag in Feature if flag and features & flag and flag.name]


def check(guest: ResolvedGuest) -> Report:
    """Inspect, load and try ``guest`` as ``twistd httpwasm`` would (its default options)."""
    from ..service.tap import Options

    report = Report(
        guest={
            "name": guest.name,
            "origin": guest.origin,
            "bytes": len(guest.data),
            "sha256": hashlib.sha256(guest.data).hexdigest(),
            "config_bytes": len(guest.config),
        }
    )
    binary = guest.data
    if not binary.startswith(b"\0asm"):
        try:
            binary = bytes(wasmtime.wat2wasm(binary.decode("utf-8")))
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as error:
            report.reason = (
                f"{guest.origin} is neither a wasm binary nor valid WAT: {str(error).strip().splitlines()[0]}"
            )
            return report
    try:
        module = wasmtime.Module(shared_engine(), binary)
    except wasmtime.WasmtimeError as error:
        report.reason = f"{guest.origin} does not compile: {str(error).strip().splitlines()[0]}"
        return report
    unknown = []
    for item in module.imports:
        kind, description = _describe(item.type)
        verdict = _import_verdict(item.module, item.name or "", item.type)
        report.imports.append(
            {
                "module": item.module,
                "name": item.name,
                "kind": kind,
                "type": description,
                "provided": verdict is None,
                "problem": verdict,
            }
        )
        if verdict is not None:
            unknown.append(f"{item.module}.{item.name} ({verdict})")
    exports = {}
    for export in module.exports:
        kind, description = _describe(export.type)
        exports[export.name] = (kind, description)
        report.exports.append({"name": export.name, "kind": kind, "type": description})
    memory = next((item.type for item in module.exports if item.name == "memory"), None)
    options = Options()
    memory_limit = options.get("guest-memory-limit", DEFAULT_MEMORY_LIMIT)
    report.memory = {"limit_bytes": memory_limit}
    if isinstance(memory, wasmtime.MemoryType):
        report.memory.update(min_pages=memory.limits.min, max_pages=memory.limits.max)
    report.start = {"functions": [name for name in _START_FUNCTIONS if name in exports]}
    missing = [
        f"{name} {want or ''}".strip()
        for name, want in _REQUIRED.items()
        if name not in exports or (want is not None and exports[name][1] != want)
    ]
    if unknown:
        report.reason = f"it imports what this host does not provide: {'; '.join(unknown)}"
        return report
    if missing:
        report.reason = f"it does not export {', '.join(missing)}"
        return report
    if isinstance(memory, wasmtime.MemoryType) and memory.limits.min * _PAGE > memory_limit:
        report.reason = (
            f"its memory starts at {memory.limits.min * _PAGE} bytes, over the limit of {memory_limit} bytes"
            " (--guest-memory-limit)"
        )
        return report
    loaded, lines, calls = _load(guest, options)
    report.start["logs"] = [[level.name.lower(), text] for level, text in lines]
    report.start["calls"] = calls
    report.start["config_read"] = "get_config" in calls
    if isinstance(loaded, str):
        report.reason = loaded
        return report
    instance = loaded.pool.acquire(for_request=False)
    try:
        report.start["features"] = _feature_names(instance.features)
    finally:
        loaded.pool.release(instance)
    report.smoke = _smoke(loaded)
    if report.smoke["trap"] is not None:
        report.reason = f"the smoke request GET / failed in the guest: {report.smoke['trap']}"
    else:
        report.ok = True
    loaded.retire()
    return report


def _load(guest: ResolvedGuest, options: Any) -> tuple[Guest | str, list[tuple[LogLevel, str]], list[str]]:
    """The guest loaded with ``twistd httpwasm``'s defaults (or why it failed), its log, its start's host calls.

    Its calls are traced (``Exchange.calls`` of the smoke request); those its first
    instance made while initialising are kept here too, so that they are told when
    initialisation fails.
    """
    lines: list[tuple[LogLevel, str]] = []
    calls: list[str] = []
    first: list[int] = []
    namespace = f"httpwasm.guest.{guest.name}"

    def watch(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == namespace:
            text = event.get("text", event.get("summary"))
            if text is not None:
                lines.append((_LEVELS.get(event.get("log_level"), LogLevel.INFO), str(text)))

    def trace(instance: Any, function: str) -> None:
        if instance.state is None:
            if not first:
                first.append(id(instance))
            if first[0] == id(instance):
                calls.append(function)
        _record_call(instance, function)

    observe: Any = watch
    globalLogPublisher.addObserver(observe)
    try:
        loaded = Guest(
            guest.data,
            name=guest.name,
            config=guest.config,
            log_level=options["log-level"],
            execution=options["execution"],
            timeout=options["guest-timeout"],
            memory_limit=options["guest-memory-limit"],
            max_buffer_bytes=options["max-buffer-bytes"],
            log_limit=options["guest-log-limit"],
            on_host_call=trace,
        )
    except GuestLoadError as error:
        if not lines:
            lines = [(LogLevel.INFO, line) for line in error.log_lines]
        return str(error), lines, calls
    finally:
        globalLogPublisher.removeObserver(observe)
    return loaded, lines, calls


def _smoke(guest: Guest) -> dict[str, Any]:
    client = GuestClient(guest)
    try:
        exchange = client.get("/")
    finally:
        client.close()
    return {
        "request": "GET /",
        "status": exchange.status,
        "downstream_reached": exchange.downstream is not None,
        "outcome": exchange.outcome,
        "trap": exchange.trap,
        "features": _feature_names(exchange.features),
        "calls": [f"{call.phase}:{call.function}" for call in exchange.calls or ()],
        "logs": [[level.name.lower(), text] for level, text in exchange.logs],
    }


# -- output -------------------------------------------------------------------------------


def render(report: Report, out: TextIO) -> None:
    """``report`` for a person; its last line is the verdict (and the reason, when it cannot run)."""
    guest = report.guest
    write = out.write
    write(f"guest {guest['name']}: {guest['origin']}, {guest['bytes']} bytes, sha256 {guest['sha256']}\n")
    write(f"config: {guest['config_bytes']} bytes\n")
    if report.imports:
        write("imports:\n")
        width = max(len(f"{i['module']}.{i['name']}") for i in report.imports)
        for item in report.imports:
            where = f"{item['module']}.{item['name']}".ljust(width)
            verdict = "provided" if item["provided"] else f"UNKNOWN: {item['problem']}"
            write(f"  {where}  {item['type']:<28} {verdict}\n")
    else:
        write("imports: none\n")
    if report.exports:
        write("exports:\n")
        width = max(len(e["name"]) for e in report.exports)
        for item in report.exports:
            write(f"  {item['name'].ljust(width)}  {item['kind']} {item['type']}\n")
    memory = report.memory
    if "min_pages" in memory:
        top = "no maximum" if memory["max_pages"] is None else f"at most {_pages(memory['max_pages'])}"
        write(
            f"memory: {_pages(memory['min_pages'])} ({memory['min_pages'] * _PAGE} bytes) at start, {top};"
            f" this host allows {memory['limit_bytes']} bytes per instance\n"
        )
    start = report.start
    if start:
        functions = ", ".join(start.get("functions", ())) or "none"
        write(f"start function: {functions}\n")
        if "calls" in start:
            write(f"  host calls: {', '.join(start['calls']) or 'none'}\n")
            if "features" in start:
                write(f"  features enabled: {', '.join(start['features']) or 'none'}\n")
            write(f"  config read: {'yes' if start['config_read'] else 'no'}\n")
        for level, text in start.get("logs", ()):
            write(f"  logged [{level}] {text}\n")
    smoke = report.smoke
    if smoke is not None:
        where = "the downstream answered" if smoke["downstream_reached"] else "the guest answered itself"
        if smoke["trap"] is not None:
            where = f"the guest failed: {smoke['trap']}"
        write(f"smoke request: {smoke['request']} -> {smoke['status']} ({where}; outcome {smoke['outcome']})\n")
        write(f"  host calls: {', '.join(smoke['calls']) or 'none'}\n")
        if smoke["features"]:
            write(f"  features: {', '.join(smoke['features'])}\n")
        for level, text in smoke["logs"]:
            write(f"  logged [{level}] {text}\n")
    if report.ok:
        write(f"OK: guest {guest['name']} can run here\n")
    else:
        write(f"FAIL: guest {guest['name']} cannot run here: {report.reason}\n")


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    """``check GUEST [--config BYTES | --config-file F] [--json]``; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m twisted_httpwasm check",
        description="Say whether an http-wasm guest can run on this host, and why not.",
    )
    parser.add_argument(
        "guest",
        metavar="GUEST",
        help="the guest: a .wasm or .wat file, or a Traefik plugin directory or .zip (run with its testData)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="the guest's configuration (what get_config returns)")
    source.add_argument("--config-file", metavar="F", help="read the guest's configuration from file F")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        resolved = resolve_guest(
            args.guest,
            args.config.encode("utf-8", "surrogateescape") if args.config is not None else None,
            args.config_file,
        )
    except CheckError as error:
        if args.json:
            out.write(json.dumps({"ok": False, "reason": str(error)}) + "\n")
        else:
            out.write(f"FAIL: {error}\n")
        return 1
    report = check(resolved)
    if args.json:
        out.write(json.dumps(report.as_dict(), indent=2) + "\n")
    else:
        render(report, out)
    return 0 if report.ok else 1
