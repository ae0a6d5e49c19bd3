"""Traefik wasm plugins: directories and zips with ``.traefik.yml``, and configuration as Traefik encodes it.

The plugins are written here: WAT guests compiled at test time and a C header
plugin (``tests/guests/traefik_headers.c``), packaged as directories and zips
with manifests the tests write.  The configuration a guest receives is checked
byte for byte by a guest that answers with what ``get_config`` returned; the
expected bytes are what Go's ``json.Marshal`` writes for the map yaml.v3
decodes (sorted keys, HTML-safe escapes, Go's float format).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import zipfile
from collections.abc import Generator
from pathlib import Path
from typing import Any
from unittest import mock

import wasmtime
from twisted.application.service import MultiService
from twisted.internet.defer import inlineCallbacks
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from twisted_httpwasm.service import goconfig, traefik
from twisted_httpwasm.service.tap import Options, make_site, reloading_guests

from .support import IMPORTS, NOOP_RESPONSE, ROOT, ServerTestCase, TempFilesMixin, c_guest_binary, execution_variants
from .test_reload import HangupTestCase
from .test_sources import TLSServerMixin

#: Answers every request itself: status 200, ``x-started: yes`` once ``_start`` ran (it ends with proc_exit(0),
#: as TinyGo 0.35+ plugins do), and its configuration, as get_config returned it, as the body.
ECHO_CONFIG = (
    "(module"
    + IMPORTS
    + """
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 2)
  (global $started (mut i32) (i32.const 0))
  (data (i32.const 0) "x-started")
  (data (i32.const 16) "yes")
  (func (export "_start")
    (global.set $started (i32.const 1))
    (call $proc_exit (i32.const 0)))
  (func (export "handle_request") (result i64)
    (local $len i32)
    (local.set $len (call $get_config (i32.const 1024) (i32.const 100000)))
    (if (global.get $started)
      (then (call $set_header_value (i32.const 1) (i32.const 0) (i32.const 9) (i32.const 16) (i32.const 3))))
    (call $write_body (i32.const 1) (i32.const 1024) (local.get $len))
    (i64.const 0))
"""
    + NOOP_RESPONSE
    + ")"
)

HEADERS_PLUGIN = ROOT / "tests" / "guests" / "traefik_headers.c"

#: A manifest whose testData exercises every YAML type; displayName sanitises to Demo-Plugin-test.
RICH_MANIFEST = """\
displayName: Demo Plugin (test) é
type: middleware
runtime: wasm
summary: Answers with its configuration.
testData:
  zeta: last
  Alpha: upper case sorts first
  headers:
    X-Demo: "<b>&amp;</b>"
    X-Count: 3
  list: [1, -2, 3.5, 3.0, 1e21, 0.0000001, 0x1F, 0o17, 017, 1_000, 18446744073709551615, 18446744073709551616]
  flags: {on: true, yes_word: yes, off: False, nothing: ~, empty: null, TRUE_word: TRUE}
  unicode: "h\\u00e9llo \\U0001F600 \\u2028 tab\\there \\x01"
  nested: {b: {c: [{d: 1}, []]}, a: {}}
  when: 2024-01-02
  ratio: 1:20
  quoted: "123"
  404: not found
"""

#: What Go's json.Marshal writes for RICH_MANIFEST's testData, decoded by yaml.v3.
RICH_JSON = (
    '{"404":"not found","Alpha":"upper case sorts first",'
    '"flags":{"TRUE_word":true,"empty":null,"nothing":null,"off":false,"on":true,"yes_word":"yes"},'
    '"headers":{"X-Count":3,"X-Demo":"\\u003cb\\u003e\\u0026amp;\\u003c/b\\u003e"},'
    '"list":[1,-2,3.5,3,1e+21,1e-7,31,15,15,1000,18446744073709551615,18446744073709552000],'
    '"nested":{"a":{},"b":{"c":[{"d":1},[]]}},'
    '"quoted":"123","ratio":"1:20",'
    '"unicode":"héllo 😀 \\u2028 tab\\there \\u0001",'
    '"when":"2024-01-02","zeta":"last"}'
).encode()

HEADERS_MANIFEST = """\
displayName: Header adder
type: middleware
runtime: wasm
wasmPath: bin/headers.wasm
summary: Adds the request headers of its headers map.
testData:
  other: [1, {x: y}]
  headers:
    X-Plugin: from testData
    X-Html: a<b
"""


def wat_binary(text: str) -> bytes:
    """A WAT module compiled to a binary, as a plugin's release would carry it."""
    return wasmtime.wat2wasm(text)


def manifest(runtime: str = "wasm", type_: str = "middleware", extra: str = "", test_data: str = "") -> str:
    return f"displayName: t\ntype: {type_}\nruntime: {runtime}\n{extra}" + (
        f"testData:\n{test_data}" if test_data else ""
    )


def write_plugin(directory: str | Path, manifest_text: str, files: dict[str, bytes]) -> Path:
    """A plugin directory: ``.traefik.yml`` and ``files`` (relative path -> bytes)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    (root / traefik.MANIFEST).write_text(manifest_text)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return buffer.getvalue()


def zip_plugin(manifest_text: str, files: dict[str, bytes], folder: str = "") -> bytes:
    """A release zip of a plugin, at its root or in ``folder/``."""
    prefix = f"{folder}/" if folder else ""
    return zip_bytes({prefix + traefik.MANIFEST: manifest_text.encode(), **{prefix + k: v for k, v in files.items()}})


class EchoHeaders(Resource):
    """The downstream: lists the x-* request headers it received, one ``name: value`` per line."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        lines = [
            name.lower() + b": " + value
            for name, values in sorted(request.requestHeaders.getAllRawHeaders())
            if name.lower().startswith(b"x-")
            for value in values
        ]
        return b"\n".join(lines)


# -- encoding ------------------------------------------------------------------------------------------


class EncodingTests(TempFilesMixin, SynchronousTestCase):
    """goconfig: yaml.v3's types and json.Marshal's bytes."""

    def encode_yaml(self, text: str) -> bytes:
        return goconfig.encode_mapping(goconfig.decode_yaml(text.encode(), "t.yaml"), "t.yaml")

    def test_rich_document(self) -> None:
        """Every type of the rich testData, as Go writes it."""
        document = goconfig.decode_yaml(RICH_MANIFEST.encode(), traefik.MANIFEST)
        assert isinstance(document, dict)
        self.assertEqual(goconfig.encode(document["testData"]), RICH_JSON)

    def test_floats_as_go_writes_them(self) -> None:
        """Go's shortest form, fixed between 1e-6 and 1e21, exponent outside it with e-7 (not e-07)."""
        cases = {
            "0.1": "0.1",
            "1e20": "100000000000000000000",
            "1e21": "1e+21",
            "1.5e300": "1.5e+300",
            "0.000001": "0.000001",
            "1.25e-7": "1.25e-7",
            "2.5e-10": "2.5e-10",
            "-0.0": "-0",
            "100.0": "100",
            ".5": "0.5",
            "+.5": "0.5",
            "9007199254740993": "9007199254740993",
            "-9223372036854775809": "-9223372036854776000",
        }
        for written, expected in cases.items():
            self.assertEqual(self.encode_yaml(f"v: {written}"), f'{{"v":{expected}}}'.encode(), written)

    def test_strings_stay_strings(self) -> None:
        """YAML 1.1 words, timestamps, base-60 numbers, overflowing floats and quoted numbers stay strings."""
        for written in ("yes", "no", "on", "off", "y", "2001-12-14t21:59:43.10-05:00", "1:20", "1e400", "08x", "0x"):
            self.assertEqual(self.encode_yaml(f"v: {written}"), f'{{"v":"{written}"}}'.encode(), written)
        self.assertEqual(self.encode_yaml('v: "12"'), b'{"v":"12"}')
        self.assertEqual(self.encode_yaml("v: !!str 12"), b'{"v":"12"}')
        self.assertEqual(self.encode_yaml("v: !!float 12"), b'{"v":12}')

    def test_escapes(self) -> None:
        """Control characters, quotes, backslashes and the HTML-unsafe characters, as encoding/json escapes them."""
        self.assertEqual(
            self.encode_yaml('v: "\\" \\\\ \\b \\f \\n \\r \\t \\x1f \\x7f & < > \\u2029 é"'),
            '{"v":"\\" \\\\ \\b \\f \\n \\r \\t \\u001f \x7f \\u0026 \\u003c \\u003e \\u2029 é"}'.encode(),
        )

    def test_keys_sort_by_bytes_at_every_level(self) -> None:
        """Keys in UTF-8 byte order (upper case before lower, non-ASCII last), nested maps too, lists in order."""
        self.assertEqual(
            self.encode_yaml("b: {z: 1, a: 2}\nB: [z, a]\né: 1\na: 0"),
            '{"B":["z","a"],"a":0,"b":{"a":2,"z":1},"é":1}'.encode(),
        )

    def test_merge_keys_and_anchors(self) -> None:
        """``<<`` merges (the mapping's own keys win); aliases repeat a value."""
        self.assertEqual(
            self.encode_yaml("base: &b {x: 1, y: 2}\nuse: {<<: *b, y: 3}\nagain: *b"),
            b'{"again":{"x":1,"y":2},"base":{"x":1,"y":2},"use":{"x":1,"y":3}}',
        )

    def test_refusals(self) -> None:
        """Each refusal is one line naming the file and what is wrong."""
        cases = {
            "a: 1\na: 2": "mapping key 'a' already defined",
            "a: [": "not valid YAML",
            "- 1": "must be a mapping",
            "x: .nan": "cannot be encoded as JSON",
            "x: -.inf": "cannot be encoded as JSON",
            "a: &a [*a]": "alias refers to a node that contains it",
            "? [1]\n: x": "key must be a scalar",
            "v: !!int abc": "cannot decode 'abc' as !!int",
            "v: !!binary aGk=": "!!binary is not supported",
        }
        for text, fragment in cases.items():
            with self.assertRaises(goconfig.ConfigError) as caught:
                self.encode_yaml(text)
            self.assertIn(fragment, str(caught.exception), text)
            self.assertIn("t.yaml", str(caught.exception))
            self.assertNotIn("\n", str(caught.exception))

    def test_alias_expansion_is_bounded(self) -> None:
        """A billion-laughs document is refused instead of expanded."""
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
        with self.assertRaises(goconfig.ConfigError) as caught:
            self.encode_yaml("\n".join(lines))
        self.assertIn("more than", str(caught.exception))

    def test_empty_document_is_null(self) -> None:
        """An empty document is Go's nil map: ``null``."""
        self.assertEqual(self.encode_yaml(""), b"null")

    def test_json_and_toml_files(self) -> None:
        """.json and .toml files are the same mapping, encoded the same way; any other file is passed as it is."""
        directory = Path(self.mktemp())
        directory.mkdir()
        files = {
            "c.yaml": "headers: {X-A: '1'}\nn: 3.0\nlist: [1, two]\n",
            "c.yml": "headers:\n  X-A: '1'\nlist: [1, two]\nn: 3.0\n",
            "c.json": '{"n": 3.0, "list": [1, "two"], "headers": {"X-A": "1"}}',
            "c.toml": 'n = 3.0\nlist = [1, "two"]\n[headers]\nX-A = "1"\n',
        }
        for name, text in files.items():
            (directory / name).write_text(text)
            self.assertEqual(
                goconfig.read_config_file(directory / name), b'{"headers":{"X-A":"1"},"list":[1,"two"],"n":3}', name
            )
        (directory / "c.txt").write_text("n: 3.0\n")
        self.assertEqual(goconfig.read_config_file(directory / "c.txt"), b"n: 3.0\n")

    def test_json_and_toml_refusals(self) -> None:
        """Malformed JSON/TOML, duplicate JSON keys, NaN and TOML dates are refused in one line."""
        directory = Path(self.mktemp())
        directory.mkdir()
        cases = {
            "a.json": ('{"a": 1, "a": 2}', "already defined"),
            "b.json": ('{"a": NaN}', "NaN is not JSON"),
            "c.json": ('{"a": ', "not valid JSON"),
            "d.json": ("[1]", "must be a mapping"),
            "e.toml": ("a = ", "not valid TOML"),
            "f.toml": ("a = 1979-05-27", "dates and times are not supported"),
        }
        for name, (text, fragment) in cases.items():
            (directory / name).write_text(text)
            with self.assertRaises(goconfig.ConfigError) as caught:
                goconfig.read_config_file(directory / name)
            self.assertIn(fragment, str(caught.exception), name)
            self.assertIn(name, str(caught.exception))

    def test_yaml_needs_the_extra(self) -> None:
        """Without PyYAML a YAML file is refused with the pip line; JSON still works."""
        with mock.patch.dict(sys.modules, {"yaml": None}):
            with self.assertRaises(goconfig.ConfigError) as caught:
                goconfig.decode_yaml(b"a: 1", "c.yaml")
            self.assertEqual(str(caught.exception), "c.yaml: YAML needs PyYAML: pip install 'twisted-httpwasm[yaml]'")
            self.assertEqual(goconfig.encode(goconfig.decode_json(b'{"a": 1}', "c.json")), b'{"a":1}')


# -- manifests and packaging -------------------------------------------------------------------------


class ManifestTests(TempFilesMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.module = wat_binary(ECHO_CONFIG)

    def plugin_dir(self, manifest_text: str, files: dict[str, bytes] | None = None) -> str:
        return str(write_plugin(self.mktemp(), manifest_text, {"plugin.wasm": self.module} if files is None else files))

    def refused(self, location: str, *fragments: str, **options: Any) -> str:
        with self.assertRaises(traefik.PluginError) as caught:
            traefik.load_plugin(location, **options)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertNotIn("\n", message)
        return message

    def test_directory_defaults(self) -> None:
        """wasmPath defaults to plugin.wasm; the guest is named by its sanitised displayName."""
        plugin = traefik.load_plugin(self.plugin_dir(RICH_MANIFEST))
        self.assertEqual(plugin.wasm, self.module)
        self.assertEqual(plugin.name, "Demo-Plugin-test")
        self.assertEqual(plugin.manifest.wasm_path, "plugin.wasm")
        self.assertEqual(plugin.manifest.test_config, RICH_JSON)
        self.assertEqual(traefik.load_plugin(self.plugin_dir(RICH_MANIFEST), name="mine").name, "mine")

    def test_names(self) -> None:
        """Sanitised names keep letters, digits, - and _; nothing left means the fallback."""
        self.assertEqual(traefik.sanitise_name("a.b/c d"), "a-b-c-d")
        self.assertEqual(traefik.sanitise_name("\u00e9\u00e9", "zipstem"), "zipstem")
        self.assertEqual(len(traefik.sanitise_name("x" * 200)), 64)

    def test_runtime_and_type_refusals(self) -> None:
        """Yaegi (runtime missing or yaegi), another runtime, a type other than middleware: one line each."""
        self.refused(self.plugin_dir(manifest(runtime="yaegi")), ".traefik.yml: runtime is 'yaegi'", "Yaegi")
        missing = "displayName: t\ntype: middleware\n"
        self.refused(self.plugin_dir(missing), "runtime is missing", "Yaegi")
        self.refused(self.plugin_dir(manifest(runtime="wasi-p2")), "runtime is 'wasi-p2'", "only runtime: wasm")
        self.refused(self.plugin_dir(manifest(type_="provider")), "type is 'provider'", "middleware")
        self.refused(self.plugin_dir("displayName: t\nruntime: wasm\n"), "type is missing")

    def test_malformed_manifests(self) -> None:
        """Malformed YAML, a manifest that is not a mapping, fields of the wrong type."""
        self.refused(self.plugin_dir("displayName: [unclosed\n"), ".traefik.yml: not valid YAML", "line")
        self.refused(self.plugin_dir("- a list\n"), "not a manifest")
        self.refused(self.plugin_dir(manifest(extra="displayName2: x\nwasmPath: [a]\n")), "wasmPath must be a string")
        self.refused(self.plugin_dir(manifest(test_data="  - 1\n")), "testData must be a mapping")
        self.refused(self.plugin_dir(manifest(extra="runtime: wasm\n")), "mapping key 'runtime' already defined")

    def test_wasm_path_refusals(self) -> None:
        """An absolute, escaping or missing wasmPath, or a symlink out of the plugin, is refused naming wasmPath."""
        for path in ("/etc/passwd", "../plugin.wasm", "a/../../x.wasm", "C:/x.wasm", "a\\\\b.wasm", "."):
            self.refused(self.plugin_dir(manifest(extra=f"wasmPath: '{path}'\n")), "wasmPath")
        self.refused(self.plugin_dir(manifest(extra="wasmPath: other.wasm\n")), "wasmPath 'other.wasm': no such file")
        outside = Path(self.mktemp())
        outside.write_bytes(self.module)
        root = Path(self.plugin_dir(manifest(extra="wasmPath: link.wasm\n"), {}))
        (root / "link.wasm").symlink_to(outside)
        self.refused(str(root), "wasmPath 'link.wasm' leads outside the plugin")
        (root / "sub").mkdir()
        (root / "sub" / "real.wasm").write_bytes(self.module)
        (root / "inside.wasm").symlink_to(root / "sub" / "real.wasm")
        (root / traefik.MANIFEST).write_text(manifest(extra="wasmPath: inside.wasm\n"))
        self.assertEqual(traefik.load_plugin(str(root)).wasm, self.module)  # a symlink within the plugin is fine

    def test_manifest_needs_the_yaml_extra(self) -> None:
        """Reading .traefik.yml needs PyYAML: without it, one line with the pip command."""
        directory = self.plugin_dir(RICH_MANIFEST)
        with mock.patch.dict(sys.modules, {"yaml": None}):
            self.refused(directory, ".traefik.yml: YAML needs PyYAML: pip install 'twisted-httpwasm[yaml]'")

    def test_directory_without_manifest(self) -> None:
        """A directory --guest without .traefik.yml is refused: only a plugin may be a directory."""
        directory = self.mktemp()
        os.makedirs(directory)
        self.refused(directory, "no .traefik.yml in")

    def zip_file(self, data: bytes) -> str:
        path = self.mktemp() + ".zip"
        Path(path).write_bytes(data)
        return path

    def test_zip_at_root_and_one_folder_down(self) -> None:
        """The release zip may hold the plugin at its root or in one folder; the digest is the zip's."""
        for folder in ("", "plugin-v1.2.3"):
            data = zip_plugin(HEADERS_MANIFEST, {"bin/headers.wasm": self.module}, folder)
            path = self.zip_file(data)
            plugin = traefik.load_plugin(path, sha256=hashlib.sha256(data).hexdigest())
            self.assertEqual((plugin.wasm, plugin.name), (self.module, "Header-adder"))
            self.refused(path, "the plugin's zip has sha256", "not the expected " + "0" * 64, sha256="0" * 64)

    def test_directory_digest_is_the_modules(self) -> None:
        """For a directory, --guest-sha256 is the module's digest."""
        directory = self.plugin_dir(RICH_MANIFEST)
        traefik.load_plugin(directory, sha256=hashlib.sha256(self.module).hexdigest())
        self.refused(directory, "the plugin's module has sha256", sha256="f" * 64)

    def test_zip_refusals(self) -> None:
        """Zip slip, absolute members, a symlinked module, no or two manifests, a manifest too deep, not a zip."""
        good = {traefik.MANIFEST: manifest().encode(), "plugin.wasm": self.module}
        self.refused(self.zip_file(zip_bytes({**good, "../evil": b"x"})), "'../evil' would land outside the plugin")
        self.refused(self.zip_file(zip_bytes({**good, "/etc/evil": b"x"})), "'/etc/evil' would land outside")
        self.refused(self.zip_file(zip_bytes({**good, "a/../../evil": b"x"})), "would land outside")
        linked = zip_bytes({traefik.MANIFEST: manifest().encode()}, symlinks={"plugin.wasm": "/etc/passwd"})
        self.refused(self.zip_file(linked), "wasmPath 'plugin.wasm' is a symlink in the zip")
        self.refused(self.zip_file(zip_bytes({"plugin.wasm": self.module})), "no .traefik.yml in the zip")
        deep = zip_plugin(manifest(), {"plugin.wasm": self.module}, "a/b")
        self.refused(self.zip_file(deep), "no .traefik.yml in the zip, at its root or one folder down")
        two = zip_bytes({f"{f}/{traefik.MANIFEST}": manifest().encode() for f in ("a", "b")})
        self.refused(self.zip_file(two), "several plugins")
        self.refused(self.zip_file(b"PK not really"), "not a zip archive")
        escaping = zip_plugin(manifest(extra="wasmPath: ../plugin.wasm\n"), {"plugin.wasm": self.module}, "f")
        self.refused(self.zip_file(escaping), "f/.traefik.yml: wasmPath '../plugin.wasm' must be a path inside")
        self.refused(self.zip_file(zip_plugin(manifest(), {})), "wasmPath 'plugin.wasm': no such file in the zip")
        self.refused(self.zip_file(zip_plugin(manifest(runtime="yaegi"), {})), "runtime is 'yaegi'")

    def test_zip_bounds(self) -> None:
        """Too many members, or a module larger than the bound (by its header or by what it inflates to)."""
        self.patch(traefik, "MAX_MEMBERS", 3)
        many = zip_bytes({**{f"f{i}": b"" for i in range(4)}, traefik.MANIFEST: manifest().encode()})
        self.refused(self.zip_file(many), "5 members, more than 3")
        self.patch(traefik, "MAX_MEMBERS", 100)
        self.patch(traefik, "MAX_MODULE_BYTES", 1000)
        big = zip_plugin(manifest(), {"plugin.wasm": b"\0" * 5000})
        self.refused(self.zip_file(big), "wasmPath 'plugin.wasm' is larger than 1000 bytes")
        # A header that lies about the size: inflating stops at the bound (or the zip is found corrupt).
        lying = bytearray(big)
        central = lying.rfind(b"PK\x01\x02")
        while central != -1:
            name_length = int.from_bytes(lying[central + 28 : central + 30], "little")
            if lying[central + 46 : central + 46 + name_length] == b"plugin.wasm":
                lying[central + 24 : central + 28] = (10).to_bytes(4, "little")
            central = lying.rfind(b"PK\x01\x02", 0, central)
        message = self.refused(self.zip_file(bytes(lying)), "plugin.wasm")
        self.assertTrue("larger than" in message or "cannot be read" in message, message)

    def test_guest_source_for_remote_zips(self) -> None:
        """A fetched zip (its digest already checked by the fetch) gives its module and testData."""
        data = zip_plugin(RICH_MANIFEST, {"plugin.wasm": self.module}, "demo")

        class Fetched:
            def __init__(self) -> None:
                self.data, self.name = data, "demo"

        entry = {"path": "https://plugins.example/demo.zip", "test-data": True}
        chosen = traefik.guest_source(entry, b"", "a" * 64, Fetched())
        self.assertEqual(
            (chosen.source, chosen.name, chosen.sha256, chosen.config),
            (self.module, "Demo-Plugin-test", None, RICH_JSON),
        )
        plain = traefik.guest_source({"path": "https://x.example/g.wasm"}, b"cfg", "a" * 64, Fetched())
        self.assertEqual((plain.name, plain.sha256, plain.config), ("demo", "a" * 64, b"cfg"))


#: ECHO_CONFIG, plus the WasmEdge socket functions a plugin making outgoing calls imports.
SOCKET_PLUGIN = ECHO_CONFIG.replace(
    "(memory",
    '(import "wasi_snapshot_preview1" "sock_open" (func (param i32 i32 i32) (result i32)))\n'
    '  (import "wasi_snapshot_preview1" "sock_connect" (func (param i32 i32 i32) (result i32)))\n'
    '  (import "wasi_snapshot_preview1" "sock_send" (func (param i32 i32 i32 i32 i32) (result i32)))\n'
    "  (memory",
    1,
)


class ImportTests(TempFilesMixin, SynchronousTestCase):
    def test_module_imports_are_read_without_compiling(self) -> None:
        """Every import of a binary, of every kind, in order; nothing for WAT text or garbage."""
        binary = wat_binary(
            '(module (import "a" "f" (func)) (import "a" "m" (memory 1 2)) (import "b" "g" (global (mut i32)))'
            ' (import "b" "t" (table 1 funcref)) (import "wasi_snapshot_preview1" "sock_open" (func)))'
        )
        self.assertEqual(
            traefik.module_imports(binary),
            [("a", "f"), ("a", "m"), ("b", "g"), ("b", "t"), ("wasi_snapshot_preview1", "sock_open")],
        )
        self.assertEqual(traefik.module_imports(b"(module)"), [])
        self.assertEqual(traefik.module_imports(b"\0asm\1\0\0\0\2\x05\x01\xff"), [])

    def test_socket_extension_is_named_plainly(self) -> None:
        """WasmEdge socket functions are said to be an extension this host does not provide; preview 1's own
        sock_send is provided."""
        self.assertEqual(traefik.unprovided_wasi_imports(wat_binary(SOCKET_PLUGIN)), ["sock_open", "sock_connect"])
        self.assertIn(
            "this host does not provide WasmEdge socket extensions", traefik.wasi_import_problem("sock_open") or ""
        )
        self.assertIsNone(traefik.wasi_import_problem("sock_send"))
        self.assertIsNone(traefik.wasi_import_problem("fd_write"))

    def test_socket_plugin_is_refused_at_load_in_one_line(self) -> None:
        """twistd's load of a plugin importing sock_open: refused, saying what it needs that is not here."""
        root = write_plugin(self.mktemp(), manifest(), {"plugin.wasm": wat_binary(SOCKET_PLUGIN)})
        options = Options()
        options.parseOptions(["--guest", str(root), "--class", f"{__name__}.EchoHeaders"])
        error = self.assertRaises(SystemExit, make_site, options, MultiService())
        self.assertEqual(
            str(error),
            f"twistd httpwasm: --guest {root}: the plugin imports wasi_snapshot_preview1 sock_open, sock_connect:"
            " WasmEdge socket extensions, which this host does not provide",
        )

    def test_check_source(self) -> None:
        """check's view of a plugin: its module, name, testData (unless a config is given) and what is missing."""
        root = write_plugin(self.mktemp(), RICH_MANIFEST, {"plugin.wasm": wat_binary(SOCKET_PLUGIN)})
        found = traefik.check_source(str(root))
        assert found is not None
        self.assertEqual(
            (found.name, found.config, found.unprovided), ("Demo-Plugin-test", RICH_JSON, ("sock_open", "sock_connect"))
        )
        self.assertIn("Traefik plugin 'Demo Plugin (test) é'", found.origin)
        self.assertEqual(traefik.check_source(str(root), b"mine").config, b"mine")  # type: ignore[union-attr]
        self.assertIsNone(traefik.check_source(self.mktemp() + ".wasm"))

    def test_watched_paths(self) -> None:
        """--watch of a plugin directory watches its manifest and module too; any other guest, itself."""
        root = write_plugin(self.mktemp(), HEADERS_MANIFEST, {"bin/headers.wasm": b""})
        self.assertEqual(
            traefik.watched_paths(str(root)),
            [str(root), str(root / traefik.MANIFEST), str(root / "bin" / "headers.wasm")],
        )
        self.assertEqual(traefik.watched_paths("g.wasm"), ["g.wasm"])


class CheckPluginTests(TempFilesMixin, SynchronousTestCase):
    """``python -m twisted_httpwasm check PLUGIN``: the plugin's testData as configuration, one smoke request, and
    what it imports that this host does not offer, said plainly."""

    def run_check(self, *argv: str) -> tuple[int, list[str]]:
        from twisted_httpwasm.testing.check import main

        out = io.StringIO()
        status = main(list(argv), out)
        return status, out.getvalue().splitlines()

    def test_header_plugin_zip_runs_with_its_test_data(self) -> None:
        """The C header plugin's release zip: its testData is read by _start, the smoke request passes on."""
        module = c_guest_binary(HEADERS_PLUGIN, wasi=False).read_bytes()
        path = self.mktemp() + ".zip"
        Path(path).write_bytes(zip_plugin(HEADERS_MANIFEST, {"bin/headers.wasm": module}, "headers-v0.1.0"))
        status, lines = self.run_check(path)
        text = "\n".join(lines)
        self.assertEqual((status, lines[-1]), (0, "OK: guest Header-adder can run here"), text)
        self.assertIn(f"{path} (Traefik plugin 'Header adder', bin/headers.wasm)", lines[0])
        test_config = traefik.load_plugin(path).manifest.test_config
        self.assertIn(f"config: {len(test_config)} bytes", text)
        self.assertIn("config read: yes", text)
        self.assertIn("smoke request: GET / -> 200 (the downstream answered; outcome passed)", text)
        self.assertIn("handle_request:set_header_value, handle_request:set_header_value", text)

    def test_config_file_instead_of_test_data(self) -> None:
        """--config-file (YAML) replaces the testData, encoded as twistd httpwasm encodes it."""
        root = write_plugin(self.mktemp(), RICH_MANIFEST, {"plugin.wasm": wat_binary(ECHO_CONFIG)})
        config = self.mktemp() + ".yaml"
        Path(config).write_text("b: 1\na: x\n")
        status, lines = self.run_check(str(root), "--config-file", config, "--json")
        self.assertEqual(status, 0)
        report = json.loads("\n".join(lines))
        self.assertEqual(report["guest"]["config_bytes"], len(b'{"a":"x","b":1}'))
        self.assertEqual(report["start"]["functions"], ["_start"])
        self.assertEqual(report["smoke"]["status"], 200)
        self.assertFalse(report["smoke"]["downstream_reached"])  # the echo answers itself

    def test_socket_extension_is_said_plainly(self) -> None:
        """A plugin importing WasmEdge's sock_open and sock_connect cannot run here, and check says why."""
        root = write_plugin(self.mktemp(), manifest(test_data="  a: 1\n"), {"plugin.wasm": wat_binary(SOCKET_PLUGIN)})
        status, lines = self.run_check(str(root))
        self.assertEqual(status, 1)
        unknown = [line for line in lines if "UNKNOWN" in line]
        self.assertEqual(len(unknown), 2, lines)
        for line, name in zip(unknown, ("sock_open", "sock_connect"), strict=True):
            self.assertIn(f"wasi_snapshot_preview1.{name}", line)
            self.assertIn("this host does not provide WasmEdge socket extensions", line)
        self.assertTrue(lines[-1].startswith("FAIL: guest t cannot run here: it imports what this host does not"))
        self.assertIn("sock_open", lines[-1])
        self.assertNotIn("sock_send", lines[-1])  # WASI preview 1's own socket calls are provided

    def test_manifest_refusal(self) -> None:
        """A Yaegi plugin: check fails in one line naming the field."""
        root = write_plugin(self.mktemp(), manifest(runtime="yaegi"), {})
        status, lines = self.run_check(str(root))
        self.assertEqual(status, 1)
        self.assertEqual(len(lines), 1)
        self.assertTrue(lines[0].startswith(f"FAIL: {root}: .traefik.yml: runtime is 'yaegi'"), lines)

    def test_start_functions_listed_in_the_order_they_run(self) -> None:
        """A module with both start functions is reported as running _start, then _initialize."""
        both = ECHO_CONFIG.replace(
            '(func (export "handle_request")', '(func (export "_initialize"))\n  (func (export "handle_request")'
        )
        root = write_plugin(self.mktemp(), manifest(), {"plugin.wasm": wat_binary(both)})
        status, lines = self.run_check(str(root))
        self.assertEqual(status, 0, lines)
        self.assertIn("start function: _start, _initialize", lines)

    def test_the_command(self) -> None:
        """As a person runs it: ``python -m twisted_httpwasm check PLUGIN.zip``."""
        path = self.mktemp() + ".zip"
        Path(path).write_bytes(zip_plugin(RICH_MANIFEST, {"plugin.wasm": wat_binary(ECHO_CONFIG)}, "demo"))
        done = subprocess.run(
            [sys.executable, "-m", "twisted_httpwasm", "check", path], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(
            (done.returncode, done.stdout.splitlines()[-1]), (0, "OK: guest Demo-Plugin-test can run here")
        )


# -- the command line ------------------------------------------------------------------------------


class OptionTests(TempFilesMixin, SynchronousTestCase):
    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(list(args))
        return options

    def test_config_file_yaml_is_json_encoded(self) -> None:
        """--guest-config-file x.yaml passes the JSON encoding; a plain file keeps its bytes."""
        path = self.mktemp() + ".yaml"
        Path(path).write_text("b: 1\na: [true, ~]\n")
        options = self.parse("--guest", "g.wasm", "--guest-config-file", path, "--class", f"{__name__}.EchoHeaders")
        self.assertEqual(options["guests"][0]["config"], b'{"a":[true,null],"b":1}')

    def test_config_file_refusals(self) -> None:
        """A malformed YAML file, or YAML without PyYAML, is a usage error of one line."""
        path = self.mktemp() + ".yml"
        Path(path).write_text("a: [\n")
        error = self.assertRaises(usage.UsageError, self.parse, "--guest", "g.wasm", "--guest-config-file", path)
        self.assertIn(f"--guest-config-file: {path}: not valid YAML", str(error))
        Path(path).write_text("a: 1\n")
        with mock.patch.dict(sys.modules, {"yaml": None}):
            error = self.assertRaises(usage.UsageError, self.parse, "--guest", "g.wasm", "--guest-config-file", path)
        self.assertIn("pip install 'twisted-httpwasm[yaml]'", str(error))

    def test_test_data_is_one_configuration(self) -> None:
        """--guest-config-test-data configures the preceding --guest; with another configuration it is refused."""
        options = self.parse("--guest", "p.zip", "--guest-config-test-data", "--class", f"{__name__}.EchoHeaders")
        self.assertTrue(options["guests"][0]["test-data"])
        error = self.assertRaises(
            usage.UsageError, self.parse, "--guest", "p.zip", "--guest-config", "x", "--guest-config-test-data"
        )
        self.assertIn("already has a configuration", str(error))
        error = self.assertRaises(usage.UsageError, self.parse, "--guest-config-test-data")
        self.assertIn("must come after the --guest", str(error))

    def test_test_data_of_a_plain_guest_is_refused_at_load(self) -> None:
        """--guest-config-test-data on a .wasm guest: refused when loading, saying it is for plugins."""
        guest = self.mktemp() + ".wat"
        Path(guest).write_text(ECHO_CONFIG)
        options = self.parse("--guest", guest, "--guest-config-test-data", "--class", f"{__name__}.EchoHeaders")
        error = self.assertRaises(SystemExit, make_site, options, MultiService())
        self.assertIn("--guest-config-test-data applies to a Traefik plugin", str(error))

    def test_guest_name(self) -> None:
        """--guest-name names a plugin (instead of its displayName) or any guest; it must be a clean name."""
        root = write_plugin(self.mktemp(), RICH_MANIFEST, {"plugin.wasm": wat_binary(ECHO_CONFIG)})
        plain = self.mktemp() + ".wat"
        Path(plain).write_text(ECHO_CONFIG)
        options = self.parse(
            "--guest", str(root), "--guest-name", "waf-1", "--guest", plain, "--guest-name", "echo",
            "--guest", str(root), "--class", f"{__name__}.EchoHeaders",
        )  # fmt: skip
        parent = MultiService()
        make_site(options, parent)
        self.assertEqual([g.name for g in reloading_guests(parent)], ["waf-1", "echo", "Demo-Plugin-test"])
        for bad in ("a b", "x.y", ""):
            error = self.assertRaises(usage.UsageError, self.parse, "--guest", plain, "--guest-name", bad)
            self.assertIn("--guest-name must be letters, digits", str(error))
        error = self.assertRaises(usage.UsageError, self.parse, "--guest-name", "x")
        self.assertIn("must come after the --guest", str(error))

    def test_traefik_mount_forms(self) -> None:
        """Traefik's mounts: HOST (same path inside), HOST:GUEST, each with :ro."""
        host = os.path.abspath(self.mktemp())
        os.makedirs(host)
        options = self.parse(
            "--guest", "g.wasm", "--class", f"{__name__}.EchoHeaders",
            "--guest-mount", host, "--guest-mount", f"{host}:ro", "--guest-mount", f"{host}:/data:ro",
        )  # fmt: skip
        self.assertEqual(
            [(m.host_dir, m.guest_dir, m.read_only) for m in options["guest-mounts"]],
            [(host, host, False), (host, host, True), (host, "/data", True)],
        )


# -- serving plugins, in both execution modes --------------------------------------------------------


class PluginServingTestsMixin(TempFilesMixin):
    execution: Any

    def serve_options(self, *args: str) -> tuple[str, MultiService]:
        """Parse ``args`` as twistd httpwasm's (with the EchoHeaders downstream), build its site and serve it."""
        options = Options()
        options.parseOptions([*args, "--class", f"{__name__}.EchoHeaders", "--execution", self.execution.value])
        parent = MultiService()
        url: str = self.listen(make_site(options, parent))  # type: ignore[attr-defined]
        return url, parent

    @inlineCallbacks
    def test_directory_plugin_gets_its_test_data_byte_for_byte(self) -> Generator[Any, Any, None]:
        """A plugin directory with --guest-config-test-data: the guest receives exactly Go's encoding; its
        _start ended with proc_exit(0) and it serves; it is named by its displayName."""
        root = write_plugin(self.mktemp(), RICH_MANIFEST, {"plugin.wasm": wat_binary(ECHO_CONFIG)})
        url, parent = self.serve_options("--guest", str(root), "--guest-config-test-data")
        for _ in range(2):
            status, headers, body = yield self.fetch("GET", url + "/")  # type: ignore[attr-defined]
            self.assertEqual((status, body), (200, RICH_JSON))  # type: ignore[attr-defined]
            self.assertEqual(headers.getRawHeaders("x-started"), ["yes"])  # type: ignore[attr-defined]
        self.assertEqual([g.name for g in reloading_guests(parent)], ["Demo-Plugin-test"])  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_config_file_beside_a_plugin(self) -> Generator[Any, Any, None]:
        """A plugin zip with a --guest-config-file in YAML: the guest receives its JSON encoding."""
        data = zip_plugin(RICH_MANIFEST, {"plugin.wasm": wat_binary(ECHO_CONFIG)}, "demo-v1")
        path = self.mktemp() + ".zip"
        Path(path).write_bytes(data)
        config = self.mktemp() + ".yaml"
        Path(config).write_text("headers:\n  X-B: 2\n  X-A: 'é<'\n")
        url, _ = self.serve_options(
            "--guest", path, "--guest-sha256", hashlib.sha256(data).hexdigest(), "--guest-config-file", config
        )
        _, _, body = yield self.fetch("GET", url + "/")  # type: ignore[attr-defined]
        self.assertEqual(body, '{"headers":{"X-A":"é\\u003c","X-B":2}}'.encode())  # type: ignore[attr-defined]

    @inlineCallbacks
    def test_c_header_plugin_adds_its_headers(self) -> Generator[Any, Any, None]:
        """The C header plugin (a TinyGo-shaped command) in a zip one folder down, with its testData: the
        downstream sees the headers of its headers map."""
        module = c_guest_binary(HEADERS_PLUGIN, wasi=False).read_bytes()
        path = self.mktemp() + ".zip"
        Path(path).write_bytes(zip_plugin(HEADERS_MANIFEST, {"bin/headers.wasm": module}, "headers-v0.1.0"))
        url, parent = self.serve_options("--guest", path, "--guest-config-test-data")
        status, _, body = yield self.fetch("GET", url + "/")  # type: ignore[attr-defined]
        self.assertEqual((status, body), (200, b"x-html: a<b\nx-plugin: from testData"))  # type: ignore[attr-defined]
        self.assertEqual([g.name for g in reloading_guests(parent)], ["Header-adder"])  # type: ignore[attr-defined]


globals().update(execution_variants(PluginServingTestsMixin, ServerTestCase))


# -- real twistd ----------------------------------------------------------------------------------------


class TwistdPluginTests(HangupTestCase):
    @inlineCallbacks
    def test_plugin_zip_with_its_test_data(self) -> Generator[Any, Any, None]:
        """`twistd httpwasm --guest PLUGIN.zip --guest-config-test-data`: the C header plugin runs unchanged."""
        module = c_guest_binary(HEADERS_PLUGIN, wasi=False).read_bytes()
        path = self.mktemp() + ".zip"
        Path(path).write_bytes(zip_plugin(HEADERS_MANIFEST, {"bin/headers.wasm": module}, "headers-v0.1.0"))
        for execution in ("thread", "inline"):
            url = yield self.start_server(
                "--guest", path, "--guest-config-test-data", "--class", f"{__name__}.EchoHeaders",
                "--execution", execution,
            )  # fmt: skip
            status, _, body = yield self.fetch("GET", url + "/")
            self.assertEqual((status, body), (200, b"x-html: a<b\nx-plugin: from testData"))
            yield self.stop(self.server)

    @inlineCallbacks
    def test_the_command_of_docs_traefik_md(self) -> Generator[Any, Any, None]:
        """The command docs/traefik.md shows, as written (the zip, backend and endpoint are this test's): the C
        header plugin runs with its testData in front of a --proxy backend."""
        text = (ROOT / "docs" / "traefik.md").read_text()
        section = text[text.index("## Run a plugin with its own test data") :]
        block = re.search(r"```sh\n(.*?)```", section, re.S)
        assert block is not None
        line = next(line for line in block.group(1).splitlines() if line.startswith("twistd "))
        args = shlex.split(line)
        args = args[args.index("httpwasm") + 1 :]
        del args[args.index("--listen") : args.index("--listen") + 2]  # start_server listens on a free port
        module = c_guest_binary(HEADERS_PLUGIN, wasi=False).read_bytes()
        path = self.mktemp() + ".zip"
        Path(path).write_bytes(zip_plugin(HEADERS_MANIFEST, {"bin/headers.wasm": module}, "demo-v1.0.0"))
        backend = self.serve(EchoHeaders())
        args = [{"demo-v1.0.0.zip": path, "http://127.0.0.1:9000": backend}.get(arg, arg) for arg in args]
        self.assertIn(path, args)
        url = yield self.start_server(*args)
        status, _, body = yield self.fetch("GET", url + "/")
        self.assertEqual(status, 200)
        self.assertIn(b"x-html: a<b\n", body)
        self.assertIn(b"x-plugin: from testData", body)

    @inlineCallbacks
    def test_manifest_refusal_is_one_line(self) -> Generator[Any, Any, None]:
        """A Yaegi plugin directory: twistd exits 1 with one line naming the field."""
        root = write_plugin(self.mktemp(), manifest(runtime="yaegi"), {"plugin.wasm": b""})
        status, output = yield self.exit_status("--guest", str(root), "--class", f"{__name__}.EchoHeaders")
        self.assertEqual(status, 1)
        lines = [line for line in output.splitlines() if "runtime is 'yaegi'" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn(f"twistd httpwasm: --guest {root}: .traefik.yml: runtime is 'yaegi'", lines[0])
        self.assertNotIn("Traceback", output)

    @inlineCallbacks
    def test_watch_reloads_when_the_module_changes(self) -> Generator[Any, Any, None]:
        """--watch of a plugin directory reloads when its module is replaced (the directory itself is unchanged)."""
        root = write_plugin(self.mktemp(), manifest(test_data="  v: 1\n"), {"plugin.wasm": wat_binary(ECHO_CONFIG)})
        url = yield self.start_server(
            "--watch", "--guest", str(root), "--guest-config-test-data", "--class", f"{__name__}.EchoHeaders"
        )
        self.assertEqual((yield self.fetch("GET", url + "/"))[2], b'{"v":1}')
        replaced = root / "plugin.wasm"
        # Same size and name, new content: an echo that marks its responses differently ("yes" -> "new").
        replaced.write_bytes(wat_binary(ECHO_CONFIG.replace('"yes"', '"new"')))
        yield self.wait_for_count(self.RELOADED, 1)
        self.assertIn(f"httpwasm: {replaced} changed; reloading", self.server.output())
        _, headers, body = yield self.fetch("GET", url + "/")
        self.assertEqual((headers.getRawHeaders("x-started"), body), (["new"], b'{"v":1}'))

    @inlineCallbacks
    def test_sighup_reloads_a_plugin_directory(self) -> Generator[Any, Any, None]:
        """SIGHUP reads the plugin directory again: a new testData and a new module take over; a broken manifest
        is refused in one line and the running plugin goes on serving."""
        root = write_plugin(self.mktemp(), manifest(test_data="  v: 1\n"), {"plugin.wasm": wat_binary(ECHO_CONFIG)})
        url = yield self.start_server(
            "--guest", str(root), "--guest-config-test-data", "--class", f"{__name__}.EchoHeaders"
        )
        self.assertEqual((yield self.fetch("GET", url + "/"))[2], b'{"v":1}')

        (root / traefik.MANIFEST).write_text(manifest(test_data="  v: 2\n  w: [x]\n"))
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.RELOADED, 1)
        self.assertEqual((yield self.fetch("GET", url + "/"))[2], b'{"v":2,"w":["x"]}')

        (root / traefik.MANIFEST).write_text(manifest(runtime="yaegi"))
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.FAILED, 1)
        failed = [line for line in self.server.output().splitlines() if self.FAILED in line]
        self.assertEqual(len(failed), 1)
        self.assertIn("runtime is 'yaegi'", failed[0])
        self.assertEqual((yield self.fetch("GET", url + "/"))[2], b'{"v":2,"w":["x"]}')

        # Another module at another wasmPath, with another testData.
        write_plugin(
            root,
            manifest(extra="wasmPath: bin/v2.wasm\n", test_data="  v: 3\n"),
            {"bin/v2.wasm": wat_binary(ECHO_CONFIG.replace('"yes"', '"v2!"'))},
        )
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.RELOADED, 2)
        _, headers, body = yield self.fetch("GET", url + "/")
        self.assertEqual((headers.getRawHeaders("x-started"), body), (["v2!"], b'{"v":3}'))


class RemotePluginTests(TLSServerMixin, HangupTestCase):
    @inlineCallbacks
    def test_https_release_zip_pinned_by_its_digest(self) -> Generator[Any, Any, None]:
        """--guest https://.../demo.zip --guest-sha256 ZIP_DIGEST --guest-config-test-data: fetched at startup,
        served with its testData; at SIGHUP its verified copy is used, not fetched again; a wrong digest is refused
        naming the zip's."""
        self.start_tls_server()
        data = zip_plugin(RICH_MANIFEST, {"plugin.wasm": wat_binary(ECHO_CONFIG)}, "demo-v1.0.0")
        self.files.files[b"/releases/demo-v1.0.0.zip"] = data
        url = self.base + "/releases/demo-v1.0.0.zip"
        digest = hashlib.sha256(data).hexdigest()
        status, output = yield self.exit_status(
            "--guest", url, "--guest-sha256", "0" * 64, "--class", f"{__name__}.EchoHeaders"
        )
        self.assertEqual(status, 1)
        self.assertIn(f"has sha256 {digest}, not the expected {'0' * 64}", output)

        base = yield self.start_server(
            "--guest", url, "--guest-sha256", digest, "--guest-config-test-data", "--class", f"{__name__}.EchoHeaders"
        )
        self.assertEqual((yield self.fetch("GET", base + "/"))[2], RICH_JSON)
        os.kill(self.server.process.pid, signal.SIGHUP)
        yield self.wait_for_count(self.RELOADED, 1)
        self.assertEqual((yield self.fetch("GET", base + "/"))[2], RICH_JSON)
        self.assertEqual(self.files.fetches[b"/releases/demo-v1.0.0.zip"], 2)  # the refused run, then startup
