"""The compiled accelerator of the guest-call path (runtime/accel.py, runtime/_accel.c).

The whole host-function suite runs on both paths (``guest_path_variants`` in the
test modules); here: that a call mixing what C answers with what only Python
answers comes out the same on both, that what C answers never enters Python,
that the guest's memory is checked at its current size, and how the
accelerator is chosen, refused and built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twisted_httpwasm.abi import LogLevel
from twisted_httpwasm.runtime import accel, engine, native
from twisted_httpwasm.runtime.calllog import LogLimit
from twisted_httpwasm.runtime.guest import Guest, GuestTrap
from twisted_httpwasm.runtime.state import HeaderList, RequestState

from .support import ROOT, request_state
from .test_hostfuncs import BUF, NAME, PAGE, REQUEST, RESPONSE, VALUE, call, guest, stored

#: A call that starts with what C answers, then calls get_header_names (answered in Python, after what C
#: recorded is applied), then goes on in Python: every result, the log and the request must come out the same.
MIXED = [
    call("log", 0, NAME, 3),
    call("add_header_value", RESPONSE, NAME, 3, VALUE, 2),
    call("enable_features", 2, slot=0),
    call("get_header_values", RESPONSE, NAME, 3, BUF, 64, slot=1),
    call("get_header_values", REQUEST, NAME + 8, 10, BUF + 64, 64, slot=2),
    call("get_uri", BUF + 128, 64, slot=3),
    call("log", 1, VALUE, 2),
    call("get_header_names", RESPONSE, BUF + 192, 64, slot=4),
    call("set_header_value", RESPONSE, NAME, 3, VALUE + 2, 3),
    call("log", 2, NAME, 3),
    call("get_header_values", RESPONSE, NAME, 3, BUF + 256, 64, slot=5),
    call("log_enabled", 0, slot=6),
]
INPUTS = {NAME: b"x-a", NAME + 8: b"User-Agent", VALUE: b"v1v22"}


def guest_on(path: Any, **options: Any) -> Guest:
    """``test_hostfuncs.guest(**options)``, loaded on ``path`` (``accel.compiled``, or None: the pure path)."""
    saved = accel.module
    accel.module = path
    try:
        return guest(**options)
    finally:
        accel.module = saved


def functions_entered(run: Callable[[], object]) -> list[str]:
    """``file:function`` of every Python function entered on this thread while ``run()`` runs."""
    entered: list[str] = []

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event == "call":
            entered.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")

    threading.setprofile(None)
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return entered


def outcome(
    path: Any, statements: list[str] = MIXED, max_buffer_bytes: int | None = None, **options: Any
) -> tuple[Any, ...]:
    """Run ``statements`` in handle_request on ``path`` (``accel.compiled`` or None); everything it produced."""
    loaded = guest_on(path, request=statements, inputs=INPUTS, **options)
    events: list[dict[str, Any]] = []
    loaded.log = Logger(namespace="httpwasm.test", observer=events.append)
    instance = loaded.pool.acquire()
    state = request_state(uri=b"/p?q=1", headers=[(b"User-Agent", b"ua/1"), (b"user-agent", b"ua/2")])
    state.max_buffer_bytes = max_buffer_bytes
    try:
        instance.handle_request(state)
        trap = None
    except GuestTrap as error:
        trap = error.reason
    loaded.hand_over(*instance.call_log.take("g", "here"))
    return (
        trap,
        [stored(instance, slot) for slot in range(7)],
        instance.memory.read(BUF, 320),
        state.features,
        state.response_headers.items(),
        [(event.get("text"), event["log_level"].name) for event in events if "text" in event],
        [event.get("summary") for event in events if "summary" in event],
    )


def session_outcome(path: Any, statements: list[str] = MIXED, **options: Any) -> tuple[Any, ...]:
    """As :func:`outcome`, through the request's session (the compiled fast call when ``path`` is the accelerator).

    Both calls run: ``handle_request`` runs ``statements`` and passes the request on, ``handle_response``
    runs them again in the response phase.
    """
    case = SessionCase(path, statements, inline=True, **options)
    traps = []
    try:
        case.session.handle_request()
        traps.append(None)
        case.state.enter_response_phase(200)
        case.session.handle_response()
        traps.append(None)
    except GuestTrap as error:
        traps.append(error.reason)
    return case.outcome(traps)


class SessionCase:
    """A request's session on a guest running ``statements`` in both calls, and what came of it.

    ``path``: ``accel.compiled`` or None (the pure path); ``inline``: as ``Guest.session`` takes it
    (thread mode's calls go through the guest workers: ``tests/test_worker.py``).
    """

    def __init__(self, path: Any, statements: list[str] = MIXED, *, inline: bool, **options: Any) -> None:
        self.guest = loaded = guest_on(
            path, request=statements, response=statements, next=True, inputs=INPUTS, **options
        )
        if not engine.serving:  # the fast call serves once the serving clock runs (the first call starts it)
            engine.serve_time_limits()
        self.events: list[dict[str, Any]] = []
        loaded.log = Logger(namespace="httpwasm.test", observer=self.events.append)
        self.instance = loaded.pool.acquire()
        loaded.pool.release(self.instance)  # the session takes it again: the most recently returned is lent first
        self.state = request_state(uri=b"/p?q=1", headers=[(b"User-Agent", b"ua/1"), (b"user-agent", b"ua/2")])
        self.session = loaded.session(self.state, inline=inline)

    def outcome(self, traps: list[str | None]) -> tuple[Any, ...]:
        """Everything the calls produced (``traps``: None for each call that passed, then a trap's reason)."""
        instance, events = self.instance, self.events
        return (
            traps,
            [stored(instance, slot) for slot in range(7)],
            instance.memory.read(BUF, 320),
            self.state.features,
            self.state.response_headers.items(),
            [(event.get("text"), event["log_level"].name) for event in events if "text" in event],
            [event.get("summary") for event in events if "summary" in event],
            instance.state,
            native.current.target,
            instance.trapped,
        )


class AcceleratedTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        if accel.compiled is None:
            raise SkipTest(f"compiled accelerator not in use: {accel.REASON}")


class SamePathsTests(AcceleratedTestCase):
    def test_a_call_switching_to_python_midway(self) -> None:
        """What C recorded (log lines, a header, features) is applied before Python answers, in order."""
        fast, pure = outcome(accel.compiled), outcome(None)
        self.assertEqual(fast, pure)
        trap, results, _, features, headers, lines, _ = fast
        self.assertIsNone(trap)
        self.assertEqual(features, 2)
        self.assertEqual(headers, [(b"x-a", b"v22")])
        self.assertEqual(results[1], (1 << 32) | 3)  # "v1\0"
        self.assertEqual(results[2], (2 << 32) | 10)  # "ua/1\0ua/2\0"
        self.assertEqual([text for text, _ in lines], ["x-a", "v1", "x-a"])

    def test_the_log_budget_spans_the_switch(self) -> None:
        """Two messages per call: C counts the first two, Python drops the third after the switch."""
        limit = LogLimit(messages=2, bytes=1024)
        fast, pure = outcome(accel.compiled, log_limit=limit), outcome(None, log_limit=limit)
        self.assertEqual(fast, pure)
        self.assertEqual([text for text, _ in fast[5]], ["x-a", "v1"])
        self.assertIn("1 log message (3 bytes) dropped", fast[6][0])

    def test_a_message_cut_by_the_byte_budget(self) -> None:
        """A message past the byte budget is cut, and says how much was not logged, on both paths."""
        statements = [call("log", 0, VALUE, 5), call("log", 0, VALUE, 5)]
        limit = LogLimit(messages=10, bytes=7)
        fast, pure = outcome(accel.compiled, statements, log_limit=limit), outcome(None, statements, log_limit=limit)
        self.assertEqual(fast, pure)
        self.assertEqual([text for text, _ in fast[5]], ["v1v22", "v1... [3 more bytes not logged]"])

    def test_traps_give_the_same_reason(self) -> None:
        """A failure in what C answers is answered by Python, so the trap reason is the pure path's, byte for byte."""
        for statements in (
            [call("log", 0, NAME, 3), call("add_header_value", RESPONSE, NAME, 3, PAGE - 1, 2)],
            [call("add_header_value", RESPONSE, VALUE, 5, NAME, 3)],  # "v1v22" is a name, "x-a" a value: fine
            [call("add_header_value", RESPONSE, NAME, 0, VALUE, 1)],
            [call("get_uri", PAGE - 2, 64)],
            [call("get_header_values", RESPONSE, NAME, 3, BUF, 64), call("set_header_value", 7, NAME, 3, VALUE, 1)],
        ):
            fast, pure = outcome(accel.compiled, statements), outcome(None, statements)
            self.assertEqual(fast, pure, statements)

    def test_the_header_limit(self) -> None:
        """Headers held to max_buffer_bytes: C leaves the decision at the limit to Python."""
        statements = [call("add_header_value", RESPONSE, NAME, 3, VALUE, 5)] * 4
        fast, pure = (
            outcome(accel.compiled, statements, max_buffer_bytes=20),
            outcome(None, statements, max_buffer_bytes=20),
        )
        self.assertEqual(fast, pure)
        self.assertIn("add_header_value: headers of 24 bytes exceeds the limit of 20", fast[0])


class FastCallTests(AcceleratedTestCase):
    """The session's calls through the compiled fast call (``_accel.call_request``/``call_response``)."""

    def test_the_same_as_the_pure_path(self) -> None:
        """Both calls of a request, switching to Python midway, come out as on the pure path, and leave nothing set."""
        limit = LogLimit(messages=2, bytes=1024)
        for options in ({}, {"log_limit": limit}):
            fast, pure = session_outcome(accel.compiled, **options), session_outcome(None, **options)
            self.assertEqual(fast, pure)
            self.assertEqual(fast[0], [None, None])
            self.assertEqual(fast[7:9], (None, None))  # instance.state, native.current.target

    def test_traps_give_the_same_reason(self) -> None:
        """A trap in C's part, in Python's part, or at the time limit: the pure path's reason, the instance retired."""
        for statements in (
            [call("log", 0, NAME, 3), call("add_header_value", RESPONSE, NAME, 3, PAGE - 1, 2)],
            [call("get_uri", PAGE - 2, 64)],
            [call("get_protocol_version", PAGE - 2, 64)],
            ["(unreachable)"],
        ):
            fast, pure = session_outcome(accel.compiled, statements), session_outcome(None, statements)
            self.assertEqual(fast, pure, statements)
            self.assertIsNotNone(fast[0][-1])
            self.assertTrue(fast[-1])
        fast = session_outcome(accel.compiled, ["(loop $spin (br $spin))"], timeout=0.05)
        pure = session_outcome(None, ["(loop $spin (br $spin))"], timeout=0.05)
        self.assertEqual(fast, pure)
        self.assertEqual(fast[0], ["guest exceeded its time limit of 0.05 s"])

    def test_a_call_python_need_not_see_makes_no_python_call(self) -> None:
        """A guest whose host calls C answers without recording anything: no Python function runs in the calls."""
        loaded = guest(
            request=[call("get_uri", BUF, 64), call("log_enabled", 0, slot=0)],
            response=[call("get_uri", BUF, 64)],
            next=True,
            inputs=INPUTS,
        )
        if not engine.serving:
            engine.serve_time_limits()
        state = request_state(uri=b"/p")
        session = loaded.session(state, inline=True)
        passed_on: list[bool] = []

        def both_calls() -> None:
            passed_on.append(session.handle_request())
            state.enter_response_phase(200)
            session.handle_response()

        entered = functions_entered(both_calls)
        self.assertEqual(passed_on, [True])
        runtime = [name for name in entered if name.split(":")[0] in ("guest.py", "native.py", "hostfuncs.py")]
        self.assertEqual(runtime, [])
        self.assertIsNone(native.current.target)


class ReadByName(RequestState):
    """A request state that answers a read of one request header as the twisted.web adapter does, and records reads."""

    def __init__(self, headers: list[tuple[bytes, bytes]]):
        super().__init__(b"GET", b"/p", None, headers=headers)
        self.reads: list[bytes | str] = []

    def read_request_headers(self) -> list[tuple[bytes, bytes]]:
        self.reads.append("all")
        return list(self._headers)

    def read_request_header_values(self, name: bytes) -> list[bytes] | None:
        self.reads.append(name)
        return [value for key, value in self._headers if key.lower() == name.lower()]


def header_reads(path: Any, request: list[str], response: list[str], inline: bool = True) -> tuple[Any, ...]:
    """A request through a session on ``path``: traps, results, what was written, how the headers were read."""
    loaded = guest_on(path, request=request, response=response, next=True, inputs=INPUTS)
    if not engine.serving:
        engine.serve_time_limits()
    state = ReadByName([(b"User-Agent", b"ua/1"), (b"Host", b"h"), (b"user-agent", b"ua/2")])
    instance = loaded.pool.acquire()
    loaded.pool.release(instance)
    session = loaded.session(state, inline=inline)
    traps = []
    try:
        session.handle_request()
        state.enter_response_phase(200)
        session.handle_response()
        traps.append(None)
    except GuestTrap as error:
        traps.append(error.reason)
    return (
        traps,
        [stored(instance, slot) for slot in range(4)],
        instance.memory.read(BUF, 64),
        state.reads,
        state.touched(),
        instance.state,
        native.current.target,
    )


class RequestHeaderTests(AcceleratedTestCase):
    """Request headers are read when the guest asks, one name at a time, as on the pure path."""

    READS = [
        call("get_header_values", REQUEST, NAME + 8, 10, BUF, 64, slot=0),  # User-Agent: two values
        call("get_header_values", REQUEST, NAME, 3, BUF + 32, 16, slot=1),  # x-a: none
        call("get_header_values", REQUEST, NAME + 8, 10, BUF + 32, 3, slot=2),  # too long for the buffer: length only
    ]

    def test_only_the_names_asked_for_are_read(self) -> None:
        """No copy of all the request's headers, and none in a call that reads none; results as on the pure path."""
        # handle_response is a call of the same guest (it imports get_header_values) that reads no header.
        response: list[str] = []
        fast, pure = header_reads(accel.compiled, self.READS, response), header_reads(None, self.READS, response)
        self.assertEqual(fast, pure)
        traps, results, memory, reads, touched, *left = fast
        self.assertEqual(traps, [None])
        self.assertEqual(reads, [b"User-Agent", b"x-a", b"User-Agent"])
        self.assertEqual(results[:3], [(2 << 32) | 10, 0, (2 << 32) | 10])
        self.assertEqual(memory[:10], b"ua/1\0ua/2\0")
        self.assertEqual(memory[10:64], b"\xaa" * 54)  # nothing written for none, nor to a buffer too small
        self.assertFalse(touched)  # reading a header by name leaves nothing to apply to the request
        self.assertEqual(left, [None, None])

    def test_calls_not_inline_get_a_copy(self) -> None:
        """A call that may run where the GIL is not held (thread mode) gets a copy of them all: no Python in it."""
        fast = header_reads(accel.compiled, self.READS, [], inline=False)
        pure = header_reads(None, self.READS, [], inline=False)
        self.assertEqual(fast[:3] + fast[4:], pure[:3] + pure[4:])
        self.assertEqual(fast[3], ["all", "all"])  # once for each call: the copy is taken before it

    def test_failures_give_the_same_reason(self) -> None:
        """A name or a buffer outside memory, an empty name: the pure path's trap, and the same state after it.

        (A buffer outside memory is found once the values are read: Python reads them again to trap.)
        """
        for statements in (
            [call("get_header_values", REQUEST, NAME + 8, 10, PAGE - 2, 64)],
            [call("get_header_values", REQUEST, PAGE - 2, 10, BUF, 64)],
            [call("get_header_values", REQUEST, NAME, 0, BUF, 64)],
            [call("log", 0, NAME, 3), *self.READS, call("get_header_values", REQUEST, NAME + 8, 10, PAGE - 4, 64)],
        ):
            fast, pure = header_reads(accel.compiled, statements, []), header_reads(None, statements, [])
            self.assertEqual(fast[:3] + fast[4:], pure[:3] + pure[4:], statements)
            self.assertNotIn("all", fast[3])
            self.assertIsNotNone(fast[0][-1])

    def test_what_a_state_returns_that_c_cannot_copy(self) -> None:
        """Values that are not a list of bytes are answered by Python, which reports them as the pure path does."""

        class Odd(ReadByName):
            def read_request_header_values(self, name: bytes) -> list[bytes] | None:
                return ("not", "bytes")  # type: ignore[return-value]

        results = []
        for path in (accel.compiled, None):
            loaded = guest_on(path, request=self.READS[:1], inputs=INPUTS)
            instance = loaded.pool.acquire()
            state = Odd([])
            state.inline = True  # read by name, as a session's inline calls do
            try:
                instance.handle_request(state)
                results.append(None)
            except Exception as error:  # noqa: BLE001 - whatever the pure path raises, C's must be the same
                results.append((type(error), str(error)))
        self.assertEqual(results[0], results[1])


class ApplyTests(AcceleratedTestCase):
    """What C recorded is made on the request in C: the response headers become the state's HeaderList directly."""

    ADDS = [
        call("add_header_value", RESPONSE, NAME + 8, 10, VALUE, 2),  # User-Agent: lowercased
        call("add_header_value", RESPONSE, NAME, 3, VALUE + 2, 3),
        call("set_header_value", RESPONSE, NAME + 8, 10, VALUE + 1, 1),
        call("enable_features", 2, slot=0),
    ]

    def header_list(self, path: Any) -> tuple[dict[str, Any], list[str]]:
        """The HeaderList a request-phase call of ``path`` leaves, slot by slot, and the Python functions entered."""
        loaded = guest_on(path, request=self.ADDS, next=True, inputs=INPUTS)
        if not engine.serving:
            engine.serve_time_limits()
        instance = loaded.pool.acquire()
        loaded.pool.release(instance)
        state = request_state()
        session = loaded.session(state, inline=True)
        passed_on: list[bool] = []
        entered = functions_entered(lambda: passed_on.append(session.handle_request()))
        self.assertEqual(passed_on, [True])
        session.close()
        held = state._response_headers
        assert held is not None
        # Every slot, the size as counted (the pure path's set() leaves it to be counted on first use).
        slots = {slot: getattr(held, slot) for slot in HeaderList.__slots__ if slot != "_size"}
        left = (state.features, instance.state, native.current.target, instance.call_log.messages)
        return {**slots, "size": held.size, "left": left}, entered

    def test_the_header_list_python_would_make(self) -> None:
        """The same entries, size and changed flag as on the pure path, and the features, with no Python function
        making them, nor ending the call (``_end_fast_call`` is C when the call leaves nothing else to do)."""
        (fast, entered), (pure, _) = self.header_list(accel.compiled), self.header_list(None)
        self.assertEqual(fast, pure)
        self.assertEqual(fast["_entries"], [(b"x-a", b"v22"), (b"user-agent", b"1")])
        self.assertEqual(fast["size"], 3 + 3 + 10 + 1)
        self.assertTrue(fast["changed"])
        self.assertEqual(fast["left"], (2, None, None, 0))
        made = [name for name in entered if name.split(":")[0] in ("accel.py", "state.py", "guest.py")]
        self.assertEqual(made, [])

    def test_onto_headers_python_made_first(self) -> None:
        """Response headers the state already holds (made in Python during the call) get C's added after theirs."""
        loaded = guest(request=self.ADDS[:2], inputs=INPUTS)
        instance = loaded.pool.acquire()
        state = request_state()
        instance.state = state
        instance.accel.call(instance._handle_request.accelerated, 1, instance, state)
        state.response_headers.add(b"X-Before", b"0")
        accel.apply(instance)
        self.assertEqual(
            state.response_headers.items(), [(b"x-before", b"0"), (b"user-agent", b"v1"), (b"x-a", b"v22")]
        )
        self.assertEqual(state.response_headers.size, len(b"x-before0user-agentv1x-av22"))
        self.assertFalse(instance.accel.pending)


class NoPythonTests(AcceleratedTestCase):
    def test_what_c_answers_never_enters_python(self) -> None:
        """log, get_uri, add_header_value, get_header_values: no Python function runs during the guest call."""
        loaded = guest(
            request=[
                call("log", 0, NAME, 3),
                call("get_uri", BUF, 64),
                call("add_header_value", RESPONSE, NAME, 3, VALUE, 2),
                call("get_header_values", REQUEST, NAME + 8, 10, BUF, 64),
            ],
            inputs=INPUTS,
        )
        instance = loaded.pool.acquire()
        export = instance._handle_request.accelerated
        state = request_state(headers=[(b"user-agent", b"x")])
        instance.state = state
        entered = functions_entered(lambda: instance.accel.call(export, False, instance, state))
        # The request header is read by name from the state (state.py); no host function runs in Python.
        host = [name for name in entered if name.split(":")[0] in ("hostfuncs.py", "native.py", "guest.py")]
        self.assertEqual(host, [])
        self.assertTrue(instance.accel.pending)  # the log line and the header, for Python to apply now

    def test_the_pure_path_does(self) -> None:
        """The same guest on the pure path runs the host functions in Python (what the test above rules out)."""
        loaded = guest_on(None, request=[call("get_uri", BUF, 64)])
        instance = loaded.pool.acquire()
        entered = functions_entered(lambda: instance.handle_request(request_state()))
        self.assertIn("hostfuncs.py:get_uri", entered)


class MemoryBoundsTests(AcceleratedTestCase):
    def test_memory_grown_during_the_call(self) -> None:
        """The memory's current size bounds every access: a page grown during the call can be written."""
        statements = [
            "(drop (memory.grow (i32.const 1)))",
            call("get_uri", PAGE + 100, 64, slot=0),
            call("log", 0, PAGE + 100, 2),
        ]
        fast, pure = outcome(accel.compiled, statements), outcome(None, statements)
        self.assertEqual(fast, pure)
        self.assertIsNone(fast[0])
        self.assertEqual(fast[1][0], len(b"/p?q=1"))
        self.assertEqual(fast[5], [("/p", LogLevel.INFO.name.lower())])


class ChoosingTests(SynchronousTestCase):
    def test_a_wasmtime_major_it_was_not_written_for(self) -> None:
        """Another wasmtime major disables the accelerator with one warning, and the pure path serves."""
        if accel.compiled is None:
            raise SkipTest(f"compiled accelerator not in use: {accel.REASON}")
        self.patch(accel.metadata, "version", lambda name: "99.0.0")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module, reason = accel._load()
        self.assertIsNone(module)
        self.assertEqual(len(caught), 1)
        self.assertIn("compiled accelerator disabled: declared for wasmtime 50 and 51, not 99", str(caught[0].message))
        self.assertIn("not 99", reason)

    def test_the_environment_forces_the_pure_path(self) -> None:
        """TWISTED_HTTPWASM_PURE=1: the pure path serves, and the startup line says so."""
        script = "from twisted_httpwasm.runtime import accel; print(accel.ACCELERATED, accel.describe())"
        env = dict(os.environ, TWISTED_HTTPWASM_PURE="1")
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        self.assertEqual(done.stdout.strip(), "False guest calls: pure Python (TWISTED_HTTPWASM_PURE is set)")

    def test_describe_names_the_path(self) -> None:
        """The startup line's words for the path in use."""
        self.patch(accel, "module", None)
        self.assertTrue(accel.describe().startswith("guest calls: pure Python"))
        if accel.compiled is not None:
            self.patch(accel, "module", accel.compiled)
            self.assertEqual(accel.describe(), "guest calls: compiled accelerator")

    def test_the_build_succeeds_without_a_compiler(self) -> None:
        """No C compiler: building the extensions prints one line and succeeds (the pure path will serve)."""
        build = self.mktemp()
        env = dict(os.environ, CC="no-such-cc", LDSHARED="no-such-cc -shared")
        env.pop("TWISTED_HTTPWASM_PURE", None)
        done = subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", build, "--build-temp", build + "-tmp"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = [line for line in done.stdout.splitlines() if "compiled accelerator" in line]
        self.assertEqual(len(lines), 1, done.stdout)
        self.assertIn("the pure-Python path will serve", lines[0])
        self.assertFalse(list(Path(build).rglob("_accel*.so")))
        self.assertFalse(list(Path(build).rglob("_fast*.so")))  # the twisted.web side's part (web/_fast.c)


class WasiOutputTests(SynchronousTestCase):
    def test_a_guest_that_cannot_write_has_no_captured_output(self) -> None:
        """A WASI guest importing neither fd_write nor fd_pwrite cannot write to stdout or stderr: its instances
        keep no output files, and no call checks them (the plugin benchmark's guest reads the clock only)."""
        loaded = Guest.load(ROOT / "bench" / "guests" / "plugin.wat")
        self.assertTrue(loaded.uses_wasi)
        self.assertFalse(loaded.writes_output)
        self.assertEqual(loaded.pool.acquire()._outputs, ())

    def test_a_guest_that_can_write_has_it(self) -> None:
        """With fd_write imported, stdout and stderr are captured as before."""
        from .test_guest_log import WASI_LOOP

        loaded = Guest.load(WASI_LOOP.replace("COUNT", "1").encode())
        self.assertTrue(loaded.writes_output)
        self.assertEqual([output.stream for output in loaded.pool.acquire()._outputs], ["stdout", "stderr"])
