"""The ``adaptsim`` command: ``run``, ``study``, ``report``, ``list``.

::

    adaptsim run SCENARIO.yaml [--section.key=value ...]   # one run into runs/<name>/
    adaptsim run --resume RUN_DIR                          # continue a killed run
    adaptsim study STUDY.yaml [--workers N] [--address HOST:PORT|ray://HOST:PORT|auto] [--key=value ...]
    adaptsim report DIR                                    # report.html of a run or study folder
    adaptsim list                                          # strategies, run kinds, scenarios
    adaptsim export-peft RUN_DIR [--out DIR]               # a federated LoRA run as a PEFT adapter

Commands beyond these four come from the ``adaptsim.commands`` entry-point group (a
``main(argv) -> exit code`` each), so ``cl`` needs no import of the packages that provide them.

Every user mistake (a bad YAML, an unknown key, a stream that cannot be built, a missing data
file, a folder that is not a run folder) ends in one ``error:`` line on stderr and exit code 2,
never a traceback. This is the only place that configures logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main", "run_main"]

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage mistake as one ``error:`` line (exit 2)."""

    def error(self, message: str):  # noqa: D401
        self.exit(EXIT_USER_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


def _setup_logging(quiet: bool = False) -> None:
    import warnings

    warnings.filterwarnings("ignore", message="no QP solver found")  # avalanche -> qpsolvers, harmless
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


def _print_run(result) -> None:
    print(f"run folder: {result.run_dir}")
    m = result.metrics
    if not result.finished:
        print(f"stopped early; continue with: adaptsim run --resume {result.run_dir}")
    elif "A_last" in m:
        print(f"A_last={m['A_last']:.4f}  avg_inc_acc={m['avg_incremental_accuracy']:.4f}  "
              f"forgetting={m['forgetting']:.4f}  bwt={m['bwt']:.4f}")
    elif "summary" in m:
        s = m["summary"]
        print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    if (Path(result.run_dir) / "report.html").is_file():
        print(f"report: {Path(result.run_dir) / 'report.html'}")


def _cmd_run(args: argparse.Namespace, rest: list[str]) -> int:
    from adaptsim.cl import engine
    from adaptsim.cl.config import ConfigError, parse_overrides

    overrides = parse_overrides(rest)
    if args.resume:
        if args.config:
            raise ConfigError("give either a scenario YAML or --resume RUN_DIR, not both")
        if overrides:
            raise ConfigError("overrides cannot be combined with --resume (the run keeps its config)")
        result = engine.resume_run(args.resume)
    else:
        if not args.config:
            raise ConfigError("give a scenario YAML, e.g. `adaptsim run scenarios/tiny_digits.yaml`")
        kind, cfg = engine.load(args.config, overrides)
        result = engine.run_config(cfg, kind)
    _print_run(result)
    return 0


def _cmd_study(args: argparse.Namespace, rest: list[str]) -> int:
    from adaptsim.cl.config import parse_overrides
    from adaptsim.cl.study import run_study

    result = run_study(args.study, overrides=parse_overrides(rest), workers=args.workers,
                       address=args.address, out_dir=args.out_dir, retry_failed=args.retry_failed)
    print(f"study folder: {result.study_dir}")
    print(result.table)
    if result.failed:
        print(f"{len(result.failed)} cell(s) failed; rerun the same command to retry them once more")
    return 1 if result.failed else 0


def _cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    from adaptsim.cl.config import ConfigError
    from adaptsim.cl.report import write_report

    if rest:
        raise ConfigError(f"report takes only a folder; unexpected {' '.join(rest)}")
    print(f"report: {write_report(args.dir)}")
    return 0


def _scenario_line(path: Path) -> str:
    """First comment line of a scenario YAML (its description)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith("#"):
                return line.lstrip("# ").strip()
            if line.strip():
                break
    except (OSError, UnicodeDecodeError):
        pass
    return ""


def _cmd_list(args: argparse.Namespace, rest: list[str]) -> int:
    from adaptsim.cl.runkinds import list_run_kinds
    from adaptsim.strategies import get_strategy, list_strategies

    print("strategies (kind: continual; --strategy.name=NAME):")
    for name in list_strategies():
        doc = (get_strategy(name)[1].__doc__ or "").strip().splitlines()
        print(f"  {name:<12} {doc[0] if doc else ''}")
    print("run kinds (YAML `kind:`):")
    for kind in list_run_kinds():
        print(f"  {kind.name:<12} {kind.description}")
    root = Path(args.scenarios)
    files = sorted(root.glob("*.yaml")) + sorted(root.glob("studies/*.yaml"))
    print(f"scenarios ({root}/):" if files else f"scenarios: none found under {root}/")
    for f in files:
        print(f"  {str(f.relative_to(root)):<28} {_scenario_line(f)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="adaptsim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run one scenario YAML (or resume a run folder)")
    r.add_argument("config", nargs="?", help="scenario YAML (omit with --resume)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    r.set_defaults(fn=_cmd_run)
    s = sub.add_parser("study", help="run a seeded grid of scenarios (on Ray) and aggregate it")
    s.add_argument("study", help="study YAML (see scenarios/studies/)")
    s.add_argument("--workers", type=int, default=None,
                   help="local Ray worker processes (default: study.workers); 0 runs in this process")
    s.add_argument("--address", default=None,
                   help="an existing Ray cluster: HOST:PORT (the head's GCS port), ray://HOST:PORT (Ray "
                        "Client) or auto (default: start a local one)")
    s.add_argument("--retry-failed", action="store_true",
                   help="run cells that failed twice once more (normally they are only reported)")
    s.add_argument("--out-dir", default=None, help="parent of the study folder (default: study.out_dir)")
    s.set_defaults(fn=_cmd_study)
    rep = sub.add_parser("report", help="write report.html for a run or study folder")
    rep.add_argument("dir", help="a run folder or a study folder")
    rep.set_defaults(fn=_cmd_report)
    ls = sub.add_parser("list", help="list strategies, run kinds and scenarios")
    ls.add_argument("--scenarios", default="scenarios", help="folder of scenario YAMLs (default: scenarios)")
    ls.set_defaults(fn=_cmd_list)
    for ep in _plugin_commands():
        c = sub.add_parser(ep.name, help=f"(from {ep.value.split(':')[0]}; --help for its options)", add_help=False)
        c.set_defaults(fn=_plugin_runner(ep))
    return p


def _plugin_commands() -> list:
    from importlib.metadata import entry_points

    return sorted(entry_points(group="adaptsim.commands"), key=lambda ep: ep.name)


def _plugin_runner(ep):
    def run(args: argparse.Namespace, rest: list[str]) -> int:
        return int(ep.load()(rest) or 0)
    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adaptsim`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = _parser().parse_known_args(argv)
    except SystemExit as exc:  # --help, or a usage mistake already printed as one error: line
        return int(exc.code or 0)
    _setup_logging(args.quiet)
    from adaptsim.cl.engine import USER_ERRORS

    try:
        return args.fn(args, rest)
    except USER_ERRORS as exc:
        msg = " ".join(str(exc).split("\n")[0:1]) or type(exc).__name__
        print(f"error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def run_main(argv: Sequence[str] | None = None) -> int:
    """``python run_scenario.py ...``: the same as ``adaptsim run ...``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        return main(["run", "--help"])
    return main(["run", *argv])


if __name__ == "__main__":
    raise SystemExit(main())
