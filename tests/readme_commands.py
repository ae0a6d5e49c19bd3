"""README.md's two commands, read from README.md itself: the main job and the test command.

One place that knows where they are, for the tests and for ``.ci/readme-paths``
and ``.ci/run`` (which run them verbatim)::

    python3 tests/readme_commands.py main     # prints the main job's command
    python3 tests/readme_commands.py tests    # prints the test command

Standard library only: CI runs it before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def commands(text: str | None = None) -> dict[str, str]:
    """``{"main": ..., "tests": ...}``: the fenced ``sh`` blocks that run ``twistd -n httpwasm`` and pytest."""
    if text is None:
        text = README.read_text(encoding="utf-8")
    blocks = [block.strip() for block in re.findall(r"```sh\n(.*?)\n```", text, re.S)]
    main = [block for block in blocks if "twistd -n httpwasm" in block]
    tests = [block for block in blocks if "pytest" in block]
    if not main or not tests:
        raise ValueError("README.md has no ```sh block with the main job (twistd -n httpwasm) and the tests (pytest)")
    return {"main": main[0], "tests": tests[0]}


def install_step(command: str) -> str:
    """What ``command`` runs before its first ``&&``: the install step."""
    return command.split(" && ", 1)[0]


def run_step(command: str) -> str:
    """What ``command`` runs after its install step."""
    return command.split(" && ", 1)[1]


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    step = sys.argv[2] if len(sys.argv) > 2 else "all"
    if which not in ("main", "tests") or step not in ("all", "install", "run"):
        sys.exit("usage: readme_commands.py main|tests [all|install|run]")
    found = commands()[which]
    print({"all": found, "install": install_step(found), "run": run_step(found)}[step])
