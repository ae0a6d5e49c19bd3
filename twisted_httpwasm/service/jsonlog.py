"""``--log-format json``: the log as JSON lines, one object per event, for log shippers.

Each line has ``time`` (ISO 8601, UTC), ``level``, ``namespace`` and ``text``
(the message as the text log shows it), plus these fields when the event has
them: ``request_id``, ``guest``, ``phase``, ``outcome``, ``status``,
``method``, ``uri``, ``duration_ms``, ``log_failure`` (the traceback).

With ``--log-format json`` every request through a guest also logs one event
per guest (:class:`~twisted_httpwasm.web.access_log.RequestLog`) with those
fields, and each request gets a ``request_id``.  The observer can also be
named directly: ``twistd --logger twisted_httpwasm.service.jsonlog.observer
httpwasm ...`` (stdout).
"""

from __future__ import annotations

import json
import re
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, LogLevel, eventAsText
from twisted.python import logfile
from zope.interface import implementer

__all__ = ["FIELDS", "JSONLinesObserver", "configure", "observer", "observer_for", "twistd_observer"]

#: The event keys copied into each JSON line when present.
FIELDS = ("request_id", "guest", "phase", "outcome", "status", "method", "uri", "duration_ms")


#: What json.dumps(ensure_ascii=False) leaves raw and a line reader may split on: DEL, C1 controls
#: (U+0085 among them), U+2028, U+2029.  They occur only inside JSON strings, where \\uXXXX is the same text.
_ONE_LINE = re.compile("[\x7f-\x9f\u2028\u2029]")


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        from ..web.access_log import printable

        return printable(value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each log event to ``stream`` as one JSON object on one line."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def __call__(self, event: LogEvent) -> None:
        if "escaped_text" in event and "text" in event:
            # A guest's line: JSON escapes its text itself, so the line carries it as the guest wrote it.
            event = dict(event, escaped_text=event["text"])
        level = event.get("log_level", LogLevel.info)
        when = event.get("log_time")
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
            if isinstance(when, int | float)
            else None,
            "level": getattr(level, "name", str(level)),
            "namespace": event.get("log_namespace", "-"),
            "text": eventAsText(event, includeTimestamp=False, includeSystem=False, includeTraceback=False),
        }
        for key in FIELDS:
            if key in event:
                record[key] = _plain(event[key])
        failure = event.get("log_failure")
        if failure is not None:
            try:
                record["log_failure"] = failure.getTraceback()
            except Exception:  # noqa: BLE001 - a failure that cannot format itself still gets its line logged
                record["log_failure"] = repr(failure)
        try:
            self.stream.write(_ONE_LINE.sub(_json_escape, json.dumps(record, ensure_ascii=False)) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass


def observer_for(path: str | None, nodaemon: bool = True) -> JSONLinesObserver:
    """JSON lines to ``path`` (a rotating file, as twistd's own log), or stdout (``-``, or none when not a daemon)."""
    if path == "-" or (not path and nodaemon):
        return JSONLinesObserver(sys.stdout)
    target: Any = logfile.LogFile.fromFullPath(path or "twistd.log")  # type: ignore[no-untyped-call]
    return JSONLinesObserver(target)


def observer() -> JSONLinesObserver:
    """For ``twistd --logger twisted_httpwasm.service.jsonlog.observer``: JSON lines on stdout."""
    return JSONLinesObserver(sys.stdout)


_twistd_target: tuple[str | None, bool] = (None, True)


def configure(path: str | None, nodaemon: bool) -> None:
    """Where :func:`twistd_observer` writes: twistd's ``--logfile`` and ``--nodaemon``."""
    global _twistd_target
    _twistd_target = (path, nodaemon)


def twistd_observer() -> JSONLinesObserver:
    """What ``--log-format json`` makes twistd log with: JSON lines where twistd would write its log."""
    return observer_for(*_twistd_target)
