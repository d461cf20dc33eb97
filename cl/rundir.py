"""One run folder helper used by every run kind: config, metrics, CSVs, plots, checkpoints, status.

A run folder holds::

    config.yaml        the resolved config, with its ``kind:`` (what ``adaptsim run --resume`` reads)
    status.json        {"status": "running" | "finished" | "failed", "kind", "error", times, pid}
    metrics.json       what the run measured (written by the run kind)
    *.csv, *.png       tables and plots
    checkpoints/       what resuming needs
    report.html        the single-run report (``adaptsim report RUN_DIR``)

JSON encoding (one for the whole project, :func:`dumps_json` / :func:`loads_json`): strict JSON
(no ``Infinity``/``NaN`` tokens, so any JSON reader opens it); NaN is written as ``null``,
+∞ / −∞ as the strings ``"inf"`` / ``"-inf"``; numpy scalars and arrays become numbers and lists,
paths become strings. :func:`loads_json` turns ``"inf"`` / ``"-inf"`` back into floats
(``null`` stays ``None``).

Every file is written atomically (a temporary file, then ``os.replace``), so a killed run never
leaves a half-written ``metrics.json`` or checkpoint, and a folder is only ``finished`` once its
run kind returned.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from adaptsim.cl.config import ConfigError, read_yaml, write_yaml

__all__ = ["RunDir", "RunDirError", "dumps_json", "loads_json", "json_safe", "is_run_dir", "write_atomic",
           "RUNNING", "FINISHED", "FAILED"]

RUNNING, FINISHED, FAILED = "running", "finished", "failed"
STATUS_FILE = "status.json"
CONFIG_FILE = "config.yaml"


class RunDirError(ConfigError):
    """A folder that is not a run folder, or one that cannot be written as asked."""


def json_safe(obj: Any) -> Any:
    """Plain-JSON form of ``obj``: NaN → None, ±∞ → "inf"/"-inf", numpy → Python, Path → str."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars/arrays, torch tensors
    if callable(tolist):
        return json_safe(tolist())
    item = getattr(obj, "item", None)
    if callable(item):
        return json_safe(item())
    return str(obj)


def dumps_json(obj: Any, indent: int | None = 1) -> str:
    """Strict JSON text of ``obj`` in the project's one encoding (see module docstring)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def _decode(obj: Any) -> Any:
    if obj == "inf":
        return math.inf
    if obj == "-inf":
        return -math.inf
    if isinstance(obj, dict):
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def loads_json(text: str) -> Any:
    """Inverse of :func:`dumps_json` (``"inf"``/``"-inf"`` → floats; ``null`` stays None)."""
    return _decode(json.loads(text))


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary file and
    ``os.replace``, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)
    return path


def is_run_dir(path: str | Path) -> bool:
    """True when ``path`` holds a run folder's ``config.yaml`` and ``status.json``."""
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / STATUS_FILE).is_file()


class RunDir:
    """A run folder. Create one with :meth:`create`, reopen one with :meth:`open`.

    Attributes:
        path: the folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- creation -------------------------------------------------------------------------
    @classmethod
    def create(cls, parent: str | Path, name: str, config_raw: Mapping[str, Any], kind: str) -> "RunDir":
        """Make ``parent/name`` with ``config.yaml`` (``kind:`` first) and status ``running``.

        A folder left ``failed`` by an earlier attempt is cleared and reused.

        Raises:
            RunDirError: if the folder holds a finished run, a run still marked running (resume
                it instead), or files that are not a run folder's.
        """
        rd = cls(Path(parent) / name)
        if rd.path.exists() and any(rd.path.iterdir()):
            status = rd.status().get("status") if (rd.path / STATUS_FILE).is_file() else None
            if status == FINISHED:
                raise RunDirError(f"run folder {rd.path} already holds a finished run; choose another run.name")
            if status == RUNNING:
                raise RunDirError(f"run folder {rd.path} holds an unfinished run; continue it with "
                                  f"`adaptsim run --resume {rd.path}` or choose another run.name")
            if status != FAILED:
                raise RunDirError(f"{rd.path} exists and is not a run folder; choose another run.name")
            shutil.rmtree(rd.path)
        rd.path.mkdir(parents=True, exist_ok=True)
        write_yaml({"kind": kind, **{k: v for k, v in config_raw.items() if k != "kind"}},
                   rd.path / CONFIG_FILE)
        rd._write_status({"status": RUNNING, "kind": kind, "created": time.time()})
        return rd

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """Reopen an existing run folder.

        Raises:
            RunDirError: if ``path`` is not a run folder.
        """
        p = Path(path)
        if not p.is_dir():
            raise RunDirError(f"{p} does not exist or is not a folder")
        if not is_run_dir(p):
            raise RunDirError(f"{p} is not a run folder (it needs {CONFIG_FILE} and {STATUS_FILE}, "
                              "as `adaptsim run` writes them)")
        return cls(p)

    # -- status ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The parsed ``status.json`` ({} when absent)."""
        f = self.path / STATUS_FILE
        if not f.is_file():
            return {}
        try:
            return loads_json(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{f} is not valid JSON: {exc}") from None

    def _write_status(self, st: Mapping[str, Any]) -> None:
        write_atomic(self.path / STATUS_FILE, dumps_json(st))

    def _update_status(self, **fields: Any) -> None:
        st = self.status()
        st.update(fields, updated=time.time(), pid=os.getpid(), host=socket.gethostname())
        self._write_status(st)

    def mark_running(self) -> None:
        """Status ``running`` (on start and on resume); clears an earlier error."""
        self._update_status(status=RUNNING, error=None, started=time.time())

    def mark_finished(self, summary: Mapping[str, Any] | None = None) -> None:
        """Status ``finished`` (the run kind returned complete metrics)."""
        self._update_status(status=FINISHED, error=None, finished=time.time(), summary=dict(summary or {}))

    def mark_failed(self, error: str) -> None:
        """Status ``failed`` with the error message."""
        self._update_status(status=FAILED, error=error, failed=time.time())

    @property
    def finished(self) -> bool:
        return self.status().get("status") == FINISHED

    # -- files ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The saved ``config.yaml`` (with its ``kind``)."""
        return read_yaml(self.path / CONFIG_FILE)

    def file(self, name: str) -> Path:
        """Path of ``name`` inside the folder (parents created)."""
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> Path:
        """Write ``obj`` as ``name`` in the one JSON encoding (atomic)."""
        p = self.path / name
        write_atomic(p, dumps_json(obj))
        return p

    def read_json(self, name: str) -> Any:
        return loads_json((self.path / name).read_text())

    def write_metrics(self, metrics: Mapping[str, Any]) -> Path:
        """``metrics.json`` (atomic)."""
        return self.write_json("metrics.json", metrics)

    def metrics(self) -> dict[str, Any]:
        return self.read_json("metrics.json")

    def write_csv(self, name: str, rows: Sequence[Sequence[Any]], header: Iterable[str]) -> Path:
        """A CSV with ``header`` and ``rows`` (floats with 6 decimals, NaN as empty)."""
        def cell(v: Any) -> str:
            if isinstance(v, float):
                return "" if math.isnan(v) else f"{v:.6f}"
            return str(v)

        lines = [",".join(header)] + [",".join(cell(v) for v in row) for row in rows]
        p = self.path / name
        write_atomic(p, "\n".join(lines) + "\n")
        return p

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        d = self.path / "checkpoints"
        d.mkdir(exist_ok=True)
        return d

    def save_checkpoint(self, name: str, obj: Any) -> Path:
        """``torch.save`` into ``checkpoints/name`` atomically."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        p = self.checkpoint_dir / name
        write_atomic(p, buf.getvalue())
        return p

    def load_checkpoint(self, path: str | Path, map_location: Any = None) -> Any:
        """``torch.load(..., weights_only=True)`` of a checkpoint."""
        import torch

        return torch.load(path, map_location=map_location, weights_only=True)

    def latest_checkpoint(self, prefix: str, suffix: str = ".pt") -> tuple[int, Path] | None:
        """``(index, path)`` of the highest-numbered ``checkpoints/<prefix><index><suffix>``."""
        found = []
        for p in self.checkpoint_dir.glob(f"{prefix}*{suffix}"):
            idx = p.name[len(prefix): len(p.name) - len(suffix)]
            if idx.isdigit():
                found.append((int(idx), p))
        return max(found) if found else None
