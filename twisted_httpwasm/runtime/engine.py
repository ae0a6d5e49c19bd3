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

**The serving clock needs no Python.**  Where the C library has POSIX timers
(Linux), the clock that runs from the first guest call on is a kernel timer
whose every expiration runs ``wasmtime_engine_increment_epoch`` in a C thread
(``SIGEV_THREAD``): it never waits for the GIL, so a guest call may keep the
GIL (an inline call does, see ``native.NativeFunc.call``: releasing
and retaking it around each call cost more than the call) and still hit its
time limit, and the reactor never gives the GIL up to a ticking thread.
Elsewhere, and while loading (a thread the C library keeps for its timers
would be counted as one outliving the load), the clock is a Python thread.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import wasmtime

from . import native as _native

__all__ = [
    "ENGINE_SETTINGS",
    "EPOCH_INTERVAL",
    "calls_may_hold_gil",
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

#: True while the serving clock ticks without the GIL (:class:`_TimerClock`): a guest call may keep the GIL.
calls_may_hold_gil = False

_lock = threading.Lock()
_engine: wasmtime.Engine | None = None
_clock: _EpochClock | None = None
_timer: _TimerClock | None = None
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
    """Run the clock from now on, in this process: called before the first guest call (and after a fork).

    A POSIX timer where there is one (no Python thread, no GIL), the clock thread otherwise.
    """
    global serving, calls_may_hold_gil, _timer
    with _lock:
        if _timer is None and _TimerClock.available():
            try:
                _timer = _TimerClock(_engine_locked())
            except OSError:
                _timer = None
        if _timer is not None:
            idle = _clock
            _stop_clock()  # the loading clock, if an instance is being made right now: the timer takes over
            calls_may_hold_gil = True
            _native.rearm_window = EPOCH_INTERVAL  # the timer never ticks in bursts (see NativeFunc.call)
        else:
            idle = None
            _start_clock()
        serving = True
    if idle is not None:
        idle.join()


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
    """Start the clock thread unless it, or the timer, runs (the caller holds ``_lock``)."""
    global _clock
    if _clock is None and _timer is None:
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
    global _lock, _clock, _timer, serving, calls_may_hold_gil, _instances_being_made
    _lock = threading.Lock()  # a parent's thread may have held it at the fork
    _clock = None
    _timer = None  # POSIX timers are not inherited
    serving = calls_may_hold_gil = False
    _native.rearm_window = 0.0
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


# -- the serving clock without Python: a POSIX timer ---------------------------------------

_CLOCK_MONOTONIC = 1
_SIGEV_THREAD = 2


class _SigEvent(ctypes.Structure):
    """``struct sigevent`` of 64-bit Linux, as ``SIGEV_THREAD`` uses it (64 bytes)."""

    _fields_ = [
        ("sigev_value", ctypes.c_void_p),  # union sigval: passed by value to the function, like a pointer
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("sigev_notify_function", ctypes.c_void_p),
        ("sigev_notify_attributes", ctypes.c_void_p),
        ("_pad", ctypes.c_int * 8),
    ]


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


class _TimerClock:
    """Epoch ticks from a kernel timer: each expiration calls ``wasmtime_engine_increment_epoch(engine)``
    in a thread of the C library, which runs no Python and never needs the GIL.

    ``void increment_epoch(const wasm_engine_t *)`` is called as a ``SIGEV_THREAD``
    notify function, ``void (*)(union sigval)``: on 64-bit Linux a pointer-sized
    union is passed exactly as the pointer is.  The engine is kept alive for good
    (a tick may still be on its way when the process ends).  Not inherited by a
    forked child, which starts its own on its first guest call.
    """

    _libc: ctypes.CDLL | None = None

    @classmethod
    def available(cls) -> bool:
        if (
            not sys.platform.startswith("linux")
            or sys.maxsize <= 2**32
            or os.environ.get("TWISTED_HTTPWASM_PYTHON_CLOCK")
        ):
            return False
        if cls._libc is None:
            libc = ctypes.CDLL(None, use_errno=True)
            if not hasattr(libc, "timer_create"):
                return False
            libc.timer_create.argtypes = [ctypes.c_int, ctypes.POINTER(_SigEvent), ctypes.POINTER(ctypes.c_void_p)]
            libc.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_ITimerSpec), ctypes.c_void_p]
            libc.timer_delete.argtypes = [ctypes.c_void_p]
            cls._libc = libc
        return True

    def __init__(self, engine: wasmtime.Engine):
        libc = self._libc
        assert libc is not None
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(engine))  # never freed: see the class docstring
        event = _SigEvent()
        event.sigev_value = ctypes.cast(engine.ptr(), ctypes.c_void_p).value
        event.sigev_notify = _SIGEV_THREAD
        event.sigev_notify_function = _native.increment_epoch_address()
        self._timer = ctypes.c_void_p()
        if libc.timer_create(_CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(self._timer)) != 0:
            raise OSError(ctypes.get_errno(), "timer_create failed")
        nanoseconds = round(EPOCH_INTERVAL * 1e9)
        interval = _TimeSpec(nanoseconds // 1_000_000_000, nanoseconds % 1_000_000_000)
        if libc.timer_settime(self._timer, 0, ctypes.byref(_ITimerSpec(interval, interval)), None) != 0:
            errno = ctypes.get_errno()
            libc.timer_delete(self._timer)
            raise OSError(errno, "timer_settime failed")
