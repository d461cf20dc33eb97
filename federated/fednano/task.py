"""FedNano client and server computations, framework-free: split channel, client fit, evaluate.

Paper: FedNano, "Toward Lightweight Federated Tuning for Pretrained Multimodal Large Language
Models", Zhang et al., arXiv 2506.14824 (https://arxiv.org/abs/2506.14824). No public code.

Split training (our reading of the paper, which leaves it under-specified): per local step the
client sends its adapted tokens (and the batch's answer ids: the server needs them for the loss)
up through a :class:`SplitChannel`; the server runs the frozen model forward and backward and
returns ``d loss / d tokens`` (and the loss value); the client back-propagates that into its
NanoAdapters. The client code never holds the server model: only the channel does, and the
channel counts every byte that crosses it. For Fisher merging one more pass over the client's
data returns per-example token gradients (also counted).

Fisher: the *empirical* diagonal Fisher, ``F = mean_i (d log p(y_i | x_i) / d theta)^2`` over the
client's data after local training, with the true answers (Matena & Raffel sample from the
model instead; with a near-converged model both agree, and the empirical one needs no sampling).
Per-example adapter gradients are exact (closed form of the low-rank adapter,
:meth:`NanoAdapter.per_example_grads`).

DP is refused (:func:`refuse_dp`): split training sends the adapted tokens and the answer ids
to the server every step, so DP-SGD on the adapters would protect nothing against the server
(docs/methods/fednano.md).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from adaptsim.cl.config import ConfigError
from adaptsim.federated.config import FedExperimentConfig
from adaptsim.federated.fednano.data import VQASet
from adaptsim.federated.fednano.fisher import with_fisher
from adaptsim.federated.fednano.system import FedNanoSystem
from adaptsim.federated.local_train import local_train
from adaptsim.federated.task import load_arrays

__all__ = ["SPLIT_KEYS", "SplitChannel", "client_fit", "evaluate", "client_arrays", "adapter_fisher", "tensor_bytes",
           "refuse_dp"]

log = logging.getLogger(__name__)

#: Split-training traffic a client reports per round (summed into the round record).
SPLIT_KEYS = ("bytes_activations_up", "bytes_gradients_down", "split_round_trips", "bytes_fisher_up")


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Payload bytes of tensors as they would be serialised (numel x element size)."""
    return int(sum(t.numel() * t.element_size() for t in tensors))


class SplitChannel:
    """The only way a client reaches the frozen server model; counts the bytes both ways.

    Args:
        server: the server model (kept private; clients get token gradients, never parameters).

    Attributes:
        bytes_up: activations (tokens) and answer ids sent client -> server.
        bytes_down: token gradients and loss values sent server -> client.
        round_trips: number of exchanges.
    """

    def __init__(self, server: torch.nn.Module) -> None:
        self._server = server
        self.bytes_up = self.bytes_down = self.round_trips = 0

    def _exchange(self, tokens: torch.Tensor, answers: torch.Tensor, reduction: str) -> tuple[float, torch.Tensor]:
        self.bytes_up += tensor_bytes(tokens, answers)
        self.round_trips += 1
        x = tokens.detach().clone().requires_grad_(True)              # (B, S, d), server-side copy
        with torch.enable_grad():
            loss = F.cross_entropy(self._server(x), answers, reduction=reduction)
            (grad,) = torch.autograd.grad(loss, x)                      # (B, S, d)
        self.bytes_down += tensor_bytes(grad) + 4                       # + the float32 loss
        return float(loss.item()), grad

    def train_step(self, tokens: torch.Tensor, answers: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Server forward/backward of the batch-mean cross-entropy.

        Args:
            tokens: (B, S, d) adapted tokens.
            answers: (B,) answer ids.

        Returns:
            ``(loss, d loss / d tokens (B, S, d))``.
        """
        return self._exchange(tokens, answers, "mean")

    def example_grads(self, tokens: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Per-example token gradients of ``-log p(y_i | x_i)`` (B, S, d): row i depends on example i
        only (the server model does not mix examples), so the summed loss gives them all at once."""
        return self._exchange(tokens, answers, "sum")[1]


def client_arrays(system: FedNanoSystem) -> dict[str, np.ndarray]:
    """What a client sends: its trainable parameters by name (float32 copies)."""
    params = dict(system.client_model().named_parameters())
    return {n: params[n].detach().cpu().numpy().copy() for n in system.sent_names()}


def _batches(system: FedNanoSystem, data: VQASet, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    enc = system.enc_train if train else system.enc_test
    return enc[data.image], system.qtok[data.question], data.answer   # (M,T,De), (M,L), (M,)


def adapter_fisher(system: FedNanoSystem, data: VQASet, channel: SplitChannel,
                   batch_size: int) -> dict[str, np.ndarray]:
    """Empirical diagonal Fisher of the NanoAdapters over ``data`` (split: tokens up, grads down).

    Returns:
        name -> mean over examples of the squared per-example gradient (float32).
    """
    edge = system.edge
    enc, q, ans = _batches(system, data, train=True)
    acc = {n: torch.zeros_like(p) for n, p in edge.named_parameters() if n in system.sent_names()}
    with torch.no_grad():
        for i in range(0, len(ans), batch_size):
            xi, xt = edge.streams(enc[i:i + batch_size], q[i:i + batch_size])
            yi, yt = edge.img_adapter(xi), edge.txt_adapter(xt)
            g = channel.example_grads(torch.cat([yi, yt], 1), ans[i:i + batch_size])  # (B, S, d)
            for prefix, ad, x, gs in (("img_adapter.", edge.img_adapter, xi, g[:, :xi.shape[1]]),
                                      ("txt_adapter.", edge.txt_adapter, xt, g[:, xi.shape[1]:])):
                for n, pg in ad.per_example_grads(x, gs).items():
                    acc[prefix + n] += pg.pow(2).sum(0)
    n = max(len(ans), 1)
    return {k: (v / n).cpu().numpy().astype(np.float32) for k, v in acc.items()}


def refuse_dp(cfg: FedExperimentConfig) -> None:
    """FedNano has no DP: split training hands the server raw adapted tokens and answer ids.

    Raises:
        ConfigError: when ``federated.dp.epsilon`` is set (called for ``method: fednano`` only).
    """
    if cfg.federated.dp.enabled:
        raise ConfigError("federated.dp with method fednano is refused: split training sends the adapted tokens and "
                          "the answer ids to the server every step, so DP-SGD on the NanoAdapters would protect "
                          "nothing against the server (and the PEFT baseline has no DP path); unset "
                          "federated.dp.epsilon or use method ffa_lora/lora")


def _local_train(system: FedNanoSystem, data: VQASet, cfg: FedExperimentConfig, seed: int,
                 channel: SplitChannel | None) -> tuple[float, int]:
    """Local epochs through the shared loop: split SGD on the NanoAdapters, or local SGD of the
    PEFT baseline's LoRA (the whole model is on the client)."""
    model = system.client_model()
    params = [p for n, p in model.named_parameters() if n in system.sent_names()]

    def split_backward(module, batch) -> float:      # FedNano: split step through the channel
        e, qb, yb = batch
        tokens = system.edge(e, qb)                          # (B, S, d)
        loss, grad = channel.train_step(tokens.detach(), yb)
        tokens.backward(grad)
        return loss

    def baseline_backward(module, batch) -> float:
        e, qb, yb = batch
        loss = F.cross_entropy(system.peft(system.edge(e, qb)), yb)
        loss.backward()
        return loss.item()

    enc, q, ans = _batches(system, data, train=True)
    res = local_train(model, [{"params": params, "lr": cfg.federated.lr}], TensorDataset(enc, q, ans),
                      cfg.federated, seed, backward=baseline_backward if channel is None else split_backward)
    return res.loss, res.steps


def client_fit(system: FedNanoSystem, arrays_in: dict[str, np.ndarray], data: VQASet,
               cfg: FedExperimentConfig, client_state: dict | None, *, client_id: int = 0,
               round_idx: int | None = None) -> tuple[dict[str, np.ndarray], int, dict, dict]:
    """One FedNano client round (same contract as ``adaptsim.federated.task.client_fit``).

    Args:
        system: the per-process :class:`FedNanoSystem`.
        arrays_in: the global NanoAdapters (or the baseline's LoRA arrays).
        data: the client's VQA triples.
        cfg: the experiment.
        client_state: the state this function returned last round (``None`` first).
        client_id: seeds the batch order.
        round_idx: seeds batch order (default: ``rounds_done``).

    Returns:
        ``(arrays_out, num_examples, metrics, new_state)``. ``arrays_out`` holds the trained
        parameters (plus ``fisher::*`` with Fisher merging). ``metrics``: ``loss, epsilon`` (inf),
        budget_spent, steps, seconds, bytes_activations_up, bytes_gradients_down,
        split_round_trips, bytes_fisher_up``.

    Raises:
        ConfigError: for DP (:func:`refuse_dp`).
        ValueError: for Fisher merging with the PEFT baseline.
    """
    fed, nc = cfg.federated, cfg.federated.fednano
    refuse_dp(cfg)
    state = dict(client_state or {})
    rounds_done = int(state.get("rounds_done", 0))
    seed = (fed.seed * 1_000_003 + client_id * 10_007 + (rounds_done if round_idx is None else round_idx)) % 2**31
    start = time.perf_counter()
    load_arrays(system.client_model(), arrays_in)
    channel = SplitChannel(system.server) if system.peft is None else None
    split = {"bytes_activations_up": 0, "bytes_gradients_down": 0, "split_round_trips": 0, "bytes_fisher_up": 0}
    if nc.aggregation == "fisher" and channel is None:
        raise ValueError("federated.fednano.aggregation: fisher needs baseline: none")
    loss, steps = _local_train(system, data, cfg, seed, channel)
    out = client_arrays(system)
    if nc.aggregation == "fisher":
        fisher = adapter_fisher(system, data, channel, nc.fisher_batch)
        split["bytes_fisher_up"] = int(sum(a.nbytes for a in fisher.values()))
        out = with_fisher(out, fisher)
    if channel is not None:
        split.update(bytes_activations_up=channel.bytes_up, bytes_gradients_down=channel.bytes_down,
                     split_round_trips=channel.round_trips)
    state.update(rounds_done=rounds_done + 1)
    metrics = {"loss": loss, "epsilon": math.inf, "budget_spent": 0, "steps": steps,
               "seconds": time.perf_counter() - start, **split}
    return out, len(data), metrics, state


@torch.no_grad()
def evaluate(system: FedNanoSystem, arrays: dict[str, np.ndarray], data: VQASet | None = None,
             batch_size: int = 256, on_train: bool = False) -> dict[str, float]:
    """Accuracy and mean cross-entropy of the global arrays on the global test VQA set.

    Central evaluation at the server (it holds the aggregated adapters, a NanoEdge copy and the
    test set), so nothing crosses the network and no split bytes are counted.

    Args:
        system: the per-process system.
        arrays: global arrays to evaluate.
        data: VQA triples (default: the global test set).
        batch_size: evaluation batch size.
        on_train: ``data`` indexes the training images (e.g. a client's partition).

    Returns:
        ``{"accuracy", "loss", "num_examples"}`` plus ``accuracy_q0..q2`` per question type.
    """
    data = system.test if data is None else data
    load_arrays(system.client_model(), arrays)
    model = system.server if system.peft is None else system.peft
    enc, q, ans = _batches(system, data, train=on_train)
    preds, loss_sum = [], 0.0
    for i in range(0, len(ans), batch_size):
        logits = model(system.edge(enc[i:i + batch_size], q[i:i + batch_size]))   # (B, n_answers)
        loss_sum += F.cross_entropy(logits, ans[i:i + batch_size], reduction="sum").item()
        preds.append(logits.argmax(1))
    pred = torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
    n = max(len(ans), 1)
    out = {"accuracy": (pred == ans).float().sum().item() / n, "loss": loss_sum / n, "num_examples": len(ans)}
    for k in range(system.qtok.shape[0]):
        m = data.question == k
        out[f"accuracy_q{k}"] = (pred[m] == ans[m]).float().mean().item() if m.any() else math.nan
    return out
