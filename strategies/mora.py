"""MoRA: continual learning with self-activated sparse mixtures of rank-1 LoRA experts.

Paper: Lu, Zhao, Xue, Yao, Moore, Gong, "Little By Little: Continual Learning via Self-Activated
Sparse Mixture-of-Rank Adaptive Learning", arXiv 2506.21035 (submitted to ICLR 2026, rejected),
https://arxiv.org/abs/2506.21035. No official code was found: this file follows the paper's
equations as summarised in ``/work/shared/reference/methods.md`` section 1, and every open
choice is an option of :class:`MoRAConfig` (documented in ``docs/methods/mora.md``).

Per task, every wrapped linear layer gets ``experts_per_task`` new rank-1 experts
``b_i a_i`` (A random, B zero) and the earlier ones are frozen. Each token activates its own
experts from the activations ``a_i . x`` (no router, no task id), see
:mod:`adaptsim.strategies.mora_gate`. The loss is cross-entropy only (no extra regulariser,
as in the paper).

Departures / additions (the paper is silent or we had to choose):

* Classifier for timm backbones: a linear head with CE over the seen classes (PILOT masking);
  the paper only uses CLIP text embeddings (``classifier="text"``, also supported).
* The CLIP text tower is never adapted; class-name embeddings are computed once.
* open_clip's ``nn.MultiheadAttention`` is replaced by an exactly equivalent module with
  ``nn.Linear`` ``qkv``/``proj`` so that the attention projections can carry experts.
* ``scaling`` defaults to ``top_k``, so uniform weights over k experts equal a plain rank-k LoRA
  sum (the mixture weights sum to 1 after renormalisation; see the "output fading" pitfall).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.base import BaseStrategyConfig, Strategy, register_strategy
from adaptsim.strategies.mora_gate import (
    COMPUTE_MODES,
    SCORE_MODES,
    MoRALinear,
    SelfActivationGate,
    inject_mora,
    replace_clip_attention,
)

__all__ = ["MoRA", "MoRAConfig", "ActiveRankStats", "TextClassifier"]

logger = logging.getLogger(__name__)

CLASSIFIERS = ("linear", "text")
LOSS_CLASSES = ("seen", "current")


@dataclass(frozen=True)
class MoRAConfig(BaseStrategyConfig):
    """MoRA settings (defaults are ours: the paper gives no values).

    Attributes:
        experts_per_task: new rank-1 experts per wrapped layer per task (default 8).
        top_k: activation budget k per token (default 8).
        tau: softmax temperature over the normalised scores (default 0.1; scores are in [-1, 1]).
        delta: threshold mask ``s_i >= delta`` (default 0.0: with signed scores, experts whose
            key is anti-aligned with the input are dropped).
        score: ``"signed"`` (the paper's ``a_i . x``, default) or ``"abs"`` (``|a_i . x|``).
        renormalize: softmax over the kept experts only (default ``True``); ``False`` zeroes the
            dropped experts of a softmax over all experts (outputs fade as experts accumulate).
        norm_grad: backpropagate through the layer-wide score normaliser (default ``False``:
            an expert gets gradient only from tokens that activate it).
        scaling: delta scale; ``None`` (default) = ``top_k``.
        targets: name suffixes of the ``nn.Linear``s to wrap. Default: timm ViT ``qkv``,
            ``proj`` (attention) and ``fc1``, ``fc2`` (MLP); open_clip ``qkv``, ``proj`` (after
            the attention swap) and ``c_fc``, ``c_proj`` (MLP).
        compute: ``"gated"`` (the kernel's top-k path, default) or ``"dense"`` (dense masked
            LoRA, same numbers, cost proportional to all experts).
        classifier: ``"linear"`` head (default) or ``"text"`` (CLIP text embeddings of the class
            names, open_clip backbones only; unseen classes stay scorable: zero-shot).
        loss_classes: classes in the CE softmax: ``"seen"`` (default, PILOT) or ``"current"``
            (the experience's own classes, the MTIL convention).
        text_template: prompt for ``classifier="text"``; ``{}`` is the class name without the
            ``"domain:"`` prefix of multi-domain streams.
        clip_pretrained_tag: open_clip tag of the text tower rebuilt for ``classifier="text"``
            when no ``clip`` is passed to the strategy (``None`` = random text tower).
        seed: optional seed of the experts' initialisation (``None`` = the run's RNG).
        expert_lr: learning rate of the experts (default 1e-3); ``lr`` is the head's. With
            ``lr`` = 0.01 on the experts of all 48 linears of a pretrained ViT-S, the features
            collapsed to one point within one task (measured), hence the separate, lower rate.
    """

    lr: float = 0.01
    optimizer: str = "adamw"
    experts_per_task: int = 8
    top_k: int = 8
    tau: float = 0.1
    delta: float = 0.0
    score: str = "signed"
    renormalize: bool = True
    norm_grad: bool = False
    scaling: float | None = None
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "c_fc", "c_proj")
    compute: str = "gated"
    classifier: str = "linear"
    loss_classes: str = "seen"
    text_template: str = "a photo of a {}."
    clip_pretrained_tag: str | None = None
    seed: int | None = None
    expert_lr: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.expert_lr <= 0:
            raise ValueError(f"expert_lr must be > 0, got {self.expert_lr}")
        if self.experts_per_task < 1:
            raise ValueError(f"experts_per_task must be >= 1, got {self.experts_per_task}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if not -1.0 <= self.delta <= 1.0:
            raise ValueError(f"delta must be in [-1, 1] (scores are L2-normalised), got {self.delta}")
        if self.score not in SCORE_MODES:
            raise ValueError(f"score must be one of {SCORE_MODES}, got {self.score!r}")
        if self.scaling is not None and self.scaling <= 0:
            raise ValueError(f"scaling must be > 0 or None, got {self.scaling}")
        if not self.targets:
            raise ValueError("targets must name at least one module suffix")
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {self.compute!r}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
        if self.loss_classes not in LOSS_CLASSES:
            raise ValueError(f"loss_classes must be one of {LOSS_CLASSES}, got {self.loss_classes!r}")
        if "{}" not in self.text_template:
            raise ValueError(f"text_template must contain '{{}}', got {self.text_template!r}")

    def gate(self) -> SelfActivationGate:
        """The :class:`SelfActivationGate` of these settings."""
        return SelfActivationGate(top_k=self.top_k, tau=self.tau, delta=self.delta, score=self.score,
                                  renormalize=self.renormalize, norm_grad=self.norm_grad)


class TextClassifier(nn.Module):
    """CLIP zero-shot head: ``logit_scale * cos(image_embedding, text_embedding(class))``.

    Args:
        text_emb: (n_classes, d) L2-normalised class-name embeddings (a frozen buffer).
        logit_scale: the CLIP temperature (``exp`` of the model's ``logit_scale``).
    """

    def __init__(self, text_emb: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("text_emb", F.normalize(text_emb.detach().float(), dim=-1))
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, d) -> logits (B, n_classes)."""
        return self.logit_scale * F.normalize(feats, dim=-1) @ self.text_emb.t()


class ActiveRankStats:
    """Collects active-expert counts per token and per image during evaluation."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.names: dict[int, str] = {}  # id(layer) -> qualified name
        self.reset()

    def reset(self) -> None:
        self.hist = torch.zeros(self.top_k + 1, dtype=torch.long)  # (token, layer) pairs by count
        self.per_layer: dict[str, list[float]] = {}  # name -> [sum, count]
        self.per_image: list[torch.Tensor] = []
        self._batch: list[torch.Tensor] = []

    def __call__(self, layer: MoRALinear, n_active: torch.Tensor) -> None:
        """Recorder hook of :class:`MoRALinear`; n_active is (B, ...) for one forward."""
        n = n_active.detach().cpu()
        self.hist += torch.bincount(n.reshape(-1), minlength=self.top_k + 1)[: self.top_k + 1]
        acc = self.per_layer.setdefault(self.names.get(id(layer), "?"), [0.0, 0.0])
        acc[0] += float(n.sum())
        acc[1] += n.numel()
        self._batch.append(n.reshape(n.shape[0], -1).float().mean(1) if n.dim() else n.float().reshape(1))

    def end_batch(self) -> None:
        """Closes one predict call: the per-image mean over tokens and layers."""
        if self._batch and all(b.shape == self._batch[0].shape for b in self._batch):
            self.per_image.append(torch.stack(self._batch).mean(0))
        self._batch = []

    def summary(self) -> dict[str, Any]:
        total = int(self.hist.sum())
        if total == 0:
            return {}
        ks = torch.arange(self.top_k + 1, dtype=torch.float64)
        p = self.hist.double() / total
        mean = float((p * ks).sum())
        out: dict[str, Any] = {
            "mean_per_token": mean,
            "std_per_token": float(((p * (ks - mean) ** 2).sum()).sqrt()),
            "hist_per_token": {str(k): int(c) for k, c in enumerate(self.hist.tolist())},
            "mean_per_layer": {k: v[0] / max(v[1], 1) for k, v in self.per_layer.items()},
        }
        if self.per_image:
            img = torch.cat(self.per_image)
            q = torch.quantile(img, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=img.dtype))
            out["per_image_mean_quantiles"] = dict(zip(["min", "p10", "p50", "p90", "max"], q.tolist()))
        return out


@register_strategy("mora", MoRAConfig)
class MoRA(Strategy):
    """Self-activated sparse mixture of rank-1 LoRA experts (see module docstring).

    Args:
        config: :class:`MoRAConfig`.
        backbone: a frozen timm or open_clip :class:`~adaptsim.cl.backbones.Backbone`; its
            target linears are wrapped in place.
        info: the stream info.
        clip: optional :class:`~adaptsim.cl.clip.ClipModel` (or anything with
            ``encode_text`` and ``clip.logit_scale``) whose text tower builds the text classifier.
        **kw: forwarded to :class:`~adaptsim.strategies.base.Strategy`.

    Raises:
        ValueError: ``classifier="text"`` on a non-open_clip backbone.
    """

    SUPPORTED_SCENARIOS = frozenset({"class_incremental", "domain_incremental", "multi_domain"})

    def __init__(self, config: MoRAConfig, backbone, info, *, clip: Any = None, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        if config.classifier == "text" and backbone.kind != "open_clip":
            raise ValueError("classifier='text' needs an open_clip backbone "
                             f"(got {backbone.kind!r}); use classifier='linear'")
        if backbone.kind == "open_clip":
            n = replace_clip_attention(backbone.model)
            logger.info("replaced %d open_clip attention modules by LinearSelfAttention", n)
        scaling = float(config.top_k if config.scaling is None else config.scaling)
        layers = inject_mora(backbone.model, config.targets, config.gate(), scaling=scaling,
                             compute=config.compute, seed=config.seed)
        self.layers = nn.ModuleDict({k.replace(".", "_"): v for k, v in layers.items()}).to(self.device)
        # checkpointed: the experts only, not the wrapped (frozen) backbone weights
        self.experts = nn.ModuleDict({k: nn.ModuleDict({"A": v.experts.more_A, "B": v.experts.more_B})
                                      for k, v in self.layers.items()})
        self.stats = ActiveRankStats(config.top_k)
        self.stats.names = {id(v): k for k, v in layers.items()}
        self.history: list[dict[str, Any]] = []
        if config.classifier == "text":
            self.head: nn.Module = self._text_head(clip).to(self.device)
        else:
            self.head = nn.Linear(backbone.embed_dim, info.n_classes).to(self.device)

    # -- classifiers ---------------------------------------------------------------------------
    def _text_head(self, clip: Any) -> TextClassifier:
        """Builds the text classifier from ``clip`` or from a rebuilt open_clip text tower."""
        if clip is None:
            clip = self._rebuild_clip()
        names = [c.rsplit(":", 1)[-1] for c in self.info.class_names]
        prompts = [self.config.text_template.format(n) for n in names]
        with torch.no_grad():
            emb = clip.encode_text(prompts)  # (n_classes, d)
            scale = float(clip.clip.logit_scale.exp()) if hasattr(clip, "clip") else 100.0
        return TextClassifier(emb.float().cpu(), scale)

    def _rebuild_clip(self) -> Any:
        """Builds the open_clip model matching the backbone, for its text tower only."""
        from adaptsim.cl.backbones import BackboneConfig
        from adaptsim.cl.clip import create_clip

        bb, cfg = self.backbone, self.config
        if bb.name == "open_clip_tiny":
            blk = bb.blocks[0]
            heads = getattr(blk.attn, "num_heads")
            bcfg = BackboneConfig(name=bb.name, img_size=bb.img_size, tiny_dim=bb.token_dim,
                                  tiny_depth=len(bb.blocks), tiny_heads=heads,
                                  tiny_patch=bb.model.conv1.kernel_size[0])
            logger.warning("open_clip_tiny: the rebuilt text tower is random and unrelated to the "
                           "image tower (mechanics only); pass clip=create_clip(...) to share one")
        else:
            bcfg = BackboneConfig(name=bb.name, img_size=bb.img_size, pretrained=cfg.clip_pretrained_tag is not None,
                                  pretrained_tag=cfg.clip_pretrained_tag)
            if cfg.clip_pretrained_tag is None:
                logger.warning("classifier='text' with clip_pretrained_tag=None: random text tower")
        return create_clip(bcfg)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _class_mask(self, exp_classes: Sequence[int]) -> torch.Tensor:
        if self.config.loss_classes == "seen":
            return self.seen_mask()
        mask = torch.zeros(self.info.n_classes, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(list(exp_classes), device=self.device)] = True
        return mask

    # -- training ------------------------------------------------------------------------------
    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        cfg = self.config
        for layer in self.layers.values():
            layer.add_experts(cfg.experts_per_task)  # freezes earlier tasks' experts
        mask = self._class_mask(exp.classes)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(x).masked_fill(~mask, float("-inf")), y)

        params = [{"params": [p for p in self.experts.parameters() if p.requires_grad], "lr": cfg.expert_lr}]
        head = [p for p in self.head.parameters() if p.requires_grad]  # none for the text head
        if head:
            params.append({"params": head, "lr": cfg.lr})
        stats = fit(Phase("mora", params, loss_fn, exp.train, cfg.epochs, cfg.lr, cfg.batch_size,
                          optimizer=cfg.optimizer, weight_decay=cfg.weight_decay))
        if self.stats.hist.sum():  # stats of the evaluation after the previous experience
            self.history.append({"after_experience": self.experiences_seen - 1, **self.stats.summary()})
        self.stats.reset()
        self.end_experience()
        return stats

    # -- inference -----------------------------------------------------------------------------
    @contextmanager
    def recording(self) -> Any:
        """Context in which every MoRA layer reports its active-expert counts to ``self.stats``."""
        for layer in self.layers.values():
            layer.recorder = self.stats
        try:
            yield self.stats
        finally:
            for layer in self.layers.values():
                layer.recorder = None
            self.stats.end_batch()

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.recording():
            logits = self._logits(x.to(self.device))
        if self.config.classifier == "text":
            return logits  # every class stays scorable: zero-shot on unseen domains (X-TAIL)
        return self.mask_unseen(logits)

    # -- state ---------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"head": self.head, "experts": self.experts}

    def extra_state(self) -> dict[str, Any]:
        return {"groups": {k: v.group_sizes() for k, v in self.layers.items()}, "history": list(self.history)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for name, sizes in state["groups"].items():
            layer = self.layers[name]
            if layer.group_sizes() != list(sizes[: len(layer.group_sizes())]):
                raise ValueError(f"layer {name}: checkpoint groups {sizes} do not extend {layer.group_sizes()}")
            for n in sizes[len(layer.group_sizes()):]:
                layer.add_experts(int(n))
        self.history = list(state.get("history", []))

    def run_metrics(self) -> dict[str, Any]:
        any_layer = next(iter(self.layers.values()))
        return {
            "n_layers": len(self.layers),
            "experts_per_layer": any_layer.n_experts,
            "active_ranks": self.stats.summary(),
            "active_ranks_history": self.history,
        }
