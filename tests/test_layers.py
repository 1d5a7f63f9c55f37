"""The library's layers, read from its imports: no import circle, and dependencies flow one way
(mathematics <- language models <- experiments <- chapters; book.runs <- the rest of the book)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "prefdyn"

# what each layer may import from the library (prefixes of module names); absent: anything
ALLOWED = {
    "prefdyn.objectives": (),
    "prefdyn.tabular": ("prefdyn.objectives",),
    "prefdyn.stats": (),
    "prefdyn.store": (),
    "prefdyn.theory": ("prefdyn.objectives", "prefdyn.tabular", "prefdyn.stats", "prefdyn.theory"),
    "prefdyn.datasets": ("prefdyn.datasets",),
    "prefdyn.params": (),
    "prefdyn.llm": ("prefdyn.objectives", "prefdyn.store", "prefdyn.llm"),
    "prefdyn.book.runs": ("prefdyn.store",),
    "prefdyn.book": ("prefdyn.store", "prefdyn.stats", "prefdyn.book"),
    "prefdyn.experiments": ("prefdyn.objectives", "prefdyn.tabular", "prefdyn.stats", "prefdyn.store",
                            "prefdyn.theory", "prefdyn.llm", "prefdyn.datasets", "prefdyn.params",
                            "prefdyn.book.verify", "prefdyn.book.glue", "prefdyn.book.figures", "prefdyn.experiments"),
}
FORBIDDEN_THIRD_PARTY = {"prefdyn.theory": ("transformers", "accelerate", "papermill", "myst_nb")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at top level or inside functions, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}   # `from . import x` may name a module
    return out


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first = last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer_of(module: str, table: dict) -> str | None:
    return max((k for k in table if module == k or module.startswith(k + ".")), key=len, default=None)


def test_the_cycle_finder_finds_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_library_has_no_import_circle():
    assert find_cycle(library_graph()) is None


@pytest.mark.parametrize("module", sorted(library_graph()))
def test_each_module_imports_only_from_the_layers_below(module):
    layer = layer_of(module, ALLOWED)
    if layer is None:       # cli, __main__, the package itself: the top
        return
    graph = library_graph()
    bad = [m for m in graph[module] if m != "prefdyn" and not any(m == a or m.startswith(a + ".") for a in ALLOWED[layer])]
    assert not bad, f"{module} ({layer}) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in library_graph() if m.startswith("prefdyn.theory")))
def test_theory_never_imports_transformers_or_the_book(module):
    path = next(p for p in PACKAGE.rglob("*.py") if module_name(p) == module)
    bad = [m for m in imports_of(path) if m.split(".")[0] in FORBIDDEN_THIRD_PARTY["prefdyn.theory"]]
    assert not bad, f"{module} imports {bad}"
