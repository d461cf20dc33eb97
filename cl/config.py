"""Typed, strict, layered configuration: dataclass defaults < YAML < dotted CLI overrides.

Every section is a frozen dataclass. :func:`from_dict` builds one from a mapping and rejects
unknown keys with an error that names the section, lists the valid keys and suggests the
closest one. YAML is read with ``yaml.safe_load`` only. CLI overrides (``--train.lr=0.01``)
are parsed as YAML scalars and type-checked against the field they set; only the overrides the
user actually passed are applied.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from adaptsim.cl.registry import closest

__all__ = [
    "ConfigError",
    "from_dict",
    "to_dict",
    "parse_overrides",
    "apply_overrides",
    "read_yaml",
    "write_yaml",
]


class ConfigError(ValueError):
    """A configuration mistake: unknown key, wrong type or invalid value."""


def unknown_key_error(section: str, key: str, valid: list[str]) -> ConfigError:
    """Build the standard unknown-key error message."""
    listed = ", ".join(sorted(valid)) if valid else "none (this section takes no keys)"
    return ConfigError(f"unknown key {key!r} in section '{section}'; valid keys: {listed}{closest(key, valid)}")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and lightly coerce) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{closest(str(value), [str(a) for a in args])}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Mapping[str, Any] | None, section: str,
              extra_valid: tuple[str, ...] = ()) -> Any:
    """Build dataclass ``cls`` from ``data``, strictly.

    Args:
        cls: a dataclass type.
        data: the mapping read from YAML (None means all defaults).
        section: dotted name of the section, used in error messages.
        extra_valid: keys the section also takes that the caller consumed before (a
            strategy's ``name``), listed among the valid keys of an unknown-key error.

    Raises:
        ConfigError: on unknown keys, wrong types, or a ``__post_init__`` ValueError.
    """
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"section '{section}' must be a mapping, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if not isinstance(key, str) or key not in fields:
            raise unknown_key_error(section, str(key), list(fields) + list(extra_valid))
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"section '{section}': {exc}") from exc


def to_dict(obj: Any) -> Any:
    """Turn (nested) dataclasses into plain YAML-safe containers."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Parse ``--a.b=value`` (or ``--a.b value``) strings into a dotted-key mapping.

    Values are parsed as YAML scalars (``1e-3`` → float, ``true`` → bool, ``[1,2]`` → list).
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"cannot parse override {arg!r}; use --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value; use --section.key=value")
            key, raw = body, args[i + 1]
            i += 1
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"cannot parse override {arg!r}; use --section.key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override --{key}: cannot parse the value {raw!r} "
                              "(quote it, or write a YAML scalar or list)") from None
        i += 1
    return out


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted ``overrides`` set (creating sub-mappings)."""
    import copy

    result = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = result
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return result


def read_yaml(path: str | Path, allow_empty: bool = False) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``.

    Raises:
        ConfigError: for a missing, unreadable, binary or empty file, a YAML syntax error
            (with the file, line and column) or a top level that is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8); give a scenario YAML") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if "\x00" in text:
        raise ConfigError(f"{path} is a binary file, not a YAML file")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: YAML error: {str(exc).splitlines()[0]}") from None
    if data is None:
        if allow_empty:
            return {}
        raise ConfigError(f"{path} is empty; a scenario YAML needs at least a 'scenario' section "
                          "(see scenarios/tiny_digits.yaml)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got a {type(data).__name__}")
    return data


def write_yaml(data: Any, path: str | Path) -> None:
    """Write ``data`` (dataclasses allowed) as YAML, atomically (temporary file, then rename)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(to_dict(data), sort_keys=False))
    os.replace(tmp, path)
