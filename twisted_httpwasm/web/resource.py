"""The twisted.web resource that puts a guest in front of another resource."""

from __future__ import annotations

import io
from typing import Any

from twisted.internet.interfaces import IReactorCore
from twisted.python.threadpool import ThreadPool
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

from ..runtime.budget import PROCESS_BUDGET, BufferBudget
from ..runtime.guest import Execution, Guest
from ..runtime.observe import NO_OBSERVER
from .fast import filter_type
from .guest_threads import workers_for
from .policy import FailurePolicy
from .runners import InlineRunner, Runner, ThreadRunner

__all__ = ["FailurePolicy", "GuestResource"]


@implementer(IResource)
class GuestResource(Resource):
    """Runs ``guest`` on every request before and after ``downstream``.

    The guest sees each request first; what it changes (method, URI, headers,
    body) is what ``downstream`` sees, and traversal is redone on the new path.
    Each request is a :class:`~.filter.RequestFilter`, whose guest session pins one
    instance from ``handle_request`` to ``handle_response``.
    ``on_guest_error`` is a :class:`FailurePolicy` (or its name, ``"fail-open"``).

    ``reactor`` defaults to the global reactor.  In thread mode guest calls run
    in the process's shared :class:`GuestWorkers` (dedicated threads, results
    handed back in batches), or in ``threadpool`` if you pass one (as
    ``deferToThreadPool`` would); in inline mode they run on the reactor thread.
    """

    isLeaf = True

    def __init__(
        self,
        guest: Guest,
        downstream: IResource | Resource,
        *,
        reactor: Any = None,
        threadpool: ThreadPool | None = None,
        on_guest_error: FailurePolicy | str = FailurePolicy.FAIL_CLOSED,
        buffer_budget: BufferBudget | None = PROCESS_BUDGET,
    ):
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        else:
            guest.reactor = reactor  # its log lines go to the reactor this resource runs on
        try:
            policy = FailurePolicy(on_guest_error)
        except ValueError:
            raise ValueError(
                f"on_guest_error must be one of {', '.join(FailurePolicy.ALL)}, not {on_guest_error!r}"
            ) from None
        self.guest = guest
        self.downstream = downstream
        self.reactor: IReactorCore = reactor
        #: What a failing guest means for its request (see :mod:`.policy`).
        self.policy = policy
        self.fail_open = policy is FailurePolicy.FAIL_OPEN
        #: Framing headers a guest set and the host dropped, already reported in the log.
        self.noted_framing_headers: set[bytes] = set()
        #: Bytes all buffered responses may hold together (shared by every resource of the process by default).
        self.buffer_budget = buffer_budget
        #: The request's filter: the compiled fast path's when it serves (see :mod:`.fast`), else the pure one.
        self.filter_type = filter_type()
        self.runner: Runner
        if guest.execution is Execution.INLINE:
            self.runner = InlineRunner()
        elif threadpool is not None:
            self.runner = ThreadRunner(reactor, threadpool)
        else:
            self.runner = workers_for(reactor)

    def replace_guest(self, guest: Guest) -> Guest:
        """Serve every request that starts from now on with ``guest``; returns the guest it replaced.

        Hot reload: load (and so validate and initialise) ``guest`` first, then
        swap.  Requests in flight finish on the instance they pinned at their
        start; the old guest is retired, so its instances are freed as their
        last requests end.  ``guest`` must run in the same execution mode.
        """
        old = self.guest
        if guest.execution is not old.execution:
            raise ValueError(f"replacing a {old.execution.value} guest with a {guest.execution.value} one")
        guest.reactor = old.reactor
        if guest.observer is NO_OBSERVER:
            guest.observer = old.observer  # metrics and traces go on
        self.guest = guest
        old.retire()
        return old

    def render(self, request: Request) -> Any:
        if not hasattr(request, "content"):
            _complete_dummy_request(request)
        return self.filter_type(self, request).start()

    def __repr__(self) -> str:
        return f"<GuestResource {self.guest!r} in front of {self.downstream!r}>"


def _complete_dummy_request(request: Any) -> None:
    """Give twisted.web's ``DummyRequest`` (of unit tests) what a real Request has and the filter reads.

    It has no body at all (an empty one, then), no ``startedWriting`` (false
    until its first write), the URI ``http://dummy/`` unless the test set one
    (the path it was made with, then, as a client would send it) and no ``path``.
    """
    request.content = io.BytesIO()
    if not (getattr(request, "uri", None) or b"").startswith(b"/"):
        request.uri = b"/" + b"/".join(getattr(request, "postpath", None) or [])
    if not hasattr(request, "path"):
        request.path = request.uri.partition(b"?")[0]
    if not hasattr(request, "startedWriting"):
        request.startedWriting = 0
        write = request.write

        def started_writing(data: bytes) -> Any:
            request.startedWriting = 1
            return write(data)

        request.write = started_writing
    if not hasattr(request, "code"):
        request.code = 200  # DummyRequest keeps responseCode (None until set)
        set_code = request.setResponseCode

        def set_response_code(code: int, message: bytes | None = None) -> None:
            request.code = code
            set_code(code, message)

        request.setResponseCode = set_response_code
