"""MoRA: self-activated rank-1 experts (strategies/mora.py, strategies/mora_gate.py)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from adaptsim.cl.backbones import BackboneConfig
from adaptsim.cl.clip import create_clip
from adaptsim.cl.data import DatasetConfig
from adaptsim.cl.scenarios import ClassIncrementalArgs, build_stream
from adaptsim.cl.train import fit, seed_everything
from adaptsim.strategies import MoRA, MoRAConfig, StreamInfo
from adaptsim.strategies.mora_gate import (
    LinearSelfAttention,
    MoRALinear,
    SelfActivationGate,
    replace_clip_attention,
)

from _mora_common import synthetic_stream, tiny_vit

FAST = {"epochs": 1, "batch_size": 16, "lr": 0.01, "experts_per_task": 4, "top_k": 4, "seed": 0}


@pytest.fixture(scope="module")
def stream():
    return synthetic_stream()


def make(stream, backbone, **kw) -> MoRA:
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    return MoRA(MoRAConfig(**{**FAST, **kw}), backbone, info)


def layer_with_experts(R=12, d_in=6, d_out=5, seed=0, **gate_kw) -> MoRALinear:
    torch.manual_seed(seed)
    layer = MoRALinear(nn.Linear(d_in, d_out), SelfActivationGate(**gate_kw), scaling=2.0)
    layer.add_experts(R)
    with torch.no_grad():  # B is zero at init; make the delta visible
        layer.experts.more_B["0"].normal_()
    return layer


# -- the gate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("score,renorm", [("signed", True), ("abs", True), ("signed", False)])
def test_scores_and_output_match_hand_computation(score, renorm):
    layer = layer_with_experts(top_k=3, tau=0.5, delta=-1.0, score=score, renormalize=renorm)
    A, B = (t.detach() for t in layer.experts.stacked())
    x = torch.randn(4, 6)
    y = layer(x)
    for m in range(4):
        h = [float(sum(A[i, j] * x[m, j] for j in range(6))) for i in range(12)]  # a_i . x
        nrm = math.sqrt(sum(v * v for v in h))
        s = [(abs(v) if score == "abs" else v) / nrm for v in h]
        top = sorted(range(12), key=lambda i: -s[i])[:3]
        z = sum(math.exp(s[i] / 0.5) for i in (top if renorm else range(12)))
        w = {i: math.exp(s[i] / 0.5) / z for i in top}
        delta = sum(2.0 * w[i] * h[i] * B[:, i] for i in top)
        expect = layer.experts.base_layer(x[m]) + delta
        assert torch.allclose(y[m], expect, atol=1e-5), (m, y[m], expect)
        route = layer.gate_cfg(x[m : m + 1] @ A.t())
        assert route.indices[0].tolist() == top
        assert torch.allclose(route.weights[0], torch.tensor([w[i] for i in top]), atol=1e-6)
        assert abs(float(route.weights.sum()) - 1.0) < 1e-6 if renorm else float(route.weights.sum()) < 1


def test_topk_and_delta_select_experts_and_gradients(monkeypatch):
    import adaptsim.strategies.adapters.experts as experts_mod

    widths = []
    real = experts_mod.rank_sparse_lora
    monkeypatch.setattr(experts_mod, "rank_sparse_lora",
                        lambda x, A, B, gate=None, **kw: (widths.append(gate.indices.shape[-1]), real(x, A, B, gate=gate, **kw))[1])
    layer = layer_with_experts(R=16, top_k=2, delta=-1.0)
    x = torch.randn(3, 6)
    layer(x).sum().backward()
    assert widths == [2]  # the kernel sees k = 2 of R = 16 experts per token
    used = set(layer.gate_cfg(x @ layer.experts.stacked()[0].t()).indices.flatten().tolist())
    gA, gB = layer.experts.more_A["0"].grad, layer.experts.more_B["0"].grad
    for i in range(16):
        active = i in used
        assert (gA[i].abs().sum() > 0) == active and (gB[:, i].abs().sum() > 0) == active, i
    assert len(used) <= 6

    # the delta threshold lowers the active count below k. The route keeps the static width k
    # (cutting it to the widest token would need a host sync) and the dropped slots are inert.
    layer = layer_with_experts(R=16, top_k=8, delta=0.3)
    x = torch.randn(50, 6)
    h = layer.experts.scores_input(x)  # (50, 16)
    route = layer.gate_cfg(h)
    assert route.indices.shape == (50, 8) and route.n_active.max() < 8  # delta dropped experts
    widths.clear()
    layer(x).sum().backward()
    assert widths == [8]  # the kernel gets the static top-k list
    # kept experts are a prefix of each token's list; every other slot has weight exactly 0
    slot = torch.arange(8).expand(50, 8)
    assert torch.equal(route.weights > 0, slot < route.n_active[:, None])
    assert (route.weights[slot >= route.n_active[:, None]] == 0).all()


@pytest.mark.parametrize("renorm,norm_grad", [(True, False), (False, False), (False, True)])
def test_inactive_slots_contribute_nothing_to_outputs_and_gradients(renorm, norm_grad):
    """The static-width route gives the outputs and gradients of the route cut to its active slots."""
    grads = []
    torch.manual_seed(0)
    x0 = torch.randn(6, 6)  # active counts [2, 3, 3, 2, 0, 1] of k = 6: 8 of 16 experts kept
    for cut in (False, True):
        layer = layer_with_experts(R=16, top_k=6, delta=0.3, renormalize=renorm, norm_grad=norm_grad)
        x = x0.clone().requires_grad_(True)
        h = layer.experts.scores_input(x)
        route = layer.gate_cfg(h)
        J = int(route.n_active.max()) if cut else route.indices.shape[1]  # the old cut (test side)
        assert (J < 6) == cut
        y = layer.experts(x, topk_indices=route.indices[:, :J], topk_weights=route.weights[:, :J], pre=h)
        y.square().sum().backward()
        grads.append((y.detach(), x.grad, layer.experts.more_A["0"].grad, layer.experts.more_B["0"].grad))
        if not cut:  # an expert no token keeps gets exactly zero gradient (unless norm_grad)
            kept = set(route.indices[route.weights > 0].tolist())
            idle = [i for i in range(16) if i not in kept]
            assert idle and (layer.experts.more_B["0"].grad[:, idle] == 0).all()
            assert ((layer.experts.more_A["0"].grad[idle] == 0).all()) == (not norm_grad)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same sums, zeros added in another order


def test_no_kept_expert_gives_the_base_output_and_zero_gradient():
    layer = layer_with_experts(R=8, top_k=3, delta=0.99)  # |s| <= 1: nothing passes 0.99 in practice
    x = torch.randn(5, 6)
    assert int(layer.gate_cfg(layer.experts.scores_input(x)).n_active.sum()) == 0
    y = layer(x)
    assert torch.equal(y, layer.experts.base_layer(x))
    y.sum().backward()  # departure from the old cut: zero gradients rather than none
    assert (layer.experts.more_A["0"].grad == 0).all() and (layer.experts.more_B["0"].grad == 0).all()
    assert layer(torch.randn(2, 0, 6)).shape == (2, 0, 5)  # no tokens at all


_HOST_READS = ("item", "tolist", "numpy", "cpu", "__int__", "__float__", "__index__", "__bool__")


def _forbid_host_reads(monkeypatch, names=_HOST_READS):
    """Makes every Python-level read of a tensor's value on the host raise."""
    def make(name):
        def refuse(self, *a, **k):
            raise AssertionError(f"host sync: Tensor.{name} called in the MoRA forward")
        return refuse
    for name in names:
        monkeypatch.setattr(torch.Tensor, name, make(name))


@pytest.mark.parametrize("renorm", [True, False])
def test_gate_forward_has_no_host_sync(monkeypatch, renorm):
    """No .item()/int()/bool()/tolist() of a device tensor in the gate or the layer's forward."""
    layer = layer_with_experts(R=16, top_k=8, delta=0.3, renormalize=renorm)
    x = torch.randn(2, 7, 6, requires_grad=True)
    h = layer.experts.scores_input(x).reshape(-1, 16)
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        route = layer.gate_cfg(h)
    assert route.indices.shape == (14, 8)
    with monkeypatch.context() as m:
        # bool() stays allowed here: the kernels' index range checks run on CPU tensors only
        _forbid_host_reads(m, tuple(n for n in _HOST_READS if n != "__bool__"))
        for compute in ("gated", "dense"):
            layer.compute = compute
            layer(x).sum().backward()
    assert layer.experts.more_B["0"].grad.abs().sum() > 0


def test_norm_grad_option_controls_gradient_to_inactive_experts():
    x = torch.randn(2, 6)
    grads = {}
    for norm_grad in (False, True):
        layer = layer_with_experts(R=16, top_k=2, delta=-1.0, norm_grad=norm_grad)
        layer(x).sum().backward()
        used = set(layer.gate_cfg(x @ layer.experts.stacked()[0].t()).indices.flatten().tolist())
        unused = [i for i in range(16) if i not in used]
        grads[norm_grad] = layer.experts.more_A["0"].grad[unused].abs().sum()
    assert grads[False] == 0 and grads[True] > 0


def test_gated_and_dense_paths_agree():
    x = torch.randn(2, 5, 6, requires_grad=True)
    outs = []
    for compute in ("gated", "dense"):
        layer = layer_with_experts(R=10, top_k=3, delta=0.0)
        layer.compute = compute
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach(), layer.experts.more_A["0"].grad.clone(), x.grad.clone()))
        x.grad = None
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-5)


# -- the strategy --------------------------------------------------------------------------------
def test_three_task_stream_old_experts_frozen_and_checkpoint_round_trip(stream):
    backbone = tiny_vit()
    pristine = copy.deepcopy(backbone)
    mora = make(stream, backbone)
    layer = next(iter(mora.layers.values()))
    snapshots = []
    for t, exp in enumerate(stream):
        seed_everything(t)
        mora.train_experience(exp, fit)
        snapshots.append({k: p.detach().clone() for k, p in mora.experts.state_dict().items()})
        with torch.no_grad():
            assert (mora.predict(exp.test.x[:4]).shape == (4, stream.n_classes))
    assert layer.group_sizes() == [4, 4, 4]
    for t in range(2):  # experts of task t are bit-identical in every later snapshot
        old = {k: v for k, v in snapshots[t].items()}
        for later in snapshots[t + 1:]:
            assert all(torch.equal(later[k], v) for k, v in old.items())
    assert any(snapshots[2][k].abs().sum() > 0 for k in snapshots[2] if k.endswith("B.2"))  # new ones learnt
    m = mora.run_metrics()
    assert m["experts_per_layer"] == 12 and 0 < m["active_ranks"]["mean_per_token"] <= 4
    assert len(mora.history) == 2

    buf = io.BytesIO()
    torch.save(mora.state_dict(), buf)
    buf.seek(0)
    fresh = make(stream, pristine)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = stream[0].test.x[:8]
    assert torch.equal(fresh.predict(x), mora.predict(x))


def test_open_clip_tiny_text_classifier():
    cfg = BackboneConfig(name="open_clip_tiny", img_size=16, tiny_patch=4, tiny_dim=32, tiny_depth=2, tiny_heads=2)
    torch.manual_seed(0)
    clip = create_clip(cfg)
    clip.clip.eval()
    x = torch.randint(0, 255, (3, 1, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        before = clip.backbone(x)
        assert replace_clip_attention(copy.deepcopy(clip.backbone.model)) == 2
    # the attention swap is exact
    swapped = copy.deepcopy(clip.backbone)
    replace_clip_attention(swapped.model)
    assert isinstance(swapped.blocks[0].attn, LinearSelfAttention)
    with torch.no_grad():
        assert torch.allclose(swapped(x), before, atol=1e-5)

    stream = build_stream("class_incremental", ClassIncrementalArgs(
        dataset=DatasetConfig(name="synthetic", train_per_class=8, test_per_class=4), initial_increment=3, increment=3))
    info = StreamInfo(stream.kind, stream.n_classes, stream.class_names, len(stream))
    mora = MoRA(MoRAConfig(**FAST, head="clip_text", loss_classes="current"), clip.backbone, info, clip=clip)
    names = sorted(mora.layers)
    assert any(n.endswith("attn_qkv") for n in names) and any(n.endswith("mlp_c_fc") for n in names)
    with torch.no_grad():
        assert torch.allclose(mora.predict(x), mora.head(before), atol=1e-5)  # no experts yet: plain CLIP zero-shot
    seed_everything(0)
    mora.train_experience(stream[0], fit)
    scores = mora.predict(stream[1].test.x[:4])
    assert scores.shape == (4, 6) and torch.isfinite(scores).all()  # unseen classes stay scorable


@pytest.mark.parametrize("field,value", [("top_k", 0), ("tau", 0.0), ("delta", 2.0), ("score", "sign"),
                                         ("compute", "fast"), ("head", "proto"), ("experts_per_task", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        MoRAConfig(**{field: value})


def test_text_classifier_needs_open_clip(stream):
    with pytest.raises(ValueError, match="head"):
        make(stream, tiny_vit(), head="clip_text")


def test_layer_runs_on_the_triton_gated_kernel():
    """The Triton kernel (interpreted on CPU, compiled on CUDA) gives the reference's numbers."""
    from adaptsim.kernels import triton_kernels as tk
    from adaptsim.kernels.rank_sparse_lora import resolve_backend

    x0 = torch.randn(5, 6)
    try:
        resolve_backend("triton", x0.cuda() if torch.cuda.is_available() else x0)
    except RuntimeError as exc:  # no triton, or CPU without TRITON_INTERPRET=1
        pytest.skip(str(exc))
    assert tk.HAS_TRITON
    outs = []
    for backend in ("triton", "reference"):
        layer = layer_with_experts(R=10, top_k=3, delta=0.0)
        layer.experts.backend = backend
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        layer.to(dev)
        x = x0.to(dev).requires_grad_(True)
        y = layer(x)
        y.square().sum().backward()
        outs.append((y.detach().cpu(), layer.experts.more_A["0"].grad.cpu(), layer.experts.more_B["0"].grad.cpu()))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, atol=1e-4)
