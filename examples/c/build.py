"""Build the C example guests (or any single-file guest) into ``.wasm`` with clang.

As a module::

    from build import build
    build(Path("auth.c"), Path("/tmp/auth.wasm"))
    build(Path("request_id_wasi.c"), Path("/tmp/rid.wasm"), wasi=True)

As a command::

    python3 build.py auth.c -o /tmp/auth.wasm
    python3 build.py --wasi request_id_wasi.c -o /tmp/request_id_wasi.wasm
    python3 build.py --all /tmp/guests        # every example in this directory

Without ``wasi`` the guest is built for bare ``wasm32`` with no libc (it may use
only ``http_handler.h`` and the compiler's freestanding headers). With ``wasi`` it
is built against wasi-libc as a WASI reactor: it exports ``_initialize``, which
the host runs once per instance.

Needs clang with the WebAssembly target and ``wasm-ld`` (Debian: ``clang lld``);
with ``wasi`` also a wasi-libc sysroot (Debian: ``wasi-libc``, found under
``/usr``; wasi-sdk: ``share/wasi-sysroot``; or set ``WASI_SYSROOT``) and the
compiler-rt builtins for wasm32 (Debian: ``libclang-rt-dev-wasm32``). Set
``CLANG`` to choose the compiler.

:func:`probe` checks all of it at once, raising :class:`MissingTool` (which
names the Debian package to install) for the first piece missing; the tests
skip the C guests with its message. ``python3 build.py --missing-packages``
prints the Debian packages still to install, one a line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "DEBIAN_PACKAGES",
    "EXAMPLES",
    "BuildError",
    "MissingTool",
    "build",
    "build_all",
    "find_clang",
    "find_wasi_sysroot",
    "missing_packages",
    "probe",
]

HERE = Path(__file__).resolve().parent

#: The examples in this directory, and whether each is built with wasi-libc.
EXAMPLES: dict[str, bool] = {
    "auth.c": False,
    "router.c": False,
    "request_id_wasi.c": True,
}

#: Where a wasi-libc sysroot is looked for when ``WASI_SYSROOT`` is unset. A
#: sysroot is one with ``lib/wasm32-wasi/libc.a`` in it. Debian's wasi-libc
#: package installs under ``/usr`` (``/usr/lib/wasm32-wasi``).
SYSROOT_CANDIDATES: tuple[Path, ...] = (
    Path("/usr/share/wasi-sysroot"),
    Path("/opt/wasi-sdk/share/wasi-sysroot"),
    Path("/usr"),
)

NOLIBC_FLAGS: tuple[str, ...] = (
    "--target=wasm32",
    "-O2",
    "-Wall",
    "-Wextra",
    "-nostdlib",
    "-ffreestanding",
    "-mbulk-memory",
    # No main/_start: the host calls the exported functions. The exports are
    # the functions marked export_name (HH_EXPORT...), plus memory (default).
    "-Wl,--no-entry",
)

WASI_FLAGS: tuple[str, ...] = (
    "--target=wasm32-wasi",
    "-mexec-model=reactor",
    "-O2",
    "-Wall",
    "-Wextra",
)


class BuildError(RuntimeError):
    """A tool is missing, or the compiler failed."""


#: What each piece of the toolchain is called, and the Debian package that provides it.
DEBIAN_PACKAGES: dict[str, str] = {
    "clang": "clang",
    "wasm-ld": "lld",
    "wasi-sysroot": "wasi-libc",
    "builtins": "libclang-rt-dev-wasm32",
}


class MissingTool(BuildError):
    """A piece of the toolchain is not installed; ``package`` is the Debian package that provides it."""

    def __init__(self, piece: str, message: str):
        super().__init__(message)
        self.piece = piece
        self.package = DEBIAN_PACKAGES[piece]


def find_clang() -> str:
    """The clang to use: ``$CLANG``, else ``clang``, else the newest ``clang-NN``."""
    chosen = os.environ.get("CLANG")
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise MissingTool("clang", f"CLANG={chosen!r} is not an executable (Debian: apt-get install clang)")
        return found
    found = shutil.which("clang")
    if found is not None:
        return found
    versioned: list[tuple[int, str]] = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        try:
            names = os.listdir(directory or ".")
        except OSError:
            continue
        for name in names:
            match = re.fullmatch(r"clang-(\d+)", name)
            if match is not None:
                path = os.path.join(directory or ".", name)
                if os.access(path, os.X_OK):
                    versioned.append((int(match.group(1)), path))
    if not versioned:
        raise MissingTool(
            "clang",
            "clang not found: install clang with the WebAssembly target "
            "(Debian: apt-get install clang lld) or set CLANG",
        )
    return max(versioned)[1]


def _clang_prints(clang: str, *args: str) -> str:
    """What ``clang <args>`` prints (one of its -print-* queries)."""
    result = subprocess.run([clang, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"{clang} {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def check_wasm_ld(clang: str) -> str:
    """The linker clang will run for wasm32; raises if it is missing."""
    # clang answers with a full path when it finds the program, else the bare
    # name. Debian's clang-NN runs wasm-ld-NN when there is no plain wasm-ld.
    major = _clang_prints(clang, "-dumpversion").split(".")[0]
    for name in ("wasm-ld", f"wasm-ld-{major}"):
        linker = _clang_prints(clang, "--target=wasm32", f"-print-prog-name={name}")
        found = shutil.which(linker)
        if found is not None:
            return found
    raise MissingTool(
        "wasm-ld",
        f"wasm-ld (the WebAssembly linker clang runs) not found for {clang}: install lld (Debian: apt-get install lld)",
    )


def find_wasi_sysroot() -> Path:
    """A wasi-libc sysroot: ``$WASI_SYSROOT`` or the first of SYSROOT_CANDIDATES."""
    chosen = os.environ.get("WASI_SYSROOT")
    candidates = (Path(chosen),) if chosen else SYSROOT_CANDIDATES
    for root in candidates:
        if (root / "lib" / "wasm32-wasi" / "libc.a").is_file():
            return root
    looked = ", ".join(str(root / "lib" / "wasm32-wasi" / "libc.a") for root in candidates)
    raise MissingTool(
        "wasi-sysroot",
        f"wasi-libc sysroot not found (looked for {looked}): install wasi-libc "
        "(Debian: apt-get install wasi-libc) or wasi-sdk, or set WASI_SYSROOT",
    )


def check_wasm_builtins(clang: str, sysroot: Path) -> Path:
    """compiler-rt's builtins for wasm32, which clang links into WASI guests."""
    builtins = Path(
        _clang_prints(
            clang,
            "--target=wasm32-wasi",
            f"--sysroot={sysroot}",
            "-print-libgcc-file-name",
        )
    )
    if not builtins.is_file():
        raise MissingTool(
            "builtins",
            f"compiler-rt builtins for wasm32 not found ({builtins}): install them "
            "(Debian: apt-get install libclang-rt-dev-wasm32)",
        )
    return builtins


def probe(wasi: bool = False) -> str:
    """Check the whole toolchain a build needs (with ``wasi``: also wasi-libc and the builtins); the clang.

    Raises :class:`MissingTool` for the first piece that is missing, naming its Debian package.
    """
    clang = find_clang()
    check_wasm_ld(clang)
    if wasi:
        check_wasm_builtins(clang, find_wasi_sysroot())
    return clang


def missing_packages() -> list[str]:
    """The Debian packages to install for every example to build (empty when nothing is missing)."""
    missing: list[str] = []
    try:
        clang = find_clang()
    except MissingTool:
        # Without clang neither the linker nor the builtins can be asked for: all of them but a sysroot found.
        missing = ["clang", "lld", "libclang-rt-dev-wasm32"]
        try:
            find_wasi_sysroot()
        except MissingTool:
            missing.insert(2, "wasi-libc")
        return missing
    for check in (lambda: check_wasm_ld(clang), find_wasi_sysroot):
        try:
            check()
        except MissingTool as error:
            missing.append(error.package)
    if "wasi-libc" not in missing:
        try:
            check_wasm_builtins(clang, find_wasi_sysroot())
        except MissingTool as error:
            missing.append(error.package)
    else:
        missing.append("libclang-rt-dev-wasm32")  # cannot be checked without a sysroot
    return missing


def build(source: Path, output: Path, wasi: bool = False) -> Path:
    """Compile and link the C file ``source`` into the guest ``output``; returns ``output``.

    ``wasi=False``: bare wasm32, no libc. ``wasi=True``: a WASI reactor with wasi-libc.
    """
    source = Path(source)
    output = Path(output)
    if not source.is_file():
        raise BuildError(f"no such source file: {source}")
    clang = probe(wasi)
    if wasi:
        flags = [*WASI_FLAGS, f"--sysroot={find_wasi_sysroot()}"]
    else:
        flags = list(NOLIBC_FLAGS)
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [clang, *flags, f"-I{HERE}", "-o", str(output), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(
            f"building {source} failed (exit {result.returncode}):\n$ {' '.join(command)}\n{result.stderr.strip()}"
        )
    if result.stderr.strip():
        # Warnings: show them, the build still succeeded.
        print(result.stderr.rstrip(), file=sys.stderr)
    return output


def build_all(directory: Path) -> list[Path]:
    """Build every example of EXAMPLES into ``directory``; returns the outputs."""
    return [
        build(
            HERE / name,
            Path(directory) / Path(name).with_suffix(".wasm").name,
            wasi=wasi,
        )
        for name, wasi in EXAMPLES.items()
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build a C http-wasm guest (or all the examples) with clang.")
    parser.add_argument("source", nargs="?", type=Path, help="the C file to build")
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        help="the .wasm to write (default: SOURCE with .wasm)",
    )
    parser.add_argument("--wasi", action="store_true", help="build against wasi-libc as a WASI reactor")
    parser.add_argument("--all", metavar="DIR", type=Path, help="build every example here into DIR")
    parser.add_argument(
        "--missing-packages", action="store_true", help="print the Debian packages still to install, one a line"
    )
    args = parser.parse_args(argv)
    if args.missing_packages:
        for package in missing_packages():
            print(package)
        return 0
    try:
        if args.all is not None:
            if args.source is not None or args.output is not None or args.wasi:
                parser.error("--all takes no SOURCE, -o or --wasi")
            for path in build_all(args.all):
                print(path)
            return 0
        if args.source is None:
            parser.error("give a SOURCE file, or --all DIR")
        output = args.output if args.output is not None else args.source.with_suffix(".wasm")
        print(build(args.source, output, wasi=args.wasi))
    except BuildError as error:
        print(f"build.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
