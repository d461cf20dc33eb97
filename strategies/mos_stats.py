"""MOS class statistics, Gaussian classifier alignment and the adapter-0 prototype classifier.

Part of MOS (Sun et al., AAAI 2025, https://arxiv.org/abs/2412.09441). The classifier
alignment is not in the paper; the official code (``classifer_align``) takes it from SLCA
(Zhang et al., ICCV 2023, https://arxiv.org/abs/2303.05118), as the maintainer says in
LAMDA-PILOT issue #34.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.mos_retrieval import MOSRetrievalMixin, multi_adapter_features

__all__ = ["EpochSamples", "MOSStatsMixin", "gaussian_samples"]

_COV_EPS = 1e-4  # official: torch.cov(...) + 1e-4 * I


def gaussian_samples(mean: torch.Tensor, cov: torch.Tensor, n: int, generator: torch.Generator | None = None
                     ) -> torch.Tensor:
    """``n`` samples (n, D) of N(mean, cov); ``cov`` is (D, D) or a (D,) diagonal.

    Departure: the Cholesky factor is computed in float64 (official: float32
    ``MultivariateNormal``), so covariances from fewer samples than dimensions still factor.
    """
    z = torch.randn(n, mean.shape[0], generator=generator, dtype=torch.float64).to(mean.device)
    if cov.ndim == 1:
        return (mean.double() + z * cov.double().sqrt()).to(mean.dtype)
    L = torch.linalg.cholesky(cov.double())  # (D, D)
    return (mean.double() + z @ L.T).to(mean.dtype)


class MOSStatsMixin(MOSRetrievalMixin):
    """Statistics and alignment of :class:`adaptsim.strategies.mos.MOS`."""

    @torch.no_grad()
    def _batches(self, x: torch.Tensor, name_ids: list[int]) -> torch.Tensor:
        """Features (K, N, D) of all of ``x`` under bank ids ``name_ids`` (one batched pass per chunk)."""
        bs = self.config.eval_batch_size
        out = [multi_adapter_features(self.backbone, self.layers, x[i : i + bs].to(self.device), name_ids)
               for i in range(0, len(x), bs)]
        return torch.cat(out, 1)

    @torch.no_grad()
    def _carry_features(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Official merge mode: features under the drifting ``carry`` set, per class in batches
        of ``3 * batch_size`` (official ``_compute_mean``), each forward merging it L times."""
        feats = torch.zeros(len(x), self.backbone.embed_dim, device=self.device)
        bs = 3 * self.config.batch_size
        for c in y.unique().tolist():
            idx = (y == c).nonzero().squeeze(1)
            for i in range(0, len(idx), bs):
                j = idx[i : i + bs]
                feats[j.to(self.device)] = self.features_under(x[j].to(self.device), "carry")
        return feats

    @torch.no_grad()
    def _update_statistics(self, exp: Experience, name: str) -> None:
        """Class means/covariances under set ``name`` and adapter-0 prototypes of ``exp``'s classes."""
        x, y = exp.train.x, exp.train.y
        t = self.layers[0].names.index(name)
        if self.config.merge_mode == "official":
            stat_feats = self._carry_features(x, y)
            proto_feats = self._batches(x, [0])[0]
        else:  # adapter t (statistics) and adapter 0 (prototypes) in one batched pass
            both = self._batches(x, [0, t] if t else [0])
            proto_feats, stat_feats = both[0], both[-1]
        y = y.to(self.device)
        self.prototypes.set_prototypes(proto_feats, y)
        for c in y.unique().tolist():
            f = stat_feats[y == c]  # (n_c, D)
            self.class_means[c] = f.mean(0)
            cov = torch.cov(f.T) if len(f) > 1 else torch.zeros(f.shape[1], f.shape[1], device=f.device)
            cov = cov + _COV_EPS * torch.eye(f.shape[1], device=f.device)
            self.class_covs[c] = cov.diagonal().clone() if self.config.ca_stats == "variance" else cov

    def _align_classifier(self, fit: FitFn, seed: int | None = None) -> dict[str, float]:
        """Re-trains the head on Gaussian samples of every seen class (official classifier alignment).

        ``crct_epochs`` epochs of ``ca_samples_per_class`` samples per class are drawn up front,
        in batches of ``ca_samples_per_class`` (the official batch), i.e. the official number of
        steps (``crct_epochs * n_seen_classes``); CE over seen classes. With
        ``schedule_unit="epoch"`` (official) the phase runs ``crct_epochs`` epochs, each over its
        own fresh samples (:class:`EpochSamples`), and the cosine steps per epoch; with ``step``
        it is one epoch over all samples with the cosine decaying every step. The samples' generator
        is seeded from the global RNG, or from ``seed`` when given (the federated server's).
        """
        cfg = self.config
        n = cfg.ca_samples_per_class or 5 * cfg.batch_size
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        gen = torch.Generator().manual_seed(seed)
        classes = sorted(self.class_means)
        with torch.no_grad():
            xs = torch.cat([gaussian_samples(self.class_means[c], self.class_covs[c], n * cfg.crct_epochs, gen)
                            for c in classes])  # (C*E*n, D), class-major
            ys = torch.tensor(classes, device=self.device).repeat_interleave(n * cfg.crct_epochs)
        loss_fn = lambda f, y: F.cross_entropy(self.mask_unseen(self.head(f)), y)  # noqa: E731
        if cfg.schedule_unit == "epoch":
            data = EpochSamples(xs, ys, len(classes), cfg.crct_epochs, steps_per_epoch=len(classes))
            epochs, after_step = cfg.crct_epochs, data.step
        else:
            data, epochs, after_step = TensorDataset(xs, ys), 1, None
        return fit(Phase("mos_align", list(self.head.parameters()), loss_fn, data, epochs,
                         cfg.ca_lr, n, optimizer="sgd", weight_decay=cfg.weight_decay,
                         schedule_unit=cfg.schedule_unit, after_step=after_step, seed=len(self.stored),
                         client_data=False))  # samples of released statistics: DP post-processing


class EpochSamples(Dataset):
    """Fresh samples every epoch for a multi-epoch phase (official alignment draws per epoch).

    Holds ``epochs`` disjoint slices of the samples of each class; item ``i`` of the current epoch
    is item ``i`` of that epoch's slice. :meth:`step` (``Phase.after_step``) counts optimiser
    steps and moves to the next epoch's slice after ``steps_per_epoch`` of them; :func:`fit`'s
    loader fetches each batch just before its step (no workers), so every epoch reads its own.

    Args:
        x: (C*E*n, D) samples, class-major (class c's E*n samples together).
        y: (C*E*n,) labels.
        n_classes: C.
        epochs: E.
        steps_per_epoch: optimiser steps per epoch (``ceil(C*n / batch)``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int, steps_per_epoch: int) -> None:
        self.per_class = len(x) // (n_classes * epochs)  # n
        d = x.shape[-1]
        # (E, C*n, D): epoch e holds samples [e*n, (e+1)*n) of every class
        self.x = x.view(n_classes, epochs, self.per_class, d).transpose(0, 1).reshape(epochs, -1, d)
        self.y = y.view(n_classes, epochs, self.per_class).transpose(0, 1).reshape(epochs, -1)
        self.epochs, self.steps_per_epoch, self.steps = epochs, steps_per_epoch, 0

    @property
    def epoch(self) -> int:
        return min(self.steps // self.steps_per_epoch, self.epochs - 1)

    def step(self) -> None:
        self.steps += 1

    def __len__(self) -> int:
        return self.x.shape[1]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.epoch
        return self.x[e, i], self.y[e, i]
