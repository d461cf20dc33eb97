"""O3 continual unlearning on a frozen ViT classifier, plus its baselines.

Paper: "On Large Language Model Continual Unlearning" (O3), Gao et al., ICLR 2025,
https://arxiv.org/abs/2407.10223; official code https://github.com/GCYZSL/O3-LLM-UNLEARNING.

The classifier is the frozen backbone plus a linear head trained on all classes
(:meth:`O3Unlearner.fit_original`). Each unlearning request names data to forget
(:meth:`O3Unlearner.unlearn`); ``config.name`` picks how:

* ``o3``: one unlearning LoRA continued across requests, trained with cross-entropy on the
  request's data under fixed random labels plus ``orth_weight * mean_blocks sum_{i<t}
  ||A_i A_t^T||_F^2`` between the current A_t and the A_i saved after each earlier request
  (:func:`orthogonal_penalty`; summed over a block's LoRA layers and averaged over blocks, as the
  official ``modeling_llama_hacked_o.py`` divides by ``layer_number``; ``orth_reduction: sum``
  sums over layers instead). One OOD detector per request (:mod:`.o3_detector`). At inference
  each sample's unlearning-LoRA scale is the max post-processed weight over the detectors.
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
import re
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

__all__ = ["METHODS", "O3", "O3Config", "O3Unlearner", "orthogonal_penalty"]

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
        orth_reduction: ``mean`` (official: summed over a block's LoRA layers, averaged over
            blocks) or ``sum`` (summed over every LoRA layer; with ``qkv`` on 12 blocks, 12x
            stronger).
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
    orth_reduction: Literal["mean", "sum"] = "mean"
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
        if self.orth_reduction not in ("mean", "sum"):
            raise ValueError(f"orth_reduction must be mean or sum, got {self.orth_reduction!r}")
        if self.ga_ce_cap <= 0:
            raise ValueError(f"ga_ce_cap must be > 0, got {self.ga_ce_cap}")
        if not self.targets:
            raise ValueError("targets must name at least one layer")


def orthogonal_penalty(current: list[Tensor], previous: list[list[Tensor]], *, reduction: str = "sum",
                       groups: list[int] | None = None) -> Tensor:
    """O3's orthogonality penalty ``sum_i ||A_i^l (A^l)^T||_F^2`` reduced over the LoRA layers ``l``.

    Args:
        current: per LoRA layer ``l`` the current down projection A^l (r, K).
        previous: per earlier request ``i``, the list of its saved A_i^l (r, K), same order.
        reduction: ``sum`` over layers, or ``mean``: summed within each group (transformer block)
            and averaged over groups (official).
        groups: per layer, its block id (default: every layer its own block).

    Returns:
        Scalar penalty (0 when there is no earlier request).
    """
    per_layer = [current[0].new_zeros(()) for _ in current]
    for saved in previous:
        for l, (a_prev, a_cur) in enumerate(zip(saved, current)):
            per_layer[l] = per_layer[l] + (a_prev @ a_cur.T).pow(2).sum()  # ||(r, r)||_F^2
    total = torch.stack(per_layer).sum()
    if reduction == "mean":
        return total / len(set(groups if groups is not None else range(len(current))))
    if reduction != "sum":
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    return total


def _block_id(name: str) -> str:
    """``blocks.3.attn.qkv`` → ``blocks.3`` (the transformer block a LoRA layer sits in)."""
    m = re.match(r"(.*?blocks\.\d+)\.", name)
    return m.group(1) if m else name


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
        # per (A, B) pair of unlearn_A(): its block, for the official per-block mean of the penalty
        blocks = [_block_id(k) for k, v in layers.items() for _ in v.pairs()]
        self.orth_groups = [sorted(set(blocks)).index(b) for b in blocks]
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
    def base_features(self, x: Tensor) -> Tensor:
        """Pooled features (N, D) of the frozen base model (no LoRA), batched."""
        return self._batched(x, 0, 0.0)[0]

    def _train_head(self, head: nn.Linear, feats: Tensor, y: Tensor, fit: FitFn, seed: int) -> dict:
        cfg = self.config
        data = TensorDataset(feats.to(self.device), y.to(self.device))
        return fit(Phase("head", list(head.parameters()), lambda f, t: F.cross_entropy(head(f), t),
                         data, cfg.head_epochs, cfg.head_lr, 64, optimizer="adamw", seed=seed))

    def _fit_head(self, ds: ImageTensorDataset, fit: FitFn, seed: int) -> dict:
        torch.manual_seed(seed)
        self.head.reset_parameters()
        return self._train_head(self.head, self.base_features(ds.x), ds.y, fit, seed)

    def retrained_head(self, feats: Tensor, y: Tensor, fit: FitFn, seed: int) -> nn.Linear:
        """A fresh head trained on base features ``feats`` (N, D) of the retained data: the
        exact-unlearning reference of the forget-quality test (``self.head`` is untouched)."""
        torch.manual_seed(seed)
        head = nn.Linear(self.backbone.embed_dim, self.n_classes).to(self.device)
        self._train_head(head, feats, y, fit, seed)
        return head.requires_grad_(False)

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
                return ce + cfg.orth_weight * orthogonal_penalty(
                    self.unlearn_A(), previous, reduction=cfg.orth_reduction, groups=self.orth_groups)
            return ce

        # weight_decay=0: the phase sees the whole stacked A/B; decay would touch detector blocks.
        try:
            return fit(Phase(f"unlearn_{cfg.name}", self.lora_params(), loss_fn,
                             TensorDataset(forget.x, target), cfg.epochs, cfg.lr, cfg.batch_size,
                             optimizer=cfg.optimizer, weight_decay=0.0, seed=seed))
        finally:
            self.head.requires_grad_(True)

    def _slot_vector(self, slot: int) -> Tensor:
        """The detector rank block ``slot`` of every layer's A and B, flattened (a copy)."""
        r = self.config.rank
        parts = [t for layer in self.lora.values() for A, B, _ in layer.pairs()
                 for t in (A[slot * r:(slot + 1) * r].flatten(), B[:, slot * r:(slot + 1) * r].flatten())]
        return torch.cat(parts).detach().clone()

    def _fit_detector(self, forget: ImageTensorDataset, j: int, fit: FitFn, seed: int) -> dict:
        dcfg = self.config.detector
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(forget), generator=gen)
        n_held = max(2, int(round(dcfg.held_out * len(forget))))
        held, fit_idx = perm[:n_held], perm[n_held:]
        det = O3Detector(dcfg)
        slot = j + 1
        theta0, epochs, movement = self._slot_vector(slot), 0, 0.0
        if dcfg.epochs > 0:
            loss_fn = det.contrastive_loss_fn(lambda x: self.encode(x, slot, 1.0)[1],
                                              lambda x: self.encode(x, 0, 0.0)[1], gen)
            data = TensorDataset(forget.x[fit_idx], forget.y[fit_idx])

            def train(n: int) -> None:  # a new seed per call: each extra epoch sees a new order
                fit(Phase(f"detector_{j}", self.lora_params(), loss_fn, data, n, dcfg.lr, dcfg.batch_size,
                          optimizer="adamw", weight_decay=0.0, seed=seed + epochs))

            train(dcfg.epochs)
            epochs = dcfg.epochs
            movement = self._movement(slot, theta0)
            while movement < dcfg.min_movement and epochs < dcfg.max_epochs:
                train(1)
                epochs += 1
                movement = self._movement(slot, theta0)
        stats = det.fit(self._batched(forget.x[fit_idx], slot, 1.0)[1],
                        self._batched(forget.x[held], slot, 1.0)[1])
        self.detectors.append(det)
        return {**stats, "epochs": float(epochs), "adapter_rel_change": movement, "n_fit": float(len(fit_idx)),
                "n_held": float(len(held))}

    def _movement(self, slot: int, theta0: Tensor) -> float:
        """Relative L2 change of the detector block since ``theta0`` (B starts at 0, so the
        denominator is the initial A's norm)."""
        return float((self._slot_vector(slot) - theta0).norm() / theta0.norm().clamp_min(1e-12))

    # ----------------------------------------------------------------------------- inference
    @torch.no_grad()
    def detector_weights(self, x: Tensor) -> Tensor:
        """Per-detector post-processed weights (K, B) (``o3`` only; K = requests so far)."""
        return torch.stack([det.weight(self.encode(x, k + 1, 1.0)[1]) for k, det in enumerate(self.detectors)])

    @torch.no_grad()
    def unlearn_weight(self, x: Tensor) -> Tensor:
        """Per-sample scale (B,) of the unlearning LoRA."""
        if self.n_requests == 0 or self.config.name == "retrain":
            return torch.zeros(len(x))
        if self.config.name != "o3":
            return torch.ones(len(x))
        return self.detector_weights(x).max(0).values  # (B,)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Logits (B, n_classes), each sample through the unlearning LoRA at its own scale."""
        w = self.unlearn_weight(x).to(self.device)
        pooled, _ = self.encode(x, 0, w)
        return self.head(pooled)

    @torch.no_grad()
    def predict_full(self, x: Tensor) -> dict[str, Tensor]:
        """Batched inference over images ``x`` (N, C, H, W).

        Returns:
            ``pred`` (N,) classes, ``prob`` (N, n_classes) softmax probabilities, ``w`` (N,) the
            unlearning LoRA's scale, ``wk`` (K, N) each detector's weight (K = 0 unless ``o3``),
            ``pooled`` (N, D) the features the head saw.
        """
        bs, out = self.config.eval_batch_size, {"pred": [], "prob": [], "w": [], "wk": [], "pooled": []}
        use_det = self.config.name == "o3" and self.detectors
        for i in range(0, len(x), bs):
            xb = x[i:i + bs]
            wk = self.detector_weights(xb) if use_det else torch.zeros(0, len(xb))
            w = wk.max(0).values if use_det else self.unlearn_weight(xb)
            pooled, _ = self.encode(xb, 0, w.to(self.device))
            prob = self.head(pooled).softmax(-1).cpu()
            for k, v in (("pred", prob.argmax(1)), ("prob", prob), ("w", w.cpu()), ("wk", wk.cpu()),
                         ("pooled", pooled.cpu())):
                out[k].append(v)
        return {k: torch.cat(v, dim=1 if k == "wk" else 0) for k, v in out.items()}

    @torch.no_grad()
    def predict_dataset(self, ds: ImageTensorDataset) -> tuple[Tensor, Tensor]:
        """Predicted classes (N,) and unlearning weights (N,) of a whole dataset, batched."""
        out = self.predict_full(ds.x)
        return out["pred"], out["w"]

    def accuracy(self, ds: ImageTensorDataset) -> tuple[float, float]:
        """(accuracy, mean unlearning weight) on ``ds``."""
        if len(ds) == 0:
            return float("nan"), float("nan")
        pred, w = self.predict_dataset(ds)
        return (pred == ds.y).float().mean().item(), w.mean().item()

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        """Everything that changes across requests, as tensors and plain values (for
        ``torch.load(weights_only=True)``): LoRA A/B, head, saved A's, detectors' fit features."""
        lora = {k: v for k, v in self.lora.state_dict().items() if ".lora_" in k or k.startswith("lora_")}
        return {"lora": lora, "head": self.head.state_dict(), "saved_A": self.saved_A,
                "forgotten": list(self.forgotten), "n_requests": self.n_requests,
                "detectors": [d.state_dict() for d in self.detectors]}

    def load_checkpoint_state(self, state: dict) -> None:
        """Restores :meth:`checkpoint_state` (detectors are refitted on their saved features)."""
        missing = self.lora.load_state_dict(state["lora"], strict=False).missing_keys
        if any("lora_" in k for k in missing):
            raise ValueError(f"checkpoint lacks LoRA tensors {[k for k in missing if 'lora_' in k][:3]}")
        self.head.load_state_dict(state["head"])
        self.saved_A = [[a.to(self.device) for a in saved] for saved in state["saved_A"]]
        self.forgotten, self.n_requests = list(state["forgotten"]), int(state["n_requests"])
        self.detectors = []
        for d in state["detectors"]:
            det = O3Detector(self.config.detector)
            det.load_state_dict(d)
            self.detectors.append(det)


O3 = O3Unlearner  # ``from adaptsim.strategies import O3``, like the other methods
