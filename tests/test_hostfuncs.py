"""Every ``http_handler`` host function, driven through real WAT guests.

Each guest calls host functions with constant arguments, from
``handle_request``, ``handle_response`` or ``_initialize``, and stores each
result as an i64 in a numbered slot of its memory.  The tests read the guest's
memory back and compare exact bytes and exact values; no reactor is involved.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from twisted.logger import LogLevel as TwistedLogLevel
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Guest
from twisted_httpwasm.abi import HOST_FUNCTIONS, CtxNext, Feature, LogLevel, pack_count_len, pack_eof_len
from twisted_httpwasm.runtime.guest import GuestInstance, GuestLoadError, GuestTrap
from twisted_httpwasm.runtime.hostfuncs import IMPLEMENTATIONS
from twisted_httpwasm.runtime.state import RequestState

from .support import LogCapture, guest_path_variants, make_guest, request_state

#: Results: slot ``n`` is the i64 at ``RESULT + 8 * n`` (i32 results are sign-extended).
RESULT = 0
SLOTS = 8
#: Where the tests place their input bytes (a header name, a value, a method...).
NAME = 512
VALUE = 768
#: Where getters write.  It starts filled with ``UNTOUCHED``, so a test sees what was written.
BUF = 1024
UNTOUCHED = b"\xaa" * 64
#: A slot the guest never wrote reads as this.
NOT_CALLED_SLOTS = b"\xaa" * 8 * SLOTS
NOT_CALLED = int.from_bytes(NOT_CALLED_SLOTS[:8], "little", signed=True)
#: Every guest here has one page of memory.
PAGE = 65536

#: (ptr, len) pairs reaching outside memory: past its end, wrapping around 2**32, negative, huge.
OUTSIDE_MEMORY = ((PAGE - 2, 4), (PAGE, 1), (-256, 512), (-1, 1), (NAME, -1))

REQUEST, RESPONSE, REQUEST_TRAILERS, RESPONSE_TRAILERS = 0, 1, 2, 3
BUFFER_REQUEST, BUFFER_RESPONSE, TRAILERS = 1, 2, 4

_RESULT_TYPES = {spec.name: spec.result for spec in HOST_FUNCTIONS}


def call(function: str, *args: int, slot: int = 0) -> str:
    """WAT that calls ``function`` with constant i32 ``args``; its result goes to ``slot``."""
    expression = f"(call ${function} {' '.join(f'(i32.const {arg})' for arg in args)})"
    result = _RESULT_TYPES[function]
    if result is None:
        return expression
    if result == "i32":
        expression = f"(i64.extend_i32_s {expression})"
    return f"(i64.store (i32.const {RESULT + 8 * slot}) {expression})"


def wat_string(data: bytes) -> str:
    """``data`` as a WAT string literal, every byte escaped."""
    return '"' + "".join(f"\\{byte:02x}" for byte in data) + '"'


def guest(
    *,
    request: Sequence[str] = (),
    response: Sequence[str] = (),
    init: Sequence[str] = (),
    next: bool = False,
    inputs: Mapping[int, bytes] | None = None,
    **options: object,
) -> Guest:
    """A guest running ``request``/``response``/``init`` statements in the matching export.

    ``handle_request`` returns ``next``; ``inputs`` maps addresses to bytes placed
    there before the guest runs.
    """
    segments = [
        f"(data (i32.const {RESULT}) {wat_string(NOT_CALLED_SLOTS)})",
        f"(data (i32.const {BUF}) {wat_string(UNTOUCHED)})",
    ]
    segments += [f"(data (i32.const {address}) {wat_string(data)})" for address, data in (inputs or {}).items()]
    functions = [
        f'(func (export "handle_request") (result i64) {" ".join(request)} (i64.const {int(next)}))',
        f'(func (export "handle_response") (param i32 i32) {" ".join(response)})',
    ]
    if init:
        functions.append(f'(func (export "_initialize") {" ".join(init)})')
    return make_guest(*segments, *functions, **options)


def stored(instance: GuestInstance, slot: int = 0) -> int:
    """The (signed) result ``instance``'s guest stored in ``slot``."""
    return int.from_bytes(instance.memory.read(RESULT + 8 * slot, 8), "little", signed=True)


class Exchange:
    """One request through one instance of a guest, read back from the guest's memory."""

    def __init__(self, guest: Guest, state: RequestState | None = None):
        self.guest = guest
        self.instance: GuestInstance = guest.pool.acquire()
        self.state = state if state is not None else request_state()

    def request(self) -> CtxNext:
        return self.instance.handle_request(self.state)

    def response(
        self,
        status: int = 200,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
        *,
        features: Feature = Feature.NONE,
    ) -> None:
        """Enter the response phase with what the next handler produced, and run ``handle_response``."""
        self.state.enter_response_phase(status, headers, body)
        self.state.features |= features
        self.instance.handle_response(self.state, 0, False)

    def result(self, slot: int = 0) -> int:
        """The (signed) result the guest stored in ``slot``."""
        return stored(self.instance, slot)

    def written(self, length: int) -> bytes:
        """``length`` bytes at ``BUF``."""
        return self.instance.memory.read(BUF, length)


def run_request(statements: Sequence[str], state: RequestState | None = None, **options: object) -> Exchange:
    """A fresh guest whose ``handle_request`` runs ``statements``, run once on ``state``."""
    exchange = Exchange(guest(request=statements, **options), state)
    exchange.request()
    return exchange


class HostFunctionTestCase(SynchronousTestCase):
    def assertTraps(self, exchange: Exchange, phase: str, function: str, *words: str, **response: object) -> None:
        """Running ``phase`` ("request" or "response") traps in ``function``; the reason says so."""
        run = exchange.request if phase == "request" else lambda: exchange.response(**response)
        with self.assertRaises(GuestTrap) as caught:
            run()
        self.assertTrue(exchange.instance.trapped)
        self.assertIn(function, caught.exception.reason)
        for word in words:
            self.assertIn(word, caught.exception.reason)

    def assertRequestTraps(self, statements: Sequence[str], function: str, *words: str, **options: object) -> Exchange:
        """A guest running ``statements`` in ``handle_request`` traps in ``function``."""
        state = options.pop("state", None)
        exchange = Exchange(guest(request=statements, **options), state)
        self.assertTraps(exchange, "request", function, *words)
        return exchange

    def assertResponseTraps(
        self,
        statements: Sequence[str],
        function: str,
        *words: str,
        features: Feature = Feature.NONE,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
        **options: object,
    ) -> Exchange:
        """A guest running ``statements`` in ``handle_response`` (after next) traps in ``function``.

        ``features``, ``headers`` and ``body`` are what the response phase starts with.
        """
        state = options.pop("state", None)
        exchange = Exchange(guest(response=statements, next=True, **options), state)
        self.assertEqual(exchange.request(), CtxNext(next=True, req_ctx=0))
        self.assertTraps(exchange, "response", function, *words, features=features, headers=headers, body=body)
        return exchange


#: The host function table of the specification: name -> (number of i32 parameters, result type).
ABI_TABLE = {
    "enable_features": (1, "i32"),
    "get_config": (2, "i32"),
    "log": (3, None),
    "log_enabled": (1, "i32"),
    "get_method": (2, "i32"),
    "set_method": (2, None),
    "get_uri": (2, "i32"),
    "set_uri": (2, None),
    "get_protocol_version": (2, "i32"),
    "get_source_addr": (2, "i32"),
    "get_header_names": (3, "i64"),
    "get_header_values": (5, "i64"),
    "set_header_value": (5, None),
    "add_header_value": (5, None),
    "remove_header": (3, None),
    "read_body": (3, "i64"),
    "write_body": (3, None),
    "get_status_code": (0, "i32"),
    "set_status_code": (1, None),
}


class HostFunctionTableTests(SynchronousTestCase):
    def test_exactly_the_abi_functions_with_their_types(self) -> None:
        """The host defines every ``http_handler`` function of the specification, with its type, and no other."""
        self.assertEqual({spec.name: (spec.params, spec.result) for spec in HOST_FUNCTIONS}, ABI_TABLE)
        self.assertEqual(len(HOST_FUNCTIONS), len(ABI_TABLE))

    def test_each_function_of_the_table_is_implemented_with_its_parameters(self) -> None:
        """Each function of the ABI table has one implementation, taking the context then the table's parameters."""
        self.assertEqual(list(IMPLEMENTATIONS), [spec.name for spec in HOST_FUNCTIONS])
        for spec in HOST_FUNCTIONS:
            parameters = list(inspect.signature(IMPLEMENTATIONS[spec.name]).parameters)
            self.assertEqual(parameters, ["ctx", *spec.param_names], spec.name)


# -- the buf/buf_limit rule, for every single-value getter ---------------------------------

#: (host function, state that produces the value, the value)
GETTERS: list[tuple[str, dict[str, bytes], bytes]] = [
    ("get_method", {"method": b"PATCH"}, b"PATCH"),
    ("get_uri", {"uri": b"/disney?name=chip%26dale"}, b"/disney?name=chip%26dale"),
    ("get_protocol_version", {"protocol": b"HTTP/1.0"}, b"HTTP/1.0"),
    ("get_source_addr", {"source_addr": b"1.2.3.4:5678"}, b"1.2.3.4:5678"),
]


def run_getter(function: str, state_fields: dict[str, bytes], buf: int, buf_limit: int) -> Exchange:
    return run_request([call(function, buf, buf_limit)], request_state(**state_fields))


class BufLimitRuleTests(HostFunctionTestCase):
    """Every getter writes its value only when it fits in ``buf_limit``, and returns the length either way."""

    def test_value_that_fits_is_written_exactly(self) -> None:
        """The value's bytes are written at ``buf``, nothing after them, and its length is returned."""
        for function, fields, value in GETTERS:
            exchange = run_getter(function, fields, BUF, 64)
            self.assertEqual(exchange.result(), len(value), function)
            self.assertEqual(exchange.written(len(value) + 4), value + UNTOUCHED[:4], function)

    def test_value_exactly_buf_limit_long_is_written(self) -> None:
        """A value of exactly ``buf_limit`` bytes fits."""
        for function, fields, value in GETTERS:
            exchange = run_getter(function, fields, BUF, len(value))
            self.assertEqual(exchange.result(), len(value), function)
            self.assertEqual(exchange.written(len(value)), value, function)

    def test_value_longer_than_buf_limit_is_not_written(self) -> None:
        """One byte too long: memory is untouched, and the length is still returned."""
        for function, fields, value in GETTERS:
            exchange = run_getter(function, fields, BUF, len(value) - 1)
            self.assertEqual(exchange.result(), len(value), function)
            self.assertEqual(exchange.written(64), UNTOUCHED, function)

    def test_buf_limit_zero_returns_the_length(self) -> None:
        """``buf_limit=0`` is how a guest asks for the length: nothing is written, even at a bad ``buf``."""
        for function, fields, value in GETTERS:
            for buf in (BUF, PAGE, -1):
                exchange = run_getter(function, fields, buf, 0)
                self.assertEqual(exchange.result(), len(value), (function, buf))
                self.assertEqual(exchange.written(64), UNTOUCHED, function)
                self.assertFalse(exchange.instance.trapped)

    def test_writing_past_the_end_of_memory_traps(self) -> None:
        """A value that fits ``buf_limit`` but not in memory at ``buf`` traps, naming the function."""
        for function, fields, value in GETTERS:
            for buf in (PAGE - len(value) + 1, PAGE, -1, -len(value) + 1):
                exchange = Exchange(guest(request=[call(function, buf, 64)]), request_state(**fields))
                self.assertTraps(exchange, "request", function, "out of bounds")
                self.assertEqual(exchange.result(), NOT_CALLED)

    def test_writing_up_to_the_last_byte_of_memory_works(self) -> None:
        """The last bytes of memory are inside it."""
        for function, fields, value in GETTERS:
            exchange = run_getter(function, fields, PAGE - len(value), 64)
            self.assertEqual(exchange.result(), len(value), function)
            self.assertEqual(exchange.instance.memory.read(PAGE - len(value), len(value)), value)

    def test_buf_limit_is_unsigned(self) -> None:
        """A negative ``buf_limit`` is a large unsigned limit: the value is written."""
        for function, fields, value in GETTERS:
            exchange = run_getter(function, fields, BUF, -1)
            self.assertEqual(exchange.result(), len(value), function)
            self.assertEqual(exchange.written(len(value)), value, function)


class RequestLineTests(HostFunctionTestCase):
    """``get_method``, ``get_uri``, ``get_protocol_version``, ``get_source_addr``: exact values."""

    def get(self, function: str, **fields: bytes) -> bytes:
        exchange = run_getter(function, fields, BUF, 64)
        length = exchange.result()
        return exchange.written(length)

    def test_get_method(self) -> None:
        """The method as the client sent it."""
        self.assertEqual(self.get("get_method", method=b"GET"), b"GET")
        self.assertEqual(self.get("get_method", method=b"DELETE"), b"DELETE")

    def test_get_uri_keeps_the_query_percent_encoded(self) -> None:
        """Path and query exactly as sent, still percent-encoded."""
        self.assertEqual(self.get("get_uri", uri=b"/a%20b/c?x=1&y=%2F#"), b"/a%20b/c?x=1&y=%2F#")

    def test_get_uri_is_slash_when_empty(self) -> None:
        """An empty request target reads as ``/``."""
        self.assertEqual(self.get("get_uri", uri=b""), b"/")

    def test_get_protocol_version(self) -> None:
        """``HTTP/1.0``, ``HTTP/1.1`` and ``HTTP/2.0`` pass through unchanged."""
        for protocol in (b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2.0"):
            self.assertEqual(self.get("get_protocol_version", protocol=protocol), protocol)

    def test_get_source_addr(self) -> None:
        """IPv4 as ``a.b.c.d:port``, IPv6 as ``[addr]:port``."""
        self.assertEqual(self.get("get_source_addr", source_addr=b"1.2.3.4:5678"), b"1.2.3.4:5678")
        self.assertEqual(self.get("get_source_addr", source_addr=b"[::1]:5678"), b"[::1]:5678")

    def test_getters_work_in_the_response_phase(self) -> None:
        """The request line can still be read in ``handle_response``."""
        exchange = Exchange(guest(response=[call("get_method", BUF, 64)], next=True), request_state(method=b"HEAD"))
        exchange.request()
        exchange.response()
        self.assertEqual((exchange.result(), exchange.written(4)), (4, b"HEAD"))


class SetMethodTests(HostFunctionTestCase):
    def test_set_method_replaces_the_method(self) -> None:
        """The request's method becomes the guest's bytes, and is marked changed."""
        exchange = run_request([call("set_method", NAME, 4)], inputs={NAME: b"POST"})
        self.assertEqual((exchange.state.method, exchange.state.method_changed), (b"POST", True))

    def test_get_method_sees_the_new_method(self) -> None:
        """A later ``get_method`` in the same request reads what ``set_method`` set."""
        exchange = run_request([call("set_method", NAME, 3), call("get_method", BUF, 64)], inputs={NAME: b"PUT"})
        self.assertEqual((exchange.result(), exchange.written(3)), (3, b"PUT"))

    def test_empty_method_traps(self) -> None:
        """An empty method is refused with a trap; the method is unchanged."""
        exchange = self.assertRequestTraps([call("set_method", NAME, 0)], "set_method", "empty")
        self.assertEqual((exchange.state.method, exchange.state.method_changed), (b"GET", False))

    def test_method_that_is_not_a_token_traps(self) -> None:
        """A method with a space or CR/LF could split the request line: trap."""
        for method in (b"GET /x", b"GET\r\n", b"G(T"):
            self.assertRequestTraps([call("set_method", NAME, len(method))], "set_method", inputs={NAME: method})

    def test_method_outside_memory_traps(self) -> None:
        """A method past the end of memory, wrapping around 32 bits, or at a negative address, traps."""
        for ptr, length in OUTSIDE_MEMORY:
            exchange = self.assertRequestTraps([call("set_method", ptr, length)], "set_method", "out of bounds")
            self.assertEqual(exchange.state.method, b"GET")

    def test_set_method_after_next_traps(self) -> None:
        """In ``handle_response`` the request is gone: changing its method traps."""
        exchange = self.assertResponseTraps(
            [call("set_method", NAME, 4)], "set_method", "too late", inputs={NAME: b"POST"}
        )
        self.assertEqual(exchange.state.method, b"GET")


class SetUriTests(HostFunctionTestCase):
    def test_set_uri_replaces_path_and_query(self) -> None:
        """The guest's encoded URI replaces the request's, and is marked changed."""
        uri = b"/b?q=%20x"
        exchange = run_request([call("set_uri", NAME, len(uri))], inputs={NAME: uri})
        self.assertEqual((exchange.state.uri, exchange.state.uri_changed), (uri, True))

    def test_get_uri_sees_the_new_uri(self) -> None:
        """A later ``get_uri`` in the same request reads what ``set_uri`` set."""
        exchange = run_request([call("set_uri", NAME, 2), call("get_uri", BUF, 64)], inputs={NAME: b"/b"})
        self.assertEqual((exchange.result(), exchange.written(2)), (2, b"/b"))

    def test_empty_uri_is_slash(self) -> None:
        """Setting an empty URI sets ``/``."""
        exchange = run_request([call("set_uri", NAME, 0)])
        self.assertEqual(exchange.state.uri, b"/")

    def test_uri_not_in_origin_form_traps(self) -> None:
        """A URI without a leading ``/`` or with spaces or CR/LF is refused."""
        for uri in (b"b", b"/a b", b"/a\r\nX: y", b"http://example.com/"):
            exchange = self.assertRequestTraps([call("set_uri", NAME, len(uri))], "set_uri", inputs={NAME: uri})
            self.assertEqual(exchange.state.uri, b"/")

    def test_uri_outside_memory_traps(self) -> None:
        """A URI past the end of memory, wrapping around 32 bits, or at a negative address, traps."""
        for ptr, length in OUTSIDE_MEMORY:
            exchange = self.assertRequestTraps([call("set_uri", ptr, length)], "set_uri", "out of bounds")
            self.assertEqual(exchange.state.uri, b"/")

    def test_set_uri_after_next_traps(self) -> None:
        """In ``handle_response`` it is too late to change the URI."""
        self.assertResponseTraps([call("set_uri", NAME, 2)], "set_uri", "too late", inputs={NAME: b"/b"})


# -- headers ----------------------------------------------------------------------------------

HEADERS = [
    (b"Content-Type", b"text/plain"),
    (b"X-Multi", b"one"),
    (b"Accept", b"*/*"),
    (b"x-multi", b"two"),
    (b"X-MULTI", b"three"),
]


class GetHeaderNamesTests(HostFunctionTestCase):
    def test_request_header_names_lowercase_each_once(self) -> None:
        """Names are lowercase, each once, NUL-terminated, with ``count << 32 | len``."""
        exchange = run_request([call("get_header_names", REQUEST, BUF, 64)], request_state(headers=HEADERS))
        names = b"content-type\0x-multi\0accept\0"
        self.assertEqual(exchange.result(), pack_count_len(3, len(names)))
        self.assertEqual(exchange.result(), (3 << 32) | 28)
        self.assertEqual(exchange.written(len(names) + 1), names + UNTOUCHED[:1])

    def test_response_header_names_in_the_response_phase(self) -> None:
        """The next handler's response headers, by name."""
        exchange = Exchange(guest(response=[call("get_header_names", RESPONSE, BUF, 64)], next=True))
        exchange.request()
        exchange.response(headers=[(b"Server", b"x"), (b"Set-Cookie", b"a"), (b"set-cookie", b"b")])
        self.assertEqual(exchange.result(), pack_count_len(2, 18))
        self.assertEqual(exchange.written(18), b"server\0set-cookie\0")

    def test_response_header_names_in_the_request_phase_are_those_the_guest_set(self) -> None:
        """Before next, the response headers are the ones the guest added."""
        exchange = run_request(
            [call("add_header_value", RESPONSE, NAME, 5, VALUE, 1), call("get_header_names", RESPONSE, BUF, 64)],
            inputs={NAME: b"X-One", VALUE: b"1"},
        )
        self.assertEqual((exchange.result(), exchange.written(6)), (pack_count_len(1, 6), b"x-one\0"))

    def test_no_headers_is_zero(self) -> None:
        """No headers: the result is 0 and nothing is written."""
        exchange = run_request([call("get_header_names", REQUEST, BUF, 64)], request_state(headers=()))
        self.assertEqual(exchange.result(), 0)
        self.assertEqual(exchange.written(64), UNTOUCHED)

    def test_names_longer_than_buf_limit_are_not_written(self) -> None:
        """Too long for ``buf_limit``: nothing written, ``count_len`` still returned."""
        for limit in (0, 27):
            exchange = run_request([call("get_header_names", REQUEST, BUF, limit)], request_state(headers=HEADERS))
            self.assertEqual(exchange.result(), pack_count_len(3, 28), limit)
            self.assertEqual(exchange.written(64), UNTOUCHED, limit)

    def test_trailer_names_are_none(self) -> None:
        """This host has no trailers: both trailer kinds list no names."""
        for kind in (REQUEST_TRAILERS, RESPONSE_TRAILERS):
            exchange = run_request([call("get_header_names", kind, BUF, 64)], request_state(headers=HEADERS))
            self.assertEqual(exchange.result(), 0, kind)
            self.assertEqual(exchange.written(64), UNTOUCHED)

    def test_unknown_header_kind_traps(self) -> None:
        """Kinds other than 0-3 trap, naming the kind."""
        for kind in (4, -1, 0x7FFFFFFF):
            self.assertRequestTraps([call("get_header_names", kind, BUF, 64)], "get_header_names", str(kind))

    def test_writing_outside_memory_traps(self) -> None:
        """A buffer past the end of memory, or at a negative address, traps."""
        for buf in (PAGE - 8, -1):
            self.assertRequestTraps(
                [call("get_header_names", REQUEST, buf, 64)],
                "get_header_names",
                "out of bounds",
                state=request_state(headers=HEADERS),
            )


class GetHeaderValuesTests(HostFunctionTestCase):
    def values(self, name: bytes, kind: int = REQUEST, limit: int = 64) -> Exchange:
        return run_request(
            [call("get_header_values", kind, NAME, len(name), BUF, limit)],
            request_state(headers=HEADERS),
            inputs={NAME: name},
        )

    def test_all_values_in_order(self) -> None:
        """Every value of the name, in the order received, NUL-terminated."""
        exchange = self.values(b"x-multi")
        self.assertEqual(exchange.result(), pack_count_len(3, 14))
        self.assertEqual(exchange.written(15), b"one\0two\0three\0" + UNTOUCHED[:1])

    def test_name_matches_case_insensitively(self) -> None:
        """``CONTENT-type`` finds ``Content-Type``."""
        exchange = self.values(b"CONTENT-type")
        self.assertEqual((exchange.result(), exchange.written(11)), (pack_count_len(1, 11), b"text/plain\0"))

    def test_missing_name_is_zero(self) -> None:
        """A name that is not present: 0, nothing written."""
        exchange = self.values(b"x-absent")
        self.assertEqual((exchange.result(), exchange.written(64)), (0, UNTOUCHED))

    def test_values_longer_than_buf_limit_are_not_written(self) -> None:
        """Too long for ``buf_limit``: nothing written, ``count_len`` still returned."""
        for limit in (0, 13):
            exchange = self.values(b"x-multi", limit=limit)
            self.assertEqual(exchange.result(), pack_count_len(3, 14), limit)
            self.assertEqual(exchange.written(64), UNTOUCHED, limit)

    def test_empty_value_counts(self) -> None:
        """An empty value is one value of length 0: ``"\\0"``."""
        exchange = run_request(
            [call("get_header_values", REQUEST, NAME, 1, BUF, 64)],
            request_state(headers=[(b"e", b"")]),
            inputs={NAME: b"e"},
        )
        self.assertEqual((exchange.result(), exchange.written(2)), (pack_count_len(1, 1), b"\0" + UNTOUCHED[:1]))

    def test_response_values_in_the_response_phase(self) -> None:
        """The next handler's values of a response header."""
        exchange = Exchange(
            guest(
                response=[call("get_header_values", RESPONSE, NAME, 10, BUF, 64)],
                next=True,
                inputs={NAME: b"set-cookie"},
            )
        )
        exchange.request()
        exchange.response(headers=[(b"Set-Cookie", b"a=1"), (b"Server", b"x"), (b"Set-Cookie", b"b=2")])
        self.assertEqual((exchange.result(), exchange.written(8)), (pack_count_len(2, 8), b"a=1\0b=2\0"))

    def test_trailer_values_are_none(self) -> None:
        """This host has no trailers: no values."""
        for kind in (REQUEST_TRAILERS, RESPONSE_TRAILERS):
            exchange = self.values(b"x-multi", kind=kind)
            self.assertEqual((exchange.result(), exchange.written(64)), (0, UNTOUCHED))

    def test_empty_name_traps(self) -> None:
        """An empty header name traps."""
        self.assertRequestTraps(
            [call("get_header_values", REQUEST, NAME, 0, BUF, 64)], "get_header_values", "empty header name"
        )

    def test_unknown_header_kind_traps(self) -> None:
        """Kinds other than 0-3 trap."""
        for kind in (4, -1):
            self.assertRequestTraps(
                [call("get_header_values", kind, NAME, 1, BUF, 64)], "get_header_values", "kind", inputs={NAME: b"a"}
            )

    def test_name_outside_memory_traps(self) -> None:
        """A name past the end of memory, wrapping around 32 bits, or at a negative address, traps."""
        for ptr, length in OUTSIDE_MEMORY:
            self.assertRequestTraps(
                [call("get_header_values", REQUEST, ptr, length, BUF, 64)], "get_header_values", "out of bounds"
            )

    def test_writing_outside_memory_traps(self) -> None:
        """Values that fit ``buf_limit`` but not in memory at ``buf`` trap."""
        self.assertRequestTraps(
            [call("get_header_values", REQUEST, NAME, 7, PAGE - 4, 64)],
            "get_header_values",
            "out of bounds",
            state=request_state(headers=HEADERS),
            inputs={NAME: b"x-multi"},
        )


class ChangeHeaderTests(HostFunctionTestCase):
    """``set_header_value``, ``add_header_value`` and ``remove_header``."""

    def change(self, function: str, name: bytes, value: bytes = b"", kind: int = REQUEST) -> Exchange:
        args = (kind, NAME, len(name)) if function == "remove_header" else (kind, NAME, len(name), VALUE, len(value))
        return run_request([call(function, *args)], request_state(headers=HEADERS), inputs={NAME: name, VALUE: value})

    def test_set_replaces_all_values_with_one(self) -> None:
        """Every value of the name, whatever its case, is replaced by the one value."""
        exchange = self.change("set_header_value", b"X-Multi", b"only")
        headers = exchange.state.request_headers
        self.assertEqual(headers.values(b"x-multi"), [b"only"])
        self.assertEqual(headers.values(b"content-type"), [b"text/plain"])
        self.assertTrue(headers.changed)

    def test_set_a_new_name(self) -> None:
        """Setting a name that was absent adds it, lowercase."""
        exchange = self.change("set_header_value", b"X-New", b"v")
        self.assertEqual(exchange.state.request_headers.items()[-1], (b"x-new", b"v"))

    def test_add_appends_a_value(self) -> None:
        """Adding keeps the existing values and appends one, in order."""
        exchange = self.change("add_header_value", b"X-MULTI", b"four")
        self.assertEqual(exchange.state.request_headers.values(b"x-multi"), [b"one", b"two", b"three", b"four"])

    def test_remove_removes_all_values(self) -> None:
        """Removing a name, matched case-insensitively, removes every value."""
        exchange = self.change("remove_header", b"x-MULTI")
        self.assertEqual(exchange.state.request_headers.names(), [b"content-type", b"accept"])

    def test_remove_an_absent_name_is_harmless(self) -> None:
        """Removing a name that is not there changes nothing."""
        exchange = self.change("remove_header", b"x-absent")
        self.assertEqual(len(exchange.state.request_headers), len(HEADERS))

    def test_set_past_the_buffer_limit_traps(self) -> None:
        """Header changes count against ``max_buffer_bytes``: a set that takes them past it traps."""
        state = request_state()
        state.max_buffer_bytes = 4
        exchange = self.assertRequestTraps(
            [call("set_header_value", RESPONSE, NAME, 1, VALUE, 4)],
            "set_header_value",
            "headers of 5 bytes exceeds the limit of 4",
            state=state,
            inputs={NAME: b"x", VALUE: b"1234"},
        )
        self.assertEqual(exchange.state.response_headers.items(), [])

    def test_set_counts_only_what_it_keeps(self) -> None:
        """A set replaces: at the limit, replacing a value with a shorter one is allowed."""
        state = request_state()
        state.max_buffer_bytes = 6
        exchange = run_request(
            [
                call("set_header_value", RESPONSE, NAME, 1, VALUE, 5),  # x: 12345, 6 bytes
                call("set_header_value", RESPONSE, NAME, 1, VALUE, 4),  # x: 1234, 5 bytes
            ],
            state,
            inputs={NAME: b"x", VALUE: b"12345"},
        )
        self.assertEqual(exchange.state.response_headers.items(), [(b"x", b"1234")])

    def test_empty_value_is_allowed(self) -> None:
        """A header may be set to the empty value."""
        exchange = self.change("set_header_value", b"x-empty", b"")
        self.assertEqual(exchange.state.request_headers.values(b"x-empty"), [b""])

    def test_get_header_values_sees_the_change(self) -> None:
        """A later read in the same request sees what was set."""
        exchange = run_request(
            [
                call("set_header_value", REQUEST, NAME, 7, VALUE, 1),
                call("get_header_values", REQUEST, NAME, 7, BUF, 64),
            ],
            request_state(headers=HEADERS),
            inputs={NAME: b"x-multi", VALUE: b"z"},
        )
        self.assertEqual((exchange.result(), exchange.written(2)), (pack_count_len(1, 2), b"z\0"))

    def test_response_headers_in_the_request_phase(self) -> None:
        """Before next, the guest may build response headers."""
        exchange = run_request(
            [
                call("set_header_value", RESPONSE, NAME, 1, VALUE, 1),
                call("add_header_value", RESPONSE, NAME, 1, VALUE + 1, 1),
                call("add_header_value", RESPONSE, NAME + 1, 1, VALUE, 1),
                call("remove_header", RESPONSE, NAME + 1, 1),
            ],
            inputs={NAME: b"ab", VALUE: b"12"},
        )
        self.assertEqual(exchange.state.response_headers.items(), [(b"a", b"1"), (b"a", b"2")])

    def test_empty_name_traps(self) -> None:
        """Every header change with an empty name traps."""
        for statement, function in (
            (call("set_header_value", REQUEST, NAME, 0, VALUE, 1), "set_header_value"),
            (call("add_header_value", REQUEST, NAME, 0, VALUE, 1), "add_header_value"),
            (call("remove_header", REQUEST, NAME, 0), "remove_header"),
        ):
            exchange = self.assertRequestTraps([statement], function, "empty header name")
            self.assertEqual(exchange.state.request_headers.items(), [])

    def test_unknown_header_kind_traps(self) -> None:
        """Kinds other than 0-3 trap."""
        for kind in (4, -1):
            for statement, function in (
                (call("set_header_value", kind, NAME, 1, VALUE, 1), "set_header_value"),
                (call("add_header_value", kind, NAME, 1, VALUE, 1), "add_header_value"),
                (call("remove_header", kind, NAME, 1), "remove_header"),
            ):
                self.assertRequestTraps([statement], function, f"unknown header kind {kind}", inputs={NAME: b"a"})

    def test_setting_a_trailer_traps(self) -> None:
        """This host does not support trailers: changing one traps."""
        for kind in (REQUEST_TRAILERS, RESPONSE_TRAILERS):
            for statement, function in (
                (call("set_header_value", kind, NAME, 1, VALUE, 1), "set_header_value"),
                (call("add_header_value", kind, NAME, 1, VALUE, 1), "add_header_value"),
                (call("remove_header", kind, NAME, 1), "remove_header"),
            ):
                self.assertRequestTraps([statement], function, "trailers", inputs={NAME: b"a", VALUE: b"1"})

    def test_value_with_cr_lf_or_nul_traps(self) -> None:
        """A value containing CR, LF or NUL could inject headers: trap, and nothing changes."""
        for value in (b"a\r\nX-Injected: 1", b"a\nb", b"a\rb", b"a\0b"):
            for function in ("set_header_value", "add_header_value"):
                exchange = self.assertRequestTraps(
                    [call(function, REQUEST, NAME, 5, VALUE, len(value))],
                    function,
                    "CR, LF or NUL",
                    inputs={NAME: b"x-bad", VALUE: value},
                )
                self.assertEqual(exchange.state.request_headers.values(b"x-bad"), [])

    def test_invalid_name_traps(self) -> None:
        """A name that is not an HTTP token (CR, LF, space, colon) traps."""
        for name in (b"x\r\nbad", b"x bad", b"x:bad", b"x\nbad"):
            for function in ("set_header_value", "add_header_value"):
                self.assertRequestTraps(
                    [call(function, RESPONSE, NAME, len(name), VALUE, 1)],
                    function,
                    "invalid header name",
                    inputs={NAME: name, VALUE: b"1"},
                )

    def test_name_or_value_outside_memory_traps(self) -> None:
        """Names or values past the end of memory, wrapping, or negative, trap."""
        for ptr, length in OUTSIDE_MEMORY:
            for statement, function in (
                (call("set_header_value", REQUEST, ptr, length, VALUE, 1), "set_header_value"),
                (call("set_header_value", REQUEST, NAME, 1, ptr, length), "set_header_value"),
                (call("add_header_value", REQUEST, ptr, length, VALUE, 1), "add_header_value"),
                (call("add_header_value", REQUEST, NAME, 1, ptr, length), "add_header_value"),
                (call("remove_header", REQUEST, ptr, length), "remove_header"),
            ):
                self.assertRequestTraps([statement], function, "out of bounds", inputs={NAME: b"a", VALUE: b"1"})

    def test_changing_request_headers_after_next_traps(self) -> None:
        """In ``handle_response`` the request is gone: changing its headers traps, even with buffering."""
        for statement, function in (
            (call("set_header_value", REQUEST, NAME, 1, VALUE, 1), "set_header_value"),
            (call("add_header_value", REQUEST, NAME, 1, VALUE, 1), "add_header_value"),
            (call("remove_header", REQUEST, NAME, 1), "remove_header"),
        ):
            self.assertResponseTraps(
                [statement],
                function,
                "too late",
                features=Feature.BUFFER_REQUEST | Feature.BUFFER_RESPONSE,
                inputs={NAME: b"a", VALUE: b"1"},
            )

    def test_changing_response_headers_after_next_without_buffer_response_traps(self) -> None:
        """Without ``buffer_response`` the response may be sent already: changing its headers traps."""
        for statement, function in (
            (call("set_header_value", RESPONSE, NAME, 1, VALUE, 1), "set_header_value"),
            (call("add_header_value", RESPONSE, NAME, 1, VALUE, 1), "add_header_value"),
            (call("remove_header", RESPONSE, NAME, 1), "remove_header"),
        ):
            exchange = self.assertResponseTraps(
                [statement],
                function,
                "buffer_response",
                features=Feature.BUFFER_REQUEST,
                headers=[(b"a", b"0")],
                inputs={NAME: b"a", VALUE: b"1"},
            )
            self.assertEqual(exchange.state.response_headers.items(), [(b"a", b"0")])

    def test_changing_response_headers_after_next_with_buffer_response(self) -> None:
        """With ``buffer_response`` the guest changes the next handler's headers."""
        exchange = Exchange(
            guest(
                response=[
                    call("set_header_value", RESPONSE, NAME, 1, VALUE, 1),
                    call("add_header_value", RESPONSE, NAME + 1, 1, VALUE, 1),
                    call("remove_header", RESPONSE, NAME + 2, 1),
                ],
                next=True,
                inputs={NAME: b"abc", VALUE: b"9"},
            )
        )
        exchange.request()
        exchange.response(
            headers=[(b"A", b"1"), (b"B", b"2"), (b"C", b"3"), (b"a", b"4")], features=Feature.BUFFER_RESPONSE
        )
        self.assertEqual(exchange.state.response_headers.items(), [(b"b", b"2"), (b"a", b"9"), (b"b", b"9")])


# -- bodies ---------------------------------------------------------------------------------------


def read_body_calls(kind: int, limit: int, times: int, *, stride: int = 16) -> list[str]:
    """``times`` reads of ``kind`` into ``BUF + n * stride``, results in slots 0..times-1."""
    return [call("read_body", kind, BUF + n * stride, limit, slot=n) for n in range(times)]


class ReadBodyTests(HostFunctionTestCase):
    def test_reads_continue_where_they_stopped(self) -> None:
        """Each read returns the next bytes; the last chunk carries eof=1."""
        exchange = run_request(read_body_calls(REQUEST, 5, 3), request_state(body=b"hello world"))
        self.assertEqual(
            [exchange.result(n) for n in range(3)],
            [pack_eof_len(False, 5), pack_eof_len(False, 5), pack_eof_len(True, 1)],
        )
        memory = exchange.instance.memory
        self.assertEqual(
            [memory.read(BUF + 16 * n, 6) for n in range(3)], [b"hello\xaa", b" worl\xaa", b"d\xaa" + UNTOUCHED[:4]]
        )

    def test_eof_with_the_last_full_chunk(self) -> None:
        """A body that ends exactly at a chunk boundary reports eof with that chunk; later reads are (1, 0)."""
        exchange = run_request(read_body_calls(REQUEST, 5, 3), request_state(body=b"0123456789"))
        self.assertEqual(
            [exchange.result(n) for n in range(3)],
            [pack_eof_len(False, 5), (1 << 32) | 5, (1 << 32) | 0],
        )

    def test_whole_body_in_one_read(self) -> None:
        """A buffer larger than the body gets all of it, with eof."""
        exchange = run_request(read_body_calls(REQUEST, 64, 1), request_state(body=b"abc"))
        self.assertEqual((exchange.result(), exchange.written(4)), (pack_eof_len(True, 3), b"abc\xaa"))

    def test_no_body_is_eof_and_empty(self) -> None:
        """No request body, or an empty one: eof=1, len=0."""
        for body in (None, b""):
            exchange = run_request(read_body_calls(REQUEST, 64, 1), request_state(body=body))
            self.assertEqual((exchange.result(), exchange.written(64)), (1 << 32, UNTOUCHED), body)

    def test_body_is_binary(self) -> None:
        """Bytes pass unchanged, NULs and non-UTF-8 included."""
        body = bytes(range(256))
        exchange = run_request([call("read_body", REQUEST, BUF, 4096)], request_state(body=body))
        self.assertEqual((exchange.result(), exchange.instance.memory.read(BUF, 256)), (pack_eof_len(True, 256), body))

    def test_buf_limit_zero_traps(self) -> None:
        """``read_body`` with ``buf_limit=0`` traps, and consumes nothing."""
        exchange = self.assertRequestTraps(
            [call("read_body", REQUEST, BUF, 0)], "read_body", "buf_limit", state=request_state(body=b"abc")
        )
        self.assertEqual(exchange.state.request_reader.consumed, 0)

    def test_unknown_body_kind_traps(self) -> None:
        """Body kinds other than 0 and 1 trap."""
        for kind in (2, -1):
            self.assertRequestTraps([call("read_body", kind, BUF, 16)], "read_body", f"unknown body kind {kind}")

    def test_buffer_outside_memory_traps_without_consuming(self) -> None:
        """A buffer reaching past memory traps before anything is read."""
        for buf, limit in ((PAGE - 2, 4), (-256, 512), (-1, 1), (BUF, -1)):
            exchange = self.assertRequestTraps(
                [call("read_body", REQUEST, buf, limit)],
                "read_body",
                "outside memory",
                state=request_state(body=b"abc"),
            )
            self.assertEqual(exchange.state.request_reader.consumed, 0)

    def test_response_body_in_the_request_phase_is_what_the_guest_wrote(self) -> None:
        """Before next, the response body is whatever the guest wrote so far."""
        exchange = run_request(
            [call("write_body", RESPONSE, VALUE, 3), *read_body_calls(RESPONSE, 2, 2)], inputs={VALUE: b"xyz"}
        )
        self.assertEqual([exchange.result(0), exchange.result(1)], [pack_eof_len(False, 2), pack_eof_len(True, 1)])

    def test_request_body_after_next_without_buffer_request_traps(self) -> None:
        """Without ``buffer_request`` the request body is gone in ``handle_response``."""
        self.assertResponseTraps(
            read_body_calls(REQUEST, 16, 1), "read_body", "buffer_request", state=request_state(body=b"abc")
        )

    def test_request_body_after_next_with_buffer_request(self) -> None:
        """With ``buffer_request`` the guest may read the request body in ``handle_response``."""
        exchange = Exchange(guest(response=read_body_calls(REQUEST, 16, 1), next=True), request_state(body=b"abc"))
        exchange.request()
        exchange.response(features=Feature.BUFFER_REQUEST)
        self.assertEqual((exchange.result(), exchange.written(3)), (pack_eof_len(True, 3), b"abc"))

    def test_response_body_after_next_without_buffer_response_traps(self) -> None:
        """Without ``buffer_response`` the response body cannot be read after next."""
        self.assertResponseTraps(read_body_calls(RESPONSE, 16, 1), "read_body", "buffer_response")

    def test_response_body_after_next_with_buffer_response(self) -> None:
        """With ``buffer_response`` the next handler's body is readable, statefully."""
        exchange = Exchange(guest(response=read_body_calls(RESPONSE, 4, 3), next=True))
        exchange.request()
        exchange.response(body=b"downstream", features=Feature.BUFFER_RESPONSE)
        self.assertEqual(
            [exchange.result(n) for n in range(3)],
            [pack_eof_len(False, 4), pack_eof_len(False, 4), pack_eof_len(True, 2)],
        )
        memory = exchange.instance.memory
        self.assertEqual(
            b"".join(memory.read(BUF + 16 * n, 4) for n in range(2)) + memory.read(BUF + 32, 2), b"downstream"
        )


class WriteBodyTests(HostFunctionTestCase):
    def test_first_write_replaces_the_request_body_then_appends(self) -> None:
        """The first write in a phase replaces the body; later ones append."""
        exchange = run_request(
            [call("write_body", REQUEST, VALUE, 3), call("write_body", REQUEST, VALUE + 3, 2)],
            request_state(body=b"original"),
            inputs={VALUE: b"abcde"},
        )
        self.assertEqual(exchange.state.request_body, bytearray(b"abcde"))

    def test_writing_nothing_still_replaces(self) -> None:
        """A first write of 0 bytes sets an empty body."""
        exchange = run_request([call("write_body", REQUEST, VALUE, 0)], request_state(body=b"original"))
        self.assertEqual(exchange.state.request_body, bytearray())

    def test_response_body_in_the_request_phase(self) -> None:
        """Before next, the guest can write the response body."""
        exchange = run_request(
            [call("write_body", RESPONSE, VALUE, 2), call("write_body", RESPONSE, VALUE + 2, 2)],
            inputs={VALUE: b"okay"},
        )
        self.assertEqual(exchange.state.response_body, bytearray(b"okay"))

    def test_writing_the_request_body_after_next_traps(self) -> None:
        """In ``handle_response`` it is too late to change the request body."""
        self.assertResponseTraps(
            [call("write_body", REQUEST, VALUE, 1)], "write_body", "too late", features=Feature.BUFFER_REQUEST
        )

    def test_writing_the_response_body_after_next_without_buffer_response_traps(self) -> None:
        """Without ``buffer_response`` the body may be sent already: writing it traps, nothing changes."""
        exchange = Exchange(guest(response=[call("write_body", RESPONSE, VALUE, 1)], next=True))
        exchange.request()
        with self.assertRaises(GuestTrap) as caught:
            exchange.response(body=b"downstream")
        self.assertIn("write_body", caught.exception.reason)
        self.assertIn("buffer_response", caught.exception.reason)
        self.assertEqual(exchange.state.response_body, bytearray(b"downstream"))

    def test_first_response_write_after_next_replaces_the_next_handlers_body(self) -> None:
        """With ``buffer_response`` the first write in ``handle_response`` replaces, then appends."""
        exchange = Exchange(
            guest(
                request=[call("write_body", RESPONSE, VALUE, 2)],
                response=[call("write_body", RESPONSE, VALUE + 2, 2), call("write_body", RESPONSE, VALUE + 4, 2)],
                next=True,
                inputs={VALUE: b"AABBCC"},
            )
        )
        exchange.request()
        self.assertEqual(exchange.state.response_body, bytearray(b"AA"))
        exchange.response(body=b"downstream", features=Feature.BUFFER_RESPONSE)
        self.assertEqual(exchange.state.response_body, bytearray(b"BBCC"))

    def test_read_then_replace_the_response_body(self) -> None:
        """A ``buffer_response`` guest reads the body, then writes a new one."""
        exchange = Exchange(
            guest(
                response=[
                    call("read_body", RESPONSE, BUF, 64, slot=0),
                    call("write_body", RESPONSE, VALUE, 1),
                    call("write_body", RESPONSE, BUF, 4),
                ],
                next=True,
                inputs={VALUE: b"["},
            )
        )
        exchange.request()
        exchange.response(body=b"body", features=Feature.BUFFER_RESPONSE)
        self.assertEqual(
            (exchange.result(), exchange.state.response_body), (pack_eof_len(True, 4), bytearray(b"[body"))
        )

    def test_unknown_body_kind_traps(self) -> None:
        """Body kinds other than 0 and 1 trap."""
        for kind in (2, -1):
            self.assertRequestTraps([call("write_body", kind, VALUE, 1)], "write_body", f"unknown body kind {kind}")

    def test_data_outside_memory_traps(self) -> None:
        """Data past the end of memory, wrapping around 32 bits, or negative, traps; nothing is written."""
        for ptr, length in OUTSIDE_MEMORY:
            for kind in (REQUEST, RESPONSE):
                exchange = self.assertRequestTraps(
                    [call("write_body", kind, ptr, length)], "write_body", "out of bounds"
                )
                self.assertEqual((exchange.state.request_body, exchange.state.response_body), (None, None))

    def test_body_larger_than_the_buffer_limit_traps(self) -> None:
        """A body growing past ``max_buffer_bytes`` traps."""
        state = request_state()
        state.max_buffer_bytes = 4
        exchange = self.assertRequestTraps(
            [call("write_body", RESPONSE, VALUE, 3), call("write_body", RESPONSE, VALUE, 3)],
            "write_body",
            "exceeds",
            state=state,
        )
        self.assertEqual(exchange.state.response_body, bytearray(3))


# -- status --------------------------------------------------------------------------------------


class StatusCodeTests(HostFunctionTestCase):
    def test_default_status_is_200(self) -> None:
        """Before anything set it, the status is 200."""
        self.assertEqual(run_request([call("get_status_code")]).result(), 200)

    def test_set_in_the_request_phase(self) -> None:
        """The guest answers with its own status; ``get_status_code`` sees it."""
        exchange = run_request([call("set_status_code", 418), call("get_status_code", slot=1)])
        self.assertEqual((exchange.state.status, exchange.state.status_changed, exchange.result(1)), (418, True, 418))

    def test_status_of_the_next_handler_in_the_response_phase(self) -> None:
        """In ``handle_response``, the status the next handler produced."""
        exchange = Exchange(guest(response=[call("get_status_code")], next=True))
        exchange.request()
        exchange.response(status=404)
        self.assertEqual(exchange.result(), 404)

    def test_set_after_next_without_buffer_response_traps(self) -> None:
        """Without ``buffer_response`` the status may be sent already: trap."""
        self.assertResponseTraps([call("set_status_code", 500)], "set_status_code", "buffer_response")

    def test_set_after_next_with_buffer_response(self) -> None:
        """With ``buffer_response`` the guest replaces the next handler's status."""
        exchange = Exchange(guest(response=[call("set_status_code", 503), call("get_status_code")], next=True))
        exchange.request()
        exchange.response(status=200, features=Feature.BUFFER_RESPONSE)
        self.assertEqual((exchange.state.status, exchange.result()), (503, 503))

    def test_out_of_range_traps(self) -> None:
        """Codes outside 100-599 trap; the status stays 200."""
        for code in (0, 99, 600, 1000, -200):
            exchange = self.assertRequestTraps([call("set_status_code", code)], "set_status_code", str(code))
            self.assertEqual((exchange.state.status, exchange.state.status_changed), (200, False))

    def test_range_bounds_are_allowed(self) -> None:
        """100 and 599 are valid codes."""
        for code in (100, 599):
            self.assertEqual(run_request([call("set_status_code", code)]).state.status, code)


# -- features ----------------------------------------------------------------------------------


class EnableFeaturesTests(HostFunctionTestCase):
    def test_returns_the_whole_set(self) -> None:
        """Each call returns every feature enabled so far, not just the new ones."""
        exchange = run_request(
            [
                call("enable_features", 0, slot=0),
                call("enable_features", BUFFER_REQUEST, slot=1),
                call("enable_features", BUFFER_RESPONSE, slot=2),
                call("enable_features", 0, slot=3),
            ]
        )
        self.assertEqual([exchange.result(n) for n in range(4)], [0, 1, 3, 3])
        self.assertEqual(exchange.state.features, Feature.BUFFER_REQUEST | Feature.BUFFER_RESPONSE)

    def test_trailers_are_never_enabled(self) -> None:
        """This host cannot send trailers: the trailers bit stays off."""
        exchange = run_request([call("enable_features", TRAILERS, slot=0), call("enable_features", 7, slot=1)])
        self.assertEqual([exchange.result(0), exchange.result(1)], [0, 3])
        self.assertFalse(exchange.state.features & Feature.TRAILERS)

    def test_unknown_bits_are_ignored(self) -> None:
        """Bits the ABI does not define are not reported as enabled."""
        exchange = run_request([call("enable_features", -1)])
        self.assertEqual(exchange.result(), 3)

    def test_in_handle_request_for_this_request_only(self) -> None:
        """Enabled in ``handle_request``: the next request on the same instance starts without it."""
        first_only = f"(if (i32.eqz (i32.load (i32.const {VALUE}))) (then {call('enable_features', BUFFER_RESPONSE)}))"
        count = f"(i32.store (i32.const {VALUE}) (i32.add (i32.load (i32.const {VALUE})) (i32.const 1)))"
        once = guest(request=[first_only, count, call("enable_features", 0, slot=1)])
        instance = once.pool.acquire()
        first, second = request_state(), request_state()
        instance.handle_request(first)
        self.assertEqual(stored(instance, 1), BUFFER_RESPONSE)
        instance.handle_request(second)
        self.assertEqual(stored(instance, 1), 0)
        self.assertEqual((first.features, second.features), (Feature.BUFFER_RESPONSE, Feature.NONE))

    def test_at_init_for_every_request(self) -> None:
        """Enabled in ``_initialize``: every request of every instance has it."""
        features = guest(
            init=[call("enable_features", BUFFER_REQUEST | TRAILERS, slot=2)], request=[call("enable_features", 0)]
        )
        first, second = features.pool.acquire(), features.pool.acquire()
        self.assertEqual(stored(first, 2), BUFFER_REQUEST)  # what init got back
        for instance in (first, second):
            for _ in range(2):
                state = request_state()
                instance.handle_request(state)
                self.assertEqual(state.features, Feature.BUFFER_REQUEST)
                self.assertEqual(stored(instance), BUFFER_REQUEST)
            self.assertEqual(instance.features, Feature.BUFFER_REQUEST)

    def test_after_next_nothing_more_is_enabled(self) -> None:
        """In ``handle_response`` it is too late to enable buffering: the set returned does not include it."""
        exchange = Exchange(guest(response=[call("enable_features", BUFFER_RESPONSE)], next=True))
        exchange.request()
        exchange.response(features=Feature.BUFFER_REQUEST)
        self.assertEqual((exchange.result(), exchange.state.features), (1, Feature.BUFFER_REQUEST))


# -- config and logging ------------------------------------------------------------------------


class GetConfigTests(HostFunctionTestCase):
    def test_config_bytes_exactly(self) -> None:
        """The configured bytes, non-UTF-8 and NUL included, and their length."""
        config = b'\xff\x00\xfe{"a": 1}'
        exchange = run_request([call("get_config", BUF, 64)], config=config)
        self.assertEqual((exchange.result(), exchange.written(len(config) + 1)), (len(config), config + b"\xaa"))

    def test_buf_limit_rule(self) -> None:
        """Too long for ``buf_limit``: nothing written, the length returned."""
        for limit in (0, 5):
            exchange = run_request([call("get_config", BUF, limit)], config=b"123456")
            self.assertEqual((exchange.result(), exchange.written(64)), (6, UNTOUCHED))

    def test_no_config_is_zero(self) -> None:
        """No configuration: length 0, nothing written."""
        exchange = run_request([call("get_config", BUF, 64)])
        self.assertEqual((exchange.result(), exchange.written(64)), (0, UNTOUCHED))

    def test_readable_at_init(self) -> None:
        """Guests read their configuration in ``_initialize``/``_start``."""
        configured = guest(init=[call("get_config", BUF, 64)], config=b"cfg")
        instance = configured.pool.acquire()
        self.assertEqual(stored(instance), 3)
        self.assertEqual(instance.memory.read(BUF, 4), b"cfg\xaa")

    def test_writing_outside_memory_traps(self) -> None:
        """A config that fits ``buf_limit`` but not in memory traps."""
        self.assertRequestTraps([call("get_config", PAGE - 1, 64)], "get_config", "out of bounds", config=b"abc")


class LogTests(HostFunctionTestCase):
    LEVELS = (-1, 0, 1, 2, 3)

    def enabled_levels(self, log_level: LogLevel) -> list[int]:
        exchange = run_request(
            [call("log_enabled", level, slot=n) for n, level in enumerate(self.LEVELS)], log_level=log_level
        )
        return [exchange.result(n) for n in range(len(self.LEVELS))]

    def test_log_enabled_per_configured_level(self) -> None:
        """``log_enabled`` is 1 for the configured level and above; ``none`` is never enabled."""
        self.assertEqual(self.enabled_levels(LogLevel.DEBUG), [1, 1, 1, 1, 0])
        self.assertEqual(self.enabled_levels(LogLevel.INFO), [0, 1, 1, 1, 0])
        self.assertEqual(self.enabled_levels(LogLevel.WARN), [0, 0, 1, 1, 0])
        self.assertEqual(self.enabled_levels(LogLevel.ERROR), [0, 0, 0, 1, 0])
        self.assertEqual(self.enabled_levels(LogLevel.NONE), [0, 0, 0, 0, 0])

    def test_log_enabled_for_unknown_levels_is_zero(self) -> None:
        """Levels outside -1..2 are not logged."""
        exchange = run_request(
            [call("log_enabled", -2, slot=0), call("log_enabled", 99, slot=1)], log_level=LogLevel.DEBUG
        )
        self.assertEqual([exchange.result(0), exchange.result(1)], [0, 0])

    def test_log_at_each_level(self) -> None:
        """Each message reaches the guest's log namespace at the matching level."""
        log = LogCapture(self)
        run_request(
            [call("log", level, NAME + 8 * n, 5) for n, level in enumerate((-1, 0, 1, 2))],
            inputs={NAME: b"debug...info....warn....error..."},
            log_level=LogLevel.DEBUG,
        )
        self.assertEqual(
            log.messages(),
            [
                (TwistedLogLevel.debug, "[guest guest] debug"),
                (TwistedLogLevel.info, "[guest guest] info."),
                (TwistedLogLevel.warn, "[guest guest] warn."),
                (TwistedLogLevel.error, "[guest guest] error"),
            ],
        )

    def test_log_below_the_configured_level_is_dropped(self) -> None:
        """With ``log_level=warn``, debug and info messages are not logged."""
        log = LogCapture(self)
        run_request(
            [call("log", level, NAME, 3) for level in (-1, 0, 1, 2, 3)], inputs={NAME: b"msg"}, log_level=LogLevel.WARN
        )
        self.assertEqual(
            log.messages(), [(TwistedLogLevel.warn, "[guest guest] msg"), (TwistedLogLevel.error, "[guest guest] msg")]
        )

    def test_log_is_utf8_with_replacement(self) -> None:
        """The message is decoded as UTF-8; invalid bytes are replaced, not a trap."""
        log = LogCapture(self)
        run_request([call("log", 0, NAME, 6)], inputs={NAME: "é€".encode() + b"\xff"})
        self.assertEqual(log.messages(), [(TwistedLogLevel.info, "[guest guest] é€\ufffd")])

    def test_log_with_message_outside_memory_does_not_trap(self) -> None:
        """A failure to log is ignored: the guest goes on, nothing is logged."""
        log = LogCapture(self)
        exchange = run_request(
            [call("log", 2, PAGE - 2, 4), call("log", 2, -1, 1), call("log", 2, NAME, -1), call("get_status_code")]
        )
        self.assertFalse(exchange.instance.trapped)
        self.assertEqual(exchange.result(), 200)
        self.assertEqual(log.messages(), [])

    def test_log_at_init(self) -> None:
        """Logging works in ``_initialize``, before any request."""
        log = LogCapture(self)
        guest(init=[call("log", 1, NAME, 5)], inputs={NAME: b"ready"})
        self.assertEqual(log.messages(), [(TwistedLogLevel.warn, "[guest guest] ready")])


# -- phases and state ------------------------------------------------------------------------------

#: Each function that needs a request in flight, called with harmless arguments.
NEEDS_A_REQUEST = [
    ("get_method", (BUF, 64)),
    ("set_method", (NAME, 3)),
    ("get_uri", (BUF, 64)),
    ("set_uri", (NAME, 3)),
    ("get_protocol_version", (BUF, 64)),
    ("get_source_addr", (BUF, 64)),
    ("get_header_names", (REQUEST, BUF, 64)),
    ("get_header_values", (REQUEST, NAME, 3, BUF, 64)),
    ("set_header_value", (REQUEST, NAME, 3, VALUE, 1)),
    ("add_header_value", (REQUEST, NAME, 3, VALUE, 1)),
    ("remove_header", (REQUEST, NAME, 3)),
    ("read_body", (REQUEST, BUF, 64)),
    ("write_body", (REQUEST, VALUE, 1)),
    ("get_status_code", ()),
    ("set_status_code", (200,)),
]


class PhaseTests(HostFunctionTestCase):
    def test_request_functions_at_init_refuse_the_guest(self) -> None:
        """A request function called from ``_initialize`` traps: the guest is refused when loaded."""
        for function, args in NEEDS_A_REQUEST:
            with self.assertRaises(GuestLoadError) as caught:
                guest(init=[call(function, *args)], inputs={NAME: b"/ab", VALUE: b"1"})
            message = str(caught.exception)
            self.assertIn("_initialize", message, function)
            self.assertIn(function, message)
            self.assertIn("no request in flight", message)

    def test_guest_wide_functions_work_at_init(self) -> None:
        """``enable_features``, ``get_config``, ``log`` and ``log_enabled`` need no request."""
        loaded = guest(
            init=[
                call("enable_features", 0, slot=0),
                call("get_config", BUF, 64, slot=1),
                call("log_enabled", 2, slot=2),
                call("log", 2, NAME, 0),
            ],
            log_level=LogLevel.NONE,
        )
        instance = loaded.pool.acquire()
        self.assertEqual([stored(instance, n) for n in range(3)], [0, 0, 0])

    def test_trap_reason_names_the_function_and_instance_is_discarded(self) -> None:
        """After a host function traps, the instance is marked trapped and never lent again."""
        trapping = guest(request=[call("set_method", NAME, 0)])
        instance = trapping.pool.acquire()
        state = request_state()
        with self.assertRaises(GuestTrap) as caught:
            instance.handle_request(state)
        self.assertEqual(caught.exception.reason, "set_method: empty method")
        self.assertEqual(state.trap_reason, "set_method: empty method")
        self.assertTrue(instance.trapped)
        trapping.pool.release(instance)
        self.assertIsNot(trapping.pool.acquire(), instance)

    def test_handle_response_gets_req_ctx_and_is_error(self) -> None:
        """``req_ctx`` from ``handle_request``'s high bits reaches ``handle_response`` unchanged, with ``is_error``."""
        loaded = make_guest(
            """(func (export "handle_request") (result i64) (i64.const 0xfedcba9800000001))
               (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
                 (i32.store (i32.const 0) (local.get $req_ctx))
                 (i32.store (i32.const 4) (local.get $is_error)))"""
        )
        instance = loaded.pool.acquire()
        for is_error in (False, True):
            state = request_state()
            ctx_next = instance.handle_request(state)
            self.assertEqual(ctx_next, CtxNext(next=True, req_ctx=0xFEDCBA98))
            state.enter_response_phase(200, (), None)
            instance.handle_response(state, ctx_next.req_ctx, is_error)
            self.assertEqual(
                instance.memory.read(0, 8), bytes.fromhex("98badcfe") + int(is_error).to_bytes(4, "little")
            )

    def test_request_state_never_carries_over(self) -> None:
        """A request's changes are gone for the next request on the same instance."""
        first_request = [
            call("set_header_value", RESPONSE, NAME, 1, VALUE, 1),
            call("set_status_code", 500),
            call("write_body", RESPONSE, VALUE, 1),
            call("enable_features", BUFFER_RESPONSE),
            call("read_body", REQUEST, BUF, 64),
        ]
        later_requests = [
            call("get_header_names", RESPONSE, BUF, 64, slot=1),
            call("get_status_code", slot=2),
            call("read_body", RESPONSE, BUF, 64, slot=3),
            call("enable_features", 0, slot=4),
            call("read_body", REQUEST, BUF, 64, slot=5),
            call("get_header_names", REQUEST, BUF, 64, slot=6),
        ]
        counter = 128
        body = (
            f"(if (i32.eqz (i32.load (i32.const {counter}))) (then {' '.join(first_request)})"
            f" (else {' '.join(later_requests)}))"
            f" (i32.store (i32.const {counter}) (i32.add (i32.load (i32.const {counter})) (i32.const 1)))"
        )
        reused = guest(request=[body], inputs={NAME: b"a", VALUE: b"1"})
        instance = reused.pool.acquire()
        instance.handle_request(request_state(body=b"first"))
        reused.pool.release(instance)
        again = reused.pool.acquire()
        self.assertIs(again, instance)
        second = request_state(body=b"second", headers=[(b"x", b"y")])
        again.handle_request(second)
        self.assertEqual(
            [stored(again, n) for n in range(1, 7)],
            [0, 200, 1 << 32, 0, pack_eof_len(True, 6), pack_count_len(1, 2)],
        )
        self.assertEqual((second.status, second.response_body, second.features), (200, None, Feature.NONE))
        self.assertIsNone(again.state)


# -- exact trap reasons ------------------------------------------------------------------------------


class TrapCase(NamedTuple):
    """A guest that traps in one host function, and the exact reason it must give."""

    reason: str
    request: Sequence[str] = ()
    response: Sequence[str] = ()
    inputs: Mapping[int, bytes] | None = None
    max_buffer_bytes: int | None = None


#: One guest per distinct trap reason of the host functions (the reason is "function: why").
TRAP_CASES = [
    TrapCase("get_uri: out of bounds memory access: 1 bytes at 65536", [call("get_uri", PAGE, 64)]),
    TrapCase("set_method: out of bounds memory access: 4 bytes at 65534", [call("set_method", PAGE - 2, 4)]),
    TrapCase("get_header_names: unknown header kind 7", [call("get_header_names", 7, BUF, 64)]),
    TrapCase("read_body: unknown body kind 2", [call("read_body", 2, BUF, 64)]),
    TrapCase("set_header_value: empty header name", [call("set_header_value", REQUEST, NAME, 0, VALUE, 1)]),
    TrapCase(
        "set_header_value: too late to change the request headers after the next handler ran",
        response=[call("set_header_value", REQUEST, NAME, 1, VALUE, 1)],
        inputs={NAME: b"x", VALUE: b"1"},
    ),
    TrapCase(
        "add_header_value: the response headers may already be sent;"
        " enable buffer_response to change it in handle_response",
        response=[call("add_header_value", RESPONSE, NAME, 1, VALUE, 1)],
        inputs={NAME: b"x", VALUE: b"1"},
    ),
    TrapCase(
        "remove_header: trailers are not supported by this host",
        [call("remove_header", RESPONSE_TRAILERS, NAME, 1)],
        inputs={NAME: b"x"},
    ),
    TrapCase(
        "set_header_value: invalid header name b'bad name'",
        [call("set_header_value", RESPONSE, NAME, 8, VALUE, 1)],
        inputs={NAME: b"bad name", VALUE: b"1"},
    ),
    TrapCase(
        "set_header_value: header value contains CR, LF or NUL",
        [call("set_header_value", RESPONSE, NAME, 1, VALUE, 3)],
        inputs={NAME: b"x", VALUE: b"a\nb"},
    ),
    TrapCase(
        "add_header_value: headers of 5 bytes exceeds the limit of 4",
        [call("add_header_value", RESPONSE, NAME, 1, VALUE, 4)],
        inputs={NAME: b"x", VALUE: b"1234"},
        max_buffer_bytes=4,
    ),
    TrapCase("set_method: empty method", [call("set_method", NAME, 0)]),
    TrapCase("set_method: invalid method b'GE T'", [call("set_method", NAME, 4)], inputs={NAME: b"GE T"}),
    TrapCase(
        "set_method: too late to change the method after the next handler ran",
        response=[call("set_method", NAME, 3)],
        inputs={NAME: b"PUT"},
    ),
    TrapCase(
        "set_uri: not an origin-form URI (path starting with '/', no spaces): b'nope'",
        [call("set_uri", NAME, 4)],
        inputs={NAME: b"nope"},
    ),
    TrapCase("read_body: buf_limit is 0", [call("read_body", REQUEST, BUF, 0)]),
    TrapCase("read_body: buffer of 100 bytes at 65530 is outside memory", [call("read_body", REQUEST, PAGE - 6, 100)]),
    TrapCase(
        "read_body: the request body is gone; enable buffer_request to read it in handle_response",
        response=[call("read_body", REQUEST, BUF, 64)],
    ),
    TrapCase(
        "read_body: enable buffer_response to read the response body",
        response=[call("read_body", RESPONSE, BUF, 64)],
    ),
    TrapCase(
        "write_body: body of 5 bytes exceeds the limit of 4",
        [call("write_body", RESPONSE, NAME, 5)],
        inputs={NAME: b"12345"},
        max_buffer_bytes=4,
    ),
    TrapCase(
        "write_body: too late to change the request body after the next handler ran",
        response=[call("write_body", REQUEST, NAME, 1)],
    ),
    TrapCase(
        "write_body: the response body may already be sent; enable buffer_response to change it in handle_response",
        response=[call("write_body", RESPONSE, NAME, 1)],
    ),
    TrapCase("set_status_code: 42 is not an HTTP status code", [call("set_status_code", 42)]),
    TrapCase(
        "set_status_code: the status may already be sent; enable buffer_response to change it in handle_response",
        response=[call("set_status_code", 201)],
    ),
]


class ExactTrapReasonTests(SynchronousTestCase):
    def test_each_trap_reason_names_its_function_once_then_says_why(self) -> None:
        """Every kind of host-function trap gives exactly ``"function: why"``, on the exception and the request.

        Helpers shared by several host functions (memory access, header names, phases, limits) say why;
        the function that was running is named once, in front.
        """
        for case in TRAP_CASES:
            exchange = Exchange(
                guest(request=case.request, response=case.response, next=bool(case.response), inputs=case.inputs)
            )
            exchange.state.max_buffer_bytes = case.max_buffer_bytes
            with self.assertRaises(GuestTrap, msg=case.reason) as caught:
                exchange.request()
                exchange.response()
            self.assertEqual(caught.exception.reason, case.reason)
            self.assertEqual(exchange.state.trap_reason, case.reason)
            self.assertTrue(exchange.instance.trapped, case.reason)

    def test_trap_at_init_names_its_function(self) -> None:
        """A request-only host function called while the guest initialises traps, naming itself; loading fails."""
        with self.assertRaises(GuestLoadError) as caught:
            guest(init=[call("get_method", BUF, 64)])
        self.assertIn("get_method: no request in flight (called during init)", str(caught.exception))


# Every test case class above, on the compiled accelerator and on the pure-Python path.
guest_path_variants(globals())
