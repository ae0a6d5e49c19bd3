"""Shared test helpers: WAT guests written inline, real loopback servers, clients,
temporary files, guest logs, polling, and C guests built at test time.

Tests are ``twisted.trial`` test cases, so the suite runs under ``trial tests``
and under ``pytest`` alike.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import reactor as global_reactor
from twisted.internet import task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import IResource
from twisted.web.server import Site

from twisted_httpwasm import Execution, Guest, GuestResource
from twisted_httpwasm.runtime import accel
from twisted_httpwasm.runtime.state import RequestState

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: Every http_handler import, named after the function, for inline WAT guests.
IMPORTS = """
  (import "http_handler" "enable_features" (func $enable_features (param i32) (result i32)))
  (import "http_handler" "get_config" (func $get_config (param i32 i32) (result i32)))
  (import "http_handler" "log" (func $log (param i32 i32 i32)))
  (import "http_handler" "log_enabled" (func $log_enabled (param i32) (result i32)))
  (import "http_handler" "get_method" (func $get_method (param i32 i32) (result i32)))
  (import "http_handler" "set_method" (func $set_method (param i32 i32)))
  (import "http_handler" "get_uri" (func $get_uri (param i32 i32) (result i32)))
  (import "http_handler" "set_uri" (func $set_uri (param i32 i32)))
  (import "http_handler" "get_protocol_version" (func $get_protocol_version (param i32 i32) (result i32)))
  (import "http_handler" "get_source_addr" (func $get_source_addr (param i32 i32) (result i32)))
  (import "http_handler" "get_header_names" (func $get_header_names (param i32 i32 i32) (result i64)))
  (import "http_handler" "get_header_values" (func $get_header_values (param i32 i32 i32 i32 i32) (result i64)))
  (import "http_handler" "set_header_value" (func $set_header_value (param i32 i32 i32 i32 i32)))
  (import "http_handler" "add_header_value" (func $add_header_value (param i32 i32 i32 i32 i32)))
  (import "http_handler" "remove_header" (func $remove_header (param i32 i32 i32)))
  (import "http_handler" "read_body" (func $read_body (param i32 i32 i32) (result i64)))
  (import "http_handler" "write_body" (func $write_body (param i32 i32 i32)))
  (import "http_handler" "get_status_code" (func $get_status_code (result i32)))
  (import "http_handler" "set_status_code" (func $set_status_code (param i32)))
"""

NOOP_RESPONSE = '(func (export "handle_response") (param i32 i32))'

#: WAT: ``(call $set_number p n value)`` sets response header (name at p, n bytes) to the decimal
#: digits of value.  Uses the scratch memory below 2200 for the digits.
SET_NUMBER = """
  ;; response header (name at p, n bytes) = the decimal digits of $value
  (func $set_number (param $p i32) (param $n i32) (param $value i32) (local $at i32)
    (local.set $at (i32.const 2200))
    (loop $digit
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.rem_u (local.get $value) (i32.const 10))))
      (local.set $value (i32.div_u (local.get $value) (i32.const 10)))
      (br_if $digit (local.get $value)))
    (call $set_header_value (i32.const 1) (local.get $p) (local.get $n)
                            (local.get $at) (i32.sub (i32.const 2200) (local.get $at))))
"""


def module(*body: str, memory_pages: int = 1, imports: str = "") -> bytes:
    """A WAT guest with every http_handler import and ``imports``, one exported memory and ``body``."""
    return (
        "(module" + IMPORTS + imports + f'(memory (export "memory") {memory_pages})\n' + "\n".join(body) + ")"
    ).encode()


def make_guest(*body: str, **options: Any) -> Guest:
    return Guest(module(*body), **options)


def request_state(
    method: bytes = b"GET",
    uri: bytes = b"/",
    protocol: bytes = b"HTTP/1.1",
    source_addr: bytes = b"127.0.0.1:4321",
    headers: Iterable[tuple[bytes, bytes]] = (),
    body: bytes | None = None,
) -> RequestState:
    """Plain per-request data, as the filter would build it."""
    return RequestState(
        method=method,
        uri=uri,
        protocol=protocol,
        source_addr=source_addr,
        headers=headers,
        body=io.BytesIO(body) if body is not None else None,
    )


class TempFilesMixin:
    """For a trial test case: temporary paths outside the working directory, and guest files."""

    def mktemp(self) -> str:
        """A fresh path in a temporary directory removed after the test.

        trial's own ``mktemp`` is relative to the working directory, which under
        pytest is the repository root.
        """
        directory = tempfile.mkdtemp(prefix="httpwasm-test-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)  # type: ignore[attr-defined]
        return os.path.join(directory, "temp")

    def guest_file(self, *body: str) -> str:
        """A ``.wat`` file holding :func:`module` of ``body``; its path."""
        path = self.mktemp() + ".wat"
        Path(path).write_bytes(module(*body))
        return path


class ServerTestCase(TestCase):
    """A trial test case with real loopback servers and a clean HTTP client."""

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(global_reactor, persistent=False)
        self.http = HTTPClient(Agent(global_reactor, pool=self.pool))
        self.addCleanup(self.pool.closeCachedConnections)

    def listen(self, factory: Factory) -> str:
        """Listen with ``factory`` (a Site, say) on a loopback port until the end of the test; its base URL."""
        port = global_reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def serve(self, resource: IResource) -> str:
        """Serve ``resource`` on a loopback port; return its base URL."""
        return self.listen(Site(resource))

    def serve_guest(self, guest: Guest, downstream: IResource, **options: Any) -> str:
        return self.serve(GuestResource(guest, downstream, **options))

    @inlineCallbacks
    def fetch(self, method: str, url: str, **kwargs: Any) -> Any:
        """(status, headers, body) of one request."""
        response = yield self.http.request(method, url, **kwargs)
        body = yield response.content()
        return response.code, response.headers, body


EXECUTIONS = (Execution.THREAD, Execution.INLINE)


# -- logs, streams, waiting ---------------------------------------------------------


class LogCapture:
    """Events of one guest's log namespace, collected for a test."""

    def __init__(self, test: SynchronousTestCase, guest_name: str = "guest"):
        self.namespace = f"httpwasm.guest.{guest_name}"
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, object]) -> None:
        if event.get("log_namespace") == self.namespace:
            self.events.append(event)

    def messages(self) -> list[tuple[object, str]]:
        """(level, text as a log file shows it) of each event."""
        return [(event["log_level"], formatEvent(event)) for event in self.events]


def guest_text(event: dict[str, Any]) -> str:
    """The message of a guest's log event (``text``; ``message`` in older hosts)."""
    return str(event.get("text", event.get("message")))


def on_guest_log(guest: Guest, callback: Callable[[dict[str, Any]], None]) -> None:
    """Call ``callback`` with every event ``guest`` logs from now on.

    The observer sits on the guest's own Logger (so only this guest's lines count),
    ahead of the global publisher and of anything that edits events in place.
    """
    forward = guest.log.observer

    def observer(event: dict[str, Any]) -> None:
        callback(event)
        forward(event)

    guest.log.observer = observer


def collect_streamed(response: Any) -> tuple[list[bytes], Deferred[None], Deferred[None]]:
    """Read ``response``'s body as it arrives.

    (the chunks received so far, a Deferred that fires at the first chunk, treq's Deferred
    for the whole body).
    """
    chunks: list[bytes] = []
    first: Deferred[None] = Deferred()

    def collect(data: bytes) -> None:
        chunks.append(data)
        if not first.called:
            first.callback(None)

    return chunks, first, treq.collect(response, collect)


def poll(condition: Callable[[], Any], timeout: float, interval: float = 0.05) -> Deferred[bool]:
    """Fire with True once ``condition()`` (which may return a Deferred) is true, False past ``timeout`` seconds.

    ``condition`` is checked at once, then every ``interval`` seconds.
    """

    @inlineCallbacks
    def loop() -> Generator[Any, Any, bool]:
        end = time.monotonic() + timeout
        while True:
            if (yield condition()):
                return True
            if time.monotonic() > end:
                return False
            yield task.deferLater(global_reactor, interval, lambda: None)

    return loop()


def deferred_later(seconds: float, value: Any = None) -> Deferred[Any]:
    return task.deferLater(global_reactor, seconds, lambda: value)


# -- C guests, built at test time ---------------------------------------------------


def load_example_module(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples/ is not a package)."""
    path = EXAMPLES / f"{name}.py" if not name.startswith("c/") else EXAMPLES / "c" / f"{name[2:]}.py"
    spec = importlib.util.spec_from_file_location(f"httpwasm_example_{name.replace('/', '_')}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@functools.cache
def c_build_module() -> ModuleType:
    """examples/c/build.py, imported once."""
    return load_example_module("c/build")


_c_build_dir: tempfile.TemporaryDirectory[str] | None = None
_c_built: dict[Path, Path] = {}


def c_toolchain(what: str, *, wasi: bool) -> None:
    """Skip the test unless the toolchain that builds C guests is complete (the one probe of every C test).

    examples/c/build.py's :func:`probe` checks clang, wasm-ld, and with ``wasi``
    the WASI sysroot and compiler-rt's wasm32 builtins; the skip names the piece
    and the Debian package that provides it.
    """
    build = c_build_module()
    try:
        build.probe(wasi=wasi)
    except build.MissingTool as error:
        raise SkipTest(f"{what} needs {error.package} (Debian: apt-get install {error.package}): {error}") from None


def c_guest_binary(source: Path, *, wasi: bool, skip_missing_tools: bool = True) -> Path:
    """The C file ``source`` built with examples/c/build.py into a temporary directory (once per run).

    Skips the test, naming the Debian package, when a piece of the toolchain is
    missing (:func:`c_toolchain`); a guest that does not compile fails it.
    (``skip_missing_tools`` is what callers asked for before every missing piece
    skipped; it changes nothing.)
    """
    global _c_build_dir
    if source not in _c_built:
        build = c_build_module()
        c_toolchain(f"{source.name} is a C guest and", wasi=wasi)
        if _c_build_dir is None:
            _c_build_dir = tempfile.TemporaryDirectory(prefix="httpwasm-c-guests-")
        output = Path(_c_build_dir.name) / source.parent.name / source.with_suffix(".wasm").name
        _c_built[source] = build.build(source, output, wasi=wasi)
    return _c_built[source]


# -- execution-mode variants ----------------------------------------------------------


#: The guest-call paths every generated variant runs on: the compiled accelerator, and pure Python.
GUEST_PATHS = ("accelerated", "pure")
_PATH_SUFFIX = {"accelerated": "", "pure": "Pure"}


class GuestPathMixin:
    """Makes the guests a test loads use one guest-call path (``guest_path``: see ``runtime/accel.py``).

    The resources it makes follow: the compiled filter of ``web/fast.py`` with the accelerator, the
    pure-Python one without it.

    ``accelerated`` is skipped, with the reason, where the compiled accelerator is not built
    (no C compiler at install) or ``TWISTED_HTTPWASM_PURE`` is set.
    """

    guest_path = "accelerated"

    def setUp(self) -> None:
        if self.guest_path == "accelerated":
            if accel.compiled is None:
                raise SkipTest(f"compiled accelerator not in use: {accel.REASON}")
            self.patch(accel, "module", accel.compiled)  # type: ignore[attr-defined]
        else:
            self.patch(accel, "module", None)  # type: ignore[attr-defined]
        super().setUp()  # type: ignore[misc]


def execution_variants(
    mixin: type,
    *bases: type,
    name: str | None = None,
    only: Mapping[Execution, type] = MappingProxyType({}),
    **attributes: Any,
) -> dict[str, type]:
    """One test case class per execution mode (thread, inline) and guest-call path, from one definition.

    As Twisted's ``ReactorBuilder.makeTestCaseClasses`` makes one class per reactor: each
    class mixes ``mixin`` into ``bases`` (``ServerTestCase``, say), with ``execution`` and
    ``guest_path`` set (:class:`GuestPathMixin`), and is named ``{name}{Mode}Tests`` on the
    compiled accelerator and ``{name}{Mode}PureTests`` on the pure-Python path (``name``: the
    mixin's name without ``TestsMixin`` or ``Mixin``).  ``only`` maps a mode to a mixin of
    tests that apply to that mode alone; ``attributes`` are set on every class.  The classes
    belong to the mixin's module: define them at that module's top level, where pytest and
    trial both find them::

        globals().update(execution_variants(FooTestsMixin, ServerTestCase))
    """
    stem = name or mixin.__name__.removesuffix("Mixin").removesuffix("Tests")
    classes: dict[str, type] = {}
    for execution in EXECUTIONS:
        for path in GUEST_PATHS:
            class_name = f"{stem}{execution.name.title()}{_PATH_SUFFIX[path]}Tests"
            namespace = {
                "__module__": mixin.__module__,
                "__qualname__": class_name,
                "execution": execution,
                "guest_path": path,
                **attributes,
            }
            extra = (only[execution],) if execution in only else ()
            classes[class_name] = type(class_name, (GuestPathMixin, *extra, mixin, *bases), namespace)
    return classes


def guest_path_variants(namespace: dict[str, Any]) -> None:
    """Run each test case class of a module on both guest-call paths.

    Every class in ``namespace`` (a module's ``globals()``) that defines tests and is not
    already a variant is replaced by ``{Name}`` on the compiled accelerator and
    ``{Name}Pure`` on the pure path (the name's ``Tests`` suffix kept last)::

        guest_path_variants(globals())   # at the end of the module
    """
    for name, cls in list(namespace.items()):
        if (
            not isinstance(cls, type)
            or not issubclass(cls, SynchronousTestCase)
            or issubclass(cls, GuestPathMixin)
            or cls.__module__ != namespace.get("__name__")
            or not any(attr.startswith("test") for attr in dir(cls))
        ):
            continue
        stem = name.removesuffix("Tests")
        suffix = "Tests" if name.endswith("Tests") else ""
        for path in GUEST_PATHS:
            class_name = f"{stem}{_PATH_SUFFIX[path]}{suffix}"
            body = {"__module__": cls.__module__, "__qualname__": class_name, "guest_path": path}
            namespace[class_name] = type(class_name, (GuestPathMixin, cls), body)
