"""Fuzzing the entry point: every generated config or override mistake ends in one ``error:``
line, exit code 2, no traceback, and no run folder.

The cases are generated from the config dataclasses themselves (a wrong type, an out-of-range
value and an unknown key for every field of every section, every strategy's own config
included), plus broken YAML text, non-mapping and binary files, malformed overrides, streams
that cannot be built and folders that are not run folders. Every run kind's ``run`` is replaced
by a function that fails the test: a bad config must be refused before anything trains.
"""

from __future__ import annotations

import dataclasses
import random
import typing
from pathlib import Path

import pytest
import yaml

from adaptsim.cl import cli
from adaptsim.cl.runkinds import list_run_kinds

ROOT = Path(__file__).resolve().parents[1]
TINY = yaml.safe_load((ROOT / "scenarios" / "tiny_digits.yaml").read_text())
FED = {"scenario": {"dataset": {"name": "digits"}},
       "backbone": {"name": "tiny_vit", "img_size": 16, "tiny_dim": 32, "tiny_depth": 1, "tiny_patch": 4},
       "federated": {"method": "ffa_lora", "num_clients": 2, "clients_per_round": 2, "rounds": 1}}
UNLEARN = {"unlearning": {"dataset": {"name": "digits"}, "requests": [[0]]},
           "backbone": {"name": "tiny_vit", "img_size": 28, "tiny_patch": 7}, "method": {"name": "retrain"}}


def _bad_values(tp) -> list:
    """Values that cannot be coerced to the annotation ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return ["maybe", 3]
    if tp is int:
        return ["three", 1.5, [1]]
    if tp is float:
        return ["fast", [0.1], True]
    if tp is str:
        return [[1, 2], {"a": 1}]
    if origin is typing.Literal:
        return ["no_such_choice"]
    if origin in (list, tuple):
        return [5, "scalar"] if args and args[0] is not str else [5]
    if origin in (typing.Union, type(int | None)):
        inner = [a for a in args if a is not type(None)]
        vals = _bad_values(inner[0]) if len(inner) == 1 else []
        return [v for v in vals if v is not None]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [7, "scalar"]
    return []


def _field_cases(section: str, cls: type, base_raw: dict, extra: dict | None = None) -> list:
    """(label, raw) cases: a wrong-type value for every field of ``cls`` and one unknown key."""
    hints = typing.get_type_hints(cls)
    cases = []
    for f in dataclasses.fields(cls):
        if (section, f.name) == ("run", "out_dir"):
            continue  # the test's own --run.out_dir override replaces it
        for v in _bad_values(hints[f.name]):
            raw = yaml.safe_load(yaml.safe_dump(base_raw))
            node = raw
            for part in section.split("."):
                node = node.setdefault(part, {})
            node.update(extra or {})
            node[f.name] = v
            cases.append((f"{section}.{f.name}={v!r}", raw))
    raw = yaml.safe_load(yaml.safe_dump(base_raw))
    node = raw
    for part in section.split("."):
        node = node.setdefault(part, {})
    node.update(extra or {})
    node["no_such_key_x"] = 1
    cases.append((f"{section}.no_such_key_x", raw))
    return cases


def _config_cases() -> list:
    from adaptsim.cl.backbones import BackboneConfig
    from adaptsim.cl.data import DatasetConfig
    from adaptsim.cl.experiment import RunConfig
    from adaptsim.cl.scenarios import ClassIncrementalArgs
    from adaptsim.cl.train import TrainConfig
    from adaptsim.cl.unlearning import UnlearningStream
    from adaptsim.federated.config import DPConfig, FederatedConfig
    from adaptsim.strategies import get_strategy, list_strategies

    cases = []
    cases += _field_cases("backbone", BackboneConfig, TINY)
    cases += _field_cases("train", TrainConfig, TINY)
    cases += _field_cases("run", RunConfig, TINY)
    cases += _field_cases("scenario", ClassIncrementalArgs, TINY)
    cases += _field_cases("scenario.dataset", DatasetConfig, TINY)
    for name in list_strategies():
        cases += _field_cases("strategy", get_strategy(name)[0], TINY, extra={"name": name})
    cases += _field_cases("federated", FederatedConfig, FED)
    cases += _field_cases("federated.dp", DPConfig, FED)
    cases += _field_cases("unlearning", UnlearningStream, UNLEARN)
    semantic = [  # right types, impossible values
        ("scenario", {"increment": 3, "initial_increment": 2}), ("scenario", {"increment": 0}),
        ("scenario", {"initial_increment": 11}), ("scenario", {"generator": "nope"}),
        ("scenario", {"dataset": {"name": "imagenet"}}), ("scenario.dataset", {"train_per_class": 0}),
        ("strategy", {"name": "nope"}), ("strategy", {"name": 3}), ("strategy", {"epochs": -1}),
        ("strategy", {"lr": 0}), ("strategy", {"nmae": "simplecil"}), ("train", {"device": "tpu"}),
        ("backbone", {"name": ""}), ("backbone", {"img_size": 0}), ("backbone", {"name": "no_such_timm_model"}),
        ("backbone", {"tiny_dim": 30, "tiny_heads": 4}),
    ]
    for section, patch in semantic:
        raw = yaml.safe_load(yaml.safe_dump(TINY))
        node = raw
        for part in section.split("."):
            node = node.setdefault(part, {})
        node.update(patch)
        cases.append((f"{section}<-{patch}", raw))
    top = [("kind: nope", {**TINY, "kind": "nope"}), ("kind: [1]", {**TINY, "kind": [1]}),
           ("kind federated on CL", {**TINY, "kind": "federated"}), ("extra top key", {**TINY, "sceanrio": {}}),
           ("no strategy", {k: v for k, v in TINY.items() if k != "strategy"}),
           ("both federated and strategy", {**TINY, "federated": {}}),
           ("strategy not a mapping", {**TINY, "strategy": "simplecil"}),
           ("scenario a list", {**TINY, "scenario": [1, 2]}), ("only run", {"run": {"seed": 1}}),
           ("fednano kind with lora", {**FED, "kind": "fednano"}),
           ("more clients than samples", {**FED, "federated": {**FED["federated"], "num_clients": 5000}}),
           ("unlearning requests overlap", {**UNLEARN, "unlearning": {"dataset": {"name": "digits"}, "requests": [[0], [0]]}}),
           ("unlearning forgets all", {**UNLEARN, "unlearning": {"dataset": {"name": "digits"}, "requests": [list(range(10))]}}),
           ("unlearning class out of range", {**UNLEARN, "unlearning": {"dataset": {"name": "digits"}, "requests": [[42]]}}),
           ("unlearning method unknown", {**UNLEARN, "method": {"name": "nope"}})]
    return cases + top


TEXT_CASES = [
    ("yaml unclosed", "scenario: [unclosed\n"), ("yaml bad indent", "scenario:\n  a: 1\n b: 2\n"),
    ("yaml tab", "scenario:\n\t- 1\n"), ("yaml unclosed quote", "strategy: {name: 'simplecil}\n"),
    ("yaml list top", "- 1\n- 2\n"), ("yaml scalar top", "42\n"), ("yaml string top", "hello\n"),
    ("empty", ""), ("only comment", "# nothing\n"), ("yaml duplicate anchors", "a: *nope\n"),
    ("yaml python tag", "a: !!python/object/apply:os.system ['true']\n"),
]

OVERRIDE_CASES = [["-x"], ["--"], ["--=1"], ["--a..b=1"], ["--.x=1"], ["--run.seed"], ["--run.seed=[1"],
                  ["--strategy=1"], ["--run.seed=abc"], ["--train.device=tpu"], ["--kind=nope"],
                  ["--scenario.increment=4"], ["--strategy.nmae=simplecil"], ["--strategy.name=nope"],
                  ["--backbone.img_size=-3"], ["--run=5"], ["--run.seed.x=1"], ["positional"]]


def _random_yaml_cases(n: int, seed: int = 0) -> list:
    """Random mutations of the tiny scenario's text (truncations, swapped characters)."""
    rng = random.Random(seed)
    text = (ROOT / "scenarios" / "tiny_digits.yaml").read_text()
    out = []
    while len(out) < n:
        chars = list(text)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(chars))
            chars[i] = rng.choice("[]{}:,'\"\t&*!|>%@`")
        mutated = "".join(chars)
        try:
            ok = isinstance(yaml.safe_load(mutated), dict)
        except yaml.YAMLError:
            ok = False
        if not ok:  # keep only mutations that are broken YAML or not a mapping
            out.append((f"random yaml {len(out)}", mutated))
    return out


@pytest.fixture()
def no_training(monkeypatch):
    """Every kind's run fails the test: bad configs must be refused before training starts."""
    import dataclasses as dc

    from adaptsim.cl.runkinds import RUN_KINDS

    def refuse(cfg, rd, **kw):
        raise AssertionError(f"a bad config reached training: {rd.path}")

    for kind in list_run_kinds():
        monkeypatch.setitem(RUN_KINDS._entries, kind.name, dc.replace(kind, run=refuse))


def _check(capsys, tmp_path, argv) -> None:
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2, (argv, err)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), f"{argv} left a run folder"


def test_fuzzed_configs_and_overrides_fail_cleanly(tmp_path, capsys, no_training):
    cases = [(label, yaml.safe_dump(raw)) for label, raw in _config_cases()]
    cases += TEXT_CASES + _random_yaml_cases(40)
    n = 0
    for label, text in cases:
        path = tmp_path / f"case{n}.yaml"
        path.write_text(text)
        _check(capsys, tmp_path, ["run", str(path), f"--run.out_dir={tmp_path / 'runs'}"])
        n += 1
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(TINY))
    for extra in OVERRIDE_CASES:
        _check(capsys, tmp_path, ["run", str(good), f"--run.out_dir={tmp_path / 'runs'}", *extra])
        n += 1
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"scenario: {}\x00\x00")
    not_run = tmp_path / "not_a_run"
    not_run.mkdir()
    for argv in (["run", str(binary)], ["run", str(nul)], ["run", str(tmp_path / "missing.yaml")],
                 ["run", str(tmp_path)], ["run"], ["run", "--resume", str(not_run)],
                 ["run", "--resume", str(tmp_path / "nowhere")], ["run", str(good), "--resume", str(not_run)],
                 ["report", str(not_run)], ["nonsense-command"], ["run", "--resume"]):
        _check(capsys, tmp_path, argv)
        n += 1
    assert n >= 200, n
