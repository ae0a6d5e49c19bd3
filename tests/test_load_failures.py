"""A guest that fails to load says why: its own init log lines and WASI output go with the
error (and with ``twistd``'s exit message), and WAT syntax errors keep their position."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Guest, GuestLoadError
from twisted_httpwasm.service.guest_loader import GuestLoader
from twisted_httpwasm.service.tap import Options

from .support import EXAMPLES, TempFilesMixin
from .test_twistd import TwistdTestCase

AUTH = str(EXAMPLES / "auth.wat")
AUTH_REASON = "the guest config must be user:password"

#: _start writes a line to stderr (LENGTH: 15 hex with its newline, 14 without), then exits with code 3.
WASI_COMPLAINING = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\\10\\00\\00\\00\\LENGTH\\00\\00\\00")
  (data (i32.const 16) "missing DATABASE_URL\\n")
  (func (export "_start")
    (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 64)))
    (call $proc_exit (i32.const 3)))
  (func (export "handle_request") (result i64) (i64.const 0))
  (func (export "handle_response") (param i32 i32)))"""

#: Line 3, column 28 is not an instruction.
BAD_WAT = "(module\n  (func $f\n    (i32.add (i32.const 1) oops)))\n"


class GuestLoadErrorTests(TempFilesMixin, SynchronousTestCase):
    def test_init_log_lines_go_with_the_error(self) -> None:
        """examples/auth.wat without a config logs why, then traps: the error carries that line."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(AUTH, cache=False)
        self.assertIn("failed to initialise", str(caught.exception))
        self.assertEqual(len(caught.exception.log_lines), 1, caught.exception.log_lines)
        self.assertTrue(caught.exception.log_lines[0].startswith("[guest auth] "))
        self.assertIn(AUTH_REASON, caught.exception.log_lines[0])

    def test_wasi_output_during_init_goes_with_the_error(self) -> None:
        """What ``_start`` wrote to stderr before ``proc_exit(3)`` is in the error's log lines."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(WASI_COMPLAINING.replace("LENGTH", "15").encode(), name="complaining", cache=False)
        self.assertIn("code 3", str(caught.exception))
        self.assertEqual(caught.exception.log_lines, ("[guest complaining] [stderr] missing DATABASE_URL",))

    def test_last_wasi_line_without_newline_goes_with_the_error(self) -> None:
        """A last stderr line that the guest did not end before exiting is not held back."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(WASI_COMPLAINING.replace("LENGTH", "14").encode(), name="complaining", cache=False)
        self.assertEqual(caught.exception.log_lines, ("[guest complaining] [stderr] missing DATABASE_URL",))

    def test_a_guest_that_loads_fine_raises_nothing_with_its_lines(self) -> None:
        """The same auth guest with a valid config loads (the lines are only for failures)."""
        Guest(AUTH, config=b"alice:secret", cache=False)

    def test_wat_syntax_error_in_a_file_keeps_file_line_and_column(self) -> None:
        """A WAT file with a syntax error: the message names file:line:column and shows the line."""
        path = self.mktemp() + ".wat"
        Path(path).write_text(BAD_WAT)
        with self.assertRaises(GuestLoadError) as caught:
            Guest(path, cache=False)
        message = str(caught.exception)
        self.assertIn(f"unknown operator or unexpected token at {path}:3:28", message)
        self.assertIn("(i32.add (i32.const 1) oops)))", message)

    def test_wat_syntax_error_in_bytes_keeps_line_and_column(self) -> None:
        """WAT given as bytes: line and column, and the offending line."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(BAD_WAT.encode(), cache=False)
        message = str(caught.exception)
        self.assertIn("at line 3, column 28", message)
        self.assertIn("(i32.add (i32.const 1) oops)))", message)

    def test_tap_exit_message_includes_what_the_guest_logged(self) -> None:
        """``twistd httpwasm``'s exit message names the guest, the reason, and the guest's own lines."""
        config = Options()
        config.parseOptions(["--guest", AUTH, "--path", "."])
        with self.assertRaises(SystemExit) as caught:
            GuestLoader.from_config(config.config()).at_startup()
        message = str(caught.exception.code)
        self.assertIn(f"--guest {AUTH}: guest 'auth' failed to initialise", message)
        self.assertIn("the guest logged:", message)
        self.assertIn(AUTH_REASON, message)


class TwistdLoadFailureTests(TwistdTestCase):
    @inlineCallbacks
    def test_guest_reason_is_printed_before_exit(self) -> Generator[Any, Any, None]:
        """``twistd -n httpwasm --guest examples/auth.wat --path DIR`` (no config): the guest's own
        explanation is on twistd's output, and the exit status is non-zero."""
        directory = Path(self.mktemp())
        directory.mkdir()
        status, output = yield self.exit_status("--guest", AUTH, "--path", str(directory))
        self.assertNotEqual(status, 0, output)
        self.assertIn("_initialize failed", output)
        self.assertIn(AUTH_REASON, output)
        self.assertNotIn("Traceback", output)
