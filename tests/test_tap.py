"""``twistd httpwasm`` options and service wiring, without a reactor or sockets."""

from __future__ import annotations

import io
import os
import runpy
import socket
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import script, static, wsgi
from twisted.web import tap as web_tap
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from twisted_httpwasm.abi import LogLevel
from twisted_httpwasm.runtime import accel
from twisted_httpwasm.runtime.guest import DEFAULT_MAX_BUFFER_BYTES, DEFAULT_MEMORY_LIMIT, Execution, Mount
from twisted_httpwasm.service import tap
from twisted_httpwasm.service.tap import Options, makeService, parse_size
from twisted_httpwasm.service.workers import TCPListen, WorkersService
from twisted_httpwasm.web.demo import BUNDLED_GUESTS, DemoPage, bundled_guest
from twisted_httpwasm.web.proxy import ProxyResource
from twisted_httpwasm.web.resource import FailurePolicy, GuestResource

from .support import NOOP_RESPONSE, TempFilesMixin, module

REPO_ROOT = Path(__file__).resolve().parent.parent

PASS_THROUGH = (
    """
  (func (export "handle_request") (result i64) (i64.const 1))
"""
    + NOOP_RESPONSE
)

NO_HANDLE_RESPONSE = """
  (func (export "handle_request") (result i64) (i64.const 1))
"""


class Downstream(Resource):
    """A zero-argument resource class for ``--class``."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"downstream"


class NotAResource:
    """Importable, constructible, but not a twisted.web resource."""


def wsgi_application(environ: Any, start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"wsgi"]


class OptionsTestCase(TempFilesMixin, SynchronousTestCase):
    """Helpers: temporary files, a guest file, and parsing a command line."""

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def parse_with_guest(self, *args: str) -> Options:
        """Parse ``args`` plus one guest and a ``--class`` downstream."""
        return self.parse("--guest", "g.wasm", "--class", f"{__name__}.Downstream", *args)

    def assertUsageError(self, args: list[str], *fragments: str) -> None:
        error = self.assertRaises(usage.UsageError, Options().parseOptions, args)
        for fragment in fragments:
            self.assertIn(fragment, str(error))


class ParseSizeTests(SynchronousTestCase):
    def test_plain_integers_are_bytes(self) -> None:
        """A size without a suffix is a number of bytes."""
        self.assertEqual(parse_size("65536"), 65536)
        self.assertEqual(parse_size(" 1 "), 1)

    def test_binary_suffixes(self) -> None:
        """KiB, MiB and GiB are powers of 1024, in any case, with optional space."""
        self.assertEqual(parse_size("4KiB"), 4 * 1024)
        self.assertEqual(parse_size("64MiB"), 64 * 1024**2)
        self.assertEqual(parse_size("2GiB"), 2 * 1024**3)
        self.assertEqual(parse_size("3 mib"), 3 * 1024**2)

    def test_refused_sizes(self) -> None:
        """Zero, negatives, fractions, decimal units and nonsense are refused, naming the text."""
        for text in ("0", "0MiB", "-1", "1.5MiB", "64MB", "64M", "MiB", "", "ten", "\uff11\uff12"):
            error = self.assertRaises(ValueError, parse_size, text)
            self.assertIn(repr(text), str(error))


class GuestOptionTests(OptionsTestCase):
    def test_defaults(self) -> None:
        """Without guest options every guest setting has its documented default."""
        options = self.parse_with_guest()
        self.assertEqual(options["guests"], [{"path": "g.wasm", "config": b""}])
        self.assertIs(options["log-level"], LogLevel.INFO)
        self.assertIs(options["execution"], Execution.THREAD)
        self.assertEqual(options["guest-timeout"], 1.0)
        self.assertEqual(options["guest-memory-limit"], 64 * 1024**2)
        self.assertEqual(options["guest-memory-limit"], DEFAULT_MEMORY_LIMIT)
        self.assertEqual(options["max-buffer-bytes"], 16 * 1024**2)
        self.assertEqual(options["max-buffer-bytes"], DEFAULT_MAX_BUFFER_BYTES)
        self.assertEqual(options["on-guest-error"], FailurePolicy.FAIL_CLOSED)
        self.assertEqual(options["guest-env"], [])
        self.assertEqual(options["guest-mounts"], [])
        self.assertEqual(options["ports"], ["tcp:8080"])
        self.assertEqual(options["workers"], 1)
        self.assertFalse(options["demo"])

    def test_guest_is_required_with_a_downstream(self) -> None:
        """A downstream without --guest is refused: a forgotten guest must not serve the downstream unfiltered."""
        self.assertUsageError(
            ["--class", f"{__name__}.Downstream"], f"in front of --class {__name__}.Downstream with --guest PATH"
        )
        self.assertUsageError(["--path", "."], "--guest PATH")

    def test_guests_keep_their_order(self) -> None:
        """Several --guest options make a chain, in command-line order."""
        options = self.parse_with_guest("--guest", "second.wat", "--guest", "third.wasm")
        self.assertEqual([entry["path"] for entry in options["guests"]], ["g.wasm", "second.wat", "third.wasm"])

    def test_config_applies_to_the_preceding_guest(self) -> None:
        """--guest-config and --guest-config-file configure the most recent --guest before them."""
        config_file = self.mktemp()
        Path(config_file).write_bytes(b"\x00binary\xff")
        options = self.parse(
            "--guest",
            "a.wat",
            "--guest",
            "b.wat",
            "--guest-config",
            "for b",
            "--guest",
            "c.wat",
            "--guest-config-file",
            config_file,
            "--path",
            ".",
        )
        self.assertEqual(
            options["guests"],
            [
                {"path": "a.wat", "config": b""},
                {"path": "b.wat", "config": b"for b"},
                {"path": "c.wat", "config": b"\x00binary\xff"},
            ],
        )

    def test_config_is_utf8_text(self) -> None:
        """--guest-config passes the text's bytes as given on the command line."""
        options = self.parse("--guest", "a.wat", "--guest-config", "é=1", "--path", ".")
        self.assertEqual(options["guests"][0]["config"], "é=1".encode())

    def test_config_before_any_guest_is_refused(self) -> None:
        """A configuration with no --guest before it has no guest to apply to."""
        self.assertUsageError(["--guest-config", "x", "--guest", "a.wat", "--path", "."], "--guest-config", "after")

    def test_second_config_for_one_guest_is_refused(self) -> None:
        """One configuration per guest: a second one is a mistake, not an override."""
        config_file = self.mktemp()
        Path(config_file).write_bytes(b"x")
        self.assertUsageError(
            ["--guest", "a.wat", "--guest-config", "x", "--guest-config-file", config_file, "--path", "."],
            "--guest-config-file",
            "'a.wat' already has a configuration",
        )

    def test_unreadable_config_file_is_refused(self) -> None:
        """A missing --guest-config-file is named in the error."""
        missing = self.mktemp()
        self.assertUsageError(["--guest", "a.wat", "--guest-config-file", missing], "cannot read", missing)

    def test_log_level(self) -> None:
        """--log-level takes the ABI's level names."""
        for name, level in [("debug", LogLevel.DEBUG), ("WARN", LogLevel.WARN), ("none", LogLevel.NONE)]:
            self.assertIs(self.parse_with_guest("--log-level", name)["log-level"], level)
        self.assertUsageError(["--log-level", "loud"], "--log-level", "'loud'", "debug, info, warn, error, none")

    def test_execution(self) -> None:
        """--execution is thread or inline."""
        self.assertIs(self.parse_with_guest("--execution", "inline")["execution"], Execution.INLINE)
        self.assertIs(self.parse_with_guest("--execution", "thread")["execution"], Execution.THREAD)
        self.assertUsageError(["--execution", "process"], "--execution", "thread, inline", "'process'")

    def test_guest_timeout(self) -> None:
        """--guest-timeout is a positive, finite number of seconds."""
        self.assertEqual(self.parse_with_guest("--guest-timeout", "0.25")["guest-timeout"], 0.25)
        self.assertEqual(self.parse_with_guest("--guest-timeout", "3")["guest-timeout"], 3.0)
        for bad in ("0", "-1", "soon", "inf", "nan"):
            self.assertUsageError(["--guest-timeout", bad], "--guest-timeout", repr(bad))

    def test_memory_limit_and_buffer_sizes(self) -> None:
        """--guest-memory-limit and --max-buffer-bytes take sizes with binary suffixes."""
        options = self.parse_with_guest("--guest-memory-limit", "8MiB", "--max-buffer-bytes", "1048576")
        self.assertEqual(options["guest-memory-limit"], 8 * 1024**2)
        self.assertEqual(options["max-buffer-bytes"], 1024**2)
        self.assertEqual(self.parse_with_guest("--max-buffer-bytes", "512KiB")["max-buffer-bytes"], 512 * 1024)
        self.assertUsageError(["--guest-memory-limit", "64MB"], "--guest-memory-limit", "'64MB'", "KiB, MiB or GiB")
        self.assertUsageError(["--max-buffer-bytes", "0"], "--max-buffer-bytes", "'0'")

    def test_on_guest_error(self) -> None:
        """--on-guest-error is fail-closed or fail-open."""
        self.assertEqual(self.parse_with_guest("--on-guest-error", "fail-open")["on-guest-error"], "fail-open")
        self.assertEqual(self.parse_with_guest("--on-guest-error", "fail-closed")["on-guest-error"], "fail-closed")
        self.assertUsageError(["--on-guest-error", "ignore"], "--on-guest-error", "fail-closed, fail-open")

    def test_guest_env(self) -> None:
        """--guest-env NAME=VALUE sets a variable; NAME alone passes this process's value on."""
        self.patch(os, "environ", {**os.environ, "HTTPWASM_TEST_VAR": "from host"})
        options = self.parse_with_guest(
            "--guest-env", "A=1", "--guest-env", "B=x=y", "--guest-env", "EMPTY=", "--guest-env", "HTTPWASM_TEST_VAR"
        )
        self.assertEqual(
            options["guest-env"], [("A", "1"), ("B", "x=y"), ("EMPTY", ""), ("HTTPWASM_TEST_VAR", "from host")]
        )

    def test_guest_env_refusals(self) -> None:
        """An empty name, or a bare name that is not set, is refused."""
        self.patch(os, "environ", {})
        self.assertUsageError(["--guest-env", "=1"], "--guest-env", "'=1'")
        self.assertUsageError(["--guest-env", "UNSET_NAME"], "UNSET_NAME is not set")

    def test_guest_mount(self) -> None:
        """--guest-mount HOST:GUEST is writable; :ro makes it read-only; host paths become absolute."""
        host = self.mktemp()
        os.makedirs(host)
        options = self.parse_with_guest(
            "--guest-mount", f"{host}:/data", "--guest-mount", f"{host}:/ro-data:ro", "--guest-mount", f"{host}:/w:rw"
        )
        absolute = os.path.abspath(host)
        self.assertEqual(
            options["guest-mounts"],
            [Mount(absolute, "/data", False), Mount(absolute, "/ro-data", True), Mount(absolute, "/w", False)],
        )

    def test_guest_mount_refusals(self) -> None:
        """A mount with an empty directory, or whose host directory does not exist, is refused."""
        host = self.mktemp()
        os.makedirs(host)
        for bad in (f"{host}:", f":{host}", ":ro", ""):
            self.assertUsageError(["--guest-mount", bad], "--guest-mount", "HOST_DIR[:GUEST_DIR][:ro]")
        missing = self.mktemp()
        self.assertUsageError(["--guest-mount", f"{missing}:/data"], "is not a directory", missing)


class DownstreamOptionTests(OptionsTestCase):
    """The downstream options are twistd web's, limited to one downstream."""

    def test_path_is_twistd_webs(self) -> None:
        """--path builds the same static.File as ``twistd web --path``, processors included."""
        directory = self.mktemp()
        os.makedirs(directory)
        ours = self.parse("--guest", "g.wasm", "--path", directory, "--mime-type", "text/x-test")["root"]
        theirs = web_tap.Options()
        theirs.parseOptions(["--path", directory, "--mime-type", "text/x-test"])
        self.assertIsInstance(ours, static.File)
        self.assertEqual(ours.path, theirs["root"].path)
        self.assertEqual(ours.path, os.path.abspath(directory))
        self.assertEqual(ours.processors, theirs["root"].processors)
        self.assertEqual(ours.defaultType, "text/x-test")

    def test_class_makes_an_instance(self) -> None:
        """--class names a zero-argument resource class; the root is an instance of it."""
        options = self.parse_with_guest()
        self.assertIsInstance(options["root"], Downstream)
        self.assertEqual(options["downstream"], f"--class {__name__}.Downstream")

    def test_class_that_cannot_be_imported_is_refused(self) -> None:
        """A --class that does not import is a usage error naming it, not a traceback."""
        self.assertUsageError(["--guest", "g.wasm", "--class", "no_such_module.Thing"], "--class no_such_module.Thing")
        self.assertUsageError(["--guest", "g.wasm", "--class", f"{__name__}.Missing"], f"--class {__name__}.Missing")

    def test_class_that_is_not_a_resource_is_refused(self) -> None:
        """A --class whose instances are not resources is refused."""
        self.assertUsageError(
            ["--guest", "g.wasm", "--class", f"{__name__}.NotAResource"], "is not a twisted.web resource"
        )

    def test_wsgi_is_twistd_webs(self) -> None:
        """--wsgi builds twistd web's WSGIResource around the named application."""
        fake_reactor = MemoryReactor()
        self.patch(web_tap, "reactor", fake_reactor)
        options = self.parse("--guest", "g.wasm", "--wsgi", f"{__name__}.wsgi_application")
        self.assertIsInstance(options["root"], wsgi.WSGIResource)
        self.assertIs(options["root"]._application, wsgi_application)
        self.assertIs(options["root"]._reactor, fake_reactor)
        self.assertUsageError(["--guest", "g.wasm", "--wsgi", f"{__name__}.nothing"], "No such WSGI application")

    def test_resource_script_is_twistd_webs(self) -> None:
        """--resource-script builds twistd web's ResourceScriptWrapper."""
        options = self.parse("--guest", "g.wasm", "--resource-script", "site.rpy")
        self.assertIsInstance(options["root"], script.ResourceScriptWrapper)
        self.assertEqual(options["downstream"], "--resource-script site.rpy")

    def test_guest_without_downstream_fronts_the_demo_page(self) -> None:
        """--guest without a downstream puts the guest in front of the demo page, on the demo's endpoint."""
        options = self.parse("--guest", "g.wasm")
        self.assertIsInstance(options["root"], DemoPage)
        self.assertFalse(options["root"].demo_guest)
        self.assertEqual(options["downstream"], "the demo page")
        self.assertEqual(options["guests"], [{"path": "g.wasm", "config": b""}])
        self.assertFalse(options["demo"])
        self.assertEqual(options["ports"], [tap.DEMO_LISTEN])

    def test_only_one_downstream(self) -> None:
        """A second downstream option is refused, naming both."""
        self.assertUsageError(
            ["--guest", "g.wasm", "--path", ".", "--class", f"{__name__}.Downstream"],
            f"--class {__name__}.Downstream",
            "--path .",
        )
        self.assertUsageError(["--guest", "g.wasm", "--path", ".", "-u"], "--user", "--path .")

    def test_personal_is_refused(self) -> None:
        """--personal (a PB publisher, not HTTP) is not supported."""
        self.assertUsageError(["--guest", "g.wasm", "--path", ".", "--personal"], "--personal is not supported")


class ListenOptionTests(OptionsTestCase):
    def test_listen_is_repeatable(self) -> None:
        """Every --listen endpoint is kept, in order, replacing the default."""
        options = self.parse_with_guest("--listen", "tcp:8081", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual(options["ports"], ["tcp:8081", "tcp:0:interface=127.0.0.1"])

    def test_unusable_endpoint_is_refused(self) -> None:
        """An endpoint description that does not parse is a usage error naming it."""
        self.assertUsageError(
            ["--guest", "g.wasm", "--path", ".", "--listen", "carrier-pigeon:1"], "--listen carrier-pigeon:1"
        )
        self.assertUsageError(["--guest", "g.wasm", "--path", ".", "--listen", "tcp:eighty"], "--listen tcp:eighty")


class MakeServiceTests(OptionsTestCase):
    def make(self, *args: str) -> tuple[MultiService, Site]:
        service = makeService(self.parse(*args))
        self.assertIsInstance(service, MultiService)
        sites = {child.factory for child in service if isinstance(child, StreamServerEndpointService)}
        self.assertEqual(len(sites), 1)
        return service, sites.pop()

    def test_guest_in_front_of_downstream(self) -> None:
        """The site's resource is a GuestResource around the --class instance, with the guest options."""
        guest_path = self.guest_file(PASS_THROUGH)
        _, site = self.make(
            "--guest",
            guest_path,
            "--guest-config",
            "k=v",
            "--class",
            f"{__name__}.Downstream",
            "--execution",
            "inline",
            "--guest-timeout",
            "2.5",
            "--guest-memory-limit",
            "2MiB",
            "--max-buffer-bytes",
            "1KiB",
            "--log-level",
            "warn",
            "--on-guest-error",
            "fail-open",
            "--guest-env",
            "A=1",
        )
        root = site.resource
        self.assertIsInstance(root, GuestResource)
        self.assertIsInstance(root.downstream, Downstream)
        self.assertTrue(root.fail_open)
        guest = root.guest
        self.assertEqual(guest.name, Path(guest_path).stem)
        self.assertEqual(guest.config, b"k=v")
        self.assertIs(guest.execution, Execution.INLINE)
        self.assertEqual(guest.timeout, 2.5)
        self.assertEqual(guest.memory_limit, 2 * 1024**2)
        self.assertEqual(guest.max_buffer_bytes, 1024)
        self.assertIs(guest.log_level, LogLevel.WARN)
        self.assertEqual(guest.env, (("A", "1"),))

    def test_mounts_reach_the_guest(self) -> None:
        """--guest-mount becomes the guest's WASI mounts."""
        host = self.mktemp()
        os.makedirs(host)
        _, site = self.make(
            "--guest", self.guest_file(PASS_THROUGH), "--path", ".", "--guest-mount", f"{host}:/data:ro"
        )
        self.assertEqual(site.resource.guest.mounts, (Mount(os.path.abspath(host), "/data", True),))

    def test_chain_first_guest_outermost(self) -> None:
        """Several guests nest: the first --guest is the outermost resource, each with its own config."""
        first, second = self.guest_file(PASS_THROUGH), self.guest_file(PASS_THROUGH)
        _, site = self.make(
            "--guest",
            first,
            "--guest-config",
            "one",
            "--guest",
            second,
            "--guest-config",
            "two",
            "--path",
            ".",
            "--execution",
            "inline",
        )
        outer = site.resource
        self.assertIsInstance(outer, GuestResource)
        inner = outer.downstream
        self.assertIsInstance(inner, GuestResource)
        self.assertEqual((outer.guest.name, outer.guest.config), (Path(first).stem, b"one"))
        self.assertEqual((inner.guest.name, inner.guest.config), (Path(second).stem, b"two"))
        self.assertIsInstance(inner.downstream, static.File)

    def test_one_endpoint_service_per_listen(self) -> None:
        """Each --listen becomes a (not yet started) endpoint service for the one site."""
        service, _ = self.make(
            "--guest",
            self.guest_file(PASS_THROUGH),
            "--path",
            ".",
            "--listen",
            "tcp:8081:interface=127.0.0.1",
            "--listen",
            "tcp:8082",
            "--execution",
            "inline",
        )
        children = [child for child in service if isinstance(child, StreamServerEndpointService)]
        self.assertEqual(len(children), 2)
        for child, port in zip(children, (8081, 8082), strict=True):
            self.assertIsInstance(child, StreamServerEndpointService)
            self.assertEqual(child.endpoint._port, port)
            self.assertFalse(child.running)

    def test_twistd_web_site_options(self) -> None:
        """--index, --add-header and --display-tracebacks act as in twistd web, around the downstream."""
        directory = self.mktemp()
        os.makedirs(directory)
        _, site = self.make(
            "--guest",
            self.guest_file(PASS_THROUGH),
            "--path",
            directory,
            "--index",
            "start.html",
            "--add-header",
            "X-Served-By: httpwasm",
            "--display-tracebacks",
            "--execution",
            "inline",
        )
        self.assertTrue(site.displayTracebacks)
        wrapper = site.resource.downstream
        self.assertIsInstance(wrapper, web_tap._AddHeadersResource)
        self.assertEqual(wrapper._headers, [("X-Served-By", "httpwasm")])
        self.assertEqual(wrapper._originalResource.indexNames, ["start.html"])

    def test_startup_is_logged(self) -> None:
        """One log line names the guests, the downstream and the endpoints (not yet listening: nothing is bound)."""
        events: list[dict[str, Any]] = []
        self.patch(tap, "_log", Logger(namespace="httpwasm", observer=events.append))
        first, second = self.guest_file(PASS_THROUGH), self.guest_file(PASS_THROUGH)
        self.make("--guest", first, "--guest", second, "--class", f"{__name__}.Downstream", "--listen", "tcp:8081")
        self.assertEqual(len(events), 1)
        from twisted.logger import formatEvent

        text = formatEvent(events[0])
        self.assertIn(f"guests {first} -> {second}", text)
        self.assertIn(f"in front of --class {__name__}.Downstream", text)
        self.assertIn("to serve on tcp:8081", text)
        self.assertNotIn("listening on", text)  # said by each port once it is bound
        self.assertIn("execution thread", text)
        self.assertIn(accel.describe(), text)  # which guest-call path serves

    def test_broken_guest_stops_startup(self) -> None:
        """A guest that cannot load ends startup with SystemExit naming the guest and the reason."""
        broken = self.guest_file(NO_HANDLE_RESPONSE)
        error = self.assertRaises(SystemExit, makeService, self.parse("--guest", broken, "--path", "."))
        self.assertIsInstance(error.code, str)
        self.assertIn(f"--guest {broken}", str(error.code))
        self.assertIn("does not export handle_response", str(error.code))

    def test_missing_guest_file_stops_startup(self) -> None:
        """A --guest that does not exist ends startup naming the path."""
        missing = self.mktemp() + ".wasm"
        error = self.assertRaises(SystemExit, makeService, self.parse("--guest", missing, "--path", "."))
        self.assertIn("cannot read guest", str(error.code))
        self.assertIn(missing, str(error.code))

    def test_memory_limit_below_guest_needs_stops_startup(self) -> None:
        """A guest whose memory exceeds --guest-memory-limit is refused at startup."""
        big = self.mktemp() + ".wat"
        Path(big).write_bytes(module(PASS_THROUGH, memory_pages=4))
        options = self.parse("--guest", big, "--path", ".", "--guest-memory-limit", "64KiB")
        error = self.assertRaises(SystemExit, makeService, options)
        self.assertIn(f"--guest {big}", str(error.code))


class DemoDefaultsTests(OptionsTestCase):
    """With no guest and no downstream, ``twistd httpwasm`` serves the bundled demo."""

    def capture_log(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        self.patch(tap, "_log", Logger(namespace="httpwasm", observer=events.append))
        return events

    def test_no_arguments_mean_the_demo(self) -> None:
        """No arguments: the bundled 'demo' guest, the demo page, on port 8080 of the loopback interface only."""
        options = self.parse()
        self.assertTrue(options["demo"])
        self.assertEqual(options["guests"], [{"path": str(bundled_guest("demo")), "config": b""}])
        self.assertIsInstance(options["root"], DemoPage)
        self.assertTrue(options["root"].demo_guest)
        self.assertEqual(options["downstream"], "the demo page")
        self.assertEqual(options["ports"], ["tcp:8080:interface=127.0.0.1"])
        self.assertEqual(tap.DEMO_LISTEN, "tcp:8080:interface=127.0.0.1")

    def test_listen_replaces_the_demo_endpoint(self) -> None:
        """--listen (or the deprecated --port) replaces the demo's default endpoint."""
        self.assertEqual(self.parse("--listen", "tcp:9090")["ports"], ["tcp:9090"])
        self.assertEqual(self.parse("--port", "tcp:9091")["ports"], ["tcp:9091"])
        self.flushWarnings()  # --port is deprecated in twistd web

    def test_demo_guest_ships_as_source(self) -> None:
        """The bundled guests are WebAssembly text in the package; no binary is shipped."""
        self.assertEqual(bundled_guest("demo"), BUNDLED_GUESTS / "demo.wat")
        self.assertTrue(bundled_guest("demo").read_text().lstrip().startswith(";;"))
        self.assertEqual(list(BUNDLED_GUESTS.glob("*.wasm")), [])
        error = self.assertRaises(ValueError, bundled_guest, "nope")
        self.assertIn("'nope'", str(error))
        self.assertIn("demo", str(error))

    def test_make_service_wires_the_demo(self) -> None:
        """makeService with no arguments: the demo guest in front of the demo page, listening on 127.0.0.1:8080."""
        self.capture_log()
        service = makeService(self.parse())
        (child,) = [child for child in service if isinstance(child, StreamServerEndpointService)]
        self.assertEqual((child.endpoint._interface, child.endpoint._port), ("127.0.0.1", 8080))
        self.assertFalse(child.running)
        root = child.factory.resource
        self.assertIsInstance(root, GuestResource)
        self.assertEqual(root.guest.name, "demo")
        self.assertIsInstance(root.downstream, DemoPage)

    def test_demo_logs_what_is_served_where_and_how_to_try_it(self) -> None:
        """One log line: the guest, the demo page, the URL, and a curl command to try."""
        events = self.capture_log()
        makeService(self.parse())
        self.assertEqual(
            [formatEvent(event) for event in events],
            [
                "httpwasm demo: guest 'demo' in front of the demo page on http://127.0.0.1:8080/"
                " \u2014 try: curl -i http://127.0.0.1:8080/hello"
            ],
        )

    def test_demo_log_names_the_listen_endpoint(self) -> None:
        """The URL in the demo's line follows --listen; an endpoint without a fixed TCP port is named as given."""
        events = self.capture_log()
        makeService(self.parse("--listen", "tcp:9090", "--execution", "inline"))
        makeService(self.parse("--listen", "tcp6:9091:interface=\\:\\:1", "--execution", "inline"))
        makeService(self.parse("--listen", "tcp:0", "--execution", "inline"))
        texts = [formatEvent(event) for event in events]
        self.assertIn("on http://127.0.0.1:9090/ \u2014 try: curl -i http://127.0.0.1:9090/hello", texts[0])
        self.assertIn("on http://[::1]:9091/ ", texts[1])
        self.assertIn("on tcp:0 \u2014 try: a request for /hello", texts[2])


class DemoPageTests(SynchronousTestCase):
    """The demo's downstream shows the request as it received it."""

    def render(self, page: DemoPage, **headers: str) -> tuple[DummyRequest, str]:
        request = DummyRequest([b"some", b"path"])
        request.method = b"POST"
        request.uri = b"/some/path?x=1"
        request.content = io.BytesIO(b"12345")
        for name, value in headers.items():
            request.requestHeaders.addRawHeader(name.replace("_", "-"), value)
        body = page.render(request)
        return request, body.decode("utf-8")

    def test_plain_text_shows_the_request(self) -> None:
        """Method, URI, protocol, every header (lowercase) and the body size, in plain text by default."""
        request, text = self.render(DemoPage(), X_Httpwasm_Guest="demo", Accept="*/*")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertIn("  POST /some/path?x=1 HTTP/1.0\n", text)
        self.assertIn("  x-httpwasm-guest: demo\n", text)
        self.assertIn("  accept: */*\n", text)
        self.assertIn("(body: 5 bytes)", text)
        self.assertIn("bundled demo guest", text)
        self.assertIn(str(bundled_guest("demo")), text)

    def test_html_for_browsers_is_escaped(self) -> None:
        """A client that accepts HTML gets the same text in a page, with the request's text escaped."""
        request, page = self.render(DemoPage(), Accept="text/html", X_Evil="<script>")
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"text/html; charset=utf-8"])
        self.assertIn("x-evil: &lt;script&gt;", page)
        self.assertNotIn("<script>", page)

    def test_other_guests_are_not_described_as_the_demo(self) -> None:
        """In front of guests given with --guest, the page does not describe the demo guest."""
        _, text = self.render(DemoPage(demo_guest=False))
        self.assertNotIn("bundled demo guest", text)
        self.assertIn("--guest", text)


class ProxyOptionTests(OptionsTestCase):
    """--proxy URL: a reverse-proxy downstream."""

    def test_proxy_is_a_downstream(self) -> None:
        """--proxy builds a ProxyResource for the URL; its path prefixes every URI."""
        options = self.parse("--guest", "g.wasm", "--proxy", "http://127.0.0.1:8081/base/")
        proxy = options["root"]
        self.assertIsInstance(proxy, ProxyResource)
        self.assertEqual((proxy.scheme, proxy.netloc, proxy.base_path), (b"http", b"127.0.0.1:8081", b"/base"))
        self.assertEqual(options["downstream"], "--proxy http://127.0.0.1:8081/base/")
        https = self.parse("--guest", "g.wasm", "--proxy", "https://backend.example")["root"]
        self.assertEqual((https.scheme, https.netloc), (b"https", b"backend.example"))

    def test_proxy_urls_are_checked(self) -> None:
        """A URL without an http(s) scheme or a host, with a bad port, a query or a fragment is refused."""
        for url in ("ftp://host/", "127.0.0.1:8081", "http://", "http://:8080/", "//host:80", "backend"):
            self.assertUsageError(["--guest", "g.wasm", "--proxy", url], f"--proxy {url}", "http or https scheme")
        self.assertUsageError(["--guest", "g.wasm", "--proxy", "http://host:http/"], "not a valid port")
        self.assertUsageError(["--guest", "g.wasm", "--proxy", "http://host:0/"], "port 0")
        self.assertUsageError(["--guest", "g.wasm", "--proxy", "http://host/?q=1"], "--proxy http://host/?q=1", "query")
        self.assertUsageError(["--guest", "g.wasm", "--proxy", "http://host/#top"], "fragment")

    def test_proxy_excludes_other_downstreams(self) -> None:
        """--proxy is one more downstream: it and --path, --class, --wsgi or --resource-script exclude each other."""
        url = "http://127.0.0.1:8081"
        for other in (["--path", "."], ["--class", f"{__name__}.Downstream"], ["--resource-script", "a.rpy"]):
            self.assertUsageError(["--guest", "g.wasm", "--proxy", url, *other], f"{other[0]} ", f"--proxy {url}")
            self.assertUsageError(["--guest", "g.wasm", *other, "--proxy", url], f"--proxy {url}", f"{other[0]} ")
        self.assertUsageError(
            ["--guest", "g.wasm", "--proxy", url, "--wsgi", f"{__name__}.wsgi_application"], "--wsgi", "--proxy"
        )

    def test_proxy_is_behind_the_guest_and_closed_on_stop(self) -> None:
        """makeService puts the guest in front of the proxy and closes its connections when the service stops."""
        service = makeService(
            self.parse(
                "--guest", self.guest_file(PASS_THROUGH), "--proxy", "http://127.0.0.1:8081", "--execution", "inline"
            )
        )
        endpoints = [child for child in service if isinstance(child, StreamServerEndpointService)]
        closers = [child for child in service if isinstance(child, tap._ClosingService)]
        self.assertEqual(len(endpoints), 1)
        self.assertEqual(len(closers), 1)
        proxy = endpoints[0].factory.resource.downstream
        self.assertIsInstance(proxy, ProxyResource)
        self.assertIs(closers[0].proxy, proxy)
        closed: list[object] = []
        self.patch(proxy, "close", lambda: closed.append(True))
        closers[0].startService()
        closers[0].stopService()
        self.assertEqual(closed, [True])


class WorkersOptionTests(OptionsTestCase):
    """--workers N: N processes share the tcp: endpoints."""

    def test_workers_count(self) -> None:
        """--workers takes a positive number of processes."""
        self.assertEqual(self.parse_with_guest("--workers", "4")["workers"], 4)
        self.assertEqual(self.parse_with_guest("--workers", "1")["workers"], 1)
        for bad in ("0", "-2", "two", "1.5", ""):
            self.assertUsageError(["--workers", bad], "--workers must be a positive number", repr(bad))

    def test_workers_need_tcp_endpoints(self) -> None:
        """More than one worker needs tcp: or tcp6: endpoints; any other --listen is refused, by name."""
        self.parse_with_guest("--workers", "2", "--listen", "tcp:8081", "--listen", "tcp6:8082")
        self.parse_with_guest("--workers", "1", "--listen", "unix:/tmp/httpwasm.sock")
        self.assertUsageError(
            ["--guest", "g.wasm", "--path", ".", "--workers", "2", "--listen", "tcp:8081", "--listen", "unix:/tmp/s"],
            "--workers 2",
            "--listen unix:/tmp/s is not one",
        )

    def test_command_line_and_directory_are_kept(self) -> None:
        """The options remember the command line and the directory it was parsed in, for the workers to re-run."""
        args = ["--guest", "g.wasm", "--class", f"{__name__}.Downstream", "--workers", "3"]
        options = self.parse(*args)
        self.assertEqual(options.argv, args)
        self.assertEqual(options.cwd, os.getcwd())

    def test_tcp_listen_parsing(self) -> None:
        """TCPListen reads port, interface and backlog of tcp: and tcp6: endpoints, and nothing else."""
        endpoint = TCPListen.parse("tcp:8081:interface=127.0.0.1:backlog=7")
        self.assertEqual(endpoint, TCPListen("tcp:8081:interface=127.0.0.1:backlog=7", "127.0.0.1", 8081, 7))
        assert endpoint is not None
        self.assertEqual(endpoint.family, socket.AF_INET)
        six = TCPListen.parse("tcp6:8082")
        assert six is not None
        self.assertEqual((six.interface, six.port, six.family), ("::", 8082, socket.AF_INET6))
        self.assertIsNone(TCPListen.parse("unix:/tmp/s"))

    def test_make_service_with_workers(self) -> None:
        """With --workers 3, one WorkersService serves every endpoint, with the command line to re-run."""
        events: list[dict[str, Any]] = []
        self.patch(tap, "_log", Logger(namespace="httpwasm", observer=events.append))
        options = self.parse(
            "--guest",
            self.guest_file(PASS_THROUGH),
            "--class",
            f"{__name__}.Downstream",
            "--workers",
            "3",
            "--listen",
            "tcp:8081:interface=127.0.0.1",
            "--listen",
            "tcp6:8082",
            "--execution",
            "inline",
        )
        service = makeService(options)
        (child,) = [child for child in service if isinstance(child, WorkersService)]
        self.assertEqual(child.workers, 3)
        self.assertEqual([(e.interface, e.port) for e in child.listen], [("127.0.0.1", 8081), ("::", 8082)])
        self.assertEqual(child.argv, options.argv)
        self.assertEqual(child.cwd, options.cwd)
        self.assertIsInstance(child.site.resource, GuestResource)
        self.assertFalse(child.running)
        self.assertIn(", 3 processes)", formatEvent(events[0]))


class PluginTests(SynchronousTestCase):
    def test_plugin_points_at_tap(self) -> None:
        """twisted/plugins/httpwasm.py declares the ``httpwasm`` service maker backed by this module."""
        namespace = runpy.run_path(str(REPO_ROOT / "twisted" / "plugins" / "httpwasm.py"))
        maker = namespace["HttpWasm"]
        self.assertEqual(maker.tapname, "httpwasm")
        self.assertIs(maker.options, Options)
        self.assertIs(maker.makeService, makeService)
        self.assertFalse((REPO_ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((REPO_ROOT / "twisted" / "plugins" / "__init__.py").exists())
