"""Adapter ``nn.Module``s on the rank-sparse LoRA kernel: LoRA, bottleneck, bank, rank experts.

One import gives method code everything it needs::

    from adaptsim.strategies.adapters import LoRALinear, AdapterBank, inject_lora, adapter_state_dict

Importing this package registers Opacus grad samplers for ``LoRALinear``,
``BottleneckAdapter`` and the parameter containers of ``AdapterBank`` / ``RankExpertLoRA``
(``DownParams`` / ``UpParams``) when Opacus is installed.
"""

from __future__ import annotations

from adaptsim.kernels import AdapterGate, DenseGate, KernelConfig, TopKGate

from . import grad_samplers
from .bank import AdapterBank
from .bottleneck import BottleneckAdapter
from .experts import RankExpertLoRA
from .lora import LoRALinear, inject_lora
from .params import DownParams, UpParams
from .state import ADAPTER_PREFIXES, adapter_state_dict, load_adapter_state_dict

OPACUS_REGISTERED = grad_samplers.register()

__all__ = [
    "ADAPTER_PREFIXES",
    "OPACUS_REGISTERED",
    "AdapterBank",
    "AdapterGate",
    "BottleneckAdapter",
    "DenseGate",
    "DownParams",
    "KernelConfig",
    "LoRALinear",
    "RankExpertLoRA",
    "TopKGate",
    "UpParams",
    "adapter_state_dict",
    "inject_lora",
    "load_adapter_state_dict",
]
