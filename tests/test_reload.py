"""Hot reload: ``GuestResource.replace_guest``, :class:`GuestReloader`, and ``kill -HUP`` on a real ``twistd``.

The in-process tests swap guests under a live loopback server; the
end-to-end tests rewrite the guest file the command line names and send
SIGHUP to a ``twistd httpwasm`` subprocess (with ``--workers 2`` too).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from twisted_httpwasm import GuestResource
from twisted_httpwasm.service import reload as reload_module
from twisted_httpwasm.service.reload import GuestReloader, ReloadError, WatchService

from .support import NOOP_RESPONSE, LogCapture, ServerTestCase, TempFilesMixin, make_guest, module, poll
from .test_twistd import DEADLINE, TwistdTestCase


def version_guest(version: int) -> str:
    """Adds ``x-version: VERSION`` to every response and passes the request on."""
    return (
        f"""
  (data (i32.const 0) "x-version")
  (data (i32.const 16) "{version}")
  (func (export "handle_request") (result i64)
    (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 9) (i32.const 16) (i32.const 1))
    (i64.const 1))
"""
        + NOOP_RESPONSE
    )


def pinning_guest(version: int) -> str:
    """Remembers a request number in the instance (a global) and returns it as req_ctx.

    handle_response logs ``vVERSION same instance`` when the req_ctx it gets is the
    number this instance remembered, ``vVERSION other instance`` otherwise.
    """
    return f"""
  (global $n (mut i32) (i32.const 0))
  (data (i32.const 0) "v{version} same instance")
  (data (i32.const 32) "v{version} other instance")
  (func (export "handle_request") (result i64)
    (global.set $n (i32.add (global.get $n) (i32.const 7)))
    (i64.or (i64.shl (i64.extend_i32_u (global.get $n)) (i64.const 32)) (i64.const 1)))
  (func (export "handle_response") (param $ctx i32) (param $is_error i32)
    (if (i32.eq (local.get $ctx) (global.get $n))
      (then (call $log (i32.const 1) (i32.const 0) (i32.const 16)))
      (else (call $log (i32.const 1) (i32.const 32) (i32.const 17)))))
"""


class Held(Resource):
    """A downstream that answers only when the test fires ``release``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.arrived: Deferred[None] = Deferred()
        self.release: Deferred[None] = Deferred()

    def render_GET(self, request: Any) -> Any:
        if self.arrived.called:
            return b"quick"

        def answer(_: object) -> None:
            request.write(b"held")
            request.finish()

        self.release.addCallback(answer)
        self.arrived.callback(None)
        return NOT_DONE_YET


class Plain(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"ok"


class ReplaceGuestTests(ServerTestCase):
    @inlineCallbacks
    def test_request_in_flight_finishes_on_the_instance_it_pinned(self) -> Generator[Any, Any, None]:
        """A request started before replace_guest runs handle_response on the old guest's instance; new ones get
        the new guest; the old guest's instances are freed once that request ended."""
        old = make_guest(pinning_guest(1), name="pinning")
        new = make_guest(pinning_guest(2), name="pinning")
        logged = LogCapture(self, "pinning")
        downstream = Held()
        resource = GuestResource(old, downstream)
        url = self.serve(resource)

        pinned = self.fetch("GET", url + "/slow")
        yield downstream.arrived
        self.assertIs(resource.replace_guest(new), old)
        self.assertEqual(old.pool.stats.in_use, 1)  # still pinned by the request in flight

        status, _, body = yield self.fetch("GET", url + "/after")
        self.assertEqual((status, body), (200, b"quick"))
        downstream.release.callback(None)
        status, _, body = yield pinned
        self.assertEqual((status, body), (200, b"held"))

        texts = [text for _, text in logged.messages()]
        self.assertEqual(sorted(t.split("] ", 1)[1] for t in texts), ["v1 same instance", "v2 same instance"])
        # The old pool kept nothing: its last instance was dropped when the request gave it back.
        self.assertEqual((old.pool.stats.in_use, old.pool.stats.idle), (0, 0))
        self.assertTrue(old.pool.retired)
        self.assertGreaterEqual(old.pool.stats.recycled, 1)

    def test_execution_mode_must_match(self) -> None:
        """replace_guest refuses a guest that would need another runner (thread vs inline)."""
        resource = GuestResource(make_guest(version_guest(1)), Plain())
        with self.assertRaises(ValueError):
            resource.replace_guest(make_guest(version_guest(2), execution="inline"))


class ReloaderTests(ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        self.patch(reload_module, "_log", Logger(namespace="httpwasm", observer=self.events.append))

    def lines(self) -> list[str]:
        return [formatEvent(event) for event in self.events]

    @inlineCallbacks
    def test_failing_guest_leaves_the_whole_chain_serving(self) -> Generator[Any, Any, None]:
        """If one guest of a chain fails to load, no guest is swapped and one error line says why."""
        outer = GuestResource(make_guest(version_guest(1), name="outer"), Plain())
        inner = GuestResource(make_guest(version_guest(1), name="inner"), Plain())
        before = [outer.guest, inner.guest]

        def load() -> list[Any]:
            make_guest(version_guest(2))  # the first one loads...
            raise ReloadError("--guest inner.wat: guest 'inner' does not export handle_response")

        reloader = GuestReloader([outer, inner], load)
        swapped = yield reloader.reload()
        self.assertFalse(swapped)
        self.assertEqual(reloader.guests, before)
        self.assertEqual(
            self.lines(),
            [
                "httpwasm: reload failed, the running guests keep serving: "
                "--guest inner.wat: guest 'inner' does not export handle_response"
            ],
        )

    @inlineCallbacks
    def test_a_newer_reload_interrupts_and_supersedes_the_running_one(self) -> Generator[Any, Any, None]:
        """A reload asked for while one loads calls ``interrupt`` (which ends a fetch: the load fails with
        CancelledError) and loads again; the superseded one says so, runs no hooks, and swaps nothing."""
        resource = GuestResource(make_guest(version_guest(1)), Plain())
        fresh = make_guest(version_guest(2))
        loads: list[Deferred[list[Any]]] = []
        hooks: list[str] = []

        def load() -> Deferred[list[Any]]:
            loads.append(Deferred())
            return loads[-1]

        reloader = GuestReloader([resource], load, interrupt=lambda: loads[-1].cancel())
        reloader.after_reload.append(lambda: hooks.append("after"))
        done = reloader.reload()
        self.assertIs(reloader.reload(), done)
        self.assertEqual(len(loads), 2)  # the first was interrupted, the second runs
        loads[1].callback([fresh])
        swapped = yield done
        self.assertTrue(swapped)
        self.assertIs(resource.guest, fresh)
        self.assertEqual(hooks, ["after"])
        self.assertEqual(self.lines()[0], "httpwasm: reload superseded by a newer one")

    @inlineCallbacks
    def test_a_reload_that_cannot_be_interrupted_runs_once_more_after(self) -> Generator[Any, Any, None]:
        """Without a fetch to stop (a load compiling), the running load finishes and one more runs after it."""
        resource = GuestResource(make_guest(version_guest(1)), Plain())
        loads: list[Deferred[list[Any]]] = []

        def load() -> Deferred[list[Any]]:
            loads.append(Deferred())
            return loads[-1]

        reloader = GuestReloader([resource], load, interrupt=lambda: None)
        done = reloader.reload()
        reloader.reload()
        reloader.reload()
        self.assertEqual(len(loads), 1)
        loads[0].callback([make_guest(version_guest(2))])
        self.assertEqual(len(loads), 2)  # the reloads asked meanwhile: one more
        latest = make_guest(version_guest(3))
        loads[1].callback([latest])
        self.assertTrue((yield done))
        self.assertIs(resource.guest, latest)

    @inlineCallbacks
    def test_every_guest_is_swapped_and_named_with_its_digest(self) -> Generator[Any, Any, None]:
        """A good reload swaps every guest of the chain and logs each one's sha256; after_reload hooks run."""
        outer = GuestResource(make_guest(version_guest(1), name="outer"), Plain())
        inner = GuestResource(make_guest(version_guest(1), name="inner"), Plain())
        fresh = [make_guest(version_guest(2), name="outer"), make_guest(version_guest(2), name="inner")]
        hooks: list[str] = []
        reloader = GuestReloader([outer, inner], lambda: fresh)
        reloader.after_reload.append(lambda: hooks.append("ran"))
        swapped = yield reloader.reload()
        self.assertTrue(swapped)
        self.assertEqual(reloader.guests, fresh)
        self.assertEqual(hooks, ["ran"])
        self.assertEqual(
            self.lines(),
            [f"httpwasm: reloaded outer (sha256 {fresh[0].sha256}) -> inner (sha256 {fresh[1].sha256})"],
        )


# -- end to end: twistd and SIGHUP ----------------------------------------------------------


def write_guest(path: str, body: str) -> None:
    """Replace ``path`` atomically (what a deploy does), so twistd never reads half a file."""
    temporary = path + ".new"
    Path(temporary).write_bytes(module(body))
    os.replace(temporary, path)


class HangupTestCase(TwistdTestCase):
    """Helpers of the SIGHUP and --watch end-to-end tests."""

    RELOADED = "httpwasm: reloaded"
    FAILED = "httpwasm: reload failed"

    @inlineCallbacks
    def wait_for_count(self, text: str, count: int) -> Generator[Any, Any, None]:
        server = self.server
        if not (yield poll(lambda: server.exited() or server.output().count(text) >= count, DEADLINE)):
            self.fail(f"no {count}. {text!r} in the log:\n{server.output()}")
        if server.exited():
            self.fail(f"twistd exited:\n{server.output()}")

    @inlineCallbacks
    def versions(self, url: str, count: int = 4) -> Generator[Any, Any, list[str]]:
        responses = yield gatherResults([self.fetch("GET", url + "/") for _ in range(count)])
        return [headers.getRawHeaders("x-version", ["-"])[0] for _, headers, _ in responses]


class HangupTests(HangupTestCase):
    @inlineCallbacks
    def test_reload_under_load_drops_nothing(self) -> Generator[Any, Any, None]:
        """8 concurrent clients across a SIGHUP that swaps x-version 1 for 2: no failed request, every response
        has version 1 or 2, and none that started after the reload line has 1."""
        guest = self.guest_file(version_guest(1))
        url = yield self.start_server("--guest", guest, "--class", "tests.test_twistd.Hello")
        results: list[tuple[float, int, str]] = []  # (start, status, version)
        failures: list[str] = []
        reloaded_at: list[float] = []
        ended: list[bool] = []  # the clients stop when the test ends, whatever happened
        self.addCleanup(ended.append, True)

        @inlineCallbacks
        def client() -> Generator[Any, Any, None]:
            # Until 200 responses after the reload (however long a loaded machine takes), or the first failure.
            while not ended and not failures and (not reloaded_at or len(results) < len(results_at_reload) + 200):
                started = time.monotonic()
                try:
                    status, headers, _ = yield self.fetch("GET", url + "/load")
                except Exception as error:  # noqa: BLE001  # counted and reported, not raised
                    failures.append(repr(error))
                    continue
                results.append((started, status, headers.getRawHeaders("x-version", ["-"])[0]))

        results_at_reload: list[Any] = []
        clients = gatherResults([client() for _ in range(8)])
        if not (yield poll(lambda: failures or len(results) >= 200, DEADLINE)):
            self.fail(f"only {len(results)} responses in {DEADLINE} s before the reload")
        write_guest(guest, version_guest(2))
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.RELOADED, 1)
        reloaded_at.append(time.monotonic())
        results_at_reload.extend(results)
        yield clients

        self.assertEqual(failures, [])
        self.assertEqual({status for _, status, _ in results}, {200})
        self.assertEqual({version for _, _, version in results} - {"1", "2"}, set())
        after = [version for started, _, version in results if started > reloaded_at[0]]
        self.assertGreater(len(after), 0)
        self.assertEqual(set(after), {"2"})
        self.assertIn("1", {version for _, _, version in results})

    @inlineCallbacks
    def test_broken_guest_is_refused_and_the_old_one_serves(self) -> Generator[Any, Any, None]:
        """Reload to a broken guest: the old one still serves, one error line names the reason; reload to a good
        one: it takes over."""
        guest = self.guest_file(version_guest(1))
        url = yield self.start_server("--guest", guest, "--class", "tests.test_twistd.Hello")
        Path(guest).write_text(
            '(module (memory (export "memory") 1) (func (export "handle_request") (result i64) (i64.const 1)))'
        )
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.FAILED, 1)
        self.assertEqual((yield self.versions(url)), ["1"] * 4)
        failed = [line for line in self.server.output().splitlines() if self.FAILED in line]
        self.assertEqual(len(failed), 1)
        self.assertIn("does not export handle_response", failed[0])

        write_guest(guest, version_guest(2))
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.RELOADED, 1)
        self.assertEqual((yield self.versions(url)), ["2"] * 4)

    @inlineCallbacks
    def test_config_file_is_read_again(self) -> Generator[Any, Any, None]:
        """--guest-config-file is read again at each reload: the guest answers with the new configuration."""
        from .test_twistd import ANSWERING_GUEST

        config = self.mktemp()
        Path(config).write_bytes(b"first")
        url = yield self.start_server(
            "--guest",
            self.guest_file(ANSWERING_GUEST),
            "--guest-config-file",
            config,
            "--class",
            "tests.test_twistd.Hello",
        )
        self.assertEqual((yield self.fetch("GET", url + "/guest"))[2], b"first")
        Path(config).write_bytes(b"second")
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.RELOADED, 1)
        self.assertEqual((yield self.fetch("GET", url + "/guest"))[2], b"second")

    @inlineCallbacks
    def test_sha256_mismatch_refused_at_startup_and_at_reload(self) -> Generator[Any, Any, None]:
        """--guest-sha256: a guest whose digest differs is refused at startup (exit 1) and at reload (the old one
        serves), with both digests in the message."""
        import hashlib

        guest = self.guest_file(version_guest(1))
        good = hashlib.sha256(Path(guest).read_bytes()).hexdigest()
        wrong = "0" * 64
        status, output = yield self.exit_status(
            "--guest", guest, "--guest-sha256", wrong, "--class", "tests.test_twistd.Hello"
        )
        self.assertEqual(status, 1)
        self.assertIn(f"has sha256 {good}, not the expected {wrong}", output)

        url = yield self.start_server("--guest", guest, "--guest-sha256", good, "--class", "tests.test_twistd.Hello")
        self.assertIn(f"; sha256 {good}", self.server.output())
        write_guest(guest, version_guest(2))
        changed = hashlib.sha256(Path(guest).read_bytes()).hexdigest()
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.FAILED, 1)
        self.assertIn(f"has sha256 {changed}, not the expected {good}", self.server.output())
        self.assertEqual((yield self.versions(url)), ["1"] * 4)


class WorkersTestCase(TwistdTestCase):
    """A ``--workers 2`` server's two processes, each seen answering."""

    @inlineCallbacks
    def both_processes_serve(self, url: str, version: str) -> Generator[Any, Any, None]:
        """Both processes answer ``url/pid``, each only with ``x-version: version``."""
        seen: dict[int, set[str]] = {}

        @inlineCallbacks
        def both_answered() -> Generator[Any, Any, bool]:
            responses = yield gatherResults([self.fetch("GET", url + "/pid") for _ in range(8)])
            for _, headers, body in responses:
                seen.setdefault(int(body), set()).add(headers.getRawHeaders("x-version", ["-"])[0])
            return len(seen) >= 2

        if not (yield poll(both_answered, DEADLINE)):
            self.fail(f"only {sorted(seen)} answered")
        self.assertEqual(list(seen.values()), [{version}, {version}])


class WorkersHangupTests(WorkersTestCase):
    @inlineCallbacks
    def test_every_worker_reloads(self) -> Generator[Any, Any, None]:
        """--workers 2 + SIGHUP to the main process: both processes report the reload and serve the new guest; a
        reload that fails is reported by both, and both go on serving."""
        guest = self.guest_file(version_guest(1))
        url = yield self.start_server("--workers", "2", "--guest", guest, "--class", "tests.test_workers.Pid")
        server = self.server
        if not (yield poll(lambda: "httpwasm worker 2 of 2" in server.output(), DEADLINE)):
            self.fail(f"worker 2 did not start:\n{server.output()}")
        write_guest(guest, version_guest(2))
        os.kill(server.process.pid, signal.SIGHUP)
        reloaded = re.compile(r"httpwasm worker 2: reloaded")
        if not (
            yield poll(lambda: reloaded.search(server.output()) and "httpwasm: reloaded" in server.output(), DEADLINE)
        ):
            self.fail(f"both processes did not report a reload:\n{server.output()}")

        yield self.both_processes_serve(url, "2")

        # A guest that does not load: each process says so, and keeps serving version 2.
        Path(guest).write_text('(module (memory (export "memory") 1))')
        os.kill(server.process.pid, signal.SIGHUP)
        failed = ("httpwasm worker 2: reload failed", "httpwasm: reload failed")
        if not (yield poll(lambda: all(text in server.output() for text in failed), DEADLINE)):
            self.fail(f"both processes did not report the failed reload:\n{server.output()}")
        yield self.both_processes_serve(url, "2")


#: WASI functions the gated guest uses to look at its mounted directory (preopened as fd 3) and to wait.
GATE_IMPORTS = """
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll_oneoff (param i32 i32 i32 i32) (result i32)))
"""


def gated_guest(version: int) -> str:
    """:func:`version_guest`, whose init, if the mounted directory holds ``hold``, creates ``waiting`` there and
    waits until ``go`` appears (looking every 20 ms, with a WASI clock wait): the test decides when it is ready.
    """
    return """
  (data (i32.const 200) "hold")
  (data (i32.const 208) "waiting")
  (data (i32.const 224) "go")
  (func $exists (param $name i32) (param $length i32) (result i32)
    (if (result i32)
      (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (local.get $name) (local.get $length)
        (i32.const 0) (i64.const 0) (i64.const 0) (i32.const 0) (i32.const 256)))
      (then (drop (call $fd_close (i32.load (i32.const 256)))) (i32.const 1))
      (else (i32.const 0))))
  (func (export "_initialize")
    (if (call $exists (i32.const 200) (i32.const 4))
      (then
        ;; create "waiting" (oflags O_CREAT, rights fd_write)
        (if (i32.eqz (call $path_open (i32.const 3) (i32.const 0) (i32.const 208) (i32.const 7)
              (i32.const 1) (i64.const 0x40) (i64.const 0) (i32.const 0) (i32.const 256)))
          (then (drop (call $fd_close (i32.load (i32.const 256))))))
        ;; one subscription at 512: tag 0 (clock), clock id 1 (monotonic), 20 ms
        (i32.store8 (i32.const 520) (i32.const 0))
        (i32.store (i32.const 528) (i32.const 1))
        (i64.store (i32.const 536) (i64.const 20000000))
        (block $go
          (loop $wait
            (br_if $go (call $exists (i32.const 224) (i32.const 2)))
            (drop (call $poll_oneoff (i32.const 512) (i32.const 640) (i32.const 1) (i32.const 704)))
            (br $wait))))))
""" + version_guest(version)


class WorkerLoadingDuringReloadTests(WorkersTestCase):
    READY = re.compile(r"httpwasm worker 2 of 2 \(pid (\d+)\) serving")

    @inlineCallbacks
    def test_a_worker_loading_during_a_reload_reloads_once_ready(self) -> Generator[Any, Any, None]:
        """A worker that read the guest file before a SIGHUP but was not ready yet is not skipped: the main process
        counts reloads, the worker reports the count it started at, and is asked to reload once ready.

        Made deterministic with a guest whose init waits for a file the test creates (through --guest-mount).
        """
        gate = Path(self.mktemp())
        gate.mkdir()
        guest = self.guest_file()
        Path(guest).write_bytes(module(gated_guest(1), imports=GATE_IMPORTS))
        url = yield self.start_server(
            "--workers", "2", "--guest", guest, "--guest-mount", f"{gate}:/gate", "--guest-timeout", "600",
            "--class", "tests.test_workers.Pid",
        )  # fmt: skip
        server = self.server
        if not (yield poll(lambda: server.exited() or self.READY.search(server.output()), DEADLINE)):
            self.fail(f"worker 2 did not start:\n{server.output()}")
        first = int(self.READY.search(server.output())[1])

        # The next worker 2 will hold in its init, after it read the guest file (version 1).
        (gate / "hold").touch()
        os.kill(first, signal.SIGKILL)
        if not (yield poll(lambda: server.exited() or (gate / "waiting").exists(), DEADLINE)):
            self.fail(f"the replacement worker did not start loading:\n{server.output()}")

        write_guest(guest, version_guest(2))
        os.kill(server.process.pid, signal.SIGHUP)
        if not (yield poll(lambda: server.exited() or "httpwasm: reloaded" in server.output(), DEADLINE)):
            self.fail(f"the main process did not reload:\n{server.output()}")

        (gate / "go").touch()  # the worker finishes loading version 1 and reports ready
        if not (yield poll(lambda: server.exited() or "httpwasm worker 2: reloaded" in server.output(), DEADLINE)):
            self.fail(f"the worker that was loading did not reload:\n{server.output()}")
        self.assertIn("was loading during a reload (generation 0 of 1)", server.output())

        yield self.both_processes_serve(url, "2")


class FakeReloader:
    label = "httpwasm"

    def __init__(self) -> None:
        self.reloads = 0

    def reload(self) -> Deferred[bool]:
        self.reloads += 1
        return succeed(True)


class WatchTests(TempFilesMixin, ServerTestCase):
    def test_reload_once_the_change_holds_still(self) -> None:
        """--watch: a change to a watched file reloads once, one interval after the files stopped changing."""
        path = self.mktemp()
        Path(path).write_bytes(b"one")
        clock, reloader = Clock(), FakeReloader()
        watch = WatchService(reloader, [path], interval=1.0, reactor=clock)  # type: ignore[arg-type]
        watch.startService()
        self.addCleanup(watch.stopService)
        clock.advance(1)
        self.assertEqual(reloader.reloads, 0)  # nothing changed
        Path(path).write_bytes(b"two, longer")
        clock.advance(1)  # seen changing
        Path(path).write_bytes(b"three, longer still")
        clock.advance(1)  # still changing: wait
        self.assertEqual(reloader.reloads, 0)
        clock.advance(1)  # held still for an interval
        self.assertEqual(reloader.reloads, 1)
        clock.advance(5)
        self.assertEqual(reloader.reloads, 1)
        os.unlink(path)  # a file that goes away is a change too (the reload will say what is wrong)
        clock.pump([1, 1])
        self.assertEqual(reloader.reloads, 2)


class WatchEndToEndTests(HangupTestCase):
    @inlineCallbacks
    def test_watch_reloads_without_a_signal(self) -> Generator[Any, Any, None]:
        """twistd --watch reloads by itself when the --guest file is replaced."""
        guest = self.guest_file(version_guest(1))
        url = yield self.start_server("--watch", "--guest", guest, "--class", "tests.test_twistd.Hello")
        self.assertEqual((yield self.versions(url, 1)), ["1"])
        write_guest(guest, version_guest(2))
        yield self.wait_for_count(self.RELOADED, 1)
        self.assertIn(f"httpwasm: {guest} changed; reloading", self.server.output())
        self.assertEqual((yield self.versions(url)), ["2"] * 4)
