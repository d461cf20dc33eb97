"""adaptsim.strategies: continual-learning strategies on a frozen pretrained backbone.

Registration happens through the explicit imports below (no directory scanning)::

    from adaptsim.strategies import SimpleCIL, get_strategy, list_strategies
"""

from adaptsim.strategies.base import (
    BaseStrategyConfig,
    Strategy,
    StreamInfo,
    check_scenario,
    get_strategy,
    list_strategies,
    register_strategy,
)
from adaptsim.strategies.finetune import Finetune, FinetuneConfig
from adaptsim.strategies.joint import Joint, JointConfig
from adaptsim.strategies.mora import MoRA, MoRAConfig
from adaptsim.strategies.mos import MOS, MOSConfig
from adaptsim.strategies.o3 import O3, O3Config
from adaptsim.strategies.pilora import PILoRA, PILoRAConfig
from adaptsim.strategies.sema import SEMA, SEMAConfig
from adaptsim.strategies.simplecil import SimpleCIL, SimpleCILConfig

__all__ = [
    "BaseStrategyConfig",
    "Strategy",
    "StreamInfo",
    "check_scenario",
    "get_strategy",
    "list_strategies",
    "register_strategy",
    "Finetune",
    "FinetuneConfig",
    "Joint",
    "JointConfig",
    "MoRA",
    "MoRAConfig",
    "MOS",
    "MOSConfig",
    "O3",
    "O3Config",
    "PILoRA", "PILoRAConfig",
    "SEMA",
    "SEMAConfig",
    "SimpleCIL",
    "SimpleCILConfig",
]
