"""A real deployment on 127.0.0.1: `fedsynth coordinator` (SuperLink, TLS, SuperNode authentication),
three `fedsynth site` SuperNodes on their own digits partitions, and `fedsynth run`.

One SuperLink serves every scenario (starting Flower processes is what costs time):
- a broken data folder fails `fedsynth site` before anything connects;
- a site whose key is not registered is rejected;
- a full DP-GAN run in which site3 is killed during round 2 (deadline + quorum carry the run) and the
  coordinator is killed after round 2; the restarted coordinator resumes from its checkpoint, the
  restarted site3 keeps its ledger, and the outputs arrive;
- hostile run configs: a noise setting does not exist, and a request beyond the sites' budgets is refused
  with nothing spent; an unknown message type gets an error reply.
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

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAKE_CERTS = PROJECT_ROOT / "deploy" / "make_certs.sh"

_missing = [tool for tool, path in (("flower-superlink", BIN / "flower-superlink"),
                                    ("flower-supernode", BIN / "flower-supernode"), ("flwr", BIN / "flwr"))
            if not path.exists() and shutil.which(tool) is None]
_missing += [tool for tool in ("openssl", "ssh-keygen", "bash") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"deployment tests need {', '.join(_missing)} (not installed)")

# Tiny work per message; generous deadlines (each message starts a fresh python + torch process).
TINY_RUN = {"num-rounds": 2, "gan-local-steps": 3, "gan-width": 16, "gan-latent-dim": 16, "gan-batch-size": 32,
            "synthetic-size": 100, "learner-epochs": 1, "learner": "mlp", "real-baseline": False,
            "progress": False, "test-data": "digits", "round-timeout": 60.0, "quorum": 0.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml(path: Path, mapping: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def fedsynth(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a deployment command to completion (as `fedsynth ...` would)."""
    return subprocess.run([sys.executable, "-m", "fedsynth.deploy", *args], capture_output=True, text=True,
                          cwd=PROJECT_ROOT, env=_env(), timeout=timeout)


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
        self.p = subprocess.Popen([sys.executable, "-m", "fedsynth.deploy", *args], stdout=self._fh,
                                  stderr=subprocess.STDOUT, cwd=PROJECT_ROOT, env=_env(), start_new_session=True)

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
        env = _env()
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
        from fedsynth.deploy import ledger_summaries, load_site_config

        rows, note = ledger_summaries(load_site_config(self.site_yaml[name]))
        assert note is None and rows[0]["current"], note
        return rows[0]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
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
    port = _free_port()
    dep.coord_yaml = _yaml(root / "coordinator.yaml", {
        "host": "127.0.0.1", "port": port, "flwr_home": "coord-home", "ca_cert": "certs/ca.crt",
        "cert": "certs/superlink.crt", "key": "certs/superlink.key",
        "sites": [{"name": f"site{i}", "public_key": f"certs/keys/site{i}.pub"} for i in (1, 2, 3)],
        "out_dir": "runs/default", "run": TINY_RUN})
    dep.site_yaml = {}
    for i, idx in enumerate(parts, start=1):
        save_npz(digits.subset(idx), root / "data" / f"site{i}.npz")
        dep.site_yaml[f"site{i}"] = _yaml(root / f"site{i}.yaml", {
            "name": f"site{i}", "data": f"data/site{i}.npz", "epsilon": 10.0, "state_dir": f"state/site{i}",
            "coordinator": f"127.0.0.1:{port}", "ca_cert": "certs/ca.crt", "private_key": f"certs/keys/site{i}",
            "supernode_port": _free_port(), "modes": ["dpgan"]})
    try:
        dep.start_coordinator()
        for name in ("site1", "site2", "site3"):
            dep.start_site(name)
        dep.wait_online(3, 180)
        yield dep
    finally:
        dep.close()


# ---- 6. a broken data folder: clear error, non-zero exit, nothing started ---------------------------------
def test_broken_data_fails_before_connecting(tmp_path):
    folder = tmp_path / "images"
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        (folder / cls / "a.png").write_bytes(b"this is not a png")  # corrupt image files
    (tmp_path / "ca.crt").write_text("not a certificate")
    port = _free_port()  # nothing listens here: a site that tried to connect would hang retrying
    cfg = _yaml(tmp_path / "site.yaml", {
        "name": "broken", "data": str(folder), "epsilon": 5.0, "state_dir": str(tmp_path / "state"),
        "coordinator": f"127.0.0.1:{port}", "ca_cert": "ca.crt", "private_key": "missing-key",
        "supernode_port": _free_port()})
    # bad credentials are reported first
    res = fedsynth("site", "--config", str(cfg), "--check", timeout=120)
    assert res.returncode == 2 and "CA certificate" in res.stderr and "not a PEM certificate" in res.stderr
    # with valid credentials, the data itself is checked (and the real start fails the same way, before connecting)
    made = subprocess.run(["bash", str(MAKE_CERTS), str(tmp_path / "certs"), "broken"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    cfg = _yaml(cfg, {**__import__("yaml").safe_load(cfg.read_text()), "ca_cert": "certs/ca.crt",
                      "private_key": "certs/keys/broken"})
    for extra in (["--check"], []):
        t0 = time.monotonic()
        res = fedsynth("site", "--config", str(cfg), *extra, timeout=120)
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert "the data at" in res.stderr and str(folder) in res.stderr, res.stderr
        assert "a.png" in res.stderr  # names the broken file
        assert "nothing was started" in res.stderr and "starting the SuperNode" not in res.stdout
        assert time.monotonic() - t0 < 60
    # a typo in the YAML is an error, not silently ignored
    _yaml(tmp_path / "typo.yaml", {"name": "x", "data": "digits", "epsilon": 1.0, "epsilion": 3.0})
    res = fedsynth("site", "--config", str(tmp_path / "typo.yaml"), "--check")
    assert res.returncode == 2 and "unknown setting(s) ['epsilion']" in res.stderr


# ---- 2. a site whose key is not registered is rejected -----------------------------------------------------
def test_unregistered_site_is_rejected(deployment):
    cfg = _yaml(deployment.root / "intruder.yaml", {
        **__import__("yaml").safe_load(deployment.site_yaml["site1"].read_text()),
        "name": "intruder", "state_dir": "state/intruder", "private_key": "certs/keys/intruder",
        "supernode_port": _free_port()})
    proc = Proc(deployment.root / "intruder.log", "site", "--config", str(cfg), "--retry-rejected", "5")
    deployment.procs.append(proc)
    code = proc.p.wait(120)
    assert code != 0, proc.text()
    assert "rejected this site's key" in proc.text() and "retrying" in proc.text()  # tried again, then gave up
    nodes = deployment.nodes()
    assert len(nodes) == 3 and sum(n["status"] == "online" for n in nodes) == 3  # only the registered sites


# ---- 1, 3, 4. full run; a site killed mid-round; the coordinator killed and resumed ---------------------------
def _checkpoint_round(path: Path) -> int:
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["round"])
    except Exception:  # not there yet, or being replaced
        return 0


def _wait_round(ckpt: Path, rnd: int, run: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _checkpoint_round(ckpt) < rnd:
        assert run.poll() is None, f"fedsynth run ended early ({run.returncode})"
        assert time.monotonic() < deadline, f"round {rnd} not checkpointed within {timeout} s"
        time.sleep(0.5)


def test_run_survives_a_dead_site_and_resumes_after_a_coordinator_crash(deployment):
    dep = deployment
    out = dep.root / "runs" / "resume"
    ckpt = out / "checkpoint.pt"
    settings = "num-rounds=3 experiment='deploy-resume' round-timeout=60.0"
    log = open(dep.root / "run1.log", "w")
    run1 = subprocess.Popen([sys.executable, "-m", "fedsynth.deploy", "run", "--config", str(dep.coord_yaml),
                             "--run-config", settings, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=PROJECT_ROOT, env=_env())
    try:
        _wait_round(ckpt, 1, run1, 240)
        dep.sites["site3"].kill()  # site3's host dies as round 2 starts
        spent_before = dep.ledger("site3")
        # round 1 is charged (round 2 too if the site charged it in the instant before it died)
        assert spent_before["releases"] in (1, 2) and spent_before["spent_epsilon"] > 0
        _wait_round(ckpt, 2, run1, 240)  # round 2 ends at its deadline, carried by the quorum
        dep.coordinator.kill()  # the coordinator dies during round 3
        assert run1.wait(120) != 0  # `fedsynth run` reports the lost coordinator
    finally:
        if run1.poll() is None:
            run1.kill()
        log.close()
    assert "rerun the same command" in (dep.root / "run1.log").read_text()
    assert not (out / "report.json").exists()

    # site3 restarted: its ledger continues where it was
    reconnects = {name: dep.sites[name].text().count("Connection successful") for name in ("site1", "site2")}
    dep.start_site("site3")
    dep.start_coordinator()  # same database: the registrations are kept
    assert "already registered" in dep.coordinator.text()
    # The database still lists the sites as online (the coordinator died before it could notice anything),
    # so wait for the SuperNodes themselves: site1/2 reconnect on their own; site3 is refused until its
    # old connection expires (<= 60 s) and `fedsynth site` retries until it is in.
    deadline = time.monotonic() + 180
    while not (all(dep.sites[n].text().count("Connection successful") > c for n, c in reconnects.items())
               and "SuperNode ID" in dep.sites["site3"].text()):
        assert dep.sites["site3"].p.poll() is None, dep.sites["site3"].text()[-3000:]
        assert time.monotonic() < deadline, "the sites did not reconnect within 180 s"
        time.sleep(1)
    # same settings (the sites fixed them at round 1); only the coordinator's deadline is longer: every site
    # answers the first message of a run from a cold process (and, while the code changes, a new FAB)
    res = fedsynth("run", "--config", str(dep.coord_yaml), "--run-config", settings.replace("60.0", "90.0"),
                   "--out", str(out), "--wait", "120", timeout=500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming" in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "synthetic.npz").exists() and (out / "classifier.pt").exists()
    assert [h["round"] for h in report["rounds"]] == [1, 2, 3]  # rounds 1-2 from the first run, 3 after resuming
    assert report["experiment"] == "deploy-resume"
    assert [h["accepted"] for h in report["rounds"]] == [3, 2, 3]
    # the dead site counts as missing at the deadline -- or, if Flower noticed the lost heartbeat first, as
    # a "Node Unavailable" error reply that the SuperLink writes in the node's place
    assert report["rounds"][1]["missing"] + report["rounds"][1]["errors"] == 1
    assert all(h["aggregated"] for h in report["rounds"])
    by_name = {s["name"]: s for s in report["sites"]}
    assert set(by_name) == {"site1", "site2", "site3"}  # every failure is attributed to a real site
    assert by_name["site3"]["dropped"] and list(by_name["site3"]["rounds_failed"]) == ["2"]
    why = by_name["site3"]["rounds_failed"]["2"]
    assert "no reply before the deadline" in why or "Node Unavailable" in why, why
    assert not by_name["site1"]["dropped"] and not by_name["site2"]["dropped"]
    assert "tstr_accuracy" in report["utility"]
    # the restarted site kept its spent epsilon: the ledger grew from round 1 on, and `fedsynth ledger` shows it
    after = dep.ledger("site3")
    assert after["releases"] >= 2 and after["spent_epsilon"] > spent_before["spent_epsilon"]
    assert by_name["site3"]["epsilon"] == pytest.approx(after["spent_epsilon"], rel=1e-6)
    text = fedsynth("ledger", "--config", str(dep.site_yaml["site3"]))
    assert text.returncode == 0 and "spent epsilon" in text.stdout and "left epsilon" in text.stdout


# ---- 5. hostile run configs -------------------------------------------------------------------------------
PROBE_SERVER = """
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.dump_records",
                    ttl=120.0) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=90))
    rows = [{"node": r.metadata.src_node_id, "error": r.has_error(),
             "reason": r.error.reason if r.has_error() else "", "records": list(r.content.keys()) if r.has_content() else []}
            for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps({"contacted": len(nodes), "replies": rows}))
"""

PROBE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "1.0.0"
license = "Apache-2.0"
description = "a coordinator that asks the sites for a message type they do not know"
dependencies = ["flwr>=1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsynth-tests"

[tool.flwr.app.components]
serverapp = "probe_server:app"
clientapp = "client.app:app"

[tool.flwr.app.config]
out = ""
"""


def test_hostile_run_configs_are_refused_and_nothing_is_spent(deployment):
    dep = deployment
    # the coordinator cannot set the noise: there is no such setting
    res = fedsynth("run", "--config", str(dep.coord_yaml), "--run-config", "noise-multiplier=0",
                   "--out", str(dep.root / "runs" / "nonoise"))
    assert res.returncode == 2 and "unknown run setting 'noise-multiplier'" in res.stderr
    before = {name: dep.ledger(name) for name in ("site1", "site2", "site3")}
    # Far more DP-SGD work than any site's budget pays for, even at the largest noise a site accepts: every
    # site refuses before doing any work. (One round of 10^12 steps rather than 10^5 rounds: the coordinator
    # sends every planned round even when all sites refuse, and each refusal costs a process start per site.)
    out = dep.root / "runs" / "greedy"
    res = fedsynth("run", "--config", str(dep.coord_yaml), "--out", str(out), "--wait", "120",
                   "--run-config", "num-rounds=1 gan-local-steps=1000000000000 experiment='greedy' round-timeout=60.0",
                   timeout=400)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "finished:failed" in res.stderr and "budget" in res.stderr, res.stderr
    assert "over budget" in res.stdout and "do not fit the site's budget" in res.stdout
    after = {name: dep.ledger(name) for name in ("site1", "site2", "site3")}
    for name in before:
        assert after[name]["releases"] == before[name]["releases"], name
        assert after[name]["spent_epsilon"] == before[name]["spent_epsilon"], name
    # a message type the sites do not know gets an error reply from every site, and no data
    probe = dep.root / "probe-app"
    probe.mkdir()
    (probe / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (probe / "probe_server.py").write_text(PROBE_SERVER)
    for pkg in ("client", "common"):  # the sites run the real ClientApp, shipped in the probe's FAB
        shutil.copytree(PROJECT_ROOT / pkg, probe / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    result = dep.root / "probe.json"
    ran = dep.flwr("run", str(probe), "fedsynth", "--run-config", f"out='{result}'", "--stream")
    assert result.exists(), ran.stdout[-3000:] + ran.stderr[-3000:]
    outcome = json.loads(result.read_text())
    assert outcome["contacted"] == 3 and len(outcome["replies"]) == 3
    assert all(r["error"] and not r["records"] and "dump_records" in r["reason"] for r in outcome["replies"]), outcome
