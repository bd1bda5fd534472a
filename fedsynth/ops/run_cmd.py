"""``fedsynth run --config coordinator.yaml``: submit a run, follow it, report where the outputs are.

It waits for the sites, writes the run settings (validated by ``common.config.RunConfig``) to a TOML
file, runs ``flwr run`` on this installation's app bundle -- the bundle the sites' own fedsynth
approves -- and exits non-zero unless the run completed (``flwr run --stream`` exits 0 even for a
failed run, so the status is read back with ``flwr ls``).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedsynth.ops.coordinator_cmd import (
    CONNECTION, PROJECT_ROOT, CoordinatorConfig, flwr_cli, json_out, load_coordinator_config, read_marker,
    superlink_up,
    validated_run_config, write_connection,
)
from fedsynth.ops.fields import DeployError, info, warn, write_toml
from fedsynth.ops.processes import Child, flower_bin, flower_env, forward_signals

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]


def _parse_run_config_arg(value: str) -> dict[str, Any]:
    """--run-config: a TOML file, or "k=v k2='text'" pairs (TOML values, as `flwr run --run-config`)."""
    if value.strip().endswith(".toml") and "=" not in value:
        path = Path(value).expanduser()
        try:
            return tomllib.loads(path.read_text())
        except OSError as err:
            raise DeployError(f"--run-config file {path} cannot be read ({err.strerror})") from None
        except tomllib.TOMLDecodeError as err:
            raise DeployError(f"--run-config file {path} is not valid TOML: {err}") from None
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", value)
    leftover = re.sub(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", "", value).strip()
    if leftover or not pairs:
        raise DeployError(f"--run-config {value!r} must be KEY=VALUE pairs (strings quoted, e.g. "
                          "\"num-rounds=5 learner='mlp'\") or a .toml file")
    out = {}
    for key, raw in pairs:
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw  # bare words are strings, like `flwr run` would refuse; RunConfig checks the type
    return out


def _online_sites(cfg: CoordinatorConfig) -> int | None:
    res = flwr_cli(cfg, ["supernode", "list", CONNECTION, "--format", "json"], timeout=60)
    data = json_out(res)
    if not data.get("success"):
        return None
    return sum(1 for n in data.get("nodes", []) if n.get("status") == "online")


def _run_status(cfg: CoordinatorConfig, run_id: int) -> dict:
    res = flwr_cli(cfg, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=60)
    runs = json_out(res).get("runs", [])
    for r in runs:
        if str(r.get("run-id")) == str(run_id):
            return r
    return runs[0] if runs else {}


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_coordinator_config(args.config)
        marker = read_marker(cfg)
        insecure = bool(marker.get("insecure", False)) if args.insecure is None else args.insecure
        if not insecure and cfg.ca_cert is None:
            raise DeployError(f"{cfg.source}: 'ca_cert' is missing; the CLI verifies the SuperLink with it")
        out_dir = Path(args.out).expanduser().resolve() if args.out else None
        overrides = _parse_run_config_arg(args.run_config) if args.run_config else {}
        if out_dir is None:
            given = overrides.get("out-dir") or cfg.run.get("out-dir")
            out_dir = Path(str(given)).expanduser() if given else cfg.out_dir
            if not out_dir.is_absolute():
                out_dir = (cfg.source.parent / out_dir).resolve()
        settings = validated_run_config(cfg.run, overrides, out_dir)
        write_connection(cfg, insecure)
        if not superlink_up(cfg, insecure):
            raise DeployError(f"no SuperLink answers at {cfg.address}; start it first with "
                              f"fedsynth coordinator --config {args.config}")
    except DeployError as err:
        print(f"fedsynth run: error: {err}", file=sys.stderr)
        return 2
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = (out_dir / "checkpoint.pt").exists() and settings.get("resume", True)
    # Wait for the sites (SuperNodes reconnect on their own after a coordinator restart).
    want = args.min_sites if args.min_sites is not None else len(cfg.sites)
    deadline = time.monotonic() + args.wait
    online = _online_sites(cfg) or 0
    while online < want and time.monotonic() < deadline:
        time.sleep(2)
        online = _online_sites(cfg) or 0
    if online == 0:
        print(f"fedsynth run: error: no site is online at {cfg.address} after {args.wait:.0f} s; start the sites "
              "(fedsynth site --config site.yaml) and check `flwr supernode list`", file=sys.stderr)
        return 2
    if online < want:
        warn(f"only {online} of {want} site(s) online after {args.wait:.0f} s; starting anyway (quorum decides)")
    override_file = out_dir / "run-config.toml"
    write_toml(override_file, settings)
    info(f"{'resuming' if resuming else 'starting'} a run on {cfg.address} with {online} site(s) online; "
          f"outputs -> {out_dir}")
    cmd = [flower_bin("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--run-config", str(override_file), "--stream"]
    run_id: list[int] = []

    def grab(line: str) -> None:
        m = re.search(r"Successfully started run (\d+)", line)
        if m and not run_id:
            run_id.append(int(m.group(1)))

    # The full stream goes to <out>/flower-run.log; the terminal is spared the HTTP polling chatter.
    child = Child(cmd, flower_env(cfg.flwr_home), cwd=PROJECT_ROOT, log_path=out_dir / "flower-run.log", on_line=grab,
                  hide=lambda line: "httpx INFO HTTP Request" in line)
    forward_signals(child)
    timed_out = False
    try:
        child.proc.wait(timeout=args.timeout if args.timeout and args.timeout > 0 else None)
    except subprocess.TimeoutExpired:
        timed_out = True
        warn(f"the run did not finish within --timeout {args.timeout:.0f} s; stopping it")
        if run_id:
            flwr_cli(cfg, ["stop", str(run_id[0]), CONNECTION], timeout=60)
        child.stop()
    code = child.wait()
    if child.stopping and not timed_out:
        if run_id:
            warn(f"interrupted; the run {run_id[0]} may still be running on the SuperLink "
                  f"(stop it with: FLWR_HOME={cfg.flwr_home} flwr stop {run_id[0]} {CONNECTION})")
        return 130
    resume_hint = (f"the coordinator checkpoints after every round: once the coordinator is up again, rerun the same "
                   f"command (same --out {out_dir}) to continue from {out_dir / 'checkpoint.pt'}")
    if not run_id:
        print(f"fedsynth run: error: the run was not accepted by the SuperLink (flwr exit {code}); see the output "
              f"above ({out_dir / 'flower-run.log'})", file=sys.stderr)
        return 1
    status = _run_status(cfg, run_id[0]) if superlink_up(cfg, insecure) else {}
    state = str(status.get("status", ""))
    details = str(status.get("status-details", "")).strip()
    report_path = out_dir / "report.json"
    if state == "finished:completed" and report_path.exists() and not timed_out:
        from fedsynth.summary import print_summary

        report = json.loads(report_path.read_text())
        print_summary(report)
        info(f"run {run_id[0]} completed; outputs in {out_dir}")
        return 0
    if not status:
        print(f"fedsynth run: error: lost the SuperLink at {cfg.address} during run {run_id[0]} (flwr exit {code}); "
              f"{resume_hint}", file=sys.stderr)
        return 1
    why = details or ("timed out" if timed_out else "no details")
    print(f"fedsynth run: error: run {run_id[0]} ended as '{state or 'unknown'}': {why}", file=sys.stderr)
    if "budget" in (details + child.text()).lower():
        print("fedsynth run: the sites refused requests that would exceed their privacy budget; ask for fewer "
              "rounds / local steps or a smaller epsilon, or ask the sites (fedsynth ledger) what they have left",
              file=sys.stderr)
    print(f"fedsynth run: full log {out_dir / 'flower-run.log'}; {resume_hint}", file=sys.stderr)
    return 1