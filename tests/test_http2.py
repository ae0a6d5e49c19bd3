"""HTTPS and HTTP/2 through a guest, with a real HTTP/2 client.

The server is a GuestResource over TLS with ALPN offering h2 and http/1.1:
Twisted switches a connection to HTTP/2 when the client negotiates h2 (needs
``twisted[http2]``).  The client is the ``h2`` library over a blocking TLS
socket in a thread; the same requests over HTTP/1.1 (``http.client``) must
behave the same but for the protocol version the guest reports.  The
certificates are made at test time.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import socket
import ssl
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http as twisted_http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.static import Data

from twisted_httpwasm import Execution, GuestResource

from .support import ServerTestCase, execution_variants, make_guest
from .test_proxy import ConnectionTracker

try:
    import h2.config
    import h2.connection
    import h2.events
except ImportError:  # pragma: no cover - depends on the environment
    h2 = None

H2_SKIP = (
    None
    if twisted_http.H2_ENABLED and h2 is not None
    else "HTTP/2 needs the h2 package: pip install 'twisted[http2]' (the test extra includes it)"
)

# -- certificates, made at test time -----------------------------------------------------


class Certificates(NamedTuple):
    ca_pem: bytes  # what the client trusts
    key_pem: bytes  # the server's key
    cert_pem: bytes  # the server's certificate, for 127.0.0.1 and localhost, signed by the CA


def make_certificates() -> Certificates:
    """A throwaway CA and a server certificate it signed (EC P-256, valid for a day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "twisted-httpwasm test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return Certificates(
        ca_pem=ca_cert.public_bytes(pem),
        key_pem=key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        cert_pem=cert.public_bytes(pem),
    )


_certificates: Certificates | None = None


def certificates() -> Certificates:
    global _certificates
    if _certificates is None:
        _certificates = make_certificates()
    return _certificates


# -- the guest ---------------------------------------------------------------------------

#: Every response gets x-protocol: <get_protocol_version> and x-guest: yes (set before next).
#: "/guest..." is answered by the guest: 200, x-built: yes, "built by the guest\n".
#: "/buffer..." enables buffer_response for this request only (req_ctx=1), and
#: handle_response wraps the whole body as "<<body>>".
GUEST = """
  (data (i32.const 0) "/guest")
  (data (i32.const 8) "/buffer")
  (data (i32.const 16) "x-protocol")
  (data (i32.const 32) "x-guest")
  (data (i32.const 40) "yes")
  (data (i32.const 48) "x-built")
  (data (i32.const 64) "built by the guest\\n")
  (data (i32.const 96) "<<")
  (data (i32.const 100) ">>")
  (func $starts_with (param $at i32) (param $len i32) (param $prefix i32) (param $prefix_len i32) (result i32)
    (local $i i32)
    (if (i32.lt_u (local.get $len) (local.get $prefix_len)) (then (return (i32.const 0))))
    (block $done
      (loop $each
        (br_if $done (i32.ge_u (local.get $i) (local.get $prefix_len)))
        (if (i32.ne (i32.load8_u (i32.add (local.get $at) (local.get $i)))
                    (i32.load8_u (i32.add (local.get $prefix) (local.get $i))))
          (then (return (i32.const 0))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $each)))
    (i32.const 1))
  (func (export "handle_request") (result i64)
    (local $len i32)
    (local $proto_len i32)
    (local.set $proto_len (call $get_protocol_version (i32.const 512) (i32.const 32)))
    (call $set_header_value (i32.const 1) (i32.const 16) (i32.const 10) (i32.const 512) (local.get $proto_len))
    (call $set_header_value (i32.const 1) (i32.const 32) (i32.const 7) (i32.const 40) (i32.const 3))
    (local.set $len (call $get_uri (i32.const 1024) (i32.const 4096)))
    (if (call $starts_with (i32.const 1024) (local.get $len) (i32.const 0) (i32.const 6))
      (then
        (call $set_header_value (i32.const 1) (i32.const 48) (i32.const 7) (i32.const 40) (i32.const 3))
        (call $write_body (i32.const 1) (i32.const 64) (i32.const 19))
        (return (i64.const 0))))
    (if (call $starts_with (i32.const 1024) (local.get $len) (i32.const 8) (i32.const 7))
      (then
        (drop (call $enable_features (i32.const 2)))
        (return (i64.const 0x100000001))))
    (i64.const 1))
  (func (export "handle_response") (param $req_ctx i32) (param $is_error i32)
    (local $len i32)
    (local $eof_len i64)
    (if (i32.or (local.get $is_error) (i32.ne (local.get $req_ctx) (i32.const 1))) (then (return)))
    (block $eof
      (loop $more
        (local.set $eof_len (call $read_body (i32.const 1)
          (i32.add (i32.const 8192) (local.get $len)) (i32.sub (i32.const 57344) (local.get $len))))
        (local.set $len (i32.add (local.get $len) (i32.wrap_i64 (local.get $eof_len))))
        (br_if $eof (i64.ne (i64.shr_u (local.get $eof_len) (i64.const 32)) (i64.const 0)))
        (br $more)))
    (call $write_body (i32.const 1) (i32.const 96) (i32.const 2))
    (call $write_body (i32.const 1) (i32.const 8192) (local.get $len))
    (call $write_body (i32.const 1) (i32.const 100) (i32.const 2)))
"""

#: Lets every request through, then traps in handle_response.
TRAPS_IN_RESPONSE = """
  (func (export "handle_request") (result i64) (i64.const 1))
  (func (export "handle_response") (param i32 i32) unreachable)
"""

BIG = bytes(range(256)) * 2048  # 512 KiB: more than HTTP/2's initial flow-control window


class Echo(Resource):
    """Answers with the method, the URI and the body it got."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return request.method + b" " + request.uri + b" " + request.content.read()


class Streamed(Resource):
    """Writes BIG in 64 KiB pieces over several reactor turns, with no Content-Length."""

    isLeaf = True

    def render(self, request: Any) -> object:
        pieces = [BIG[i : i + 65536] for i in range(0, len(BIG), 65536)]

        def next_piece() -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            if pieces:
                request.write(pieces.pop(0))
                reactor.callLater(0, next_piece)
            else:
                request.finish()

        next_piece()
        return NOT_DONE_YET


def downstream() -> Resource:
    root = Resource()
    root.putChild(b"data", Data(b"downstream body\n", "text/plain"))
    root.putChild(b"echo", Echo())
    root.putChild(b"big", Streamed())
    buffered = Resource()
    buffered.putChild(b"data", Data(b"downstream body\n", "text/plain"))
    root.putChild(b"buffer", buffered)
    return root


# -- blocking clients (run in a thread) -------------------------------------------------


class Answer(NamedTuple):
    protocol: str  # the ALPN protocol the TLS connection negotiated
    status: int
    headers: dict[str, list[str]]  # lowercase names
    body: bytes


def _client_context(ca_pem: bytes, alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(alpn)
    return context


def serve_tls(test: Any, site: Any) -> int:
    """Serve ``site`` on 127.0.0.1 over TLS with ALPN h2 and http/1.1 until ``test`` ends; the port.

    The certificate is :func:`certificates`' (trust its ``ca_pem``); connections
    still open when the test ends are closed.
    """
    from twisted.internet.ssl import CertificateOptions, PrivateCertificate

    certs = certificates()
    private = PrivateCertificate.loadPEM(certs.key_pem + certs.cert_pem)
    options = CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    tracker = ConnectionTracker(site)
    port = reactor.listenSSL(0, tracker, options, interface="127.0.0.1")  # type: ignore[attr-defined]
    test.addCleanup(tracker.close_all)
    test.addCleanup(port.stopListening)
    number: int = port.getHost().port
    return number


def h2_fetch(port: int, ca_pem: bytes, method: str, path: str, body: bytes = b"", timeout: float = 10) -> Answer:
    """One request over HTTP/2 (h2 over TLS with ALPN), blocking."""
    context = _client_context(ca_pem, ["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            negotiated = tls.selected_alpn_protocol() or ""
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            stream = conn.get_next_available_stream_id()
            headers = [
                (":method", method),
                (":path", path),
                (":scheme", "https"),
                (":authority", f"127.0.0.1:{port}"),
            ]
            if body:
                headers.append(("content-length", str(len(body))))
            conn.send_headers(stream, headers, end_stream=not body)
            if body:
                conn.send_data(stream, body, end_stream=True)
            tls.sendall(conn.data_to_send())
            status = 0
            response_headers: dict[str, list[str]] = {}
            received = bytearray()
            ended = False
            while not ended:
                data = tls.recv(65536)
                if not data:
                    raise ConnectionError("the server closed the connection before the response ended")
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        for name, value in event.headers:
                            if name == ":status":
                                status = int(value)
                            else:
                                response_headers.setdefault(name.lower(), []).append(value)
                    elif isinstance(event, h2.events.DataReceived):
                        received += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                    elif isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated):
                        raise ConnectionError(f"HTTP/2 stream ended abnormally: {event}")
                tls.sendall(conn.data_to_send())
            conn.close_connection()
            tls.sendall(conn.data_to_send())
    return Answer(negotiated, status, response_headers, bytes(received))


def h1_fetch(port: int, ca_pem: bytes, method: str, path: str, body: bytes = b"") -> Answer:
    """The same request over HTTP/1.1 on TLS (ALPN http/1.1), blocking."""
    context = _client_context(ca_pem, ["http/1.1"])
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    try:
        connection.request(method, path, body=body or None)
        response = connection.getresponse()
        data = response.read()
        headers: dict[str, list[str]] = {}
        for name, value in response.getheaders():
            headers.setdefault(name.lower(), []).append(value)
        negotiated = connection.sock.selected_alpn_protocol() if connection.sock is not None else ""
        return Answer(negotiated or "", response.status, headers, data)
    finally:
        connection.close()


# -- the tests ---------------------------------------------------------------------------


class Http2Mixin:
    """A guest over TLS; each request made over HTTP/2 and over HTTP/1.1."""

    execution: Execution
    timeout = 20
    skip = H2_SKIP

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        self.ca_pem = certificates().ca_pem
        self.guest = make_guest(GUEST, execution=self.execution)
        self.port = self.serve_tls(self.guest)

    def serve_tls(self, guest: Any) -> int:
        """Serve ``guest`` in front of downstream() over TLS, ALPN h2 and http/1.1; the port."""
        return serve_tls(self, Site(GuestResource(guest, downstream())))

    @inlineCallbacks
    def both(self, method: str, path: str, body: bytes = b"") -> Any:
        """(HTTP/2 answer, HTTP/1.1 answer) of the same request."""
        over_h2 = yield deferToThread(h2_fetch, self.port, self.ca_pem, method, path, body)
        over_h1 = yield deferToThread(h1_fetch, self.port, self.ca_pem, method, path, body)
        self.assertEqual((over_h2.protocol, over_h1.protocol), ("h2", "http/1.1"))  # type: ignore[attr-defined]
        return over_h2, over_h1

    def assert_same(self, over_h2: Answer, over_h1: Answer, *ignored: str) -> None:
        """Same status, body and headers, but for x-protocol, date and what HTTP/2 frames itself."""
        skip = {"x-protocol", "date", "connection", "transfer-encoding", "keep-alive", *ignored}
        self.assertEqual((over_h2.status, over_h2.body), (over_h1.status, over_h1.body))  # type: ignore[attr-defined]
        self.assertEqual(  # type: ignore[attr-defined]
            {k: v for k, v in over_h2.headers.items() if k not in skip},
            {k: v for k, v in over_h1.headers.items() if k not in skip},
        )

    @inlineCallbacks
    def test_protocol_version_seen_by_guest(self) -> Any:
        """get_protocol_version answers HTTP/2.0 over h2 and HTTP/1.1 over http/1.1."""
        over_h2, over_h1 = yield self.both("GET", "/data")
        self.assertEqual(over_h2.headers["x-protocol"], ["HTTP/2.0"])  # type: ignore[attr-defined]
        self.assertEqual(over_h1.headers["x-protocol"], ["HTTP/1.1"])  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_downstream_response_with_guest_header(self) -> Any:
        """The downstream's response with the guest's header, alike over both protocols."""
        over_h2, over_h1 = yield self.both("GET", "/data")
        self.assertEqual((over_h2.status, over_h2.body), (200, b"downstream body\n"))  # type: ignore[attr-defined]
        self.assertEqual(over_h2.headers["x-guest"], ["yes"])  # type: ignore[attr-defined]
        self.assert_same(over_h2, over_h1)
        self.assertEqual(self.guest.pool.stats.in_use, 0)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_guest_built_response(self) -> Any:
        """A response the guest builds (next=0) arrives whole over HTTP/2."""
        over_h2, over_h1 = yield self.both("GET", "/guest/x")
        self.assertEqual((over_h2.status, over_h2.body), (200, b"built by the guest\n"))  # type: ignore[attr-defined]
        self.assertEqual(over_h2.headers["x-built"], ["yes"])  # type: ignore[attr-defined]
        self.assertEqual(over_h2.headers["content-length"], ["19"])  # type: ignore[attr-defined]
        self.assert_same(over_h2, over_h1)

    @inlineCallbacks
    def test_buffer_response_rewrite(self) -> Any:
        """buffer_response enabled for one request: the guest's rewritten body, with a
        Content-Length that fits it."""
        over_h2, over_h1 = yield self.both("GET", "/buffer/data")
        self.assertEqual((over_h2.status, over_h2.body), (200, b"<<downstream body\n>>"))  # type: ignore[attr-defined]
        self.assertEqual(over_h2.headers["content-length"], ["20"])  # type: ignore[attr-defined]
        self.assert_same(over_h2, over_h1)
        self.assertEqual(self.guest.pool.stats.in_use, 0)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_request_body_reaches_downstream(self) -> Any:
        """A POST body sent in HTTP/2 DATA frames reaches the downstream."""
        over_h2, over_h1 = yield self.both("POST", "/echo?x=1", b"the request body")
        self.assertEqual(over_h2.body, b"POST /echo?x=1 the request body")  # type: ignore[attr-defined]
        self.assert_same(over_h2, over_h1)

    @inlineCallbacks
    def test_large_streamed_response(self) -> Any:
        """A streamed response larger than HTTP/2's flow-control window arrives whole."""
        over_h2, over_h1 = yield self.both("GET", "/big")
        self.assertEqual(over_h2.status, 200)  # type: ignore[attr-defined]
        self.assertEqual(len(over_h2.body), len(BIG))  # type: ignore[attr-defined]
        self.assertTrue(over_h2.body == BIG)  # type: ignore[attr-defined]
        self.assert_same(over_h2, over_h1)
        self.assertEqual(self.guest.pool.stats.in_use, 0)  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_trap_after_streaming_resets_the_stream(self) -> Any:
        """A trap in handle_response after the body was streamed cuts the response: over
        HTTP/2 the stream is reset (RST_STREAM), as HTTP/1.1 closes the connection; it must
        not be left open."""
        trapping = make_guest(TRAPS_IN_RESPONSE, execution=self.execution)
        port = self.serve_tls(trapping)
        failed = yield self.assertFailure(  # type: ignore[attr-defined]
            deferToThread(h2_fetch, port, self.ca_pem, "GET", "/big", timeout=5), ConnectionError
        )
        self.assertIn("StreamReset", str(failed))  # type: ignore[attr-defined]
        self.assertEqual(trapping.pool.stats.in_use, 0)  # type: ignore[attr-defined]


globals().update(execution_variants(Http2Mixin, ServerTestCase))


class CertificateTests(SynchronousTestCase):
    """The test certificates are what the HTTP/2 tests rely on."""

    def test_server_certificate_verifies_for_loopback(self) -> None:
        """The server certificate names 127.0.0.1 and is signed by the CA the clients trust."""
        from cryptography import x509

        certs = certificates()

        cert = x509.load_pem_x509_certificate(certs.cert_pem)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn(ipaddress.IPv4Address("127.0.0.1"), names.get_values_for_type(x509.IPAddress))
        ca = x509.load_pem_x509_certificate(certs.ca_pem)
        cert.verify_directly_issued_by(ca)
