"""Verified guest sources: ``--guest https://...``, ``--guest-sha256``, and the cache of fetched guests.

The guests are served over TLS by the test itself, with a certificate signed by
a CA the test makes; the host trusts that CA through ``SSL_CERT_FILE``.  The
cache lives in a temporary ``TWISTED_HTTPWASM_CACHE``.
"""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger, formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from twisted_httpwasm.service import sources
from twisted_httpwasm.service.tap import Options

from .support import TempFilesMixin, module, poll
from .test_http2 import make_certificates
from .test_reload import version_guest
from .test_twistd import DEADLINE, TwistdTestCase


def make_tls(directory: Path) -> tuple[Path, ssl.CertificateOptions]:
    """A CA certificate file (PEM) and server options for 127.0.0.1 with a certificate that CA signed."""
    made = make_certificates()  # the same throwaway CA the HTTP/2 tests use
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(made.ca_pem)
    return ca_file, ssl.PrivateCertificate.loadPEM(made.key_pem + made.cert_pem).options()


class Files(Resource):
    """Serves ``files`` by path and counts the requests for each."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[bytes, bytes] = {}
        self.fetches: dict[bytes, int] = {}

    def render_GET(self, request: Any) -> bytes:
        self.fetches[request.path] = self.fetches.get(request.path, 0) + 1
        if request.path not in self.files:
            request.setResponseCode(404)
            return b"not found"
        return self.files[request.path]


class TLSServerMixin(TempFilesMixin):
    """An https server of guest files on 127.0.0.1, trusted through SSL_CERT_FILE; a fresh cache directory."""

    def start_tls_server(self) -> None:
        directory = Path(self.mktemp()).parent
        ca_file, options = make_tls(directory)
        self.files = Files()
        self.port = reactor.listenSSL(0, Site(self.files), options, interface="127.0.0.1")
        self.addCleanup(self.stop_tls_server)  # type: ignore[attr-defined]
        self.base = f"https://127.0.0.1:{self.port.getHost().port}"
        self.cache = directory / "cache"
        for name, value in (("SSL_CERT_FILE", str(ca_file)), ("TWISTED_HTTPWASM_CACHE", str(self.cache))):
            self.addCleanup(self.restore_env, name, os.environ.get(name))  # type: ignore[attr-defined]
            os.environ[name] = value

    def stop_tls_server(self) -> Any:
        port, self.port = self.port, None
        return port.stopListening() if port is not None else None

    @staticmethod
    def restore_env(name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def publish(self, path: str, body: str) -> tuple[str, str]:
        """Serve the guest ``body`` at ``path``; its URL and sha256."""
        data = module(body)
        self.files.files[path.encode()] = data
        return self.base + path, hashlib.sha256(data).hexdigest()


class ResolveTests(TLSServerMixin, TestCase):
    """sources.resolve: treq over TLS, as a reload fetches."""

    def setUp(self) -> None:
        self.start_tls_server()
        self.events: list[dict[str, Any]] = []
        self.patch(sources, "_log", Logger(namespace="httpwasm", observer=self.events.append))

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    @inlineCallbacks
    def test_fetch_verifies_and_caches_by_digest(self) -> Generator[Any, Any, None]:
        """An https guest is fetched (TLS checked against the CA), cached under its digest, and named by its URL."""
        url, digest = self.publish("/guests/auth.wat", version_guest(1))
        fetched = yield sources.resolve(url, None, 10)
        self.assertEqual((fetched.name, fetched.sha256, fetched.cached), ("auth", digest, False))
        self.assertEqual((self.cache / "sources" / f"{digest}.wasm").read_bytes(), fetched.data)

    @inlineCallbacks
    def test_pinned_digest_with_a_cached_copy_is_not_fetched(self) -> Generator[Any, Any, None]:
        """With --guest-sha256 and a verified copy in the cache, the URL is not fetched again (a cache hit)."""
        url, digest = self.publish("/g.wat", version_guest(1))
        yield sources.resolve(url, digest, 10)
        fetched = yield sources.resolve(url, digest, 10)
        self.assertTrue(fetched.cached)
        self.assertEqual(self.files.fetches[b"/g.wat"], 1)
        self.assertIn(f"using the cached copy with sha256 {digest}", self.lines()[-1])

    @inlineCallbacks
    def test_server_down_uses_the_last_verified_copy(self) -> Generator[Any, Any, None]:
        """If the fetch fails, the last verified copy of that URL is used and the log says so."""
        url, digest = self.publish("/g.wat", version_guest(1))
        yield sources.resolve(url, None, 10)
        yield self.stop_tls_server()
        fetched = yield sources.resolve(url, None, 10)
        self.assertEqual((fetched.sha256, fetched.cached), (digest, True))
        self.assertIn(f"cannot fetch {url}", self.lines()[-1])
        self.assertIn(f"using the last verified copy (sha256 {digest})", self.lines()[-1])

    @inlineCallbacks
    def test_no_verified_copy_is_an_error(self) -> Generator[Any, Any, None]:
        """A failed fetch without any verified copy fails, with the reason."""
        url = self.base + "/missing.wat"
        with self.assertRaises(sources.SourceError) as caught:
            yield sources.resolve(url, None, 10)
        self.assertIn(f"cannot fetch {url}: HTTP status 404; and no verified copy is cached", str(caught.exception))

    @inlineCallbacks
    def test_digest_mismatch_is_refused_with_both_digests(self) -> Generator[Any, Any, None]:
        """A fetched guest whose digest differs from --guest-sha256 is refused (and not cached)."""
        url, digest = self.publish("/g.wat", version_guest(1))
        wrong = "1" * 64
        with self.assertRaises(sources.SourceError) as caught:
            yield sources.resolve(url, wrong, 10)
        self.assertIn(f"has sha256 {digest}, not the expected {wrong}", str(caught.exception))
        self.assertFalse((self.cache / "sources" / f"{digest}.wasm").exists())


class OptionTests(SynchronousTestCase):
    def test_plain_http_needs_a_digest(self) -> None:
        """--guest http://... without --guest-sha256 is refused: nothing else would authenticate it."""
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--guest", "http://example.test/g.wasm", "--path", "."])
        self.assertIn("needs --guest-sha256", str(caught.exception))
        options = Options()
        options.parseOptions(["--guest", "http://example.test/g.wasm", "--guest-sha256", "a" * 64, "--path", "."])
        self.assertEqual(options["guest-sha256"], {0: "a" * 64})


class TwistdSourcesTests(TLSServerMixin, TwistdTestCase):
    """twistd fetches at startup (blocking, before the reactor runs) and at reload (treq)."""

    @inlineCallbacks
    def test_startup_reload_cache_and_server_down(self) -> Generator[Any, Any, None]:
        """An https guest serves from startup (its sha256 in the startup line); SIGHUP fetches it again; with the
        server down a reload uses the last verified copy and says so."""
        self.start_tls_server()
        url, digest = self.publish("/g.wat", version_guest(1))
        base = yield self.start_server("--guest", url, "--class", "tests.test_twistd.Hello")
        server = self.server
        self.assertIn(f"; sha256 {digest}", server.output())
        _, headers, _ = yield self.fetch("GET", base + "/")
        self.assertEqual(headers.getRawHeaders("x-version"), ["1"])

        _, digest2 = self.publish("/g.wat", version_guest(2))
        os.kill(server.process.pid, signal.SIGHUP)
        yield self.wait_for(server, f"reloaded g (sha256 {digest2})")
        _, headers, _ = yield self.fetch("GET", base + "/")
        self.assertEqual(headers.getRawHeaders("x-version"), ["2"])

        yield self.stop_tls_server()
        os.kill(server.process.pid, signal.SIGHUP)
        yield self.wait_for(server, "using the last verified copy")
        yield self.wait_for(server, f"reloaded g (sha256 {digest2})", count=2)
        self.assertEqual(self.files.fetches[b"/g.wat"], 2)

    @inlineCallbacks
    def test_startup_refusals(self) -> Generator[Any, Any, None]:
        """Startup fails with the reason: a digest that differs (both digests named), or no server and no copy."""
        self.start_tls_server()
        url, digest = self.publish("/g.wat", version_guest(1))
        wrong = "2" * 64
        status, output = yield self.exit_status(
            "--guest", url, "--guest-sha256", wrong, "--class", "tests.test_twistd.Hello"
        )
        self.assertEqual(status, 1)
        self.assertIn(f"has sha256 {digest}, not the expected {wrong}", output)
        status, output = yield self.exit_status(
            "--guest", self.base + "/none.wat", "--class", "tests.test_twistd.Hello"
        )
        self.assertEqual(status, 1)
        self.assertIn("HTTP status 404; and no verified copy is cached", output)

    @inlineCallbacks
    def wait_for(self, server: Any, text: str, count: int = 1) -> Generator[Any, Any, None]:
        if not (yield poll(lambda: server.exited() or server.output().count(text) >= count, DEADLINE)):
            self.fail(f"{text!r} not in the log:\n{server.output()}")
        if server.exited():
            self.fail(f"twistd exited:\n{server.output()}")
