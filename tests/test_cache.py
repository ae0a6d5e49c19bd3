"""The on-disk cache of compiled guests: hits, misses, and never trusting a bad entry."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Guest
from twisted_httpwasm.runtime.cache import CompileCache, default_cache_dir
from twisted_httpwasm.runtime.engine import ENGINE_SETTINGS, shared_engine
from twisted_httpwasm.runtime.state import RequestState

from .support import module, request_state

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
