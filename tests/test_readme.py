"""The README's embedding snippet, run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.web.resource import Resource

from .support import ServerTestCase

ROOT = Path(__file__).resolve().parent.parent


class MyResource(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"from my_resource"


def readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Embedding in a Twisted application") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "README has no python block under 'Embedding'"
    return match.group(1)


class ReadmeEmbeddingTests(ServerTestCase):
    @inlineCallbacks
    def test_the_readme_snippet_puts_the_guest_in_front_of_a_resource(self):
        """Executed as written (from the repo root), the snippet serves the router guest before my_resource."""
        snippet = readme_snippet()
        self.assertLessEqual(len([line for line in snippet.splitlines() if line.strip()]), 4)
        previous = os.getcwd()
        os.chdir(ROOT)
        self.addCleanup(os.chdir, previous)
        namespace: dict[str, object] = {"my_resource": MyResource()}
        exec(snippet, namespace)
        url = self.listen(namespace["site"])  # type: ignore[arg-type]
        status, _, body = yield self.fetch("GET", url + "/host")
        self.assertEqual((status, body), (200, b"hello from the guest\n"))
        status, _, body = yield self.fetch("GET", url + "/other")
        self.assertEqual((status, body), (200, b"from my_resource"))
