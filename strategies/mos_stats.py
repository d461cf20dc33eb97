"""MOS class statistics, Gaussian classifier alignment and the adapter-0 prototype classifier.

Part of MOS (Sun et al., AAAI 2025, https://arxiv.org/abs/2412.09441). The classifier
alignment is not in the paper; the official code (``classifer_align``) takes it from SLCA
(Zhang et al., ICCV 2023, https://arxiv.org/abs/2303.05118), as the maintainer says in
LAMDA-PILOT issue #34.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from adaptsim.cl.scenarios import Experience
from adaptsim.cl.train import FitFn, Phase
from adaptsim.strategies.mos_retrieval import MOSRetrievalMixin, multi_adapter_features

__all__ = ["MOSStatsMixin", "gaussian_samples"]

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

    def _align_classifier(self, fit: FitFn) -> dict[str, float]:
        """Re-trains the head on Gaussian samples of every seen class (official classifier alignment).

        ``crct_epochs`` epochs of ``ca_samples_per_class`` samples per class are drawn up front and
        run as one phase with batches of ``ca_samples_per_class`` (the official batch), i.e. the
        official number of steps (``crct_epochs * n_seen_classes``); CE over seen classes.
        """
        cfg = self.config
        n = cfg.ca_samples_per_class or 5 * cfg.batch_size
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,)).item()))
        classes = sorted(self.class_means)
        with torch.no_grad():
            xs = torch.cat([gaussian_samples(self.class_means[c], self.class_covs[c], n * cfg.crct_epochs, gen)
                            for c in classes])  # (E*C*n, D)
            ys = torch.tensor(classes, device=self.device).repeat_interleave(n * cfg.crct_epochs)
        loss_fn = lambda f, y: F.cross_entropy(self.mask_unseen(self.head(f)), y)  # noqa: E731
        return fit(Phase("mos_align", list(self.head.parameters()), loss_fn, TensorDataset(xs, ys), 1,
                         cfg.ca_lr, n, optimizer="sgd", weight_decay=cfg.weight_decay,
                         seed=len(self.stored)))
