"""O3 continual unlearning on a frozen ViT classifier, plus its baselines.

Paper: "On Large Language Model Continual Unlearning" (O3), Gao et al., ICLR 2025,
https://arxiv.org/abs/2407.10223; official code https://github.com/GCYZSL/O3-LLM-UNLEARNING.

The classifier is the frozen backbone plus a linear head trained on all classes
(:meth:`O3Unlearner.fit_original`). Each unlearning request names data to forget
(:meth:`O3Unlearner.unlearn`); ``config.name`` picks how:

* ``o3``: one unlearning LoRA continued across requests, trained with cross-entropy on the
  request's data under fixed random labels plus ``orth_weight * sum_layers sum_{i<j}
  ||A_i A_j^T||_F^2`` against the A matrices saved after each earlier request
  (:func:`orthogonal_penalty`). One OOD detector per request (:mod:`.o3_detector`). At inference
  each sample's unlearning-LoRA scale is the max soft weight over the detectors.
* ``random_labels``: the same loss without the orthogonality term and without detectors (the
  LoRA applies at scale 1 to every input).
* ``gradient_ascent``: LoRA trained to maximise cross-entropy on the request's true labels,
  capped at ``ga_ce_cap`` (the gradient stops once the mean loss exceeds it), no detectors.
* ``retrain``: exact unlearning: a fresh head trained from scratch on the retained data only.

Adapter layout (the kernel's gated multi-adapter path): every target ``nn.Linear`` gets ONE
``LoRALinear`` of rank ``rank * (1 + max_requests)``: rank block 0 is the unlearning LoRA,
block ``k + 1`` is detector ``k``'s LoRA. Every forward sets ``layer.gate`` to an
``AdapterGate(adapter_ids=slot, rank_per_adapter=rank, scale=per-sample weight)``; the
per-sample scale is the soft weight, so inference is batched (the official code runs one sample
at a time because its weight function is scalar). Inactive rank blocks get exactly zero
gradients and the phases use no weight decay, so training one block leaves the others intact.

Departures: the official base model is fully fine-tuned and unlearned with LoRA on all attention
and MLP projections; here the base is a frozen ViT with a linear head and LoRA on ``targets``.
Random labels are drawn once per request uniformly from the classes other than the true one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from adaptsim.cl.data import ImageTensorDataset
from adaptsim.cl.train import FitFn, Phase
from adaptsim.kernels import AdapterGate
from adaptsim.strategies.adapters import inject_lora
from adaptsim.strategies.o3_detector import O3Detector, O3DetectorConfig, vit_layer_features

log = logging.getLogger(__name__)

__all__ = ["METHODS", "O3Config", "O3Unlearner", "orthogonal_penalty"]

METHODS = ("o3", "random_labels", "gradient_ascent", "retrain")


@dataclass(frozen=True)
class O3Config:
    """Unlearning method settings.

    Attributes:
        name: the method, ``o3``, ``random_labels``, ``gradient_ascent`` or ``retrain``.
        rank: rank of the unlearning LoRA and of each detector LoRA.
        alpha: LoRA alpha (scaling ``alpha / rank``; official r 8, alpha 16).
        targets: backbone ``nn.Linear`` names that get LoRA.
        max_requests: detector LoRA blocks reserved up front.
        epochs: unlearning epochs per request.
        lr: unlearning learning rate.
        batch_size: unlearning batch size.
        optimizer: ``adamw`` | ``adam`` | ``sgd`` (no weight decay, see module docstring).
        orth_weight: lambda of the orthogonality penalty (official 0.1; ``o3`` only).
        ga_ce_cap: gradient ascent stops pushing once the batch cross-entropy exceeds this.
        head_epochs: epochs of the original (and retrained) linear head.
        head_lr: learning rate of the head.
        eval_batch_size: batch size of feature extraction and inference.
        detector: the OOD detector settings (``o3`` only).
    """

    name: Literal["o3", "random_labels", "gradient_ascent", "retrain"] = "o3"
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("qkv",)
    max_requests: int = 5
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    orth_weight: float = 0.1
    ga_ce_cap: float = 5.0
    head_epochs: int = 20
    head_lr: float = 0.01
    eval_batch_size: int = 128
    detector: O3DetectorConfig = field(default_factory=O3DetectorConfig)

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method.name must be one of {METHODS}, got {self.name!r}")
        for name in ("rank", "max_requests", "epochs", "batch_size", "head_epochs", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.head_lr <= 0:
            raise ValueError("lr and head_lr must be > 0")
        if self.orth_weight < 0:
            raise ValueError(f"orth_weight must be >= 0, got {self.orth_weight}")
        if self.ga_ce_cap <= 0:
            raise ValueError(f"ga_ce_cap must be > 0, got {self.ga_ce_cap}")
        if not self.targets:
            raise ValueError("targets must name at least one layer")


def orthogonal_penalty(current: list[Tensor], previous: list[list[Tensor]]) -> Tensor:
    """O3's orthogonality penalty ``sum_l sum_i ||A_i^l (A^l)^T||_F^2``.

    Args:
        current: per LoRA layer ``l`` the current down projection A^l (r, K).
        previous: per earlier request ``i``, the list of its saved A_i^l (r, K), same order.

    Returns:
        Scalar penalty (0 when there is no earlier request).
    """
    total = current[0].new_zeros(())
    for saved in previous:
        for a_prev, a_cur in zip(saved, current):
            total = total + (a_prev @ a_cur.T).pow(2).sum()  # ||(r, r)||_F^2
    return total


class O3Unlearner(nn.Module):
    """A frozen-ViT classifier that receives a sequence of unlearning requests."""

    def __init__(self, config: O3Config, backbone, n_classes: int, *, device: torch.device | str = "cpu",
                 seed: int = 0) -> None:
        super().__init__()
        self.config, self.n_classes = config, n_classes
        self.device = torch.device(device)
        self.backbone = backbone
        r, slots = config.rank, 1 + config.max_requests
        # LoRALinear scales by alpha / total_rank; pass alpha * slots so each block gets alpha / r.
        layers = inject_lora(backbone.model, list(config.targets), r * slots, config.alpha * slots,
                             seed=seed)
        self.lora = nn.ModuleDict({k.replace(".", "_"): v for k, v in layers.items()}).to(self.device)
        self.head = nn.Linear(backbone.embed_dim, n_classes).to(self.device)
        self.detectors: list[O3Detector] = []
        self.saved_A: list[list[Tensor]] = []  # per finished request: per layer (r, K)
        self.forgotten: list[int] = []
        self.n_requests = 0
        self.seed = seed
        self._set_gate(0, 0.0)  # stray forwards see the frozen base model

    # ----------------------------------------------------------------------------- adapters
    def _set_gate(self, slot: int, scale: Tensor | float) -> None:
        r = self.config.rank

        def gate(x: Tensor) -> AdapterGate:
            lead = x.shape[:-1]  # (B, T)
            if isinstance(scale, Tensor):
                s = scale.to(x.device, x.dtype).view(-1, *([1] * (len(lead) - 1))).expand(lead)
            else:
                s = x.new_full(lead, float(scale))
            return AdapterGate(adapter_ids=torch.full(lead, slot, dtype=torch.long, device=x.device),
                               rank_per_adapter=r, scale=s)

        for layer in self.lora.values():
            layer.gate = gate

    @contextlib.contextmanager
    def adapter(self, slot: int, scale: Tensor | float) -> Iterator[None]:
        """Within the block, LoRA block ``slot`` is active with per-sample ``scale`` (B,) or a float."""
        self._set_gate(slot, scale)
        try:
            yield
        finally:
            self._set_gate(0, 0.0)

    def unlearn_A(self) -> list[Tensor]:
        """Per LoRA layer, the unlearning block of A (r, K) (a view: differentiable)."""
        r = self.config.rank
        return [A[:r] for layer in self.lora.values() for A, _, _ in layer.pairs()]

    def lora_params(self) -> list[nn.Parameter]:
        return [p for layer in self.lora.values() for A, B, _ in layer.pairs() for p in (A, B)]

    def encode(self, x: Tensor, slot: int, scale: Tensor | float) -> tuple[Tensor, list[Tensor]]:
        """Pooled features (B, D) and detector-layer token means with block ``slot`` at ``scale``."""
        with self.adapter(slot, scale):
            return vit_layer_features(self.backbone, x.to(self.device), self.config.detector.layers)

    @torch.no_grad()
    def _batched(self, x: Tensor, slot: int, scale: float) -> tuple[Tensor, list[Tensor]]:
        bs = self.config.eval_batch_size
        outs = [self.encode(x[i:i + bs], slot, scale) for i in range(0, len(x), bs)]
        return torch.cat([o[0] for o in outs]), [torch.cat(f) for f in zip(*[o[1] for o in outs])]

    # ----------------------------------------------------------------------------- training
    def _fit_head(self, ds: ImageTensorDataset, fit: FitFn, seed: int) -> dict:
        torch.manual_seed(seed)
        self.head.reset_parameters()
        feats = self._batched(ds.x, 0, 0.0)[0]  # (N, D) frozen base features
        data = TensorDataset(feats, ds.y.to(self.device))
        cfg = self.config
        return fit(Phase("head", list(self.head.parameters()), lambda f, y: F.cross_entropy(self.head(f), y),
                         data, cfg.head_epochs, cfg.head_lr, 64, optimizer="adamw", seed=seed))

    def fit_original(self, train: ImageTensorDataset, fit: FitFn) -> dict:
        """Trains the original classifier (linear head on frozen features) on all classes."""
        return self._fit_head(train, fit, self.seed)

    def unlearn(self, forget: ImageTensorDataset, retained: ImageTensorDataset, fit: FitFn) -> dict:
        """Processes one unlearning request.

        Args:
            forget: the request's training data to forget.
            retained: the training data not forgotten so far (used by ``retrain`` only).
            fit: the training loop.

        Returns:
            Training statistics.

        Raises:
            ValueError: when the number of requests exceeds ``max_requests`` (``o3``).
        """
        cfg, j = self.config, self.n_requests
        if cfg.name == "o3" and j >= cfg.max_requests:
            raise ValueError(f"request {j + 1} exceeds max_requests={cfg.max_requests} (detector blocks)")
        self.forgotten += sorted(set(forget.y.tolist()) - set(self.forgotten))
        stats: dict = {}
        seed = self.seed * 1000 + j + 1
        if cfg.name == "retrain":
            stats = self._fit_head(retained, fit, seed)
        else:
            stats = self._train_unlearn_lora(forget, fit, seed)
            self.saved_A.append([a.detach().clone() for a in self.unlearn_A()])
            if cfg.name == "o3":
                stats.update({f"detector_{k}": v for k, v in self._fit_detector(forget, j, fit, seed).items()})
        self.n_requests += 1
        return stats

    def _train_unlearn_lora(self, forget: ImageTensorDataset, fit: FitFn, seed: int) -> dict:
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        y = forget.y
        if cfg.name == "gradient_ascent":
            target = y
        else:  # fixed random labels, uniform over the other classes
            target = (y + torch.randint(1, self.n_classes, y.shape, generator=gen)) % self.n_classes
        previous = list(self.saved_A) if cfg.name == "o3" and cfg.orth_weight > 0 else []
        self.head.requires_grad_(False)

        def loss_fn(x: Tensor, t: Tensor) -> Tensor:
            pooled, _ = self.encode(x, 0, 1.0)
            ce = F.cross_entropy(self.head(pooled), t)
            if cfg.name == "gradient_ascent":
                return -ce.clamp(max=cfg.ga_ce_cap)
            if previous:
                return ce + cfg.orth_weight * orthogonal_penalty(self.unlearn_A(), previous)
            return ce

        # weight_decay=0: the phase sees the whole stacked A/B; decay would touch detector blocks.
        try:
            return fit(Phase(f"unlearn_{cfg.name}", self.lora_params(), loss_fn,
                             TensorDataset(forget.x, target), cfg.epochs, cfg.lr, cfg.batch_size,
                             optimizer=cfg.optimizer, weight_decay=0.0, seed=seed))
        finally:
            self.head.requires_grad_(True)

    def _fit_detector(self, forget: ImageTensorDataset, j: int, fit: FitFn, seed: int) -> dict:
        dcfg = self.config.detector
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(forget), generator=gen)
        n_held = max(2, int(round(dcfg.held_out * len(forget))))
        held, fit_idx = perm[:n_held], perm[n_held:]
        det = O3Detector(dcfg)
        slot = j + 1
        if dcfg.epochs > 0:
            loss_fn = det.contrastive_loss_fn(lambda x: self.encode(x, slot, 1.0)[1],
                                              lambda x: self.encode(x, 0, 0.0)[1], gen)
            fit(Phase(f"detector_{j}", self.lora_params(), loss_fn,
                      TensorDataset(forget.x[fit_idx], forget.y[fit_idx]), dcfg.epochs, dcfg.lr,
                      dcfg.batch_size, optimizer="adamw", weight_decay=0.0, seed=seed))
        stats = det.fit(self._batched(forget.x[fit_idx], slot, 1.0)[1],
                        self._batched(forget.x[held], slot, 1.0)[1])
        self.detectors.append(det)
        return stats

    # ----------------------------------------------------------------------------- inference
    @torch.no_grad()
    def unlearn_weight(self, x: Tensor) -> Tensor:
        """Per-sample scale (B,) of the unlearning LoRA."""
        if self.n_requests == 0 or self.config.name == "retrain":
            return torch.zeros(len(x))
        if self.config.name != "o3":
            return torch.ones(len(x))
        ws = [det.weight(self.encode(x, k + 1, 1.0)[1]) for k, det in enumerate(self.detectors)]
        return torch.stack(ws).max(0).values  # (B,)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (B, n_classes), each sample through the unlearning LoRA at its own scale."""
        w = self.unlearn_weight(x).to(self.device)
        pooled, _ = self.encode(x, 0, w)
        return self.head(pooled)

    @torch.no_grad()
    def predict_dataset(self, ds: ImageTensorDataset) -> tuple[Tensor, Tensor]:
        """Predicted classes (N,) and unlearning weights (N,) of a whole dataset, batched."""
        bs, preds, ws = self.config.eval_batch_size, [], []
        for i in range(0, len(ds), bs):
            w = self.unlearn_weight(ds.x[i:i + bs]).to(self.device)
            pooled, _ = self.encode(ds.x[i:i + bs], 0, w)
            preds.append(self.head(pooled).argmax(1).cpu())
            ws.append(w.cpu())
        return torch.cat(preds), torch.cat(ws)

    def accuracy(self, ds: ImageTensorDataset) -> tuple[float, float]:
        """(accuracy, mean unlearning weight) on ``ds``."""
        if len(ds) == 0:
            return float("nan"), float("nan")
        pred, w = self.predict_dataset(ds)
        return (pred == ds.y).float().mean().item(), w.mean().item()
