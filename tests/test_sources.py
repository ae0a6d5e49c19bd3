"""Verified guest sources: ``--guest https://...``, ``--guest-sha256``, and the cache of fetched guests.

The guests are served over TLS by the test itself, with a certificate signed by
a CA the test makes; the host trusts that CA through ``SSL_CERT_FILE``.  The
cache lives in a temporary ``TWISTED_HTTPWASM_CACHE``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import stat
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import reactor, ssl
from twisted.internet.defer import CancelledError, Deferred, gatherResults, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from twisted_httpwasm.runtime import cache as cache_module
from twisted_httpwasm.service import sources
from twisted_httpwasm.service.tap import Options

from .support import TempFilesMixin, module, poll
from .test_daemon import DaemonTestCase
from .test_http2 import make_certificates
from .test_reload import version_guest
from .test_twistd import DEADLINE, TwistdTestCase


def make_tls(directory: Path) -> tuple[Path, ssl.CertificateOptions]:
    """A CA certificate file (PEM) and server options for 127.0.0.1 with a certificate that CA signed."""
    made = make_certificates()  # the same throwaway CA the HTTP/2 tests use
    ca_file = directory / "ca.pem"
    ca_file.write_bytes(made.ca_pem)
    return ca_file, ssl.PrivateCertificate.loadPEM(made.key_pem + made.cert_pem).options()


#: How long a trickling answer goes on at most (bounded: the test server never runs forever).
TRICKLE_BYTES = 240

#: What a huge answer holds: 1 GiB, made on the fly in 64 KiB chunks.
HUGE_BYTES = 1024**3
HUGE_CHUNK = b"\0" * (64 * 1024)


class Files(Resource):
    """Serves ``files`` by path and counts the requests for each; a path in ``misbehaving`` is answered badly.

    ``misbehaving[path]`` is ``"trickle"`` (headers, then 1 byte every 0.5 s),
    ``"stall"`` (headers and 1 byte, then nothing until the client goes) or
    ``"huge"`` (1 GiB, chunked, generated as the client reads it; it pauses
    once ``hold_at`` bytes are sent until ``resume`` fires, if set).
    ``open_requests`` are the misbehaving answers whose client is still connected.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[bytes, bytes] = {}
        self.fetches: dict[bytes, int] = {}
        self.misbehaving: dict[bytes, str] = {}
        self.open_requests: list[Any] = []
        self.redirects: dict[bytes, bytes] = {}
        self.huge_sent = 0
        self.hold_at: int | None = None
        self.resume: Deferred[None] | None = None

    def render_GET(self, request: Any) -> bytes | int:
        self.fetches[request.path] = self.fetches.get(request.path, 0) + 1
        if request.path in self.redirects:
            request.redirect(self.redirects[request.path])
            return b""
        behaviour = self.misbehaving.get(request.path)
        if behaviour is not None:
            self.open_requests.append(request)
            request.notifyFinish().addBoth(lambda _: self.open_requests.remove(request))
            getattr(self, f"_{behaviour}")(request)
            return NOT_DONE_YET
        if request.path not in self.files:
            request.setResponseCode(404)
            return b"not found"
        return self.files[request.path]

    def _trickle(self, request: Any) -> None:
        request.setHeader(b"content-length", b"%d" % TRICKLE_BYTES)
        sent = [0]

        def one_byte() -> None:
            if request in self.open_requests and sent[0] < TRICKLE_BYTES:
                request.write(b"x")
                sent[0] += 1
                reactor.callLater(0.5, one_byte)

        one_byte()

    def _stall(self, request: Any) -> None:
        request.setHeader(b"content-length", b"1000")
        request.write(b"x")  # the headers, and then nothing

    def _huge(self, request: Any) -> None:
        request.registerProducer(_HugeBody(self, request), False)


class _HugeBody:
    """A pull producer of :data:`HUGE_BYTES` zero bytes (no Content-Length: chunked)."""

    def __init__(self, files: Files, request: Any):
        self.files = files
        self.request = request
        self.sent = 0
        self.stopped = False

    def resumeProducing(self) -> None:
        files = self.files
        if self.stopped:
            return
        if files.hold_at is not None and self.sent >= files.hold_at and files.resume is not None:
            resume, files.resume = files.resume, None
            resume.addCallback(lambda _: self.resumeProducing())
            return
        if self.sent >= HUGE_BYTES:
            self.request.unregisterProducer()
            self.request.finish()
            return
        self.request.write(HUGE_CHUNK)
        self.sent += len(HUGE_CHUNK)
        files.huge_sent = self.sent

    def stopProducing(self) -> None:
        self.stopped = True


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


class SourcesTrustTests(TLSServerMixin, TestCase):
    """The sources/ cache: private whatever the umask; a directory or copy others may write is not used."""

    def setUp(self) -> None:
        self.start_tls_server()
        self.warnings: list[str] = []
        self.patch(sources, "_log", Logger(namespace="httpwasm", observer=lambda event: None))
        self.patch(cache_module, "_log", Logger(namespace="httpwasm", observer=self.record))
        self.patch(cache_module, "_warned", set())

    def record(self, event: dict[str, Any]) -> None:
        self.warnings.append(formatEvent(event))

    @inlineCallbacks
    def test_created_private_whatever_the_umask(self) -> Generator[Any, Any, None]:
        """With umask 000 the cache directory and sources/ are 0700, the copy and the note not writable by others."""
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)
        url, digest = self.publish("/g.wat", version_guest(1))
        yield sources.resolve(url, None, 10)
        self.assertEqual(stat.S_IMODE(self.cache.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE((self.cache / "sources").stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE((self.cache / "sources" / f"{digest}.wasm").stat().st_mode), 0o600)

    @inlineCallbacks
    def test_copies_others_may_write_are_not_used(self) -> Generator[Any, Any, None]:
        """A sources/ directory, or a copy, that its group or others may write is not a fallback (nor a pinned
        hit): with the server down, the fetch fails, and one warning says why."""
        url, digest = self.publish("/g.wat", version_guest(1))
        yield sources.resolve(url, None, 10)
        yield self.stop_tls_server()
        copy = self.cache / "sources" / f"{digest}.wasm"
        os.chmod(copy, 0o666)
        for pin in (None, digest):
            with self.assertRaises(sources.SourceError):
                yield sources.resolve(url, pin, 10)
        self.assertEqual(
            self.warnings,
            [f"httpwasm: cached guest {copy} is writable by its group or by others (mode 0666): not used"],
        )
        os.chmod(copy, 0o600)
        os.chmod(self.cache / "sources", 0o777)
        with self.assertRaises(sources.SourceError):
            yield sources.resolve(url, digest, 10)
        self.assertIn("is writable by its group or by others (mode 0777): not used", self.warnings[-1])
        os.chmod(self.cache / "sources", 0o700)
        fetched = yield sources.resolve(url, digest, 10)
        self.assertTrue(fetched.cached)


class BoundedFetchTests(TLSServerMixin, TestCase):
    """A fetch is bounded in time (the whole of it) and in size, and a newer reload can stop it."""

    def setUp(self) -> None:
        self.start_tls_server()
        self.patch(sources, "_log", Logger(namespace="httpwasm", observer=lambda event: None))

    @inlineCallbacks
    def assert_connection_closed(self) -> Generator[Any, Any, None]:
        if not (yield poll(lambda: not self.files.open_requests, 10)):
            self.fail("the fetch's connection is still open")

    @inlineCallbacks
    def test_trickling_or_stalled_body_ends_at_the_deadline(self) -> Generator[Any, Any, None]:
        """--guest-fetch-timeout bounds the whole fetch, body included: an answer that trickles 1 byte per 0.5 s
        or stalls after its headers fails with the reason (no copy is cached), and its connection is closed."""
        for behaviour in ("trickle", "stall"):
            path = f"/{behaviour}.wat"
            self.files.misbehaving[path.encode()] = behaviour
            with self.assertRaises(sources.SourceError) as caught:
                yield sources.resolve(self.base + path, None, 1)
            self.assertIn("took longer than 1 s (--guest-fetch-timeout)", str(caught.exception), behaviour)
            yield self.assert_connection_closed()

    @inlineCallbacks
    def test_a_hung_resolver_is_abandoned_at_the_deadline(self) -> Generator[Any, Any, None]:
        """Name resolution counts in the deadline: a resolver that hangs is abandoned when it passes."""
        release = threading.Event()
        self.addCleanup(release.set)
        resolve_name = socket.getaddrinfo

        def hung(*args: Any, **kwargs: Any) -> Any:
            release.wait(60)
            return resolve_name(*args, **kwargs)

        self.patch(socket, "getaddrinfo", hung)
        with self.assertRaises(sources.SourceError) as caught:
            yield sources.resolve(self.base + "/g.wat", None, 1)
        self.assertIn("took longer than 1 s (--guest-fetch-timeout)", str(caught.exception))

    @inlineCallbacks
    def test_cancelling_stops_the_fetch(self) -> Generator[Any, Any, None]:
        """A reload that is superseded cancels its fetch: the Deferred fails at once and the connection is shut."""
        self.files.misbehaving[b"/stall.wat"] = "stall"
        fetching = sources.resolve(self.base + "/stall.wat", None, 3600)
        if not (yield poll(lambda: self.files.open_requests, 10)):
            self.fail("the fetch did not start")
        fetching.cancel()
        yield self.assertFailure(fetching, CancelledError)
        yield self.assert_connection_closed()

    @inlineCallbacks
    def test_huge_answer_is_refused_at_the_cap(self) -> Generator[Any, Any, None]:
        """A 1 GiB chunked answer is refused once past the cap (no Content-Length to refuse it early): only a
        little more than the cap is read, and the connection is closed."""
        self.files.misbehaving[b"/huge.wasm"] = "huge"
        cap = 4 * 1024 * 1024
        with self.assertRaises(sources.SourceError) as caught:
            yield sources.resolve(self.base + "/huge.wasm", None, 60, max_bytes=cap)
        self.assertIn(f"larger than {cap} bytes (--guest-fetch-max-size)", str(caught.exception))
        yield self.assert_connection_closed()
        self.assertLess(self.files.huge_sent, HUGE_BYTES)


class DaemonSourcesTests(TLSServerMixin, DaemonTestCase):
    @inlineCallbacks
    def test_daemon_launch_does_not_hang_on_a_stalled_catalog(self) -> Generator[Any, Any, None]:
        """twistd without -n (it forks after loading): with a catalog that stalls after its headers, the launch
        command returns non-zero with the reason, and no daemon was started."""
        self.start_tls_server()
        self.files.misbehaving[b"/g.wat"] = "stall"
        url = self.base + "/g.wat"
        daemon = self.daemon(
            "httpwasm", "--guest", url, "--guest-fetch-timeout", "2", "--class", "tests.test_twistd.Hello"
        )
        status = yield self.launched(daemon)
        self.assertNotEqual(status, 0, daemon.output())
        self.assertIn(f"cannot fetch {url}: took longer than 2 s (--guest-fetch-timeout)", daemon.output())
        self.assertIsNone(daemon.pid, "a daemon was started")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of process ``pid``, in KiB, from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


class RedirectTests(TLSServerMixin, TestCase):
    def setUp(self) -> None:
        self.start_tls_server()
        self.patch(sources, "_log", Logger(namespace="httpwasm", observer=lambda event: None))

    @inlineCallbacks
    def test_redirects_are_followed_but_not_to_plain_http(self) -> Generator[Any, Any, None]:
        """A redirect to another https URL is followed (at startup and reload alike); one to http:// is refused,
        and so is a loop of redirects."""
        _, digest = self.publish("/real.wat", version_guest(1))
        self.files.redirects[b"/moved.wat"] = b"/real.wat"
        fetched = yield sources.resolve(self.base + "/moved.wat", None, 10)
        self.assertEqual((fetched.sha256, fetched.cached), (digest, False))
        # The startup fetch, in a thread here: this test's reactor serves the catalog meanwhile.
        fetched = yield deferToThread(sources.resolve_blocking, self.base + "/moved.wat", None, 10)
        self.assertEqual((fetched.sha256, fetched.cached), (digest, False))
        self.assertEqual(self.files.fetches[b"/real.wat"], 2)

        self.files.redirects[b"/down.wat"] = b"http://127.0.0.1:9/real.wat"
        with self.assertRaises(sources.SourceError) as caught:
            yield sources.resolve(self.base + "/down.wat", None, 10)
        self.assertIn("redirected to http://127.0.0.1:9/real.wat, which is not https", str(caught.exception))

        self.files.redirects[b"/loop.wat"] = b"/loop.wat"
        with self.assertRaises(sources.SourceError) as caught:
            yield sources.resolve(self.base + "/loop.wat", None, 10)
        self.assertIn(f"more than {sources.MAX_REDIRECTS} redirects", str(caught.exception))


class OptionTests(SynchronousTestCase):
    def test_plain_http_needs_a_digest(self) -> None:
        """--guest http://... without --guest-sha256 is refused: nothing else would authenticate it."""
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--guest", "http://example.test/g.wasm", "--path", "."])
        self.assertIn("needs --guest-sha256", str(caught.exception))
        options = Options()
        options.parseOptions(["--guest", "http://example.test/g.wasm", "--guest-sha256", "a" * 64, "--path", "."])
        self.assertEqual(options["guest-sha256"], {0: "a" * 64})

    def test_fetch_limits(self) -> None:
        """--guest-fetch-max-size takes a size (256MiB by default); --guest-fetch-timeout positive seconds."""
        options = Options()
        options.parseOptions(["--guest", "g.wat", "--path", "."])
        self.assertEqual(options["guest-fetch-max-size"], 256 * 1024 * 1024)
        options = Options()
        options.parseOptions(["--guest", "g.wat", "--path", ".", "--guest-fetch-max-size", "8MiB"])
        self.assertEqual(options["guest-fetch-max-size"], 8 * 1024 * 1024)
        for option, value in (("--guest-fetch-max-size", "0"), ("--guest-fetch-timeout", "-1")):
            with self.assertRaises(UsageError) as caught:
                Options().parseOptions(["--guest", "g.wat", "--path", ".", option, value])
            self.assertIn(option, str(caught.exception))


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
    def test_caches_are_private_under_umask_000(self) -> Generator[Any, Any, None]:
        """twistd started with umask 000 makes the cache directory and sources/ 0700, the key and files 0600."""
        self.start_tls_server()
        url, digest = self.publish("/g.wat", version_guest(1))
        previous = os.umask(0)  # inherited by twistd
        try:
            yield self.start_server("--guest", url, "--class", "tests.test_twistd.Hello")
        finally:
            os.umask(previous)
        modes = {
            path.relative_to(self.cache).as_posix(): stat.S_IMODE(path.stat().st_mode)
            for path in (
                self.cache,
                self.cache / "sources",
                self.cache / "key",
                self.cache / "sources" / f"{digest}.wasm",
            )
        }
        self.assertEqual(modes, {".": 0o700, "sources": 0o700, "key": 0o600, f"sources/{digest}.wasm": 0o600})
        self.assertEqual([stat.S_IMODE(path.stat().st_mode) for path in self.cache.glob("*.cwasm")], [0o600])

    @inlineCallbacks
    def test_startup_gives_up_at_the_deadline(self) -> Generator[Any, Any, None]:
        """A catalog that trickles or stalls after its headers: twistd (before the fork, where a daemon's launch
        command waits) exits with status 1 and one line saying why, instead of hanging."""
        self.start_tls_server()
        for behaviour in ("trickle", "stall"):
            url = f"{self.base}/{behaviour}.wat"
            self.files.misbehaving[f"/{behaviour}.wat".encode()] = behaviour
            status, output = yield self.exit_status(
                "--guest", url, "--guest-fetch-timeout", "2", "--class", "tests.test_twistd.Hello"
            )
            self.assertEqual(status, 1, output)
            lines = [line for line in output.splitlines() if "cannot fetch" in line]
            self.assertEqual(len(lines), 1, output)
            self.assertIn(f"--guest {url}: cannot fetch {url}: took longer than 2 s (--guest-fetch-timeout)", lines[0])

    @inlineCallbacks
    def test_reload_gives_up_at_the_deadline_then_loads_the_fixed_guest(self) -> Generator[Any, Any, None]:
        """At reload a trickling catalog is given up at --guest-fetch-timeout (the last verified copy goes on
        serving, and the log says why); the next SIGHUP, once the catalog is fixed, loads the new guest."""
        self.start_tls_server()
        url, digest = self.publish("/g.wat", version_guest(1))
        base = yield self.start_server(
            "--guest", url, "--guest-fetch-timeout", "2", "--class", "tests.test_twistd.Hello"
        )
        server = self.server
        self.files.misbehaving[b"/g.wat"] = "trickle"
        os.kill(server.process.pid, signal.SIGHUP)
        yield self.wait_for(server, f"cannot fetch {url}: took longer than 2 s (--guest-fetch-timeout); using the last")
        yield self.wait_for(server, f"reloaded g (sha256 {digest})")
        _, headers, _ = yield self.fetch("GET", base + "/")
        self.assertEqual(headers.getRawHeaders("x-version"), ["1"])

        del self.files.misbehaving[b"/g.wat"]
        _, digest2 = self.publish("/g.wat", version_guest(2))
        os.kill(server.process.pid, signal.SIGHUP)
        yield self.wait_for(server, f"reloaded g (sha256 {digest2})")
        _, headers, _ = yield self.fetch("GET", base + "/")
        self.assertEqual(headers.getRawHeaders("x-version"), ["2"])

    @inlineCallbacks
    def test_a_newer_sighup_supersedes_a_stuck_fetch(self) -> Generator[Any, Any, None]:
        """A reload stuck on a stalled catalog (long --guest-fetch-timeout) does not hold back the next: a second
        SIGHUP after the catalog was fixed stops the stuck fetch and loads the new guest."""
        self.start_tls_server()
        url, _ = self.publish("/g.wat", version_guest(1))
        base = yield self.start_server(
            "--guest", url, "--guest-fetch-timeout", "3600", "--class", "tests.test_twistd.Hello"
        )
        server = self.server
        self.files.misbehaving[b"/g.wat"] = "stall"
        os.kill(server.process.pid, signal.SIGHUP)
        if not (yield poll(lambda: self.files.open_requests, DEADLINE)):
            self.fail(f"the reload did not fetch:\n{server.output()}")

        del self.files.misbehaving[b"/g.wat"]
        _, digest2 = self.publish("/g.wat", version_guest(2))
        os.kill(server.process.pid, signal.SIGHUP)
        yield self.wait_for(server, "reload superseded by a newer one")
        yield self.wait_for(server, f"reloaded g (sha256 {digest2})")
        _, headers, _ = yield self.fetch("GET", base + "/")
        self.assertEqual(headers.getRawHeaders("x-version"), ["2"])
        if not (yield poll(lambda: not self.files.open_requests, 10)):
            self.fail("the stuck fetch's connection is still open")

    @inlineCallbacks
    def test_huge_answer_at_reload_is_refused_with_bounded_memory(self) -> Generator[Any, Any, None]:
        """A 1 GiB answer at reload is streamed to a temporary file and refused at --guest-fetch-max-size: the
        server's peak RSS grows by far less than the cap, it answers requests while the fetch runs, and the
        last verified copy goes on serving."""
        self.start_tls_server()
        url, digest = self.publish("/g.wat", version_guest(1))
        cap = 64 * 1024 * 1024
        base = yield self.start_server(
            "--guest", url, "--guest-fetch-max-size", "64MiB", "--class", "tests.test_twistd.Hello"
        )
        server = self.server
        before = memory_kib(server.process.pid)
        self.files.misbehaving[b"/g.wat"] = "huge"
        self.files.hold_at = cap // 4
        self.files.resume = resume = Deferred()
        os.kill(server.process.pid, signal.SIGHUP)
        if not (yield poll(lambda: self.files.huge_sent >= cap // 4, DEADLINE)):
            self.fail(f"the reload did not fetch:\n{server.output()}")
        # The fetch is under way (a quarter of the cap read, its connection open): serving goes on.
        answers = yield gatherResults([self.fetch("GET", base + "/") for _ in range(4)])
        self.assertEqual(
            [(status, headers.getRawHeaders("x-version")) for status, headers, _ in answers], [(200, ["1"])] * 4
        )
        self.assertTrue(self.files.open_requests)
        resume.callback(None)

        yield self.wait_for(server, f"cannot fetch {url}: larger than {cap} bytes (--guest-fetch-max-size)")
        yield self.wait_for(server, f"reloaded g (sha256 {digest})")
        after = memory_kib(server.process.pid)
        grown = after["VmHWM"] - max(before["VmHWM"], before["VmRSS"])
        self.assertLess(grown, cap // 1024 // 4, (before, after))  # a buffered answer would add the whole cap
        self.assertLess(self.files.huge_sent, HUGE_BYTES)
        _, headers, _ = yield self.fetch("GET", base + "/")
        self.assertEqual(headers.getRawHeaders("x-version"), ["1"])

    @inlineCallbacks
    def wait_for(self, server: Any, text: str, count: int = 1) -> Generator[Any, Any, None]:
        if not (yield poll(lambda: server.exited() or server.output().count(text) >= count, DEADLINE)):
            self.fail(f"{text!r} not in the log:\n{server.output()}")
        if server.exited():
            self.fail(f"twistd exited:\n{server.output()}")
