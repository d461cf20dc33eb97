"""``[tool.flwr.app.config]`` of ``pyproject.toml``, generated from the experiment dataclasses.

Flower reads a run's default config from the app's ``pyproject.toml``; adaptsim's experiment
defaults live in :class:`~adaptsim.federated.config.FedExperimentConfig`. So that the two cannot
disagree, the TOML section is *generated*: the dataclass defaults with the few overrides of
:data:`APP_PRESET` (the quick local example: tiny_vit on digits, 2 clients, 2 rounds), plus the
engine keys of :data:`~adaptsim.federated.flower_glue.ENGINE_KEYS`. A test checks that
``pyproject.toml`` holds exactly this section; after changing a config field, rewrite it with::

    python -m adaptsim.federated.app_config --write     # or --check (exit 1 on a difference)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["APP_PRESET", "expected_app_config", "render_app_config", "check_pyproject", "write_pyproject"]

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_HEADER = "[tool.flwr.app.config]"

#: The departures from the dataclass defaults that make ``flwr run .`` a quick offline example.
APP_PRESET: dict[str, Any] = {
    "scenario": {"dataset": {"name": "digits"}},
    "backbone": {"name": "tiny_vit", "img_size": 16, "tiny_dim": 32, "tiny_depth": 2, "tiny_heads": 2,
                 "tiny_patch": 4},
    "federated": {"mode": "deployment", "num_clients": 2, "clients_per_round": 2, "rounds": 2, "lr": 0.5},
    "run": {"out_dir": "/tmp/runs"},
}


def expected_app_config() -> dict[str, Any]:
    """The flat run config (Flower ``UserConfig`` keys and values) the section must hold."""
    from adaptsim.federated.config import load_fed_experiment
    from adaptsim.federated.flower_glue import ENGINE_KEYS, experiment_to_run_config

    cfg = load_fed_experiment(json.loads(json.dumps(APP_PRESET)), "adaptsim.federated.app_config")
    return {**ENGINE_KEYS, **experiment_to_run_config(cfg)}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def render_app_config() -> str:
    """The ``[tool.flwr.app.config]`` section as TOML text (header included, trailing newline)."""
    return "\n".join([_HEADER, *(f"{k} = {_toml_value(v)}" for k, v in expected_app_config().items())]) + "\n"


def _split(text: str) -> tuple[str, str, str]:
    start = text.find(_HEADER)
    if start < 0:
        raise ValueError(f"{_HEADER} not found in pyproject.toml")
    nxt = re.compile(r"^\[", re.M).search(text, start + len(_HEADER))
    end = nxt.start() if nxt else len(text)
    body = text[start:end].rstrip("\n") + "\n"
    return text[:start], body, text[start + len(body.rstrip("\n")):].lstrip("\n")


def check_pyproject(path: Path = PYPROJECT) -> list[str]:
    """Differences between ``path``'s section and the generated one (empty when equal)."""
    import tomllib

    from flwr.common.config import flatten_dict

    have = flatten_dict(tomllib.loads(path.read_text())["tool"]["flwr"]["app"].get("config", {}))
    want = expected_app_config()
    diff = [f"{k}: pyproject has {have[k]!r}, dataclasses give {want[k]!r}"
            for k in sorted(set(have) & set(want)) if have[k] != want[k] or type(have[k]) is not type(want[k])]
    diff += [f"{k}: missing from pyproject" for k in sorted(set(want) - set(have))]
    diff += [f"{k}: in pyproject but not a config field" for k in sorted(set(have) - set(want))]
    return diff


def write_pyproject(path: Path = PYPROJECT) -> None:
    """Replaces ``path``'s ``[tool.flwr.app.config]`` section with the generated one."""
    before, _, after = _split(path.read_text())
    path.write_text(before + render_app_config() + ("\n" + after if after else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adaptsim.federated.app_config", description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite pyproject.toml's section")
    ap.add_argument("--check", action="store_true", help="exit 1 if pyproject.toml's section differs")
    args = ap.parse_args(argv)
    if args.write:
        write_pyproject()
        return 0
    if args.check:
        diff = check_pyproject()
        for line in diff:
            print(line, file=sys.stderr)
        return 1 if diff else 0
    sys.stdout.write(render_app_config())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
