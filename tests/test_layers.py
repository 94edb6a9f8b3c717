"""The floor plan: storage at the bottom, ``stages/`` on it, ``pipeline/`` on both, and no import circles.

Read from the source (every ``import`` statement, those inside functions too), so a lazy import cannot hide a
wrong-way dependency or a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "pipeline")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from a.b import c`` counts ``a.b.c`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES:
                found.add(name)
    found.discard(_module_name(path))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _project_modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_stages_never_import_pipeline(graph):
    wrong = {
        m: sorted(d for d in deps if d.startswith("pipeline")) for m, deps in graph.items() if m.startswith("stages")
    }
    assert not {m: d for m, d in wrong.items() if d}


def test_storage_is_the_bottom_floor(graph):
    assert graph["stages.storage.files"] == set()


def test_no_module_imports_one_that_imports_it_back(graph):
    """No circle of any length (Tarjan's strongly connected components over the import graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph.get(node, ()):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    # a package's __init__ importing its own modules is not a circle worth naming; there are none today either way
    assert circles == []


def test_the_config_does_not_import_the_ray_edges(graph):
    assert not {d for d in graph["pipeline.config"] if d.startswith("pipeline.distributed")}


def test_pipeline_top_level_is_a_few_modules_and_its_rooms():
    top = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    rooms = sorted(p.name for p in (ROOT / "pipeline").iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 8, top
    assert rooms == ["cluster", "distributed", "report"]


def test_every_project_import_in_the_bench_scripts_resolves():
    """The bench scripts run outside the suite; a module that moved must not leave them importing a ghost."""
    import importlib

    missing = []
    for script in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                module = importlib.import_module(node.module)
                missing += [f"{script.name}: {node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    assert missing == []


def test_only_the_cli_imports_the_round_loop(graph):
    """``tune``, the report, the cluster client reuse the stages and the plan, never the loop itself."""
    users = sorted(m for m, deps in graph.items() if "pipeline.rounds" in deps and m.startswith("pipeline"))
    assert users == ["pipeline.cli"]


def test_stages_is_a_few_stage_modules_and_its_rooms():
    top = sorted(p.name for p in (ROOT / "stages").glob("*.py"))
    rooms = sorted(p.name for p in (ROOT / "stages").iterdir() if (p / "__init__.py").is_file())
    assert len(top) <= 8, top
    assert rooms == ["core", "data", "maths", "models", "storage"]


def _artifact_names() -> set[str]:
    from stages.storage import layout

    return {v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str) and "." in v}


def _string_constants(tree: ast.AST):
    """Every string constant but docstrings (f-string parts included)."""
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_artifact_file_names_live_in_the_layout_module():
    """``model.safetensors``, ``metrics.json``, ``run.json``, ...: one place names them (``stages/storage/layout.py``);
    elsewhere a path is built from the layout, so two modules cannot disagree on a file's name."""
    names = _artifact_names()
    assert {"model.safetensors", "metrics.json", "run.json", "manifest.json", "config.yaml"} <= names
    found = []
    for pkg in ("stages", "pipeline", "bench"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.name == "layout.py" and path.parent.name == "storage":
                continue
            for node in _string_constants(ast.parse(path.read_text())):
                text = node.value.strip()
                if any(text == n or text.endswith("/" + n) for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    assert found == []


def test_the_command_line_starts_without_torch():
    """``python -m pipeline --help`` and ``status`` (a Ray Jobs query) load neither torch nor timm."""
    import subprocess
    import sys

    code = (
        "import sys, runpy\n"
        "sys.argv = ['pipeline', '--help']\n"
        "try:\n    runpy.run_module('pipeline', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "from pipeline.cli import build_parser\n"
        "build_parser().parse_args(['status', 'job-1'])\n"
        "import pipeline.cluster.jobs\n"
        "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
