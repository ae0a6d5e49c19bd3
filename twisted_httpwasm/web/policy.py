"""What a failure means for the response, and what the observer is told.

The request path asks here, and only here, what to do when something goes
wrong: a guest call that traps or times out (fail-closed or fail-open, in which
phase, with how much of the response already sent), a refusal before the guest
runs (no instance: 503; a body over the limit: 413), a buffered response over
its limit (502) or over the process's buffers (503), a guest answering with an
interim status, a downstream that fails (its own status, Twisted's 500, or a
cut if its response had started).  Each answer names the :class:`~..runtime.observe.Outcome`
the request ends with, so that metrics and traces say what the client got.
"""

from __future__ import annotations

import enum
import math
from typing import ClassVar, NamedTuple

from twisted.web.http import BAD_GATEWAY, INTERNAL_SERVER_ERROR, REQUEST_ENTITY_TOO_LARGE, SERVICE_UNAVAILABLE

from ..runtime.guest import GuestTrap
from ..runtime.observe import Outcome
from ..runtime.pool import GuestUnavailable
from ..runtime.state import BodyTooLarge

__all__ = [
    "BUFFERS_FULL",
    "BUFFER_OVER_LIMIT",
    "DownstreamRemedy",
    "FailurePolicy",
    "Refusal",
    "Remedy",
    "after_downstream_failure",
    "after_guest_failure",
    "buffered_status",
    "guest_answer_refused",
    "outcome_of_status",
    "refusal_of",
]


class FailurePolicy(str, enum.Enum):
    """What a failing guest means for its request (``on_guest_error``, ``--on-guest-error``).

    A ``str`` enum: the option's own strings (``"fail-open"``) are accepted and compare equal.
    """

    FAIL_CLOSED = "fail-closed"  # answer 500 (or cut a response already started), nothing passes
    FAIL_OPEN = "fail-open"  # go on without the guest, log the failure

    #: Every policy's name, for option parsing and messages.
    ALL: ClassVar[tuple[str, ...]]

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


FailurePolicy.ALL = tuple(policy.value for policy in FailurePolicy)


class Remedy(enum.Enum):
    """What the host does for the client after a guest call failed."""

    ANSWER_500 = "answer 500"
    CUT = "cut the response"  # part of it is on the wire: an incomplete response is the only honest signal
    PASS_UNTOUCHED = "pass the untouched request on"  # fail-open, handle_request
    SEND_AS_IS = "send the downstream's response as it is"  # fail-open, handle_response


#: (policy, phase, response started) -> remedy.  Phase: "handle_request" or "handle_response".
_REMEDIES: dict[tuple[FailurePolicy, str, bool], Remedy] = {
    (FailurePolicy.FAIL_CLOSED, "handle_request", False): Remedy.ANSWER_500,
    (FailurePolicy.FAIL_OPEN, "handle_request", False): Remedy.PASS_UNTOUCHED,
    (FailurePolicy.FAIL_CLOSED, "handle_response", False): Remedy.ANSWER_500,
    (FailurePolicy.FAIL_CLOSED, "handle_response", True): Remedy.CUT,
    (FailurePolicy.FAIL_OPEN, "handle_response", False): Remedy.SEND_AS_IS,
    (FailurePolicy.FAIL_OPEN, "handle_response", True): Remedy.SEND_AS_IS,
}


class Decision(NamedTuple):
    remedy: Remedy
    outcome: str


def after_guest_failure(policy: FailurePolicy, phase: str, error: BaseException, *, started: bool) -> Decision:
    """What to do after ``error`` in guest call ``phase``, ``started``: part of the response was sent.

    Fail-open goes on as if the guest were not there; fail-closed answers 500,
    or cuts a response that is already on the wire.
    """
    remedy = _REMEDIES[policy, phase, started and phase == "handle_response"]
    if remedy in (Remedy.PASS_UNTOUCHED, Remedy.SEND_AS_IS):
        return Decision(remedy, Outcome.FAIL_OPEN)
    timed_out = isinstance(error, GuestTrap) and error.timed_out
    return Decision(remedy, Outcome.TIMED_OUT if timed_out else Outcome.TRAPPED)


class Refusal(NamedTuple):
    """A request the host refuses for a limit (not a guest failure), whatever the policy."""

    status: int
    what: str  # for the log line
    outcome: str
    retry_after: int | None = None  # seconds, for a Retry-After header
    quiet: bool = False  # logged at debug level: something else logs the cause (once per back-off step)


#: A request body over the buffer limit, with ``buffer_request``.
BODY_TOO_LARGE = Refusal(REQUEST_ENTITY_TOO_LARGE, "request body too large for buffer_request", Outcome.TOO_LARGE)
#: A buffered response over the guest's buffer limit: the downstream's response cannot be handed to the guest.
BUFFER_OVER_LIMIT = Refusal(BAD_GATEWAY, "buffered response over the limit", Outcome.BAD_GATEWAY)
#: The buffered responses of the process hold the whole ``--max-buffered-total``.
BUFFERS_FULL = Refusal(SERVICE_UNAVAILABLE, "buffers of the process full", Outcome.UNAVAILABLE, retry_after=1)


def refusal_of(error: BaseException) -> Refusal | None:
    """The refusal ``error`` from ``handle_request`` stands for (a limit, not a guest failure), if any."""
    if isinstance(error, BodyTooLarge):
        return BODY_TOO_LARGE
    if isinstance(error, GuestUnavailable):
        # A guest whose instances cannot be made is logged by its pool, once per back-off step: a line
        # per refused request would flood the log.  Retry when the pool will try again (whole seconds).
        return Refusal(
            SERVICE_UNAVAILABLE,
            "no guest instance available",
            Outcome.UNAVAILABLE,
            retry_after=max(1, math.ceil(error.retry_after)),
            quiet=True,
        )
    return None


def guest_answer_refused(status: int) -> bool:
    """Whether a guest's own answer (it did not call next) with ``status`` is refused, and 500 sent instead.

    An interim status (1xx) cannot be a whole answer: the client would read the
    next response as its end.
    """
    return status < 200


def buffered_status(guest_status: int, downstream_status: int) -> int:
    """The status a buffered response is sent with: the guest's, unless it is an interim one.

    An interim status cannot end a response: the downstream's is kept (500 if
    that was interim too).
    """
    if guest_status >= 200:
        return guest_status
    return downstream_status if downstream_status >= 200 else INTERNAL_SERVER_ERROR


class DownstreamRemedy(enum.Enum):
    """What the host does for the client after the downstream failed (and ``handle_response`` ran)."""

    ANSWER_STATUS = "answer the failure's own status"  # the proxy's BadGateway: 502, a short body
    TWISTED_ERROR = "Twisted's usual error response"
    CUT = "cut the response"  # part of it is on the wire: an error page glued to it would pass for a whole one


class DownstreamDecision(NamedTuple):
    remedy: DownstreamRemedy
    status: int | None
    outcome: str


def after_downstream_failure(error: BaseException | None, *, started: bool) -> DownstreamDecision:
    """What to do after the downstream failed with ``error``; ``started``: part of its response was sent.

    A failure whose exception names an ``http_status`` (4xx, 5xx) is answered
    with that status if nothing was sent yet.
    """
    status = getattr(error, "http_status", None)
    if not started and isinstance(status, int) and 400 <= status <= 599:
        return DownstreamDecision(DownstreamRemedy.ANSWER_STATUS, status, outcome_of_status(status))
    if not started:
        return DownstreamDecision(DownstreamRemedy.TWISTED_ERROR, None, Outcome.PASSED)
    return DownstreamDecision(DownstreamRemedy.CUT, None, Outcome.PASSED)


def outcome_of_status(status: int) -> str:
    """The outcome of a request the host answers with ``status`` after ``handle_response(is_error=1)``."""
    if status == REQUEST_ENTITY_TOO_LARGE:
        return Outcome.TOO_LARGE
    if status == BAD_GATEWAY:
        return Outcome.BAD_GATEWAY
    if status == SERVICE_UNAVAILABLE:
        return Outcome.UNAVAILABLE
    return Outcome.PASSED
