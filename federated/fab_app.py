"""The Flower app's entry module inside a FAB: it runs the FAB's own copy of adaptsim.

adaptsim's packages live in the folders ``cl/``, ``strategies/``, ``federated/`` and ``kernels/``
and install as ``adaptsim.cl`` … (setuptools ``package-dir``), so a FAB built from the repository
holds ``federated/server_app.py``, not ``adaptsim/federated/server_app.py``. Flower puts the
unpacked FAB first on ``sys.path`` and imports the component named in ``pyproject.toml``
(``federated.fab_app:server_app``), i.e. this file. Before anything of adaptsim is imported, it
binds the ``adaptsim`` namespace package to the FAB's folder, so ``adaptsim.federated``,
``adaptsim.cl`` … resolve to the FAB's files: the code that runs is the code that was shipped,
not whatever version of adaptsim the SuperNode has installed (its dependencies still come from
the node's environment, as for every Flower app).

When ``adaptsim`` was already imported in the process (a test importing this module directly),
that import is kept and :data:`BOUND_TO_FAB` is False.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from pathlib import Path

__all__ = ["BOUND_TO_FAB", "FAB_ROOT", "client_app", "server_app"]

#: The folder holding ``cl/``, ``strategies/``, ``federated/``, ``kernels/`` (the unpacked FAB).
FAB_ROOT = Path(__file__).resolve().parents[1]


def _bind_namespace() -> bool:
    if "adaptsim" in sys.modules:
        return False
    pkg = types.ModuleType("adaptsim")
    pkg.__path__ = [str(FAB_ROOT)]  # adaptsim.<sub> -> FAB_ROOT/<sub> (the path finder runs first)
    pkg.__package__ = "adaptsim"
    sys.modules["adaptsim"] = pkg
    return True


BOUND_TO_FAB = _bind_namespace()
if not BOUND_TO_FAB:
    logging.getLogger(__name__).debug("adaptsim already imported from %s; FAB binding skipped",
                                      list(getattr(sys.modules["adaptsim"], "__path__", [])))

server_app = importlib.import_module("adaptsim.federated.server_app").app
client_app = importlib.import_module("adaptsim.federated.client_app").app
