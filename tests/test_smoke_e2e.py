"""End-to-end: a guest in front of a routed resource, over a real socket."""

from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource
from twisted.web.static import Data

from .support import EXECUTIONS, NOOP_RESPONSE, ServerTestCase, make_guest

REWRITE_A_TO_B = """
  (data (i32.const 16) "/b")
  (func (export "handle_request") (result i64)
    (drop (call $get_uri (i32.const 100) (i32.const 100)))
    (if (i32.eq (i32.load8_u (i32.const 101)) (i32.const 97))
      (then (call $set_uri (i32.const 16) (i32.const 2))))
    (i64.const 1))
"""


class RewriteRoutingTests(ServerTestCase):
    @inlineCallbacks
    def test_set_uri_routes_downstream_in_both_modes(self):
        """The downstream routes on the URI the guest rewrote."""
        for execution in EXECUTIONS:
            root = Resource()
            root.putChild(b"a", Data(b"I am A", "text/plain"))
            root.putChild(b"b", Data(b"I am B", "text/plain"))
            guest = make_guest(REWRITE_A_TO_B, NOOP_RESPONSE, execution=execution)
            url = self.serve_guest(guest, root)
            status, _, body = yield self.fetch("GET", url + "/a")
            self.assertEqual((status, body), (200, b"I am B"), execution)
            self.assertEqual(guest.pool.stats.in_use, 0)
