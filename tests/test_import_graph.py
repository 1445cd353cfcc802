"""The project's import graph: no cycles, and a config that loads without torch.

Every `import`/`from` statement counts, at module level or inside a function: a lazy import
that breaks a cycle at run time still ties the two modules together in design. Imports
under `if TYPE_CHECKING:` do not count (type hints only). Relative imports are resolved.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainables.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainables", "sweeper")


def module_files(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imported_names(module: str, path: Path) -> set[str]:
    """Every module name an import statement of ``module`` may load (``from a import b``
    gives both ``a`` and ``a.b``: b may be a submodule)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    files = {m: p for pkg in packages for m, p in module_files(pkg).items()}
    return {m: {t for t in imported_names(m, p) if t in files and t != m}
            for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a]) if b in component]
    return f"{len(component)} modules: " + "; ".join(edges)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    # Each package on its own, so a cycle names the package that owns it; then both
    # together (below), for a cycle through the two.
    graph = import_graph((package,))
    assert not cycles(graph), "\n".join(describe(c, graph) for c in cycles(graph))


def test_no_import_cycles_across_packages():
    graph = import_graph(PACKAGES)
    assert not cycles(graph), "\n".join(describe(c, graph) for c in cycles(graph))


# A module longer than this does too much to read in one sitting: split it at its seams,
# behind a thin public front (as sweeper/search/ and sweeper/analysis/ are).
MAX_MODULE_LINES = 450


def test_no_module_is_too_long_to_read():
    long = {name: n for package in PACKAGES for name, path in module_files(package).items()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"over {MAX_MODULE_LINES} lines: {long}"


def test_trainables_never_imports_sweeper():
    graph = import_graph(PACKAGES)
    wrong = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("trainables")
                   for t in ts if t.startswith("sweeper"))
    assert not wrong


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text(textwrap.dedent("""\
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkg import a
        import pkg.a
    """))
    assert imported_names("pkg.a", pkg / "a.py") == {"pkg.b", "pkg.b.g"}
    assert imported_names("pkg", pkg / "__init__.py") == {"pkg", "pkg.a"}
    assert imported_names("pkg.b", pkg / "b.py") == {"typing", "typing.TYPE_CHECKING", "pkg.a"}
    assert cycles({"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg": {"pkg.a"}}) == [
        ["pkg.a", "pkg.b"]]


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_config_checks_names_without_torch_and_imports_only_the_chosen_method():
    # The registries know their names without importing what they name: a config module,
    # the names' errors and `caat-sweep status`' modules load no torch. A method block is
    # validated against its method's knob model, in the method's own file: that one file.
    result = run_python("""
        import sys
        import sweeper.status
        from trainables.config import validate
        from trainables.errors import ConfigError

        heavy = lambda: sorted(m for m in sys.modules if m.split(".")[0] == "torch")
        print("heavy at import:", heavy())
        for raw in ({"method": {"name": "sgd"}}, {"method": {"name": "erm"},
                    "dataset": {"name": "mnist"}}, {"method": {"name": "erm"},
                    "model": {"arch": "vgg"}}):
            try:
                validate(raw)
            except ConfigError as err:
                print(err)
            else:
                raise SystemExit(f"{raw} accepted")
        cfg = validate({"method": {"name": "erm"}, "model": {"arch": "mlp"}})
        assert cfg.resolved()["method"] == {"name": "erm"}
        loaded = sorted(m for m in sys.modules if m.startswith("trainables.methods."))
        print("methods loaded:", loaded)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "heavy at import: []"
    assert lines[1:4] == [
        f"method.name: unknown 'sgd'; allowed: {', '.join(METHODS.names())}",
        "config: dataset.name: unknown 'mnist'; allowed: cifar10, cifar100, fashion_mnist, gmm, "
        "synthetic",
        "config: model.arch: unknown 'vgg'; allowed: linear, mlp, preact_resnet18, resnet32, "
        "small_cnn, wrn28_10"]
    assert lines[4] == "methods loaded: ['trainables.methods.base', 'trainables.methods.erm']"


def test_every_registered_name_resolves():
    # The registries name where each entry lives as text; a typo there fails only on use.
    from trainables.registry import DATASETS, METHODS, MODELS

    for registry in (DATASETS, MODELS, METHODS):
        for name in registry:
            assert callable(registry.get(name)), f"{registry.field} {name!r}"
    assert all(METHODS.get(name).name == name for name in METHODS)
