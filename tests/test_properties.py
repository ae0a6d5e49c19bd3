"""Property-based tests: every host function called with arbitrary arguments.

One guest calls the host function chosen by the i32 at address 0 with the
i32 arguments at 8, 12, ... 28, and stores its result at 64; the test writes
those words into the guest's memory before each call, so every example is a
real call from wasm through the host-function machinery.  Whatever the
arguments, phase and request, the call either returns a valid result (the
right value, written only where the buf/buf_limit rule allows) or traps with
:class:`GuestTrap`; it never raises anything else, never reports an internal
host error, never writes guest memory it should not, and leaves the host
state consistent: the same instance, or a fresh one after a trap, serves a
normal request correctly afterwards.
"""

from __future__ import annotations

import io
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Guest, GuestTrap
from twisted_httpwasm.abi import HOST_FUNCTIONS, encode_nul_list, pack_count_len, pack_eof_len
from twisted_httpwasm.runtime import native as _native
from twisted_httpwasm.runtime.guest import GuestInstance
from twisted_httpwasm.runtime.state import RequestState

from .support import guest_path_variants, make_guest

PAGE = 65536
SELECTOR = 0  # which host function (index into HOST_FUNCTIONS); -1: none
ARGS = 8  # six i32 arguments
RESULT = 64  # the result, as an i64
CONFIG = b"conf\x00ig\xff"
MAX_BUFFER = 4096
REQUEST_HEADERS_MAX = 5 * (12 + 24)  # what the request strategy below can send
_U32 = 0xFFFFFFFF
#: Strings the arguments may point at, so that some calls are valid.
PLACED = {512: b"x-a", 528: b"X-Multi", 544: b"value", 560: b"/new?q=1", 576: b"PATCH", 592: b"bad\r\nvalue", 608: b""}

SPECS = {spec.name: spec for spec in HOST_FUNCTIONS}
INDEX = {spec.name: index for index, spec in enumerate(HOST_FUNCTIONS)}


def dispatcher() -> str:
    """WAT: call the selected host function with the argument words; store its result."""
    branches = []
    for index, spec in enumerate(HOST_FUNCTIONS):
        args = " ".join(f"(i32.load (i32.const {ARGS + 4 * k}))" for k in range(spec.params))
        call = f"(call ${spec.name} {args})"
        if spec.result == "i32":
            call = f"(i64.store (i32.const {RESULT}) (i64.extend_i32_s {call}))"
        elif spec.result == "i64":
            call = f"(i64.store (i32.const {RESULT}) {call})"
        branches.append(f"(if (i32.eq (i32.load (i32.const {SELECTOR})) (i32.const {index})) (then {call}))")
    return "(func $dispatch " + " ".join(branches) + ")"


GUEST_BODY = (
    dispatcher(),
    '(func (export "handle_request") (result i64) (call $dispatch) (i64.const 1))',
    '(func (export "handle_response") (param i32 i32) (call $dispatch))',
)

# -- strategies --------------------------------------------------------------------------------

TOKEN = st.one_of(
    st.sampled_from([b"x-a", b"x-multi", b"host"]),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(str.encode),
)
HEADER_VALUE = st.binary(max_size=24).filter(lambda value: not re.search(rb"[\x00\r\n]", value))
HEADERS = st.lists(st.tuples(TOKEN, HEADER_VALUE), max_size=5)

#: Values where bugs hide: small, negative, memory boundaries, i32 extremes, wrapping sums.
INTERESTING = [0, 1, 2, 3, 4, -1, -16, 64, 100, 599, 600, PAGE - 16, PAGE - 1, PAGE, PAGE + 1]
INTERESTING += [0x7FFFFFFF, -0x80000000, 0xFFFFFFF0 - (1 << 32)]
ANY_I32 = st.one_of(
    st.sampled_from(INTERESTING),
    st.integers(0, 1100),
    st.integers(PAGE - 64, PAGE + 64),
    st.integers(-(1 << 31), (1 << 31) - 1),
)
#: What each kind of parameter usually is, mixed with anything at all.
ROLES = {
    "kind": st.one_of(st.integers(0, 1), st.integers(0, 3), ANY_I32),
    "buf": st.one_of(st.integers(1024, 3000), st.integers(1024, 3000), ANY_I32),
    "limit": st.one_of(st.integers(1, 300), st.integers(0, 300), ANY_I32),
    "number": st.one_of(st.integers(-4, 8), st.integers(95, 605), ANY_I32),
    "string": st.one_of(
        st.sampled_from([(address, len(value)) for address, value in PLACED.items()]), st.tuples(ANY_I32, ANY_I32)
    ),
}
#: The parameters of each host function; a "string" is a (ptr, len) pair.
PARAMETERS = {
    "enable_features": ["number"],
    "get_config": ["buf", "limit"],
    "log": ["number", "string"],
    "log_enabled": ["number"],
    "get_method": ["buf", "limit"],
    "set_method": ["string"],
    "get_uri": ["buf", "limit"],
    "set_uri": ["string"],
    "get_protocol_version": ["buf", "limit"],
    "get_source_addr": ["buf", "limit"],
    "get_header_names": ["kind", "buf", "limit"],
    "get_header_values": ["kind", "string", "buf", "limit"],
    "set_header_value": ["kind", "string", "string"],
    "add_header_value": ["kind", "string", "string"],
    "remove_header": ["kind", "string"],
    "read_body": ["kind", "buf", "limit"],
    "write_body": ["kind", "string"],
    "get_status_code": [],
    "set_status_code": ["number"],
}


def flat(values: list[Any]) -> list[int]:
    return [part for value in values for part in (value if isinstance(value, tuple) else (value,))]


@st.composite
def requests(draw: Any) -> dict[str, Any]:
    return {
        "method": draw(st.sampled_from([b"GET", b"POST", b"DELETE"])),
        "uri": b"/" + draw(st.binary(max_size=20).map(lambda raw: raw.hex().encode())),
        "headers": draw(HEADERS),
        "body": draw(st.one_of(st.none(), st.binary(max_size=300))),
    }


@st.composite
def calls(draw: Any, function: str) -> dict[str, Any]:
    return {
        "args": flat([draw(ROLES[role]) for role in PARAMETERS[function]]),
        "request": draw(requests()),
        "response_phase": draw(st.booleans()),
        "features": draw(st.integers(0, 7)),
        "status": draw(st.integers(100, 599)),
        "response_headers": draw(HEADERS),
        "response_body": draw(st.one_of(st.none(), st.binary(max_size=300))),
        "garbage": draw(st.binary(max_size=256)),
    }


# -- the expected outcome of a call that returned ---------------------------------------------


def _values(state: RequestState, kind: int, name: bytes | None) -> list[bytes]:
    headers = {0: state.request_headers, 1: state.response_headers}.get(kind)
    if headers is None:
        return []
    return headers.names() if name is None else headers.values(name)


class HostFunctionPropertyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.guest: Guest = make_guest(
            *GUEST_BODY,
            *(f"(data (i32.const {address}) {wat_bytes(value)})" for address, value in PLACED.items()),
            config=CONFIG,
            max_buffer_bytes=MAX_BUFFER,
        )
        self.events: list[dict[str, Any]] = []
        self.guest.log = Logger(namespace="httpwasm.test", observer=self.events.append)
        self.instance: GuestInstance = self.guest.pool.acquire()
        self.addCleanup(self.release)

    def release(self) -> None:
        if self.instance is not None:
            self.guest.pool.release(self.instance)

    # -- driving one call --------------------------------------------------------------------

    def select(self, function: str | None, args: list[int] = ()) -> None:  # type: ignore[assignment]
        words = [INDEX[function] if function is not None else -1, 0, *args]
        self.instance.memory.write(SELECTOR, b"".join((word & _U32).to_bytes(4, "little") for word in words))

    def fresh_state(self, request: dict[str, Any]) -> RequestState:
        body = request["body"]
        return RequestState(
            method=request["method"],
            uri=request["uri"],
            protocol=b"HTTP/1.1",
            source_addr=b"127.0.0.1:4321",
            headers=request["headers"],
            body=io.BytesIO(body) if body is not None else None,
            max_buffer_bytes=MAX_BUFFER,
        )

    def run_call(self, function: str, call: dict[str, Any]) -> None:
        instance = self.instance
        state = self.fresh_state(call["request"])
        instance.memory.write(1024, call["garbage"])
        if call["response_phase"]:
            self.select(None)
            ctx = instance.handle_request(state)
            self.assertTrue(ctx.next)
            state.enter_response_phase(call["status"], call["response_headers"], call["response_body"])
            state.features |= call["features"] & 3
        self.select(function, call["args"])
        memory_before = instance.memory.read(0, PAGE)
        body_before = self.body_position(state, call["args"]) if function == "read_body" else None
        features_before = state.features
        try:
            if call["response_phase"]:
                instance.handle_response(state, ctx.req_ctx, False)
            else:
                instance.handle_request(state)
        except GuestTrap as trap:
            self.assertTrue(instance.trapped)
            self.assertNotIn("host error", trap.reason)
            self.assertEqual(state.trap_reason, trap.reason)
        else:
            self.assertFalse(instance.trapped)
            self.check_result(function, call["args"], state, memory_before, body_before, features_before)
        self.assertIsNone(instance.state)
        self.assertIsNone(_native.current.target)
        self.assertEqual([event for event in self.events if "internal error" in str(event.get("log_format"))], [])
        self.check_state(state)
        self.check_still_serves()

    def body_position(self, state: RequestState, args: list[int]) -> tuple[bytes, int]:
        """The body read_body would read from, and where it stands."""
        if args[0] == 0:
            stream = state.request_body_source
            if stream is None:
                return b"", 0
            position = stream.tell()
            data = stream.read()
            stream.seek(position)
            return data, 0
        body = state.response_body or b""
        return bytes(body), state.response_reader_position

    # -- what must hold --------------------------------------------------------------------------

    def check_result(
        self,
        function: str,
        args: list[int],
        state: RequestState,
        memory_before: bytes,
        body_before: tuple[bytes, int] | None,
        features_before: int,
    ) -> None:
        memory_after = self.instance.memory.read(0, PAGE)
        result = int.from_bytes(memory_after[RESULT : RESULT + 8], "little", signed=True)
        written: tuple[int, bytes] | None = None
        values = {
            "get_config": CONFIG,
            "get_method": state.method,
            "get_uri": state.uri,
            "get_protocol_version": state.protocol,
            "get_source_addr": state.source_addr,
        }
        if function in values:
            buf, limit = args
            value = values[function]
            self.assertEqual(result, len(value))
            if len(value) <= limit & _U32:
                written = (buf & _U32, value)
        elif function in ("get_header_names", "get_header_values"):
            kind, buf, limit = (args[0], args[1], args[2]) if function == "get_header_names" else (args[0], *args[3:])
            name = None if function == "get_header_names" else memory_before[args[1] & _U32 :][: args[2] & _U32]
            count, data = encode_nul_list(_values(state, kind, name))
            self.assertEqual(result, pack_count_len(count, len(data)) if count else 0)
            if count and len(data) <= limit & _U32:
                written = (buf & _U32, data)
        elif function == "read_body":
            assert body_before is not None
            data, position = body_before
            limit = args[2] & _U32
            chunk = data[position : position + limit]
            eof = position + len(chunk) >= len(data)
            self.assertEqual(result, pack_eof_len(eof, len(chunk)))
            written = (args[1] & _U32, chunk)
        elif function == "get_status_code":
            self.assertTrue(100 <= result <= 599, result)
        elif function == "enable_features":
            self.assertEqual(result & ~3, 0)
            self.assertEqual(result & features_before, features_before)
        elif function == "log_enabled":
            self.assertIn(result, (0, 1))
        expected = bytearray(memory_before)
        if written is not None:
            address, data = written
            expected[address : address + len(data)] = data
        expected[RESULT : RESULT + 8] = memory_after[RESULT : RESULT + 8]  # the guest stores the result last
        self.assertEqual(bytes(expected), memory_after, f"{function}{tuple(args)} wrote where it should not")

    def check_state(self, state: RequestState) -> None:
        """The request's plain data is still something the filter can apply."""
        token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
        self.assertTrue(token.match(state.method), state.method)
        self.assertTrue(state.uri.startswith(b"/"), state.uri)
        self.assertTrue(100 <= state.status <= 599, state.status)
        self.assertEqual(state.features & ~3, 0)
        for headers in (state.request_headers, state.response_headers):
            self.assertEqual(headers.size, sum(len(name) + len(value) for name, value in headers.items()))
            self.assertLessEqual(headers.size, max(MAX_BUFFER, REQUEST_HEADERS_MAX))
            for name, value in headers.items():
                self.assertTrue(token.match(name), name)
                self.assertEqual(name, name.lower())
                self.assertIsNone(re.search(rb"[\x00\r\n]", value), value)
        for body in (state.request_body, state.response_body):
            self.assertLessEqual(len(body or b""), MAX_BUFFER)

    def check_still_serves(self) -> None:
        """A normal request works: on the same instance, or on a fresh one after a trap."""
        if self.instance.trapped:
            self.guest.pool.release(self.instance)
            self.assertEqual(self.guest.pool.stats.in_use, 0)
            self.instance = self.guest.pool.acquire()
            self.assertFalse(self.instance.trapped)
        state = self.fresh_state({"method": b"GET", "uri": b"/after", "headers": [], "body": None})
        self.select("get_uri", [2048, 100])
        self.instance.handle_request(state)
        self.assertEqual(self.instance.memory.read(RESULT, 8), (6).to_bytes(8, "little"))
        self.assertEqual(self.instance.memory.read(2048, 6), b"/after")


def wat_bytes(data: bytes) -> str:
    return '"' + "".join(f"\\{byte:02x}" for byte in data) + '"'


PROPERTY_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _property_test(function: str) -> Any:
    @PROPERTY_SETTINGS
    @given(call=calls(function))
    def test(self: HostFunctionPropertyTests, call: dict[str, Any]) -> None:
        self.run_call(function, call)

    test.__name__ = f"test_{function}"
    test.__doc__ = f"{function}: arbitrary arguments either work as the ABI says or trap, nothing else."
    return test


for _spec in HOST_FUNCTIONS:
    setattr(HostFunctionPropertyTests, f"test_{_spec.name}", _property_test(_spec.name))
del _spec


# Every test case class above, on the compiled accelerator and on the pure-Python path.
guest_path_variants(globals())
