"""An on-disk cache of compiled guests, so a restart skips compilation; and the trust checks of the caches.

Compiled code is machine code that wasmtime runs as it is, so an entry is a
code-execution boundary: whoever can make this process load an entry of their
choosing runs code as the server.  So:

- The cache directory is created 0700 (whatever the umask) and used only if it
  is a directory owned by this process's user and writable by nobody else; an
  entry only if it is a regular file owned by this user and writable by nobody
  else.  Anything else is not used, with one warning saying why.
- Each entry carries an HMAC-SHA256, under a secret key kept 0600 in the cache
  directory (``key``, 32 random bytes made on first use), over the wasmtime
  version, the engine settings, the SHA-256 of the guest's bytes and the
  compiled code.  An entry is handed to wasmtime only if its HMAC checks out
  for the guest being loaded: an entry made for another guest, on another host
  (another key), under other engine settings, or written by anyone who cannot
  read the key, is a miss and is replaced.  Who can read the key can write the
  cache, which is the server's own user: already able to run code as the server.
- Entries are written atomically (temporary file, then rename).  A cache that
  cannot be written is only a missed speed-up.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import wasmtime
from twisted.logger import Logger

__all__ = ["CompileCache", "UntrustedCache", "default_cache_dir", "private_directory", "trusted_file"]

_log = Logger(namespace="httpwasm")

_MAGIC = b"twisted-httpwasm compiled guest v2\n"
_MAC = 32
_KEY_FILE = "key"
_KEY_BYTES = 32

#: Reasons already warned about (one warning per directory or entry and reason, per process).
_warned: set[str] = set()


class UntrustedCache(Exception):
    """A cache directory or entry that must not be used; the message says why."""


def default_cache_dir() -> Path:
    """``$TWISTED_HTTPWASM_CACHE``, else ``$XDG_CACHE_HOME/twisted-httpwasm``."""
    explicit = os.environ.get("TWISTED_HTTPWASM_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "twisted-httpwasm"


def warn_once(reason: str) -> None:
    """Log ``reason`` as a warning, once per process."""
    if reason not in _warned:
        _warned.add(reason)
        _log.warn("httpwasm: {reason}", reason=reason)


def _check_owner_and_mode(path: Path | str, status: os.stat_result, what: str) -> None:
    if status.st_uid != os.geteuid():
        raise UntrustedCache(
            f"{what} {path} is owned by uid {status.st_uid}, not by this server's user (uid {os.geteuid()}): not used"
        )
    if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedCache(
            f"{what} {path} is writable by its group or by others (mode {stat.S_IMODE(status.st_mode):04o}): not used"
        )


def private_directory(path: Path) -> Path:
    """``path``, created 0700 if missing (its parents as usual), once checked; :class:`UntrustedCache` if not.

    Used only if it is a directory owned by this user that nobody else may
    write (one warning says why not).  :class:`OSError` if it cannot be made.
    """
    path = Path(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(path, 0o700)  # the umask may have taken bits away: exactly 0700
    else:
        os.chmod(path, 0o700)
    status = os.stat(path)
    if not stat.S_ISDIR(status.st_mode):
        raise FileExistsError(f"{path} is not a directory")
    try:
        _check_owner_and_mode(path, status, "cache directory")
    except UntrustedCache as error:
        warn_once(str(error))
        raise
    return path


def trusted_file(path: Path, what: str = "cache entry") -> bytes | None:
    """The bytes of ``path``, if it is a regular file of this user's that nobody else may write; else None.

    A missing file is None quietly; an untrusted one with one warning saying why.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(fd)  # of the file opened: no swap between the check and the read
        try:
            if not stat.S_ISREG(status.st_mode):
                raise UntrustedCache(f"{what} {path} is not a regular file: not used")
            _check_owner_and_mode(path, status, what)
        except UntrustedCache as error:
            warn_once(str(error))
            return None
        return file.read()


def _key(directory: Path) -> bytes:
    """The cache's secret key (``key``, 0600, made on first use); :class:`UntrustedCache` if it is not sound."""
    path = directory / _KEY_FILE
    if not os.path.lexists(path):
        # Written whole, then linked into place: a process starting at the same time never reads half a key.
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".key-")  # 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(secrets.token_bytes(_KEY_BYTES))
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass  # another process made it first: theirs is the key
        finally:
            os.unlink(temporary)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise UntrustedCache(f"cache key {path} is not a regular file: the compile cache is not used")
        _check_owner_and_mode(path, status, "cache key")
        if status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UntrustedCache(
                f"cache key {path} is readable by its group or by others "
                f"(mode {stat.S_IMODE(status.st_mode):04o}): the compile cache is not used"
            )
        key = file.read()
    if len(key) != _KEY_BYTES:
        raise UntrustedCache(f"cache key {path} is damaged: the compile cache is not used")
    return key


def _wasmtime_version() -> str:
    try:
        return version("wasmtime")
    except PackageNotFoundError:  # pragma: no cover - wasmtime is always installed with us
        return "unknown"


class CompileCache:
    """Compiled modules on disk, keyed by guest bytes, wasmtime and engine settings, each bound to them by an HMAC."""

    def __init__(self, directory: Path, engine_settings: str):
        self.directory = Path(directory)
        self._salt = f"{_wasmtime_version()}|{engine_settings}".encode()
        self.hits = 0
        self.misses = 0

    def _path(self, digest: bytes) -> Path:
        key = hashlib.sha256(self._salt + b"\0" + digest).hexdigest()
        return self.directory / f"{key}.cwasm"

    def _mac(self, key: bytes, digest: bytes, payload: bytes) -> bytes:
        mac = hmac.new(key, digestmod=hashlib.sha256)
        for part in (self._salt, digest):
            mac.update(len(part).to_bytes(8, "big") + part)
        mac.update(payload)
        return mac.digest()

    def _open(self) -> bytes | None:
        """The key of a usable cache directory (made if missing), or None (warned about when it is not trusted)."""
        try:
            return _key(private_directory(self.directory))
        except UntrustedCache as error:
            warn_once(str(error))
            return None
        except OSError:
            return None  # cannot be made (read-only, a file in the way): only a missed speed-up

    def load(self, engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
        """The compiled module, from the cache when a sound entry for exactly these bytes exists."""
        digest = hashlib.sha256(wasm).digest()
        key = self._open()
        path = self._path(digest)
        module = self._read(engine, key, digest, path) if key is not None else None
        if module is not None:
            self.hits += 1
            return module
        self.misses += 1
        module = wasmtime.Module(engine, wasm)
        if key is not None:
            self._write(path, key, digest, bytes(module.serialize()))
        return module

    def _read(self, engine: wasmtime.Engine, key: bytes, digest: bytes, path: Path) -> wasmtime.Module | None:
        data = trusted_file(path)
        header = len(_MAGIC) + _MAC
        if data is None or len(data) <= header or not data.startswith(_MAGIC):
            return None
        mac, payload = data[len(_MAGIC) : header], data[header:]
        if not hmac.compare_digest(mac, self._mac(key, digest, payload)):
            return None  # corrupt, or not made here for these bytes: never hand it to wasmtime
        try:
            return wasmtime.Module.deserialize(engine, payload)
        except wasmtime.WasmtimeError:
            return None  # written by an incompatible build: recompile

    def _write(self, path: Path, key: bytes, digest: bytes, payload: bytes) -> None:
        try:
            fd, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")  # 0600
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(_MAGIC + self._mac(key, digest, payload) + payload)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except OSError:
            return  # a read-only or full disk only costs the next start a compile
