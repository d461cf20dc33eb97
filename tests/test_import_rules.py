"""The package import rules of docs/architecture.md, checked on the source (AST), not by hand.

- ``kernels`` imports nothing of adaptsim;
- ``cl`` never imports ``federated`` (not even lazily) and never imports ``strategies`` at
  module level (the run layer looks strategies up lazily, through the registry);
- ``strategies`` imports only the foundation of ``cl`` (data, streams, backbones, features, the
  training loop, the registry, config), never its run layer (engine, runners, CLI, studies);
- ``federated`` may import everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CL_RUN_LAYER = {"engine", "runner", "cli", "experiment", "unlearning", "builtin_kinds", "runkinds",
                "rundir", "study", "report", "report_plots", "evaluate"}


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in tree.body:  # imports under a module-level `if`/`try` count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, id(node) in top))
    return out


def _files(pkg: str) -> list[Path]:
    return sorted(p for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def test_kernels_import_nothing_of_adaptsim():
    bad = [(p.name, m) for p in _files("kernels") for m, _ in _imports(p) if m.startswith("adaptsim")]
    assert not bad, bad


def test_cl_never_imports_federated_nor_strategies_at_module_level():
    bad = []
    for p in _files("cl"):
        for m, top in _imports(p):
            if m.startswith("adaptsim.federated") or (top and m.startswith("adaptsim.strategies")):
                bad.append((str(p.relative_to(ROOT)), m, "module level" if top else "lazy"))
    assert not bad, bad


def test_strategies_use_only_the_foundation_of_cl():
    bad = []
    for p in _files("strategies"):
        for m, _ in _imports(p):
            if m.startswith("adaptsim.federated"):
                bad.append((p.name, m))
            if m.startswith("adaptsim.cl.") and m.split(".")[2] in CL_RUN_LAYER:
                bad.append((p.name, m))
    assert not bad, bad
