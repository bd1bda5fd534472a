"""Flower child processes: their environment, output echoing and signal forwarding."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Callable

from fedsynth.ops.fields import DeployError

BIN_DIR = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode live next to python


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, venv binaries first, no runtime `uv sync`, no telemetry."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(BIN_DIR), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # nothing from the working folder (a site's state_dir) is ever imported ahead of installed code (review s59)
    env["PYTHONSAFEPATH"] = "1"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage events to telemetry.flower.ai (fedsynth/__init__.py)
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no daily update check to api.flower.ai (fedsynth/__init__.py)
    return env


def flower_bin(name: str) -> str:
    path = BIN_DIR / name
    if path.exists():
        return str(path)
    import shutil

    found = shutil.which(name)
    if not found:
        raise DeployError(f"'{name}' is not installed next to {sys.executable} nor on PATH; install the project "
                          "(make install) so flwr==1.41.0 is in the virtualenv")
    return found


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this process dies (Linux), so no orphan keeps a port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """A Flower process whose output is echoed (and remembered) and which receives our stop signals."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, prefix: str = "",
                 log_path: Path | None = None, on_line: Callable[[str], None] | None = None,
                 hide: Callable[[str], bool] | None = None) -> None:
        self.cmd = cmd
        self.tail: deque[str] = deque(maxlen=400)
        self.stopping = False
        self._prefix = prefix
        self._on_line = on_line
        self._hide = hide
        self._log = open(log_path, "a", buffering=1) if log_path else None
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.tail.append(line)
            if not (self._hide and self._hide(line)):
                sys.stdout.write(f"{self._prefix}{line}\n")
                sys.stdout.flush()
            if self._log:
                self._log.write(line + "\n")
            if self._on_line:
                try:
                    self._on_line(line)
                except Exception:  # a hint must never break the pump
                    pass

    def text(self) -> str:
        return "\n".join(self.tail)

    def stop(self, sig: int = signal.SIGTERM, grace: float = 20.0) -> None:
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join(5)
        if self._log:
            self._log.close()
        return code


def forward_signals(child: Child) -> None:
    def handler(signum, _frame):
        if child.stopping and signum == signal.SIGINT:
            child.proc.kill()
            return
        child.stopping = True
        if child.proc.poll() is None:
            child.proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)