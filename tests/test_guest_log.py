"""Guest log lines: their format, the per-call budget, and the hand-over to the reactor.

Each guest call may log a bounded number of messages and bytes (WASI output
included); the rest is dropped and counted in one summary line.  Lines logged
off the reactor thread reach the reactor in one ``callFromThread`` per call.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel as TwistedLogLevel
from twisted.python import threadable
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twisted_httpwasm import Execution, Guest
from twisted_httpwasm.abi import LogLevel
from twisted_httpwasm.runtime.calllog import DEFAULT_LOG_BYTES, DEFAULT_LOG_MESSAGES, LogLimit
from twisted_httpwasm.service.tap import Options

from .support import LogCapture, ServerTestCase, execution_variants, guest_path_variants, module, request_state

#: Logs ``COUNT`` messages of ``SIZE`` bytes (zeros at 4096) in handle_request, then answers next=1.
LOG_LOOP = """
  (func (export "handle_request") (result i64)
    (local $i i32)
    (loop $again
      (call $log (i32.const 0) (i32.const 4096) (i32.const SIZE))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const COUNT))))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""

#: Logs 16 KiB messages until its time limit ends the call.
LOG_FOREVER = """
  (func (export "handle_request") (result i64)
    (loop $again
      (call $log (i32.const 0) (i32.const 4096) (i32.const 16384))
      (br $again))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32))
"""

#: Writes "x\\n" to WASI stdout COUNT times in handle_request.
WASI_LOOP = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\\10\\00\\00\\00\\02\\00\\00\\00")
  (data (i32.const 16) "x\\n")
  (func (export "handle_request") (result i64)
    (local $i i32)
    (loop $again
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 64)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const COUNT))))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)))"""


def log_loop(count: int, size: int) -> bytes:
    return module(LOG_LOOP.replace("COUNT", str(count)).replace("SIZE", str(size)))


def guest_lines(log: LogCapture) -> list[str]:
    return [text for _, text in log.messages() if text.startswith("[guest ")]


def summaries(log: LogCapture) -> list[str]:
    return [text for _, text in log.messages() if "dropped" in text]


class FormatTests(SynchronousTestCase):
    def test_guest_line_names_the_guest_once(self) -> None:
        """A guest line reads ``[guest NAME] message`` in namespace ``httpwasm.guest.NAME``."""
        log = LogCapture(self, "auth")
        guest = Guest(log_loop(1, 5), name="auth", cache=False)
        guest.pool.acquire().handle_request(request_state())
        self.assertEqual(len(log.events), 1)
        self.assertEqual(log.events[0]["log_namespace"], "httpwasm.guest.auth")
        # The line escapes control characters (see test_guest_log_escape); the event keeps the text as written.
        self.assertEqual(log.messages(), [(TwistedLogLevel.info, "[guest auth] \\x00\\x00\\x00\\x00\\x00")])
        self.assertEqual(log.events[0]["text"], "\0\0\0\0\0")


class BudgetTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """100 messages and 64 KiB per call, unless the guest is given another limit."""
        self.assertEqual((DEFAULT_LOG_MESSAGES, DEFAULT_LOG_BYTES), (100, 64 * 1024))
        self.assertEqual(Guest(log_loop(1, 1), cache=False).log_limit, LogLimit(100, 64 * 1024))

    def test_many_small_messages_past_the_count_are_dropped_and_summarised(self) -> None:
        """1000 messages of 10 bytes in one call: 100 logged, one summary line for the other 900."""
        log = LogCapture(self, "flood")
        guest = Guest(log_loop(1000, 10), name="flood", cache=False)
        guest.pool.acquire().handle_request(request_state(uri=b"/path?q=1"))
        self.assertEqual(len(guest_lines(log)), 100)
        self.assertEqual(
            summaries(log),
            [
                "guest flood: 900 log messages (8.8 KiB) dropped in handle_request for GET /path?q=1"
                " (limit 100 messages, 64 KiB per call)"
            ],
        )
        self.assertEqual(log.events[-1]["log_level"], TwistedLogLevel.warn)

    def test_big_messages_past_the_bytes_are_dropped_and_summarised(self) -> None:
        """1000 messages of 16 KiB: four fill the 64 KiB budget, the other 996 are counted."""
        log = LogCapture(self, "flood")
        guest = Guest(log_loop(1000, 16384), name="flood", cache=False)
        guest.pool.acquire().handle_request(request_state(method=b"POST", uri=b"/"))
        self.assertEqual(len(guest_lines(log)), 4)
        self.assertEqual(sum(len(event["text"]) for event in log.events[:4]), 64 * 1024)
        self.assertEqual(len(summaries(log)), 1)
        self.assertIn("996 log messages (16 MiB) dropped in handle_request for POST /", summaries(log)[0])

    def test_budget_is_per_call(self) -> None:
        """Each call starts with a fresh budget: two requests on one instance log 2 x 100 lines."""
        log = LogCapture(self, "flood")
        guest = Guest(log_loop(150, 10), name="flood", cache=False)
        instance = guest.pool.acquire()
        instance.handle_request(request_state())
        instance.handle_request(request_state())
        self.assertEqual(len(guest_lines(log)), 200)
        self.assertEqual(len(summaries(log)), 2)

    def test_limit_is_configurable(self) -> None:
        """``log_limit=LogLimit(messages=3, bytes=1000)``: ten 5-byte messages, three logged, seven counted."""
        log = LogCapture(self, "flood")
        guest = Guest(log_loop(10, 5), name="flood", log_limit=LogLimit(messages=3, bytes=1000), cache=False)
        guest.pool.acquire().handle_request(request_state())
        self.assertEqual(len(guest_lines(log)), 3)
        self.assertIn("7 log messages (35 bytes) dropped", summaries(log)[0])

    def test_message_cut_to_the_bytes_left(self) -> None:
        """A message longer than what is left of the byte budget is cut, saying how much is missing."""
        log = LogCapture(self, "flood")
        guest = Guest(log_loop(2, 30), name="flood", log_limit=LogLimit(messages=10, bytes=40), cache=False)
        guest.pool.acquire().handle_request(request_state())
        texts = [event["text"] for event in log.events]
        self.assertEqual(texts[0], "\0" * 30)
        self.assertEqual(texts[1], "\0" * 10 + "... [20 more bytes not logged]")

    def test_wasi_output_counts_against_the_same_budget(self) -> None:
        """1000 lines on WASI stdout in one call: 100 reach the log, 900 are counted as dropped."""
        log = LogCapture(self, "printer")
        guest = Guest(WASI_LOOP.replace("COUNT", "1000").encode(), name="printer", cache=False)
        self.addCleanup(guest.pool.clear)
        guest.pool.acquire().handle_request(request_state())
        self.assertEqual(guest_lines(log), ["[guest printer] [stdout] x"] * 100)
        self.assertIn("900 log messages (900 bytes) dropped in handle_request for GET /", summaries(log)[0])


class FakeReactor:
    """Records ``callFromThread`` calls; runs them when told."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, function: Any, *args: Any) -> None:
        self.calls.append((function, args))

    def run_calls(self) -> None:
        calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)


class HandOverTests(SynchronousTestCase):
    def setUp(self) -> None:
        # This thread is the reactor thread; the guest runs in another.
        self.patch(threadable, "ioThread", threadable.getThreadID())
        self.reactor = FakeReactor()

    def in_thread(self, work: Any) -> None:
        errors: list[BaseException] = []

        def run() -> None:
            try:
                work()
            except BaseException as error:  # noqa: BLE001 - reported on the test's thread
                errors.append(error)

        thread = threading.Thread(target=run)
        thread.start()
        thread.join(10)
        self.assertFalse(thread.is_alive())
        self.assertEqual(errors, [])

    def test_lines_of_a_call_off_the_reactor_thread_go_over_in_one_batch(self) -> None:
        """50 messages and a summary logged in a worker thread: one ``callFromThread``, nothing
        logged before the reactor runs it, all of it logged after."""
        log = LogCapture(self, "batch")
        guest = Guest(log_loop(150, 3), name="batch", reactor=self.reactor, cache=False)
        instance = guest.pool.acquire()
        self.in_thread(lambda: instance.handle_request(request_state()))
        self.assertEqual(len(self.reactor.calls), 1)
        self.assertEqual(log.events, [])
        self.reactor.run_calls()
        self.assertEqual(len(guest_lines(log)), 100)
        self.assertEqual(len(summaries(log)), 1)

    def test_init_lines_off_the_reactor_thread_go_over_in_one_batch(self) -> None:
        """An instance made in a worker thread hands its init log over once."""
        log = LogCapture(self, "batch")
        wat = module(
            '(data (i32.const 0) "hello")',
            '(func (export "_initialize") (call $log (i32.const 1) (i32.const 0) (i32.const 5))'
            " (call $log (i32.const 1) (i32.const 0) (i32.const 5)))",
            '(func (export "handle_request") (result i64) (i64.const 1))',
            '(func (export "handle_response") (param i32 i32))',
        )
        guest = Guest(wat, name="batch", reactor=self.reactor, cache=False)
        self.assertEqual(len(log.events), 2)  # the first instance, made on this (reactor) thread
        self.in_thread(lambda: guest.pool.release(guest._new_instance()))
        self.assertEqual(len(self.reactor.calls), 1)
        self.reactor.run_calls()
        self.assertEqual(guest_lines(log), ["[guest batch] hello"] * 4)

    def test_call_on_the_reactor_thread_logs_at_once(self) -> None:
        """Inline, the lines are logged when the call ends, without the reactor's help."""
        log = LogCapture(self, "batch")
        guest = Guest(log_loop(3, 3), name="batch", reactor=self.reactor, cache=False)
        guest.pool.acquire().handle_request(request_state())
        self.assertEqual(self.reactor.calls, [])
        self.assertEqual(len(guest_lines(log)), 3)

    def test_emit_outside_a_call_off_the_reactor_thread_is_handed_over(self) -> None:
        """``Guest.emit`` from another thread, outside any call, goes through the given reactor."""
        log = LogCapture(self, "batch")
        guest = Guest(log_loop(1, 1), name="batch", reactor=self.reactor, cache=False)
        self.in_thread(lambda: guest.emit(LogLevel.INFO, "from a thread"))
        self.assertEqual(log.events, [])
        self.reactor.run_calls()
        self.assertEqual(guest_lines(log), ["[guest batch] from a thread"])

    def test_resource_hands_its_reactor_to_the_guest(self) -> None:
        """A ``GuestResource`` given a reactor sends its guest's log lines to that reactor."""
        from twisted_httpwasm import GuestResource

        log = LogCapture(self, "batch")
        guest = Guest(log_loop(1, 1), name="batch", cache=False)
        GuestResource(guest, Hello(), reactor=self.reactor)
        self.in_thread(lambda: guest.emit(LogLevel.INFO, "via the resource's reactor"))
        self.assertEqual(len(self.reactor.calls), 1)
        self.reactor.run_calls()
        self.assertEqual(guest_lines(log), ["[guest batch] via the resource's reactor"])


class Hello(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"hello"


class FloodTestsMixin:
    execution: Execution
    timeout = 20

    @inlineCallbacks
    def test_flooding_guest_request_ends_with_a_bounded_log(self) -> Any:
        """A guest logging 16 KiB messages until its 0.3 s time limit: the request ends (500), four
        lines (64 KiB) and one summary line are logged, and the server answers the next request."""
        log = LogCapture(self, "flood")  # type: ignore[arg-type]
        guest = Guest(module(LOG_FOREVER), name="flood", execution=self.execution, timeout=0.3, cache=False)
        url = self.serve_guest(guest, Hello())  # type: ignore[attr-defined]
        status, _, _ = yield self.fetch("GET", url + "/flood")  # type: ignore[attr-defined]
        self.assertEqual(status, 500)  # type: ignore[attr-defined]
        self.assertEqual(len(guest_lines(log)), 4)  # type: ignore[attr-defined]
        [summary] = summaries(log)
        self.assertIn("dropped in handle_request for GET /flood", summary)  # type: ignore[attr-defined]
        self.assertLessEqual(len(log.events), 6)  # type: ignore[attr-defined]


globals().update(execution_variants(FloodTestsMixin, ServerTestCase))



class OptionTests(SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        config = Options()
        config.parseOptions(["--guest", "g.wat", "--path", ".", *args])
        return config

    def test_default_limit(self) -> None:
        """Without ``--guest-log-limit``: 100 messages, 64 KiB."""
        self.assertEqual(self.parse()["guest-log-limit"], LogLimit(100, 64 * 1024))

    def test_messages_and_size(self) -> None:
        """``--guest-log-limit 10/1KiB``, and a count alone keeps the default size."""
        self.assertEqual(self.parse("--guest-log-limit", "10/1KiB")["guest-log-limit"], LogLimit(10, 1024))
        self.assertEqual(self.parse("--guest-log-limit", "5")["guest-log-limit"], LogLimit(5, 64 * 1024))

    def test_bad_values_are_usage_errors(self) -> None:
        """Not a count, a negative count, or a bad size: a usage error naming the option."""
        for value in ("many", "-1", "10/lots"):
            with self.assertRaises(UsageError) as caught:
                self.parse("--guest-log-limit", value)
            self.assertIn("--guest-log-limit", str(caught.exception))


# Every test case class above, on the compiled accelerator and on the pure-Python path.
guest_path_variants(globals())
