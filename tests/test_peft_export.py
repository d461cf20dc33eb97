"""export-peft: a trained federated LoRA / FFA-LoRA model as a PEFT adapter with identical outputs."""

from __future__ import annotations

import json

import pytest
import torch

from _fed_common import TINY, _one_thread  # noqa: F401  (autouse fixture)

peft = pytest.importorskip("peft")


def _raw(tmp_path, **fed):
    base = {"method": "ffa_lora", "num_clients": 2, "clients_per_round": 2, "rounds": 1, "lr": 0.5,
            "batch_size": 32, "partition": "iid"}
    return {"scenario": {"dataset": {"name": "digits", "train_per_class": 8, "test_per_class": 4}},
            "backbone": TINY, "federated": {**base, **fed},
            "run": {"out_dir": str(tmp_path), "name": "run", "plots": False}}


def _trained_model(targets=("q", "v")):
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.task import build_model

    cfg = load_fed_experiment(_raw("/tmp", method="lora", targets=list(targets), rank=3, alpha=6.0))
    model = build_model(cfg).cpu().eval()
    torch.manual_seed(1)
    with torch.no_grad():  # as if trained: non-zero B and a moved head
        for n, p in model.named_parameters():
            if "lora_B" in n or n.startswith("head."):
                p.add_(0.3 * torch.randn_like(p))
    return model


def _peft_logits(adapter_dir, model, x):
    from adaptsim.federated.peft_export import peft_base_model

    base = peft_base_model(model)
    torch.nn.init.zeros_(base.head.weight)  # the head's values must come from the adapter
    pm = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    return pm(model.backbone.preprocess(x))


@pytest.mark.parametrize("targets", [("q", "v"), ("k",)], ids=["qv", "k"])
def test_peft_loads_the_adapter_with_identical_outputs(tmp_path, targets):
    from adaptsim.federated.peft_export import peft_base_model, to_peft

    model = _trained_model(targets)
    out = to_peft(model, tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 3 * len(targets) and conf["lora_alpha"] == 6.0 * len(targets)
    assert sorted(conf["target_modules"]) == sorted(model.qkv_names)
    x = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        ours, theirs = model(x), _peft_logits(out, model, x)
        plain = peft_base_model(model)(model.backbone.preprocess(x))  # same head, no LoRA
    assert ours.shape == theirs.shape == (5, model.head.out_features)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter matters


def test_export_peft_from_a_run_folder_and_cli_errors(tmp_path, capsys):
    from adaptsim.federated.peft_export import export_peft, main
    from adaptsim.federated.runner import run_from_raw

    res = run_from_raw(_raw(tmp_path), source="t.yaml")
    out = export_peft(res.run_dir)
    assert (out / "adapter_model.safetensors").is_file() and out.parent == res.run_dir
    from adaptsim.cl.cli import main as adaptsim_main

    assert adaptsim_main(["export-peft", str(res.run_dir), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
