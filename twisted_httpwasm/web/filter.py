"""The flow of one request through a guest.

A :class:`RequestFilter` is made for each request that reaches a
:class:`~twisted_httpwasm.web.resource.GuestResource`.  It

1. runs ``handle_request`` in a guest session (one pinned instance, see
   :mod:`..runtime.session`), in a guest thread or straight through (inline);
2. applies what the guest changed to the real ``Request`` on the reactor
   thread, traverses and renders the downstream, its response going to the
   sink picked for this request (:mod:`.sinks`: streamed or buffered);
3. runs ``handle_response`` on the same instance when the downstream is done,
   failed, or the client went away, and sends the response.

Nothing is copied for the guest up front (the state reads the request on first
use).  Guest calls go through the resource's runner (:mod:`.runners`: a guest
thread, or inline), the downstream's calls are taken over by one
:class:`~.interception.Interception` chosen with the sink, and what happens on
a failure is decided in :mod:`.policy`: this module only runs the phases.  The guest's
observer hears once how the request ended, when the guest's part is over.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import INTERNAL_SERVER_ERROR
from twisted.web.resource import getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from ..abi import Feature
from ..runtime.budget import BufferBudget
from ..runtime.guest import Guest, GuestTrap
from ..runtime.observe import NO_OBSERVER, GuestObserver, Outcome
from ..runtime.state import BodyTooLarge, HeaderList
from .access_log import printable
from .answers import send_buffered, send_error, send_guest_answer
from .downstream import BadRequest, unusable_path
from .interception import Interception, PureInterception
from .policy import (
    BODY_TOO_LARGE,
    BUFFER_OVER_LIMIT,
    BUFFERS_FULL,
    DownstreamRemedy,
    FailurePolicy,
    Refusal,
    Remedy,
    after_downstream_failure,
    after_guest_failure,
    buffered_status,
    guest_answer_refused,
    refusal_of,
)
from .request_changes import (
    TwistedRequestState,
    merge_guest_response_headers,
)
from .runners import InlineRunner, Runner
from .sinks import BufferedSink, PureStreamedSink, StreamedSink, abort
from .twisted_internals import (
    install_response_encoder,
    is_encoding_resource,
    raw_header_map,
    request_disconnected,
    stored_header_name,
    watch_finish,
)

__all__ = ["FilterSettings", "PureRequestFilter", "RequestFilter"]


class FilterSettings(Protocol):
    """What a filter needs from the resource that made it (a ``GuestResource``)."""

    guest: Guest
    downstream: Any
    reactor: Any
    runner: Runner
    policy: FailurePolicy
    noted_framing_headers: set[bytes]
    buffer_budget: BufferBudget | None


_log = Logger(namespace="httpwasm")

_BUFFER_REQUEST = int(Feature.BUFFER_REQUEST)
_BUFFER_RESPONSE = int(Feature.BUFFER_RESPONSE)
#: What ``_host_connection`` holds before the downstream ran (read by the compiled fast path too).
NOT_READ: Any = object()
_CONNECTION = stored_header_name(b"connection")


class _Stage(enum.Enum):
    GUEST_REQUEST = "handle_request"
    DOWNSTREAM = "downstream"
    GUEST_RESPONSE = "handle_response"
    DONE = "done"


# The stages, read once: an Enum class's attribute is slow in Python 3.11 (see state.REQUEST_PHASE).
_GUEST_REQUEST, _DOWNSTREAM, _GUEST_RESPONSE, _DONE = (
    _Stage.GUEST_REQUEST,
    _Stage.DOWNSTREAM,
    _Stage.GUEST_RESPONSE,
    _Stage.DONE,
)
#: The stages in order, for the compiled fast path (web/fast.py).
STAGES = (_GUEST_REQUEST, _DOWNSTREAM, _GUEST_RESPONSE, _DONE)


class RequestFilter:
    """One request's passage through one guest."""

    # Its storage is a subclass's: :class:`PureRequestFilter` here, or the compiled fast path's
    # (web/fast.py), which also does the hot methods in C for the common case.
    if not TYPE_CHECKING:
        __slots__ = ()

    #: What the downstream's response goes to without buffer_response, and what takes over its calls.
    sink_type: type[StreamedSink] = PureStreamedSink
    interception_type: type[Interception] = PureInterception

    def __init__(self, settings: FilterSettings, request: Request):
        self.settings = settings
        guest = self.guest = settings.guest  # read once: a guest replaced mid-request keeps this request
        self.request = request
        # By position: see RequestState.__init__.
        self.state = state = TwistedRequestState(request.method, request.uri, request.content, guest.max_buffer_bytes)
        state.request = request
        state.client_headers = request.requestHeaders
        self.inline = inline = type(settings.runner) is InlineRunner
        self.session = guest.session(state, inline=inline)
        self.stage = _GUEST_REQUEST
        self.client_gone = False
        self.sink: StreamedSink | BufferedSink | None = None
        self.interception: Interception | None = None  # the downstream's calls, once it renders
        self.downstream_failure: Failure | None = None
        self.then: Refusal | None = None  # what answers the request once handle_response ran (413, 502, 503)
        self._detached_body: Any = None
        self._host_connection: Any = NOT_READ
        self._original_body: bytearray | None = None
        self._downstream_code = 0
        self._guest_body_reserved = 0  # bytes of a body the guest wrote before next, counted in the budget
        self._reported = False
        observer = guest.observer
        self.observer: GuestObserver | None = None if observer is NO_OBSERVER else observer
        self.started = time.monotonic() if self.observer is not None else 0.0

    # -- 1. handle_request ---------------------------------------------------------

    def start(self) -> object:
        """Render entry point: always answers asynchronously (NOT_DONE_YET)."""
        if self.inline:  # the call starts now, for a client that was there a moment ago
            self.settings.runner.run(
                self.session.handle_request, self._after_handle_request, self._handle_request_failed
            )
            return NOT_DONE_YET
        # Twisted closes request.content when the client goes away, which must not happen
        # under a guest reading it in a worker: the request has no body until the call is over.
        if self.guest.may_read_request_body:
            request = self.request
            self._detached_body, request.content = request.content, None
        self._watch_client()
        self.settings.runner.run(
            self.session.handle_request, self._after_handle_request, self._handle_request_failed, self._client_there
        )
        return NOT_DONE_YET

    def _watch_client(self) -> None:
        watch_finish(self.request, self)  # callback or errback, below

    # The request's end, told as to notifyFinish's Deferred (see twisted_internals.watch_finish).

    def callback(self, _: None) -> None:
        """The response was finished: nothing to do."""

    def errback(self, reason: Failure) -> None:
        """The client went away first."""
        try:
            self._connection_lost(reason)
        except Exception:  # noqa: BLE001 - as a Deferred would: the request's other notifications still run
            _log.failure("guest {guest}: ending the request of a client that left failed", guest=self.guest.name)

    def _client_there(self) -> bool:
        """Asked before a queued handle_request starts: a call for a client that left is dropped."""
        if not self.client_gone:
            return True
        self.settings.reactor.callFromThread(self._dropped)
        return False

    def _dropped(self) -> None:
        self.stage = _DONE
        self._report(Outcome.CLIENT_GONE)

    def _reattach_body(self) -> None:
        """Give the request its body back for the downstream (kept by the filter if the client left)."""
        if not self.client_gone and self._detached_body is not None:
            self.request.content, self._detached_body = self._detached_body, None

    def _handle_request_failed(self, error: BaseException) -> None:
        self._reattach_body()
        refusal = refusal_of(error)
        if refusal is not None:
            self._log_refusal(refusal, error)
            self.stage = _DONE
            self._report(refusal.outcome)
            self._fail(refusal.status, refusal.retry_after)
            return
        self._log_guest_failure("handle_request", error)
        decision = after_guest_failure(self.settings.policy, "handle_request", error, started=False)
        self._report(decision.outcome)
        if decision.remedy is Remedy.PASS_UNTOUCHED and not self.client_gone:
            self.stage = _DOWNSTREAM
            if self.request.content is not None:
                self.request.content.seek(0)
            self._render_downstream()
            return
        self.stage = _DONE
        self._fail(INTERNAL_SERVER_ERROR)

    def _after_handle_request(self, next_: bool) -> None:
        if self._detached_body is not None:
            self._reattach_body()
        if not next_:
            self.stage = _DONE
            if self.client_gone:
                self._report(Outcome.CLIENT_GONE)
                return
            fits, release = self._reserve_answer()
            if not fits:
                self._report(BUFFERS_FULL.outcome)
                self._fail(BUFFERS_FULL.status, BUFFERS_FULL.retry_after)
                return
            self._report(Outcome.ANSWERED)
            self._send_guest_response(release)
            return
        request, state = self.request, self.state
        if self.client_gone:
            self._run_handle_response(request.code, is_error=True)
            return
        if state.features & _BUFFER_REQUEST:
            try:
                state.check_size(state.body_length)
            except BodyTooLarge as error:
                self._log_refusal(BODY_TOO_LARGE, error)
                self._run_handle_response(BODY_TOO_LARGE.status, is_error=True, then=BODY_TOO_LARGE)
                return
        prefix = b""
        if state.touched():
            state.apply_changes(self._note_dropped)
            if state.response_body:
                prefix = bytes(state.response_body)  # what the guest wrote before next: the response starts with it
                budget = self.settings.buffer_budget
                if budget is not None:
                    if not budget.reserve(len(prefix)):
                        self._budget_full("a body it wrote before next", len(prefix))
                        self._run_handle_response(BUFFERS_FULL.status, is_error=True, then=BUFFERS_FULL)
                        return
                    self._guest_body_reserved = len(prefix)
        if state.features & _BUFFER_RESPONSE:
            self.sink = BufferedSink(
                prefix,
                self.guest.max_buffer_bytes,
                self._buffer_overflow,
                self.settings.reactor,
                self.settings.buffer_budget,
                self._buffer_full,
            )
        else:
            self.sink = self.sink_type(request, prefix, self.guest.name)
        self.stage = _DOWNSTREAM
        self.interception = self.interception_type(request, self.sink, self._downstream_finish, self._downstream_failed)
        self._render_downstream()

    def _reserve_answer(self) -> tuple[bool, Any]:
        """Count the body of the guest's own answer in the budget: (whether it fits, what gives it back).

        The bytes stay counted until the body is written out (or the client is
        gone): see :func:`~twisted_httpwasm.web.answers.send_guest_answer`.
        """
        body = self.state.response_body
        budget = self.settings.buffer_budget
        size = len(body) if body else 0
        if budget is None or not size:
            return True, None
        if not budget.reserve(size):
            self._budget_full("its own answer", size)
            return False, None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                budget.release(size)

        return True, release

    def _budget_full(self, what: str, size: int) -> None:
        """A guest-built body of ``size`` bytes does not fit in the budget: BUFFERS_FULL (503, Retry-After) follows."""
        budget = self.settings.buffer_budget
        _log.warn(
            "guest {guest}: buffered and guest-built bodies of this process hold {held} of {total} bytes,"
            " no room for {what} ({size} bytes); answering 503 to {method} {uri}",
            guest=self.guest.name,
            held=budget.held if budget is not None else 0,
            total=budget.total if budget is not None else 0,
            what=what,
            size=size,
            method=printable(self.request.method),
            uri=printable(self.request.uri),
        )

    def _send_guest_response(self, release: Any = None) -> None:
        request, state = self.request, self.state
        if guest_answer_refused(state.status):
            if release is not None:
                release()
            # An interim status as the whole answer: the client would read the next response as its end.
            _log.error(
                "guest {guest} answered {method} {uri} with the interim status {status}, "
                "which cannot end a response; answering 500",
                guest=self.guest.name,
                method=printable(request.method),
                uri=printable(request.uri),
                status=state.status,
            )
            self._fail(INTERNAL_SERVER_ERROR)
            return
        # Over an outer guest's headers, when chained.
        merge_guest_response_headers(request, state.changed_response_headers(), self._note_dropped)
        send_guest_answer(request, state.status, state.response_body or b"", release)

    # -- 2. the downstream -------------------------------------------------------------

    def _note_dropped(self, key: bytes, what: str) -> None:
        """Say once per resource and ``key`` why something a guest set for framing is not sent."""
        noted = self.settings.noted_framing_headers
        if key not in noted:
            noted.add(key)
            _log.debug(
                "guest {guest} {what}; the host frames responses itself and does not send it (reported once)",
                guest=self.guest.name,
                what=what,
            )

    def _render_downstream(self) -> None:
        """Traverse and render the downstream as ``Request.process`` would have."""
        request = self.request
        # Twisted's own Connection header (close, when the client asked for it), before the downstream's.
        self._host_connection = raw_header_map(request.responseHeaders).get(_CONNECTION) or None
        try:
            refusal = unusable_path(request)
            if refusal is not None:
                # The client's error: one line, no traceback (a traceback per request floods the log).
                _log.info(
                    "refusing {method} {uri}: {refusal}; answering 400",
                    method=printable(request.method),  # escaped: these are the client's bytes
                    uri=printable(request.uri),
                    refusal=refusal,
                )
                resource: Any = BadRequest()
            else:
                resource = getChildForRequest(self.settings.downstream, request)
            if is_encoding_resource(resource):
                install_response_encoder(resource, request)
            request.render(resource)
        except BaseException:  # noqa: BLE001 - as Request.process: any failure is the request's 500
            request.processingFailed(Failure())
        interception = self.interception
        if self.inline and self.stage is _DOWNSTREAM and interception is not None and interception.installed:
            # The downstream answers later: from now on the client may go away under it.
            self._watch_client()
            if request_disconnected(request):
                self._connection_lost(Failure(ConnectionError("the client went away")))

    def _buffer_overflow(self) -> None:
        _log.error(
            "guest {guest}: buffered response for {uri} exceeds {limit} bytes; answering 502",
            guest=self.guest.name,
            uri=printable(self.request.uri),
            limit=self.guest.max_buffer_bytes,
        )
        self._run_handle_response(BUFFER_OVER_LIMIT.status, is_error=True, then=BUFFER_OVER_LIMIT)

    def _buffer_full(self) -> None:
        budget = self.settings.buffer_budget
        _log.warn(
            "guest {guest}: buffered responses of this process hold {held} of {total} bytes;"
            " answering 503 to {method} {uri}",
            guest=self.guest.name,
            held=budget.held if budget is not None else 0,
            total=budget.total if budget is not None else 0,
            method=printable(self.request.method),
            uri=printable(self.request.uri),
        )
        self._run_handle_response(BUFFERS_FULL.status, is_error=True, then=BUFFERS_FULL)

    def _downstream_finish(self) -> None:
        if self.stage is not _DOWNSTREAM or self.client_gone:
            return
        request, sink = self.request, self.sink
        self._downstream_code = request.code
        if isinstance(sink, BufferedSink):
            self._original_body = body = sink.take()
            self.stage = _GUEST_RESPONSE
            self.state.enter_response_phase(request.code, None, body)
        else:
            assert sink is not None
            if sink.prefix:
                sink.downstream_finished()
            else:
                sink.open = False
            self.stage = _GUEST_RESPONSE
            self.state.enter_response_phase(request.code)
        self.settings.runner.run(
            self.session.handle_response, self._after_handle_response, self._handle_response_failed
        )

    def _downstream_failed(self, reason: Failure) -> Failure:
        if self.stage is not _DOWNSTREAM or self.client_gone:
            return reason
        self.downstream_failure = reason
        self._run_handle_response(INTERNAL_SERVER_ERROR, is_error=True)
        return reason

    # -- 3. handle_response --------------------------------------------------------------

    def _run_handle_response(self, status: int, *, is_error: bool, then: Refusal | None = None) -> None:
        """End the downstream's part with ``status`` (an error: the guest sees no response) and run handle_response."""
        sink = self.sink
        if isinstance(sink, BufferedSink):
            sink.close()  # an error ends the body: the guest sees none
        elif sink is not None:
            sink.open = False
            sink.stop_producer()
        self.stage = _GUEST_RESPONSE
        self.then = then
        state = self.state
        state.enter_response_phase(status, () if is_error else None)
        state.is_error = is_error
        self.settings.runner.run(
            self.session.handle_response, self._after_handle_response, self._handle_response_failed
        )

    def _end_guest_part(self, outcome_if_gone: str) -> bool:
        """What every ending of ``handle_response`` does first; True if that already ended the request.

        A client that left gets nothing more (``outcome_if_gone`` is reported); a
        refusal decided before ``handle_response`` (413, 502, 503) is answered now.
        """
        self.stage = _DONE
        if self.client_gone:
            self._report(outcome_if_gone)
            if self.interception is not None:
                self.interception.cut_off()
            return True
        if self.interception is not None:
            self.interception.remove()
        then = self.then
        if then is not None:
            self._report(then.outcome)
            self._fail(then.status, then.retry_after)
            return True
        return False

    def _after_handle_response(self, _: None) -> None:
        if self._end_guest_part(Outcome.CLIENT_GONE):
            return
        if self.downstream_failure is not None:
            self._answer_downstream_failure(self.downstream_failure, reported=False)
        elif isinstance(self.sink, BufferedSink):
            self._report(Outcome.PASSED)
            state = self.state
            self._send_buffered(state.status, state.changed_response_headers(), state.response_body or b"")
        else:
            assert self.sink is not None
            if self.observer is not None or self._detached_body is not None or self._guest_body_reserved:
                self._report(Outcome.PASSED)
            self.sink.complete()

    def _handle_response_failed(self, error: BaseException) -> None:
        self._log_guest_failure("handle_response", error)
        decision = after_guest_failure(self.settings.policy, "handle_response", error, started=self._response_started())
        if self._end_guest_part(decision.outcome):
            return
        if self.downstream_failure is not None:
            self._report(decision.outcome)
            self._answer_downstream_failure(self.downstream_failure, reported=True)
        elif decision.remedy is Remedy.SEND_AS_IS:
            self._report(decision.outcome)
            if isinstance(self.sink, BufferedSink):
                self._send_buffered(self._downstream_code, None, self._original_body or b"")
            else:
                assert self.sink is not None
                self.sink.complete()
        elif decision.remedy is Remedy.CUT:
            self._report(decision.outcome)
            self._cut()
        else:
            self._report(decision.outcome)
            self._fail(INTERNAL_SERVER_ERROR)

    def _answer_downstream_failure(self, failure: Failure, *, reported: bool) -> None:
        """Twisted's usual 500, unless part of the downstream's response is already sent.

        A failure whose exception names an ``http_status`` (the proxy's ``BadGateway``)
        is answered with that status and a short plain body instead.
        """
        request = self.request
        decision = after_downstream_failure(failure.value, started=self._response_started())
        if not reported:
            self._report(decision.outcome)
        if decision.remedy is DownstreamRemedy.ANSWER_STATUS:
            assert decision.status is not None
            # An expected failure (the proxy's dead backend): a warning, not a traceback.
            _log.warn(
                "downstream of guest {guest} failed for {method} {uri}: {reason}; answering {status}",
                guest=self.guest.name,
                method=printable(request.method),
                uri=printable(request.uri),
                reason=failure.getErrorMessage(),
                status=decision.status,
            )
            self._fail(decision.status)
            return
        if decision.remedy is DownstreamRemedy.TWISTED_ERROR:
            request.processingFailed(failure)
            return
        _log.failure(
            "downstream of guest {guest} failed after starting its response to {method} {uri}; closing",
            failure=failure,
            guest=self.guest.name,
            method=printable(request.method),
            uri=printable(request.uri),
        )
        self._cut()

    def _send_buffered(self, status: int, headers: HeaderList | None, body: bytes | bytearray) -> None:
        """The buffered response: ``headers`` as the guest left them, or (None) the downstream's."""
        sent = buffered_status(status, self._downstream_code)
        if sent != status:
            self._note_dropped(b":status", f"set the interim status {status} on the response")
            status = sent
        pairs = headers.items() if headers is not None else self.state.read_response_headers()
        send_buffered(self.request, status, pairs, body, self._connection())

    # -- endings ----------------------------------------------------------------------------

    def _connection(self) -> Any:
        """Twisted's own Connection header, as it was before the downstream ran."""
        connection = self._host_connection
        if connection is NOT_READ:  # the downstream has not run: the request's own is Twisted's
            connection = raw_header_map(self.request.responseHeaders).get(_CONNECTION) or None
        return connection

    def _response_started(self) -> bool:
        """Whether part of the response is on the wire (or held back to complete it)."""
        sink = self.sink
        return bool(self.request.startedWriting) or (isinstance(sink, StreamedSink) and sink.started)

    def _cut(self) -> None:
        """End a started response as incomplete: the only honest signal left."""
        sink = self.sink
        if isinstance(sink, StreamedSink):
            sink.cut()
        else:
            abort(self.request)

    def _report(self, outcome: str) -> None:
        """The guest's part of the request is over: close what it held, tell the observer (once)."""
        if self._reported:
            return
        self._reported = True
        if isinstance(self.sink, BufferedSink):
            self.sink.release()  # its bytes leave the process-wide budget
        if self._guest_body_reserved:
            reserved, self._guest_body_reserved = self._guest_body_reserved, 0
            budget = self.settings.buffer_budget
            if budget is not None:
                budget.release(reserved)
        body, self._detached_body = self._detached_body, None
        if body is not None:
            body.close()  # the client left: no guest call and no downstream will read it
        if self.observer is not None:
            self.observer.request_finished(self.guest, self.request, self.state, outcome, self.started)

    def _fail(self, status: int, retry_after: int | None = None) -> None:
        request = self.request
        if self.client_gone or request.finished:
            return
        if self.interception is not None:
            self.interception.remove()
        if retry_after is not None:
            request.setHeader(b"retry-after", b"%d" % retry_after)
        send_error(request, status, self._connection())
        sink = self.sink
        if sink is not None and sink.buffered and not sink.open and self.then is not None:
            # A downstream that was cut off (502: its response was too large; 503: the buffers of the
            # process were full) may still write and finish: those calls go nowhere.
            assert self.interception is not None
            self.interception.ignore_late_calls()

    def _log_guest_failure(self, phase: str, error: BaseException) -> None:
        """The reason a guest call failed goes to the log (never to the client)."""
        _log.error(
            "guest {guest} failed in {phase} for {method} {uri}: {reason}",
            guest=self.guest.name,
            phase=phase,
            method=printable(self.request.method),
            uri=printable(self.request.uri),
            reason=error.reason if isinstance(error, GuestTrap) else repr(error),
        )

    def _log_refusal(self, refusal: Refusal, error: BaseException) -> None:
        (_log.debug if refusal.quiet else _log.warn)(
            "guest {guest}: {what} for {uri}: {error}",
            guest=self.guest.name,
            what=refusal.what,
            uri=printable(self.request.uri),
            error=error,
        )

    def _connection_lost(self, reason: Failure) -> None:
        """The client went away: release everything without writing again."""
        if self.client_gone:
            return
        self.client_gone = True
        sink = self.sink
        if self.stage is _DOWNSTREAM:
            if sink is not None:
                # The hooks stay on: a downstream that does not watch notifyFinish may still
                # write and finish, which Twisted would answer with RuntimeError.
                self._run_handle_response(self.request.code, is_error=True)
            else:
                self.stage = _DONE  # fail-open: the guest's part was over already
        elif sink is not None:
            sink.stop_producer()
        # GUEST_REQUEST / GUEST_RESPONSE: the running call sees client_gone when it returns.


class PureRequestFilter(RequestFilter):
    """A :class:`RequestFilter` with its storage in slots: the pure-Python path's."""

    __slots__ = (
        "_detached_body",
        "_downstream_code",
        "_guest_body_reserved",
        "_host_connection",
        "_original_body",
        "_reported",
        "client_gone",
        "downstream_failure",
        "guest",
        "inline",
        "interception",
        "observer",
        "request",
        "session",
        "settings",
        "sink",
        "stage",
        "started",
        "state",
        "then",
    )
