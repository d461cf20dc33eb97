"""Deployment mode: real ``flower-superlink`` + N ``flower-supernode`` processes on loopback.

Flower 1.41 serves the Fleet, Control and Runtime APIs of a SuperLink over one HTTP(S) port
(``--host/--port``); each SuperNode needs its own ``--port`` for the Runtime API its
``flwr-clientapp`` subprocesses talk to. Since Flower 1.26 the ``flwr`` CLI reads its SuperLink
connections from ``$FLWR_HOME/config.toml`` (not from ``pyproject.toml``): this module writes a
throw-away ``FLWR_HOME`` per run.

Every process is started in its own session (process group) and :meth:`LocalFederation.stop`
kills the whole group (SIGTERM, then SIGKILL: a SuperNode may ignore SIGTERM while it retries
its connection), so the ``flwr-clientapp``/``flwr-serverapp``/``flower-superexec`` children go too.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["LocalFederation", "TLSFiles", "flwr_env", "flwr_run", "free_port", "make_certs",
           "make_node_keys", "run_deployment_mode", "write_flwr_home", "REPO_ROOT"]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]   # holds pyproject.toml with [tool.flwr.app]
_BIN = Path(sys.executable).parent                 # flower-superlink etc. live next to python


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (chosen by the OS)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _exe(name: str) -> str:
    path = _BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private ``FLWR_HOME``, no telemetry/update checks."""
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
                "PATH": f"{_BIN}{os.pathsep}{env.get('PATH', '')}", "NO_COLOR": "1"})
    return env


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a local CA and the SuperLink's certificate signed by it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_certs(out_dir: str | Path) -> TLSFiles:
    """Makes self-signed certificates for a local trial with ``scripts/make_certs.sh`` (openssl).

    Args:
        out_dir: folder for ``ca.crt``, ``server.pem``, ``server.key``.

    Returns:
        The file paths.

    Raises:
        RuntimeError: if the script fails.
    """
    out = Path(out_dir)
    res = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "make_certs.sh"), str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"make_certs.sh failed: {res.stderr.strip()}")
    return TLSFiles(out / "ca.crt", out / "server.pem", out / "server.key")


def make_node_keys(out_dir: str | Path, name: str) -> tuple[Path, Path]:
    """An EC (NIST P-384) key pair in OpenSSH format for SuperNode authentication.

    Same as ``ssh-keygen -t ecdsa -b 384 -N "" -f <name>``.

    Returns:
        ``(private_key_path, public_key_path)``; register the public key with
        ``flwr supernode register <pub> <connection>``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / name, out / f"{name}.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                  serialization.PublicFormat.OpenSSH))
    return priv, pub


def write_flwr_home(flwr_home: Path, name: str, address: str, *,
                    root_certificates: Path | None = None) -> Path:
    """Writes ``$FLWR_HOME/config.toml`` with one SuperLink connection ``name`` (the default).

    Without ``root_certificates`` the connection is ``insecure = true`` (quick local trials only).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _spawn(cmd: Sequence[str], log_path: Path, env: Mapping[str, str]) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting: %s", " ".join(cmd))
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True)


def _descendants(pid: int) -> list[int]:
    try:
        import psutil  # installed with flwr[simulation] (ray)

        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - psutil missing or the process already gone
        return []


def stop_process(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Kills ``proc``, its process group and its descendants: SIGTERM, then SIGKILL.

    Descendants are collected first because Flower starts ``flower-superexec`` in a session
    of its own (it would otherwise outlive its SuperLink/SuperNode by a few seconds).
    """
    children = _descendants(proc.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in (proc.pid, *children):
            try:
                os.killpg(target, sig) if target == proc.pid else os.kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=grace if sig == signal.SIGTERM else 10.0)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # leader gone: SIGKILL what is left in its group and below
            for target in children:
                try:
                    os.kill(target, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        break


class LocalFederation:
    """A SuperLink and N SuperNodes on 127.0.0.1 with free ports; a context manager.

    Args:
        workdir: folder for ``flwr_home/``, ``logs/`` and keys.
        num_supernodes: SuperNodes to start; node ``i`` gets ``partition-id=i
            num-partitions=num_supernodes``.
        tls: certificates for the SuperLink; ``None`` = ``--insecure`` (quick local trials only).
        node_keys: per SuperNode ``(private, public)`` key paths; when given, the SuperLink runs
            with ``--enable-supernode-auth`` and the public keys are registered first.
        simulation: start the SuperLink with ``--simulation`` (Flower's simulation engine runs
            the ClientApps; no SuperNodes are started).
    """

    def __init__(self, workdir: str | Path, num_supernodes: int = 2, *, tls: TLSFiles | None = None,
                 node_keys: Sequence[tuple[Path, Path]] | None = None, simulation: bool = False) -> None:
        if num_supernodes < 0:
            raise ValueError(f"num_supernodes must be >= 0, got {num_supernodes}")
        if node_keys is not None and len(node_keys) != num_supernodes:
            raise ValueError("node_keys needs one key pair per SuperNode")
        self.workdir = Path(workdir)
        self.num_supernodes, self.tls, self.node_keys, self.simulation = num_supernodes, tls, node_keys, simulation
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flwr_home = self.workdir / "flwr_home"
        self.logs = self.workdir / "logs"
        self.env = flwr_env(self.flwr_home)
        self.connection = "adaptsim-local"
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "LocalFederation":
        """Starts the SuperLink (waits until healthy), registers keys, starts the SuperNodes."""
        write_flwr_home(self.flwr_home, self.connection, self.address,
                        root_certificates=self.tls.ca_cert if self.tls else None)
        cmd = [_exe("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation"]
        cmd += (["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                 "--ssl-keyfile", str(self.tls.server_key)] if self.tls else ["--insecure"])
        if self.node_keys is not None:
            cmd.append("--enable-supernode-auth")
        if self.simulation:
            cmd.append("--simulation")
        self.superlink = _spawn(cmd, self.logs / "superlink.log", self.env)
        self._wait_healthy()
        for i in range(self.num_supernodes):
            if self.node_keys is not None:
                self.register_node(self.node_keys[i][1])
            self.supernodes.append(self.start_supernode(i))
        return self

    def start_supernode(self, i: int, private_key: Path | None = None, log_name: str | None = None,
                        max_retries: int = 20) -> subprocess.Popen:
        """Starts SuperNode ``i`` (``partition-id=i``); logs to ``logs/<log_name or supernode_i>.log``."""
        key = private_key or (self.node_keys[i][0] if self.node_keys else None)
        cmd = [_exe("flower-supernode"), "--superlink", self.address, "--port", str(free_port()),
               "--node-config", f"partition-id={i} num-partitions={self.num_supernodes}",
               "--max-retries", str(max_retries)]
        cmd += ["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        return _spawn(cmd, self.logs / f"{log_name or f'supernode_{i}'}.log", self.env)

    def register_node(self, public_key: Path) -> None:
        """``flwr supernode register <public_key>`` against this SuperLink.

        Raises:
            RuntimeError: if registration fails.
        """
        res = subprocess.run([_exe("flwr"), "supernode", "register", str(public_key), self.connection],
                             capture_output=True, text=True, env=self.env, cwd=self.workdir, timeout=60)
        if res.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {res.stdout}{res.stderr}")

    def _wait_healthy(self, timeout: float = 60.0) -> None:
        import httpx

        scheme = "https" if self.tls else "http"
        verify: Any = str(self.tls.ca_cert) if self.tls else False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited ({self.superlink.returncode}); see "
                                   f"{self.logs / 'superlink.log'}")
            try:
                if httpx.get(f"{scheme}://{self.address}/health", timeout=1.0, verify=verify).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"SuperLink not healthy after {timeout:.0f}s; see {self.logs / 'superlink.log'}")

    def kill_supernode(self, i: int) -> None:
        """Kills SuperNode ``i`` and its ClientApp children at once (SIGKILL: a crash)."""
        proc = self.supernodes[i]
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
            logger.warning("killed SuperNode %d (pid %d)", i, proc.pid)

    def stop(self) -> None:
        """Stops every process this federation started (SuperNodes first)."""
        for proc in self.supernodes:
            if proc is not None:
                stop_process(proc)
        if self.superlink is not None:
            stop_process(self.superlink)

    def __enter__(self) -> "LocalFederation":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self, name: str) -> str:
        """Contents of ``logs/<name>.log`` (``superlink``, ``supernode_0``, ``flwr_run``)."""
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- runs ------------------------------------------------------------------------------
    def run(self, run_config: Mapping[str, Any], *, federation_config: Mapping[str, Any] | None = None,
            app_dir: Path = REPO_ROOT, timeout: float = 1800.0) -> str:
        """``flwr run <app_dir> <connection> --run-config <toml> --format json`` + ``flwr log --stream``; waits for the end.

        Returns:
            The run's final status text (``finished:completed`` on success).

        Raises:
            RuntimeError: if ``flwr run`` fails or the run does not complete.
        """
        return flwr_run(app_dir, self.connection, run_config, env=self.env, workdir=self.workdir,
                        log_path=self.logs / "flwr_run.log", federation_config=federation_config,
                        timeout=timeout)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v == float("inf"):
        return "inf"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def flwr_run(app_dir: Path, connection: str, run_config: Mapping[str, Any], *, env: Mapping[str, str],
             workdir: Path, log_path: Path, federation_config: Mapping[str, Any] | None = None,
             timeout: float = 1800.0) -> str:
    """Submits the app with ``flwr run --format json`` (run id from its JSON reply), then streams the run's
    logs with ``flwr log --stream`` until the run ends.

    Args:
        app_dir: folder holding ``pyproject.toml`` with ``[tool.flwr.app]``.
        connection: SuperLink connection name in ``$FLWR_HOME/config.toml``.
        run_config: flat kebab-case overrides (written to a TOML file).
        env: environment (from :func:`flwr_env`).
        workdir: where the override file goes.
        log_path: where the streamed run log goes.
        federation_config: ``--federation-config`` entries (simulation: ``num-supernodes`` ...).
        timeout: seconds.

    Returns:
        The final status text of the run.

    Raises:
        RuntimeError: if the run could not start or did not complete.
    """
    override = workdir / "run_config.toml"
    override.write_text("".join(f'"{k}" = {_toml_value(v)}\n' for k, v in run_config.items()))
    cmd = [_exe("flwr"), "run", str(app_dir), connection, "--run-config", str(override), "--format", "json"]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(env), cwd=workdir, timeout=timeout)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n{res.stdout}{res.stderr}")
    run_id = _json_run_id(res.stdout)
    if res.returncode != 0 or run_id is None:
        raise RuntimeError(f"flwr run failed (exit {res.returncode}); see {log_path}")
    # ``flwr log --stream`` returns once the run has ended and all its logs are out.
    with open(log_path, "ab") as log:
        subprocess.run([_exe("flwr"), "log", run_id, connection, "--stream"], stdout=log,
                       stderr=subprocess.STDOUT, env=dict(env), cwd=workdir, timeout=timeout)
    status = _run_status(connection, run_id, env, workdir, wait=timeout)
    if not status.endswith("completed"):
        raise RuntimeError(f"run {run_id} ended with status {status!r}; see {log_path}")
    return status


def _json_run_id(stdout: str) -> str | None:
    """The ``run-id`` of ``flwr run --format json``'s reply (a JSON object, maybe pretty-printed), or None."""
    decoder = json.JSONDecoder()
    for i in (i for i, ch in enumerate(stdout) if ch == "{" and (i == 0 or stdout[i - 1] == "\n")):
        try:
            reply, _ = decoder.raw_decode(stdout, i)
        except json.JSONDecodeError:
            continue
        if isinstance(reply, dict) and reply.get("success") and reply.get("run-id"):
            return str(reply["run-id"])
    return None


def _run_status(connection: str, run_id: str, env: Mapping[str, str], workdir: Path, wait: float = 60.0) -> str:
    """Polls ``flwr ls --run-id --format json`` until the run has finished (at most ``wait`` s)."""
    end = time.monotonic() + wait
    status = ""
    while time.monotonic() < end:
        res = subprocess.run([_exe("flwr"), "ls", connection, "--run-id", run_id, "--format", "json"],
                             capture_output=True, text=True, env=dict(env), cwd=workdir)
        try:
            runs = json.loads(res.stdout).get("runs", [])
            status = str(runs[0].get("status", "")) if runs else ""
        except (json.JSONDecodeError, AttributeError):
            status = ""
        if status.startswith("finished"):
            return status
        time.sleep(1.0)
    return status or "unknown"


def run_deployment_mode(cfg: Any, run_dir: str | Path, *, round_timeout: float = 600.0) -> list[dict[str, Any]]:
    """Runs ``cfg`` on a SuperLink + ``num_clients`` SuperNodes on loopback (``--insecure``).

    This is the quick local deployment (no TLS, no node auth; see docs/federated.md for a
    secured one). The ServerApp writes the run folder; its round metrics are returned.

    Args:
        cfg: a :class:`~adaptsim.federated.config.FedExperimentConfig`.
        run_dir: the run folder (created by the runner).
        round_timeout: seconds the server waits for one round's replies.

    Returns:
        One metrics dict per round.
    """
    from adaptsim.federated.flower_glue import launch_run_config, read_rounds

    run_dir = Path(run_dir)
    work = run_dir / "flower"
    with LocalFederation(work, cfg.federated.num_clients) as fed:
        fed.run(launch_run_config(cfg, run_dir, round_timeout))
    return read_rounds(run_dir)
