"""MOS inference: features under several adapter sets and self-refined adapter retrieval.

Part of MOS (Sun et al., AAAI 2025, https://arxiv.org/abs/2412.09441). At inference MOS needs,
for every test image, its features under stored adapter sets; the official code runs one ViT
forward per adapter set (T + 1 forwards per batch). Three ways are offered here, all giving the
same predictions (the retrieval reads only features it visits):

* ``loop``: one forward per adapter set (the official way; the benchmark baseline);
* ``batched``: the batch replicated T + 1 times with adapter ids 0..T in **one** forward through
  the multi-adapter path of :class:`~adaptsim.strategies.adapters.AdapterBank` (the patch
  embedding is computed once and shared);
* ``lazy``: adapter 0 for every sample, then per retrieval round one mixed-id forward over
  only the samples still moving, each with the adapter the round asks for (at most
  ``1 + max_iter`` forwards of shrinking batches instead of T + 1 full ones).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adaptsim.strategies.mos_adapters import MOSAdapterLayer

__all__ = ["stem_tokens", "features_from_tokens", "multi_adapter_features", "refine",
           "RETRIEVAL_MODES"]

RETRIEVAL_MODES = ("batched", "lazy", "loop")


def stem_tokens(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens (B, N, D) entering the first block (timm ViT: patch + position embedding)."""
    m = backbone.model
    t = m.patch_embed(backbone.preprocess(x))
    t = m._pos_embed(t)
    t = m.patch_drop(t)
    return m.norm_pre(t)


def features_from_tokens(backbone: nn.Module, layers: Sequence[MOSAdapterLayer], tokens: torch.Tensor,
                         route: str | torch.Tensor) -> torch.Tensor:
    """Pooled features (B, D) of ``tokens`` (B, N, D) with every adapter layer routed to ``route``."""
    for layer in layers:
        layer.route(route)
    try:
        m = backbone.model
        return m.forward_head(m.norm(m.blocks(tokens)), pre_logits=True)
    finally:
        for layer in layers:
            layer.route(None)


def multi_adapter_features(backbone: nn.Module, layers: Sequence[MOSAdapterLayer], x: torch.Tensor,
                           ids: Sequence[int], batched: bool = True) -> torch.Tensor:
    """Features of ``x`` under each adapter id in ``ids``.

    Args:
        backbone: the wrapped timm backbone.
        layers: its MOS adapter layers.
        x: (B, C, H, W) images.
        ids: bank ids (K of them).
        batched: one forward over the K-times replicated batch (True) or K forwards (False).

    Returns:
        (K, B, D) features.
    """
    tokens = stem_tokens(backbone, x)  # (B, N, D)
    b = tokens.shape[0]
    if not batched:
        names = layers[0].names
        return torch.stack([features_from_tokens(backbone, layers, tokens, names[i]) for i in ids])
    k = len(ids)
    rep = tokens.repeat(k, 1, 1)  # (K*B, N, D): copy j holds adapter ids[j]
    id_t = torch.tensor(list(ids), device=tokens.device).repeat_interleave(b)  # (K*B,)
    return features_from_tokens(backbone, layers, rep, id_t).view(k, b, -1)


def refine(head_logits: Callable[[torch.Tensor], torch.Tensor], get_features: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
           tau0: torch.Tensor, cls2task: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Self-refined adapter retrieval, vectorised over the batch (official ``_eval_cnn`` loop).

    Each sample starts from task ``tau0``; a round classifies its features under adapter tau
    with the head, maps the predicted class to its task tau', and stops when tau' == tau or
    after ``max_iter`` rounds (the official ``MAX_ITER = 4``).

    Args:
        head_logits: (n, D) features -> (n, C) masked head logits.
        get_features: ``(sample_index (n,), task (n,)) -> (n, D)`` features of those samples
            under those adapter sets.
        tau0: (B,) initial task per sample (from the prototype classifier).
        cls2task: (C,) task of each class (-1 for unseen classes).
        max_iter: maximum number of rounds.

    Returns:
        (B, C) head logits of each sample's final adapter set.
    """
    tau = tau0.clone()
    idx = torch.arange(tau.shape[0], device=tau.device)
    active = torch.ones_like(tau, dtype=torch.bool)
    final: torch.Tensor | None = None
    for it in range(1, max_iter + 1):
        a = idx[active]
        logits = head_logits(get_features(a, tau[a]))  # (n, C)
        if final is None:
            final = logits.new_zeros(tau.shape[0], logits.shape[1])
        new_tau = cls2task[logits.argmax(-1)]
        done = (new_tau == tau[a]) | (it == max_iter)
        final[a[done]] = logits[done]
        tau[a[~done]] = new_tau[~done]
        active[a[done]] = False
        if not active.any():
            break
    assert final is not None
    return final


def ensemble(head_logits: torch.Tensor, proto_logits: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """Two-view ensemble: ``softmax(head) + softmax(n_tasks * prototype cosine logits)``."""
    return F.softmax(head_logits, dim=-1) + F.softmax(proto_logits * n_tasks, dim=-1)


class MOSRetrievalMixin:
    """``predict`` of :class:`adaptsim.strategies.mos.MOS` (needs its layers, head, prototypes)."""

    def _retrieval_forward_names(self, names: list[str]) -> None:
        """Official merge mode: the stored sets used in this pass drift (set 0 never does)."""
        if self.config.merge_mode == "official":
            self._merge_now = [n for n in names if self._sources(n)]

    @torch.no_grad()
    def predict(self, x: torch.Tensor, retrieval: str | None = None) -> torch.Tensor:
        """Scores (B, n_classes) by self-refined adapter retrieval and the two-view ensemble.

        Args:
            x: (B, C, H, W) images.
            retrieval: override of ``config.retrieval`` (``batched``, ``lazy`` or ``loop``).

        Returns:
            (B, n_classes) scores, -inf on unseen classes (zeros before the first task).
        """
        mode = retrieval or self.config.retrieval
        stored = self.stored
        x = x.to(self.device)
        if not stored:
            return torch.zeros(x.shape[0], self.info.n_classes, device=self.device)
        n_tasks = len(stored)
        head = lambda f: self.mask_unseen(self.head(f))  # noqa: E731
        try:
            if mode == "lazy":
                final, proto = self._lazy_retrieval(x, n_tasks, head)
            elif mode in ("batched", "loop"):
                if mode == "batched":
                    self._retrieval_forward_names(stored)
                    feats = multi_adapter_features(self.backbone, self.layers, x, range(n_tasks))  # (T+1, B, D)
                else:  # one forward per set; in official mode each forward drifts only its own set
                    per = []
                    for i, name in enumerate(stored):
                        self._retrieval_forward_names([name])
                        per.append(multi_adapter_features(self.backbone, self.layers, x, [i], batched=False)[0])
                    feats = torch.stack(per)  # (T+1, B, D)
                self._merge_now = []
                proto = self.prototypes(feats[0])  # (B, C) cosine logits, adapter-0 features
                tau0 = self.cls2task[proto.argmax(-1)]
                final = refine(head, lambda a, tau: feats[tau, a], tau0, self.cls2task, self.config.max_iter)
            else:
                raise ValueError(f"retrieval must be one of {RETRIEVAL_MODES}, got {mode!r}")
        finally:
            self._merge_now = []
        out = ensemble(final, proto, n_tasks) if self.config.ensemble else final
        return self.mask_unseen(out)

    def _lazy_retrieval(self, x: torch.Tensor, n_tasks: int, head) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval computing only visited (sample, set) features, one mixed-id pass per round."""
        tokens = stem_tokens(self.backbone, x)  # (B, N, D)
        f0 = features_from_tokens(self.backbone, self.layers, tokens, self.stored[0])  # (B, D)
        cache = f0.new_zeros(n_tasks, *f0.shape)  # (T+1, B, D)
        have = torch.zeros(n_tasks, f0.shape[0], dtype=torch.bool, device=f0.device)
        cache[0], have[0] = f0, True

        def get(a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
            miss = ~have[tau, a]
            if miss.any():
                am, tm = a[miss], tau[miss]
                cache[tm, am] = features_from_tokens(self.backbone, self.layers, tokens[am], tm)
                have[tm, am] = True
            return cache[tau, a]

        proto = self.prototypes(f0)
        final = refine(head, get, self.cls2task[proto.argmax(-1)], self.cls2task, self.config.max_iter)
        return final, proto
