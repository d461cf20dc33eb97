"""What a strategy shares in federated continual learning, and how the server aggregates it.

A client's strategy returns a :class:`SharedState` from ``Strategy.shareable_state()``:

* ``arrays``: named parameters (adapters, heads), averaged by the server weighted by
  ``weight`` (the client's number of training examples), as FedAvg does;
* ``stats``: :class:`ClassStats`, sufficient statistics of features per class (counts, sums and,
  where a strategy needs covariances, sums of outer products), which the server *adds up*. Means
  and covariances computed from the sums equal those of the pooled data: the aggregation is
  exact, not an average of client means;
* ``meta``: small JSON-able structure (adapter names, seen classes, the round's phase), which
  clients must agree on; the default aggregation passes it through and refuses disagreement.

``Strategy.load_shared_state(state)`` takes the aggregate back. Statistics are kept in float64;
float32 features summed in float64 are exact unless their exponents span more than about
``53 - 24 - log2(n)`` bits, so the federated sums are bit-identical to the pooled ones on
ordinary features (a test checks it on real features).

Which strategies share what is declared by the class attribute ``Strategy.sharing``
(``None``: no federated support); :func:`check_sharing` refuses the others with the list, and
the settings a sharing strategy cannot run federated with (its optional classmethod
``federated_config_error(config) -> str | None``).

Contract (the in-process loop :func:`adaptsim.federated.fcl.loop.run_fcl` and the Flower path
both follow it):

* **A client round** is ``load_shared_state(global)`` (skipped on the very first round of the
  run) -> ``train_experience(share, fit)`` -> ``shareable_state()``. The rounds of one
  experience call ``train_experience`` on the same experience again: the strategy *continues*
  training the parameters it got from ``global`` (it does not re-initialise them).
* **Randomness.** Every client call starts from the torch RNG state of a freshly built strategy
  (the in-process loop restores it; a rebuilt Flower client has it), so parameters a strategy
  builds lazily (MOS's first adapter set) start equal on all clients.
* **The server** (its own copy of the strategy) computes ``agg = aggregate_shared(states)``,
  then ``load_shared_state(agg)``; ``agg`` is the ``global`` of the next round.
* **Rebuilt clients.** A *freshly built* strategy that calls ``load_shared_state(agg)`` reaches
  the server copy's state (same predictions): Flower clients are rebuilt every round from the
  global state, so ``agg`` must carry everything a client needs (MOS's aggregate holds the full
  model: stored adapter sets, class statistics, head, prototypes).
* **Statistics round** (strategies with class attribute ``statistics_round = True``, i.e.
  ``mos``): after the training rounds of an experience, one more round with no training:
  ``load_shared_state(global)`` -> ``collect_statistics(share)`` -> ``shareable_state()``,
  aggregated and loaded as above. It gives the class statistics under the *final* global
  adapters; the server's ``aggregate_shared`` finishes the experience from them (MOS: class
  means/covariances, prototypes, classifier alignment) and ships the result in ``agg``.
* Then the server's ``end_experience()`` is called and the server copy is evaluated.
* **What travels** (:meth:`SharedState.to_arrays`, the wire format; ``nbytes()`` counts it): the
  arrays whole, and of each :class:`ClassStats` only the rows with a non-zero entry plus a (C,)
  uint8 row mask (:meth:`ClassStats.to_wire`). A client's statistics hold only its share's
  classes, all of the current experience (under DP every noised row, i.e. all the experience's
  classes, whether or not the client holds data of them); an aggregate's, the classes seen so far.
  The receiver puts the zero rows back (:meth:`ClassStats.from_wire`), so in memory statistics are
  dense (C rows) and the server's sums are exactly those of dense uploads.
* **DP** (``fcl.dp``, :mod:`adaptsim.federated.fcl.dp`): the loop sets ``dp_feature_clip`` on
  every client strategy; a strategy that shares :class:`ClassStats` must build them with
  ``class_stats(..., clip=self.dp_feature_clip)`` from *one* pass over its share (each example
  enters each kind at most once) and declare ``dp_releases = {round_kind: n}``, the number of
  released arrays (counts, sums, outer products: one each per kind) in a round of that kind.
  Before upload the loop noises them (:func:`gaussian_release`, on every row of the current
  experience's classes) and counts them in the client's accountant. Noisy statistics have float
  counts (possibly below 1 or negative) and non-PSD outer products; :class:`ClassStats` tolerates
  them: means divide by ``max(count, 1)``, covariances are projected onto the PSD cone (plus a
  ridge of 1e-5 times the top eigenvalue).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["ClassStats", "SharedState", "aggregate_shared", "check_sharing", "class_stats", "clip_features",
           "gaussian_release", "sharing_strategies", "flatten_state", "unflatten_state"]


@dataclass
class ClassStats:
    """Per-class sufficient statistics of features (float64).

    Attributes:
        counts: (C,) int64 number of samples per class (float64 after :func:`gaussian_release`).
        sums: (C, D) float64 sum of features per class.
        outer: (C, D, D) float64 sum of ``f f^T`` per class, or ``None`` when not needed.
    """

    counts: np.ndarray
    sums: np.ndarray
    outer: np.ndarray | None = None

    def __add__(self, other: "ClassStats") -> "ClassStats":
        if (self.outer is None) != (other.outer is None) or self.sums.shape != other.sums.shape:
            raise ValueError("ClassStats of different shapes or kinds cannot be added")
        outer = None if self.outer is None else self.outer + other.outer
        return ClassStats(self.counts + other.counts, self.sums + other.sums, outer)

    @property
    def noisy(self) -> bool:
        """Released through :func:`gaussian_release` (float counts; survives the wire format)."""
        return self.counts.dtype.kind == "f"

    def classes(self) -> list[int]:
        """Classes with at least one sample (noisy statistics: every noised row, whatever its count)."""
        return [int(c) for c in np.flatnonzero(self.counts)]

    def present(self) -> np.ndarray:
        """(C,) bool: the class holds samples (noisy statistics: a noisy count of at least 1/2)."""
        return self.counts >= 0.5

    def means(self) -> np.ndarray:
        """(C, D) float64 class means (rows of empty classes are 0)."""
        n = np.maximum(self.counts, 1)[:, None]
        return self.sums / n

    def covariances(self) -> np.ndarray:
        """(C, D, D) float64 unbiased covariances from the sums (classes with < 2 samples: 0)."""
        if self.outer is None:
            raise ValueError("these ClassStats hold no outer products")
        mu = self.means()
        n = self.counts.astype(np.float64)[:, None, None]
        if self.noisy:  # a noisy count below 1 counts as 1 (as in means())
            n = np.maximum(n, 1.0)
        cov = self.outer - n * np.einsum("cd,ce->cde", mu, mu)
        cov = np.where(n > 1, cov / np.maximum(n - 1, 1), 0.0)
        if self.noisy:  # noise breaks positive semi-definiteness: project onto the PSD cone, with a
            for c in self.classes():  # ridge of 1e-5 x the top eigenvalue (stays PD in float32)
                w, v = np.linalg.eigh(0.5 * (cov[c] + cov[c].T))
                w = np.maximum(w, 1e-5 * max(float(w.max()), 0.0))
                cov[c] = (v * w) @ v.T
        return cov

    def rows(self) -> np.ndarray:
        """(C,) bool: the rows that travel: any entry non-zero (a client's classes of the current
        experience; after :func:`gaussian_release` every noised row, i.e. all the experience's
        classes; an aggregate's: the classes seen so far). The other rows are exactly 0."""
        nz = (self.counts != 0) | np.any(self.sums != 0, axis=1)
        if self.outer is not None:
            nz |= np.any(self.outer.reshape(len(self.counts), -1) != 0, axis=1)
        return nz

    def to_wire(self) -> dict[str, np.ndarray]:
        """The rows that travel, lossless: ``rows`` (C,) uint8 mask, and ``counts``, ``sums``,
        ``outer`` of those rows only (:meth:`from_wire` puts the zero rows back)."""
        m = self.rows()
        out = {"rows": m.astype(np.uint8), "counts": np.ascontiguousarray(self.counts[m]),
               "sums": np.ascontiguousarray(self.sums[m])}
        if self.outer is not None:
            out["outer"] = np.ascontiguousarray(self.outer[m])
        return out

    @classmethod
    def from_wire(cls, parts: Mapping[str, np.ndarray]) -> "ClassStats":
        """Inverse of :meth:`to_wire` (without ``rows``: dense parts, as written before row selection)."""
        if "rows" not in parts:
            return cls(np.array(parts["counts"]), np.array(parts["sums"]),
                       None if parts.get("outer") is None else np.array(parts["outer"]))
        m = np.asarray(parts["rows"]).astype(bool)

        def full(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a)
            out = np.zeros((len(m), *a.shape[1:]), a.dtype)
            out[m] = a
            return out

        return cls(full(parts["counts"]), full(parts["sums"]), None if "outer" not in parts else full(parts["outer"]))

    def nbytes(self) -> int:
        """Bytes on the wire (:meth:`to_wire`: the non-zero rows and their mask)."""
        return int(sum(a.nbytes for a in self.to_wire().values()))


def clip_features(f: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Rows of ``f`` (N, D) scaled to L2 norm at most ``clip`` (``None``: unchanged)."""
    if clip is None:
        return f
    norms = f.norm(dim=1, keepdim=True)
    return f * torch.clamp(clip / torch.clamp(norms, min=torch.finfo(f.dtype).tiny), max=1.0)


def class_stats(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, *, outer: bool = False,
                clip: float | None = None) -> ClassStats:
    """:class:`ClassStats` of ``feats`` (N, D) with integer ``labels`` (N,), in float64; with
    ``clip`` every feature is first clipped to L2 norm ``clip`` (DP: bounds the sensitivity)."""
    f = clip_features(feats.detach().to("cpu", torch.float64), clip)
    y = labels.detach().to("cpu", torch.long)
    counts = torch.bincount(y, minlength=n_classes)
    sums = torch.zeros(n_classes, f.shape[1], dtype=torch.float64).index_add_(0, y, f)
    out = None
    if outer:
        out = torch.zeros(n_classes, f.shape[1], f.shape[1], dtype=torch.float64)
        for c in torch.unique(y).tolist():
            fc = f[y == c]
            out[c] = fc.T @ fc
    return ClassStats(counts.numpy().astype(np.int64), sums.numpy(), None if out is None else out.numpy())


def gaussian_release(stats: ClassStats, rows, *, clip: float, noise_multiplier: float,
                     generator: torch.Generator | None = None) -> ClassStats:
    """The Gaussian mechanism on ``stats`` (built from features clipped to ``clip``).

    One example changes one row: its count by 1, its sum by at most ``clip`` (L2), its outer
    product by at most ``clip**2`` (Frobenius; ``||f f^T||_F = ||f||^2``). Each part gets
    ``N(0, (noise_multiplier * sensitivity)^2)`` on every entry of every row in ``rows`` (the
    current experience's classes, whether or not the client holds data of them); the outer
    products on the upper triangle, mirrored (the triangle's sensitivity is at most that of the
    full matrix). Each part is one Gaussian mechanism of the accountant.

    Raises:
        ValueError: a row outside ``rows`` holds data (its sensitivity would not be covered).
    """
    rows = sorted(int(c) for c in rows)
    others = np.ones(len(stats.counts), bool)
    others[rows] = False
    if np.any(stats.counts[others] != 0):
        raise ValueError(f"statistics hold rows outside the experience's classes {rows}")
    C = len(rows)

    def noise(*shape: int) -> np.ndarray:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).numpy()

    counts = stats.counts.astype(np.float64)
    counts[rows] += noise(C) * noise_multiplier
    sums = stats.sums.astype(np.float64)
    sums[rows] += noise(C, sums.shape[1]) * noise_multiplier * clip
    outer = None
    if stats.outer is not None:
        D = stats.outer.shape[1]
        z = np.triu(noise(C, D, D)) * noise_multiplier * clip**2
        z = z + np.transpose(np.triu(z, 1), (0, 2, 1))
        outer = stats.outer.astype(np.float64)
        outer[rows] += z
    return ClassStats(counts, sums, outer)


@dataclass
class SharedState:
    """What one client shares after a round (see the module docstring)."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    weight: int = 0
    stats: dict[str, ClassStats] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> dict[str, int]:
        """Bytes on the wire by kind: ``arrays`` and ``stats`` (the rows that travel)."""
        return {"arrays": int(sum(a.nbytes for a in self.arrays.values())),
                "stats": int(sum(s.nbytes() for s in self.stats.values()))}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """This state as flat named arrays, lossless (the wire format of Flower messages):
        ``arrays/<name>``, ``stats/<kind>/rows|counts|sums|outer`` (:meth:`ClassStats.to_wire`: only
        the non-zero rows), ``fcl/weight``, ``fcl/meta`` (JSON bytes)."""
        out = {f"arrays/{k}": np.asarray(v) for k, v in self.arrays.items()}
        for kind, st in self.stats.items():
            for part, a in st.to_wire().items():
                out[f"stats/{kind}/{part}"] = a
        out["fcl/weight"] = np.array([int(self.weight)], np.int64)
        out["fcl/meta"] = np.frombuffer(json.dumps(self.meta).encode(), np.uint8).copy()
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> "SharedState":
        """Inverse of :meth:`to_arrays` (other keys ignored)."""
        named = {k[len("arrays/"):]: np.array(v) for k, v in arrays.items() if k.startswith("arrays/")}
        parts: dict[str, dict[str, np.ndarray]] = {}
        for k, v in arrays.items():
            if k.startswith("stats/"):
                kind, part = k[len("stats/"):].rsplit("/", 1)
                parts.setdefault(kind, {})[part] = np.array(v)
        stats = {kind: ClassStats.from_wire(p) for kind, p in sorted(parts.items())}
        meta = json.loads(bytes(np.asarray(arrays["fcl/meta"], np.uint8)).decode())
        return cls(named, int(np.asarray(arrays["fcl/weight"]).reshape(-1)[0]), stats, meta)


def aggregate_shared(states: list[SharedState]) -> SharedState:
    """Server side: arrays averaged weighted by ``weight``, statistics added up exactly.

    Raises:
        ValueError: no states, or clients disagree on names / shapes.
    """
    if not states:
        raise ValueError("aggregate_shared needs at least one client state")
    names, kinds = set(states[0].arrays), set(states[0].stats)
    for s in states[1:]:
        if set(s.arrays) != names or set(s.stats) != kinds:
            raise ValueError("clients shared different arrays or statistics")
        if s.meta != states[0].meta:
            raise ValueError(f"clients shared different meta: {states[0].meta} != {s.meta}")
    total = sum(s.weight for s in states)
    arrays = {}
    for k in sorted(names):
        if total <= 0:
            raise ValueError("arrays need a positive total weight")
        acc = sum(np.asarray(s.arrays[k], np.float64) * s.weight for s in states) / total
        arrays[k] = acc.astype(states[0].arrays[k].dtype)
    stats = {}
    for k in sorted(kinds):
        acc = states[0].stats[k]
        for s in states[1:]:
            acc = acc + s.stats[k]
        stats[k] = acc
    return SharedState(arrays, total, stats, dict(states[0].meta))


def flatten_state(state: Any, prefix: str = "") -> tuple[dict[str, np.ndarray], Any]:
    """Splits a nested state (dicts, lists, tensors, plain values) into arrays and structure.

    Returns ``(arrays, skeleton)``: every tensor becomes ``arrays[path]`` (numpy, its dtype kept;
    ``path`` joins the dict keys with ``/``) and is replaced in the JSON-able skeleton by
    ``{"__array__": path}``. :func:`unflatten_state` inverts it.
    """
    arrays: dict[str, np.ndarray] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            arrays[path] = obj.detach().cpu().numpy().copy()
            return {"__array__": path}
        if isinstance(obj, dict):
            return {str(k): walk(v, f"{path}/{k}" if path else str(k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        return obj

    return arrays, walk(state, prefix)


def unflatten_state(arrays: dict[str, np.ndarray], skeleton: Any) -> Any:
    """The nested state of :func:`flatten_state` (arrays back as torch tensors)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__array__"}:
            return torch.from_numpy(np.array(arrays[skeleton["__array__"]]))
        return {k: unflatten_state(arrays, v) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(arrays, v) for v in skeleton]
    return skeleton


def sharing_strategies() -> list[str]:
    """Registered strategies that implement sharing (``Strategy.sharing`` set)."""
    from adaptsim.strategies.base import get_strategy, list_strategies

    return [n for n in list_strategies() if getattr(get_strategy(n)[1], "sharing", None)]


def check_sharing(name: str, config: Any = None) -> None:
    """Raises ValueError when strategy ``name`` (with ``config``, when given) cannot run inside
    federated clients: it does not share, or its ``federated_config_error(config)`` objects."""
    from adaptsim.strategies.base import get_strategy

    cls = get_strategy(name)[1]
    if not getattr(cls, "sharing", None):
        raise ValueError(f"strategy {name!r} does not implement federated sharing "
                         f"(shareable_state/load_shared_state); those that do: {', '.join(sharing_strategies())}")
    check = getattr(cls, "federated_config_error", None)
    err = check(config) if check is not None and config is not None else None
    if err:
        raise ValueError(f"strategy {name!r} cannot run federated: {err}")
