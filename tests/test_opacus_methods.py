"""Opacus for the method layers: MOS adapter sets and SEMA mixtures (with their routers).

Every trainable parameter of a ``MOSAdapterLayer`` (bank down/up weights, up biases) and of a
``SEMALayer`` (bank, router columns and biases) must get an exact per-sample gradient under
``GradSampleModule``: equal to the gradient of that one sample's loss alone.

Tolerances (fp32: the kernel layer takes no float64): the reference is autograd through the
kernels' matmuls, the grad samplers are einsums over the same values summed in another order,
so the two differ by rounding only. The per-sample gradients here are at most ~0.6 in size and
sums of at most T * D = 30 products; the largest difference seen (reference and interpreted
Triton backends) is 3e-8 absolute, so atol = 1e-6 (~30x that) with rtol = 1e-5 (~100 fp32 ulps).
A wrong mask, a missing scale or another sample's rows is off by the gradient's own size.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptsim.strategies.mos_adapters import MOSAdapterLayer
from adaptsim.strategies.sema_modules import SEMALayer

opacus = pytest.importorskip("opacus")
# the data input of a layer does not require grad, so torch notes that the hook sees outputs only
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

TOL = dict(rtol=1e-5, atol=1e-6)


class Net(nn.Module):
    """A method layer on the residual stream of (B, T, D) tokens, then a mean-pooled head."""

    def __init__(self, layer: nn.Module, dim: int = 6) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(dim, 3)

    def forward(self, h: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        if ids is not None:  # MOS batched retrieval: each sample's own adapter set
            self.layer.route(ids)
        return self.head((h + self.layer(h)).mean(1))


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _one_sample_grads(model, x, y, *extra, seed: int | None = None) -> dict[str, torch.Tensor]:
    """Reference: the gradient of each sample's loss alone, sample by sample.

    ``seed=None``: a forward of that sample only. With a seed (dropout): the whole batch is
    forwarded under that seed (the same dropout mask as the batched run) and only sample i's
    loss is differentiated.
    """
    params = _trainable(model)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    for i in range(x.shape[0]):
        if seed is None:
            logits = model(x[i:i + 1], *(e[i:i + 1] for e in extra))
        else:
            torch.manual_seed(seed)
            logits = model(x, *extra)[i:i + 1]
        loss = nn.functional.cross_entropy(logits, y[i:i + 1], reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, grads):
            out[n].append(torch.zeros_like(params[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


def _check(model, x, y, *extra, seed: int | None = None, expect: set[str]) -> None:
    """Per-sample gradients from GradSampleModule == one sample at a time, for exactly ``expect``."""
    from opacus import GradSampleModule

    want = _one_sample_grads(model, x, y, *extra, seed=seed)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        if seed is not None:
            torch.manual_seed(seed)
        nn.functional.cross_entropy(gsm(x, *extra), y, reduction="sum").backward()
        got = {n for n, p in model.named_parameters() if getattr(p, "grad_sample", None) is not None}
        assert got == expect
        for n in expect:
            torch.testing.assert_close(model.get_parameter(n).grad_sample, want[n], **TOL, msg=n)
        assert any(want[n].abs().sum() > 0 for n in expect if "layer" in n)  # not a trivial check
    finally:
        gsm._close()


# -- MOS -----------------------------------------------------------------------------------------
def _mos(dropout: float, backend: str) -> MOSAdapterLayer:
    """Three adapter sets with non-zero weights; t0 frozen (stored), t1 and t2 trainable."""
    torch.manual_seed(0)
    layer = MOSAdapterLayer(6, 3, scale=0.5, dropout=dropout)
    layer.bank.backend = backend
    for n in ("t0", "t1", "t2"):
        layer.add(n)
        with torch.no_grad():
            for p in layer.params(n):
                p.normal_()
    layer.freeze("t0")
    return layer


MOS_TRAINABLE = {f"layer.{k}" for k in ("bank.mos_A.t1", "bank.mos_B.t1", "up_bias.t1", "bank.mos_A.t2",
                                         "bank.mos_B.t2", "up_bias.t2")} | {"head.weight", "head.bias"}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("route,dropout", [("t1", 0.0), ("t1", 0.3), ("ids", 0.0)],
                         ids=["one_set", "one_set_dropout", "per_sample_ids"])
def test_mos_layer_grad_samples(route, dropout, backend):
    """MOS training (one set, dropout) and batched retrieval (ids): every trainable parameter."""
    from adaptsim.kernels import triton_kernels as tk

    if backend == "triton" and not (tk.HAS_TRITON and (tk.interpreting() or torch.cuda.is_available())):
        pytest.skip("needs Triton (interpreter on CPU)")
    model = Net(_mos(dropout, backend)).train()
    x, y = torch.randn(4, 5, 6), torch.tensor([0, 1, 2, 0])
    extra = ()
    if route == "t1":  # one set for the batch: t2 is trainable but unused, its gradient is zero
        model.layer.route("t1")
    else:
        extra = (torch.tensor([2, 0, 1, 2]),)
    _check(model, x, y, *extra, seed=7 if dropout else None, expect=MOS_TRAINABLE)


def test_mos_dropout_really_masks():
    """The dropout run differs from the no-dropout run (the seeded reference is not vacuous)."""
    model = Net(_mos(0.3, "reference")).train()
    model.layer.route("t1")
    x = torch.randn(4, 5, 6)
    torch.manual_seed(7)
    a = model(x)
    model.layer.dropout = 0.0
    assert not torch.allclose(a, model(x))


# -- SEMA ----------------------------------------------------------------------------------------
def _sema(router_fix: bool) -> SEMALayer:
    """Two mixture adapters: a0 (adapter, router column, RD) frozen, a1 newly added, trainable."""
    torch.manual_seed(0)
    layer = SEMALayer(6, 3, rd_dim=4, buffer_size=16)
    with torch.no_grad():
        for p in layer.bank.parameters():
            p.normal_()
    layer.rds[0].buffer.add(torch.rand(8))  # a trained RD: its z-scores enter the logits
    layer.freeze_all()
    layer.add_adapter()
    with torch.no_grad():
        layer.bank.sema_B.a1.normal_()  # B is zero at init; make the new adapter's output visible
    layer.rd_route_weight = 1.0 if router_fix else 0.0
    return layer


@pytest.mark.parametrize("router_fix", [False, True], ids=["official_router", "router_fix"])
def test_sema_layer_grad_samples(router_fix):
    """SEMA's functional phase: the new adapter and its router column and bias, plus the head.

    The new RD is trainable too but only runs under ``no_grad`` here (it is trained in its own
    phase on its own loss), so it has no per-sample gradient, as it has no gradient.
    """
    model = Net(_sema(router_fix)).train()
    x, y = torch.randn(4, 5, 6), torch.tensor([0, 1, 2, 0])
    expect = {"layer.bank.sema_A.a1", "layer.bank.sema_B.a1", "layer.router_w.1", "layer.router_b.1",
              "head.weight", "head.bias"}
    _check(model, x, y, expect=expect)
    assert model.layer.rds[1].encoder.weight.requires_grad  # trainable, yet no grad sample


def test_sema_router_grad_samples_all_columns_trainable():
    """Every router column and bias trainable (the RowParams/BiasParams slices beyond the first)."""
    model = Net(_sema(False)).train()
    for p in [*model.layer.router_w, *model.layer.router_b]:
        p.requires_grad_(True)
    x, y = torch.randn(3, 5, 6), torch.tensor([2, 1, 0])
    expect = {"layer.bank.sema_A.a1", "layer.bank.sema_B.a1", "layer.router_w.0", "layer.router_w.1",
              "layer.router_b.0", "layer.router_b.1", "head.weight", "head.bias"}
    _check(model, x, y, expect=expect)


# -- DP-SGD end to end ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mos", "sema"])
def test_privacy_engine_steps_method_layers(kind):
    """make_private + one clipped, noised step: every optimised parameter has a grad sample."""
    from opacus import PrivacyEngine

    layer = _mos(0.1, "reference") if kind == "mos" else _sema(True)
    if kind == "mos":
        layer.route("t1")
    model = Net(layer).train()
    x, y = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    # the training phase's optimiser (SEMA's functional phase: the new RD is trained apart)
    params = [p for n, p in model.named_parameters() if p.requires_grad and ".rds." not in n]
    opt = torch.optim.SGD(params, lr=0.5)
    gen = torch.Generator().manual_seed(0)
    private, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=0.5, max_grad_norm=1.0,
        grad_sample_mode="hooks", noise_generator=gen)
    before = [p.detach().clone() for p in params]
    for xb, yb in loader:
        if len(yb) == 0:
            continue
        opt.zero_grad()
        nn.functional.cross_entropy(private(xb), yb).backward()
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
