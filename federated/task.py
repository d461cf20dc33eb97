"""Everything a client or the server computes, framework-free (no Flower imports).

Paper: FFA-LoRA, "Improving LoRA in Privacy-preserving Federated Learning", Sun et al., ICLR 2024,
https://arxiv.org/abs/2403.12313.

- :func:`build_model` / :func:`get_model`: frozen ViT + LoRA on q, v + linear head; ``get_model``
  caches one model per process and model-relevant config (Flower rebuilds ClientApps per call).
- :func:`trainable_arrays`: what a client sends (``lora``: A, B, head; ``ffa_lora``: B, head).
- :func:`client_fit`: one client round of local SGD or DP-SGD (Opacus), with the client's DP
  accountant carried in a plain ``client_state`` dict across rounds and, when a
  :class:`~adaptsim.federated.privacy.NodeDPStore` is given, in a file on the client's node.
- :func:`evaluate`: accuracy and loss of given arrays on a test set.

Local training goes through the one shared loop, :func:`adaptsim.federated.local_train.local_train`
(SGD and DP-SGD alike). Which arrays are sent follows the method's registry entry
(:mod:`adaptsim.federated.methods.lora`: ``sends_a``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from adaptsim.cl.backbones import create_backbone
from adaptsim.cl.data import ImageTensorDataset, load_dataset
from adaptsim.federated.config import FedExperimentConfig
from adaptsim.federated.model import FedLoRAModel
from adaptsim.federated.partition import partition_indices
from adaptsim.federated.local_train import local_train
from adaptsim.federated.privacy import (NodeDPStore, check_delta, epsilon_of, flatten_history, longer_history,
                                        plan_dp, privacy_label, unflatten_history, would_exceed)

log = logging.getLogger(__name__)

__all__ = ["build_model", "get_model", "initial_arrays", "load_data", "client_dataset", "trainable_arrays",
           "load_arrays", "client_fit", "evaluate", "prefix_tokens", "resolve_device"]

_MODELS: dict[tuple, FedLoRAModel] = {}
_DATA: dict[Any, tuple[ImageTensorDataset, ImageTensorDataset]] = {}
_PREFIX: dict[tuple[str, str], torch.Tensor] = {}
_INITIAL: dict[tuple, dict[str, np.ndarray]] = {}


def resolve_device(cfg: FedExperimentConfig) -> torch.device:
    """The torch device of ``federated.device`` (``auto`` = cuda when available)."""
    d = cfg.federated.device
    return torch.device("cuda" if d == "auto" and torch.cuda.is_available() else ("cpu" if d == "auto" else d))


def load_data(cfg: FedExperimentConfig) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(train, test) of ``scenario.dataset``, loaded once per process."""
    key = cfg.scenario.dataset
    if key not in _DATA:
        _DATA[key] = load_dataset(key)
    return _DATA[key]


def build_model(cfg: FedExperimentConfig) -> FedLoRAModel:
    """A fresh model: frozen backbone, LoRA on ``federated.targets``, head (seeded, on device).

    Args:
        cfg: the experiment (backbone, dataset for the class count, LoRA settings).

    Returns:
        The model; A is built from ``federated.a_seed`` and frozen for ``ffa_lora``.
    """
    fed = cfg.federated
    n_classes = len(load_data(cfg)[0].class_names)
    torch.manual_seed(fed.seed)  # random backbones (tiny_vit) are identical on every client
    backbone = create_backbone(cfg.backbone)
    model = FedLoRAModel(backbone, n_classes, rank=fed.rank, alpha=fed.alpha, targets=fed.targets,
                         lora_blocks=fed.lora_blocks, a_seed=fed.a_seed,
                         freeze_a=not _sends_a(fed.method), head_seed=fed.seed)
    return model.to(resolve_device(cfg))


def _model_key(cfg: FedExperimentConfig) -> tuple:
    f = cfg.federated
    return (cfg.scenario.dataset, cfg.backbone, f.method, f.rank, f.alpha, f.targets, f.lora_blocks,
            f.a_seed, f.seed, f.device)


def get_model(cfg: FedExperimentConfig) -> FedLoRAModel:
    """:func:`build_model`, cached per process (callers always load the round's arrays)."""
    key = _model_key(cfg)
    if key not in _MODELS:
        model = build_model(cfg)
        _INITIAL[key] = trainable_arrays(model, "lora")  # A, B and head as built
        _MODELS[key] = model
    return _MODELS[key]


def initial_arrays(cfg: FedExperimentConfig) -> dict[str, np.ndarray]:
    """The server's round-0 global arrays (as built from the seeds, whatever the cache holds)."""
    model = get_model(cfg)
    init = _INITIAL[_model_key(cfg)]
    return {n: init[n].copy() for n in _sent_names(model, cfg.federated.method)}


def _sends_a(method: str) -> bool:
    """Whether ``method`` trains and sends the LoRA A matrices (its registry entry says)."""
    from adaptsim.federated.methods import fed_method_class

    return bool(getattr(fed_method_class(method), "sends_a", False))


def _sent_names(model: nn.Module, method: str) -> list[str]:
    names, send_a = [], _sends_a(method)
    for n, _ in model.named_parameters():
        if n.startswith("head.") or "lora_B" in n or (send_a and "lora_A" in n):
            names.append(n)
    return names


def trainable_arrays(model: nn.Module, method: str) -> dict[str, np.ndarray]:
    """What a client sends (and the server broadcasts): name -> float32 copy.

    Args:
        model: a :class:`FedLoRAModel`.
        method: ``"lora"`` (A, B and head) or ``"ffa_lora"`` (B and head; A never leaves).

    Returns:
        Ordered mapping of parameter name to array.
    """
    params = dict(model.named_parameters())
    return {n: params[n].detach().cpu().numpy().copy() for n in _sent_names(model, method)}


@torch.no_grad()
def load_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copies ``arrays`` into the model's parameters of the same names.

    Raises:
        KeyError: for a name the model does not have.
        ValueError: for a shape mismatch.
    """
    params = dict(model.named_parameters())
    for n, a in arrays.items():
        if n not in params:
            raise KeyError(f"load_arrays: model has no parameter {n!r}")
        p = params[n]
        if tuple(a.shape) != tuple(p.shape):
            raise ValueError(f"load_arrays: {n!r} has shape {tuple(a.shape)}, model {tuple(p.shape)}")
        p.copy_(torch.as_tensor(np.asarray(a), dtype=p.dtype, device=p.device))


def client_dataset(cfg: FedExperimentConfig, partition_id: int,
                   num_partitions: int) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """The client's training partition and the (shared, global) test set.

    Args:
        cfg: experiment (dataset and partition settings).
        partition_id: this client's index in ``[0, num_partitions)``.
        num_partitions: number of partitions.

    Returns:
        ``(train partition, global test set)``; deterministic for a given config.

    Raises:
        ValueError: for a partition id out of range.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id {partition_id} outside [0, {num_partitions})")
    f = cfg.federated
    train, test = load_data(cfg)
    parts = partition_indices(train.targets, num_partitions, f.partition, alpha=f.dirichlet_alpha,
                              seed=f.partition_seed, min_partition_size=f.min_partition_size)
    return train.subset(parts[partition_id]), test


@torch.no_grad()
def prefix_tokens(model: FedLoRAModel, ds: ImageTensorDataset, batch_size: int = 256) -> torch.Tensor:
    """Frozen-prefix tokens (N, T, D) of ``ds``, cached per process by content and backbone."""
    key = (model.prefix_id, ds.fingerprint)
    if key not in _PREFIX:
        dev = next(model.parameters()).device
        chunks = [model.encode_prefix(ds.x[i:i + batch_size].to(dev)).cpu()
                  for i in range(0, len(ds), batch_size)]
        _PREFIX[key] = torch.cat(chunks) if chunks else torch.empty(0)
    return _PREFIX[key]


def _trainable_groups(model: FedLoRAModel, fed) -> list[dict]:
    """The optimiser's parameter groups: every trainable LoRA parameter, and the head."""
    lora = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    return [{"params": lora, "lr": fed.lr}, {"params": list(model.head.parameters()), "lr": fed.head_lr or fed.lr}]


def client_fit(model: FedLoRAModel, arrays_in: dict[str, np.ndarray], train_ds: ImageTensorDataset,
               cfg: FedExperimentConfig, client_state: dict | None, *, client_id: int = 0,
               round_idx: int | None = None,
               node_store: NodeDPStore | None = None) -> tuple[dict[str, np.ndarray], int, dict, dict]:
    """One client round: load the global arrays, train locally, return what the client sends.

    Args:
        model: the (cached) model; its A matrices must come from the server's ``a_seed``.
        arrays_in: the global arrays the server sent (:func:`trainable_arrays` layout).
        train_ds: the client's partition.
        cfg: the experiment.
        client_state: what this function returned last round for this client (``None`` first).
            Plain numbers and float lists: ``rounds_done``, ``noise_multiplier``, ``dp_history``.
        client_id: seeds the batch order (and, with ``dp.reproducible``, the DP noise).
        round_idx: seeds the batch order (default: ``client_state["rounds_done"]``).
        node_store: the DP state file on this client's node: the accountant is restored from
            it (or from ``client_state``, whichever spent more) and saved to it after training.

    Returns:
        ``(arrays_out, num_examples, metrics, new_client_state)``. ``metrics``: ``loss``,
        ``epsilon`` (inf without DP), ``budget_spent`` (0/1), ``steps``, ``seconds``,
        ``privacy`` (:func:`~adaptsim.federated.privacy.privacy_label`) and ``dp_params`` (the
        parameters Opacus clipped and noised: exactly the sent ones). A client whose budget is
        spent does not train and returns ``num_examples = 0``.

    Raises:
        adaptsim.cl.config.ConfigError: if ``dp.delta >= 1 / len(train_ds)``.
        RuntimeError: if DP noised a parameter set other than the one sent.
    """
    fed = cfg.federated
    state = dict(client_state or {})
    rounds_done = int(state.get("rounds_done", 0))
    r = rounds_done if round_idx is None else round_idx
    seed = (fed.seed * 1_000_003 + client_id * 10_007 + r) % 2**31
    start = time.perf_counter()
    load_arrays(model, arrays_in)
    n = len(train_ds)
    plan, history = None, unflatten_history(state.get("dp_history"))
    base = {"privacy": privacy_label(fed.dp), "dp_params": []}
    if fed.dp.enabled:
        check_delta(fed.dp.delta, n, client_id)
        node = node_store.load() if node_store is not None else {}
        history = longer_history(history, unflatten_history(node.get("dp_history")))
        plan = plan_dp(n, fed.batch_size, fed.local_epochs, fed.rounds, fed.dp)
        sigma = state.get("noise_multiplier", node.get("noise_multiplier"))
        if sigma is not None:  # sigma is fixed in the client's first round
            plan = dataclasses.replace(plan, noise_multiplier=float(sigma))
        state.update(noise_multiplier=plan.noise_multiplier, dp_history=flatten_history(history))
        if would_exceed(history, plan, fed.dp):
            eps = epsilon_of(history, fed.dp)
            log.info("client %d: privacy budget spent (epsilon %.3f of %.3f); not training",
                     client_id, eps, fed.dp.epsilon)
            metrics = {"loss": float("nan"), "epsilon": eps, "budget_spent": 1, "steps": 0,
                       "seconds": time.perf_counter() - start, **base}
            return dict(arrays_in), 0, metrics, state
    tokens = prefix_tokens(model, train_ds, fed.eval_batch_size)
    res = local_train(model, _trainable_groups(model, fed), TensorDataset(tokens, train_ds.y), fed, seed,
                      plan=plan, history=history)
    loss, steps, history, noised = res.loss, res.steps, res.history, res.noised
    out = trainable_arrays(model, fed.method)
    if plan is not None:
        if noised != sorted(out):
            raise RuntimeError(f"client {client_id}: DP noised {noised} but would send {sorted(out)}")
        if node_store is not None:
            node_store.save(plan.noise_multiplier, history)
    eps = epsilon_of(history, fed.dp) if plan is not None else math.inf
    state.update(rounds_done=rounds_done + 1, dp_history=flatten_history(history))
    metrics = {"loss": loss, "epsilon": eps, "budget_spent": 0, "steps": steps,
               "seconds": time.perf_counter() - start, **base, "dp_params": noised}
    return out, n, metrics, state


@torch.no_grad()
def evaluate(model: FedLoRAModel, arrays: dict[str, np.ndarray], test_ds: ImageTensorDataset,
             batch_size: int = 256) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``arrays`` on ``test_ds``.

    Returns:
        ``{"accuracy", "loss", "num_examples"}``.
    """
    load_arrays(model, arrays)
    model.eval()
    dev = next(model.parameters()).device
    tokens = prefix_tokens(model, test_ds, batch_size)
    correct, loss_sum = 0, 0.0
    for i in range(0, len(test_ds), batch_size):
        logits = model.forward_tokens(tokens[i:i + batch_size].to(dev))  # (B, C)
        y = test_ds.y[i:i + batch_size].to(dev)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    n = max(len(test_ds), 1)
    return {"accuracy": correct / n, "loss": loss_sum / n, "num_examples": len(test_ds)}
