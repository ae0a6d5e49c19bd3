"""A guest that floods its log: how long its request takes and how much log it writes.

Run from the repository root (loopback only; stops by itself)::

    python -m bench.log_flood --execution thread
    python -m bench.log_flood --execution inline

Starts a real ``twistd -n --logfile FILE httpwasm`` (``--guest-timeout 1``, default
``--log-level info``) with a guest that calls ``log`` with 16 KiB messages in a loop
until its time limit ends the call, sends one request, and prints the request's
duration, the bytes of log written (the log file and its rotations) and the
server's RSS before and after.  Figures go to docs/reliability.md; nothing here is
asserted by the tests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.launch import HOST, free_port, start_twistd, stop, wait_listening

FLOOD_GUEST = """\
(module
  (import "http_handler" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (func (export "handle_request") (result i64)
    (loop $again
      (call $log (i32.const 0) (i32.const 4096) (i32.const 16384))
      (br $again))
    (i64.const 1))
  (func (export "handle_response") (param i32 i32)))
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execution", choices=("thread", "inline"), default="thread")
    parser.add_argument("--timeout", default="1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="httpwasm-log-flood-") as tmp:
        directory = Path(tmp)
        guest = directory / "flood.wat"
        guest.write_text(FLOOD_GUEST)
        (directory / "www").mkdir()
        logfile = directory / "twistd.log"
        port = free_port()
        command = [
            "-n",
            "--pidfile=",
            f"--logfile={logfile}",
            "httpwasm",
            "--guest",
            str(guest),
            "--execution",
            args.execution,
            "--guest-timeout",
            args.timeout,
            "--path",
            str(directory / "www"),
            "--listen",
            f"tcp:{port}:interface={HOST}",
        ]
        proc = start_twistd(command)
        try:
            wait_listening(proc, port, 60)
            before = rss_kib(proc.pid)
            start = time.monotonic()
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/", timeout=120) as response:
                    status = response.status
            except urllib.error.HTTPError as error:
                status = error.code
            duration = time.monotonic() - start
            after = rss_kib(proc.pid)
        finally:
            stop(proc, 30)
        log_bytes = sum(path.stat().st_size for path in directory.glob("twistd.log*"))
        files = len(list(directory.glob("twistd.log*")))
        dropped = [line for line in logfile.read_text(errors="replace").splitlines() if "dropped" in line]
    print(f"execution {args.execution}, guest timeout {args.timeout} s: status {status}, {duration:.2f} s")
    print(f"log: {log_bytes / 2**10:.1f} KiB in {files} file(s); RSS {before / 1024:.0f} -> {after / 1024:.0f} MiB")
    for line in dropped:
        print(line[:300])


if __name__ == "__main__":
    main()
