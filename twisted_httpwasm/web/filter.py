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
use), and what happens on a failure is decided in :mod:`.policy`.  The guest's
observer hears once how the request ended, when the guest's part is over.
"""

from __future__ import annotations

import enum
import math
import time
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import (
    BAD_GATEWAY,
    INTERNAL_SERVER_ERROR,
    REQUEST_ENTITY_TOO_LARGE,
    SERVICE_UNAVAILABLE,
)
from twisted.web.resource import _IEncodingResource, getChildForRequest
from twisted.web.server import NOT_DONE_YET, Request

from ..abi import Feature
from ..runtime.budget import BufferBudget
from ..runtime.guest import Guest, GuestTrap
from ..runtime.observe import NO_OBSERVER, GuestObserver, Outcome
from ..runtime.pool import GuestUnavailable
from ..runtime.state import BodyTooLarge, HeaderList
from .access_log import printable
from .answers import send_buffered, send_error, send_guest_answer
from .downstream import BadRequest, unusable_path
from .policy import FailurePolicy, Remedy, after_guest_failure, outcome_of_status, refusal_of
from .request_changes import (
    TwistedRequestState,
    apply_request_changes,
    merge_guest_response_headers,
)
from .runners import InlineRunner, Runner
from .sinks import BufferedSink, StreamedSink, abort

__all__ = ["FilterSettings", "RequestFilter"]


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

_HOOKED = ("write", "finish", "processingFailed", "registerProducer", "unregisterProducer")
#: The request attribute naming the filter whose hooks it carries (an inner guest saves and restores them).
_HOOKED_BY = "_httpwasm_hooked_by"
#: What _hook sets on a request: all of it for a buffering sink, the producer hooks aside for a streaming one.
_ALL_HOOKS = (*_HOOKED, _HOOKED_BY)
_STREAMED_HOOKS = ("write", "finish", "processingFailed", _HOOKED_BY)
_BUFFER_REQUEST = int(Feature.BUFFER_REQUEST)
_BUFFER_RESPONSE = int(Feature.BUFFER_RESPONSE)
_NOT_READ: Any = object()


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


def _ignore(*args: object) -> None:
    """Stands in for the request methods of a downstream the filter has cut off."""


def _own_hook(request: Any, name: str) -> Any:
    """The hook set on ``request`` for ``name`` (None when it is the request's own method)."""
    value = getattr(request, name)
    return None if getattr(value, "__self__", None) is request else value


def _drop_attribute(request: Any, name: str) -> None:
    try:
        delattr(request, name)
    except AttributeError:
        pass


class RequestFilter:
    """One request's passage through one guest."""

    __slots__ = (
        "_detached_body",
        "_downstream_code",
        "_guest_body_reserved",
        "_host_connection",
        "_original_body",
        "_reported",
        "_saved_hooks",
        "client_gone",
        "downstream_failure",
        "guest",
        "hooked",
        "inline",
        "observer",
        "request",
        "session",
        "settings",
        "sink",
        "stage",
        "started",
        "state",
        "then_status",
    )

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
        self.hooked = False
        self.downstream_failure: Failure | None = None
        self.then_status: int | None = None  # the status a refusal answers with once handle_response ran
        self._saved_hooks: dict[str, Any] | None = None
        self._detached_body: Any = None
        self._host_connection: Any = _NOT_READ
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
        if self.inline:
            try:
                next_ = self.session.handle_request()
            except Exception as error:  # noqa: BLE001 - handed to the policy, never lost
                self._handle_request_failed(error)
            else:
                self._after_handle_request(next_)
            return NOT_DONE_YET
        # Twisted closes request.content when the client goes away, which must not happen
        # under a guest reading it in a worker: the request has no body until the call is over.
        request = self.request
        self._detached_body, request.content = request.content, None
        self._watch_client()
        self.settings.runner.run(
            self.session.handle_request, self._after_handle_request, self._handle_request_failed, self._client_there
        )
        return NOT_DONE_YET

    def _watch_client(self) -> None:
        self.request.notifyFinish().addErrback(self._connection_lost)

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
            # A guest whose instances cannot be made is logged by its pool, once per back-off step:
            # a line per refused request would flood the log while it backs off.
            self._log_refusal(refusal.what, error, debug=isinstance(error, GuestUnavailable))
            if isinstance(error, GuestUnavailable):
                # When the pool will try to create an instance again (whole seconds, at least 1).
                self.request.setHeader(b"retry-after", b"%d" % max(1, math.ceil(error.retry_after)))
            self.stage = _DONE
            self._report(refusal.outcome)
            self._fail(refusal.status)
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
                self._report(Outcome.UNAVAILABLE)
                self._fail(SERVICE_UNAVAILABLE)
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
                self._log_refusal("request body too large for buffer_request", error)
                self._run_handle_response(REQUEST_ENTITY_TOO_LARGE, is_error=True, then_status=REQUEST_ENTITY_TOO_LARGE)
                return
        prefix = b""
        if state.touched():
            apply_request_changes(request, state, self._note_dropped)
            if state.response_body:
                prefix = bytes(state.response_body)  # what the guest wrote before next: the response starts with it
                budget = self.settings.buffer_budget
                if budget is not None:
                    if not budget.reserve(len(prefix)):
                        self._budget_full("a body it wrote before next", len(prefix))
                        self._run_handle_response(SERVICE_UNAVAILABLE, is_error=True, then_status=SERVICE_UNAVAILABLE)
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
            self.sink = StreamedSink(request, prefix, self.guest.name)
        self.stage = _DOWNSTREAM
        self._hook()
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
        """A guest-built body of ``size`` bytes does not fit in the budget: 503 with Retry-After follows."""
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
        self.request.setHeader(b"retry-after", b"1")

    def _send_guest_response(self, release: Any = None) -> None:
        request, state = self.request, self.state
        if state.status < 200:
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
        self._host_connection = request.responseHeaders.getRawHeaders(b"connection")
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
            if _IEncodingResource.providedBy(resource):
                encoder = resource.getEncoder(request)
                if encoder is not None:
                    request._encoder = encoder
            request.render(resource)
        except BaseException:  # noqa: BLE001 - as Request.process: any failure is the request's 500
            request.processingFailed(Failure())
        if self.inline and self.stage is _DOWNSTREAM and self.hooked:
            # The downstream answers later: from now on the client may go away under it.
            self._watch_client()
            if getattr(request, "_disconnected", False):
                self._connection_lost(Failure(ConnectionError("the client went away")))

    def _hook(self) -> None:
        """Send the downstream's writes to the sink, and watch its ending.

        What was there before is kept and forwarded to: the request's own methods,
        or the hooks of an outer guest's filter when guests are chained.
        """
        request: Any = self.request
        sink: Any = self.sink
        # Instance attributes are read and set one by one, never through request.__dict__: reading that
        # makes CPython move the request's attributes into a dict, and every later attribute access of
        # Twisted's on the request miss its fast path.
        outer = getattr(request, _HOOKED_BY, None)
        if outer is not None:  # an outer guest's hooks
            saved = {name: hook for name in _HOOKED if (hook := _own_hook(request, name)) is not None}
            saved[_HOOKED_BY] = outer
            self._saved_hooks = saved
        setattr(request, _HOOKED_BY, self)
        self.hooked = True
        sink.forward = request.write
        request.write = sink.write
        request.finish = self._downstream_finish
        request.processingFailed = self._downstream_failed
        if sink.buffered:
            request.registerProducer = sink.register_producer
            request.unregisterProducer = sink.unregister_producer

    def _unhook(self) -> None:
        if not self.hooked:
            return  # never touch hooks that are not ours (an outer guest's, when chained)
        self.hooked = False
        request = self.request
        saved = self._saved_hooks
        if saved is None:  # exactly what _hook set
            sink = self.sink
            for name in _ALL_HOOKS if sink is not None and sink.buffered else _STREAMED_HOOKS:
                delattr(request, name)
            return
        for name in _ALL_HOOKS:
            if name in saved:
                setattr(request, name, saved[name])
            else:
                _drop_attribute(request, name)

    def _swallow_late_calls(self) -> None:
        """The client left and the guest's part is over: the downstream's late calls go nowhere.

        A downstream that does not watch ``notifyFinish`` may still write and
        finish, which Twisted would answer with RuntimeError, so the request keeps
        hooks - but plain functions, not this filter's or its sink's methods: those
        would make a reference cycle (request -> hook -> filter -> request) that
        keeps the request and its buffered body alive until the cycle collector runs.
        """
        if not self.hooked:
            return
        self.hooked = False
        request = self.request
        for name in _HOOKED:
            setattr(request, name, _ignore)
        _drop_attribute(request, _HOOKED_BY)
        sink = self.sink
        if sink is not None:
            sink.forward = None
            if isinstance(sink, BufferedSink):
                sink.close()  # the body nobody will read

    def _buffer_overflow(self) -> None:
        _log.error(
            "guest {guest}: buffered response for {uri} exceeds {limit} bytes; answering 502",
            guest=self.guest.name,
            uri=printable(self.request.uri),
            limit=self.guest.max_buffer_bytes,
        )
        self._run_handle_response(BAD_GATEWAY, is_error=True, then_status=BAD_GATEWAY)

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
        self.request.setHeader(b"retry-after", b"1")
        self._run_handle_response(SERVICE_UNAVAILABLE, is_error=True, then_status=SERVICE_UNAVAILABLE)

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
        self._call_handle_response()

    def _downstream_failed(self, reason: Failure) -> Failure:
        if self.stage is not _DOWNSTREAM or self.client_gone:
            return reason
        self.downstream_failure = reason
        self._run_handle_response(INTERNAL_SERVER_ERROR, is_error=True)
        return reason

    # -- 3. handle_response --------------------------------------------------------------

    def _run_handle_response(self, status: int, *, is_error: bool, then_status: int | None = None) -> None:
        """End the downstream's part with ``status`` (an error: the guest sees no response) and run handle_response."""
        sink = self.sink
        if isinstance(sink, BufferedSink):
            sink.close()  # an error ends the body: the guest sees none
        elif sink is not None:
            sink.open = False
            sink.stop_producer()
        self.stage = _GUEST_RESPONSE
        self.then_status = then_status
        state = self.state
        state.enter_response_phase(status, () if is_error else None)
        state.is_error = is_error
        self._call_handle_response()

    def _call_handle_response(self) -> None:
        if self.inline:
            try:
                self.session.handle_response()
            except Exception as error:  # noqa: BLE001 - handed to the policy, never lost
                self._handle_response_failed(error)
            else:
                self._after_handle_response(None)
            return
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
            self._swallow_late_calls()
            return True
        self._unhook()
        if self.then_status is not None:
            self._report(outcome_of_status(self.then_status))
            self._fail(self.then_status)
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
        started = self._response_started()
        status = getattr(failure.value, "http_status", None)
        if not started and isinstance(status, int) and 400 <= status <= 599:
            if not reported:
                self._report(outcome_of_status(status))
            # An expected failure (the proxy's dead backend): a warning, not a traceback.
            _log.warn(
                "downstream of guest {guest} failed for {method} {uri}: {reason}; answering {status}",
                guest=self.guest.name,
                method=printable(request.method),
                uri=printable(request.uri),
                reason=failure.getErrorMessage(),
                status=status,
            )
            self._fail(status)
            return
        if not reported:
            self._report(Outcome.PASSED)
        if not started:
            request.processingFailed(failure)
            return
        # An error page glued to a partial body would pass for a whole response.
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
        if status < 200:  # an interim status cannot end a response: keep the downstream's
            self._note_dropped(b":status", f"set the interim status {status} on the response")
            code = self._downstream_code
            status = code if code >= 200 else INTERNAL_SERVER_ERROR
        pairs = headers.items() if headers is not None else self.state.read_response_headers()
        send_buffered(self.request, status, pairs, body, self._connection())

    # -- endings ----------------------------------------------------------------------------

    def _connection(self) -> Any:
        """Twisted's own Connection header, as it was before the downstream ran."""
        connection = self._host_connection
        if connection is _NOT_READ:  # the downstream has not run: the request's own is Twisted's
            connection = self.request.responseHeaders.getRawHeaders(b"connection")
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

    def _fail(self, status: int) -> None:
        request = self.request
        if self.client_gone or request.finished:
            return
        self._unhook()
        send_error(request, status, self._connection())
        if self.sink is not None and self.sink.buffered and not self.sink.open and self.then_status is not None:
            # A downstream that was cut off (502: its response was too large; 503: the buffers of the
            # process were full) may still write and finish: those calls go nowhere.
            request.write = request.finish = request.unregisterProducer = _ignore  # type: ignore[method-assign]

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

    def _log_refusal(self, what: str, error: BaseException, *, debug: bool = False) -> None:
        (_log.debug if debug else _log.warn)(
            "guest {guest}: {what} for {uri}: {error}",
            guest=self.guest.name,
            what=what,
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
