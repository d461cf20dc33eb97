"""The one place where Flower's objects meet adaptsim's: records <-> arrays, run_config <-> config.

- :func:`arrays_to_record` / :func:`record_to_arrays`: ``dict[str, np.ndarray]`` <-> ``ArrayRecord``
  (names kept, so aggregation is by name, as in the in-process loop).
- :func:`experiment_to_run_config` / :func:`experiment_from_run_config`: a
  :class:`~adaptsim.federated.config.FedExperimentConfig` <-> Flower's flat kebab-case
  ``run_config`` (``"federated.num-clients" = 10``; the sections become dotted prefixes, the same
  keys as ``[tool.flwr.app.config]`` in ``pyproject.toml``). TOML has no null and Flower's
  ``UserConfig`` no lists, so ``None`` is written as ``""`` and tuples as ``"q,v"``.
- :func:`metrics_to_record` / :func:`metrics_from_record`: a client's numeric metrics <-> the
  reply's ``MetricRecord`` (kebab-case keys, as Flower's examples write them).
- :func:`state_get` / :func:`state_put`: a client's plain-dict state in ``context.state``.
- :func:`node_dp_store`: the file on the SuperNode that keeps the client's DP accountant
  (node config ``state-dir``, default ``$FLWR_HOME/adaptsim_dp_state``), keyed by run name
  (the ``run-dir`` folder name, else ``run.name``, else the config hash) and partition.
- :func:`write_rounds` / :func:`read_rounds`: the round metrics the ServerApp hands back to the
  process that started ``flwr run`` (simulation and deployment modes).

Engine-only keys (not part of the experiment): ``run-dir`` (where the ServerApp writes the run
folder; empty = a new folder under ``run.out_dir``), ``round-timeout`` (seconds the server
waits for replies in one round before it completes the round with those it has) and
``experiment``: the whole resolved experiment as JSON, set by adaptsim's own launchers
(:mod:`.sim_engine`, :mod:`.deploy`) so that every field travels, including fields added after
``pyproject.toml`` was written; when it is set, the kebab-case keys are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from adaptsim.cl.rundir import dumps_json, loads_json

__all__ = ["ENGINE_KEYS", "launch_run_config", "route_logs_to_flower", "arrays_to_record", "record_to_arrays",
           "metrics_to_record", "metrics_from_record", "experiment_to_run_config",
           "experiment_from_run_config", "state_get", "state_put", "node_dp_store", "write_rounds",
           "read_rounds", "ROUNDS_FILE"]

ENGINE_KEYS = {"run-dir": "", "round-timeout": 600.0, "experiment": ""}
ROUNDS_FILE = "flower_rounds.json"
_STATE_KEY = "adaptsim"


# -- arrays ----------------------------------------------------------------------------------
def arrays_to_record(arrays: Mapping[str, np.ndarray]) -> Any:
    """``{name: ndarray}`` -> ``ArrayRecord`` with the same names (a copy of each array)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def record_to_arrays(record: Any) -> dict[str, np.ndarray]:
    """``ArrayRecord`` -> ``{name: ndarray}`` (insertion order kept)."""
    return {k: v.numpy() for k, v in record.items()}


def metrics_to_record(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A client's metrics as ``MetricRecord`` content: the numeric entries, kebab-case keys
    (strings and lists such as ``privacy`` / ``dp_params`` stay on the client)."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            out[k.replace("_", "-")] = int(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            out[k.replace("_", "-")] = v.item() if isinstance(v, np.generic) else v
    return out


def metrics_from_record(record: Any) -> dict[str, Any]:
    """Inverse of :func:`metrics_to_record`: snake_case keys."""
    return {k.replace("-", "_"): v for k, v in dict(record).items()}


# -- run_config <-> experiment ---------------------------------------------------------------
def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k.replace('_', '-')}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        elif v is None:
            out[key] = ""
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(str(x) for x in v)
        else:
            out[key] = v
    return out


def experiment_to_run_config(cfg: Any) -> dict[str, Any]:
    """The flat kebab-case ``run_config`` of an experiment (every field; engine keys excluded)."""
    return _flatten(cfg.to_raw())


def launch_run_config(cfg: Any, run_dir: str | Path, round_timeout: float = 600.0) -> dict[str, Any]:
    """The ``run_config`` overrides adaptsim's launchers pass: the experiment as JSON + engine keys."""
    return {"experiment": json.dumps(cfg.to_raw()), "run-dir": str(run_dir), "round-timeout": float(round_timeout)}


def _decode(cls: type, data: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Undo the TOML encodings field by field, using ``cls``'s type hints."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:  # let the strict loader raise its named error
            out[key] = value
            continue
        tp = hints[key]
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
        args = typing.get_args(tp) if optional else ()
        inner = next((a for a in args if a is not type(None)), tp)
        if dataclasses.is_dataclass(inner) and isinstance(value, Mapping):
            out[key] = _decode(inner, value, f"{section}.{key}")
        elif value == "" and type(None) in args:
            out[key] = None
        elif typing.get_origin(inner) in (tuple, list) and isinstance(value, str):
            out[key] = [s.strip() for s in value.split(",") if s.strip()]
        else:
            out[key] = value
    return out


def experiment_from_run_config(run_config: Mapping[str, Any], source: str = "flwr run_config") -> Any:
    """Flower's ``context.run_config`` -> a strict :class:`FedExperimentConfig`.

    Raises:
        adaptsim.cl.config.ConfigError: on unknown keys or invalid values (named).
    """
    if run_config.get("experiment"):
        return _experiment_json(str(run_config["experiment"]), source)
    return _experiment_cached(tuple(sorted((k, v) for k, v in run_config.items() if k not in ENGINE_KEYS)),
                              source)


@lru_cache(maxsize=8)
def _experiment_json(text: str, source: str) -> Any:
    from adaptsim.federated.config import load_fed_experiment

    return load_fed_experiment(json.loads(text), source=source)


@lru_cache(maxsize=8)
def _experiment_cached(items: tuple, source: str) -> Any:
    from adaptsim.federated.config import FedExperimentConfig, load_fed_experiment

    nested: dict[str, Any] = {}
    for key, value in items:
        *parents, leaf = key.split(".")
        d = nested
        for p in parents:
            d = d.setdefault(p.replace("-", "_"), {})
        d[leaf.replace("-", "_")] = value
    decoded = _decode(FedExperimentConfig, nested, "")
    return load_fed_experiment(decoded, source=source)


def route_logs_to_flower(level: int = logging.INFO) -> None:
    """Sends ``adaptsim.*`` log records through Flower's console handler (idempotent).

    Inside ``flwr-serverapp``/``flwr-clientapp`` processes only what goes through that handler
    reaches ``flwr run --stream`` and ``flwr log``; without this, the warnings about failed
    replies would be lost. Called by the apps' entry points, never at import time.
    """
    from flwr.supercore.logger import console_handler

    ours = logging.getLogger("adaptsim")
    if console_handler not in ours.handlers:
        ours.addHandler(console_handler)
        ours.setLevel(level)


# -- client state in context.state -----------------------------------------------------------
def state_get(context: Any) -> dict[str, Any]:
    """This client's adaptsim state from ``context.state`` (``{}`` before its first message)."""
    rec = context.state.get(_STATE_KEY)
    return json.loads(rec["json"]) if rec is not None else {}


def state_put(context: Any, state: Mapping[str, Any]) -> None:
    """Stores ``state`` (plain numbers and lists; JSON, inf allowed) as a ``ConfigRecord``."""
    from flwr.app import ConfigRecord

    context.state[_STATE_KEY] = ConfigRecord({"json": json.dumps(dict(state))})


def node_dp_store(context: Any, cfg: Any, partition_id: int) -> Any:
    """The :class:`~adaptsim.federated.privacy.NodeDPStore` of this SuperNode's client.

    The directory is the node config's ``state-dir`` (``flower-supernode --node-config
    "... state-dir='/var/lib/node0'"``), else ``$FLWR_HOME/adaptsim_dp_state`` (Flower's own
    default home ``~/.flwr`` without ``FLWR_HOME``). The run name is the ``run-dir`` folder name,
    else ``run.name``, else ``cfg-<config hash>``: the same study restarted finds its accountant.
    """
    from adaptsim.federated.privacy import NodeDPStore

    home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    state_dir = str(context.node_config.get("state-dir", "")) or str(home / "adaptsim_dp_state")
    run_dir = str(context.run_config.get("run-dir", ""))
    run_name = Path(run_dir).name if run_dir else (cfg.run.name or f"cfg-{cfg.config_hash()[:16]}")
    return NodeDPStore(state_dir, run_name, partition_id)


# -- round metrics hand-back -----------------------------------------------------------------
def write_rounds(run_dir: Path, rounds: list[dict], initial: Mapping[str, Any],
                 refused: list[dict] | None = None) -> Path:
    """Writes ``run_dir/flower_rounds.json``: ``{"initial": eval before round 1, "rounds": [...],
    "refused": nodes the handshake refused ({node, partition, reason})}``."""
    path = Path(run_dir) / ROUNDS_FILE
    path.write_text(dumps_json({"initial": dict(initial), "rounds": rounds, "refused": list(refused or [])}))
    return path


def read_rounds(run_dir: Path, with_initial: bool = False) -> Any:
    """The round metrics the ServerApp wrote (and, optionally, the initial evaluation).

    Raises:
        FileNotFoundError: if the ServerApp did not finish writing them.
    """
    data = loads_json((Path(run_dir) / ROUNDS_FILE).read_text())
    return (data["rounds"], data["initial"]) if with_initial else data["rounds"]
