"""``python -m twisted_httpwasm check``: one run says whether a guest can run here, and why not."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.testing.check import main

from .support import EXAMPLES, ROOT, TempFilesMixin, module

#: A guest built for another host: a streams-style http_handler function, and a module nobody offers here.
FOREIGN = b"""(module
  (import "http_handler" "streams_read" (func (param i32 i32) (result i32)))
  (import "env" "abort" (func))
  (memory (export "memory") 1)
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32)))"""


def run(*argv: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    status = main(list(argv), out)
    return status, out.getvalue().splitlines()


class CheckTests(TempFilesMixin, SynchronousTestCase):
    def file(self, data: bytes, suffix: str = ".wat") -> str:
        path = self.mktemp() + suffix
        Path(path).write_bytes(data)
        return path

    def test_a_guest_that_runs(self) -> None:
        status, lines = run(str(EXAMPLES / "redact.wat"))
        self.assertEqual(status, 0, lines)
        self.assertEqual(lines[-1], "OK: guest redact can run here")
        text = "\n".join(lines)
        self.assertIn("http_handler.read_body", text)
        self.assertRegex(text, r"handle_request\s+func \(\) -> \(i64\)")
        self.assertIn("start function: _initialize", text)
        self.assertIn("features enabled: buffer_response", text)
        self.assertIn("smoke request: GET / -> 200 (the downstream answered; outcome passed)", text)
        self.assertIn("handle_response:read_body", text)

    def test_unknown_imports_are_each_named(self) -> None:
        status, lines = run(self.file(FOREIGN))
        self.assertEqual(status, 1)
        self.assertIn("UNKNOWN: http_handler has no function 'streams_read'", "\n".join(lines))
        self.assertTrue(lines[-1].startswith("FAIL: guest"), lines[-1])
        self.assertIn("http_handler.streams_read", lines[-1])
        self.assertIn("env.abort", lines[-1])
        self.assertNotIn("smoke request", "\n".join(lines))

    def test_config_and_what_init_did(self) -> None:
        status, lines = run(str(EXAMPLES / "auth.wat"))
        self.assertEqual(status, 1)
        self.assertIn("logged [error] auth: the guest config must be user:password", "\n".join(lines))
        self.assertIn("failed to initialise", lines[-1])
        self.assertIn("  host calls: get_config, log", lines)  # what the start function did before it trapped
        status, lines = run(str(EXAMPLES / "auth.wat"), "--config", "alice:secret")
        self.assertEqual(status, 0, lines)
        self.assertIn("  config read: yes", lines)
        self.assertIn("smoke request: GET / -> 401 (the guest answered itself; outcome answered)", lines)
        status, lines = run(str(EXAMPLES / "auth.wat"), "--config-file", self.file(b"bob:pw", ".txt"))
        self.assertEqual(status, 0, lines)

    def test_a_smoke_request_that_traps(self) -> None:
        guest = module('(func (export "handle_request") (result i64) unreachable)', NOOP)
        status, lines = run(self.file(guest))
        self.assertEqual(status, 1)
        self.assertIn("the smoke request GET / failed in the guest", lines[-1])
        self.assertIn("unreachable", lines[-1])

    def test_missing_exports_and_bad_files(self) -> None:
        status, lines = run(self.file(b'(module (memory (export "memory") 1))'))
        self.assertEqual(status, 1)
        self.assertIn("does not export handle_request () -> (i64), handle_response (i32 i32) -> ()", lines[-1])
        status, lines = run(self.file(b"not wasm at all"))
        self.assertEqual((status, lines[-1][:5]), (1, "FAIL:"))
        self.assertIn("neither a wasm binary nor valid WAT", lines[-1])
        status, lines = run(self.mktemp() + ".wasm")
        self.assertEqual((status, len(lines)), (1, 1))
        self.assertIn("cannot read guest", lines[-1])

    def test_json(self) -> None:
        status, lines = run(self.file(FOREIGN), "--json")
        report = json.loads("\n".join(lines))
        self.assertEqual((status, report["ok"]), (1, False))
        self.assertEqual(
            [(i["module"], i["name"], i["provided"]) for i in report["imports"]],
            [("http_handler", "streams_read", False), ("env", "abort", False)],
        )
        status, lines = run(str(EXAMPLES / "router.wat"), "--json")
        report = json.loads("\n".join(lines))
        self.assertEqual((status, report["ok"], report["reason"]), (0, True, None))
        self.assertEqual(report["smoke"]["status"], 200)

    def test_the_command(self) -> None:
        """As a person runs it: ``python -m twisted_httpwasm check``, exit status and last line."""
        ok = subprocess.run(
            [sys.executable, "-m", "twisted_httpwasm", "check", "examples/security_headers.wat"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((ok.returncode, ok.stdout.splitlines()[-1]), (0, "OK: guest security_headers can run here"))
        bad = subprocess.run(
            [sys.executable, "-m", "twisted_httpwasm", "check", self.file(FOREIGN)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(bad.returncode, 1)
        self.assertIn("streams_read", bad.stdout.splitlines()[-1])
        usage = subprocess.run([sys.executable, "-m", "twisted_httpwasm"], capture_output=True, text=True, timeout=60)
        self.assertEqual(usage.returncode, 2)
        self.assertIn("check GUEST", usage.stdout)


NOOP = '(func (export "handle_response") (param i32 i32))'
