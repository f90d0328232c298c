"""docs/architecture.md against the code: the layers it lists, each importing only from the layers above it
(imports inside functions included), no import cycles, and no library module importing the test helpers."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnreg"
DOC = (ROOT / "docs" / "architecture.md").read_text()
TEST_HELPERS = {"attnreg.testing", "attnreg.testing.mmdit", "attnreg.testing.metrics"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The attnreg modules `name` imports anywhere in its source (a package's name when it imports the package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports(name) for name in MODULES}


def layers() -> list[set[str]]:
    """The module sets of the doc's layers, in order: each bold paragraph heading names its modules in
    backticks (`regulation`, `geometry.py`, `toy/`)."""
    out = []
    for heading, body in re.findall(r"^\*\*([A-Za-z\- ]+)\*\* \(([^)]*)\)", DOC, flags=re.M):
        names = set()
        for item in re.findall(r"`([\w./]+)`", body):
            stem = item.removesuffix(".py").strip("/").replace("/", ".")
            names |= {m for m in MODULES if m == f"attnreg.{stem}" or m.startswith(f"attnreg.{stem}.")}
        out.append(names)
    return out


LAYERS = layers()


def layer_of(name: str) -> int:
    if name == "attnreg":
        return 1  # the package's public names: the plug-in's
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"{name} is in no layer of docs/architecture.md")


def test_every_module_is_in_one_layer_of_the_doc():
    assert len(LAYERS) == 7
    library = [m for m in MODULES if m not in TEST_HELPERS and m != "attnreg.__main__"]
    placed = [m for m in library if m != "attnreg" and sum(m in names for names in LAYERS) != 1]
    assert placed == []


def test_each_layer_imports_only_from_the_layers_above_it():
    upward = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m not in TEST_HELPERS | {"attnreg.__main__"}
                    for t in targets if t not in TEST_HELPERS and layer_of(t) > layer_of(m))
    assert upward == []


def test_the_library_does_not_import_the_test_helpers():
    assert sorted(f"{m} -> {t}" for m, targets in GRAPH.items() if m not in TEST_HELPERS
                  for t in targets & TEST_HELPERS) == []


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of more than one module: the import cycles."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back():
    assert strongly_connected(GRAPH) == []
