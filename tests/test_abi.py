"""The ABI vocabulary: constants as the specification numbers them, and the packed results."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.abi import (
    BodyKind,
    CountLen,
    CtxNext,
    EofLen,
    Feature,
    HeaderKind,
    LogLevel,
    encode_nul_list,
    pack_count_len,
    pack_ctx_next,
    pack_eof_len,
    unpack_count_len,
    unpack_ctx_next,
    unpack_eof_len,
)

U32 = st.integers(min_value=0, max_value=2**32 - 1)
I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def is_i64(value: int) -> bool:
    return -(2**63) <= value < 2**63


class ConstantTests(SynchronousTestCase):
    def test_values_match_the_specification(self) -> None:
        """Feature bits, header and body kinds and log levels have the specification's numbers."""
        self.assertEqual([Feature.BUFFER_REQUEST, Feature.BUFFER_RESPONSE, Feature.TRAILERS], [1, 2, 4])
        self.assertEqual(
            [HeaderKind.REQUEST, HeaderKind.RESPONSE, HeaderKind.REQUEST_TRAILERS, HeaderKind.RESPONSE_TRAILERS],
            [0, 1, 2, 3],
        )
        self.assertEqual([BodyKind.REQUEST, BodyKind.RESPONSE], [0, 1])
        self.assertEqual(
            [LogLevel.DEBUG, LogLevel.INFO, LogLevel.WARN, LogLevel.ERROR, LogLevel.NONE], [-1, 0, 1, 2, 3]
        )


class LogLevelParseTests(SynchronousTestCase):
    def test_every_name_parses(self) -> None:
        """Each level's name, in any case and with surrounding blanks, parses to that level."""
        for level in LogLevel:
            for text in (level.name.lower(), level.name, f"  {level.name.title()}\n"):
                self.assertIs(LogLevel.parse(text), level)

    def test_unknown_name_is_refused_with_the_choices(self) -> None:
        """An unknown name raises ValueError listing the valid names."""
        for text in ("warning", "", "0", "trace"):
            with self.assertRaises(ValueError) as caught:
                LogLevel.parse(text)
            message = str(caught.exception)
            self.assertIn(repr(text), message)
            self.assertIn("debug, info, warn, error, none", message)


class CtxNextTests(SynchronousTestCase):
    def test_known_values(self) -> None:
        """``next`` is the low 32 bits and ``req_ctx`` the high 32 bits."""
        self.assertEqual(pack_ctx_next(True), 1)
        self.assertEqual(pack_ctx_next(False, 2), 2 << 32)
        self.assertEqual(pack_ctx_next(True, 0xFFFFFFFF), -(2**32) + 1)
        self.assertEqual(unpack_ctx_next(1), CtxNext(next=True, req_ctx=0))
        self.assertEqual(unpack_ctx_next(0), CtxNext(next=False, req_ctx=0))
        self.assertEqual(unpack_ctx_next(-(2**32) + 1), CtxNext(next=True, req_ctx=0xFFFFFFFF))
        self.assertEqual(unpack_ctx_next(-(2**63)), CtxNext(next=False, req_ctx=0x80000000))

    def test_only_one_means_next(self) -> None:
        """Low bits other than 1 do not call the next handler."""
        for low in (0, 2, 0xFFFFFFFF, 0x80000001):
            self.assertFalse(unpack_ctx_next((5 << 32) | low).next, low)

    @given(next=st.booleans(), req_ctx=U32)
    def test_round_trip(self, next: bool, req_ctx: int) -> None:
        """Packing then unpacking gives back ``next`` and ``req_ctx``; the packed value is a valid i64."""
        packed = pack_ctx_next(next, req_ctx)
        self.assertTrue(is_i64(packed))
        self.assertEqual(unpack_ctx_next(packed), CtxNext(next=next, req_ctx=req_ctx))

    @given(value=I64)
    def test_unpack_of_any_i64(self, value: int) -> None:
        """Any i64 the guest returns unpacks into a u32 ``req_ctx``, and packs back when ``next`` is 0 or 1."""
        unpacked = unpack_ctx_next(value)
        self.assertEqual(unpacked.req_ctx, (value % 2**64) >> 32)
        if value & 0xFFFFFFFF in (0, 1):
            self.assertEqual(pack_ctx_next(unpacked.next, unpacked.req_ctx), value)


class CountLenTests(SynchronousTestCase):
    def test_known_values(self) -> None:
        """``count << 32 | len``: ``a\\0b\\0`` is count 2, len 4."""
        self.assertEqual(pack_count_len(2, 4), (2 << 32) | 4)
        self.assertEqual(pack_count_len(0, 0), 0)
        self.assertEqual(pack_count_len(0xFFFFFFFF, 0xFFFFFFFF), -1)
        self.assertEqual(pack_count_len(0x80000000, 0), -(2**63))
        self.assertEqual(unpack_count_len(-1), CountLen(count=0xFFFFFFFF, length=0xFFFFFFFF))

    @given(count=U32, length=U32)
    def test_round_trip(self, count: int, length: int) -> None:
        """Packing then unpacking is the identity, high bits included; the packed value is a valid i64."""
        packed = pack_count_len(count, length)
        self.assertTrue(is_i64(packed))
        self.assertEqual(unpack_count_len(packed), CountLen(count=count, length=length))

    @given(value=I64)
    def test_unpack_then_pack_of_any_i64(self, value: int) -> None:
        """Every i64, negative ones included, is some (count, len)."""
        unpacked = unpack_count_len(value)
        self.assertEqual(pack_count_len(unpacked.count, unpacked.length), value)


class EofLenTests(SynchronousTestCase):
    def test_known_values(self) -> None:
        """``eof << 32 | len``."""
        self.assertEqual(pack_eof_len(True, 5), (1 << 32) | 5)
        self.assertEqual(pack_eof_len(False, 0xFFFFFFFF), 0xFFFFFFFF)
        self.assertEqual(pack_eof_len(True, 0), 1 << 32)
        self.assertEqual(unpack_eof_len((1 << 32) | 7), EofLen(eof=True, length=7))
        self.assertEqual(unpack_eof_len(7), EofLen(eof=False, length=7))

    @given(eof=st.booleans(), length=U32)
    def test_round_trip(self, eof: bool, length: int) -> None:
        """Packing then unpacking gives back ``eof`` and ``len``."""
        self.assertEqual(unpack_eof_len(pack_eof_len(eof, length)), EofLen(eof=eof, length=length))

    @given(value=I64)
    def test_unpack_of_any_i64(self, value: int) -> None:
        """The length is always the low 32 bits; negative values unpack without error."""
        self.assertEqual(unpack_eof_len(value).length, value & 0xFFFFFFFF)


class NulListTests(SynchronousTestCase):
    def test_each_item_is_nul_terminated(self) -> None:
        """``a\\0b\\0``, not ``a\\0b``; an empty list is nothing; empty items count."""
        self.assertEqual(encode_nul_list([b"a", b"b"]), (2, b"a\0b\0"))
        self.assertEqual(encode_nul_list([]), (0, b""))
        self.assertEqual(encode_nul_list([b""]), (1, b"\0"))
        self.assertEqual(encode_nul_list(iter([b"x-a", b"x-b"])), (2, b"x-a\0x-b\0"))

    @given(items=st.lists(st.binary().filter(lambda item: b"\0" not in item)))
    def test_splitting_gives_the_items_back(self, items: list[bytes]) -> None:
        """Splitting on NUL recovers the items; the count is their number."""
        count, data = encode_nul_list(items)
        self.assertEqual(count, len(items))
        self.assertEqual(len(data), sum(len(item) + 1 for item in items))
        self.assertEqual(data.split(b"\0")[:-1] if data else [], items)
