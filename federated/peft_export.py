"""Writes a trained federated LoRA / FFA-LoRA model as a PEFT adapter.

The output folder holds ``adapter_config.json`` + ``adapter_model.safetensors``, written by PEFT's
own ``save_pretrained``, which ``peft.PeftModel.from_pretrained`` loads onto the same timm model
(its ``head`` replaced by a linear layer with the run's class count, see :func:`peft_base_model`)
with the outputs of adaptsim's model. Use it as::

    adaptsim export-peft RUN_DIR [--out DIR] [--round N]      # or
    python -m adaptsim.federated.peft_export RUN_DIR

Mapping. adaptsim puts LoRA on *slices* of timm's fused ``attn.qkv`` (q and v by default): one
pair ``A_j`` (r, K), ``B_j`` (d, r) per slice. PEFT adapts a whole ``nn.Linear``, so the pairs
are stacked into one rank-``J·r`` adapter: ``A = [A_1; …; A_J]`` and a block-sparse ``B``
(3d, J·r) holding ``B_j`` in slice ``j``'s rows and columns ``[j·r, (j+1)·r)``, zeros elsewhere;
``lora_alpha = J·alpha`` keeps PEFT's scaling ``lora_alpha / (J·r)`` equal to ``alpha / r``. The
product ``B A`` is exactly adaptsim's delta. The head travels as ``modules_to_save``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from adaptsim.strategies.adapters import LoRALinear

__all__ = ["peft_base_model", "to_peft", "export_peft", "main"]


def _require_peft() -> Any:
    import adaptsim.cl.compat  # noqa: F401  (torchvision shim before transformers imports it)

    try:
        import peft
    except ImportError as e:  # pragma: no cover - peft is in the dev extra
        raise RuntimeError("export-peft needs peft: pip install peft") from e
    return peft


def peft_base_model(model: nn.Module) -> nn.Module:
    """The plain timm model PEFT loads the adapter onto: ``model``'s backbone without LoRA, with
    ``head = nn.Linear(embed_dim, n_classes)`` (weights copied from ``model.head``).

    A user builds the same thing with ``timm.create_model(name, num_classes=n_classes)`` and the
    backbone's weights; the head's values come with the adapter (``modules_to_save``).
    """
    base = copy.deepcopy(model.backbone.model)
    for name, mod in list(base.named_modules()):
        if isinstance(mod, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, mod.base_layer)
    base.head = copy.deepcopy(model.head)
    return base.requires_grad_(False).eval()


@torch.no_grad()
def to_peft(model: nn.Module, out_dir: str | Path, *, base_name: str | None = None) -> Path:
    """Writes ``model`` (a :class:`~adaptsim.federated.model.FedLoRAModel`) as a PEFT adapter.

    Returns:
        ``out_dir``.
    """
    peft = _require_peft()
    layers = {n: model.backbone.model.get_submodule(n) for n in model.qkv_names}
    first = next(iter(layers.values()))
    n_slices, r = len(first.out_slices), first.rank
    cfg = peft.LoraConfig(r=n_slices * r, lora_alpha=float(first.alpha if first.alpha is not None else r) * n_slices,
                          target_modules=list(layers), modules_to_save=["head"], lora_dropout=0.0,
                          bias="none", init_lora_weights=False,
                          base_model_name_or_path=base_name or getattr(model.backbone, "name", None))
    pm = peft.get_peft_model(peft_base_model(model), cfg)
    for name, layer in layers.items():
        target = pm.base_model.model.get_submodule(name)
        A = torch.cat([a for a, _, _ in layer.pairs()], 0)
        B = torch.zeros(layer.out_features, n_slices * r, dtype=A.dtype)
        for j, (_, b, (start, stop)) in enumerate(layer.pairs()):
            B[start:stop, j * r:(j + 1) * r] = b
        target.lora_A["default"].weight.copy_(A)
        target.lora_B["default"].weight.copy_(B)
    out = Path(out_dir)
    pm.save_pretrained(str(out))
    return out


def _last_round(run_dir: Path) -> int:
    done = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("round_*.npz"))
    if not done:
        raise ValueError(f"{run_dir} has no checkpoints/round_NNN.npz (was run.checkpoint off?)")
    return done[-1]


def export_peft(run_dir: str | Path, out_dir: str | Path | None = None, *, round_no: int | None = None) -> Path:
    """Exports the global model of a finished ``lora`` / ``ffa_lora`` run folder.

    Args:
        run_dir: a federated run folder (``config.yaml`` + ``checkpoints/round_NNN.npz``).
        out_dir: where to write (default ``RUN_DIR/peft_adapter``).
        round_no: which round's global model (default: the last checkpoint).

    Raises:
        ValueError: not a LoRA / FFA-LoRA run, or no checkpoint.
    """
    from adaptsim.cl.rundir import RunDir
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.methods import fed_method_class, list_fed_methods
    from adaptsim.federated.task import build_model

    rd = RunDir.open(run_dir)
    raw = {k: v for k, v in rd.config().items() if k != "kind"}
    cfg = load_fed_experiment(raw, str(rd.path / "config.yaml"))
    if not fed_method_class(cfg.federated.method).exports_peft:
        ok = [m for m in list_fed_methods() if fed_method_class(m).exports_peft]
        raise ValueError(f"export-peft writes LoRA adapters; run {rd.path} used federated.method="
                         f"{cfg.federated.method!r} ({' or '.join(ok)})")
    rnd = _last_round(rd.path) if round_no is None else round_no
    ck = rd.path / "checkpoints" / f"round_{rnd:03d}.npz"
    if not ck.is_file():
        raise ValueError(f"{ck} does not exist")
    model = build_model(cfg).cpu()
    params = dict(model.named_parameters())
    with np.load(ck) as z, torch.no_grad():
        for k in z.files:
            if k in params:
                params[k].copy_(torch.from_numpy(z[k]))
    return to_peft(model, out_dir or rd.path / "peft_adapter", base_name=cfg.backbone.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="adaptsim export-peft", description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="output folder (default RUN_DIR/peft_adapter)")
    ap.add_argument("--round", type=int, default=None, dest="round_no", help="round (default: last)")
    args = ap.parse_args(argv)
    try:
        out = export_peft(args.run_dir, args.out, round_no=args.round_no)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
