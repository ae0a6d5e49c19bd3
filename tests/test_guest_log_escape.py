"""A guest's log text cannot forge log lines: every line separator and control character is escaped.

A guest logs one message per separator (CR, LF, NEL U+0085, U+2028, U+2029,
VT, FF, the C0 file separator, ESC, the C1 CSI, NUL, TAB, DEL), each followed by
text that would read as a line of its own.  In the text log of a real
``twistd``, read with ``str.splitlines`` (which splits on all of them), each
message is one line, escaped; in the JSON log each message is one JSON line
that decodes back to the text the guest wrote.
"""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.runtime.calllog import escape_log_text

from .support import NOOP_RESPONSE, poll
from .test_twistd import DEADLINE, TwistdTestCase

#: (name, separator as UTF-8 bytes, its escape in the text log)
SEPARATORS = [
    ("cr", b"\r", "\\r"),
    ("lf", b"\n", "\\n"),
    ("nel", "\u0085".encode(), "\\x85"),
    ("ls", "\u2028".encode(), "\\u2028"),
    ("ps", "\u2029".encode(), "\\u2029"),
    ("vt", b"\x0b", "\\x0b"),
    ("ff", b"\x0c", "\\x0c"),
    ("fs", b"\x1c", "\\x1c"),
    ("esc", b"\x1b", "\\x1b"),
    ("csi", "\u009b".encode(), "\\x9b"),
    ("nul", b"\x00", "\\x00"),
    ("tab", b"\t", "\\t"),
    ("del", b"\x7f", "\\x7f"),
]
FORGED = b"2026-01-01T00:00:00+0000 [httpwasm#info] forged line"


def message(name: str, separator: bytes) -> bytes:
    return b"sep-" + name.encode() + b":" + separator + FORGED


def _wat_bytes(data: bytes) -> str:
    return "".join(f"\\{byte:02x}" for byte in data)


def separator_guest() -> str:
    """Logs each message of SEPARATORS at info in handle_request, then passes the request on."""
    data, calls, offset = [], [], 0
    for name, separator, _ in SEPARATORS:
        text = message(name, separator)
        data.append(f'  (data (i32.const {offset}) "{_wat_bytes(text)}")')
        calls.append(f"    (call $log (i32.const 0) (i32.const {offset}) (i32.const {len(text)}))")
        offset += len(text) + 8
    return (
        "\n".join(data)
        + '\n  (func (export "handle_request") (result i64)\n'
        + "\n".join(calls)
        + "\n    (i64.const 1))\n"
        + NOOP_RESPONSE
    )


#: What a WASI guest writes to stdout in handle_request: one line (up to its LF) holding a CR and a U+2028.
WASI_TEXT = b"sep-wasi:\r\xe2\x80\xa8" + FORGED + b"\n"


def wasi_guest() -> str:
    """A WASI guest that writes WASI_TEXT to stdout in handle_request, then passes the request on."""
    iovec = (16).to_bytes(4, "little") + len(WASI_TEXT).to_bytes(4, "little")
    return f"""(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{_wat_bytes(iovec)}")
  (data (i32.const 16) "{_wat_bytes(WASI_TEXT)}")
  (func (export "handle_request") (result i64)
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 1024)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)))"""


class EscapeUnitTests(SynchronousTestCase):
    def test_each_separator_is_escaped_and_printable_text_is_kept(self) -> None:
        for name, separator, escaped in SEPARATORS:
            text = message(name, separator).decode()
            self.assertEqual(escape_log_text(text), f"sep-{name}:{escaped}{FORGED.decode()}")
            self.assertEqual(len(escape_log_text(text).splitlines()), 1, name)
        kept = "plain text, é ü 漢字 \\ back\\slash"
        self.assertIs(escape_log_text(kept), kept)


class TwistdGuestLogTests(TwistdTestCase):
    timeout = 90

    @inlineCallbacks
    def logged(self, *options: str) -> Generator[Any, Any, str]:
        """Serve the separator guest with ``options``, make one request; the server's log once it has the lines."""
        url = yield self.start_server(
            *options, "--guest", self.guest_file(separator_guest()), "--class", "tests.test_twistd.Hello"
        )
        status, _, _ = yield self.fetch("GET", url + "/x")
        self.assertEqual(status, 200)
        if not (yield poll(lambda: "sep-del:" in self.server.output(), DEADLINE)):
            self.fail(self.server.output())
        return self.server.output()

    @inlineCallbacks
    def test_text_log_escapes_every_separator(self) -> Generator[Any, Any, None]:
        output = yield self.logged()
        lines = output.splitlines()
        for name, _, escaped in SEPARATORS:
            (line,) = [line for line in lines if f"sep-{name}:" in line]
            self.assertTrue(line.endswith(f"] sep-{name}:{escaped}{FORGED.decode()}"), (name, line))
        # No line starts with the forged text: each message stayed on its own line.
        self.assertEqual([line for line in lines if "forged line" in line and "sep-" not in line], [])

    @inlineCallbacks
    def test_wasi_output_is_escaped_too(self) -> Generator[Any, Any, None]:
        """A line a WASI guest writes to stdout is split on LF only; its other separators are escaped."""
        path = self.mktemp() + ".wat"
        Path(path).write_text(wasi_guest())
        url = yield self.start_server("--guest", path, "--class", "tests.test_twistd.Hello")
        status, _, _ = yield self.fetch("GET", url + "/x")
        self.assertEqual(status, 200)
        if not (yield poll(lambda: "sep-wasi:" in self.server.output(), DEADLINE)):
            self.fail(self.server.output())
        (line,) = [line for line in self.server.output().splitlines() if "sep-wasi:" in line]
        self.assertTrue(line.endswith("[stdout] sep-wasi:\\r\\u2028" + FORGED.decode()), line)

    @inlineCallbacks
    def test_json_log_keeps_the_text_escaped_by_json(self) -> Generator[Any, Any, None]:
        output = yield self.logged("--log-format", "json")
        records = [json.loads(line) for line in output.splitlines() if line.strip()]  # every line is one record
        texts = {record["text"] for record in records if "sep-" in record.get("text", "")}
        expected = {
            f"[guest {records_guest(records)}] " + message(name, separator).decode()
            for name, separator, _ in SEPARATORS
        }
        self.assertEqual(texts, expected)


def records_guest(records: list[dict[str, Any]]) -> str:
    (guest,) = {record["guest"] for record in records if "sep-" in record.get("text", "") and "guest" in record}
    return str(guest)
