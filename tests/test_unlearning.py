"""The continual-unlearning runner: strict config, run folder, exact-unlearning baseline, entry."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from adaptsim.cl.config import ConfigError
from adaptsim.cl.data import DatasetConfig, load_dataset
from adaptsim.cl.unlearning import run_unlearning, split_request, unlearning_from_raw

TINY = {"name": "tiny_vit", "img_size": 8, "tiny_patch": 8, "tiny_dim": 64, "tiny_depth": 2, "tiny_heads": 2}


def _raw(tmp_path, method: str = "retrain", **method_kw) -> dict:
    return {
        "unlearning": {"dataset": {"name": "digits", "train_per_class": 40, "test_per_class": 20},
                       "requests": [[0], [1]]},
        "method": {"name": method, "epochs": 2, "lr": 3e-3, "head_epochs": 30,
                   "detector": {"layers": [-1], "epochs": 0}, **method_kw},
        "backbone": dict(TINY),
        "train": {"device": "cpu", "num_threads": 1, "progress": False},
        "run": {"out_dir": str(tmp_path), "name": f"run_{method}"},
    }


@pytest.mark.parametrize("section,key", [("<top level>", "methd"), ("unlearning", "request"),
                                         ("method", "orth_wieght"), ("method.detector", "layer")],
                         ids=["top", "unlearning", "method", "detector"])
def test_unknown_keys_raise_with_section(tmp_path, section, key):
    raw = _raw(tmp_path)
    nodes = {"<top level>": raw, "method.detector": raw["method"]["detector"]}
    node = nodes.get(section) or raw[section]
    node[key] = 1
    with pytest.raises(ConfigError, match=f"unknown key '{key}' in section '{section}'"):
        unlearning_from_raw(raw)


@pytest.mark.parametrize("requests,match", [([[0], [0, 1]], "disjoint"), ([], "non-empty"), ([[0], [-1]], "negative")],
                         ids=["overlap", "empty", "negative"])
def test_bad_requests_raise(tmp_path, requests, match):
    raw = _raw(tmp_path)
    raw["unlearning"]["requests"] = requests
    with pytest.raises(ConfigError, match=match):
        unlearning_from_raw(raw)


def test_more_requests_than_detector_blocks_raise(tmp_path):
    raw = _raw(tmp_path, method="o3", max_requests=1)
    with pytest.raises(ConfigError, match="max_requests"):
        unlearning_from_raw(raw)


def test_class_outside_dataset_raises(tmp_path):
    raw = _raw(tmp_path)
    raw["unlearning"]["requests"] = [[0], [12]]
    with pytest.raises(ConfigError, match="12"):
        run_unlearning(unlearning_from_raw(raw))


def test_split_request():
    train = load_dataset(DatasetConfig(name="digits", train_per_class=5))[0]
    inside, outside = split_request(train, {3, 7})
    assert set(inside.y.tolist()) == {3, 7} and len(inside) == 10
    assert not {3, 7} & set(outside.y.tolist()) and len(outside) == len(train) - 10


def test_retrain_run_writes_folder_and_forgets_exactly(tmp_path):
    torch.manual_seed(0)
    result = run_unlearning(unlearning_from_raw(_raw(tmp_path)))
    run_dir = result.run_dir
    assert (run_dir / "config.yaml").is_file() and (run_dir / "unlearning_curve.png").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    rows = metrics["rows"]
    assert [r["requests_done"] for r in rows] == [0, 1, 2] and len(metrics["train_seconds"]) == 3
    orig = rows[0]["request_test_acc"]
    assert min(orig) > 0.7  # both digits were recognised before any request
    final = rows[-1]
    # retraining on the retained data never predicts a forgotten class
    assert final["forget_test_acc"] < 0.05 and final["forget_train_acc"] < 0.05
    assert final["retained_test_acc"] >= rows[0]["retained_test_acc"] - 0.05
    assert rows[1]["request_test_acc"][1] > 0.7  # request 2 not yet processed after request 1
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["name"] == "retrain"


def test_entry_dispatches_unlearning_yaml(tmp_path, capsys):
    from adaptsim.cl.cli import main

    path = tmp_path / "unlearn.yaml"
    raw = _raw(tmp_path, method="random_labels")
    raw["unlearning"]["requests"] = [[0]]
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--method.epochs=1"]) == 0
    run_dir = tmp_path / "run_random_labels"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "random_labels" and len(metrics["rows"]) == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["method"]["epochs"] == 1
    assert str(run_dir) in capsys.readouterr().out


@pytest.fixture(scope="module")
def o3_run(tmp_path_factory):
    """A two-request O3 run on the tiny stream (detector LoRAs trained one epoch)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("o3run")
    raw = _raw(tmp, method="o3", max_requests=2)
    raw["method"]["detector"] = {"layers": [-2, -1], "epochs": 1}
    raw["unlearning"]["utility_per_class"] = 15
    return raw, run_unlearning(unlearning_from_raw(raw))


def test_o3_run_reports_forget_quality_fpr_histograms_utility(o3_run):
    raw, result = o3_run
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    rows, final = metrics["rows"], metrics["final"]
    assert rows[0]["forget_quality"] is None and rows[0]["detector_fpr"] == []  # nothing forgotten yet
    assert 0.0 <= final["forget_quality"] <= 1.0 and 0.0 <= final["forget_ks"] <= 1.0
    assert len(final["detector_fpr"]) == 2 and all(0.0 <= v <= 1.0 for v in final["detector_fpr"])
    n_retained = 8 * raw["unlearning"]["dataset"]["test_per_class"]  # digits 2..9
    assert [sum(h) for h in final["detector_weight_hist"]] == [n_retained, n_retained]
    assert sum(final["retained_weight_hist"]) == n_retained
    assert len(metrics["weight_hist_edges"]) == len(final["retained_weight_hist"]) + 1
    assert final["utility_acc"] > 0.5  # 10 digit classes on features of the unlearned model
    moved = [s["detector_adapter_rel_change"] for s in metrics["train_stats"][1:]]
    assert len(moved) == 2 and all(v > 0 for v in moved)
    summary = json.loads((result.run_dir / "status.json").read_text())["summary"]
    assert {"forget_quality", "utility_acc", "detector_fpr_mean"} <= set(summary)


def test_forget_quality_matches_scipy_and_retrain_is_close_to_reference(tmp_path):
    from scipy.stats import ks_2samp

    from adaptsim.cl.unlearning_metrics import forget_quality

    a, b = torch.rand(50, generator=torch.Generator().manual_seed(0)), torch.rand(40)
    ref = ks_2samp(a.numpy().astype("float64"), b.numpy().astype("float64"))
    assert forget_quality(a, b) == {"forget_quality": pytest.approx(ref.pvalue), "forget_ks": pytest.approx(ref.statistic)}
    torch.manual_seed(0)
    retrain = run_unlearning(unlearning_from_raw(_raw(tmp_path)))
    ga_raw = _raw(tmp_path, method="gradient_ascent")
    ga = run_unlearning(unlearning_from_raw(ga_raw))
    q_re = retrain.metrics["final"]["forget_quality"]
    q_ga = ga.metrics["final"]["forget_quality"]
    # exact unlearning is the reference (same data, same seed); gradient ascent is not
    assert q_re == pytest.approx(1.0) and q_ga < 0.05


def test_resume_equals_uninterrupted(o3_run, tmp_path):
    from adaptsim.cl import engine

    raw, full = o3_run
    raw = {**raw, "run": {"out_dir": str(tmp_path), "name": "resumed"}}
    cfg = unlearning_from_raw(raw)
    part = engine.run_config(cfg, kind="unlearning", stop_after=1)
    assert not part.finished and (part.run_dir / "checkpoints" / "after_request1.pt").is_file()
    done = engine.resume_run(part.run_dir)
    a = json.loads((full.run_dir / "metrics.json").read_text())
    b = json.loads((done.run_dir / "metrics.json").read_text())
    assert a["rows"] == b["rows"]
    drop = lambda stats: [{k: v for k, v in s.items() if k != "seconds"} for s in stats]  # noqa: E731
    assert drop(a["train_stats"]) == drop(b["train_stats"])


def test_utility_none_skips_probe(tmp_path):
    raw = _raw(tmp_path)
    raw["unlearning"].update(requests=[[0]], utility="none")
    final = run_unlearning(unlearning_from_raw(raw)).metrics["final"]
    assert "utility_acc" not in final and "forget_quality" in final


def test_scenario_has_five_requests_full_data_56px():
    from adaptsim.cl.unlearning import load_unlearning

    cfg = load_unlearning("scenarios/unlearn_mnist_o3.yaml")
    assert len(cfg.unlearning.requests) == 5 and cfg.backbone.img_size == 56
    assert cfg.unlearning.dataset.train_per_class is None  # detectors see every request image
