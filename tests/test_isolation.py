"""Isolation: what a guest can see of the host, and of earlier requests.

WASI is empty unless the operator grants something: no files, no environment,
no arguments, no sockets.  ``env=`` and ``mounts=`` (``--guest-env``,
``--guest-mount``) grant exactly what they name.  The probe is a C guest
(``tests/guests/isolation.c``) built against wasi-libc at test time, which
reports in response headers what libc and WASI let it see.

Per-request host state never carries over from one request to the next on
the same instance: a WAT guest changes everything it can on one request and
looks for traces of it on the next.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks

from twisted_httpwasm import Guest, GuestLoadError, Mount

from .support import ServerTestCase, c_guest_binary, execution_variants
from .test_resource import Echo, GuestTestMixin, Strings
from .test_resource_response import hello

GUEST_SOURCE = Path(__file__).resolve().parent / "guests" / "isolation.c"


class IsolationTestsMixin(GuestTestMixin):
    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.binary = c_guest_binary(GUEST_SOURCE, wasi=True)  # with wasi-libc; skips naming what is missing
        host = Path(self.mktemp())  # type: ignore[attr-defined]
        self.data = host / "data"
        self.data.mkdir(parents=True)
        (self.data / "file.txt").write_text("granted content")
        self.outside = host / "outside.txt"
        self.outside.write_text("not granted")
        os.symlink(self.outside, self.data / "link-out")
        os.symlink("/etc/passwd", self.data / "link-passwd")

    def serve_probe(self, **options: Any) -> str:
        guest = Guest(self.binary, execution=self.execution, **options)
        return self.serve_guest(guest, hello())  # type: ignore[attr-defined, no-any-return]

    @inlineCallbacks
    def probe(self, url: str, **probes: str) -> Any:
        """Response headers (lowercase name -> first value) for one request with ``x-<probe>`` headers."""
        status, headers, body, _ = yield self.get(url + "/", headers={f"x-{k}": [v] for k, v in probes.items()})
        self.assertEqual((status, body), (200, b""))
        return {name.decode().lower(): values[0].decode() for name, values in headers.getAllRawHeaders()}

    @inlineCallbacks
    def check_unreadable(self, url: str, *paths: str) -> Any:
        for path in paths:
            seen = yield self.probe(url, read=path)
            self.assertTrue(seen["x-read-result"].startswith("error:"), (path, seen["x-read-result"]))

    @inlineCallbacks
    def test_nothing_is_visible_by_default(self):
        """No environment, arguments, files, directories or extra descriptors, and an empty stdin."""
        self.assertIn("PATH", os.environ)
        url = self.serve_probe()
        seen = yield self.probe(url)
        self.assertEqual(
            {name: seen[name] for name in ("x-argc", "x-environ", "x-fds", "x-preopens", "x-stdin")},
            {"x-argc": "0", "x-environ": "0", "x-fds": "0", "x-preopens": "(none)", "x-stdin": "eof"},
        )
        for name in ("PATH", "HOME", "X"):
            seen = yield self.probe(url, env=name)
            self.assertEqual(seen["x-env-value"], "(unset)", name)
        yield self.check_unreadable(
            url, "/etc/passwd", str(self.data / "file.txt"), "file.txt", "../file.txt", "/data/file.txt"
        )
        for path in ("/", ".", "/tmp", str(self.data)):
            seen = yield self.probe(url, list=path)
            self.assertTrue(seen["x-list-result"].startswith("error:"), (path, seen))
        seen = yield self.probe(url, write=str(self.data / "new.txt"))
        self.assertTrue(seen["x-write-result"].startswith("error:"), seen)
        self.assertFalse((self.data / "new.txt").exists())

    @inlineCallbacks
    def test_env_grants_only_the_named_variables(self):
        url = self.serve_probe(env=[("X", "1")])
        seen = yield self.probe(url, env="X")
        self.assertEqual((seen["x-env-value"], seen["x-environ"]), ("1", "1"))
        for name in ("PATH", "HOME"):
            seen = yield self.probe(url, env=name)
            self.assertEqual(seen["x-env-value"], "(unset)", name)
        self.assertEqual((seen["x-fds"], seen["x-argc"]), ("0", "0"))

    @inlineCallbacks
    def test_read_only_mount_is_readable_and_nothing_else(self):
        """A read-only mount: its files are readable at the guest path; writing fails; nothing
        outside it is reachable, not through '..' and not through symlinks pointing out."""
        url = self.serve_probe(mounts=[Mount(str(self.data), "/data", read_only=True)])
        seen = yield self.probe(url, read="/data/file.txt")
        self.assertEqual(seen["x-read-result"], "ok:granted content")
        self.assertEqual((seen["x-fds"], seen["x-preopens"], seen["x-environ"]), ("1", "/data", "0"))
        seen = yield self.probe(url, list="/data")
        self.assertEqual(seen["x-list-result"], "ok:5")  # ., .., file.txt and the two links
        for path in ("/data/new.txt", "/data/file.txt"):
            seen = yield self.probe(url, write=path)
            self.assertTrue(seen["x-write-result"].startswith("error:"), (path, seen))
        self.assertEqual(sorted(os.listdir(self.data)), ["file.txt", "link-out", "link-passwd"])
        self.assertEqual((self.data / "file.txt").read_text(), "granted content")
        yield self.check_unreadable(
            url,
            "/data/../outside.txt",
            "/outside.txt",
            str(self.outside),
            str(self.data / "file.txt"),
            "/data/link-out",
            "/data/link-passwd",
            "/etc/passwd",
        )

    @inlineCallbacks
    def test_read_write_mount_can_be_written(self):
        url = self.serve_probe(mounts=[Mount(str(self.data), "/data", read_only=False)])
        seen = yield self.probe(url, write="/data/new.txt")
        self.assertEqual(seen["x-write-result"], "ok")
        self.assertEqual((self.data / "new.txt").read_text(), "written by the guest")
        seen = yield self.probe(url, read="/data/new.txt")
        self.assertEqual(seen["x-read-result"], "ok:written by the guest")
        for path in ("/data/../escaped.txt", "/data/link-out", "/escaped.txt"):
            seen = yield self.probe(url, write=path)
            self.assertTrue(seen["x-write-result"].startswith("error:"), (path, seen))
        self.assertFalse((self.data.parent / "escaped.txt").exists())
        self.assertEqual(self.outside.read_text(), "not granted")

    def test_missing_mount_directory_refuses_the_guest(self):
        """A mount whose host directory does not exist is refused at load with a GuestLoadError."""
        missing = str(self.data / "missing")
        with self.assertRaises(GuestLoadError) as caught:
            Guest(self.binary, execution=self.execution, mounts=[Mount(missing, "/data")])
        self.assertIn("failed to initialise", str(caught.exception))
        self.assertIn("preopen", str(caught.exception))

    @inlineCallbacks
    def test_mount_directory_removed_later_gives_503(self):
        """The directory goes away after load: new instances cannot be made, so 503, not a crash."""
        gone = self.data / "gone"
        gone.mkdir()
        guest = Guest(self.binary, execution=self.execution, mounts=[Mount(str(gone), "/data")])
        url = self.serve_guest(guest, hello())  # type: ignore[attr-defined]
        guest.pool.clear()
        gone.rmdir()
        status, _, body, _ = yield self.get(url + "/")
        self.assertEqual((status, body), (503, b"Service Unavailable\n"))


globals().update(execution_variants(IsolationTestsMixin, ServerTestCase))


# -- per-request state -----------------------------------------------------------------------------

S = Strings()
LEAVES_TRACES = S.wrap(f"""
  ;; Request 1 (the instance's first) changes everything it can: request header and body, method,
  ;; URI, response status, header and body, features; it answers itself.  Every later request
  ;; reports in response headers what it still sees of those changes, then passes the request on.
  (func (export "handle_request") (result i64) (local $count i64)
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
    (if (i32.eq (i32.load (i32.const 0)) (i32.const 1)) (then
      (drop (call $enable_features (i32.const 3)))
      (call $set_header_value (i32.const 0) {S("x-leak")} {S("from request 1")})
      (call $write_body (i32.const 0) {S("request body 1")})
      (call $set_method {S("DELETE")})
      (call $set_uri {S("/leaked-uri")})
      (call $set_status_code (i32.const 418))
      (call $set_header_value (i32.const 1) {S("x-leak-response")} {S("from request 1")})
      (call $write_body (i32.const 1) {S("response body 1")})
      (return (i64.const 0))))
    ;; what is left?  (each value is measured before this request sets anything)
    (i32.store (i32.const 100) (i32.wrap_i64 (call $get_header_values (i32.const 0) {S("x-leak")}
                                                                     (i32.const 4096) (i32.const 0))))
    (i32.store (i32.const 104) (i32.wrap_i64 (i64.shr_u (call $get_header_names (i32.const 1)
                                                        (i32.const 4096) (i32.const 0)) (i64.const 32))))
    (i32.store (i32.const 108) (call $get_status_code))
    (i32.store (i32.const 112) (call $enable_features (i32.const 0)))
    (i32.store (i32.const 116) (call $get_method (i32.const 4096) (i32.const 0)))
    (i32.store (i32.const 120) (call $get_uri (i32.const 4096) (i32.const 0)))
    (i32.store (i32.const 124) (i32.wrap_i64 (call $read_body (i32.const 1) (i32.const 4096) (i32.const 100))))
    (i32.store (i32.const 128) (i32.wrap_i64 (call $read_body (i32.const 0) (i32.const 4096) (i32.const 100))))
    (call $report {S("x-request-header-values")} (i32.load (i32.const 100)))
    (call $report {S("x-response-header-count")} (i32.load (i32.const 104)))
    (call $report {S("x-status")} (i32.load (i32.const 108)))
    (call $report {S("x-features")} (i32.load (i32.const 112)))
    (call $report {S("x-method-length")} (i32.load (i32.const 116)))
    (call $report {S("x-uri-length")} (i32.load (i32.const 120)))
    (call $report {S("x-response-body-length")} (i32.load (i32.const 124)))
    (call $report {S("x-request-body-length")} (i32.load (i32.const 128)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
  ;; response header = the decimal digits of $value
  (func $report (param $p i32) (param $n i32) (param $value i32) (local $at i32)
    (local.set $at (i32.const 2200))
    (loop $digit
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.rem_u (local.get $value) (i32.const 10))))
      (local.set $value (i32.div_u (local.get $value) (i32.const 10)))
      (br_if $digit (local.get $value)))
    (call $set_header_value (i32.const 1) (local.get $p) (local.get $n)
                            (local.get $at) (i32.sub (i32.const 2200) (local.get $at))))
""")


class RequestStateTestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_nothing_carries_over_to_the_next_request_on_the_same_instance(self):
        """The second request on the instance sees its own request only: none of the first
        request's header, body, method, URI, status, response or features."""
        guest = self.guest(LEAVES_TRACES)
        url = self.serve_guest(guest, Echo())  # type: ignore[attr-defined]
        status, headers, body, _ = yield self.get(url + "/first", method="POST", data=b"first body")
        self.assertEqual((status, body), (418, b"response body 1"))
        self.assertEqual(headers.getRawHeaders(b"x-leak-response"), [b"from request 1"])
        status, headers, body, _ = yield self.get(url + "/second", method="POST", data=b"12345")
        self.assertEqual(status, 200, body)
        seen = json.loads(body)  # what the downstream got: the second request as sent
        self.assertEqual((seen["method"], seen["uri"]), ("POST", "/second"))
        self.assertEqual(seen["body"], "")  # the guest read it (without buffer_request): consumed
        self.assertNotIn("x-leak", seen["headers"])
        self.assertIsNone(headers.getRawHeaders(b"x-leak-response"))
        reported = {
            name.decode().lower(): values[0]
            for name, values in headers.getAllRawHeaders()
            if name.lower().startswith(b"x-")
        }
        self.assertEqual(
            reported,
            {
                "x-request-header-values": b"0",
                "x-response-header-count": b"0",
                "x-status": b"200",
                "x-features": b"0",
                "x-method-length": b"4",  # POST
                "x-uri-length": b"7",  # /second
                "x-response-body-length": b"0",
                "x-request-body-length": b"5",
            },
        )
        self.assertEqual((guest.pool.stats.created, guest.pool.stats.in_use), (1, 0))  # one instance served both


globals().update(execution_variants(RequestStateTestsMixin, ServerTestCase))
