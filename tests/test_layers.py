"""The package's layers, read from its imports: each imports only the layers below it, with no cycle.

1. ``abi.py`` - the ABI's names and packed results: neither wasmtime nor twisted.web; ``_optional.py``
   (imports of the optional extras) beside it, so that every layer may use it.
2. ``runtime/`` - wasmtime, guests, pools, host functions: no twisted.web.
3. ``web/`` - the twisted.web adapter.
4. ``service/`` - twistd wiring (``tap``) and worker processes.
5. ``testing/`` - the test kit (GuestClient, the pytest plugin, ``check``) and ``__main__``
   (``python -m twisted_httpwasm``): they run guests the way ``twistd httpwasm`` does.
The facade (``__init__.py``) may take names from any layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "twisted_httpwasm"
LAYERS = {"_optional": 1, "abi": 1, "runtime": 2, "web": 3, "service": 4, "testing": 5, "__main__": 5}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (modules, or names inside them)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the facade
    return LAYERS.get(parts[1])


class LayerTests(SynchronousTestCase):
    def test_every_module_belongs_to_a_layer(self) -> None:
        """Each module is the facade, the guests data package, or in one of the layers."""
        strays = [
            name
            for name in package_modules()
            if name != "twisted_httpwasm" and layer_of(name) is None and not name.startswith("twisted_httpwasm.guests")
        ]
        self.assertEqual(strays, [])

    def test_no_layer_imports_a_layer_above_it(self) -> None:
        """abi <- runtime <- web <- service: an import never points up."""
        modules = package_modules()
        upward = []
        for name, path in modules.items():
            mine = layer_of(name)
            if mine is None:
                continue
            for imported in imports_of(path):
                theirs = layer_of(imported) if imported.startswith("twisted_httpwasm.") else None
                if theirs is not None and theirs > mine:
                    upward.append(f"{name} -> {imported}")
        self.assertEqual(upward, [])

    def test_lower_layers_do_not_know_twisted_web(self) -> None:
        """abi imports neither wasmtime nor twisted.web; the runtime does not import twisted.web."""
        wrong = []
        for name, path in package_modules().items():
            layer = layer_of(name)
            banned = {1: ("twisted.web", "wasmtime"), 2: ("twisted.web",)}.get(layer or 0, ())
            wrong += [f"{name} -> {i}" for i in imports_of(path) if i.startswith(banned)]
        self.assertEqual(wrong, [])

    def test_no_import_cycle(self) -> None:
        """No module reaches itself through the package's own imports (TYPE_CHECKING ones included)."""
        modules = package_modules()
        edges = {}
        for name, path in modules.items():
            imported = imports_of(path)
            edges[name] = {
                other
                for other in modules
                if other not in (name, "twisted_httpwasm")
                and any(i == other or i.startswith(other + ".") for i in imported)
            }
        cycles = []
        state: dict[str, int] = {}

        def visit(node: str, trail: list[str]) -> None:
            state[node] = 1
            for nxt in sorted(edges[node]):
                if state.get(nxt) == 1:
                    cycles.append(" -> ".join([*trail[trail.index(nxt) :], nxt]))
                elif nxt not in state:
                    visit(nxt, [*trail, nxt])
            state[node] = 2

        for name in sorted(modules):
            if name not in state:
                visit(name, [name])
        self.assertEqual(cycles, [])
