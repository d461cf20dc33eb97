"""FFA-LoRA exactness: FedAvg of B (A frozen, shared) equals the mean of the clients' ΔW = s·B_k·A;
vanilla LoRA's average of A and B does not reproduce mean(B_k A_k). A is bit-identical per seed."""

from __future__ import annotations

import numpy as np
import torch

from adaptsim.federated.aggregation import delta_w, fedavg, mean_delta_w
from adaptsim.federated.config import load_fed_experiment
from adaptsim.federated.task import (build_model, client_dataset, client_fit, get_model,
                                     initial_arrays, load_arrays)

from _fed_common import TINY, _one_thread  # noqa: E402,F401  (autouse fixture)


def _cfg(**fed):
    base = {"num_clients": 3, "clients_per_round": 3, "rounds": 2, "lr": 0.5, "head_lr": 0.1,
            "batch_size": 32, "partition": "iid"}
    return load_fed_experiment({"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY,
                                "federated": {**base, **fed}})


def _a_matrices(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_ffa_a_is_bit_identical_across_clients_and_frozen():
    cfg = _cfg(method="ffa_lora", a_seed=77)
    m1, m2 = build_model(cfg), build_model(cfg)  # two "clients", built independently
    a1, a2 = _a_matrices(m1), _a_matrices(m2)
    assert a1 and a1.keys() == a2.keys()
    for n in a1:
        assert torch.equal(a1[n], a2[n]), n
        assert not dict(m1.named_parameters())[n].requires_grad
    a3 = _a_matrices(build_model(_cfg(method="ffa_lora", a_seed=78)))
    assert not all(torch.equal(a1[n], a3[n]) for n in a1)  # the seed matters
    # the slices of one layer get different A (seed + slice index)
    names = sorted(a1)
    assert not torch.equal(a1[names[0]], a1[names[1]])
    # local training leaves A untouched
    train, _ = client_dataset(cfg, 0, 3)
    client_fit(m1, initial_arrays(cfg), train, cfg, None)
    for n, a in _a_matrices(m1).items():
        assert torch.equal(a, a1[n]), n


def _round(cfg):
    """One round from the server's initial arrays; returns [(arrays, n)] of the three clients."""
    model = get_model(cfg)
    g = initial_arrays(cfg)
    if cfg.federated.method == "lora":  # start from a non-trivial global B so A's update matters
        rng = np.random.default_rng(0)
        g = {k: (rng.normal(0, 0.05, v.shape).astype(v.dtype) if "lora_B" in k else v) for k, v in g.items()}
    out = []
    for k in range(3):
        train, _ = client_dataset(cfg, k, 3)
        arrays, n, _, _ = client_fit(model, g, train, cfg, None, client_id=k)
        out.append((arrays, n))
    return model, out


def test_ffa_fedavg_of_b_equals_mean_client_delta_w():
    cfg = _cfg(method="ffa_lora")
    model, results = _round(cfg)
    frozen = {n: p.detach().numpy() for n, p in model.named_parameters() if "lora_A" in n}
    scaling = model.scaling
    want = mean_delta_w(results, scaling, frozen)  # Σ p_k s B_k A
    agg = fedavg(results)
    got = delta_w({k: v for k, v in agg.items() if "lora_B" in k}, scaling, frozen)
    assert want.keys() == got.keys() and len(got) == 4
    spread = max(np.abs(delta_w(r, scaling, frozen)[k] - want[k]).max() for r, _ in results for k in want)
    assert spread > 1e-3  # clients really differ, so the equality below is not trivial
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)
    # and the merged model layer agrees: LoRALinear.delta_weight() of the aggregate
    load_arrays(model, agg)
    for name, layer in model.lora_layers().items():
        dw = layer.delta_weight().detach().numpy()
        for i, (start, stop) in enumerate(layer.out_slices):
            np.testing.assert_allclose(dw[start:stop], want[f"{name}.lora_B_{i}"], rtol=1e-5, atol=1e-6)


def test_vanilla_lora_fedavg_is_not_the_mean_delta_w():
    cfg = _cfg(method="lora")
    model, results = _round(cfg)
    scaling = model.scaling
    want = mean_delta_w(results, scaling)  # Σ p_k s B_k A_k
    got = delta_w(fedavg(results), scaling)  # s (Σ p_k B_k)(Σ p_k A_k)
    gap = max(np.abs(got[k] - want[k]).max() / np.abs(want[k]).max() for k in want)
    assert gap > 1e-3, f"vanilla LoRA FedAvg unexpectedly exact (relative gap {gap:.2e})"
