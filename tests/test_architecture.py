"""The import rules of docs/architecture.md: arrows point down, no import circle in dgm_kernels, public names only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dgm_kernels", "dgm", "benchmarks", "scripts")
#: package-private modules, imported only inside their own package
PRIVATE_MODULES = {"dgm_kernels": {"_checks", "_modes", "_C", "_common"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path):
    """(imported module, imported names or None, line) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, [a.name for a in node.names], node.lineno


def test_dgm_kernels_imports_nothing_above_it():
    for name, path in _modules("dgm_kernels").items():
        for target, _, line in _imports(name, path):
            top = target.split(".")[0]
            assert top not in ("dgm", "benchmarks", "scripts"), f"{path}:{line} imports {target}"


#: (module, what it may import lazily, inside the function named) from the optional extra
LAZY_EXTRA_IMPORTS = {("dgm.cli", "dgm.avalanche.compare"): "cmd_compare"}


def _function_lines(path: Path) -> dict[int, str]:
    """line -> the name of the outermost function that holds it."""
    lines = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines.update({n: node.name for n in range(node.lineno, node.end_lineno + 1)})
    return lines


def test_only_dgm_avalanche_imports_the_optional_avalanche_extra():
    """The core packages never import avalanche (the optional extra); only dgm.avalanche (and its importers: the
    tests and examples, not checked here) does, so `import dgm` works without it. The one exception, `dgm compare`,
    imports dgm.avalanche inside its command function (LAZY_EXTRA_IMPORTS), never at module level."""
    for package in ("dgm_kernels", "dgm", "benchmarks", "scripts"):
        for name, path in _modules(package).items():
            if name == "dgm.avalanche" or name.startswith("dgm.avalanche."):
                continue
            functions = _function_lines(path)
            for target, _, line in _imports(name, path):
                assert target.split(".")[0] != "avalanche", f"{path}:{line} imports {target}"
                if target.startswith("dgm.avalanche"):
                    allowed = LAZY_EXTRA_IMPORTS.get((name, target))
                    assert allowed is not None and functions.get(line) == allowed, \
                        f"{path}:{line} imports {target} (needs the extra)"


def test_no_import_circle_in_dgm_kernels():
    modules = _modules("dgm_kernels")
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names, _ in _imports(name, path):
            candidates = [target] + [f"{target}.{n}" for n in names or []]
            for c in candidates:
                if c in modules and c != name and not name.startswith(c + "."):
                    # a submodule importing its own package's __init__ is Python's normal package loading
                    graph[name].add(c)
    state: dict[str, int] = {}

    def visit(m, trail):
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = trail[trail.index(n):] + [n]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, trail + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_crosses_a_module(package):
    own = {}
    for pkg in PACKAGES:
        own.update(_modules(pkg))
    for name, path in _modules(package).items():
        for target, names, line in _imports(name, path):
            if target.split(".")[0] not in PACKAGES or not names:
                continue
            for n in names:
                if not n.startswith("_") or n.startswith("__"):
                    continue
                allowed = PRIVATE_MODULES.get(package, set())
                assert n in allowed, f"{path}:{line} imports the private name {n} from {target}"
