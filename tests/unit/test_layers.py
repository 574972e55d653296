"""ctray's packages form layers without cycles: a small AST walk over every import, function-level
and TYPE_CHECKING ones included (an import inside a function is still a dependency; a type-only
one still ties the modules' designs together), against the layers the README documents."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "ctray"


def readme_layers() -> list[tuple[str, set[str]]]:
    """The README's "Layers" list: `N. name: unit unit ...`, bottom first."""
    text = (REPO / "README.md").read_text()
    block = text.split("Layers, bottom to top", 1)[1].split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        m = re.match(r"\s*\d+\.\s+([\w /-]+):\s+(.+)$", line)
        if m:
            layers.append((m.group(1).strip(), set(m.group(2).split())))
    return layers


def unit_of(module: str) -> str:
    """ctray.train.loop -> "train"; ctray.errors -> "errors"; ctray -> "ctray" (the package's façade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ctray"


def module_name(path: Path) -> str:
    """ctray/train/loop.py -> ctray.train.loop; ctray/data/__init__.py -> ctray.data."""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int]]:
    """(ctray module imported, line) for every import in a file, wherever it sits."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base == "ctray" or node.module is None:  # `from ctray import dist`, `from . import text`: modules
                found += [(f"{base}.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((base, node.lineno))
    return [(name, line) for name, line in found if name == "ctray" or name.startswith("ctray.")]


def edges() -> dict[tuple[str, str], list[str]]:
    """(importing unit, imported unit) -> where ("ctray/x.py:12 imports ctray.y")."""
    out: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel == Path("ctray/__init__.py"):
            continue  # the façade: ctray.load_encoder re-exports from the top on purpose
        src = unit_of(module_name(path))
        for name, line in imports(path):
            dst = unit_of(name)
            if name in ("ctray", "ctray.__version__"):
                dst = "ctray"
            if dst != src:
                out.setdefault((src, dst), []).append(f"{rel}:{line} imports {name}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_has_a_documented_layer():
    documented = set().union(*(units for _, units in readme_layers()))
    present = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    present.discard("jobs")  # package data (links to jobs/*.yaml), no code
    assert present - documented == set(), "add these to the README's layers"
    assert documented - present == set(), "the README names units that do not exist"


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        graph.setdefault(src, set()).add(dst)
    assert cycles(graph) == []


def test_no_import_runs_up_the_layers():
    level = {unit: i for i, (_, units) in enumerate(readme_layers()) for unit in units}
    upward = [
        f"{src} (layer {level[src] + 1}) -> {dst} (layer {level[dst] + 1}): {where[0]}"
        for (src, dst), where in sorted(edges().items())
        if level[dst] > level[src]
    ]
    assert upward == []


def test_the_walk_sees_function_level_and_type_only_imports(tmp_path):
    """The check could only pass by missing imports: it must see the hidden kinds."""
    f = tmp_path / "ctray" / "data" / "x.py"
    f.parent.mkdir(parents=True)
    f.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from ctray.train.config import PretrainConfig\n"
        "def f():\n    from ctray.export import load_encoder\n    from . import text\n"
    )
    global REPO
    saved, REPO = REPO, tmp_path
    try:
        assert [n for n, _ in imports(f)] == ["ctray.train.config", "ctray.export", "ctray.data.text"]
    finally:
        REPO = saved
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_recipe_configs_and_samplers_load_without_torch():
    """Config validation, `ctray --help` and Ray Data's sampler processes import these: torch would
    cost each of them seconds. Every pretrain job validates and every recipe's sampler module
    imports in a fresh interpreter that never imports torch."""
    import os
    import subprocess
    import sys

    jobs = sorted(str(p) for p in (REPO / "jobs").glob("*.yaml") if "objective:" in p.read_text())
    code = (
        "import sys\n"
        "from ctray.config import load_config\n"
        "from ctray.train.config import PretrainConfig\n"
        f"names = [load_config(PretrainConfig, p).objective.name for p in {jobs!r}]\n"
        "import ctray.objectives.ctfm.sampler, ctray.objectives.ctfm.sliding\n"
        "import ctray.objectives.totalfm.sampler, ctray.objectives.cagcl.sampler\n"
        "print(sorted(set(names)), 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "CTRAY_BUCKET": "s3://bucket"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("] ")[-1].strip() == "False", out.stdout
    assert "cagcl" in out.stdout and "ctfm_simclr" in out.stdout and "totalfm_clip" in out.stdout
