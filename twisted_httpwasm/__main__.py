"""``python -m twisted_httpwasm``: tools around the host.

``check GUEST [--config BYTES | --config-file F] [--json]`` says whether a guest
can run here, and why not (see :mod:`twisted_httpwasm.testing.check`).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = "usage: python -m twisted_httpwasm check GUEST [--config BYTES | --config-file F] [--json]\n"


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    if argv[0] != "check":
        sys.stderr.write(f"unknown command {argv[0]!r}\n{USAGE}")
        return 2
    from .testing.check import main as check

    return check(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
