"""Loading a guest: sources, checks with clear refusals, and initialisation of each instance."""

from __future__ import annotations

import os
from collections.abc import Sequence

import wasmtime
from twisted.logger import LogLevel as TwistedLogLevel
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Guest
from twisted_httpwasm.runtime.guest import GuestLoadError

from .support import IMPORTS, NOOP_RESPONSE, LogCapture, module, request_state

HANDLE_REQUEST = '(func (export "handle_request") (result i64) (i64.const 0))'
MINIMAL = f'(module (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE})'

#: A WASI command: ``_start`` writes a line to stdout (iovec at 0 -> 13 bytes at 16), then exits.
WASI_COMMAND = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\\10\\00\\00\\00\\0d\\00\\00\\00")
  (data (i32.const 16) "hello, world\\n")
  (func (export "_start")
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 64)))
    (call $proc_exit (i32.const EXIT_CODE)))
  (func (export "handle_request") (result i64) (i64.const 0))
  (func (export "handle_response") (param i32 i32)))"""


def counting_init(*names: str) -> str:
    """A guest whose init exports ``names`` each add 1 to the i32 at ``4 * index``."""
    functions = [
        f'(func (export "{name}") (i32.store (i32.const {4 * index}) (i32.add (i32.load (i32.const {4 * index}))'
        " (i32.const 1))))"
        for index, name in enumerate(names)
    ]
    return f'(module (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE} {" ".join(functions)})'


_RECORDED = ("_start", "_initialize")


def recording_init(names: Sequence[str], exit_start: int | None = None) -> str:
    """A guest exporting ``names`` (in that order), each appending its number (1: ``_start``, 2: ``_initialize``)
    to a list at address 4; with ``exit_start``, ``_start`` then calls ``proc_exit(exit_start)``.

    ``handle_request`` passes the request on.
    """
    functions = []
    for name in names:
        exit_call = f"(call $proc_exit (i32.const {exit_start}))" if name == "_start" and exit_start is not None else ""
        functions.append(
            f'(func (export "{name}")'
            " (i32.store (i32.add (i32.const 4) (i32.mul (i32.load (i32.const 0)) (i32.const 4)))"
            f" (i32.const {_RECORDED.index(name) + 1}))"
            f" (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1))) {exit_call})"
        )
    return (
        '(module (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))'
        ' (memory (export "memory") 1) (func (export "handle_request") (result i64) (i64.const 1))'
        f" {NOOP_RESPONSE} {' '.join(functions)})"
    )


def recorded(guest: Guest) -> list[str]:
    """The init functions a fresh instance of a :func:`recording_init` guest ran, in order."""
    count = counters(guest, 1)[0]
    return [_RECORDED[number - 1] for number in counters(guest, 1 + count)[1:]]


def counters(guest: Guest, count: int) -> list[int]:
    instance = guest.pool.acquire()
    try:
        data = instance.memory.read(0, 4 * count)
    finally:
        guest.pool.release(instance)
    return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)]


class SourceTests(SynchronousTestCase):
    def test_from_wat_bytes(self) -> None:
        """WAT source as bytes loads; the guest is named ``guest``."""
        guest = Guest(MINIMAL.encode())
        self.assertEqual(guest.name, "guest")
        self.assertEqual(guest.pool.acquire().handle_request(request_state()).next, False)

    def test_from_wasm_bytes(self) -> None:
        """A binary module as bytes loads."""
        guest = Guest(wasmtime.wat2wasm(MINIMAL))
        self.assertFalse(guest.uses_wasi)

    def test_from_wat_path(self) -> None:
        """A ``.wat`` file loads; the guest is named after the file."""
        path = self.mktemp() + ".wat"
        with open(path, "w") as f:
            f.write(MINIMAL)
        self.assertEqual(Guest(path).name, os.path.basename(path)[: -len(".wat")])

    def test_from_wasm_path(self) -> None:
        """A ``.wasm`` file (here compiled from WAT at test time) loads."""
        path = self.mktemp() + ".wasm"
        with open(path, "wb") as f:
            f.write(wasmtime.wat2wasm(MINIMAL))
        guest = Guest(path, name="compiled")
        self.assertEqual(guest.name, "compiled")
        self.assertEqual(guest.pool.acquire().handle_request(request_state()).next, False)

    def test_unreadable_path_is_refused(self) -> None:
        """A missing file is refused, naming the path and the reason."""
        path = self.mktemp() + ".wasm"
        with self.assertRaises(GuestLoadError) as caught:
            Guest(path)
        self.assertIn(f"cannot read guest {path!r}", str(caught.exception))
        self.assertIn("No such file", str(caught.exception))

    def test_invalid_wat_is_refused(self) -> None:
        """Text that is not WAT is refused as neither binary nor WAT."""
        for source in (b"(module (func $f (result i32)))x", b"not wasm at all", b"\xff\xfe"):
            with self.assertRaises(GuestLoadError) as caught:
                Guest(source)
            self.assertIn("neither a wasm binary nor valid WAT", str(caught.exception))

    def test_invalid_binary_is_refused(self) -> None:
        """A binary that does not validate is refused as not compiling."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(b"\0asm\x01\0\0\0\x01\xff")
        self.assertIn("does not compile", str(caught.exception))

    def test_module_that_does_not_validate_is_refused(self) -> None:
        """Well-formed WAT with a type error is refused."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(module(NOOP_RESPONSE, '(func (export "handle_request") (result i64) (i32.const 0))'))
        self.assertIn("guest 'guest'", str(caught.exception))


class RefusedGuestTests(SynchronousTestCase):
    """Broken guests are refused when loaded, with a message that names what is wrong."""

    def assertRefused(self, source: str, *words: str) -> None:
        with self.assertRaises(GuestLoadError) as caught:
            Guest(source.encode())
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_missing_memory(self) -> None:
        """No exported ``memory``."""
        self.assertRefused(f"(module {HANDLE_REQUEST} {NOOP_RESPONSE})", "does not export a memory named 'memory'")

    def test_memory_name_used_for_something_else(self) -> None:
        """An export named ``memory`` that is not a memory."""
        self.assertRefused(
            f'(module (global (export "memory") i32 (i32.const 0)) (memory 1) {HANDLE_REQUEST} {NOOP_RESPONSE})',
            "does not export a memory named 'memory'",
        )

    def test_missing_handle_request(self) -> None:
        """No ``handle_request``."""
        self.assertRefused(
            f'(module (memory (export "memory") 1) {NOOP_RESPONSE})', "does not export handle_request () -> (i64)"
        )

    def test_missing_handle_response(self) -> None:
        """No ``handle_response``."""
        self.assertRefused(
            f'(module (memory (export "memory") 1) {HANDLE_REQUEST})',
            "does not export handle_response (i32 i32) -> ()",
        )

    def test_handle_request_with_the_wrong_signature(self) -> None:
        """``handle_request`` returning i32, or taking a parameter."""
        for wrong, got in (
            ("(result i32) (i32.const 1)", "() -> (i32)"),
            ("(param i32) (result i64) (i64.const 1)", "(i32) -> (i64)"),
        ):
            self.assertRefused(
                f'(module (memory (export "memory") 1) (func (export "handle_request") {wrong}) {NOOP_RESPONSE})',
                f"exports handle_request as {got}; the ABI says () -> (i64)",
            )

    def test_handle_response_with_the_wrong_signature(self) -> None:
        """``handle_response`` without its two i32 parameters."""
        self.assertRefused(
            f'(module (memory (export "memory") 1) {HANDLE_REQUEST} (func (export "handle_response") (param i32)))',
            "exports handle_response as (i32) -> (); the ABI says (i32 i32) -> ()",
        )

    def test_handle_request_that_is_not_a_function(self) -> None:
        """``handle_request`` exported as a global."""
        self.assertRefused(
            '(module (memory (export "memory") 1) (global (export "handle_request") i64 (i64.const 0))'
            f" {NOOP_RESPONSE})",
            "exports handle_request as GlobalType",
        )

    def test_init_function_with_the_wrong_signature(self) -> None:
        """``_start`` or ``_initialize`` that is not ``() -> ()``."""
        for name in ("_start", "_initialize"):
            self.assertRefused(
                f'(module (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE}'
                f' (func (export "{name}") (param i32)))',
                f"exports {name} with the wrong type",
            )

    def test_unknown_import_module(self) -> None:
        """Imports from a module other than ``http_handler`` and WASI."""
        self.assertRefused(
            f'(module (import "env" "abort" (func)) (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE})',
            "imports env.abort, which this host does not provide",
        )

    def test_unknown_http_handler_function(self) -> None:
        """An ``http_handler`` import that the ABI does not define."""
        self.assertRefused(
            '(module (import "http_handler" "get_body" (func (param i32 i32) (result i32)))'
            f' (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE})',
            "imports http_handler.get_body, which is not an http_handler function",
        )

    def test_wrong_import_signature(self) -> None:
        """An ``http_handler`` import with another type than the ABI's."""
        for wrong, got, want in (
            ("(param i32) (result i32)", "(i32) -> (i32)", "(i32 i32) -> (i32)"),
            ("(param i32 i32) (result i64)", "(i32 i32) -> (i64)", "(i32 i32) -> (i32)"),
            ("(param i32 i32)", "(i32 i32) -> ()", "(i32 i32) -> (i32)"),
        ):
            self.assertRefused(
                f'(module (import "http_handler" "get_uri" (func {wrong}))'
                f' (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE})',
                f"imports http_handler.get_uri as {got}; the ABI says {want}",
            )

    def test_imported_memory(self) -> None:
        """A guest that imports its memory instead of exporting it."""
        self.assertRefused(
            f'(module (import "env" "memory" (memory 1)) {HANDLE_REQUEST} {NOOP_RESPONSE})', "env.memory"
        )

    def test_trap_in_start(self) -> None:
        """``_start`` reaching ``unreachable`` refuses the guest, naming ``_start``."""
        self.assertRefused(
            f'(module (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE}'
            ' (func (export "_start") unreachable))',
            "failed to initialise",
            "_start failed",
            "unreachable",
        )

    def test_memory_over_the_limit(self) -> None:
        """A guest whose initial memory exceeds ``memory_limit`` is refused."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(module(HANDLE_REQUEST, NOOP_RESPONSE, memory_pages=4), memory_limit=2 * 65536)
        self.assertIn("failed to initialise", str(caught.exception))

    def test_extra_exports_are_ignored(self) -> None:
        """Exports the ABI does not name (``__heap_base``, helper functions) do not matter."""
        Guest(
            (
                f'(module (memory (export "memory") 1) {HANDLE_REQUEST} {NOOP_RESPONSE}'
                ' (global (export "__heap_base") i32 (i32.const 1024)) (func (export "helper")))'
            ).encode()
        )

    def test_every_http_handler_import_is_accepted(self) -> None:
        """A guest importing the whole ABI, with the ABI's types, loads."""
        self.assertIn("get_source_addr", IMPORTS)
        Guest(module(HANDLE_REQUEST, NOOP_RESPONSE))


class InitTests(SynchronousTestCase):
    def test_start_runs_once_per_instance(self) -> None:
        """``_start`` runs when an instance is made, never again for its requests."""
        guest = Guest(counting_init("_start").encode())
        instance = guest.pool.acquire()
        for _ in range(3):
            instance.handle_request(request_state())
        self.assertEqual(instance.memory.read(0, 4), (1).to_bytes(4, "little"))
        other = guest.pool.acquire()
        self.assertIsNot(other, instance)
        self.assertEqual(other.memory.read(0, 4), (1).to_bytes(4, "little"))

    def test_start_then_initialize(self) -> None:
        """A guest exporting both runs ``_start``, then ``_initialize`` (as Traefik does), once each."""
        for names in (("_initialize", "_start"), ("_start", "_initialize")):
            guest = Guest(recording_init(names).encode())
            self.assertEqual(recorded(guest), ["_start", "_initialize"], names)

    def test_initialize_only(self) -> None:
        """A reactor (Go wasmexport, wasi-libc reactors) exports ``_initialize`` only: it runs, and the guest loads."""
        self.assertEqual(recorded(Guest(recording_init(["_initialize"]).encode())), ["_initialize"])

    def test_proc_exit_zero_ends_start_cleanly_and_initialize_still_runs(self) -> None:
        """``proc_exit(0)`` at the end of ``_start`` (TinyGo 0.35+) ends it cleanly: ``_initialize`` runs after it,
        and the instance serves requests."""
        guest = Guest(recording_init(["_start", "_initialize"], exit_start=0).encode())
        self.assertEqual(recorded(guest), ["_start", "_initialize"])
        instance = guest.pool.acquire()
        self.assertEqual(instance.handle_request(request_state()).next, True)
        self.assertEqual(instance.handle_request(request_state()).next, True)
        guest.pool.release(instance)

    def test_proc_exit_nonzero_in_start_is_a_load_failure_and_initialize_does_not_run(self) -> None:
        """``proc_exit(3)`` in ``_start``: the guest is refused, naming ``_start`` and the code."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(recording_init(["_start", "_initialize"], exit_start=3).encode())
        self.assertIn("_start failed", str(caught.exception))
        self.assertIn("code 3", str(caught.exception))

    def test_no_init_function(self) -> None:
        """Neither export: the instance is used as instantiated."""
        self.assertEqual(counters(Guest(counting_init("other").encode()), 1), [0])


class WasiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCapture(self, "command")

    def test_wasi_command_exiting_zero_loads_and_logs_its_output(self) -> None:
        """``_start`` that prints and ends with ``proc_exit(0)`` initialises fine; its stdout goes to the log."""
        guest = Guest(WASI_COMMAND.replace("EXIT_CODE", "0").encode(), name="command")
        self.addCleanup(guest.pool.clear)
        self.assertTrue(guest.uses_wasi)
        instance = guest.pool.acquire()
        self.assertEqual(instance.handle_request(request_state()).next, False)
        guest.pool.release(instance)
        self.assertIn((TwistedLogLevel.info, "[guest command] [stdout] hello, world"), self.log.messages())

    def test_wasi_command_exiting_nonzero_is_refused(self) -> None:
        """``proc_exit(1)`` in ``_start`` refuses the guest, with the exit code."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(WASI_COMMAND.replace("EXIT_CODE", "1").encode())
        self.assertIn("failed to initialise", str(caught.exception))
        self.assertIn("code 1", str(caught.exception))
        # The guest's own explanation (what it wrote before exiting) goes with the refusal.
        self.assertTrue(any("hello, world" in line for line in caught.exception.log_lines), caught.exception.log_lines)

    def test_wasi_reactor_with_initialize_only_loads(self) -> None:
        """A WASI reactor exports ``_initialize`` and no ``_start``: it loads, its output goes to the log."""
        reactor = WASI_COMMAND.replace('"_start"', '"_initialize"').replace(
            "(call $proc_exit (i32.const EXIT_CODE))", ""
        )
        guest = Guest(reactor.encode(), name="command")
        self.addCleanup(guest.pool.clear)
        instance = guest.pool.acquire()
        self.assertEqual(instance.handle_request(request_state()).next, False)
        guest.pool.release(instance)
        self.assertIn((TwistedLogLevel.info, "[guest command] [stdout] hello, world"), self.log.messages())
