"""Every guest of examples/ tested with the kit (twisted_httpwasm.testing), as a guest author would.

tests/test_examples.py runs the same guests over real sockets; here each
behaviour examples/README.md promises is a few lines with GuestClient, in both
execution modes.  The C guests are built at test time (skipped, naming what is
missing, without clang).
"""

from __future__ import annotations

import base64
import functools
import os
import tempfile
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twisted_httpwasm import Execution, Feature, LogLevel
from twisted_httpwasm.testing import GuestClient, GuestTestMixin

from .support import EXAMPLES, TempFilesMixin, c_build_module, c_guest_binary, execution_variants, load_example_module

BASIC = {"authorization": "Basic " + base64.b64encode(b"alice:secret").decode()}


def c_example(name: str) -> Path:
    """``examples/c/<name>`` built with examples/c/build.py, once per run (skips without clang)."""
    return c_guest_binary(EXAMPLES / "c" / name, wasi=c_build_module().EXAMPLES[name], skip_missing_tools=True)


@functools.cache
def rust_build() -> Any:
    """examples/rust/build.py, imported once."""
    return load_example_module("rust/build")


_rust_dir = tempfile.TemporaryDirectory(prefix="httpwasm-rust-guests-")


@functools.cache
def rust_example(name: str) -> Path:
    """``examples/rust/<name>`` built with examples/rust/build.py, once per run (skips, naming the packages)."""
    build = rust_build()
    try:
        return build.build(EXAMPLES / "rust" / name, Path(_rust_dir.name) / Path(name).with_suffix(".wasm"))  # type: ignore[no-any-return]
    except build.BuildError as error:
        raise SkipTest(f"{name} is a Rust guest: {error}") from None


def secret_page(request: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"content-type": "text/plain"}, b"the password is SECRET, SECRET!"


class ExamplesMixin(GuestTestMixin):
    execution: Execution

    def client(self, source: Any, downstream: Any = None, **options: Any) -> GuestClient:
        return self.guest_client(source, downstream, execution=self.execution, **options)

    # -- router -----------------------------------------------------------------------

    def check_router(self, source: Any) -> None:
        client = self.client(source)
        host = client.get("/host")
        assert (host.status, host.body, host.downstream) == (200, b"hello from the guest\n", None)
        assert host.headers["content-type"] == "text/plain"
        api = client.get("/api/items?x=1")
        assert api.downstream is not None and api.downstream.uri == "/items?x=1"
        other = client.get("/other")
        assert other.downstream is not None and other.downstream.uri == "/other"

    def test_router_wat(self) -> None:
        self.check_router(EXAMPLES / "router.wat")

    def test_router_c(self) -> None:
        self.check_router(c_example("router.c"))

    def test_router_rust(self) -> None:
        self.check_router(rust_example("router.rs"))
        long = "/api/" + "y" * 5000  # longer than the guest's first buffer: read again
        exchange = self.client(rust_example("router.rs")).get(long)
        assert exchange.downstream is not None and exchange.downstream.uri == long.removeprefix("/api")
        assert [call.function for call in exchange.calls or ()] == ["get_uri", "get_uri", "set_uri"]

    def test_router_c_long_uri(self) -> None:
        long = "/api/" + "x" * 5000
        exchange = self.client(c_example("router.c")).get(long)
        assert exchange.downstream is not None and exchange.downstream.uri == long.removeprefix("/api")

    # -- auth ---------------------------------------------------------------------------

    def check_auth(self, source: Any) -> None:
        client = self.client(source, config=b"alice:secret")
        refused = client.get("/")
        assert (refused.status, refused.body, refused.downstream) == (401, b"unauthorized\n", None)
        assert refused.headers["www-authenticate"] == 'Basic realm="httpwasm"'
        assert client.get("/", {"authorization": "Basic bm9ib2R5OnB3"}).status == 401
        assert client.get("/", BASIC).status == 200
        assert client.get("/", {"authorization": BASIC["authorization"].replace("Basic", "bAsIc")}).status == 200

    def test_auth_wat(self) -> None:
        self.check_auth(EXAMPLES / "auth.wat")

    def test_auth_c(self) -> None:
        self.check_auth(c_example("auth.c"))

    # -- redact -------------------------------------------------------------------------

    def test_redact(self) -> None:
        exchange = self.client(EXAMPLES / "redact.wat", secret_page).get("/note.txt")
        assert exchange.body == b"the password is ******, ******!"
        assert exchange.features == Feature.BUFFER_RESPONSE
        assert exchange.called("read_body", "handle_response") and exchange.called("write_body", "handle_response")

    def test_redact_leaves_failures_alone(self) -> None:
        def fails(request: Any) -> Any:
            raise RuntimeError("downstream failed on purpose")

        exchange = self.client(EXAMPLES / "redact.wat", fails).get("/")
        assert exchange.status == 500 and exchange.trap is None
        assert not exchange.called("read_body")
        self.flushLoggedErrors(RuntimeError)  # type: ignore[attr-defined]  # Twisted logs the downstream's failure

    # -- request id ---------------------------------------------------------------------

    def check_request_id(self, source: Any) -> None:
        client = self.client(source)
        first, second = client.get("/"), client.get("/")
        assert first.headers["x-request-id"] == "req-1" and second.headers["x-request-id"] == "req-2"
        assert second.downstream is not None and second.downstream.headers["x-request-id"] == "req-2"
        assert (LogLevel.INFO, "req-2 status=200") in second.logs

    def test_request_id_wat(self) -> None:
        self.check_request_id(EXAMPLES / "request_id.wat")

    def test_request_id_wasi_c(self) -> None:
        self.check_request_id(c_example("request_id_wasi.c"))

    # -- security headers -----------------------------------------------------------------

    def test_security_headers(self) -> None:
        exchange = self.client(EXAMPLES / "security_headers.wat").get("/")
        assert exchange.headers["x-content-type-options"] == "nosniff"
        assert exchange.headers["x-frame-options"] == "DENY"
        assert exchange.headers["referrer-policy"] == "no-referrer"

    # -- a chain of examples ----------------------------------------------------------------

    def test_chain(self) -> None:
        client = self.client(
            [EXAMPLES / "security_headers.wat", EXAMPLES / "auth.wat", EXAMPLES / "router.wat"],
            config=[b"", b"alice:secret", b""],
        )
        refused = client.get("/host")
        assert refused.status == 401 and refused.headers["x-frame-options"] == "DENY"
        answered = client.get("/host", BASIC)
        assert answered.body == b"hello from the guest\n" and answered.downstream is None
        assert [call.guest for call in answered.calls or ()][-1] == "router"


globals().update(execution_variants(ExamplesMixin, SynchronousTestCase, name="ExampleKit"))


class RustBuildTests(TempFilesMixin, SynchronousTestCase):
    def test_a_rustc_without_wasm32_names_the_package(self) -> None:
        """A rustc whose standard library has no wasm32 (say rustup's, without the target): the package to install."""
        fake = Path(self.mktemp())
        fake.write_text(f"#!/bin/sh\necho {fake.parent}\n")
        fake.chmod(0o755)
        build = rust_build()
        self.patch(os, "environ", {**os.environ, "RUSTC": str(fake)})
        error = self.assertRaises(build.BuildError, build.find_rustc)
        self.assertIn("libstd-rust-dev-wasm32", str(error))
        self.patch(os, "environ", {**os.environ, "RUSTC": str(fake) + "-missing"})
        self.assertIn("libstd-rust-dev-wasm32", str(self.assertRaises(build.BuildError, build.find_rustc)))
