"""Logs an operator reads: text, not byte reprs; no per-request factory noise; the client's URI in the access log."""

from __future__ import annotations

import importlib
import io
import json
import re
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.resource import Resource

from twisted_httpwasm import Guest, GuestResource
from twisted_httpwasm.service.jsonlog import JSONLinesObserver
from twisted_httpwasm.service.tap import Options
from twisted_httpwasm.web.access_log import RequestLog
from twisted_httpwasm.web.proxy import ProxyResource
from twisted_httpwasm.web.site import GuestSite

from .support import NOOP_RESPONSE, ServerTestCase, TempFilesMixin, module, poll
from .test_twistd import DEADLINE, TwistdTestCase, free_port

#: Logs one line per request, then passes it on.
CHATTY_GUEST = (
    """
  (data (i32.const 0) "hello from the guest")
  (func (export "handle_request") (result i64)
    (call $log (i32.const 0) (i32.const 0) (i32.const 20))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: Rewrites every request's URI to /rewritten?x=1.
REWRITING_GUEST = (
    """
  (data (i32.const 0) "/rewritten?x=1")
  (func (export "handle_request") (result i64)
    (call $set_uri (i32.const 0) (i32.const 14))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)

#: The Combined Log Format, as log parsers read it (anything after the user agent is ignored).
COMBINED = re.compile(
    r'^"?(?P<host>[^ "]+)"? (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" '
    r'(?P<status>\d{3}) (?P<size>\S+) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"(?P<rest>.*)$'
)


class Backend(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"backend"


class Echo(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return request.uri


#: The request path's modules (web/filter.py, being reworked apart, and what it is split into).
REQUEST_PATH_MODULES = (
    "twisted_httpwasm.web.filter",
    "twisted_httpwasm.web.sinks",
    "twisted_httpwasm.web.downstream",
    "twisted_httpwasm.web.policy",
    "twisted_httpwasm.runtime.session",
)


def request_path_loggers() -> list[Any]:
    """The module loggers of the request path's modules that exist."""
    loggers = []
    for name in REQUEST_PATH_MODULES:
        try:
            module_ = importlib.import_module(name)
        except ImportError:
            continue
        logger = getattr(module_, "_log", None)
        if logger is not None:
            loggers.append(logger)
    return loggers


class QuietClientFactory(_HTTP11ClientFactory):
    noisy = False


class CapturedLog:
    """Every log event, formatted as a log file shows it."""

    def __init__(self, test: Any):
        self.lines: list[str] = []
        self.filter_lines: list[str] = []  # the request path's own (its log calls are being reworked apart)
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        text = formatEvent(event) or ""
        (self.filter_lines if event.get("log_logger") in request_path_loggers() else self.lines).append(text)


class OperatorLogTests(TempFilesMixin, ServerTestCase):
    @inlineCallbacks
    def test_a_request_through_the_proxy_logs_text_once(self) -> Generator[Any, Any, None]:
        """Through a guest and --proxy: one ``[guest NAME] message`` line per guest message, no factory lines,
        and no Python byte reprs, also when the backend is unreachable."""
        guest = Guest(module(CHATTY_GUEST), name="chatty", cache=False)
        proxy = ProxyResource(self.serve(Backend()), timeout=10)
        self.addCleanup(proxy.close)
        url = self.listen(GuestSite(GuestResource(guest, proxy)))
        down = ProxyResource(f"http://127.0.0.1:{free_port()}", timeout=10)
        self.addCleanup(down.close)
        down_url = self.listen(GuestSite(GuestResource(guest, down)))
        self.pool._factory = QuietClientFactory  # the test's own client: only the server's lines count
        log = CapturedLog(self)

        for _ in range(2):
            status, _, body = yield self.fetch("GET", url + "/note.txt?q=1")
            self.assertEqual((status, body), (200, b"backend"))
        status, _, _ = yield self.fetch("GET", down_url + "/note.txt?q=1")
        self.assertEqual(status, 502)
        # Guest lines logged from a worker thread reach the log through the reactor.
        yield poll(lambda: sum("hello from the guest" in line for line in log.lines) >= 3, 5)

        guest_lines = [line for line in log.lines if "hello from the guest" in line]
        self.assertEqual(guest_lines, ["[guest chatty] hello from the guest"] * 3)
        self.assertEqual([line for line in log.lines if "b'" in line or 'b"' in line], [])
        self.assertEqual([line for line in log.lines if "factory" in line.lower()], [])
        unreachable = [line for line in log.lines if "unreachable" in line]
        self.assertEqual(len(unreachable), 1, log.lines)
        self.assertIn(" unreachable for GET /note.txt?q=1: ", unreachable[0])

    @inlineCallbacks
    def test_the_filters_lines_carry_text(self) -> Generator[Any, Any, None]:
        """The request path's own lines (a failed downstream) show the method and URI as text too."""
        log = CapturedLog(self)
        guest = Guest(module(CHATTY_GUEST), name="chatty", cache=False)
        down = ProxyResource(f"http://127.0.0.1:{free_port()}", timeout=10)
        self.addCleanup(down.close)
        url = self.listen(GuestSite(GuestResource(guest, down)))
        status, _, _ = yield self.fetch("GET", url + "/note.txt?q=1")
        self.assertEqual(status, 502)
        self.assertTrue(log.filter_lines)
        self.assertEqual([line for line in log.filter_lines if "b'" in line], [])

    @inlineCallbacks
    def test_access_log_has_the_clients_uri_and_the_rewritten_one(self) -> Generator[Any, Any, None]:
        """The access log's request field is what the client sent; a guest's rewrite follows as a last field,
        and the line still parses as the Combined Log Format."""
        path = self.mktemp() + ".log"
        guest = Guest(module(REWRITING_GUEST), name="rewrite", cache=False)
        site = GuestSite(GuestResource(guest, Echo()), logPath=path)
        url = self.listen(site)
        status, _, body = yield self.fetch("GET", url + "/original/path?a=b", headers={"user-agent": "probe/1"})
        self.assertEqual((status, body), (200, b"/rewritten?x=1"))
        if not (yield poll(lambda: Path(path).exists() and Path(path).read_text().endswith("\n"), 5)):
            self.fail("no access log line")
        (line,) = Path(path).read_text().splitlines()
        fields = COMBINED.match(line)
        self.assertIsNotNone(fields, line)
        assert fields is not None
        self.assertEqual(fields["request"], "GET /original/path?a=b HTTP/1.1")
        self.assertEqual(fields["status"], "200")
        self.assertEqual(fields["agent"], "probe/1")
        self.assertEqual(fields["rest"], ' "/rewritten?x=1"')

    @inlineCallbacks
    def test_access_log_without_a_rewrite_is_plain_combined(self) -> Generator[Any, Any, None]:
        """A request no guest rewrote: the usual Combined Log Format line, nothing after the user agent."""
        path = self.mktemp() + ".log"
        guest = Guest(module(CHATTY_GUEST), name="plain", cache=False)
        url = self.listen(GuestSite(GuestResource(guest, Echo()), logPath=path))
        status, _, _ = yield self.fetch("GET", url + "/same")
        self.assertEqual(status, 200)
        if not (yield poll(lambda: Path(path).exists() and Path(path).read_text().endswith("\n"), 5)):
            self.fail("no access log line")
        fields = COMBINED.match(Path(path).read_text().splitlines()[0])
        assert fields is not None
        self.assertEqual((fields["request"], fields["rest"]), ("GET /same HTTP/1.1", ""))


#: Traps on /trap..., passes anything else on.
TRAP_ON_T_GUEST = (
    """
  (func (export "handle_request") (result i64)
    (drop (call $get_uri (i32.const 100) (i32.const 64)))
    (if (i32.eq (i32.load8_u (i32.const 101)) (i32.const 116)) (then unreachable))
    (i64.const 1))
"""
    + NOOP_RESPONSE
)


class JSONLogTests(TempFilesMixin, ServerTestCase):
    @inlineCallbacks
    def test_json_lines_carry_request_id_guest_phase_outcome(self) -> Generator[Any, Any, None]:
        """With the request log and the JSON observer: one JSON line per request and guest, with its fields;
        the two guests of one request share its request id."""
        stream = io.StringIO()
        observer = JSONLinesObserver(stream)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        outer = Guest(module(CHATTY_GUEST), name="outer", cache=False)
        inner = Guest(module(TRAP_ON_T_GUEST), name="inner", cache=False)
        request_log = RequestLog()
        request_log.watch(outer)
        request_log.watch(inner)
        site = GuestSite(GuestResource(outer, GuestResource(inner, Echo())))
        request_log.install(site)
        url = self.listen(site)
        status, _, _ = yield self.fetch("GET", url + "/fine?x=1")
        self.assertEqual(status, 200)
        status, _, _ = yield self.fetch("GET", url + "/trap")
        self.assertEqual(status, 500)
        yield poll(lambda: stream.getvalue().count('"namespace": "httpwasm.request"') >= 4, 5)

        records = [json.loads(line) for line in stream.getvalue().splitlines()]
        requests = [record for record in records if record["namespace"] == "httpwasm.request"]
        summary = [(r["guest"], r["phase"], r["outcome"], r["status"], r["method"], r["uri"]) for r in requests]
        self.assertEqual(
            sorted(summary),
            [
                ("inner", "handle_request", "trapped", 500, "GET", "/trap"),
                ("inner", "handle_response", "passed", 200, "GET", "/fine?x=1"),
                ("outer", "handle_response", "passed", 200, "GET", "/fine?x=1"),
                ("outer", "handle_response", "passed", 500, "GET", "/trap"),
            ],
        )
        ids = {(r["uri"], r["request_id"]) for r in requests}
        self.assertEqual(len(ids), 2, ids)  # one id per request, shared by its guests
        for _, request_id in ids:
            self.assertRegex(request_id, r"^[0-9a-f]{16}$")
        for record in records:
            self.assertEqual(set(record) >= {"time", "level", "namespace", "text"}, True, record)
        guest_lines = [r for r in records if r.get("guest") == "outer" and "hello from the guest" in r["text"]]
        self.assertEqual(len(guest_lines), 2)


class TwistdJSONLogTests(TwistdTestCase):
    @inlineCallbacks
    def test_log_format_json(self) -> Generator[Any, Any, None]:
        """twistd httpwasm --log-format json: every log line is a JSON object; a request logs its outcome."""
        url = yield self.start_server(
            "--log-format", "json", "--guest", self.guest_file(CHATTY_GUEST), "--class", "tests.test_twistd.Hello"
        )
        status, _, _ = yield self.fetch("GET", url + "/x")
        self.assertEqual(status, 200)
        if not (yield poll(lambda: '"outcome": "passed"' in self.server.output(), DEADLINE)):
            self.fail(self.server.output())
        records = [json.loads(line) for line in self.server.output().splitlines() if line.strip()]
        (request,) = [r for r in records if r["namespace"] == "httpwasm.request"]
        self.assertEqual((request["outcome"], request["status"], request["uri"]), ("passed", 200, "/x"))
        self.assertRegex(request["request_id"], r"^[0-9a-f]{16}$")

    def test_log_format_is_checked(self) -> None:
        """--log-format accepts text or json only."""
        with self.assertRaises(usage.UsageError) as raised:
            Options().parseOptions(["--log-format", "xml"])
        self.assertIn("--log-format must be one of text, json", str(raised.exception))
