"""A guest's WASI stdout and stderr, captured for the log.

wasmtime writes WASI output from its own threads; a Python callback there
(``WasiConfig.stdout_custom``) can run while the interpreter shuts down, which
aborts the process, and the callback table keeps every guest alive.  Instead,
each instance writes to an unlinked temporary file that nobody else can see;
the thread that called the guest reads what is new after each call and logs
it, line by line.  An instance that writes more than :data:`MAX_OUTPUT` bytes
is retired, so a chatty guest cannot fill the disk.
"""

from __future__ import annotations

import os
import tempfile
import weakref

import wasmtime

__all__ = ["MAX_OUTPUT", "CapturedOutput"]

#: Bytes one instance may write to stdout or stderr in its lifetime.
MAX_OUTPUT = 1024 * 1024
_MAX_LINE = 4096


class CapturedOutput:
    """One output stream of one instance, in an unlinked temporary file."""

    def __init__(self, stream: str):
        self.stream = stream
        fd, self._path = tempfile.mkstemp(prefix=f"httpwasm-{stream}-")
        self._fd = fd
        self._offset = 0
        self._pending = b""
        weakref.finalize(self, os.close, fd)

    def attach(self, wasi: wasmtime.WasiConfig) -> None:
        """Point ``wasi``'s stream at this file (wasmtime opens it now), then unlink it."""
        try:
            if self.stream == "stdout":
                wasi.stdout_file = self._path
            else:
                wasi.stderr_file = self._path
        finally:
            os.unlink(self._path)

    @property
    def exhausted(self) -> bool:
        return self._offset >= MAX_OUTPUT

    def lines(self, final: bool = False) -> list[str]:
        """Complete lines written since the last call (a very long line is cut).

        ``final``: the instance is done; a last line without its newline is included.
        """
        size = os.fstat(self._fd).st_size
        if size <= self._offset and not (final and self._pending):
            return []
        end = min(size, MAX_OUTPUT)
        data = self._pending + os.pread(self._fd, max(end - self._offset, 0), self._offset)
        self._offset = max(end, self._offset)
        *lines, self._pending = data.split(b"\n")
        if len(self._pending) > _MAX_LINE or self.exhausted or (final and self._pending):
            lines.append(self._pending)
            self._pending = b""
        return [line.decode("utf-8", "replace") for line in lines]
