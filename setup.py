"""Build the optional compiled accelerator: the guest-call path (``twisted_httpwasm.runtime._accel``) and
the twisted.web side's fast path (``twisted_httpwasm.web._fast``).

Everything else is in ``setup.cfg``.  The extensions are optional, as aiohttp's and PyYAML's are:
without a C compiler or Python's headers the build prints one line and the package installs
without it (the pure-Python path serves; ``TWISTED_HTTPWASM_PURE=1`` forces that path anyway).
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build the extension if a compiler is there; otherwise say so in one line and go on."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as error:  # noqa: BLE001 - any build failure leaves the pure path
            self._skipped(error)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as error:  # noqa: BLE001 - CompileError, LinkError, a missing compiler
            self._skipped(error)

    _said = False

    def _skipped(self, error: BaseException) -> None:
        if OptionalBuildExt._said:  # one line for the accelerator, whichever of its two extensions failed first
            return
        OptionalBuildExt._said = True
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"twisted-httpwasm: compiled accelerator not built ({reason}); the pure-Python path will serve")


extensions = []
if not os.environ.get("TWISTED_HTTPWASM_PURE") and sys.platform != "win32":
    extensions.append(
        Extension(
            "twisted_httpwasm.runtime._accel",
            ["twisted_httpwasm/runtime/_accel.c"],
            extra_compile_args=["-std=c11", "-O2"],
            libraries=["dl"],
            optional=True,
        )
    )
    extensions.append(
        Extension(
            "twisted_httpwasm.web._fast",
            ["twisted_httpwasm/web/_fast.c"],
            extra_compile_args=["-std=c11", "-O2"],
            optional=True,
        )
    )

setup(ext_modules=extensions, cmdclass={"build_ext": OptionalBuildExt})
