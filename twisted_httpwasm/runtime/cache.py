"""An on-disk cache of compiled guests, so a restart skips compilation.

Compiled code is machine code that wasmtime trusts when it loads it, so the
cache must never hand it bytes that it did not write itself.  Each entry is
keyed by the guest's SHA-256, the wasmtime version and the engine settings,
carries a SHA-256 of its own contents, and is written atomically (temporary
file, then rename).  An entry that is stale, truncated or corrupt is ignored
and replaced; a cache that cannot be written is only a missed speed-up.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import wasmtime

__all__ = ["CompileCache", "default_cache_dir"]

_MAGIC = b"twisted-httpwasm compiled guest v1\n"
_DIGEST = 32


def default_cache_dir() -> Path:
    """``$TWISTED_HTTPWASM_CACHE``, else ``$XDG_CACHE_HOME/twisted-httpwasm``."""
    explicit = os.environ.get("TWISTED_HTTPWASM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "twisted-httpwasm"


def _wasmtime_version() -> str:
    try:
        return version("wasmtime")
    except PackageNotFoundError:  # pragma: no cover - wasmtime is always installed with us
        return "unknown"


class CompileCache:
    """Compiled modules on disk, keyed by guest bytes, wasmtime and engine settings."""

    def __init__(self, directory: Path, engine_settings: str):
        self.directory = Path(directory)
        self._salt = f"{_wasmtime_version()}|{engine_settings}".encode()
        self.hits = 0
        self.misses = 0

    def _path(self, wasm: bytes) -> Path:
        key = hashlib.sha256(self._salt + b"\0" + wasm).hexdigest()
        return self.directory / f"{key}.cwasm"

    def load(self, engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
        """The compiled module, from the cache when a sound entry exists."""
        path = self._path(wasm)
        module = self._read(engine, path)
        if module is not None:
            self.hits += 1
            return module
        self.misses += 1
        module = wasmtime.Module(engine, wasm)
        self._write(path, bytes(module.serialize()))
        return module

    def _read(self, engine: wasmtime.Engine, path: Path) -> wasmtime.Module | None:
        try:
            data = path.read_bytes()
        except OSError:
            return None
        header = len(_MAGIC) + _DIGEST
        if len(data) <= header or not data.startswith(_MAGIC):
            return None
        digest, payload = data[len(_MAGIC) : header], data[header:]
        if hashlib.sha256(payload).digest() != digest:
            return None  # truncated or corrupt: never hand it to wasmtime
        try:
            return wasmtime.Module.deserialize(engine, payload)
        except wasmtime.WasmtimeError:
            return None  # written by an incompatible build: recompile

    def _write(self, path: Path, payload: bytes) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(_MAGIC + hashlib.sha256(payload).digest() + payload)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError:
            return  # a read-only or full disk only costs the next start a compile
