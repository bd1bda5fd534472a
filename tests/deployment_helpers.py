"""A real deployment on 127.0.0.1 for the tests: `fedsynth coordinator` (SuperLink, TLS, SuperNode
authentication) and three `fedsynth site` SuperNodes on their own digits partitions.

Starting Flower processes is what costs time, so one deployment (``start_deployment``, the session
fixture ``deployment`` in conftest.py) serves test_deployment.py and test_hostile_coordinator.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = PROJECT_ROOT / "deploy" / "make_certs.sh"

_missing = [tool for tool, path in (("flower-superlink", BIN / "flower-superlink"),
                                    ("flower-supernode", BIN / "flower-supernode"), ("flwr", BIN / "flwr"))
            if not path.exists() and shutil.which(tool) is None]
_missing += [tool for tool in ("openssl", "ssh-keygen", "bash") if shutil.which(tool) is None]
SKIP_REASON = f"deployment tests need {', '.join(_missing)} (not installed)" if _missing else ""

# Tiny work per message; generous deadlines (each message starts a fresh python + torch process).
TINY_RUN = {"num-rounds": 2, "gan-local-steps": 3, "gan-width": 16, "gan-latent-dim": 16, "gan-batch-size": 32,
            "synthetic-size": 100, "learner-epochs": 1, "learner": "mlp", "real-baseline": False,
            "progress": False, "test-data": "digits", "round-timeout": 60.0, "quorum": 0.5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def minimal_site_yaml(folder: Path, **fields) -> Path:
    """``folder``/site.yaml with only the keys a site must set (digits, epsilon 2, its state in ``folder``), and
    ``fields`` over them: for tests of how one setting is read."""
    return yaml_file(folder / "site.yaml", {"name": "s1", "data": "digits", "epsilon": 2.0, "state_dir": str(folder),
                                           "coordinator": "127.0.0.1:9092", **fields})


def yaml_file(path: Path, mapping: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def fedsynth_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def fedsynth(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a deployment command to completion (as `fedsynth ...` would)."""
    return subprocess.run([sys.executable, "-m", "fedsynth.cli", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env=fedsynth_env(), timeout=timeout)


def _descendants(root: int) -> list[int]:
    """Every live descendant of ``root`` (read from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Proc:
    """A long-running `fedsynth site/coordinator` in its own process group (killable as a whole, like a host)."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        self._fh = open(log, "a")
        self.p = subprocess.Popen([sys.executable, "-m", "fedsynth.cli", *args], stdout=self._fh,
                                  stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=fedsynth_env(), start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.p.poll() is not None:
                raise AssertionError(f"process exited ({self.p.returncode}) before '{needle}':\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"'{needle}' not seen within {timeout} s:\n{self.text()[-4000:]}")
            time.sleep(0.3)

    def kill(self) -> None:
        """SIGKILL the process and every descendant: the host 'dies' (SuperLink/SuperNode, SuperExec, apps).

        Flower's SuperExec starts ServerApp/ClientApp processes in sessions of their own, so killing the
        process group alone would leave them running."""
        for pid in [self.p.pid, *_descendants(self.p.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait(30)

    def stop(self) -> None:
        if self.p.poll() is None:
            family = _descendants(self.p.pid)
            try:
                self.p.send_signal(signal.SIGTERM)  # fedsynth forwards it; Flower shuts down gracefully
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                pass
            for pid in family:  # whatever did not exit with its parent
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.kill()
        self._fh.close()


class Deployment:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[Proc] = []
        self.sites: dict[str, Proc] = {}
        self.coordinator: Proc | None = None

    def _log(self, name: str) -> Path:
        n = 1
        while (self.root / f"{name}-{n}.log").exists():
            n += 1
        return self.root / f"{name}-{n}.log"

    def start_coordinator(self) -> None:
        self.coordinator = Proc(self._log("coordinator"), "coordinator", "--config", str(self.coord_yaml))
        self.procs.append(self.coordinator)
        self.coordinator.wait_for("coordinator ready", 120)

    def start_site(self, name: str) -> Proc:
        proc = Proc(self._log(name), "site", "--config", str(self.site_yaml[name]))
        self.procs.append(proc)
        self.sites[name] = proc
        return proc

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        env = fedsynth_env()
        env["FLWR_HOME"] = str(self.root / "coord-home")
        return subprocess.run([str(BIN / "flwr"), *args], capture_output=True, text=True, env=env, timeout=240,
                              cwd=PROJECT_ROOT)

    def nodes(self) -> list[dict]:
        out = self.flwr("supernode", "list", "fedsynth", "--format", "json").stdout
        return json.loads(out[out.find("{"):])["nodes"]

    def wait_online(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while sum(n["status"] == "online" for n in self.nodes()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} sites not online after {timeout} s: {self.nodes()}")
            time.sleep(1)

    def ledger(self, name: str) -> dict:
        """The site's current-dataset ledger summary, read the way `fedsynth ledger` reads it (in-process: fast)."""
        from fedsynth.ops.ledger_cmd import site_ledger_rows

        rows, note = site_ledger_rows(str(self.site_yaml[name]))
        assert note is None, note
        current = [r for r in rows if r["current"]]
        return current[0] if current else {"releases": 0, "spent_epsilon": 0.0}

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def start_deployment(tmp_path_factory):
    from common.data import load_dataset, save_npz
    from common.partition import partition_indices

    root = tmp_path_factory.mktemp("deployment")
    certs = root / "certs"
    made = subprocess.run(["bash", str(MAKE_CERTS), str(certs), "site1", "site2", "site3", "intruder"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    # three disjoint digits partitions, one npz per site
    digits = load_dataset("digits", "train")
    parts = partition_indices(digits.labels, 3, "iid", seed=0)
    dep = Deployment(root)
    port = free_port()
    dep.coord_yaml = yaml_file(root / "coordinator.yaml", {
        "host": "127.0.0.1", "port": port, "flwr_home": "coord-home", "ca_cert": "certs/ca.crt",
        "cert": "certs/superlink.crt", "key": "certs/superlink.key",
        "sites": [{"name": f"site{i}", "public_key": f"certs/keys/site{i}.pub"} for i in (1, 2, 3)],
        "out_dir": "runs/default", "run": TINY_RUN})
    dep.site_yaml = {}
    for i, idx in enumerate(parts, start=1):
        save_npz(digits.subset(idx), root / "data" / f"site{i}.npz")
        dep.site_yaml[f"site{i}"] = yaml_file(root / f"site{i}.yaml", {
            "name": f"site{i}", "data": f"data/site{i}.npz", "epsilon": 30.0, "state_dir": f"state/site{i}",
            "coordinator": f"127.0.0.1:{port}", "ca_cert": "certs/ca.crt", "private_key": f"certs/keys/site{i}",
            "supernode_port": free_port(), "modes": ["dpgan", "bnstats"]})
    try:
        dep.start_coordinator()
        for name in ("site1", "site2", "site3"):
            dep.start_site(name)
        dep.wait_online(3, 180)
    except BaseException:
        dep.close()
        raise
    return dep
