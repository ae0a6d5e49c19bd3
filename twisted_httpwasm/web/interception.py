"""The downstream's calls on its request, taken over while a guest waits for the response.

While the downstream renders, what it writes goes to the request's sink
(:mod:`.sinks`) and its ending (``finish``, ``processingFailed``) goes to the
filter, which runs ``handle_response`` then.  An :class:`Interception` is that
takeover as one object, chosen with the sink (a buffering sink also drives the
downstream's producer), installed on the request as a unit and removed as a
unit - the way twisted.web's gzip encoder sits on a request for its response.

Guests are chained by nesting resources, so an inner guest's interception is
installed over an outer one's: it keeps what it replaced and puts it back on
removal, and the request's context (:mod:`.request_context`) names the
innermost one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .request_context import CONTEXT_ATTRIBUTE, context_of
from .sinks import BufferedSink, StreamedSink

__all__ = ["METHODS", "STREAMED_METHODS", "Interception", "PureInterception"]

#: The request methods an interception may replace.
METHODS = ("write", "finish", "processingFailed", "registerProducer", "unregisterProducer")
#: What it replaces with a streaming sink (the producer goes to the transport as usual), and with a buffering one.
STREAMED_METHODS = ("write", "finish", "processingFailed")


def _ignore(*args: object) -> None:
    """Stands in for the request methods of a downstream that was cut off."""


def _own_hook(request: Any, name: str) -> Any:
    """What is set on ``request`` for ``name`` (None when it is the request's own method)."""
    value = getattr(request, name)
    return None if getattr(value, "__self__", None) is request else value


def _drop_attribute(request: Any, name: str) -> None:
    try:
        delattr(request, name)
    except AttributeError:
        pass


class Interception:
    """The downstream's ``write`` (to ``sink``), ``finish`` and ``processingFailed`` (to the filter) on ``request``.

    Instance attributes are read and set one by one, never through
    ``request.__dict__`` (see :mod:`.request_context`).
    """

    # Its storage is a subclass's: :class:`PureInterception` here, or the compiled fast path's (web/fast.py).
    if not TYPE_CHECKING:
        __slots__ = ()

    context: Any
    installed: bool
    outer: Interception | None
    request: Any
    saved: dict[str, Any] | None
    sink: StreamedSink | BufferedSink

    def __init__(
        self,
        request: Any,
        sink: StreamedSink | BufferedSink,
        finish: Callable[[], None],
        failed: Callable[[Any], Any],
    ):
        """Installed at once: writes go to ``sink``, the downstream's ending to ``finish``/``failed``."""
        self.request = request
        self.sink = sink
        # Made by GuestSite before any guest ran, as a rule: read without a call.
        self.context = context = getattr(request, CONTEXT_ATTRIBUTE, None) or context_of(request)
        outer = self.outer = context.interception
        # An outer guest's interception is kept, and put back on removal.
        self.saved = (
            None
            if outer is None
            else {name: hook for name in METHODS if (hook := _own_hook(request, name)) is not None}
        )
        context.interception = self
        self.installed = True
        sink.forward = request.write
        request.write = sink.write
        request.finish = finish
        request.processingFailed = failed
        if sink.buffered:
            buffering: Any = sink
            request.registerProducer = buffering.register_producer
            request.unregisterProducer = buffering.unregister_producer

    def remove(self) -> None:
        """Give the request back what it had: its own methods, or the outer guest's interception."""
        if not self.installed:
            return  # never touch what is not ours (an outer guest's, when chained)
        self.installed = False
        request = self.request
        self.context.interception = self.outer
        saved = self.saved
        if saved is None:  # exactly what install set
            for name in METHODS if self.sink.buffered else STREAMED_METHODS:
                delattr(request, name)
            return
        for name in METHODS:
            if name in saved:
                setattr(request, name, saved[name])
            else:
                _drop_attribute(request, name)

    def cut_off(self) -> None:
        """The client left and the guest's part is over: the downstream's late calls go nowhere.

        A downstream that does not watch ``notifyFinish`` may still write and
        finish, which Twisted would answer with RuntimeError, so the request keeps
        replacements - plain functions, not the filter's or the sink's methods:
        those would make a reference cycle (request -> method -> filter ->
        request) that keeps the request and its buffered body alive until the
        cycle collector runs.
        """
        if not self.installed:
            return
        self.installed = False
        request = self.request
        for name in METHODS:
            setattr(request, name, _ignore)
        self.context.interception = None
        sink: Any = self.sink
        sink.forward = None
        if isinstance(sink, BufferedSink):
            sink.close()  # the body nobody will read

    def ignore_late_calls(self) -> None:
        """After a refusal cut the downstream off (its response too large, the buffers full): its calls go nowhere."""
        request = self.request
        request.write = request.finish = request.unregisterProducer = _ignore


class PureInterception(Interception):
    """An :class:`Interception` with its storage in slots: the pure-Python path's."""

    __slots__ = ("context", "installed", "outer", "request", "saved", "sink")
