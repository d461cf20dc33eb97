"""The registry of run kinds: what ``adaptsim run`` can run, one registration per kind.

A run kind is a typed config class plus a run function (PEFT-style ``(config_cls, model_cls)``
pairs, here ``(ConfigCls, run_fn)``). ``adaptsim`` picks the kind from the YAML's ``kind:`` key;
YAMLs without one are matched by their sections (``strategy`` → continual learning,
``unlearning`` → unlearning, ``federated`` → the federated kinds), with a clear error when none
or several match.

Built-in kinds (``continual``, ``unlearning``) register here. Packages that ``cl`` must not
import (``adaptsim.federated``) register theirs through the entry-point group
``adaptsim.run_kinds`` (``pyproject.toml``), loaded on the first look-up; a third-party package
adds a kind the same way::

    [project.entry-points."adaptsim.run_kinds"]
    my_kind = "my_package.kinds:register"      # a function that calls register_run_kind(...)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Mapping

from adaptsim.cl.config import ConfigError, apply_overrides
from adaptsim.cl.registry import Registry

log = logging.getLogger(__name__)

__all__ = ["RunKind", "register_run_kind", "get_run_kind", "list_run_kinds", "resolve_kind",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "adaptsim.run_kinds"


def _default_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    return apply_overrides(raw, overrides)


@dataclass(frozen=True)
class RunKind:
    """One kind of run.

    Attributes:
        name: registry name (the YAML's ``kind:``).
        description: one line for ``adaptsim list``.
        config_from_raw: ``(raw, source) -> cfg``, strict (raises ConfigError). ``cfg`` has
            ``run`` (a :class:`adaptsim.cl.experiment.RunConfig`), ``to_raw()`` and ``config_hash()``.
        run: ``(cfg, run_dir, *, resume, stop_after) -> metrics | None``: trains and evaluates
            into the :class:`adaptsim.cl.rundir.RunDir`, writing ``metrics.json`` and its plots;
            returns ``None`` when it stopped early (``stop_after``), leaving the run resumable.
        matches: ``raw -> bool``: does a YAML without ``kind:`` belong to this kind?
        label: ``cfg -> str``: the method name used in run-folder names and tables.
        prepare: ``cfg -> None``: cheap checks before a run folder exists (e.g. build the
            stream), so a config that cannot run leaves no folder.
        summary: ``metrics -> {name: float}``: the scalar results that studies aggregate.
        preprocess: ``(raw, overrides) -> raw``: applies the dotted overrides.
        threads_key: the dotted config key holding the run's CPU threads.
        seed_keys: dotted config keys a study sets to the cell's seed (besides ``run.seed``).
        resumable: whether ``adaptsim run --resume`` works for this kind.
    """

    name: str
    description: str
    config_from_raw: Callable[[Mapping[str, Any], str], Any]
    run: Callable[..., Mapping[str, Any] | None]
    matches: Callable[[Mapping[str, Any]], bool]
    label: Callable[[Any], str]
    prepare: Callable[[Any], None] = lambda cfg: None
    summary: Callable[[Mapping[str, Any]], dict[str, float]] = lambda m: {}
    preprocess: Callable[[dict[str, Any], Mapping[str, Any]], dict[str, Any]] = field(default=_default_overrides)
    threads_key: str = "train.num_threads"
    seed_keys: tuple[str, ...] = ()
    resumable: bool = True


RUN_KINDS: Registry[RunKind] = Registry("run kind")
_plugins_loaded = False


def register_run_kind(kind: RunKind) -> RunKind:
    """Add ``kind`` to the registry (raises ValueError on a duplicate or bad name)."""
    return RUN_KINDS.add(kind.name, kind)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from adaptsim.cl import builtin_kinds  # noqa: F401  (registers continual, unlearning)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()()  # an import error here is a broken install: let it surface


def get_run_kind(name: str) -> RunKind:
    """The kind called ``name``.

    Raises:
        ConfigError: naming the registered kinds and the closest match.
    """
    _load_plugins()
    try:
        return RUN_KINDS.get(name)
    except KeyError as exc:
        raise ConfigError(f"kind: {exc.args[0]}") from None


def list_run_kinds() -> list[RunKind]:
    """Every registered kind, sorted by name."""
    _load_plugins()
    return [RUN_KINDS.get(n) for n in RUN_KINDS.names()]


def resolve_kind(raw: Mapping[str, Any], source: str | Path = "") -> tuple[RunKind, dict[str, Any]]:
    """Pick the run kind of a raw config: its ``kind:`` key, else the one kind whose sections match.

    Returns:
        The kind and the raw config without its ``kind`` key.

    Raises:
        ConfigError: for an unknown kind, a YAML that matches no kind or several kinds.
    """
    _load_plugins()
    raw = dict(raw)
    where = f"{source}: " if source else ""
    if "kind" in raw:
        name = raw.pop("kind")
        if not isinstance(name, str):
            raise ConfigError(f"{where}kind must be a name, got {name!r}; "
                              f"available: {', '.join(RUN_KINDS.names())}")
        return get_run_kind(name), raw
    hits = [RUN_KINDS.get(n) for n in RUN_KINDS.names() if RUN_KINDS.get(n).matches(raw)]
    if len(hits) == 1:
        return hits[0], raw
    names = ", ".join(RUN_KINDS.names())
    if not hits:
        keys = ", ".join(sorted(map(str, raw))) or "none"
        raise ConfigError(f"{where}cannot tell which kind of run this is (top-level keys: {keys}); "
                          f"add 'kind: <name>' with one of: {names}")
    raise ConfigError(f"{where}the sections fit several run kinds ({', '.join(k.name for k in hits)}); "
                      "add 'kind: <name>' to say which")
