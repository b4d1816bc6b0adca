"""The code's layering stays true: ``vae`` <- ``tracking`` <- ``tuning`` <- ``pipelines``.

Every import in the four packages is read with ``ast`` (those inside functions too) and resolved
to the project module it names. Then: no module imports a package of a higher layer, the library
imports no tracker or orchestrator, and the graph of modules has no cycle, so no import inside a
function is there to dodge one.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"vae": 0, "tracking": 1, "tuning": 2, "pipelines": 3}
# Third-party packages a layer must not import (the layers above it bring them in).
FORBIDDEN = {"vae": {"mlflow", "prefect", "optuna"}, "tracking": {"prefect", "optuna"}, "tuning": {"prefect"}}
FLOW_MODULES = {"tuning.flow"}  # the vae-sweep Prefect flow: the one tuning module allowed Prefect


def _modules() -> dict[str, Path]:
    out = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported name, line) for every import statement of a module, resolved to the deepest
    project module it names (``from vae import fast`` -> ``vae.fast``); other names as written."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full if full in MODULES else base, node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for target, _ in _imports(name, path):
            while target and target not in MODULES and "." in target:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                graph[name].add(target)
    return graph


def _layer(module: str) -> str:
    return module.split(".")[0]


def test_the_four_packages_are_found():
    assert {"vae.model", "vae.fast", "tracking", "tuning.sweep", "pipelines.training"} <= set(MODULES)


def test_no_module_imports_a_higher_layer():
    upward = sorted(f"{a} -> {b}" for a, targets in _edges().items() for b in targets
                    if LAYERS[_layer(b)] > LAYERS[_layer(a)])
    assert upward == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_layer_imports_no_package_of_the_layers_above(package):
    bad = sorted(f"{name}:{line} imports {target}" for name, path in MODULES.items()
                 if _layer(name) == package and name not in FLOW_MODULES
                 for target, line in _imports(name, path) if target.split(".")[0] in FORBIDDEN[package])
    assert bad == []


def test_the_module_graph_has_no_cycle():
    graph, index, low, stack, on_stack, cycles = _edges(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == []


def test_the_entry_points_start_without_torchvision():
    """Importing torchvision costs a process ~2 s (it loads ``torch._dynamo``; 3.7 s beside MLflow and
    Prefect): the library parses the IDX files and draws image grids itself, and only a download of
    missing data imports it."""
    modules = "vae.train, vae.evaluate, vae.sample, pipelines.training, pipelines.retraining, tuning.flow"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
