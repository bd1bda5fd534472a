"""``fedsynth coordinator --config coordinator.yaml``: the SuperLink (TLS, SuperNode authentication), sites registered.

The SuperLink runs through ``fedsynth.ops.superlink_guard``: its Control API (submit runs, register
SuperNode keys) and Runtime API answer only the addresses in ``control_allow`` (loopback and the
SuperLink's own address by default), while the sites reach its Fleet API from anywhere.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import json
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.files import atomic_write_json, atomic_write_text
from fedsynth.ops.fields import DeployError, Fields, NAME_RE, info, load_yaml, loud, parse_address, port_free, warn
from fedsynth.ops.processes import Child, flower_bin, flower_env, forward_signals
from fedsynth.ops.tls import check_server_cert, load_public_key

try:  # Python >= 3.11; flwr depends on tomli for older ones
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONNECTION = "fedsynth"  # name of the SuperLink connection `fedsynth run` writes into $FLWR_HOME/config.toml


COORD_KEYS = ("host", "port", "address", "flwr_home", "database", "ca_cert", "cert", "key", "sites", "run", "out_dir",
              "control_allow")
LOOPBACK = ("127.0.0.1", "::1")


@dataclass
class SiteKey:
    name: str
    public_key: Path


@dataclass
class CoordinatorConfig:
    host: str
    port: int
    address: str  # what the CLI dials (and what the certificate must name)
    flwr_home: Path
    database: Path
    ca_cert: Path | None
    cert: Path | None
    key: Path | None
    sites: list[SiteKey]
    run: dict[str, Any]
    out_dir: Path
    control_allow: tuple[str, ...] = LOOPBACK  # addresses whose Control/Runtime API requests are answered
    source: Path = field(default_factory=Path)


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    raw, base = load_yaml(path, "coordinator")
    f = Fields(raw, str(path), base, COORD_KEYS)
    host = f.str("host", "127.0.0.1")
    port = f.int("port", 9092, lo=1, hi=65535)
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    address = f.str("address", f"[{dial}]:{port}" if ":" in dial else f"{dial}:{port}")
    parse_address(address, f"{path}: 'address'")
    flwr_home = f.path("flwr_home", "coordinator-home")
    sites_raw = raw.get("sites") or []
    if not isinstance(sites_raw, list):
        raise DeployError(f"{path}: 'sites' must be a list of {{name: ..., public_key: ...}}")
    sites: list[SiteKey] = []
    for i, item in enumerate(sites_raw):
        if not isinstance(item, dict):
            raise DeployError(f"{path}: sites[{i}] must be a mapping with 'name' and 'public_key'")
        sf = Fields(item, f"{path}: sites[{i}]", base, ("name", "public_key"))
        name = sf.str("name")
        if not NAME_RE.fullmatch(name):
            raise DeployError(f"{path}: sites[{i}].name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        sites.append(SiteKey(name, sf.path("public_key")))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise DeployError(f"{path}: site names must be unique, got {names}")
    allow = raw.get("control_allow") or []
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise DeployError(f"{path}: 'control_allow' must be a list of IP addresses allowed to use the Control API "
                          "(submit runs, register sites); loopback is always allowed")
    for a in allow:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise DeployError(f"{path}: 'control_allow' entry {a!r} is not an IP address") from None
    # the SuperLink's own specific address too: its CLI and ServerApp process connect from it
    own = () if host in ("0.0.0.0", "::", "") else (host,)
    run = raw.get("run") or {}
    if not isinstance(run, dict):
        raise DeployError(f"{path}: 'run' must be a mapping of run settings (keys of [tool.flwr.app.config])")
    return CoordinatorConfig(
        host=host, port=port, address=address, flwr_home=flwr_home,
        database=f.path("database", str(flwr_home / "superlink.db")),
        ca_cert=f.path("ca_cert") if f.has("ca_cert") else None, cert=f.path("cert") if f.has("cert") else None,
        key=f.path("key") if f.has("key") else None, sites=sites, run={str(k): v for k, v in run.items()},
        out_dir=f.path("out_dir", "runs/deployment"), control_allow=tuple(dict.fromkeys([*LOOPBACK, *own, *allow])),
        source=Path(path).resolve())


def check_coordinator(cfg: CoordinatorConfig, insecure: bool = False) -> dict[str, str]:
    """Validate the coordinator config without starting anything; returns site name -> public key body."""
    if not insecure:
        check_server_cert(cfg)
        if not cfg.sites:
            raise DeployError(f"{cfg.source}: 'sites' is empty: with SuperNode authentication only registered sites "
                              "can join; list each site's name and public_key (.pub)")
    keys = {s.name: load_public_key(s.public_key, s.name) for s in cfg.sites}
    dup = [n for n in keys if list(keys.values()).count(keys[n]) > 1]
    if dup:
        raise DeployError(f"{cfg.source}: sites {dup} share a public key; every site needs its own key pair")
    validated_run_config(cfg.run, None)
    return keys


def validated_run_config(base: dict[str, Any], overrides: dict[str, Any] | None, out_dir: Path | None = None) -> dict:
    """Merge run settings, validate them with RunConfig (unknown keys refused), return dashed keys."""
    from common.config import ConfigError, RunConfig

    merged = {**base, **(overrides or {})}
    if out_dir is not None:
        merged["out-dir"] = str(out_dir)
    try:
        cfg = RunConfig.from_mapping(merged)
    except ConfigError as err:
        raise DeployError(f"run config: {err}") from None
    if not math.isfinite(cfg.epsilon):
        warn("run setting epsilon=inf asks for a NON-private run; every site still enforces its own budget")
    flat = {k: v for k, v in cfg.to_flwr().items() if k in merged}
    return flat


def superlink_command(cfg: CoordinatorConfig, insecure: bool) -> list[str]:
    """The guarded SuperLink (fedsynth.ops.superlink_guard: Control API only from control_allow)."""
    cmd = [sys.executable, "-m", "fedsynth.ops.superlink_guard", ",".join(cfg.control_allow), "--host", cfg.host,
           "--port", str(cfg.port), "--database", str(cfg.database), "--isolation", "subprocess",
           "--disable-runtime-dependency-installation"]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(cfg.ca_cert), "--ssl-certfile", str(cfg.cert), "--ssl-keyfile", str(cfg.key),
                "--enable-supernode-auth"]
    return cmd


def write_connection(cfg: CoordinatorConfig, insecure: bool) -> Path:
    """Put the `fedsynth` SuperLink connection into $FLWR_HOME/config.toml (keeping everything else)."""
    import tomli_w

    path = cfg.flwr_home / "config.toml"
    cfg.flwr_home.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {}
    if path.exists():
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise DeployError(f"{path} is not valid TOML ({err}); fix or delete it (fedsynth rewrites its entry)") from None
    links = doc.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": cfg.address}
    if insecure:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(cfg.ca_cert)
    links[CONNECTION] = entry
    links.setdefault("default", CONNECTION)
    return atomic_write_text(path, tomli_w.dumps(doc))


def read_marker(cfg: CoordinatorConfig) -> dict:
    path = cfg.flwr_home / "fedsynth-coordinator.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def superlink_up(cfg: CoordinatorConfig, insecure: bool, timeout: float = 3.0) -> bool:
    """True when the SuperLink answers GET /health over TLS (verified with our CA)."""
    import http.client

    host, port = parse_address(cfg.address, "address")
    try:
        if insecure:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        else:
            ctx = ssl.create_default_context(cafile=str(cfg.ca_cert))
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ctx)
        conn.request("GET", "/health")
        ok = conn.getresponse().status < 500
        conn.close()
        return ok
    except (OSError, ssl.SSLError, http.client.HTTPException):
        return False


def flwr_cli(cfg: CoordinatorConfig, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([flower_bin("flwr"), *args], env=flower_env(cfg.flwr_home), capture_output=True, text=True,
                          cwd=str(PROJECT_ROOT), timeout=timeout)


def json_out(proc: subprocess.CompletedProcess) -> dict:
    text = proc.stdout.strip()
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return {}


def register_sites(cfg: CoordinatorConfig) -> dict[str, str]:
    """Register every listed site's public key (idempotent); returns name -> node id or status."""
    registry_path = cfg.flwr_home / "fedsynth-sites.json"
    try:
        registry = json.loads(registry_path.read_text())
    except (OSError, json.JSONDecodeError):
        registry = {}
    out = {}
    for site in cfg.sites:
        res = flwr_cli(cfg, ["supernode", "register", str(site.public_key), CONNECTION, "--name", site.name,
                          "--format", "json"])
        data = json_out(res)
        if data.get("success"):
            registry[site.name] = {"node-id": str(data["node-id"]), "public_key": str(site.public_key)}
            out[site.name] = f"registered as node {data['node-id']}"
        elif "already in use" in str(data.get("error-message", "")):
            known = registry.get(site.name, {}).get("node-id")
            out[site.name] = "already registered" + (f" (node {known})" if known else "")
        else:
            reason = str(data.get("error-message") or res.stderr or res.stdout).strip().splitlines()
            out[site.name] = f"NOT registered: {reason[-1] if reason else 'unknown error'}"
    atomic_write_json(registry_path, registry)
    return out


def cmd_coordinator(args: argparse.Namespace) -> int:
    try:
        cfg = load_coordinator_config(args.config)
        if args.insecure:
            loud("INSECURE COORDINATOR: --insecure turns OFF TLS and SuperNode authentication.\n"
                  "Anyone who can reach the port can join as a site or submit runs, and generator weights\n"
                  "travel in clear text. Use it only on a private test network, never with real data.")
        check_coordinator(cfg, insecure=args.insecure)
        if not port_free(cfg.host if cfg.host not in ("", "::") else "0.0.0.0", cfg.port):
            raise DeployError(f"port {cfg.port} on {cfg.host} is in use (another SuperLink?); stop it or set 'port'")
        cfg.database.parent.mkdir(parents=True, exist_ok=True)
    except DeployError as err:
        print(f"fedsynth coordinator: error: {err}", file=sys.stderr)
        return 2
    cmd = superlink_command(cfg, args.insecure)
    if args.check:
        info(f"check passed; would run: FLWR_HOME={cfg.flwr_home} {' '.join(cmd)}; then register "
              f"{', '.join(s.name for s in cfg.sites) or 'no sites'}")
        return 0
    cfg.flwr_home.mkdir(parents=True, exist_ok=True)
    write_connection(cfg, args.insecure)
    info(f"starting the SuperLink on {cfg.host}:{cfg.port} (database {cfg.database})"
          + (" INSECURE" if args.insecure else " with TLS and SuperNode authentication"))
    child = Child(cmd, flower_env(cfg.flwr_home), cwd=cfg.flwr_home)
    forward_signals(child)
    deadline = time.monotonic() + args.start_timeout
    while not superlink_up(cfg, args.insecure):
        if child.proc.poll() is not None or time.monotonic() > deadline or child.stopping:
            if not child.stopping:
                child.stop()
                print(f"fedsynth coordinator: the SuperLink did not come up (exit {child.proc.returncode}); "
                      "see its output above", file=sys.stderr)
            child.wait()
            return 0 if child.stopping else 1
        time.sleep(0.5)
    marker = {"pid": os.getpid(), "address": cfg.address, "insecure": bool(args.insecure)}
    atomic_write_json(cfg.flwr_home / "fedsynth-coordinator.json", marker)
    if not args.insecure:
        for name, status in register_sites(cfg).items():
            info(f"site {name}: {status}")
    info(f"coordinator ready at {cfg.address}; submit a run with: fedsynth run --config {args.config}")
    code = child.wait()
    if child.stopping:
        info("coordinator stopped")
        return 0
    print(f"fedsynth coordinator: the SuperLink exited with code {code}", file=sys.stderr)
    return code if 0 < code < 256 else 1