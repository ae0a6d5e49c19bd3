"""The one toolchain probe of the C-guest tests: each missing piece skips, naming its Debian package.

The toolchain is simulated in a temporary directory (a stand-in ``clang`` that
answers the probe's questions, a ``wasm-ld``, a sysroot with ``libc.a`` and
compiler-rt's builtins) and found through ``PATH`` and ``WASI_SYSROOT``; each
test takes one piece away.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from .support import TempFilesMixin, c_build_module, c_guest_binary, c_toolchain

FAKE_CLANG = """#!/bin/sh
for arg in "$@"; do
  case "$arg" in
    -dumpversion) echo 16.0.6; exit 0 ;;
    -print-prog-name=*) echo "${{arg#-print-prog-name=}}"; exit 0 ;;
    -print-libgcc-file-name) echo "{builtins}"; exit 0 ;;
  esac
done
exit 1
"""


class ToolchainProbeTests(TempFilesMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        self.bin = self.root / "bin"
        self.bin.mkdir(parents=True)
        self.builtins = self.root / "rt" / "libclang_rt.builtins-wasm32.a"
        self.builtins.parent.mkdir()
        self.builtins.write_bytes(b"")
        self.sysroot = self.root / "sysroot"
        (self.sysroot / "lib" / "wasm32-wasi").mkdir(parents=True)
        (self.sysroot / "lib" / "wasm32-wasi" / "libc.a").write_bytes(b"")
        self.executable(self.bin / "clang", FAKE_CLANG.format(builtins=self.builtins))
        self.executable(self.bin / "wasm-ld", "#!/bin/sh\nexit 0\n")
        self.environ(PATH=str(self.bin), WASI_SYSROOT=str(self.sysroot), CLANG=None)
        self.build = c_build_module()

    @staticmethod
    def executable(path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def environ(self, **variables: str | None) -> None:
        for name, value in variables.items():
            self.addCleanup(self.restore, name, os.environ.get(name))
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    @staticmethod
    def restore(name: str, value: str | None) -> None:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value

    def skip_reason(self, *, wasi: bool = True) -> str:
        error = self.assertRaises(SkipTest, c_toolchain, "this test", wasi=wasi)
        return str(error)

    def test_complete_toolchain(self) -> None:
        """Everything present: no skip, nothing to install."""
        c_toolchain("this test", wasi=True)
        self.assertEqual(self.build.probe(wasi=True), str(self.bin / "clang"))
        self.assertEqual(self.build.missing_packages(), [])

    def test_no_clang(self) -> None:
        (self.bin / "clang").unlink()
        self.assertIn("this test needs clang (Debian: apt-get install clang)", self.skip_reason())
        self.assertEqual(self.build.missing_packages(), ["clang", "lld", "libclang-rt-dev-wasm32"])

    def test_clang_variable_names_no_executable(self) -> None:
        self.environ(CLANG="no-such-clang")
        self.assertIn("needs clang (Debian: apt-get install clang)", self.skip_reason(wasi=False))

    def test_no_wasm_ld(self) -> None:
        (self.bin / "wasm-ld").unlink()
        self.assertIn("this test needs lld (Debian: apt-get install lld)", self.skip_reason(wasi=False))
        self.assertEqual(self.build.missing_packages(), ["lld"])

    def test_no_wasi_sysroot(self) -> None:
        self.environ(WASI_SYSROOT=str(self.root / "nowhere"))
        self.assertIn("this test needs wasi-libc (Debian: apt-get install wasi-libc)", self.skip_reason())
        c_toolchain("a guest without WASI", wasi=False)  # needs neither the sysroot nor the builtins
        self.assertEqual(self.build.missing_packages(), ["wasi-libc", "libclang-rt-dev-wasm32"])

    def test_no_builtins(self) -> None:
        """The case that failed test_isolation with BuildError: compiler-rt's wasm32 builtins missing."""
        self.builtins.unlink()
        reason = self.skip_reason()
        self.assertIn("needs libclang-rt-dev-wasm32 (Debian: apt-get install libclang-rt-dev-wasm32)", reason)
        self.assertEqual(self.build.missing_packages(), ["libclang-rt-dev-wasm32"])

    def test_c_guest_binary_skips_rather_than_fails(self) -> None:
        """c_guest_binary (what test_isolation and test_examples use) skips for a missing piece."""
        self.builtins.unlink()
        source = self.root / "guest.c"
        source.write_text("int x;\n")
        error = self.assertRaises(SkipTest, c_guest_binary, source, wasi=True)
        self.assertIn("guest.c is a C guest and needs libclang-rt-dev-wasm32", str(error))


class ReadmeNamesThePackagesTests(SynchronousTestCase):
    def test_readme_names_every_package_the_probe_may_ask_for(self) -> None:
        """README's install line for the C-guest tests names each Debian package the probe can find missing."""
        readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
        packages = " ".join(c_build_module().DEBIAN_PACKAGES.values())
        self.assertIn(f"apt-get install {packages}", readme)
