"""Twisted's private names are used in two modules only: the fences.

Twisted may rename or drop any name that starts with ``_`` in any release.  The
adapter's reliances on such names are in ``web/twisted_internals.py`` (twisted.web)
and ``service/twisted_internals.py`` (``usage``, endpoints), each a small function
with its own test in ``tests/test_twisted_internals.py``; this test reads the
package's source and fails on any other use, so that a new reliance goes there too.

What counts as a use of someone else's private name, outside the fences:

- importing a name that starts with ``_`` from ``twisted``;
- ``x._name`` (or ``getattr``/``hasattr``/``setattr``/``delattr`` with ``"_name"``)
  where nothing in this package defines ``_name`` (a function, class, attribute or
  variable of that name), and any name-mangled ``x._Class__name``;
- in a class derived from a Twisted class: defining or using ``self._name`` (or
  ``super()._name``) when one of its Twisted bases has ``_name`` - overriding a
  private method, or reading private state, of the base.

``runtime/native.py`` and ``runtime/accel.py`` are wasmtime's fence (checked by
``tests/test_native.py``) and import no Twisted.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from functools import cache
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "twisted_httpwasm"
FENCES = {
    PACKAGE / "web" / "twisted_internals.py",
    PACKAGE / "service" / "twisted_internals.py",
}
#: wasmtime's C API (and ctypes' library handle): native.py and the accelerator's loader, which import no Twisted.
WASMTIME_FENCES = {PACKAGE / "runtime" / "native.py", PACKAGE / "runtime" / "accel.py"}
#: Private names of other libraries than Twisted, where they are read: (module, name) -> whose.
NOT_TWISTED = {
    ("twisted_httpwasm/web/tracing.py", "_endpoint"): "OpenTelemetry's OTLPSpanExporter (only named in a log line)",
}
_ATTRIBUTE_FUNCTIONS = {"getattr", "hasattr", "setattr", "delattr"}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _mangled(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and "__" in name[1:] and not name.endswith("__")


def sources() -> list[Path]:
    return sorted([*PACKAGE.rglob("*.py"), *(ROOT / "twisted" / "plugins").glob("*.py")])


def names_defined(paths: list[Path]) -> set[str]:
    """Every private name the package itself defines: functions, classes, attributes, variables, arguments."""
    defined: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
            elif isinstance(node, ast.arg):
                defined.add(node.arg)
            elif isinstance(node, ast.alias):
                defined.add(node.asname or node.name.rpartition(".")[2])
            elif isinstance(node, ast.Call) and _attribute_call(node) in ("setattr",):
                if (
                    len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str)
                ):
                    defined.add(node.args[1].value)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                # A name kept in a constant (``_TRACE = "_httpwasm_trace"``) and set with setattr.
                if isinstance(node.value.value, str) and node.value.value.startswith("_httpwasm"):
                    defined.add(node.value.value)
    return {name for name in defined if _private(name)}


def _attribute_call(node: ast.Call) -> str | None:
    return node.func.id if isinstance(node.func, ast.Name) and node.func.id in _ATTRIBUTE_FUNCTIONS else None


@cache
def _twisted_private_names(cls: type) -> frozenset[str]:
    """The private names a Twisted class and its Twisted bases have: class attributes and ``self._x`` they set."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("twisted."):
            continue
        names.update(name for name in vars(klass) if _private(name))
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                names.add(node.attr)
    return frozenset(names)


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def private_uses(path: Path, tree: ast.Module, ours: set[str], module: object | None) -> list[str]:
    """Where ``tree`` (the source of ``path``) uses a private name that is not the package's own."""
    found: list[str] = []
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "twisted":
            found += [f"{where}:{line}: imports {node.module}.{a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [
                f"{where}:{line}: imports {a.name}"
                for a in node.names
                if a.name.startswith("twisted.") and any(_private(part) for part in a.name.split("."))
            ]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            own = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            if _mangled(node.attr) or (not own and node.attr not in ours):
                found.append(f"{where}:{line}: .{node.attr}")
        elif isinstance(node, ast.Call) and _attribute_call(node) and len(node.args) > 1:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value):
                if _mangled(name.value) or name.value not in ours:
                    found.append(f"{where}:{line}: {_attribute_call(node)}(..., {name.value!r})")
    # Classes derived from Twisted's: their private names must not be their Twisted bases' private names.
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef) or module is None:
            continue
        cls = getattr(module, node.name, None)
        if not isinstance(cls, type) or not any(k.__module__.startswith("twisted.") for k in cls.__mro__[1:]):
            continue
        theirs = _twisted_private_names(cls)
        for inner in ast.walk(node):
            name = None
            if isinstance(inner, ast.FunctionDef | ast.AsyncFunctionDef) and inner in node.body:
                name = inner.name
            elif isinstance(inner, ast.Attribute) and (
                (isinstance(inner.value, ast.Name) and inner.value.id == "self")
                or (isinstance(inner.value, ast.Call) and getattr(inner.value.func, "id", None) == "super")
            ):
                name = inner.attr
            if name is not None and _private(name) and name in theirs:
                found.append(f"{where}:{getattr(inner, 'lineno', 0)}: {node.name} uses its Twisted base's {name}")
    return found


def _not_twisted(finding: str) -> bool:
    """Whether ``finding`` is one of :data:`NOT_TWISTED`: another library's private name, read where it says."""
    path, _, rest = finding.partition(":")
    return any(path == where and rest.endswith(f"getattr(..., {name!r})") for where, name in NOT_TWISTED)


class TwistedFenceTests(SynchronousTestCase):
    def test_private_twisted_names_only_in_the_fences(self) -> None:
        """No module but the two fences imports, reads, sets or overrides a private Twisted name."""
        paths = sources()
        ours = names_defined([path for path in paths if path not in FENCES])
        found = []
        for path in paths:
            if path in FENCES or path in WASMTIME_FENCES:
                continue
            module = importlib.import_module(_module_of(path)) if path.is_relative_to(PACKAGE) else None
            found += private_uses(path, ast.parse(path.read_text()), ours, module)
        found = [finding for finding in found if not _not_twisted(finding)]
        self.assertEqual(found, [])

    def test_the_fences_exist_and_are_used(self) -> None:
        """Each fence is a module of its layer, and the rest of the package goes through it."""
        for fence in FENCES:
            self.assertTrue(fence.exists(), fence)
            name = _module_of(fence)
            users = [path for path in sources() if name.rpartition(".")[2] in path.read_text() and path != fence]
            self.assertNotEqual(users, [], name)

    def test_the_check_sees_each_kind_of_use(self) -> None:
        """The checker itself: each kind of private use in a sample is reported, the package's own names are not."""
        sample = textwrap.dedent(
            """
            from twisted.web.http import _escape
            import twisted.web._flatten
            from twisted.web.http import HTTPChannel

            class Mine:
                def _own(self):
                    return self._mine
                def other(self, request, channel):
                    request._encoder = None
                    getattr(request, "_disconnected", False)
                    channel._HTTPChannel__first_line
                    return self._own()

            class Channel(HTTPChannel):
                def _send100Continue(self):
                    return self._dataBuffer
            """
        )
        namespace: dict[str, object] = {}
        exec(compile(sample, "sample", "exec"), namespace)  # the sample above, to resolve its classes

        class Module:
            Mine = namespace["Mine"]
            Channel = namespace["Channel"]

        tree = ast.parse(sample)
        found = private_uses(ROOT / "sample.py", tree, {"_own", "_mine"}, Module)
        self.assertEqual(
            sorted(finding.partition(": ")[2] for finding in found),
            sorted(
                [
                    "imports twisted.web.http._escape",
                    "imports twisted.web._flatten",
                    "._HTTPChannel__first_line",
                    "getattr(..., '_disconnected')",
                    "._encoder",
                    "Channel uses its Twisted base's _send100Continue",
                    "Channel uses its Twisted base's _dataBuffer",
                ]
            ),
        )
