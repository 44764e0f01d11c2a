"""The package tree shows the processes: dependencies point down, and no import runs in a circle.

Read from the source with `ast` (every import, lazy ones inside functions included, except
those under `if TYPE_CHECKING:`), so a layering slip fails here before anyone trips over it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pdserve", "gateway", "tokenizer_svc", "scheduler_svc", "gpu_worker", "protocol")
# What each package may import from the project besides itself; `pdserve` assembles everything.
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "gateway": {"protocol"},
    "tokenizer_svc": {"protocol"},
    "scheduler_svc": {"protocol"},
    "gpu_worker": {"protocol"},
    "pdserve": set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules `path` imports (a `from pkg import name` counts pkg.name when that is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imported_modules(path, known) - {name} for name, path in modules.items()}


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, targets in sorted(import_graph().items()):
        package = module.split(".")[0]
        for target in sorted(targets):
            target_package = target.split(".")[0]
            if target_package != package and target_package not in ALLOWED[package]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_circle() -> None:
    graph = import_graph()
    # A package's __init__ is imported with each of its modules; that edge is not a circle.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    cycles = _strongly_connected(edges)
    assert [sorted(c) for c in cycles if len(c) > 1] == []


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def test_the_layer_check_sees_a_violation(tmp_path: Path) -> None:
    """The checker itself: a lazy import inside a function counts, a TYPE_CHECKING one does not."""
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gpu_worker.runner\n"
                      "def f():\n    from gpu_worker import model\n")
    assert imported_modules(source, {"gpu_worker", "gpu_worker.runner", "gpu_worker.model"}) == {
        "gpu_worker", "gpu_worker.model"}
    assert _strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [{"a", "b"}, {"c"}]


def test_pdserve_help_does_not_import_torch() -> None:
    code = "import sys; from pdserve.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("stage", ["tokenizer", "detokenizer"])
def test_tokenizer_stages_load_no_torch(stage: str, smollm2_dir: Path, tmp_path: Path) -> None:
    """The stage command's own start-up (its imports and the model's tokenizer) in a fresh
    process: torch is never loaded (its `sys.modules` entry is the None that blocks it)."""
    code = f"""
import sys
from pathlib import Path
from pdserve.stage_commands import _stage_main, load_settings
from protocol.endpoints import Endpoints
_stage_main({stage!r}, load_settings({stage!r}, None), Endpoints.ipc(Path({str(tmp_path)!r})))
from protocol.model_files.model_source import resolve_model
from tokenizer_svc.tokenizer import Tokenizer
tok = Tokenizer.from_dir(resolve_model({str(smollm2_dir)!r}, Path({str(tmp_path)!r}), need_weights=False))
tok.decode(tok.apply_chat_template([{{"role": "user", "content": "hi"}}]))
print(sys.modules.get("torch") is None, "transformers" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
