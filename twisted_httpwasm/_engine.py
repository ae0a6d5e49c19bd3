"""The shared wasmtime engine and the clock that enforces guest time limits.

One engine serves every guest of the process, so compiled code and the epoch
clock are shared.  The clock is a plain daemon thread, not a reactor
``LoopingCall``: an inline guest blocks the reactor, and its time limit must
still fire.
"""

from __future__ import annotations

import math
import threading

import wasmtime

from . import _native

__all__ = ["ENGINE_SETTINGS", "EPOCH_INTERVAL", "deadline_ticks", "shared_engine"]

#: Seconds between two epoch ticks: the resolution of guest time limits.
EPOCH_INTERVAL = 0.01

#: Everything about the engine that changes compiled code (part of the compile cache key).
ENGINE_SETTINGS = "epoch_interruption=1;max_wasm_stack=524288"

_lock = threading.Lock()
_engine: wasmtime.Engine | None = None


def _make_engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.epoch_interruption = True
    # Keep wasm stack overflow well inside the worker threads' native stacks.
    config.max_wasm_stack = 512 * 1024
    return wasmtime.Engine(config)


def shared_engine() -> wasmtime.Engine:
    """The process-wide engine; starts its epoch clock on first use."""
    global _engine
    with _lock:
        if _engine is None:
            _engine = _make_engine()
            _EpochClock(_engine).start()
        return _engine


def deadline_ticks(timeout: float) -> int:
    """Epoch ticks that cover ``timeout`` seconds (at least one full tick)."""
    return max(1, math.ceil(timeout / EPOCH_INTERVAL)) + 1


class _EpochClock(threading.Thread):
    def __init__(self, engine: wasmtime.Engine):
        super().__init__(name="httpwasm-epoch", daemon=True)
        self._engine = engine
        self._stopping = threading.Event()  # not _stop: that would hide Thread._stop

    def run(self) -> None:
        while not self._stopping.wait(EPOCH_INTERVAL):
            _native.increment_epoch(self._engine)
