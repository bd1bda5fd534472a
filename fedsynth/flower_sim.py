"""Run a synthesis as a real Flower simulation (`flwr run` + Ray) on 127.0.0.1.

What a Flower 1.41 simulation needs on a shared machine is handled here: a private ``FLWR_HOME`` per run, Ray kept on
loopback (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``), runtime dependency installation off (it would pull a
CUDA torch from PyPI), free ports for the managed local SuperLink, and the run's real status read
from ``flwr ls`` because ``flwr run --stream`` exits 0 even when the run failed. The managed SuperLink
is stopped afterwards (no flwr command does that).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from fedsynth.ops.fields import write_toml
from fedsynth.ops.processes import flower_env as base_flower_env

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The deployment commands' Flower environment, plus Ray on loopback and free ports for the managed SuperLink."""
    env = base_flower_env(flwr_home)
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    return env


def _stop_local_superlink(flwr_home: Path) -> None:
    """Kill the managed local SuperLink (and its children) that `flwr run` started under ``flwr_home``."""
    try:
        out = subprocess.run(["pgrep", "-f", str(flwr_home)], capture_output=True, text=True).stdout.split()
    except FileNotFoundError:
        return
    for pid in out:
        try:
            os.kill(int(pid), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def run_flower_simulation(run_config: dict[str, Any], num_sites: int, out_dir: Path, timeout: float = 3600) -> dict:
    """Run ``flwr run`` in simulation with ``num_sites`` virtual SuperNodes; return the report it wrote."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = out_dir / ".flwr"
    flwr_home.mkdir(exist_ok=True)
    override = out_dir / "run-config.toml"
    write_toml(override, run_config)
    env = flower_env(flwr_home)
    cmd = [str(Path(sys.executable).parent / "flwr"), "run", str(PROJECT_ROOT), "--stream",
           "--run-config", str(override), "--federation-config", f"num-supernodes={num_sites}"]
    log_path = out_dir / "flower.log"
    print(f"fedsynth: starting a Flower simulation of {num_sites} site(s) (a local SuperLink and Ray take about "
          f"30 s to start); its log is {log_path}", file=sys.stderr, flush=True)
    try:
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=PROJECT_ROOT)
        status = subprocess.run([str(Path(sys.executable).parent / "flwr"), "ls", "--format", "json"], env=env,
                                capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
    finally:
        _stop_local_superlink(flwr_home)
    runs = []
    try:
        runs = json.loads(status.stdout).get("runs", [])
    except (json.JSONDecodeError, AttributeError):
        pass
    failed = proc.returncode != 0 or any("fail" in str(r.get("status", "")) for r in runs)
    report_path = out_dir / "report.json"
    if failed or not report_path.exists():
        details = "; ".join(str(r.get("status-details", "")) for r in runs)[:2000]
        raise RuntimeError(f"the Flower simulation failed (exit {proc.returncode}; {details}). "
                           f"Full log: {log_path}")
    return json.loads(report_path.read_text())
