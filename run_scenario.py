#!/usr/bin/env python
"""``python run_scenario.py SCENARIO.yaml [--key.sub=value ...]``: the same as ``adaptsim run``.

``python run_scenario.py --resume RUN_DIR`` continues a killed run. Every run kind (continual,
unlearning, federated, FedNano) goes through the one run engine (:mod:`adaptsim.cl.engine`).
"""

from __future__ import annotations

import sys

from adaptsim.cl.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
