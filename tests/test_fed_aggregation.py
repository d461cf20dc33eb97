"""FedAvg and byte counting, with hand-computed arrays (Prepare / Execute / Assert)."""

from __future__ import annotations

import numpy as np
import pytest

from adaptsim.federated.aggregation import delta_w, fedavg, lora_pairs, mean_delta_w
from adaptsim.federated.comm import RoundTraffic, array_bytes


def test_fedavg_weighted_by_examples():
    # Prepare
    r1 = {"w": np.array([[1.0, 2.0]], np.float32), "b": np.array([0.0], np.float32)}
    r2 = {"w": np.array([[3.0, 6.0]], np.float32), "b": np.array([4.0], np.float32)}
    # Execute
    out = fedavg([(r1, 1), (r2, 3)])
    # Assert: (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5]; (0 + 12) / 4 = 3
    np.testing.assert_allclose(out["w"], [[2.5, 5.0]])
    np.testing.assert_allclose(out["b"], [3.0])
    assert out["w"].dtype == np.float32


def test_fedavg_skips_zero_weight_replies():
    r1 = {"w": np.array([2.0])}
    spent = {"w": np.array([100.0])}  # a budget-spent client returns the old model with 0 examples
    np.testing.assert_allclose(fedavg([(r1, 5), (spent, 0)])["w"], [2.0])
    with pytest.raises(ValueError, match="no reply"):
        fedavg([(spent, 0)])


def test_fedavg_rejects_mismatched_replies():
    with pytest.raises(ValueError, match="different arrays"):
        fedavg([({"a": np.zeros(2)}, 1), ({"b": np.zeros(2)}, 1)])
    with pytest.raises(ValueError, match="shape"):
        fedavg([({"a": np.zeros(2)}, 1), ({"a": np.zeros(3)}, 1)])


def test_lora_pairs_and_delta_w_hand_computed():
    names = ["x.lora_A_0", "x.lora_B_0", "x.lora_A_1", "x.lora_B_1", "head.weight", "y.lora_B"]
    assert lora_pairs(names) == [("x.lora_A_0", "x.lora_B_0"), ("x.lora_A_1", "x.lora_B_1"),
                                 ("y.lora_A", "y.lora_B")]
    A = np.array([[1.0, 0.0, 2.0]])  # (r=1, in=3)
    B = np.array([[1.0], [-1.0]])  # (out=2, r=1)
    d = delta_w({"l.lora_B": B}, 2.0, frozen={"l.lora_A": A})
    np.testing.assert_allclose(d["l.lora_B"], [[2.0, 0.0, 4.0], [-2.0, 0.0, -4.0]])
    m = mean_delta_w([({"l.lora_B": B}, 1), ({"l.lora_B": 3 * B}, 1)], 1.0, frozen={"l.lora_A": A})
    np.testing.assert_allclose(m["l.lora_B"], 2 * (B @ A))


def test_array_bytes_and_round_traffic():
    arrays = {"a": np.zeros((4, 8), np.float32), "b": np.zeros(3, np.float64)}
    assert array_bytes(arrays) == 4 * 8 * 4 + 3 * 8
    t = RoundTraffic()
    t.sent_down("0", arrays)
    t.sent_down("1", arrays)
    t.sent_up("0", {"a": arrays["a"]})
    assert t.totals() == {"bytes_up": 128, "bytes_down": 2 * 152}


TINY = {"name": "tiny_vit", "img_size": 16, "tiny_patch": 4, "tiny_dim": 32, "tiny_depth": 2, "tiny_heads": 2}


def test_ffa_sends_half_the_lora_bytes():
    """On q/v slices (square D x D blocks), FFA's adapter payload is exactly half of LoRA's."""
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.task import build_model, trainable_arrays

    model = build_model(load_fed_experiment({"scenario": {"dataset": {"name": "digits"}}, "backbone": TINY,
                                             "federated": {"method": "lora"}}))
    lora = trainable_arrays(model, "lora")
    ffa = trainable_arrays(model, "ffa_lora")
    head = {k: v for k, v in lora.items() if k.startswith("head.")}
    assert set(ffa) == {k for k in lora if "lora_A" not in k}
    assert array_bytes(lora) - array_bytes(head) == 2 * (array_bytes(ffa) - array_bytes(head))
    assert any("lora_A" in k for k in lora) and not any("lora_A" in k for k in ffa)
