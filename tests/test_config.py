"""The typed configuration: one frozen HostConfig, made by the options, read by the service, reload and workers."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceCollection, MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twisted_httpwasm import Execution, FailurePolicy, LogLevel, LogLimit
from twisted_httpwasm.service import worker_main
from twisted_httpwasm.service.config import (
    ConfigError,
    DownstreamConfig,
    GuestEntry,
    GuestSettings,
    HostConfig,
    LimitsConfig,
    ListenConfig,
    ObservabilityConfig,
    ReloadConfig,
    WorkersConfig,
)
from twisted_httpwasm.service.reload import RELOAD_SERVICE, WATCH_SERVICE
from twisted_httpwasm.service.tap import Options, make_site, makeService, reloading_guests
from twisted_httpwasm.service.workers import WorkersService

from .support import NOOP_RESPONSE, ROOT, ServerTestCase, TempFilesMixin
from .test_docs import fenced

#: Answers every request with its configuration in the response header x-config.
CONFIG_ECHO = """
  (data (i32.const 2000) "x-config")
  (func (export "handle_request") (result i64) (local $n i32)
    (local.set $n (call $get_config (i32.const 0) (i32.const 1024)))
    (call $set_header_value (i32.const 1) (i32.const 2000) (i32.const 8) (i32.const 0) (local.get $n))
    (i64.const 1))
"""

GROUPS = (
    GuestEntry,
    GuestSettings,
    DownstreamConfig,
    ListenConfig,
    LimitsConfig,
    ObservabilityConfig,
    WorkersConfig,
    ReloadConfig,
    HostConfig,
)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


class TypedConfigTests(TempFilesMixin, SynchronousTestCase):
    def test_the_options_make_one_frozen_typed_config(self) -> None:
        """Parsed options hold one HostConfig whose groups are frozen, slotted dataclasses of typed values."""
        options = parse(
            "--guest", "g.wasm", "--path", ".", "--execution", "inline", "--guest-timeout", "2.5",
            "--max-request-body", "none", "--workers", "3", "--listen", "tcp:8081", "--on-guest-error", "fail-open",
            "--guest-log-limit", "5/1KiB", "--log-level", "warn", "--shutdown-timeout", "0", "--watch",
        )  # fmt: skip
        config = options.config()
        self.assertIs(options.config(), config)  # made once, when the options were parsed
        for group in GROUPS:
            self.assertTrue(dataclasses.is_dataclass(group), group)
            self.assertTrue(group.__dataclass_params__.frozen, group)  # type: ignore[attr-defined]
            self.assertIn("__slots__", vars(group), group)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.shutdown_timeout = 3  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.guest_settings.timeout = 3  # type: ignore[misc]
        with self.assertRaises((AttributeError, TypeError)):
            config.limits.surprise = 1  # type: ignore[attr-defined]
        settings = config.guest_settings
        self.assertEqual(
            (settings.execution, settings.timeout, settings.log_level, settings.log_limit),
            (Execution.INLINE, 2.5, LogLevel.WARN, LogLimit(5, 1024)),
        )
        self.assertIs(config.on_guest_error, FailurePolicy.FAIL_OPEN)
        self.assertIsNone(config.limits.max_request_body)
        self.assertEqual(config.listen.endpoints, ("tcp:8081",))
        self.assertEqual(config.workers, WorkersConfig(3, tuple(options.argv), os.getcwd()))
        self.assertEqual((config.shutdown_timeout, config.reload.watch), (0.0, True))
        self.assertEqual(config.downstream.description, "--path .")
        self.assertIs(config.downstream.resource, options["root"])
        self.assertEqual(config.guests, (GuestEntry("g.wasm"),))

    def test_per_guest_options_attach_to_the_preceding_guest(self) -> None:
        """--guest-config*, --guest-sha256 and --guest-name land on the --guest before them, and only there."""
        config_file = Path(self.mktemp())
        config_file.write_bytes(b"from a file")
        digest = "ab" * 32
        config = parse(
            "--guest", "a.wat", "--guest-sha256", digest.upper(), "--guest-name", "first",
            "--guest", "b.wat",
            "--guest", "c.wat", "--guest-config-file", str(config_file),
            "--guest", "d.wat", "--guest-config", "for d",
            "--path", ".",
        ).config()  # fmt: skip
        self.assertEqual(
            config.guests,
            (
                GuestEntry("a.wat", sha256=digest, name="first"),
                GuestEntry("b.wat"),
                GuestEntry("c.wat", config=b"from a file", config_file=str(config_file)),
                GuestEntry("d.wat", config=b"for d"),
            ),
        )
        self.assertEqual(
            [entry.source_entry() for entry in config.guests[:2]],
            [{"path": "a.wat", "name": "first"}, {"path": "b.wat"}],
        )

    def test_defaults_are_the_command_line_defaults(self) -> None:
        """A HostConfig made without a command line has the settings the options have when none is given."""
        parsed = parse("--guest", "g.wasm", "--path", ".").config()
        made = HostConfig(
            guests=(GuestEntry("g.wasm"),),
            downstream=DownstreamConfig(parsed.downstream.resource, "--path ."),
            listen=ListenConfig(("tcp:8080",)),
            workers=WorkersConfig(1, parsed.workers.argv, parsed.workers.cwd),
        )
        self.assertEqual(made, parsed)

    def test_checked_when_made_with_the_command_line_reasons(self) -> None:
        """What the options refuse about the whole configuration, HostConfig refuses with the same line."""
        downstream = DownstreamConfig(Hello(), "--class Hello")
        cases = [
            (
                dict(guests=(GuestEntry("http://example.test/g.wasm"),)),
                ["--guest", "http://example.test/g.wasm", "--path", "."],
            ),
            (
                dict(guests=(GuestEntry("g.wasm"),), workers=WorkersConfig(2), listen=ListenConfig(("unix:/tmp/s",))),
                ["--guest", "g.wasm", "--path", ".", "--workers", "2", "--listen", "unix:/tmp/s"],
            ),
        ]
        for fields, argv in cases:
            refused = self.assertRaises(ConfigError, HostConfig, downstream=downstream, **fields)
            refusal = self.assertRaises(usage.UsageError, Options().parseOptions, argv)
            self.assertEqual(str(refused), str(refusal))
            self.assertNotIn("\n", str(refused))
        no_guest = self.assertRaises(ConfigError, HostConfig, guests=(), downstream=downstream)
        self.assertIn("give the guest to run in front of --class Hello with --guest PATH", str(no_guest))
        self.assertRaises(TypeError, HostConfig, guests=["g.wasm"], downstream=downstream)

    def test_options_must_be_parsed_first(self) -> None:
        """Unparsed options have no configuration yet, and say so."""
        error = self.assertRaises(RuntimeError, Options().config)
        self.assertIn("parseOptions", str(error))

    def test_a_worker_makes_the_same_config(self) -> None:
        """A worker re-runs the main process's command line (from the WorkersService) to the same HostConfig."""
        options = parse(
            "--guest", self.guest_file(CONFIG_ECHO, NOOP_RESPONSE), "--guest-config", "cfg", "--class",
            f"{__name__}.Hello", "--workers", "2", "--listen", "tcp:0:interface=127.0.0.1", "--execution", "inline",
            "--max-buffered-total", "1MiB", "--idle-timeout", "9", "--watch",
        )  # fmt: skip
        top = makeService(options)
        (workers,) = [child for child in top if isinstance(child, WorkersService)]
        self.assertEqual((workers.workers, workers.argv, workers.cwd), (2, options.argv, options.cwd))
        self.assertEqual(workers.stop_timeout - options.config().shutdown_timeout, 10.0)
        self.assertEqual(worker_main.worker_config(workers.argv), options.config())


class ConfigServiceTests(TempFilesMixin, ServerTestCase):
    timeout = 60

    def config(self, guest: str, **fields: Any) -> HostConfig:
        """A configuration made by hand, as an embedder would: no command line parsed."""
        return HostConfig(
            guests=(GuestEntry(guest, config=b"by hand"),),
            downstream=DownstreamConfig(Hello(), "the hello resource"),
            guest_settings=GuestSettings(execution=Execution.INLINE),
            listen=ListenConfig(("tcp:0:interface=127.0.0.1",)),
            **fields,
        )

    @inlineCallbacks
    def test_make_service_and_make_site_from_a_config_made_by_hand(self) -> Any:
        """makeService and make_site take a HostConfig that no options made; the site serves the guest chain."""
        config = self.config(self.guest_file(CONFIG_ECHO, NOOP_RESPONSE))
        top = makeService(config)
        self.assertEqual([guest.config for guest in reloading_guests(top)], [b"by hand"])
        self.assertRaises(KeyError, top.getServiceNamed, WATCH_SERVICE)
        url = self.listen(make_site(config, MultiService()))
        status, headers, body = yield self.fetch("GET", url + "/")
        self.assertEqual((status, body), (200, b"hello"))
        self.assertEqual(headers.getRawHeaders("x-config"), ["by hand"])

    @inlineCallbacks
    def test_reload_loads_the_configs_guests_again(self) -> Any:
        """SIGHUP's reload loads config.guests through the one loader: the file and config file read afresh."""
        guest = self.guest_file(CONFIG_ECHO, NOOP_RESPONSE)
        config_file = Path(self.mktemp())
        config_file.write_bytes(b"first")
        config = dataclasses.replace(
            self.config(guest),
            guests=(GuestEntry(guest, config=b"first", config_file=str(config_file)),),
            reload=ReloadConfig(watch=True),
        )
        parent = MultiService()
        url = self.listen(make_site(config, parent))
        reloader = parent.getServiceNamed(RELOAD_SERVICE).reloader
        self.assertEqual(parent.getServiceNamed(WATCH_SERVICE).paths, [guest, str(config_file)])
        _, headers, _ = yield self.fetch("GET", url + "/")
        self.assertEqual(headers.getRawHeaders("x-config"), ["first"])
        config_file.write_bytes(b"second")
        before = list(reloader.guests)
        yield reloader.reload()
        self.assertNotEqual(reloader.guests, before)
        self.assertEqual([g.config for g in reloader.guests], [b"second"])
        _, headers, _ = yield self.fetch("GET", url + "/")
        self.assertEqual(headers.getRawHeaders("x-config"), ["second"])

    @inlineCallbacks
    def test_the_embedders_snippet_serves(self) -> Any:
        """docs/configuration.md's HostConfig snippet, as written (from the repository root), builds the service
        of its guest in front of its resource; its site serves the guest's headers."""
        text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
        (snippet,) = [block for block in fenced(text, "python") if "HostConfig(" in block]
        previous = os.getcwd()
        os.chdir(ROOT)
        self.addCleanup(os.chdir, previous)
        namespace: dict[str, Any] = {}
        exec(snippet, namespace)
        config: HostConfig = namespace["config"]
        self.assertEqual(config.guest_settings.execution, Execution.INLINE)
        top = MultiService()
        url = self.listen(make_site(config, top))
        status, headers, body = yield self.fetch("GET", url + "/")
        self.assertEqual((status, body), (200, b"hello\n"))
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        (tree,) = namespace["application"].getComponent(IServiceCollection)
        self.assertEqual([guest.name for guest in reloading_guests(tree)], ["security_headers"])
