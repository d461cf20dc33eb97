"""Federated methods, by registry name: ``lora``, ``ffa_lora``, ``fednano``, ``fcl``.

Registration is by the explicit imports below (no directory scanning). See :mod:`.base` for the
contract; :func:`fed_method` gives the method object of an experiment.
"""

from adaptsim.federated.methods.base import (FedMethod, FedMethodEntry, fed_method, fed_method_class,
                                             fed_method_entry, list_fed_methods, register_fed_method)
from adaptsim.federated.methods import lora as _lora  # noqa: F401  (registers lora, ffa_lora)
from adaptsim.federated.methods import fednano as _fednano  # noqa: F401  (registers fednano)
from adaptsim.federated.methods import fcl as _fcl  # noqa: F401  (registers fcl)

__all__ = ["FedMethod", "FedMethodEntry", "fed_method", "fed_method_class", "fed_method_entry",
           "list_fed_methods", "register_fed_method"]
