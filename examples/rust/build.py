"""Build the Rust example guests into ``.wasm`` with ``rustc`` alone (no cargo, no crates).

As a module::

    from build import build
    build(Path("router.rs"), Path("/tmp/router.wasm"))

As a command::

    python3 build.py router.rs -o /tmp/router.wasm

The guest is built for ``wasm32-unknown-unknown`` as a ``cdylib``: its
``#[no_mangle] pub extern "C"`` functions and its memory are the exports, and its
``#[link(wasm_import_module = "http_handler")]`` functions the imports.

Needs ``rustc`` with the standard library for wasm32 (Debian: ``apt-get install
rustc libstd-rust-dev-wasm32``).  ``RUSTC`` chooses the compiler; otherwise
Debian's ``/usr/bin/rustc`` is used when present, then the first ``rustc`` on
``PATH`` (a rustup one needs ``rustup target add wasm32-unknown-unknown``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["EXAMPLES", "TARGET", "BuildError", "build", "find_rustc"]

HERE = Path(__file__).resolve().parent
TARGET = "wasm32-unknown-unknown"
PACKAGES = "rustc libstd-rust-dev-wasm32"
#: The examples in this directory.
EXAMPLES = ("router.rs",)
FLAGS = ("--edition", "2021", "--crate-type", "cdylib", "-C", "opt-level=s", "-C", "panic=abort", "-C", "strip=symbols")


class BuildError(Exception):
    """A guest cannot be built here; the message says what is missing."""


def find_rustc() -> str:
    """A rustc that can build for wasm32-unknown-unknown; BuildError naming the packages if there is none."""
    candidates = [os.environ["RUSTC"]] if os.environ.get("RUSTC") else ["/usr/bin/rustc", "rustc"]
    for candidate in candidates:
        rustc = shutil.which(candidate)
        if rustc is None:
            continue
        try:
            libdir = subprocess.run(
                [rustc, "--print", "target-libdir", "--target", TARGET],
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if any(Path(libdir).glob("libstd-*.rlib")):
            return rustc
        raise BuildError(f"{rustc} has no standard library for {TARGET} (Debian: apt-get install {PACKAGES})")
    raise BuildError(f"rustc not found (Debian: apt-get install {PACKAGES}; or set RUSTC)")


def build(source: Path, output: Path) -> Path:
    """Compile ``source`` to ``output`` (a ``.wasm``); returns ``output``."""
    rustc = find_rustc()
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [rustc, "--target", TARGET, *FLAGS, "-o", str(output), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        build(args.source, args.output)
    except BuildError as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
