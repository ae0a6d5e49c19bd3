"""What a failure means for the response, and what the observer is told.

The request path asks here, and only here, what to do when something goes
wrong: a guest call that traps or times out (fail-closed or fail-open, in which
phase, with how much of the response already sent), a refusal before the guest
runs (no instance: 503; a body over the limit: 413), a buffered response over
its limit (502).  Each answer names the :class:`~..runtime.observe.Outcome`
the request ends with, so that metrics and traces say what the client got.
"""

from __future__ import annotations

import enum
from typing import ClassVar, NamedTuple

from twisted.web.http import BAD_GATEWAY, REQUEST_ENTITY_TOO_LARGE, SERVICE_UNAVAILABLE

from ..runtime.guest import GuestTrap
from ..runtime.observe import Outcome
from ..runtime.pool import GuestUnavailable
from ..runtime.state import BodyTooLarge

__all__ = ["FailurePolicy", "Refusal", "Remedy", "after_guest_failure", "outcome_of_status", "refusal_of"]


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
    """A request the host refuses before the guest runs, whatever the policy."""

    status: int
    what: str  # for the log line
    outcome: str


def refusal_of(error: BaseException) -> Refusal | None:
    """The refusal ``error`` from ``handle_request`` stands for (a limit, not a guest failure), if any."""
    if isinstance(error, BodyTooLarge):
        return Refusal(REQUEST_ENTITY_TOO_LARGE, "request body too large for buffer_request", Outcome.TOO_LARGE)
    if isinstance(error, GuestUnavailable):
        return Refusal(SERVICE_UNAVAILABLE, "no guest instance available", Outcome.UNAVAILABLE)
    return None


def outcome_of_status(status: int) -> str:
    """The outcome of a request the host answers with ``status`` after ``handle_response(is_error=1)``."""
    if status == REQUEST_ENTITY_TOO_LARGE:
        return Outcome.TOO_LARGE
    if status == BAD_GATEWAY:
        return Outcome.BAD_GATEWAY
    if status == SERVICE_UNAVAILABLE:
        return Outcome.UNAVAILABLE
    return Outcome.PASSED
