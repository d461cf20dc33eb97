"""Command-line entry used by ``run_scenario.py``: turns known user errors into one clear line."""

from __future__ import annotations

import sys

from adaptsim.cl.config import ConfigError, parse_overrides, read_yaml


def main_entry(config: str | None, resume: str | None, rest: list[str], federated_runner=None,
               federated_resume=None) -> int:
    """Parse, run and report; returns the process exit code.

    Args:
        config: scenario YAML path.
        resume: run folder to resume.
        rest: dotted overrides.
        federated_runner: a callable ``(raw, source) -> result`` used for configs with a
            ``federated`` section (``cl`` never imports ``federated`` itself).
        federated_resume: a callable ``(run_dir) -> result`` resuming a federated run folder.
    """
    from adaptsim.cl.backbones import PretrainedWeightsUnavailableError
    from adaptsim.cl.data import DatasetNotFoundError

    try:
        overrides = parse_overrides(rest)
        if resume:
            if overrides:
                raise ConfigError("overrides cannot be combined with --resume (the run keeps its config)")
            from pathlib import Path

            saved = Path(resume) / "config.yaml"
            if saved.is_file() and "federated" in read_yaml(saved):
                if federated_resume is None:
                    raise ConfigError("this entry point cannot resume federated runs")
                result = federated_resume(resume)
            else:
                from adaptsim.cl.runner import run

                result = run(resume=resume)
        else:
            if not config:
                raise ConfigError("give a scenario YAML, e.g. scenarios/split_mnist.yaml")
            raw = read_yaml(config)
            if "federated" in raw:
                from adaptsim.cl.config import apply_overrides

                if federated_runner is None:
                    raise ConfigError("this entry point cannot run federated scenarios")
                result = federated_runner(apply_overrides(raw, overrides), config)
            elif "unlearning" in raw:
                from adaptsim.cl.unlearning import load_unlearning, run_unlearning

                result = run_unlearning(load_unlearning(config, overrides))
            else:
                from adaptsim.cl.experiment import load_experiment
                from adaptsim.cl.runner import run

                result = run(load_experiment(config, overrides))
    except (ConfigError, DatasetNotFoundError, PretrainedWeightsUnavailableError, FileNotFoundError,
            FileExistsError, KeyError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    m = result.metrics
    if "A_last" in m:
        print(f"run folder: {result.run_dir}")
        print(f"A_last={m['A_last']:.4f}  avg_inc_acc={m['avg_incremental_accuracy']:.4f}  "
              f"forgetting={m['forgetting']:.4f}  bwt={m['bwt']:.4f}")
    else:
        print(f"run folder: {result.run_dir}")
    return 0
