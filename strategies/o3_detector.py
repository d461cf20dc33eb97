"""O3's per-request OOD detector: contrastive-entropy LoRA, glocal layer scores, OCSVM, soft weight.

Paper: "On Large Language Model Continual Unlearning" (O3), Gao et al., ICLR 2025,
https://arxiv.org/abs/2407.10223 (v1 title "Practical Unlearning for Large Language Models");
official code https://github.com/GCYZSL/O3-LLM-UNLEARNING (``run_ood.py``, ``eval_o3.py``).

One detector is fitted per unlearning request on that request's data only (no retained data):

1. **Contrastive entropy.** A detector LoRA (its own adapter slot on the frozen backbone) sees a
   patch-masked view; the frozen backbone (no adapter) sees the clean view. For each chosen
   layer, the token means ``z1`` (B, d) and ``z2`` (B, d) give a (B, B) similarity matrix whose
   row-softmax entropy is minimised (:func:`contrastive_entropy`).
2. **Glocal layer score.** With the trained detector LoRA, each layer ``l`` gets
   ``s_l(x) = local_sign * local_weight * max_cos(x, train_l) - 0.5 * maha_l(x)``
   (:class:`GlocalScorer`; official ``local_sign = -1``: ``-cs_score * 1000. + gaussian_score`` in
   ``ScienceQA_expriment/src/ood_model_selector.py``).
3. **OCSVM.** The (B, L) layer scores are aggregated by a scikit-learn ``OneClassSVM``.
4. **Soft weight.** A two-Gaussian CDF ``F`` fitted on the OCSVM scores of the fit split and of a
   held-out split of the request's data maps a score to a sigmoid weight, which the official
   gate turns into a near-binary one (:mod:`.o3_weights`, ``postprocess``).

Departures from the official code (all deliberate, see docs/methods/o3.md):
* images, not text: the "masked view" masks random cells of a ``mask_grid`` x ``mask_grid`` grid
  (the MLM loss of the RoBERTa detector has no counterpart and is dropped);
* similarities are cosine / ``temperature`` (official: raw dot products, which saturate the
  softmax for 384-d ViT features); ``normalize=False`` restores raw dot products;
* the local score of a fit-split sample excludes the sample itself (official: includes it);
* the covariance is Ledoit-Wolf shrunk (official: ``EmpiricalCovariance``), since a request has
  fewer samples than feature dimensions here;
* layer scores are standardised on the fit split and shifted into the positive orthant before
  the OCSVM (linear by default, as official), so its score rises with every layer score; the
  official code uses raw scores and picks the score's sign by peeking at OOD data (we never use
  retained data);
* the weight is vectorised over a batch (official: one sample at a time) and optionally
  one-sided (``weight_fn: one_sided``: scores above the centre keep the full weight);
* the detector LoRA trains at least ``epochs`` and then on until its rank block has moved by
  ``min_movement`` (relative L2 change of its A and B), at most ``max_epochs``: the official code
  trains a fixed 2 epochs, which on a few hundred images is a handful of steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adaptsim.strategies.o3_weights import POSTPROCESS, SoftWeight

log = logging.getLogger(__name__)

__all__ = ["O3DetectorConfig", "contrastive_entropy", "mask_patches", "vit_layer_features",
           "GlocalScorer", "SoftWeight", "O3Detector"]


@dataclass(frozen=True)
class O3DetectorConfig:
    """Detector settings.

    Attributes:
        layers: backbone block indices whose token means are used (negative = from the end).
        epochs: contrastive-entropy epochs of the detector LoRA (0 = scores on the frozen backbone).
        min_movement: after ``epochs``, keep training one epoch at a time until the detector rank
            block's relative L2 change ``||theta - theta_0|| / ||theta_0||`` reaches this (0 = off).
        max_epochs: cap on the epochs of that loop (>= ``epochs``).
        lr: detector LoRA learning rate (AdamW).
        batch_size: contrastive batch size (the similarity matrix is batch x batch).
        temperature: softmax temperature of the cosine similarities.
        normalize: cosine similarities (True) or the official raw dot products (False).
        mask_grid: the masked view hides cells of a ``mask_grid`` x ``mask_grid`` grid.
        mask_ratio: fraction of cells hidden.
        local_weight: weight of the max-cosine (local) term; official 1000.
        local_sign: sign of the local term: -1 (official, ``-1000 * max_cos``) or +1.
        ocsvm_kernel: the official ``linear`` or ``rbf`` (two-sided: very high scores count as outliers).
        ocsvm_nu: OCSVM nu (official 0.1).
        held_out: fraction of the request's data held out to fit the second Gaussian.
        weight_fn: ``symmetric`` (official: sigmoid(10 (1 - |F(x) - F(2 x0 - x)|) - 2)) or
            ``one_sided`` (as symmetric below the centre x0, full weight above it; meant for
            ``local_sign: 1``, where the score rises towards the request's data).
        postprocess: the official gate on the raw sigmoid weight: ``scienceqa`` (default,
            ``eval_o3.py``: w > 0.9 → 1.2, 0.3 < w <= 0.4 → w, else 0), ``tofu`` (``run_ood.py``:
            w >= 0.32 → 1, 0.2 < w < 0.32 → 10 w², else 0) or ``none`` (the raw sigmoid).
        rescale: map the raw weight's range [sigmoid(-2), sigmoid(8)] linearly onto [0, 1] (only
            with ``postprocess: none``; the official gates threshold the raw sigmoid).
    """

    layers: tuple[int, ...] = (-4, -3, -2, -1)
    epochs: int = 2
    min_movement: float = 0.05
    max_epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 0.1
    normalize: bool = True
    mask_grid: int = 4
    mask_ratio: float = 0.3
    local_weight: float = 1000.0
    local_sign: int = -1
    ocsvm_kernel: Literal["rbf", "linear"] = "linear"
    ocsvm_nu: float = 0.1
    held_out: float = 0.2
    weight_fn: Literal["symmetric", "one_sided"] = "symmetric"
    postprocess: Literal["scienceqa", "tofu", "none"] = "scienceqa"
    rescale: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("detector.layers must name at least one block")
        if self.epochs < 0:
            raise ValueError(f"detector.epochs must be >= 0, got {self.epochs}")
        if self.lr <= 0 or self.temperature <= 0:
            raise ValueError("detector.lr and detector.temperature must be > 0")
        if self.batch_size < 2:
            raise ValueError("detector.batch_size must be >= 2 (the contrast is within a batch)")
        if self.mask_grid < 1 or not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError("detector.mask_grid must be >= 1 and detector.mask_ratio in [0, 1)")
        if not 0.0 < self.ocsvm_nu <= 1.0:
            raise ValueError(f"detector.ocsvm_nu must be in (0, 1], got {self.ocsvm_nu}")
        if not 0.0 < self.held_out < 1.0:
            raise ValueError(f"detector.held_out must be in (0, 1), got {self.held_out}")
        if self.ocsvm_kernel not in ("rbf", "linear"):
            raise ValueError(f"detector.ocsvm_kernel must be rbf or linear, got {self.ocsvm_kernel!r}")
        if self.min_movement < 0 or self.max_epochs < self.epochs:
            raise ValueError(f"detector.min_movement must be >= 0 and detector.max_epochs >= detector.epochs, "
                             f"got {self.min_movement} and {self.max_epochs}")
        if self.local_sign not in (-1, 1):
            raise ValueError(f"detector.local_sign must be -1 or 1, got {self.local_sign}")
        if self.postprocess not in POSTPROCESS:
            raise ValueError(f"detector.postprocess must be one of {POSTPROCESS}, got {self.postprocess!r}")
        if self.rescale and self.postprocess != "none":
            raise ValueError("detector.rescale needs detector.postprocess: none")
        if self.weight_fn not in ("symmetric", "one_sided"):
            raise ValueError(f"detector.weight_fn must be symmetric or one_sided, got {self.weight_fn!r}")


def vit_layer_features(backbone, x: Tensor, layers: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
    """One pass through a timm ViT backbone: pooled features and per-layer token means.

    Args:
        backbone: an :class:`adaptsim.cl.backbones.Backbone` of kind ``timm`` with ViT blocks.
        x: (B, C, H, W) images (uint8 or float in [0, 1]).
        layers: block indices (negative counts from the end).

    Returns:
        ``(pooled (B, D), [ (B, D) token mean of the patch tokens after each chosen block ])``.

    Raises:
        ValueError: for a non-timm backbone or a layer index out of range.
    """
    if backbone.kind != "timm":
        raise ValueError(f"O3 needs a timm ViT backbone, got kind {backbone.kind!r}")
    m = backbone.model
    depth = len(m.blocks)
    want = sorted({i % depth for i in layers if -depth <= i < depth})
    if len(want) != len(set(layers)):
        raise ValueError(f"detector.layers {layers} out of range for {depth} blocks")
    h = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(backbone.preprocess(x)))))  # (B, T, D)
    feats = []
    for i, blk in enumerate(m.blocks):
        h = blk(h)
        if i in want:
            feats.append(h[:, m.num_prefix_tokens:].mean(1))  # (B, D)
    pooled = m.forward_head(m.norm(h), pre_logits=True)  # (B, D)
    return pooled, feats


def mask_patches(x: Tensor, grid: int, ratio: float, gen: torch.Generator | None = None) -> Tensor:
    """Masked view: float images in [0, 1] with random grid cells set to 0.

    Args:
        x: (B, C, H, W) uint8 or float images.
        grid: cells per side.
        ratio: fraction of cells hidden per image.
        gen: optional CPU generator.

    Returns:
        (B, C, H, W) float images.
    """
    xf = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    b, _, h, w = xf.shape
    n_mask = int(round(ratio * grid * grid))
    keep = torch.ones(b, grid * grid)
    if n_mask:
        idx = torch.rand(b, grid * grid, generator=gen).argsort(1)[:, :n_mask]
        keep.scatter_(1, idx, 0.0)
    keep = keep.view(b, 1, grid, grid).to(xf.device)
    return xf * F.interpolate(keep, size=(h, w), mode="nearest")


def contrastive_entropy(z1: list[Tensor], z2: list[Tensor], temperature: float = 0.1,
                        normalize: bool = True) -> Tensor:
    """O3's contrastive entropy: mean row entropy of softmax(z1 z2^T), summed over layers.

    Args:
        z1: per layer (B, d) features of the trainable encoder on the masked view.
        z2: per layer (B, d) features of the frozen encoder on the clean view.
        temperature: divides the similarities when ``normalize``.
        normalize: cosine similarities / temperature (True) or raw dot products (False).

    Returns:
        Scalar loss.
    """
    total = z1[0].new_zeros(())
    for a, b in zip(z1, z2):
        if normalize:
            sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / temperature  # (B, B)
        else:
            sim = a @ b.T
        logp = sim.log_softmax(-1)
        total = total + (-(logp.exp() * logp).sum(-1)).mean()
    return total


class GlocalScorer:
    """Local (max cosine to the fit features) + global (Mahalanobis) score per layer."""

    def __init__(self, local_weight: float = 1000.0, local_sign: int = -1) -> None:
        self.local_weight, self.local_sign = local_weight, local_sign
        self.train: list[Tensor] = []      # per layer (N, d), L2-normalised
        self.mean: list[Tensor] = []       # per layer (d,)
        self.precision: list[Tensor] = []  # per layer (d, d)

    def fit(self, feats: list[Tensor]) -> "GlocalScorer":
        """Stores the fit-split features and a Ledoit-Wolf Gaussian per layer."""
        from sklearn.covariance import LedoitWolf

        self.train, self.mean, self.precision = [], [], []
        for f in feats:
            f = f.detach().double().cpu()
            lw = LedoitWolf().fit(f.numpy())
            self.train.append(F.normalize(f, dim=-1))
            self.mean.append(torch.from_numpy(lw.location_))
            self.precision.append(torch.from_numpy(lw.precision_))
        return self

    def score(self, feats: list[Tensor], exclude_self: bool = False) -> Tensor:
        """(B, L) layer scores ``local_sign * local_weight * max_cos - 0.5 * maha``.

        Args:
            feats: per layer (B, d) features.
            exclude_self: the rows are the fit split itself (leave-one-out local term).
        """
        cols = []
        for f, tr, mu, prec in zip(feats, self.train, self.mean, self.precision):
            f = f.detach().double().cpu()
            cos = F.normalize(f, dim=-1) @ tr.T  # (B, N)
            if exclude_self:
                cos = cos - 3.0 * torch.eye(len(f), len(tr), dtype=cos.dtype)
            else:  # an exact copy of a fit sample is scored as that sample was (leave-one-out)
                cos = cos.masked_fill(cos > 1.0 - 1e-9, -1.0)
            d = f - mu
            maha = ((d @ prec) * d).sum(-1)  # (B,)
            cols.append(self.local_sign * self.local_weight * cos.max(1).values - 0.5 * maha)
        return torch.stack(cols, 1)


class O3Detector:
    """One request's detector: glocal scorer, OCSVM and soft weight over detector-LoRA features."""

    def __init__(self, config: O3DetectorConfig) -> None:
        self.config = config
        self.scorer = GlocalScorer(config.local_weight, config.local_sign)
        self.svm = None
        self.weight_fn = SoftWeight(config.weight_fn, config.rescale, config.postprocess)
        self._fit_inputs: tuple[list[Tensor], list[Tensor]] | None = None  # what fit saw (checkpoints)
        self._std: tuple[Tensor, Tensor, Tensor] | None = None  # mean, std, min per layer

    def contrastive_loss_fn(self, encode: Callable[[Tensor], list[Tensor]],
                            encode_frozen: Callable[[Tensor], list[Tensor]],
                            gen: torch.Generator) -> Callable[[Tensor, Tensor], Tensor]:
        """``(x, y) -> loss`` for :class:`adaptsim.cl.train.Phase` (labels unused)."""
        cfg = self.config

        def loss_fn(x: Tensor, _y: Tensor) -> Tensor:
            with torch.no_grad():
                z2 = encode_frozen(x)
            z1 = encode(mask_patches(x, cfg.mask_grid, cfg.mask_ratio, gen))
            return contrastive_entropy(z1, z2, cfg.temperature, cfg.normalize)

        return loss_fn

    def _layer_scores(self, feats: list[Tensor], exclude_self: bool = False) -> np.ndarray:
        """(B, L) layer scores, standardised on the fit split and shifted so its minimum is 1.

        The shift puts every fit sample in the positive orthant, so the linear OCSVM's normal
        ``w = sum_i alpha_i x_i`` has non-negative entries and its score grows with every layer
        score (the RBF kernel is shift-invariant).
        """
        mu, sd, low = self._std
        return ((self.scorer.score(feats, exclude_self) - mu) / sd - low + 1.0).numpy()

    def fit(self, fit_feats: list[Tensor], held_feats: list[Tensor]) -> dict[str, float]:
        """Fits scorer, OCSVM and soft weight.

        Args:
            fit_feats: per layer (N, d) detector features of the fit split.
            held_feats: per layer (M, d) detector features of the held-out split.

        Returns:
            Summary numbers (mean weight on both splits).
        """
        from sklearn.svm import OneClassSVM

        self._fit_inputs = ([f.detach().cpu() for f in fit_feats], [f.detach().cpu() for f in held_feats])
        self.scorer.fit(fit_feats)
        raw = self.scorer.score(fit_feats, exclude_self=True)  # (N, L)
        mu, sd = raw.mean(0), raw.std(0).clamp_min(1e-6)
        self._std = (mu, sd, ((raw - mu) / sd).min(0).values)
        fit_s = self._layer_scores(fit_feats, exclude_self=True)
        self.svm = OneClassSVM(kernel=self.config.ocsvm_kernel, nu=self.config.ocsvm_nu, gamma="scale")
        self.svm.fit(fit_s)
        a = self.svm.score_samples(fit_s)
        b = self.svm.score_samples(self._layer_scores(held_feats))
        self.weight_fn.fit(a, b)
        return {"w_fit": float(self.weight_fn(a).mean()), "w_held": float(self.weight_fn(b).mean())}

    def state_dict(self) -> dict[str, list[Tensor]]:
        """The features :meth:`fit` saw; fitting is deterministic, so they restore the detector."""
        if self._fit_inputs is None:
            raise RuntimeError("O3Detector.fit must run before state_dict")
        return {"fit_feats": self._fit_inputs[0], "held_feats": self._fit_inputs[1]}

    def load_state_dict(self, state: dict[str, list[Tensor]]) -> None:
        """Refits scorer, OCSVM and soft weight on the saved features (tensors only)."""
        self.fit(list(state["fit_feats"]), list(state["held_feats"]))

    def score(self, feats: list[Tensor]) -> np.ndarray:
        """OCSVM scores (B,) of the standardised layer scores."""
        if self.svm is None:
            raise RuntimeError("O3Detector.fit must run before score")
        return self.svm.score_samples(self._layer_scores(feats))

    def weight(self, feats: list[Tensor]) -> Tensor:
        """Soft weights (B,) after post-processing (``scienceqa``: in [0, 1.2])."""
        return torch.from_numpy(self.weight_fn(self.score(feats))).float()
