"""The torchvision op-schema shim: makes torchvision-based libraries import, no-op otherwise."""

from __future__ import annotations

import subprocess
import sys

import torch

from adaptsim.cl import compat


def test_torchvision_timm_open_clip_avalanche_import_after_compat():
    code = (
        "import adaptsim.cl, torchvision, timm, open_clip, avalanche.benchmarks;"
        "import torchvision.transforms.v2 as T; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_ops_defined_after_shim():
    # After the shim, the op names resolve (either real compiled ops or our schemas).
    assert torch.ops.torchvision.nms is not None


def test_noop_when_real_ops_exist(monkeypatch):
    monkeypatch.setattr(compat, "TORCHVISION_OPS_PATCHED", False)
    monkeypatch.setattr(compat, "_real_ops_present", lambda: True)
    defined = []
    monkeypatch.setattr(torch.library, "Library", lambda *a, **k: defined.append(a))
    assert compat.ensure_torchvision_ops() is False
    assert defined == []


def test_defines_schemas_when_missing(monkeypatch):
    monkeypatch.setattr(compat, "TORCHVISION_OPS_PATCHED", False)
    monkeypatch.setattr(compat, "_real_ops_present", lambda: False)

    class FakeLib:
        def __init__(self, *a):
            self.defs = []

        def define(self, schema):
            self.defs.append(schema)

    monkeypatch.setattr(torch.library, "Library", FakeLib)
    monkeypatch.setattr(compat, "_TV_LIB", None)
    assert compat.ensure_torchvision_ops() is True
    assert [d.split("(")[0] for d in compat._TV_LIB.defs] == ["nms", "qnms"]
