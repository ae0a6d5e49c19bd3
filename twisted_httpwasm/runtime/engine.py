"""The shared wasmtime engine and the clock that enforces guest time limits.

One engine serves every guest of the process, so compiled code and the epoch
clock are shared.  The clock is a plain daemon thread, not a reactor
``LoopingCall``: an inline guest blocks the reactor, and its time limit must
still fire.

No thread may outlive loading: ``twistd`` without ``-n`` loads the guests and
then forks to daemonize, and threads do not survive a fork.  So the clock runs
only while it has work:

- while an instance is made (:func:`clock_for_instance`), so that the wasm
  start function, ``_initialize`` and ``_start`` have a time limit too; if
  nothing serves yet, the clock stops (and its thread ends) right after;
- from the first guest call on (:func:`serve_time_limits`, behind the cheap
  check ``if not _engine.serving``), for good, in the process that serves.

A forked child forgets the parent's clock (``os.register_at_fork``), so its
first guest call starts its own.  Compilation runs on the calling thread:
wasmtime's parallel compilation keeps a pool of threads that a forked child
would wait on forever.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import wasmtime

from . import native as _native

__all__ = [
    "ENGINE_SETTINGS",
    "EPOCH_INTERVAL",
    "clock_for_instance",
    "deadline_ticks",
    "serve_time_limits",
    "serving",
    "shared_engine",
]

#: Seconds between two epoch ticks: the resolution of guest time limits.
EPOCH_INTERVAL = 0.01

#: Everything about the engine that changes compiled code (part of the compile cache key).
ENGINE_SETTINGS = "epoch_interruption=1;max_wasm_stack=524288;memory_may_move=0"

#: True once this process's clock runs for good: guest calls check it before each call.
serving = False

_lock = threading.Lock()
_engine: wasmtime.Engine | None = None
_clock: _EpochClock | None = None
_instances_being_made = 0


def _make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    # Keep wasm stack overflow well inside the worker threads' native stacks.
    config.max_wasm_stack = 512 * 1024
    # No compiler thread pool: it would not survive a fork (see the module docstring).
    config.parallel_compilation = False
    # A memory's base address stays put (growth happens in place, inside the reservation), so
    # the host keeps it instead of asking wasmtime for it on every access (runtime/native.py).
    config.memory_may_move = False
    return wasmtime.Engine(config)


def shared_engine() -> wasmtime.Engine:
    """The process-wide engine.  Starts no thread: the clock runs when guest code does."""
    with _lock:
        return _engine_locked()


def _engine_locked() -> wasmtime.Engine:
    global _engine
    if _engine is None:
        _engine = _make_engine()
    return _engine


def deadline_ticks(timeout: float) -> int:
    """Epoch ticks that cover ``timeout`` seconds (at least one full tick)."""
    return max(1, math.ceil(timeout / EPOCH_INTERVAL)) + 1


def serve_time_limits() -> None:
    """Run the clock from now on, in this process: called before the first guest call (and after a fork)."""
    global serving
    with _lock:
        _start_clock()
        serving = True


@contextmanager
def clock_for_instance() -> Iterator[None]:
    """The clock runs while the block makes an instance; its thread ends after, unless guests are served."""
    global _instances_being_made
    with _lock:
        _instances_being_made += 1
        _start_clock()
    try:
        yield
    finally:
        with _lock:
            _instances_being_made -= 1
            idle = _clock if not (serving or _instances_being_made) else None
            if idle is not None:
                _stop_clock()
        if idle is not None:
            idle.join()


def _start_clock() -> None:
    """Start the clock thread unless it runs (the caller holds ``_lock``)."""
    global _clock
    if _clock is None:
        _clock = _EpochClock(_engine_locked())
        _clock.start()


def _stop_clock() -> None:
    """Tell the clock thread to end (the caller holds ``_lock``, and joins it after releasing it)."""
    global _clock
    if _clock is not None:
        _clock.stopping.set()
        _clock = None


def _forget_clock_after_fork() -> None:
    """In a forked child: the parent's clock thread is gone; the next guest call starts this process's own."""
    global _lock, _clock, serving, _instances_being_made
    _lock = threading.Lock()  # a parent's thread may have held it at the fork
    _clock = None
    serving = False
    _instances_being_made = 0


os.register_at_fork(after_in_child=_forget_clock_after_fork)


class _EpochClock(threading.Thread):
    def __init__(self, engine: wasmtime.Engine):
        super().__init__(name="httpwasm-epoch", daemon=True)
        self._engine = engine
        self.stopping = threading.Event()

    def run(self) -> None:
        # Ticks follow the time that passed, not the wake-ups: a thread that waits for the GIL
        # (a guest busy calling host functions holds it often) wakes late and catches up.
        start = time.monotonic()
        ticked = 0
        while not self.stopping.wait(EPOCH_INTERVAL):
            due = int((time.monotonic() - start) / EPOCH_INTERVAL)
            while ticked < due:
                _native.increment_epoch(self._engine)
                ticked += 1
