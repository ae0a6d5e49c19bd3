"""Security boundaries around the downstream that are not the proxy's (see test_proxy_security.py).

- A WSGI application cannot tell ``X_User`` from ``X-User`` (both are
  ``HTTP_X_USER``): headers with ``_`` in their names are dropped before it
  sees the request, so a guest that strips ``X-User`` cannot be bypassed.
- A writable ``--guest-mount`` inside (or around) the ``--path`` directory is
  refused at startup: a guest could plant symlinks there that static.File
  follows.
"""

from __future__ import annotations

import json
import os
from collections.abc import Generator
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.python import usage
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.wsgi import WSGIResource

from twisted_httpwasm import Execution, GuestResource
from twisted_httpwasm.service.tap import Options, make_site
from twisted_httpwasm.web.wsgi import UnderscoreHeaderGuard

from .support import NOOP_RESPONSE, ServerTestCase, TempFilesMixin, make_guest
from .test_proxy_security import raw_get, status_of
from .test_twistd import TwistdTestCase, free_port


def environ_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A WSGI application answering with the HTTP_* keys of its environ, as JSON."""
    seen = {key: value for key, value in environ.items() if key.startswith("HTTP_")}
    body = json.dumps(seen).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


#: Removes the request header x-user, as an authenticating guest would before setting its own.
STRIP_USER_GUEST = (
    """
  (data (i32.const 0) "x-user")
  (func (export "handle_request") (result i64)
    (call $remove_header (i32.const 0) (i32.const 0) (i32.const 6))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: A client trying every spelling WSGI maps to HTTP_X_USER, and one header that is fine.
SPOOFING = b"X_User: admin\r\nx_user: admin\r\nX-User: admin\r\nX-Other_Name: 1\r\nX-Fine: yes\r\n"


def body_of(answer: bytes) -> dict[str, str]:
    seen: dict[str, str] = json.loads(answer.partition(b"\r\n\r\n")[2])
    return seen


class UnderscoreHeaderTests(TempFilesMixin, ServerTestCase):
    """X_User cannot slip past a guest that strips X-User in front of a WSGI application."""

    timeout = 30

    def wsgi(self) -> WSGIResource:
        return WSGIResource(reactor, reactor.getThreadPool(), environ_app)  # type: ignore[attr-defined]

    def serve_stripping_guest(self, downstream: Any) -> str:
        guest = make_guest(STRIP_USER_GUEST, execution=Execution.INLINE)
        return self.listen(Site(GuestResource(guest, downstream)))

    def serve_tap(self, *args: str) -> str:
        """The site twistd httpwasm builds for ``args`` (with the stripping guest)."""
        options = Options()
        options.parseOptions(["--guest", self.guest_file(STRIP_USER_GUEST), "--execution", "inline", *args])
        root = options["root"]
        self.addCleanup(root._threadpool.stop)
        return self.listen(make_site(options, MultiService()))

    @inlineCallbacks
    def test_without_the_guard_x_user_is_spoofable(self) -> Any:
        """Why the guard exists: behind a bare WSGIResource, X_User: admin arrives as HTTP_X_USER."""
        url = self.serve_stripping_guest(self.wsgi())
        answer = yield raw_get(url, b"/", SPOOFING)
        self.assertEqual(status_of(answer), 200, answer)
        self.assertEqual(body_of(answer).get("HTTP_X_USER"), "admin,admin")  # X_User and x_user

    @inlineCallbacks
    def test_guard_drops_underscore_headers_after_the_guest(self) -> Any:
        """UnderscoreHeaderGuard around the WSGIResource: no HTTP_X_USER, no other _ header, the rest kept."""
        url = self.serve_stripping_guest(UnderscoreHeaderGuard(self.wsgi()))
        answer = yield raw_get(url, b"/", SPOOFING)
        self.assertEqual(status_of(answer), 200, answer)
        seen = body_of(answer)
        self.assertNotIn("HTTP_X_USER", seen)
        self.assertNotIn("HTTP_X_OTHER_NAME", seen)
        self.assertEqual(seen["HTTP_X_FINE"], "yes")

    @inlineCallbacks
    def test_guard_around_a_resource_tree(self) -> Any:
        """Around a tree with the WSGIResource as a child, the headers are dropped during traversal."""
        tree = Resource()
        tree.putChild(b"app", self.wsgi())
        url = self.serve_stripping_guest(UnderscoreHeaderGuard(tree))
        answer = yield raw_get(url, b"/app/x", SPOOFING)
        self.assertEqual(status_of(answer), 200, answer)
        self.assertNotIn("HTTP_X_USER", body_of(answer))

    @inlineCallbacks
    def test_twistd_httpwasm_wsgi_drops_underscore_headers(self) -> Any:
        """twistd httpwasm --wsgi puts the guard in front of the application by default."""
        url = self.serve_tap("--wsgi", f"{__name__}.environ_app")
        answer = yield raw_get(url, b"/", SPOOFING)
        self.assertEqual(status_of(answer), 200, answer)
        seen = body_of(answer)
        self.assertNotIn("HTTP_X_USER", seen)
        self.assertEqual(seen["HTTP_X_FINE"], "yes")

    @inlineCallbacks
    def test_keep_underscore_headers_option(self) -> Any:
        """--wsgi-keep-underscore-headers passes them on, as twistd web would."""
        url = self.serve_tap("--wsgi", f"{__name__}.environ_app", "--wsgi-keep-underscore-headers")
        answer = yield raw_get(url, b"/", SPOOFING)
        self.assertEqual(body_of(answer)["HTTP_X_OTHER_NAME"], "1")
        self.assertEqual(body_of(answer)["HTTP_X_USER"], "admin,admin")

    def test_keep_underscore_headers_needs_wsgi(self) -> None:
        """--wsgi-keep-underscore-headers without --wsgi is a usage error naming the downstream."""
        error = self.assertRaises(
            usage.UsageError,
            Options().parseOptions,
            ["--guest", "g.wasm", "--path", ".", "--wsgi-keep-underscore-headers"],
        )
        self.assertIn("--wsgi-keep-underscore-headers applies to --wsgi, not to --path .", str(error))


class WritableMountTests(TwistdTestCase):
    """A writable --guest-mount and a --path directory may not overlap."""

    def directories(self) -> tuple[str, str, str]:
        """(a parent, the served directory inside it, an uploads directory inside that)."""
        parent = self.mktemp()
        served = os.path.join(parent, "served")
        uploads = os.path.join(served, "uploads")
        os.makedirs(uploads)
        return parent, served, uploads

    def refusal(self, *args: str) -> str:
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--guest", "g.wasm", *args])
        return str(error)

    def test_writable_mount_inside_path_refused(self) -> None:
        """A writable mount inside the served directory is refused, saying why and what to do."""
        _, served, uploads = self.directories()
        message = self.refusal("--path", served, "--guest-mount", f"{uploads}:/uploads")
        self.assertIn(f"--guest-mount {uploads}:/uploads is writable and inside the --path {served}", message)
        self.assertIn("a guest could create symlinks there", message)
        self.assertIn("read-only (:ro)", message)

    def test_writable_mount_around_or_at_path_refused(self) -> None:
        """A writable mount of the served directory itself, or of a parent, is refused too (either order)."""
        parent, served, _ = self.directories()
        self.assertIn("around the --path", self.refusal("--guest-mount", f"{parent}:/p", "--path", served))
        self.assertIn("inside the --path", self.refusal("--path", served, "--guest-mount", f"{served}:/s"))

    def test_writable_mount_through_a_symlink_refused(self) -> None:
        """A mount named through a symlink is compared by where it really is."""
        parent, served, uploads = self.directories()
        link = os.path.join(parent, "link")
        os.symlink(uploads, link)
        self.assertIn("is writable and inside", self.refusal("--path", served, "--guest-mount", f"{link}:/up"))

    def test_read_only_or_separate_mounts_accepted(self) -> None:
        """A read-only mount inside --path, and a writable one elsewhere, are fine."""
        parent, served, uploads = self.directories()
        elsewhere = os.path.join(parent, "elsewhere")
        os.makedirs(elsewhere)
        options = Options()
        options.parseOptions(
            [
                "--guest",
                "g.wasm",
                "--path",
                served,
                "--guest-mount",
                f"{uploads}:/u:ro",
                "--guest-mount",
                f"{elsewhere}:/e",
            ]
        )
        self.assertEqual([mount.read_only for mount in options["guest-mounts"]], [True, False])

    @inlineCallbacks
    def test_twistd_refuses_writable_mount_inside_path(self) -> Generator[Any, Any, None]:
        """twistd httpwasm exits non-zero with the reason, before serving anything."""
        _, served, uploads = self.directories()
        status, output = yield self.exit_status(
            "--guest",
            self.guest_file(STRIP_USER_GUEST),
            "--path",
            served,
            "--guest-mount",
            f"{uploads}:/uploads",
            "--listen",
            f"tcp:{free_port()}:interface=127.0.0.1",
        )
        self.assertNotEqual(status, 0, output)
        self.assertIn("a guest could create symlinks there", output)
        self.assertNotIn("Traceback (most recent call last)", output)
