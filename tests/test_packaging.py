"""Packaging: the four folders install under the adaptsim namespace, in editable and wheel form."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"cl": "adaptsim.cl", "strategies": "adaptsim.strategies", "federated": "adaptsim.federated",
           "kernels": "adaptsim.kernels"}


def _source_packages() -> set[str]:
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]) if rel.parts else name)
    return found


def test_every_source_package_is_declared():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _source_packages() == declared


def test_import_names():
    import adaptsim.cl
    import adaptsim.federated
    import adaptsim.kernels
    import adaptsim.strategies

    assert Path(adaptsim.strategies.__file__).parent == ROOT / "strategies"
    from adaptsim.strategies import SimpleCIL  # noqa: F401


@pytest.mark.slow
def test_wheel_contains_all_modules(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("adaptsim-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder, pkg in FOLDERS.items():
        for py in (ROOT / folder).rglob("*.py"):
            rel = py.relative_to(ROOT / folder)
            assert "/".join([*pkg.split("."), *rel.parts]) in names, f"{py} missing from the wheel"
    assert not any(n.startswith(("cl/", "strategies/", "kernels/", "federated/")) for n in names)
