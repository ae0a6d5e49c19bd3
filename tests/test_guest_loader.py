"""The one guest loader: the chain as the options describe it, at startup and at each reload alike."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from twisted_httpwasm.runtime.guest import Execution
from twisted_httpwasm.service.guest_loader import GuestLoader
from twisted_httpwasm.service.reload import ReloadError
from twisted_httpwasm.service.tap import Options

from .support import NOOP_RESPONSE, TempFilesMixin

HANDLE_REQUEST = '(func (export "handle_request") (result i64) (i64.const 1))'


class GuestLoaderTests(TempFilesMixin, TestCase):
    def options(self, *argv: str) -> Options:
        config = Options()
        config.parseOptions([*argv, "--path", self.mktemp_dir()])
        return config

    def mktemp_dir(self) -> str:
        path = Path(self.mktemp())
        path.mkdir()
        return str(path)

    @inlineCallbacks
    def test_startup_and_reload_load_the_same_chain(self) -> Generator[Any, Any, None]:
        """Every guest gets the chain's settings and its own options; a reload reads the config file again."""
        first, second = self.guest_file(HANDLE_REQUEST, NOOP_RESPONSE), self.guest_file(HANDLE_REQUEST, NOOP_RESPONSE)
        config_file = Path(self.mktemp())
        config_file.write_bytes(b"from the file")
        loader = GuestLoader.from_config(
            self.options(
                "--guest", first, "--guest-config", "inline",
                "--guest", second, "--guest-config-file", str(config_file),
                "--guest-timeout", "2.5", "--execution", "inline", "--guest-max-requests", "7",
            ).config()
        )  # fmt: skip
        at_startup = loader.at_startup()
        self.assertEqual([guest.config for guest in at_startup], [b"inline", b"from the file"])
        config_file.write_bytes(b"changed")
        reloaded = yield loader.reload()
        self.assertEqual([guest.config for guest in reloaded], [b"inline", b"changed"])
        for guest in [*at_startup, *reloaded]:
            self.assertEqual((guest.timeout, guest.execution), (2.5, Execution.INLINE))
            self.assertEqual(guest.pool.max_requests, 7)
        self.assertEqual(loader.watched_files(), [first, second, str(config_file)])

    @inlineCallbacks
    def test_failures_at_startup_and_at_reload(self) -> Generator[Any, Any, None]:
        """At startup a guest that does not load ends twistd with the reason; at reload it is a ReloadError."""
        path = self.guest_file(HANDLE_REQUEST, NOOP_RESPONSE)
        config_file = Path(self.mktemp())
        config_file.write_bytes(b"x")
        loader = GuestLoader.from_config(
            self.options("--guest", path, "--guest-config-file", str(config_file)).config()
        )
        config_file.unlink()
        with self.assertRaises(ReloadError) as raised:
            yield loader.reload()
        self.assertIn(f"--guest {path}: --guest-config-file {config_file}: cannot read it", str(raised.exception))
        Path(path).write_text("(module)")
        with self.assertRaises(SystemExit) as exited:
            loader.at_startup()
        self.assertIn(f"twistd httpwasm: --guest {path}: ", str(exited.exception))
