"""fcl runs checkpoint after every experience; a run stopped after experience 1 and resumed ends
exactly where an uninterrupted one ends (R, client accuracy, round records, centralised reference,
DP epsilons)."""

from __future__ import annotations

import json

import numpy as np
import pytest

TIMING = {"client_seconds", "server_seconds"}


def _cfg(tmp_path, name, *extra):
    from adaptsim.cl import engine

    over = {"kind": "fcl", "fcl.num_clients": 3, "fcl.rounds": 2, "fcl.centralised": True, "run.out_dir": str(tmp_path),
            "run.name": name, "run.plots": False, "train.num_threads": 1}
    for e in extra:
        k, v = e.split("=", 1)
        over[k] = __import__("yaml").safe_load(v)  # typed, as the CLI parses an override
    return engine.load("scenarios/tiny_digits.yaml", over)


def _run(tmp_path, name, *extra, stop_after=None):
    from adaptsim.cl import engine

    kind, cfg = _cfg(tmp_path, name, *extra)
    return engine.run_config(cfg, kind, stop_after=stop_after)


def _records(run_dir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in json.loads((run_dir / "fcl_rounds.json").read_text())]


@pytest.mark.parametrize("extra", [
    ["strategy.name=simplecil"],
    ["strategy.name=finetune", "strategy.mode=head", "strategy.epochs=2"],
    ["strategy.name=finetune", "strategy.mode=head", "strategy.epochs=1", "fcl.dp.epsilon=8",
     "fcl.dp_feature_clip=5", "fcl.dp.reproducible=true", "fcl.centralised=false"],
], ids=["simplecil", "finetune", "finetune-dp"])
def test_resume_after_experience_1_gives_the_uninterrupted_run(tmp_path, extra):
    from adaptsim.cl import engine

    full = _run(tmp_path, "full", *extra)
    part = _run(tmp_path, "killed", *extra, stop_after=1)
    assert part.finished is False and not (part.run_dir / "metrics.json").exists()
    assert sorted(p.name for p in (part.run_dir / "checkpoints").iterdir()) == ["fcl_exp0.pt"]
    resumed = engine.resume_run(part.run_dir)
    a, b = full.metrics, resumed.metrics
    same = np.testing.assert_equal  # exact, NaN equal to NaN (the future columns of R)
    same(b["R"], a["R"])
    same(b["client_accuracy"], a["client_accuracy"])
    same(_records(resumed.run_dir), _records(full.run_dir))
    assert b["bytes_up"] == a["bytes_up"] and b["bytes_down"] == a["bytes_down"]
    if "fcl.centralised=false" not in extra:
        same(b["centralised"]["R"], a["centralised"]["R"])
    if any(e.startswith("fcl.dp.") for e in extra):
        same(b["dp"]["epsilon"], a["dp"]["epsilon"])
        same(b["dp"]["noise_multipliers"], a["dp"]["noise_multipliers"])
        assert max(b["dp"]["epsilon"]) > 0


def test_trained_parameters_after_resume_equal_the_uninterrupted_ones(tmp_path):
    import torch

    extra = ["strategy.name=finetune", "strategy.mode=head", "strategy.epochs=2", "fcl.centralised=false"]
    full = _run(tmp_path, "full", *extra)
    part = _run(tmp_path, "killed", *extra, stop_after=2)
    from adaptsim.cl import engine

    engine.resume_run(part.run_dir)
    assert sorted(p.name for p in (part.run_dir / "checkpoints").iterdir()) == ["fcl_exp2.pt"]  # only the last kept
    load = lambda rd: torch.load(rd / "checkpoints" / "fcl_exp2.pt", weights_only=True)  # noqa: E731
    a, b = load(full.run_dir), load(part.run_dir)
    for sa, sb in zip([a["server"], *a["clients"]], [b["server"], *b["clients"]]):
        for mod in sa["modules"]:
            for k, v in sa["modules"][mod].items():
                assert torch.equal(v, sb["modules"][mod][k]), (mod, k)


def test_flower_engines_refuse_resume(tmp_path):
    from adaptsim.cl import engine
    from adaptsim.cl.config import ConfigError
    from adaptsim.cl.rundir import RunDir

    kind, cfg = _cfg(tmp_path, "flwr", "fcl.engine=simulation")
    rd = RunDir.create(cfg.run.out_dir, "flwr", cfg.to_raw(), kind.name)
    with pytest.raises(ConfigError, match=r"fcl.engine=simulation: runs cannot be resumed"):
        engine.resume_run(rd.path)


def test_a_run_killed_in_its_centralised_reference_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import adaptsim.cl.evaluate as ev
    from adaptsim.cl import engine

    full = _run(tmp_path, "full")
    real, calls = ev.evaluate_stream, []

    def dies_on_the_second(*a, **k):  # the centralised reference's evaluation after its experience 1
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ev, "evaluate_stream", dies_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "killed")
    monkeypatch.setattr(ev, "evaluate_stream", real)
    ck = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["central_exp0.pt", "fcl_exp2.pt"]
    trained = []
    monkeypatch.setattr(ev, "evaluate_stream", lambda *a, **k: trained.append(1) or real(*a, **k))
    resumed = engine.resume_run(tmp_path / "killed")
    assert len(trained) == 2  # experiences 1 and 2 of the reference only
    np.testing.assert_equal(resumed.metrics["centralised"]["R"], full.metrics["centralised"]["R"])
    np.testing.assert_equal(resumed.metrics["R"], full.metrics["R"])
