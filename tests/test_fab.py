"""The Flower app bundle: ``flwr build`` ships adaptsim's code, and the app runs from it.

Also the app's run config: ``[tool.flwr.app.config]`` must equal what the experiment dataclasses
generate (:mod:`adaptsim.federated.app_config`), so pyproject and the code cannot disagree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cl", "strategies", "federated", "kernels")


@pytest.fixture(scope="module")
def fab(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fab")
    res = subprocess.run([shutil.which("flwr") or "flwr", "build", "--app", str(REPO)], cwd=out,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    (path,) = out.glob("*.fab")
    return path


def test_fab_holds_every_source_module(fab):
    names = set(zipfile.ZipFile(fab).namelist())
    tracked = subprocess.run(["git", "ls-files", *PACKAGES], cwd=REPO, capture_output=True, text=True).stdout.split()
    modules = [p for p in tracked if p.endswith(".py")]
    assert modules and "federated/server_app.py" in modules
    missing = [p for p in modules if p not in names]
    assert not missing, f"the FAB lacks {missing}"
    assert "pyproject.toml" in names


def test_app_loads_from_the_fab_own_code(fab, tmp_path):
    """Unpack as Flower does, load both components with Flower's loader, in a fresh interpreter
    whose working directory is elsewhere: every adaptsim module comes from the unpacked FAB."""
    app_dir = tmp_path / "app"
    zipfile.ZipFile(fab).extractall(app_dir)
    probe = (
        "import json, sys\n"
        "from flwr.supercore.object_ref import load_app\n"
        f"d = {str(app_dir)!r}\n"
        "import tomllib, pathlib\n"
        "comp = tomllib.loads(pathlib.Path(d, 'pyproject.toml').read_text())['tool']['flwr']['app']['components']\n"
        "s = load_app(comp['serverapp'], ValueError, d)\n"
        "c = load_app(comp['clientapp'], ValueError, d)\n"
        "files = {k: getattr(m, '__file__', None) for k, m in sys.modules.items() if k.startswith('adaptsim.')}\n"
        "print(json.dumps({'server': type(s).__name__, 'client': type(c).__name__, 'files': files}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out["server"], out["client"]) == ("ServerApp", "ClientApp")
    files = {k: v for k, v in out["files"].items() if v}
    assert "adaptsim.federated.client_app" in files and "adaptsim.cl.config" in files
    outside = {k: v for k, v in files.items() if not Path(v).resolve().is_relative_to(app_dir.resolve())}
    assert not outside, f"modules loaded from outside the FAB: {outside}"


def test_pyproject_app_config_equals_the_dataclass_defaults():
    from adaptsim.federated.app_config import check_pyproject

    assert check_pyproject() == []


def test_app_config_check_catches_a_drift(tmp_path):
    from adaptsim.federated.app_config import check_pyproject, write_pyproject

    text = (REPO / "pyproject.toml").read_text()
    drifted = tmp_path / "pyproject.toml"
    drifted.write_text(text.replace("federated.rank = 8", "federated.rank = 4"))
    assert check_pyproject(drifted) == ["federated.rank: pyproject has 4, dataclasses give 8"]
    write_pyproject(drifted)
    assert check_pyproject(drifted) == [] and drifted.read_text() == text


def test_run_id_comes_from_flwr_run_json_reply():
    from adaptsim.federated.deploy import _json_run_id

    reply = 'Loading project configuration...\n{"success": true, "run-id": "4711", "federation-id": ""}\n'
    assert _json_run_id(reply) == "4711"
    assert _json_run_id('{\n  "success": true,\n  "run-id": "9",\n  "fab-id": "adaptsim/adaptsim"\n}\n') == "9"
    assert _json_run_id('{"success": false, "error-message": "no SuperLink"}') is None
    assert _json_run_id("Successfully started run 12") is None  # log text is not scraped
