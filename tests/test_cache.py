"""The on-disk cache of compiled guests: hits, misses, never trusting a bad entry, and who may write it."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twisted_httpwasm import Guest
from twisted_httpwasm.runtime import cache as cache_module
from twisted_httpwasm.runtime.cache import CompileCache, default_cache_dir
from twisted_httpwasm.runtime.engine import ENGINE_SETTINGS, shared_engine
from twisted_httpwasm.runtime.state import RequestState

from .support import module, request_state
from .test_reload import version_guest
from .test_twistd import TwistdTestCase

#: Another guest: req_ctx 9 instead of 7.
OTHER_GUEST = module(
    '(func (export "handle_request") (result i64) (i64.const 0x0000000900000001))',
    '(func (export "handle_response") (param i32 i32))',
)

GUEST = module(
    '(func (export "handle_request") (result i64) (i64.const 0x0000000700000001))',
    '(func (export "handle_response") (param i32 i32))',
)


def wasm() -> bytes:
    import wasmtime

    return bytes(wasmtime.wat2wasm(GUEST.decode()))


def works(guest: Guest, state: RequestState | None = None) -> bool:
    instance = guest.pool.acquire()
    try:
        return instance.handle_request(state or request_state()).req_ctx == 7
    finally:
        guest.pool.release(instance)


class CompileCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())

    def entries(self) -> list[Path]:
        return sorted(self.directory.glob("*.cwasm"))

    def test_second_load_is_a_hit(self):
        """The first load compiles and stores; the second loads the stored code, which works."""
        first = Guest(GUEST, cache=self.directory)
        self.assertEqual((first.compile_cache.hits, first.compile_cache.misses), (0, 1))  # type: ignore[union-attr]
        self.assertEqual(len(self.entries()), 1)
        second = Guest(GUEST, cache=self.directory)
        self.assertEqual((second.compile_cache.hits, second.compile_cache.misses), (1, 0))  # type: ignore[union-attr]
        self.assertTrue(works(second))

    def test_corrupt_entry_is_recompiled_and_replaced(self):
        """A flipped byte fails the checksum: the entry is never handed to wasmtime, and is rewritten."""
        Guest(GUEST, cache=self.directory)
        (entry,) = self.entries()
        data = bytearray(entry.read_bytes())
        data[-10] ^= 0xFF
        entry.write_bytes(bytes(data))
        guest = Guest(GUEST, cache=self.directory)
        self.assertEqual(guest.compile_cache.misses, 1)  # type: ignore[union-attr]
        self.assertTrue(works(guest))
        self.assertNotEqual(entry.read_bytes(), bytes(data))
        self.assertEqual(Guest(GUEST, cache=self.directory).compile_cache.hits, 1)  # type: ignore[union-attr]

    def test_truncated_or_foreign_entries_are_ignored(self):
        """An empty file, a truncated one and one without the header are all misses."""
        Guest(GUEST, cache=self.directory)
        (entry,) = self.entries()
        whole = entry.read_bytes()
        for bad in (b"", whole[: len(whole) // 2], b"\0asm" + whole[40:]):
            entry.write_bytes(bad)
            guest = Guest(GUEST, cache=self.directory)
            self.assertEqual(guest.compile_cache.misses, 1, bad[:8])  # type: ignore[union-attr]
            self.assertTrue(works(guest))

    def test_key_covers_engine_settings(self):
        """The same guest under other engine settings is a different entry."""
        engine = shared_engine()
        CompileCache(self.directory, ENGINE_SETTINGS).load(engine, wasm())
        CompileCache(self.directory, ENGINE_SETTINGS + ";other").load(engine, wasm())
        self.assertEqual(len(self.entries()), 2)

    def test_unwritable_directory_only_costs_a_compile(self):
        """A cache directory that cannot be created does not stop the guest from loading."""
        blocker = Path(self.mktemp())
        blocker.write_bytes(b"a file, not a directory")
        guest = Guest(GUEST, cache=blocker / "cache")
        self.assertTrue(works(guest))

    def test_cache_false_uses_no_directory(self):
        guest = Guest(GUEST, cache=False)
        self.assertIsNone(guest.compile_cache)
        self.assertTrue(works(guest))

    def test_default_directory_follows_the_environment(self):
        self.patch(os, "environ", {"TWISTED_HTTPWASM_CACHE": "/x/y"})
        self.assertEqual(default_cache_dir(), Path("/x/y"))
        self.patch(os, "environ", {"XDG_CACHE_HOME": "/c"})
        self.assertEqual(default_cache_dir(), Path("/c/twisted-httpwasm"))


def req_ctx(guest: Guest) -> int:
    instance = guest.pool.acquire()
    try:
        return instance.handle_request(request_state()).req_ctx
    finally:
        guest.pool.release(instance)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class CacheTrustTests(SynchronousTestCase):
    """Only this user's private directory and entries are used, and an entry only for the guest it was made for."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).resolve()
        self.warnings: list[str] = []
        self.patch(cache_module, "_log", Logger(namespace="httpwasm", observer=self.record))
        self.patch(cache_module, "_warned", set())

    def record(self, event: dict[str, Any]) -> None:
        self.warnings.append(formatEvent(event))

    def entries(self) -> list[Path]:
        return sorted(self.directory.glob("*.cwasm"))

    def umask(self, value: int) -> None:
        previous = os.umask(value)
        self.addCleanup(os.umask, previous)

    def test_created_private_whatever_the_umask(self) -> None:
        """With umask 000 the cache directory is 0700, its key and entries 0600."""
        self.umask(0)
        Guest(GUEST, cache=self.directory)
        self.assertEqual(mode(self.directory), 0o700)
        self.assertEqual(mode(self.directory / "key"), 0o600)
        (entry,) = self.entries()
        self.assertEqual(mode(entry), 0o600)

    def test_entry_of_another_guest_under_a_pinned_guests_key_is_not_run(self) -> None:
        """A well-formed entry compiled for another guest, written under this guest's file name, is not handed to
        wasmtime: the pinned guest's own code runs (it is recompiled, and its entry rewritten)."""
        Guest(GUEST, cache=self.directory)
        (own,) = self.entries()
        Guest(OTHER_GUEST, cache=self.directory)
        (other,) = [entry for entry in self.entries() if entry != own]
        shutil.copyfile(other, own)
        digest = hashlib.sha256(GUEST).hexdigest()
        guest = Guest(GUEST, cache=self.directory, sha256=digest)
        self.assertEqual(req_ctx(guest), 7)
        self.assertEqual((guest.compile_cache.hits, guest.compile_cache.misses), (0, 1))  # type: ignore[union-attr]
        self.assertNotEqual(own.read_bytes(), other.read_bytes())

    def test_entry_made_under_another_key_is_not_run(self) -> None:
        """An entry from another cache (another host or user: another key) is a miss, however well-formed."""
        Guest(GUEST, cache=self.directory)
        (entry,) = self.entries()
        elsewhere = Path(self.mktemp())
        guest = Guest(GUEST, cache=elsewhere)
        (foreign,) = sorted(elsewhere.glob("*.cwasm"))
        self.assertEqual(foreign.name, entry.name)
        shutil.copyfile(foreign, entry)
        guest = Guest(GUEST, cache=self.directory)
        self.assertEqual(guest.compile_cache.misses, 1)  # type: ignore[union-attr]
        self.assertTrue(works(guest))

    def test_directory_writable_by_others_is_not_used(self) -> None:
        """A cache directory that its group or others may write is not used (no entry read or written), with one
        warning saying why."""
        Guest(GUEST, cache=self.directory)
        os.chmod(self.directory, 0o777)
        for _ in range(2):
            guest = Guest(GUEST, cache=self.directory)
            self.assertEqual((guest.compile_cache.hits, guest.compile_cache.misses), (0, 1))  # type: ignore[union-attr]
            self.assertTrue(works(guest))
        self.assertEqual(
            self.warnings,
            [f"httpwasm: cache directory {self.directory} is writable by its group or by others (mode 0777): not used"],
        )

    def test_entry_writable_by_others_is_not_used(self) -> None:
        """An entry that its group may write is not used, with one warning; the guest is compiled instead."""
        Guest(GUEST, cache=self.directory)
        (entry,) = self.entries()
        os.chmod(entry, 0o620)
        guest = Guest(GUEST, cache=self.directory)
        self.assertEqual(guest.compile_cache.misses, 1)  # type: ignore[union-attr]
        self.assertTrue(works(guest))
        self.assertEqual(
            self.warnings,
            [f"httpwasm: cache entry {entry} is writable by its group or by others (mode 0620): not used"],
        )

    def test_key_readable_by_others_is_not_used(self) -> None:
        """A key that others may read could sign entries: the cache is not used."""
        Guest(GUEST, cache=self.directory)
        os.chmod(self.directory / "key", 0o644)
        guest = Guest(GUEST, cache=self.directory)
        self.assertEqual(guest.compile_cache.misses, 1)  # type: ignore[union-attr]
        self.assertIn("is readable by its group or by others (mode 0644)", self.warnings[0])

    def test_directory_or_entry_of_another_user_is_not_used(self) -> None:
        """A directory or an entry owned by another user is not used, with a warning naming the owner."""
        if os.geteuid() != 0:
            raise SkipTest("changing a file's owner needs root")
        Guest(GUEST, cache=self.directory)
        (entry,) = self.entries()
        os.chown(entry, 65534, -1)
        guest = Guest(GUEST, cache=self.directory)
        self.assertEqual(guest.compile_cache.misses, 1)  # type: ignore[union-attr]
        os.chown(self.directory, 65534, -1)
        guest = Guest(GUEST, cache=self.directory)
        self.assertEqual(guest.compile_cache.misses, 1)  # type: ignore[union-attr]
        self.assertEqual(
            self.warnings,
            [
                f"httpwasm: cache entry {entry} is owned by uid 65534, not by this server's user (uid 0): not used",
                f"httpwasm: cache directory {self.directory} is owned by uid 65534, not by this server's user (uid 0):"
                " not used",
            ],
        )


class TwistdForgedEntryTests(TwistdTestCase):
    @inlineCallbacks
    def test_pinned_guest_runs_its_own_code_despite_a_forged_entry(self) -> Generator[Any, Any, None]:
        """twistd --guest A --guest-sha256 A's digest, with a well-formed compiled entry of guest B written under
        A's cache file name: A's behaviour is served (x-version 1), not B's."""
        directory = Path(self.mktemp())
        mine, other = self.guest_file(version_guest(1)), self.guest_file(version_guest(2))
        Guest(mine, cache=directory)
        (own,) = sorted(directory.glob("*.cwasm"))
        Guest(other, cache=directory)
        (foreign,) = [entry for entry in sorted(directory.glob("*.cwasm")) if entry != own]
        shutil.copyfile(foreign, own)
        previous = os.environ.get("TWISTED_HTTPWASM_CACHE")
        os.environ["TWISTED_HTTPWASM_CACHE"] = str(directory)  # twistd's compile cache
        try:
            url = yield self.start_server(
                "--guest", mine, "--guest-sha256", hashlib.sha256(Path(mine).read_bytes()).hexdigest(),
                "--class", "tests.test_twistd.Hello",
            )  # fmt: skip
        finally:
            if previous is None:
                del os.environ["TWISTED_HTTPWASM_CACHE"]
            else:
                os.environ["TWISTED_HTTPWASM_CACHE"] = previous
        _, headers, _ = yield self.fetch("GET", url + "/")
        self.assertEqual(headers.getRawHeaders("x-version"), ["1"])
