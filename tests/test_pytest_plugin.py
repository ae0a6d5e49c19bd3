"""The pytest plugin: registered by the package's entry point, inert until a test uses its fixtures.

Each test runs pytest in a fresh process on a guest author's test file, as a
guest author would.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from .support import EXAMPLES, ROOT

#: The issue's example, word for word, and the rest of what a guest author would write.
AUTHOR_TESTS = """
import base64


def test_rejects_without_key(httpwasm_client):
    client = httpwasm_client("auth.wat", config=b"alice:secret")
    assert client.get("/").status == 401


def test_lets_the_right_key_in(httpwasm_client):
    client = httpwasm_client("auth.wat", config=b"alice:secret", execution="thread")
    key = base64.b64encode(b"alice:secret").decode()
    exchange = client.get("/", headers={"Authorization": "Basic " + key})
    assert exchange.status == 200
    assert exchange.downstream.headers["authorization"] == "Basic " + key


def test_guest_is_loaded_once(httpwasm_guest, httpwasm_client):
    guest = httpwasm_guest("auth.wat", config=b"bob:pw")
    assert guest is httpwasm_guest("auth.wat", config=b"bob:pw")
    assert httpwasm_client(guest).get("/").status == 401
"""


def doc_blocks(*needles: str) -> str:
    """The python blocks of docs/testing.md that contain one of ``needles``, as one test file."""
    text = (ROOT / "docs" / "testing.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```python\n")[1:]]
    return "\n\n".join(block for block in blocks if any(needle in block for needle in needles))


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
    )


class PluginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="httpwasm-plugin-"))
        self.addCleanup(shutil.rmtree, self.directory, ignore_errors=True)

    def test_a_guest_authors_tests(self) -> None:
        """The fixtures work from a test file of its own; a relative guest path is found next to it."""
        tests = self.directory / "tests"
        tests.mkdir()
        shutil.copy(EXAMPLES / "auth.wat", tests / "auth.wat")
        (tests / "test_auth.py").write_text(AUTHOR_TESTS)
        result = run_pytest(self.directory, "tests")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("3 passed", result.stdout)

    def test_the_docs_examples(self) -> None:
        """docs/testing.md's WAT and C examples run as written (from the repository root, where examples/ is)."""
        (self.directory / "test_docs.py").write_text(
            doc_blocks("def test_teapot", "def router_wasm", "def test_api_prefix")
        )
        result = run_pytest(ROOT, str(self.directory / "test_docs.py"), "-rs", "--rootdir", str(self.directory))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("3 passed", result.stdout)

    def test_inert_unless_used(self) -> None:
        """Loading the plugin imports nothing of twisted_httpwasm, and a test without its fixtures runs as ever."""
        probe = "import sys, pytest_httpwasm; print(sorted(m for m in sys.modules if m.startswith('twisted_httpwasm')))"
        output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
        self.assertEqual(output.stdout.strip(), "[]")
        (self.directory / "test_plain.py").write_text(
            "import sys\n\ndef test_plain():\n    assert 'twisted_httpwasm' not in sys.modules\n"
        )
        result = run_pytest(self.directory)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("httpwasm", run_pytest(self.directory, "--fixtures").stdout)
