"""What the runtime tells the layers above about a guest, without their touching its pool."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm.abi import Feature

from .support import NOOP_RESPONSE, make_guest

HANDLE_REQUEST = '(func (export "handle_request") (result i64) (i64.const 1))'


class GuestSnapshotTests(SynchronousTestCase):
    def test_features_enabled_at_initialisation(self) -> None:
        """``Guest.features``: what ``enable_features`` turned on in ``_initialize``, read at load."""
        buffering = make_guest(
            '(func (export "_initialize") (drop (call $enable_features (i32.const 3))))',
            HANDLE_REQUEST,
            NOOP_RESPONSE,
        )
        self.assertEqual(buffering.features, Feature.BUFFER_REQUEST | Feature.BUFFER_RESPONSE)
        plain = make_guest(HANDLE_REQUEST, NOOP_RESPONSE)
        self.assertEqual(plain.features, Feature.NONE)

    def test_idle_memory_bytes(self) -> None:
        """The linear memory of the idle instances: none lent, then two pooled."""
        guest = make_guest(HANDLE_REQUEST, NOOP_RESPONSE)  # one page, one idle instance after load
        self.assertEqual(guest.idle_memory_bytes(), 65536)
        first = guest.pool.acquire()
        self.assertEqual(guest.idle_memory_bytes(), 0)  # the lent one is not read
        second = guest.pool.acquire()
        guest.pool.release(first)
        guest.pool.release(second)
        self.assertEqual(guest.idle_memory_bytes(), 2 * 65536)
