"""Host functions called while an instance is being initialised.

A module's wasm ``start`` function runs during instantiation, before its exports
(and so its memory) are handed to the host; ``_initialize`` and ``_start`` run
right after.  The functions legal at init (``get_config``, ``enable_features``,
``log``, ``log_enabled``) work from all three; request-scoped ones trap with a
reason.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel as TwistedLogLevel
from twisted.trial.unittest import SynchronousTestCase

from twisted_httpwasm import Guest, GuestLoadError

from .support import LogCapture, ServerTestCase, execution_variants, guest_path_variants, module
from .test_resource import Echo, GuestTestMixin

CONFIG = b"user:secret"

#: Memory layout of the setup code: the expected config, a log message, scratch space.
SETUP_DATA = f"""
  (data (i32.const 0) "{CONFIG.decode()}")
  (data (i32.const 64) "configured at init")
  (data (i32.const 96) "x-by")
  (data (i32.const 112) "guest")
"""

#: get_config (checked byte by byte: a trap if the bytes are wrong), enable_features(3), log.
SETUP = f"""
  (func $setup
    (local $i i32)
    (if (i32.ne (call $get_config (i32.const 256) (i32.const 64)) (i32.const {len(CONFIG)}))
      (then unreachable))
    (block $done
      (loop $next
        (br_if $done (i32.eq (local.get $i) (i32.const {len(CONFIG)})))
        (if (i32.ne (i32.load8_u (i32.add (i32.const 256) (local.get $i)))
                    (i32.load8_u (local.get $i)))
          (then unreachable))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (if (i32.ne (call $enable_features (i32.const 3)) (i32.const 3))
      (then unreachable))
    (if (i32.eqz (call $log_enabled (i32.const 0)))
      (then unreachable))
    (call $log (i32.const 0) (i32.const 64) (i32.const 18)))
"""

#: handle_request reads four body bytes (the downstream sees them only with buffer_request);
#: handle_response reads the downstream's body, writes it back and adds a header
#: (both trap without buffer_response).
HANDLERS = """
  (func (export "handle_request") (result i64)
    (drop (call $read_body (i32.const 0) (i32.const 1024) (i32.const 4)))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)
    (local $n i32)
    (local.set $n (i32.wrap_i64 (call $read_body (i32.const 1) (i32.const 4096) (i32.const 16384))))
    (call $write_body (i32.const 1) (i32.const 4096) (local.get $n))
    (call $set_header_value (i32.const 1) (i32.const 96) (i32.const 4) (i32.const 112) (i32.const 5)))
"""


def setup_guest(entry: str) -> bytes:
    """A guest that runs SETUP from ``entry``: ``start`` (the start section), ``_initialize`` or ``_start``."""
    hook = "(start $setup)" if entry == "start" else f'(export "{entry}" (func $setup))'
    return module(SETUP_DATA, SETUP, hook, HANDLERS)


class InitEntryPointTests(SynchronousTestCase):
    def check_setup_from(self, entry: str) -> None:
        log = LogCapture(self, "setup")
        guest = Guest(setup_guest(entry), name="setup", config=CONFIG, cache=False)
        instance = guest.pool.acquire()
        self.addCleanup(guest.pool.release, instance)
        self.assertEqual(instance.features, 3)
        self.assertIn((TwistedLogLevel.info, "[guest setup] configured at init"), log.messages())

    def test_start_function_reads_config_enables_features_and_logs(self) -> None:
        """From the wasm start section (run during instantiation): the config bytes are
        right, the features are kept for every request, the log line is logged."""
        self.check_setup_from("start")

    def test_initialize_reads_config_enables_features_and_logs(self) -> None:
        """The same from ``_initialize``."""
        self.check_setup_from("_initialize")

    def test_start_export_reads_config_enables_features_and_logs(self) -> None:
        """The same from ``_start``."""
        self.check_setup_from("_start")

    def test_start_function_sees_the_wrong_config_and_the_load_fails(self) -> None:
        """The start function's check of the config bytes runs: a different config traps it."""
        with self.assertRaises(GuestLoadError) as caught:
            Guest(setup_guest("start"), config=b"user:wrong!", cache=False)
        self.assertIn("failed to initialise", str(caught.exception))
        self.assertIn("unreachable", str(caught.exception))

    def test_request_function_in_start_function_traps_with_reason(self) -> None:
        """``get_method`` from the start function: no request is in flight, and the error says so."""
        wat = module(
            '(func $setup (drop (call $get_method (i32.const 0) (i32.const 64)))) (start $setup)',
            HANDLERS,
        )
        with self.assertRaises(GuestLoadError) as caught:
            Guest(wat, cache=False)
        self.assertIn("get_method: no request in flight (called during init)", str(caught.exception))

    def test_start_function_writing_outside_memory_traps(self) -> None:
        """``get_config`` into a buffer past the end of memory, from the start function: a trap
        naming the access, never a host error."""
        wat = module(
            "(func $setup (drop (call $get_config (i32.const 65530) (i32.const 64)))) (start $setup)",
            HANDLERS,
        )
        with self.assertRaises(GuestLoadError) as caught:
            Guest(wat, config=CONFIG, cache=False)
        self.assertIn("get_config: out of bounds memory access", str(caught.exception))
        self.assertNotIn("host error", str(caught.exception))


class StartFunctionRequestsMixin(GuestTestMixin):
    @inlineCallbacks
    def test_features_enabled_by_start_function_apply_to_every_request(self) -> Any:
        """buffer_request and buffer_response enabled in the start function hold for each request:
        the downstream reads the whole body after the guest read part of it, and the guest
        rewrites the held response."""
        guest = self.guest(SETUP_DATA, SETUP, "(start $setup)", HANDLERS, config=CONFIG, cache=False)
        url = self.serve_guest(guest, Echo())  # type: ignore[attr-defined]
        for _ in range(3):
            response = yield self.get(url + "/", method="POST", data=b"0123456789")
            self.assertEqual(response.status, 200, response.body)
            self.assertEqual(response.headers.getRawHeaders("x-by"), ["guest"])
            self.assertEqual(json.loads(response.body)["body"], "0123456789")


globals().update(execution_variants(StartFunctionRequestsMixin, ServerTestCase))


# Every test case class above, on the compiled accelerator and on the pure-Python path.
guest_path_variants(globals())
