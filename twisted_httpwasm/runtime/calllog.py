"""The log budget of one guest call.

A guest may log at most :data:`DEFAULT_LOG_MESSAGES` messages and
:data:`DEFAULT_LOG_BYTES` bytes per call (``handle_request``,
``handle_response``, or the init of an instance); what it writes to WASI
stdout and stderr counts against the same budget.  The rest is dropped before
it is copied out of the guest's memory, counted, and reported in one summary
line at the end of the call, so that a guest logging in a loop costs the host
a counter per message, not a log line.

:func:`escape_log_text` is what makes a guest's text one line of a text log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..abi import LogLevel

__all__ = ["DEFAULT_LOG_BYTES", "DEFAULT_LOG_MESSAGES", "CallLog", "LogLimit", "escape_log_text", "format_size"]

#: Messages one guest call may log.
DEFAULT_LOG_MESSAGES = 100
#: Bytes of messages one guest call may log.
DEFAULT_LOG_BYTES = 64 * 1024


#: What a line reader may take for the end of a line, or a terminal for a command: every C0 and C1
#: control (CR, LF, VT, FF, the file/group/record separators, ESC, NEL U+0085, CSI U+009B...), DEL,
#: and the Unicode line and paragraph separators (U+2028, U+2029).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def escape_log_text(text: str) -> str:
    """``text`` with each control character and line separator written as an escape.

    ``\\n``, ``\\r``, ``\\t``; ``\\xNN`` for the other C0/C1 controls and DEL;
    ``\\u2028``, ``\\u2029``: a guest's message stays one line of a text log for
    every line reader (``str.splitlines`` splits on all of them), and a terminal
    showing the log gets no escape sequence.
    """
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


@dataclass(frozen=True)
class LogLimit:
    """How much one guest call may log: messages and bytes."""

    messages: int = DEFAULT_LOG_MESSAGES
    bytes: int = DEFAULT_LOG_BYTES

    def __post_init__(self) -> None:
        if self.messages < 0 or self.bytes < 0:
            raise ValueError("a guest log limit cannot be negative")


class CallLog:
    """What one guest call logged: the lines kept, and the count of those dropped.

    Used by one thread at a time, like the instance that owns it.
    """

    __slots__ = ("bytes", "dropped", "dropped_bytes", "limit", "lines", "messages")

    def __init__(self, limit: LogLimit):
        self.limit = limit
        self.lines: list[tuple[LogLevel, str]] = []
        self.messages = 0
        self.bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0

    def room(self, length: int) -> int:
        """How many of a ``length``-byte message's bytes may be logged; -1 if it is dropped (and counted).

        A message that passes the byte budget is cut to what is left of it.
        """
        limit = self.limit
        if self.messages >= limit.messages or self.bytes >= limit.bytes:
            self.dropped += 1
            self.dropped_bytes += length
            return -1
        room = min(length, limit.bytes - self.bytes)
        self.messages += 1
        self.bytes += room
        return room

    def take(self, guest: str, where: str) -> tuple[list[tuple[LogLevel, str]], str | None]:
        """The lines kept and the summary of those dropped (None if none), and start afresh."""
        lines = self.lines
        summary = None
        if self.dropped:
            plural = "message" if self.dropped == 1 else "messages"
            summary = (
                f"guest {guest}: {self.dropped:,} log {plural} ({format_size(self.dropped_bytes)}) dropped {where}"
                f" (limit {self.limit.messages:,} messages, {format_size(self.limit.bytes)} per call)"
            )
        self.lines = []
        self.messages = self.bytes = self.dropped = self.dropped_bytes = 0
        return lines, summary


def format_size(size: int) -> str:
    """``660 MiB``, ``16 KiB``, ``12 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value >= 10 or value == int(value) else f"{value:.1f} {unit}"
    return f"{size} byte" if size == 1 else f"{size} bytes"
