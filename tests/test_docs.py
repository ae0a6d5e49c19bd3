"""The documentation stands alone and says what the code does: guests.md's ABI reference is checked
against the host's own table, its snippets run, and no document points outside the repository."""

from __future__ import annotations

import re
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from twisted_httpwasm import Guest
from twisted_httpwasm.abi import HOST_FUNCTIONS, BodyKind, Feature, HeaderKind, LogLevel

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "docs" / "guests.md"


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


class GuestReferenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = GUESTS.read_text(encoding="utf-8")

    def imports(self) -> str:
        (block,) = [block for block in fenced(self.text, "wat") if '"http_handler"' in block]
        return block

    def test_every_import_is_listed_with_the_hosts_signature(self) -> None:
        """Each host function appears once in the WAT imports, with the parameters and result of abi.py's table."""
        listed = {}
        for line in self.imports().splitlines():
            match = re.fullmatch(r'\(import "http_handler" "(\w+)" \(func \$\w+ (.*)\)\)', line.strip())
            self.assertIsNotNone(match, line)
            assert match is not None
            params = re.findall(r"\(param \$\w+ (i32|i64)\)", match.group(2))
            result = re.findall(r"\(result (i32|i64)\)", match.group(2))
            listed[match.group(1)] = (tuple(params), result[0] if result else None)
        expected = {spec.name: (("i32",) * spec.params, spec.result) for spec in HOST_FUNCTIONS}
        self.assertEqual(listed, expected)

    def test_the_imports_load_in_this_host(self) -> None:
        """A guest made of the documented imports and exports loads: the host links every import as written."""
        source = (
            "(module\n"
            + self.imports()
            + '(memory (export "memory") 1)\n'
            + '(func (export "handle_request") (result i64) (i64.const 1))\n'
            + '(func (export "handle_response") (param $req_ctx i32) (param $is_error i32))\n'
            + ")"
        )
        Guest(source.encode())

    def test_every_function_is_described(self) -> None:
        """The table of what each function returns has a row per host function."""
        for spec in HOST_FUNCTIONS:
            self.assertIn(f"| `{spec.name}(", self.text)

    def test_constants(self) -> None:
        """The constants as abi.py defines them."""
        for feature in (Feature.BUFFER_REQUEST, Feature.BUFFER_RESPONSE, Feature.TRAILERS):
            self.assertIn(f"`{feature.name.lower()}` = {int(feature)}", self.text)
        self.assertIn(
            f"request = {HeaderKind.REQUEST:d}, response = {HeaderKind.RESPONSE:d}, "
            f"request trailers = {HeaderKind.REQUEST_TRAILERS:d}, response trailers = {HeaderKind.RESPONSE_TRAILERS:d}",
            self.text,
        )
        self.assertIn(f"request = {BodyKind.REQUEST:d}, response = {BodyKind.RESPONSE:d}", self.text)
        self.assertIn(", ".join(f"{level.name.lower()} = {int(level)}" for level in LogLevel), self.text)

    def test_rust_needs_no_crate(self) -> None:
        """The Rust section names the import attribute and the build command."""
        self.assertIn('#[link(wasm_import_module = "http_handler")]', self.text)
        self.assertIn("--target wasm32-unknown-unknown --crate-type cdylib", self.text)


class SelfContainedTests(SynchronousTestCase):
    def test_no_document_points_outside_the_repository(self) -> None:
        """No README or doc names ABI.md, STYLE.md or a path above the repository."""
        documents = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        found = [
            f"{path.relative_to(ROOT)}: {word}"
            for path in documents
            for word in ("ABI.md", "STYLE.md", "../shared", "](../")
            if word in path.read_text(encoding="utf-8")
        ]
        self.assertEqual(found, [])

    def test_relative_links_resolve(self) -> None:
        """Every relative link of docs/*.md names a file of the repository."""
        missing = []
        for path in sorted((ROOT / "docs").glob("*.md")):
            for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
                if not (path.parent / target).exists():
                    missing.append(f"{path.name} -> {target}")
        self.assertEqual(missing, [])


class Page(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"page"


class TestingSnippetTests(TestCase):
    @inlineCallbacks
    def test_the_stubtreq_snippet_runs(self) -> Generator[Any, Any, None]:
        """guests.md's StubTreq snippet, as written (from the repository root), tests a GuestResource in memory."""
        text = GUESTS.read_text(encoding="utf-8")
        (snippet,) = [block for block in fenced(text, "python") if "StubTreq" in block]
        snippet = "\n".join(line.removeprefix("  ") for line in snippet.splitlines())
        import os

        previous = os.getcwd()
        os.chdir(ROOT)
        self.addCleanup(os.chdir, previous)
        namespace: dict[str, Any] = {"my_resource": Page()}
        exec(snippet, namespace)
        response = yield namespace["response"]
        self.assertEqual(response.headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        body = namespace["stub"].content(response)
        namespace["stub"].flush()
        self.assertEqual((yield body), b"page")


class RustSnippetTests(TestCase):
    def test_the_rust_guest_builds_and_serves(self) -> None:
        """guests.md's Rust guest, built with its own command, sets its header (skips without a wasm32 Rust)."""
        import importlib.util
        import shutil
        import subprocess
        import tempfile

        from treq.testing import StubTreq

        from twisted_httpwasm import Execution, GuestResource

        spec = importlib.util.spec_from_file_location("httpwasm_rust_build", ROOT / "examples" / "rust" / "build.py")
        assert spec is not None and spec.loader is not None
        rust_build = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(rust_build)
        try:
            rustc = rust_build.find_rustc()  # one with the wasm32 standard library
        except rust_build.BuildError as error:
            raise SkipTest(f"the Rust guest of guests.md: {error}") from None
        text = GUESTS.read_text(encoding="utf-8")
        (source,) = fenced(text, "rust")
        (command,) = [
            line
            for block in fenced(text, "sh")
            for line in block.splitlines()
            if line.startswith("rustc ") and "guest.rs" in line
        ]
        directory = Path(tempfile.mkdtemp(prefix="httpwasm-rust-"))
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        (directory / "guest.rs").write_text(source)
        subprocess.run([rustc, *command.split()[1:]], cwd=directory, check=True, capture_output=True)
        guest = Guest(directory / "guest.wasm", execution=Execution.INLINE)
        stub = StubTreq(GuestResource(guest, Page()))
        responses: list[Any] = []
        stub.get("http://example.com/").addCallback(responses.append)
        stub.flush()
        (response,) = responses
        self.assertEqual(response.headers.getRawHeaders("x-frame-options"), ["DENY"])
