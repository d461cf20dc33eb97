"""A study's grid: the cartesian product of its axes, cell and group names, the baseline group.

Each axis of ``study.grid`` is a list of entries and each entry a set of dotted overrides, so
one entry can set several keys together (a method with its own learning rate)::

    grid:
      method: [{strategy.name: simplecil}, {strategy.name: mos, strategy.epochs: 5}]
      lr: [{strategy.lr: 0.01}, {strategy.lr: 0.1}]

expands, axis by axis in file order, to four override sets. A *group* is one override set; its
name is built from the overrides (``strategy.name=mos, strategy.epochs=5`` →
``strategy.name-mos_strategy.epochs-5``), and a *cell* is a group run with one seed
(``<group>__seed<k>``). Names are stable, readable and filesystem-safe; a name longer than
:data:`MAX_NAME` characters is cut and ends in a hash of the full overrides.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from adaptsim.cl.config import ConfigError

__all__ = ["Cell", "expand_grid", "group_name", "cell_name", "build_cells", "baseline_group", "MAX_NAME",
           "BASE_GROUP"]

MAX_NAME = 100
BASE_GROUP = "base"  # the group with no grid overrides (an empty grid, or `{}` entries)
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Cell:
    """One run of the study.

    Attributes:
        name: ``<group>__seed<seed>``, also the run folder's name under ``cells/``.
        group: the name of the cell's override set (cells that differ only in seed share it).
        seed: the run's ``run.seed``.
        overrides: the grid overrides of the cell (without the seed), in grid order.
    """

    name: str
    group: str
    seed: int
    overrides: dict[str, Any]


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _value_text(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "+".join(_value_text(x) for x in v) or "empty"
    if isinstance(v, Mapping):
        return "+".join(f"{k}-{_value_text(x)}" for k, x in v.items()) or "empty"
    return str(v)


def group_name(overrides: Mapping[str, Any]) -> str:
    """Readable, filesystem-safe, stable name of one override set.

    ``{"strategy.name": "mos", "strategy.epochs": 5}`` → ``strategy.name-mos_strategy.epochs-5``;
    no overrides → ``base``. Names longer than :data:`MAX_NAME` are cut and end in ``-<hash>``.
    """
    if not overrides:
        return BASE_GROUP
    parts = [f"{k}-{_value_text(v)}" for k, v in overrides.items()]
    name = _UNSAFE.sub("-", "_".join(parts)).strip(".-_") or "cell"
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9].rstrip('.-_')}-{_digest(dict(overrides))[:8]}"
    return name


def cell_name(group: str, seed: int) -> str:
    """``<group>__seed<seed>``."""
    return f"{group}__seed{seed}"


def expand_grid(grid: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Cartesian product of the grid's axes: one merged override set per combination.

    Raises:
        ConfigError: when two axes set the same key in one combination.
    """
    axes = list(grid.items())
    if not axes:
        return [{}]
    out = []
    for combo in itertools.product(*(entries for _, entries in axes)):
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for (axis, _), entry in zip(axes, combo):
            for key, value in entry.items():
                if key in merged:
                    raise ConfigError(f"study.grid: axes {owner[key]!r} and {axis!r} both set {key!r}; "
                                      "put overrides that go together in one entry of one axis")
                merged[key] = value
                owner[key] = axis
        out.append(merged)
    return out


def build_cells(grid: Mapping[str, Sequence[Mapping[str, Any]]], seeds: Sequence[int]) -> list[Cell]:
    """Every (override set, seed) cell, groups in grid order and seeds within each group.

    Raises:
        ConfigError: when two entries give the same override set.
    """
    sets = expand_grid(grid)
    names = [group_name(s) for s in sets]
    seen: dict[str, int] = {}
    for i, (name, s) in enumerate(zip(names, sets)):
        if name in seen:
            j = seen[name]
            if _digest(sets[j]) == _digest(s):
                raise ConfigError(f"study.grid: the same overrides appear twice ({dict(s)})")
            # Different values that write the same name (e.g. "a/b" and "a-b"): keep both, told apart by hash.
            names[i] = f"{name[: MAX_NAME - 9]}-{_digest(s)[:8]}"
        seen[names[i]] = i
    return [Cell(cell_name(g, seed), g, seed, dict(s)) for g, s in zip(names, sets) for seed in seeds]


def baseline_group(cells: Sequence[Cell], baseline: Mapping[str, Any] | None) -> str | None:
    """The group whose overrides include every item of ``baseline`` (None without a baseline).

    Raises:
        ConfigError: when no group or several groups match.
    """
    if baseline is None:
        return None
    groups = {c.group: c.overrides for c in cells}
    hits = [g for g, ov in groups.items() if all(k in ov and ov[k] == v for k, v in baseline.items())]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise ConfigError(f"study.baseline {dict(baseline)} matches no grid entry; groups: {', '.join(groups)}")
    raise ConfigError(f"study.baseline {dict(baseline)} matches several groups ({', '.join(hits)}); "
                      "add keys to it so that it names one")
