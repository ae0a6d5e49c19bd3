"""Where guest calls run: a worker thread, or inline on the reactor thread.

Both runners take the work and two continuations, which always run on the
reactor thread.  Thread mode hands the work to a thread pool and comes back
with ``callFromThread`` (what ``deferToThreadPool`` does, without building a
Deferred per call); inline mode calls straight through.

A runner may also get a ``still_wanted`` predicate: a call that waited for a
thread may be dropped, unstarted and without continuation, if it says no by
then (the client went away while the call was queued).  The guest workers
(:mod:`._worker`) do that; inline calls start at once, and an embedder's own
``ThreadPool`` runs everything it was given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..runtime import accel as _accel

__all__ = ["InlineRunner", "Runner", "ThreadRunner"]

T = TypeVar("T")


class Runner(Protocol):
    def run(
        self,
        work: Callable[[], T],
        on_result: Callable[[T], None],
        on_error: Callable[[BaseException], None],
        still_wanted: Callable[[], bool] | None = None,
    ) -> None: ...


class InlineRunner:
    """Runs guest calls on the calling (reactor) thread.

    With the compiled accelerator, :meth:`run` is its ``run_inline``: the same
    steps in C, so that routing every inline call through the runner costs no
    Python frame (chosen when the runner is made, as guests choose their path).
    """

    def __init__(self) -> None:
        module = _accel.module
        if module is not None:
            self.run = module.run_inline  # type: ignore[method-assign]

    def run(
        self,
        work: Callable[[], T],
        on_result: Callable[[T], None],
        on_error: Callable[[BaseException], None],
        still_wanted: Callable[[], bool] | None = None,
    ) -> None:
        # Nothing waits here: the call starts now, for a client that was there a moment ago.
        try:
            result = work()
        except Exception as error:  # noqa: BLE001 - handed to the request, never lost
            on_error(error)
            return
        on_result(result)


class ThreadRunner:
    """Runs guest calls in ``threadpool``; continuations come back to the reactor."""

    def __init__(self, reactor: IReactorFromThreads, threadpool: ThreadPool):
        self._reactor = reactor
        self._threadpool = threadpool

    def run(
        self,
        work: Callable[[], T],
        on_result: Callable[[T], None],
        on_error: Callable[[BaseException], None],
        still_wanted: Callable[[], bool] | None = None,
    ) -> None:
        call_from_thread = self._reactor.callFromThread

        def done(success: bool, result: Any) -> None:
            if success:
                call_from_thread(on_result, result)
            else:
                error = result.value if isinstance(result, Failure) else result
                call_from_thread(on_error, error)

        # still_wanted is not asked: a Twisted ThreadPool runs what it was given, and
        # embedders who pass their own pool keep its exact behaviour.
        self._threadpool.callInThreadWithCallback(done, work)
