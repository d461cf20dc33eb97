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
as in the paper). The default gate is the paper's literal equation (``gate="paper"``: softmax
over all experts, then the top-k / threshold mask, no renormalisation, delta scale 1).

Departures / additions (the paper is silent or we had to choose):

* Classifier: the paper scores against frozen CLIP text embeddings (``head="clip_text"``, open_clip
  backbones). Offline, ``head="prototype"`` (default) stands in for it: a frozen cosine head on
  class prototypes of the frozen pretrained features, each fixed when its class first appears
  (:mod:`adaptsim.strategies.components.proto_head`). ``head="linear"`` (a trainable head, the
  earlier default) stays as an option; it forgets like head fine-tuning in class-incremental order.
* The CLIP text tower is never adapted; class-name embeddings are computed once.
* open_clip's ``nn.MultiheadAttention`` is replaced by an exactly equivalent module with
  ``nn.Linear`` ``qkv``/``proj`` so that the attention projections can carry experts.
* ``gate="renorm"`` (the earlier default): softmax over the kept experts only, delta scale
  ``top_k``, so uniform weights over k experts equal a plain rank-k LoRA sum.
* Gate statistics (:mod:`adaptsim.strategies.mora_stats`): after each task, on up to
  ``gate_probe`` test images of every task seen so far (read for statistics only, never for
  training or prediction), the share of top-k slots per expert group, key norms per group and
  the fraction of tokens with no active expert go to ``metrics.json``.
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
from adaptsim.strategies.components.proto_head import FrozenPrototypeHead, add_frozen_prototypes
from adaptsim.strategies.mora_gate import (
    COMPUTE_MODES,
    SCORE_MODES,
    SelfActivationGate,
    inject_mora,
    replace_clip_attention,
)
from adaptsim.strategies.mora_stats import ActiveRankStats, gate_statistics

__all__ = ["ADAPTERS", "GATES", "HEADS", "ActiveRankStats", "MoRA", "MoRAConfig", "TextClassifier"]

logger = logging.getLogger(__name__)

HEADS = ("prototype", "clip_text", "linear")
ADAPTERS = ("experts", "lora")
GATES = ("paper", "renorm")
LOSS_CLASSES = ("seen", "current")


def default_loss_classes(head: str) -> str:
    """CE over the current experience's classes for frozen heads, over the seen ones for ``linear``."""
    return "seen" if head == "linear" else "current"


@dataclass(frozen=True)
class MoRAConfig(BaseStrategyConfig):
    """MoRA settings (defaults are ours where the paper gives no values).

    Attributes:
        experts_per_task: new rank-1 experts per wrapped layer per task (default 8).
        top_k: activation budget k per token (default 8).
        tau: softmax temperature over the normalised scores (default 0.1; scores are in [-1, 1]).
        delta: threshold mask ``s_i >= delta`` (default 0.0: with signed scores, experts whose
            key is anti-aligned with the input are dropped).
        score: ``"signed"`` (the paper's ``a_i . x``, default) or ``"abs"`` (``|a_i . x|``).
        gate: ``"paper"`` (default): ``w = softmax(s / tau)`` over **all** experts of the layer,
            multiplied by the top-k and ``s >= delta`` masks, not renormalised, delta scale 1
            (the paper's equations). ``"renorm"``: softmax over the kept experts only (weights
            sum to 1) and delta scale ``top_k`` (the earlier adaptsim default).
        norm_grad: backpropagate through the layer-wide score normaliser and the softmax
            partition (default ``False``: an expert gets gradient only from tokens that activate it).
        scaling: delta scale; ``None`` (default) = 1 for ``gate="paper"``, ``top_k`` for ``"renorm"``.
        targets: name suffixes of the ``nn.Linear``s to wrap. Default: timm ViT ``qkv``,
            ``proj`` (attention) and ``fc1``, ``fc2`` (MLP); open_clip ``qkv``, ``proj`` (after
            the attention swap) and ``c_fc``, ``c_proj`` (MLP).
        compute: ``"gated"`` (the kernel's top-k path, default) or ``"dense"`` (dense masked
            LoRA, same numbers, cost proportional to all experts).
        head: ``"prototype"`` (default): frozen cosine head on class prototypes of the frozen
            pretrained features (adapters off), each fixed when its class first appears, the
            offline stand-in for CLIP's frozen text head; ``"clip_text"``: CLIP text embeddings
            of the class names (open_clip backbones; unseen classes stay scorable, zero-shot);
            ``"linear"``: a trainable linear head at learning rate ``lr``.
        head_scale: logit scale of the prototype head (default 100, CLIP's ``exp(logit_scale)``).
        loss_classes: classes in the CE softmax: ``"seen"`` (PILOT), ``"current"`` (the
            experience's own classes, MTIL) or ``None`` (default) = ``"current"`` for the frozen
            heads (``prototype``, ``clip_text``), ``"seen"`` for ``linear``.
        text_template: prompt for ``head="clip_text"``; ``{}`` is the class name without the
            ``"domain:"`` prefix of multi-domain streams.
        clip_pretrained_tag: open_clip tag of the text tower rebuilt for ``head="clip_text"``
            when no ``clip`` is passed to the strategy (``None`` = random text tower).
        seed: optional seed of the experts' initialisation (``None`` = the run's RNG).
        expert_lr: learning rate of the experts (default 1e-3); ``lr`` is the linear head's. With
            ``lr`` = 0.01 on the experts of all 48 linears of a pretrained ViT-S, the features
            collapsed to one point within one task (measured), hence the separate, lower rate.
        gate_probe: test images per task kept for the gate statistics (default 64; 0 = no gate
            statistics). They are read after training only and never change training or predictions.
        adapter: ``"experts"`` (default: MoRA) or ``"lora"``: MoRA's fair baseline from the same
            settings, one sequential LoRA on the same ``targets`` with the same total rank
            (``experts_per_task * n_experiences``), head, ``lr`` and ``expert_lr``
            (:mod:`adaptsim.strategies.mora_lora`); the gate fields are then unused. An option
            rather than another strategy name because ``--strategy.name=X`` starts X from its
            defaults, which would drop the YAML's settings that the baseline must share.
    """

    lr: float = 0.01
    optimizer: str = "adamw"
    experts_per_task: int = 8
    top_k: int = 8
    tau: float = 0.1
    delta: float = 0.0
    score: str = "signed"
    gate: str = "paper"
    norm_grad: bool = False
    scaling: float | None = None
    targets: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "c_fc", "c_proj")
    compute: str = "gated"
    head: str = "prototype"
    head_scale: float = 100.0
    loss_classes: str | None = None
    text_template: str = "a photo of a {}."
    clip_pretrained_tag: str | None = None
    seed: int | None = None
    expert_lr: float = 1e-3
    gate_probe: int = 64
    adapter: str = "experts"

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
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.scaling is not None and self.scaling <= 0:
            raise ValueError(f"scaling must be > 0 or None, got {self.scaling}")
        if not self.targets:
            raise ValueError("targets must name at least one module suffix")
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {COMPUTE_MODES}, got {self.compute!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head_scale <= 0:
            raise ValueError(f"head_scale must be > 0, got {self.head_scale}")
        if self.loss_classes is not None and self.loss_classes not in LOSS_CLASSES:
            raise ValueError(f"loss_classes must be one of {LOSS_CLASSES} or null, got {self.loss_classes!r}")
        if "{}" not in self.text_template:
            raise ValueError(f"text_template must contain '{{}}', got {self.text_template!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        if self.gate_probe < 0:
            raise ValueError(f"gate_probe must be >= 0, got {self.gate_probe}")

    @property
    def resolved_scaling(self) -> float:
        """The delta scale: ``scaling``, else 1 (paper gate) or ``top_k`` (renorm gate)."""
        if self.scaling is not None:
            return float(self.scaling)
        return float(self.top_k) if self.gate == "renorm" else 1.0

    @property
    def resolved_loss_classes(self) -> str:
        """``loss_classes``, else the head's default (:func:`default_loss_classes`)."""
        return self.loss_classes or default_loss_classes(self.head)

    def self_activation_gate(self) -> SelfActivationGate:
        """The :class:`SelfActivationGate` of these settings."""
        return SelfActivationGate(top_k=self.top_k, tau=self.tau, delta=self.delta, score=self.score,
                                  renormalize=self.gate == "renorm", norm_grad=self.norm_grad)


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

    With ``config.adapter == "lora"`` the constructor returns MoRA's LoRA baseline
    (:class:`~adaptsim.strategies.mora_lora.MoRALoRA`) instead.

    Raises:
        ValueError: ``head="clip_text"`` on a non-open_clip backbone.
    """

    SUPPORTED_SCENARIOS = frozenset({"class_incremental", "domain_incremental", "multi_domain"})

    def __new__(cls, config: MoRAConfig, *args: Any, **kw: Any) -> Any:
        if cls is MoRA and config.adapter == "lora":
            from adaptsim.strategies.mora_lora import MoRALoRA

            return MoRALoRA(config, *args, **kw)  # not a MoRA: MoRA.__init__ does not run
        return super().__new__(cls)

    def __init__(self, config: MoRAConfig, backbone, info, *, clip: Any = None, **kw) -> None:
        super().__init__(config, backbone, info, **kw)
        if config.head == "clip_text" and backbone.kind != "open_clip":
            raise ValueError("head='clip_text' needs an open_clip backbone "
                             f"(got {backbone.kind!r}); use head='prototype' or 'linear'")
        if backbone.kind == "open_clip":
            n = replace_clip_attention(backbone.model)
            logger.info("replaced %d open_clip attention modules by LinearSelfAttention", n)
        layers = inject_mora(backbone.model, config.targets, config.self_activation_gate(),
                             scaling=config.resolved_scaling, compute=config.compute, seed=config.seed)
        self.layers = nn.ModuleDict({k.replace(".", "_"): v for k, v in layers.items()}).to(self.device)
        # checkpointed: the experts only, not the wrapped (frozen) backbone weights
        self.experts = nn.ModuleDict({k: nn.ModuleDict({"A": v.experts.more_A, "B": v.experts.more_B})
                                      for k, v in self.layers.items()})
        self.stats = ActiveRankStats(config.top_k)
        self.stats.names = {id(v): k for k, v in layers.items()}
        self.history: list[dict[str, Any]] = []
        self.gate_history: list[dict[str, Any]] = []
        self._probes: list[torch.Tensor] = []  # gate_probe test images per task (statistics only)
        if config.head == "clip_text":
            self.head: nn.Module = self._text_head(clip).to(self.device)
        elif config.head == "prototype":
            self.head = FrozenPrototypeHead(backbone.embed_dim, info.n_classes, config.head_scale).to(self.device)
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
            heads = blk.attn.num_heads
            bcfg = BackboneConfig(name=bb.name, img_size=bb.img_size, tiny_dim=bb.token_dim,
                                  tiny_depth=len(bb.blocks), tiny_heads=heads,
                                  tiny_patch=bb.model.conv1.kernel_size[0])
            logger.warning("open_clip_tiny: the rebuilt text tower is random and unrelated to the "
                           "image tower (mechanics only); pass clip=create_clip(...) to share one")
        else:
            bcfg = BackboneConfig(name=bb.name, img_size=bb.img_size, pretrained=cfg.clip_pretrained_tag is not None,
                                  pretrained_tag=cfg.clip_pretrained_tag)
            if cfg.clip_pretrained_tag is None:
                logger.warning("head='clip_text' with clip_pretrained_tag=None: random text tower")
        return create_clip(bcfg)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def _class_mask(self, exp_classes: Sequence[int]) -> torch.Tensor:
        if self.config.resolved_loss_classes == "seen":
            return self.seen_mask()
        mask = torch.zeros(self.info.n_classes, dtype=torch.bool, device=self.device)
        mask[torch.as_tensor(list(exp_classes), device=self.device)] = True
        return mask

    # -- training ------------------------------------------------------------------------------
    def train_experience(self, exp: Experience, fit: FitFn) -> dict[str, float]:
        self.begin_experience(exp)
        cfg = self.config
        if cfg.head == "prototype":  # new classes' rows, on the frozen backbone (experts off)
            self.backbone.eval()
            add_frozen_prototypes(self.head, self.backbone, exp.train.x, exp.train.y)
        for layer in self.layers.values():
            layer.add_experts(cfg.experts_per_task)  # freezes earlier tasks' experts
        mask = self._class_mask(exp.classes)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(x).masked_fill(~mask, float("-inf")), y)

        params = [{"params": [p for p in self.experts.parameters() if p.requires_grad], "lr": cfg.expert_lr}]
        head = [p for p in self.head.parameters() if p.requires_grad]  # none for the frozen heads
        if head:
            params.append({"params": head, "lr": cfg.lr})
        stats = fit(Phase("mora", params, loss_fn, exp.train, cfg.epochs, cfg.lr, cfg.batch_size,
                          optimizer=cfg.optimizer, weight_decay=cfg.weight_decay))
        if self.stats.hist.sum():  # stats of the evaluation after the previous experience
            self.history.append({"after_experience": self.experiences_seen - 1, **self.stats.summary()})
        self.stats.reset()
        if cfg.gate_probe:
            self._probes.append(exp.test.x[: cfg.gate_probe])
            self.gate_history.append({"after_experience": self.experiences_seen, **self._gate_stats()})
        self.end_experience()
        return stats

    def _gate_stats(self) -> dict[str, Any]:
        """Gate statistics of the current experts on every seen task's probe images."""
        was = self.backbone.training
        self.backbone.eval()
        try:
            return gate_statistics(list(self.layers.values()), self.backbone, self._probes, self.device)
        finally:
            self.backbone.train(was)

    def on_resume(self, past: list[Experience]) -> None:
        """Rebuilds the gate-statistics probes (never checkpointed) from the past experiences."""
        n = self.config.gate_probe
        self._probes = [e.test.x[:n] for e in past] if n else []

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
        if self.config.head == "clip_text":
            return logits  # every class stays scorable: zero-shot on unseen domains (X-TAIL)
        if self.config.head == "prototype":
            return logits  # classes without a prototype (not seen yet) already score -inf
        return self.mask_unseen(logits)

    # -- state ---------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"head": self.head, "experts": self.experts}

    def extra_state(self) -> dict[str, Any]:
        return {"groups": {k: v.group_sizes() for k, v in self.layers.items()}, "history": list(self.history),
                "gate_history": list(self.gate_history)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for name, sizes in state["groups"].items():
            layer = self.layers[name]
            if layer.group_sizes() != list(sizes[: len(layer.group_sizes())]):
                raise ValueError(f"layer {name}: checkpoint groups {sizes} do not extend {layer.group_sizes()}")
            for n in sizes[len(layer.group_sizes()):]:
                layer.add_experts(int(n))
        self.history = list(state.get("history", []))
        self.gate_history = list(state.get("gate_history", []))

    def run_metrics(self) -> dict[str, Any]:
        any_layer = next(iter(self.layers.values()))
        return {
            "n_layers": len(self.layers),
            "experts_per_layer": any_layer.n_experts,
            "active_ranks": self.stats.summary(),
            "active_ranks_history": self.history,
            "gate": self.config.gate,
            "scaling": self.config.resolved_scaling,
            "gate_stats": self.gate_history,
        }

