#!/usr/bin/env python
"""Run a scenario YAML: ``python run_scenario.py scenarios/split_mnist.yaml [--key.sub=value ...]``.

``--resume RUN_DIR`` continues a killed run. Federated scenarios (a ``federated`` section) run
through :mod:`adaptsim.federated`.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="scenario YAML (omit with --resume)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from adaptsim.cl.entry import main_entry

    def federated_runner(raw, source):
        from adaptsim.federated.runner import run_from_raw

        return run_from_raw(raw, source=source)

    def federated_resume(run_dir):
        from adaptsim.federated.runner import run_fed

        return run_fed(resume=run_dir)

    return main_entry(args.config, args.resume, rest, federated_runner, federated_resume)


if __name__ == "__main__":
    sys.exit(main())
