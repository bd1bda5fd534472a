"""Deployment commands: a site next to private data, the coordinator, a run, the site's ledger.

    fedsynth site --config site.yaml [--check] [--insecure]       # validate, then run this site's SuperNode
    fedsynth ledger --config site.yaml [--json]                   # what the site has spent and has left
    fedsynth coordinator --config coordinator.yaml [--check]      # SuperLink (TLS + SuperNode auth), register sites
    fedsynth run --config coordinator.yaml [--run-config ...] [--out DIR]   # submit a run, follow it, get outputs

Flower is the engine (flower-notes §4): one ``flower-superlink`` at the coordinator with TLS,
``--enable-supernode-auth`` and a persistent database; one ``flower-supernode`` per site that
authenticates with its own EC P-384 key and gets everything about the site (data path, budget,
state folder) through its *node config*, never from the coordinator. Everything is checked before
anything connects, so a broken data folder or a wrong key path fails at once with a message that
says what to fix. See ``deploy/README.md`` for the runbook.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode live next to python
CONNECTION = "fedsynth"  # name of the SuperLink connection `fedsynth run` writes into $FLWR_HOME/config.toml
MODES = ("dpgan", "bnstats")
try:  # Python >= 3.11; flwr depends on tomli for older ones
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeployError(ValueError):
    """A deployment problem; the message says what is wrong and what to do."""


def _warn(text: str) -> None:
    print(f"fedsynth: WARNING: {text}", file=sys.stderr, flush=True)


def _loud(text: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{text}\n{bar}\n", file=sys.stderr, flush=True)


def _info(text: str) -> None:
    print(f"fedsynth: {text}", flush=True)


# ==== YAML and field helpers =======================================================================

def _load_yaml(path: str | Path, what: str) -> tuple[dict, Path]:
    import yaml

    p = Path(path).expanduser()
    if not p.is_file():
        raise DeployError(f"{what} config {p} does not exist; pass the path of your {what} YAML "
                          f"(examples: deploy/{what}.yaml)")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise DeployError(f"{p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise DeployError(f"{p} must be a YAML mapping of settings (key: value), got {type(raw).__name__}")
    return raw, p.resolve().parent


class _Fields:
    """Typed access to one YAML mapping; every error names the file and the key."""

    def __init__(self, raw: dict, origin: str, base: Path, known: tuple[str, ...]) -> None:
        self.raw, self.origin, self.base = raw, origin, base
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise DeployError(f"{origin}: unknown setting(s) {unknown}; known settings: {', '.join(known)}")

    def _err(self, key: str, text: str) -> DeployError:
        return DeployError(f"{self.origin}: '{key}' {text}")

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def str(self, key: str, default: str | None = None) -> str:
        value = self.raw.get(key, default)
        if value is None:
            raise self._err(key, "is missing")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self._err(key, f"must be a string, got {value!r}")
        return str(value)

    def int(self, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
        value = self.raw.get(key, default)
        if value is None:
            raise self._err(key, "is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._err(key, f"must be an integer, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self._err(key, f"must be between {lo} and {hi}, got {value}")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self.raw.get(key, default)
        if value is None:
            raise self._err(key, "is missing")
        if isinstance(value, bool):
            raise self._err(key, f"must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise self._err(key, f"must be a number (or inf), got {value!r}") from None
        if math.isnan(out):
            raise self._err(key, "must not be NaN")
        return out

    def bool(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            raise self._err(key, f"must be true or false, got {value!r}")
        return value

    def path(self, key: str, default: str | None = None) -> Path:
        """A path; relative paths are relative to the YAML file's folder."""
        p = Path(self.str(key, default)).expanduser()
        return p if p.is_absolute() else (self.base / p).resolve()


def _parse_address(text: str, what: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s/]+):(\d+)", text.strip())
    if not m:
        raise DeployError(f"{what} '{text}' must be HOST:PORT (e.g. 127.0.0.1:9092 or coordinator.example.org:9092), "
                          "without https://")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise DeployError(f"{what} '{text}': port must be in 1..65535")
    return host, port


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _readable_file(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise DeployError(f"{what} {path} does not exist; {fix}")
    try:
        path.read_bytes()
    except OSError as err:
        raise DeployError(f"{what} {path} cannot be read ({err.strerror}); fix its permissions") from None


def _check_ca(path: Path, fix: str = "copy ca.crt from the coordinator operator (deploy/make_certs.sh makes it)") -> None:
    _readable_file(path, "CA certificate", fix)
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, ValueError) as err:
        raise DeployError(f"CA certificate {path} is not a PEM certificate ({err}); use the ca.crt that "
                          "deploy/make_certs.sh wrote") from None


def _check_private_key(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    _readable_file(path, "site private key", "make one with deploy/make_certs.sh (or ssh-keygen -t ecdsa -b 384 "
                                             "-N '' -f KEY) and point private_key at it")
    data = path.read_bytes()
    if b"PRIVATE KEY" not in data:
        raise DeployError(f"site private key {path} is not a private key file (a .pub file?); point private_key "
                          "at the file WITHOUT .pub")
    try:
        key = load_ssh_private_key(data, password=None)
    except TypeError:
        raise DeployError(f"site private key {path} is protected by a passphrase; Flower needs an unencrypted key: "
                          f"ssh-keygen -p -N '' -f {path}") from None
    except ValueError as err:
        raise DeployError(f"site private key {path} is not an OpenSSH private key ({err}); make one with "
                          "ssh-keygen -t ecdsa -b 384 -N '' -f KEY") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise DeployError(f"site private key {path} must be an EC key on a NIST curve (P-384 recommended), "
                          f"got {type(key).__name__}; make one with ssh-keygen -t ecdsa -b 384 -N '' -f KEY")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        _warn(f"site private key {path} is readable by other users (mode {mode:o}); run: chmod 600 {path}")


def _load_public_key(path: Path, site: str) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    _readable_file(path, f"public key of site '{site}'", "ask the site for its .pub file (or run deploy/make_certs.sh)")
    data = path.read_bytes().strip()
    try:
        key = load_ssh_public_key(data)
    except (ValueError, TypeError) as err:
        raise DeployError(f"public key of site '{site}' ({path}) is not an OpenSSH public key ({err}); "
                          "it is the one-line .pub file ssh-keygen writes") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise DeployError(f"public key of site '{site}' ({path}) must be an EC key on a NIST curve (P-384), "
                          f"got {type(key).__name__}")
    return data.split()[1].decode()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _write_toml(path: Path, mapping: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in mapping.items()))
    os.replace(tmp, path)


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, venv binaries first, no runtime `uv sync`."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(BIN_DIR), env.get("PATH", "")])
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _flower_bin(name: str) -> str:
    path = BIN_DIR / name
    if path.exists():
        return str(path)
    import shutil

    found = shutil.which(name)
    if not found:
        raise DeployError(f"'{name}' is not installed next to {sys.executable} nor on PATH; install the project "
                          "(make install) so flwr==1.41.0 is in the virtualenv")
    return found


# ==== child processes: stream output, forward signals ==============================================

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


def _forward_signals(child: Child) -> None:
    def handler(signum, _frame):
        if child.stopping and signum == signal.SIGINT:
            child.proc.kill()
            return
        child.stopping = True
        if child.proc.poll() is None:
            child.proc.send_signal(signum)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# ==== the site ======================================================================================

SITE_KEYS = ("name", "data", "split", "image_size", "label_from", "heldout", "heldout_split", "epsilon", "delta",
             "state_dir", "coordinator", "ca_cert", "private_key", "modes", "audits", "supernode_port")


@dataclass
class SiteConfig:
    name: str
    data: str  # absolute path, or "digits"
    split: str
    image_size: int
    label_from: str
    heldout: str  # "" = none; absolute path or "digits"
    heldout_split: str
    epsilon: float
    delta: float
    state_dir: Path
    coordinator: str
    ca_cert: Path | None
    private_key: Path | None
    modes: list[str]
    audits: bool
    supernode_port: int
    source: Path = field(default_factory=Path)

    def node_config(self) -> dict[str, Any]:
        """What the ClientApp reads (client/site.py: resolve_site). The budget is the site's own."""
        return {"site-name": self.name, "data-path": self.data, "split": self.split, "image-size": self.image_size,
                "label-from": self.label_from, "heldout-path": self.heldout, "heldout-split": self.heldout_split,
                "state-dir": str(self.state_dir), "epsilon": self.epsilon, "delta": self.delta,
                "modes": ",".join(self.modes), "audits": self.audits}

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"


def load_site_config(path: str | Path) -> SiteConfig:
    raw, base = _load_yaml(path, "site")
    f = _Fields(raw, str(path), base, SITE_KEYS)
    name = f.str("name")
    if not _NAME_RE.match(name):
        raise DeployError(f"{path}: 'name' {name!r} must be 1-64 letters, digits, '.', '_' or '-' (e.g. site1)")
    data = f.str("data")
    if data != "digits":
        data = str(f.path("data"))
    split = f.str("split", "train")
    if split not in ("train", "val", "test"):
        raise DeployError(f"{path}: 'split' must be train, val or test, got {split!r}")
    image_size = f.int("image_size", 0, lo=0, hi=1024)
    if 0 < image_size < 8:
        raise DeployError(f"{path}: 'image_size' must be 0 (keep) or >= 8, got {image_size}")
    label_from = f.str("label_from", "")
    if label_from not in ("", "utkface-gender", "utkface-race"):
        raise DeployError(f"{path}: 'label_from' must be '', 'utkface-gender' or 'utkface-race', got {label_from!r}")
    heldout = f.str("heldout", "")
    if heldout and heldout != "digits":
        heldout = str(f.path("heldout"))
    heldout_split = f.str("heldout_split", "test")
    if heldout_split not in ("train", "val", "test"):
        raise DeployError(f"{path}: 'heldout_split' must be train, val or test, got {heldout_split!r}")
    if heldout and (heldout, heldout_split) == (data, split):
        raise DeployError(f"{path}: 'heldout' is the training data itself ({heldout} split {split}); held-out "
                          "records must never be trained on -- use another split or folder, or leave heldout empty")
    epsilon = f.float("epsilon")
    if not epsilon > 0:
        raise DeployError(f"{path}: 'epsilon' (this site's total privacy budget for its dataset) must be > 0, "
                          f"got {epsilon}; typical values are 1 to 10")
    delta = f.float("delta", 0.0)
    if not 0 <= delta < 1:
        raise DeployError(f"{path}: 'delta' must be in [0, 1) (0 = min(1e-5, 1/(10 n))), got {delta}")
    coordinator = f.str("coordinator")
    _parse_address(coordinator, f"{path}: 'coordinator'")
    modes = raw.get("modes", ["dpgan"])
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
        raise DeployError(f"{path}: 'modes' must be a non-empty list taken from {list(MODES)}, got {modes!r}")
    return SiteConfig(
        name=name, data=data, split=split, image_size=image_size, label_from=label_from, heldout=heldout,
        heldout_split=heldout_split, epsilon=epsilon,
        delta=delta, state_dir=f.path("state_dir"), coordinator=coordinator,
        ca_cert=f.path("ca_cert") if f.has("ca_cert") else None,
        private_key=f.path("private_key") if f.has("private_key") else None,
        modes=list(dict.fromkeys(modes)), audits=f.bool("audits", True),
        supernode_port=f.int("supernode_port", 9094, lo=1, hi=65535), source=Path(path).resolve())


@dataclass
class SiteCheck:
    data: Any  # ImageDataset
    settings: Any  # client.site.SiteSettings
    ledger: dict  # PrivacyLedger.summary()


def _load_site_data(cfg: SiteConfig):
    """(SiteSettings, ImageDataset) exactly as the ClientApp will resolve and load them."""
    from client.site import resolve_site
    from common.data import DataError, load_dataset

    settings = resolve_site(cfg.node_config(), {})
    where = "the built-in digits dataset" if cfg.data == "digits" else cfg.data
    try:
        data = load_dataset(settings.data, settings.split, image_size=settings.image_size or None,
                            label_from=settings.label_from or None)
    except DataError as err:
        raise DeployError(f"site '{cfg.name}': the data at {where} cannot be used: {err}") from None
    except (OSError, ValueError, RuntimeError) as err:  # unexpected decoder / IO failures
        raise DeployError(f"site '{cfg.name}': reading the data at {where} failed ({type(err).__name__}: {err}); "
                          "check the files are complete and readable") from None
    return settings, data


def _check_data(cfg: SiteConfig, data) -> None:
    import numpy as np

    n = len(data)
    counts = data.class_counts()
    present = int((counts > 0).sum())
    if n < 10:
        raise DeployError(f"site '{cfg.name}': the data at {cfg.data} holds only {n} record(s) in split '{cfg.split}'; "
                          "DP training needs at least 10 (more is much better)")
    if present < 2:
        raise DeployError(f"site '{cfg.name}': the data at {cfg.data} has records of {present} class(es) only "
                          f"(classes {list(data.classes)}); a labelled dataset needs at least 2 classes present -- "
                          "check the class folders / label arrays")
    if not np.isfinite(data.images).all():
        raise DeployError(f"site '{cfg.name}': the data at {cfg.data} contains NaN or infinite pixels")
    empty = [c for c, k in zip(data.classes, counts) if k == 0]
    if empty:
        _warn(f"site '{cfg.name}': no records of class(es) {empty}; the site still joins (its GAN learns the "
              "classes it has)")
    c, h, w = data.image_shape
    if h != w:
        raise DeployError(f"site '{cfg.name}': images are {h}x{w}; the GAN needs square images -- set image_size "
                          "(e.g. image_size: 32) to resize them")


def _open_ledger(cfg: SiteConfig, settings, data):
    from client.ledger import LedgerDamaged, PrivacyLedger
    from client.site import ledger_path, site_delta

    path = ledger_path(settings, data)
    try:
        return PrivacyLedger(path, epsilon_budget=cfg.epsilon, delta=site_delta(settings, len(data)))
    except (ValueError, LedgerDamaged) as err:
        raise DeployError(f"site '{cfg.name}': the privacy ledger cannot be used: {err}") from None
    except OSError as err:
        raise DeployError(f"site '{cfg.name}': cannot create the privacy ledger {path}: {err.strerror}; "
                          "state_dir must be a folder this user can write") from None


def check_site(cfg: SiteConfig, insecure: bool = False) -> SiteCheck:
    """Validate everything a site needs, without connecting to anything. Raises DeployError."""
    # 1. credentials
    if insecure:
        pass
    else:
        if cfg.ca_cert is None:
            raise DeployError(f"{cfg.source}: 'ca_cert' is missing: the site verifies the coordinator with the CA "
                              "certificate (ca.crt from deploy/make_certs.sh)")
        if cfg.private_key is None:
            raise DeployError(f"{cfg.source}: 'private_key' is missing: the site authenticates with its own EC key "
                              "(deploy/make_certs.sh makes keys/SITE; the coordinator registers keys/SITE.pub)")
        _check_ca(cfg.ca_cert)
        _check_private_key(cfg.private_key)
    # 2. the local Runtime API port
    if not _port_free("127.0.0.1", cfg.supernode_port):
        raise DeployError(f"site '{cfg.name}': port {cfg.supernode_port} on 127.0.0.1 is in use (another SuperNode?); "
                          "set supernode_port to a free port -- each SuperNode on a host needs its own")
    # 3. state folder
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(cfg.state_dir, 0o700)
        with tempfile.NamedTemporaryFile(dir=cfg.state_dir):
            pass
    except OSError as err:
        raise DeployError(f"site '{cfg.name}': state_dir {cfg.state_dir} is not a writable folder ({err.strerror}); "
                          "it holds the privacy ledger and the local models") from None
    if cfg.data != "digits":
        try:
            Path(cfg.state_dir).resolve().relative_to(Path(cfg.data).resolve())
            raise DeployError(f"site '{cfg.name}': state_dir {cfg.state_dir} lies inside the data folder {cfg.data}; "
                              "put it elsewhere so the site's own files are never read as data")
        except ValueError:
            pass
    # 4. the data itself, loaded exactly as the ClientApp will
    settings, data = _load_site_data(cfg)
    _check_data(cfg, data)
    if cfg.heldout:
        from common.data import DataError, load_dataset

        try:
            held = load_dataset(cfg.heldout, cfg.heldout_split, image_size=cfg.image_size or None,
                                label_from=cfg.label_from or None)
        except (DataError, OSError, ValueError, RuntimeError) as err:
            raise DeployError(f"site '{cfg.name}': the held-out data at {cfg.heldout} (split {cfg.heldout_split}) "
                              f"cannot be used: {err}") from None
        if held.image_shape != data.image_shape or held.classes != data.classes:
            raise DeployError(f"site '{cfg.name}': held-out data {held.image_shape} with classes {list(held.classes)} "
                              f"does not match the training data {data.image_shape} with classes {list(data.classes)}; "
                              "both must have the same image shape and class list")
    # 5. the ledger (delta fixed per dataset, damage detected)
    ledger = _open_ledger(cfg, settings, data)
    return SiteCheck(data=data, settings=settings, ledger=ledger.summary())


def _fmt_eps(x: float) -> str:
    return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.4g}"


def supernode_command(cfg: SiteConfig, insecure: bool) -> list[str]:
    cmd = [_flower_bin("flower-supernode"), "--superlink", cfg.coordinator, "--host", "127.0.0.1",
           "--port", str(cfg.supernode_port), "--node-config", str(cfg.state_dir / "node-config.toml")]
    if insecure:
        cmd.insert(1, "--insecure")
    else:
        cmd[1:1] = ["--root-certificates", str(cfg.ca_cert), "--auth-supernode-private-key", str(cfg.private_key)]
    return cmd


def _site_hint(line: str, cfg: SiteConfig, hints: list[str]) -> None:
    if "Failed to activate SuperNode" in line or "code: 2004" in line:
        hints.append(f"the coordinator rejected this site's key: ask the coordinator operator to register "
                     f"{cfg.private_key}.pub for '{cfg.name}' (sites: in coordinator.yaml), then start the site again")
    elif "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line:
        hints.append(f"TLS verification of the coordinator failed: is {cfg.ca_cert} the CA that signed the "
                     f"SuperLink certificate, and does that certificate name the host in '{cfg.coordinator}'?")
    elif "could not establish a connection" in line.lower():
        hints.append(f"could not connect to the coordinator at {cfg.coordinator}: check the address, that "
                     "fedsynth coordinator is running, the CA certificate, and that the site's key is registered")


def cmd_site(args: argparse.Namespace) -> int:
    try:
        cfg = load_site_config(args.config)
        if args.insecure:
            _loud("INSECURE SITE: --insecure turns OFF TLS and SuperNode authentication.\n"
                  "Generator weights and requests travel in clear text, and the coordinator cannot tell this\n"
                  "site from an impostor. Use it only on a private test network, never with real data.")
        check = check_site(cfg, insecure=args.insecure)
    except DeployError as err:
        print(f"fedsynth site: error: {err}", file=sys.stderr)
        print("fedsynth site: nothing was started; fix the problem above and run again "
              "(fedsynth site --config ... --check only validates).", file=sys.stderr)
        return 2
    from common.data import describe

    led = check.ledger
    c, h, w = check.data.image_shape
    _info(f"site '{cfg.name}' OK: {describe(check.data)}")
    _info(f"privacy budget epsilon={_fmt_eps(cfg.epsilon)} delta={led['delta']:.3g}: spent "
          f"{_fmt_eps(led['spent_epsilon'])}, left {_fmt_eps(led['remaining_epsilon'])} ({led['releases']} releases; "
          f"ledger {led['path']})")
    if math.isinf(cfg.epsilon):
        _loud(f"site '{cfg.name}' has an UNLIMITED budget (epsilon: inf): it may release NON-PRIVATE models of its data.")
    elif led["remaining_epsilon"] <= 0:
        _warn(f"site '{cfg.name}' has no budget left; it will refuse every request that releases anything")
    if "dpgan" not in cfg.modes:
        _warn(f"site '{cfg.name}' does not allow mode dpgan (modes: {cfg.modes}); train.gan requests will be refused")
    cmd = supernode_command(cfg, args.insecure)
    if args.check:
        _info(f"check passed; `fedsynth site --config {args.config}` would run:\n  FLWR_HOME={cfg.flwr_home} "
              + " ".join(cmd) + f"\n  with node config {json.dumps(cfg.node_config())}")
        return 0
    _write_toml(cfg.state_dir / "node-config.toml", cfg.node_config())
    cfg.flwr_home.mkdir(parents=True, exist_ok=True)
    # Flower keeps a node "online" for up to 2 heartbeats (60 s) after its last sign of life, and refuses to
    # activate it again meanwhile: a site restarted right after a crash is rejected like an unknown key.
    # So activation refusals are retried for --retry-rejected seconds before giving up.
    first = time.monotonic()
    while True:
        _info(f"starting the SuperNode of '{cfg.name}' -> {cfg.coordinator}"
              + (" (INSECURE)" if args.insecure else " (TLS, authenticated)"))
        hints: list[str] = []
        child = Child(cmd, flower_env(cfg.flwr_home), cwd=cfg.state_dir,
                      on_line=lambda line, hints=hints: _site_hint(line, cfg, hints))
        _forward_signals(child)
        code = child.wait()
        if child.stopping:
            _info(f"site '{cfg.name}' stopped")
            return 0
        rejected = any("rejected this site's key" in h for h in hints)
        left = args.retry_rejected - (time.monotonic() - first)
        if code == 0 or not rejected or left <= 0:
            break
        _warn(f"the coordinator refused to activate '{cfg.name}'. If this site restarted within the last minute, "
              f"the coordinator still counts its previous connection; retrying for {left:.0f} more s "
              "(an unregistered key keeps failing)")
        stop = time.monotonic() + min(10.0, left)
        while time.monotonic() < stop and not child.stopping:
            time.sleep(0.5)
        if child.stopping:
            return 0
    if code != 0:
        print(f"fedsynth site: the SuperNode of '{cfg.name}' exited with code {code}.", file=sys.stderr)
        if hints:  # the first one is the most specific
            print(f"fedsynth site: {hints[0]}", file=sys.stderr)
        return code if 0 < code < 256 else 1
    return 0


# ==== the ledger ===================================================================================

def ledger_summaries(cfg: SiteConfig) -> tuple[list[dict], str | None]:
    """Summaries of every dataset ledger under the site's state dir; the current dataset first."""
    from client.ledger import PrivacyLedger

    current_path, note = None, None
    out: list[dict] = []
    try:
        settings, data = _load_site_data(cfg)
        ledger = _open_ledger(cfg, settings, data)
        current_path = ledger.path
        out.append({"dataset": data.fingerprint()[:16], "current": True, "source": cfg.data, "records": len(data),
                    **ledger.summary()})
    except DeployError as err:
        note = f"the site's current data cannot be loaded ({err}); showing the ledgers on disk"
    for path in sorted((cfg.state_dir / "ledger").glob("*.jsonl")):
        if current_path is not None and path.resolve() == Path(current_path).resolve():
            continue
        try:
            header = json.loads(path.open().readline())
            ledger = PrivacyLedger(path, epsilon_budget=cfg.epsilon, delta=float(header["delta"]))
            out.append({"dataset": path.stem, "current": False, "source": None, "records": None, **ledger.summary()})
        except Exception as err:  # a damaged ledger is reported, never skipped silently
            out.append({"dataset": path.stem, "current": False, "path": str(path), "error": str(err)})
    return out, note


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def cmd_ledger(args: argparse.Namespace) -> int:
    try:
        cfg = load_site_config(args.config)
        rows, note = ledger_summaries(cfg)
    except DeployError as err:
        print(f"fedsynth ledger: error: {err}", file=sys.stderr)
        return 2
    if note:
        _warn(note)
    if args.json:
        print(json.dumps(_json_safe({"site": cfg.name, "ledgers": rows}), indent=2))
        return 0 if rows else 1
    print(f"privacy ledger of site '{cfg.name}' ({cfg.state_dir / 'ledger'})")
    if not rows:
        print("  no ledger yet: this site has released nothing")
        return 1 if note else 0
    for r in rows:
        label = f"dataset {r['dataset']}" + (f" (current: {r['source']}, {r['records']} records)" if r["current"] else " (not the current data)")
        print(f"  {label}")
        if "error" in r:
            print(f"    DAMAGED: {r['error']}")
            continue
        per = ", ".join(f"{p}: {n}" for p, n in r["per_purpose_releases"].items()) or "none"
        print(f"    budget epsilon : {_fmt_eps(r['budget_epsilon'])}")
        print(f"    spent epsilon  : {_fmt_eps(r['spent_epsilon'])}   (delta {r['delta']:.3g})")
        print(f"    left epsilon   : {_fmt_eps(r['remaining_epsilon'])}")
        print(f"    releases       : {r['releases']} ({per})")
        if r["releases"]:
            print(f"    first / last   : {r['first_release']} / {r['last_release']}")
    return 1 if any("error" in r for r in rows) else 0


# ==== the coordinator ==============================================================================

COORD_KEYS = ("host", "port", "address", "flwr_home", "database", "ca_cert", "cert", "key", "sites", "run", "out_dir")


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
    source: Path = field(default_factory=Path)


def load_coordinator_config(path: str | Path) -> CoordinatorConfig:
    raw, base = _load_yaml(path, "coordinator")
    f = _Fields(raw, str(path), base, COORD_KEYS)
    host = f.str("host", "127.0.0.1")
    port = f.int("port", 9092, lo=1, hi=65535)
    dial = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    address = f.str("address", f"[{dial}]:{port}" if ":" in dial else f"{dial}:{port}")
    _parse_address(address, f"{path}: 'address'")
    flwr_home = f.path("flwr_home", "coordinator-home")
    sites_raw = raw.get("sites") or []
    if not isinstance(sites_raw, list):
        raise DeployError(f"{path}: 'sites' must be a list of {{name: ..., public_key: ...}}")
    sites: list[SiteKey] = []
    for i, item in enumerate(sites_raw):
        if not isinstance(item, dict):
            raise DeployError(f"{path}: sites[{i}] must be a mapping with 'name' and 'public_key'")
        sf = _Fields(item, f"{path}: sites[{i}]", base, ("name", "public_key"))
        name = sf.str("name")
        if not _NAME_RE.match(name):
            raise DeployError(f"{path}: sites[{i}].name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        sites.append(SiteKey(name, sf.path("public_key")))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise DeployError(f"{path}: site names must be unique, got {names}")
    run = raw.get("run") or {}
    if not isinstance(run, dict):
        raise DeployError(f"{path}: 'run' must be a mapping of run settings (keys of [tool.flwr.app.config])")
    return CoordinatorConfig(
        host=host, port=port, address=address, flwr_home=flwr_home,
        database=f.path("database", str(flwr_home / "superlink.db")),
        ca_cert=f.path("ca_cert") if f.has("ca_cert") else None, cert=f.path("cert") if f.has("cert") else None,
        key=f.path("key") if f.has("key") else None, sites=sites, run={str(k): v for k, v in run.items()},
        out_dir=f.path("out_dir", "runs/deployment"), source=Path(path).resolve())


def _check_server_cert(cfg: CoordinatorConfig) -> None:
    import ipaddress

    from cryptography import x509

    for key in ("ca_cert", "cert", "key"):
        if getattr(cfg, key) is None:
            raise DeployError(f"{cfg.source}: '{key}' is missing; TLS needs ca_cert, cert and key "
                              "(deploy/make_certs.sh writes ca.crt, superlink.crt and superlink.key)")
    _check_ca(cfg.ca_cert, "run deploy/make_certs.sh (it writes ca.crt, superlink.crt and superlink.key) and set ca_cert")
    _readable_file(cfg.cert, "SuperLink certificate", "run deploy/make_certs.sh")
    _readable_file(cfg.key, "SuperLink private key", "run deploy/make_certs.sh")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cfg.cert), str(cfg.key))
    except ssl.SSLError as err:
        raise DeployError(f"SuperLink certificate {cfg.cert} and key {cfg.key} do not form a pair ({err}); "
                          "use the two files deploy/make_certs.sh wrote together") from None
    try:
        cert = x509.load_pem_x509_certificate(cfg.cert.read_bytes())
        ca = x509.load_pem_x509_certificate(cfg.ca_cert.read_bytes())
    except ValueError as err:
        raise DeployError(f"cannot read the certificates ({err}); they must be PEM files") from None
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise DeployError(f"SuperLink certificate {cfg.cert} was not signed by the CA {cfg.ca_cert}; sites would "
                          "refuse it. Re-make it with deploy/make_certs.sh using the same CA") from None
    now = time.time()
    if cert.not_valid_after_utc.timestamp() < now:
        raise DeployError(f"SuperLink certificate {cfg.cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                          "delete it and its key and run deploy/make_certs.sh again")
    host, _ = _parse_address(cfg.address, "address")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    names = set(san.get_values_for_type(x509.DNSName)) if san else set()
    ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} if san else set()
    try:
        ok = str(ipaddress.ip_address(host)) in ips
    except ValueError:
        ok = host in names
    if not ok:
        raise DeployError(f"SuperLink certificate {cfg.cert} does not name '{host}' (it names {sorted(names | ips)}); "
                          f"clients dialing {cfg.address} would fail TLS. Delete it and its key, then re-make it with "
                          f"SUPERLINK_SAN=\"{'IP' if re.fullmatch(r'[0-9.:]+', host) else 'DNS'}:{host}\" "
                          f"deploy/make_certs.sh {cfg.cert.parent} SITE... (the CA and the site keys are kept)")


def check_coordinator(cfg: CoordinatorConfig, insecure: bool = False) -> dict[str, str]:
    """Validate the coordinator config without starting anything; returns site name -> public key body."""
    if not insecure:
        _check_server_cert(cfg)
        if not cfg.sites:
            raise DeployError(f"{cfg.source}: 'sites' is empty: with SuperNode authentication only registered sites "
                              "can join; list each site's name and public_key (.pub)")
    keys = {s.name: _load_public_key(s.public_key, s.name) for s in cfg.sites}
    dup = [n for n in keys if list(keys.values()).count(keys[n]) > 1]
    if dup:
        raise DeployError(f"{cfg.source}: sites {dup} share a public key; every site needs its own key pair")
    _validated_run_config(cfg.run, None)
    return keys


def superlink_command(cfg: CoordinatorConfig, insecure: bool) -> list[str]:
    cmd = [_flower_bin("flower-superlink"), "--host", cfg.host, "--port", str(cfg.port), "--database", str(cfg.database),
           "--isolation", "subprocess", "--disable-runtime-dependency-installation"]
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
    tmp = path.with_name("config.toml.tmp")
    tmp.write_text(tomli_w.dumps(doc))
    os.replace(tmp, path)
    return path


def _read_marker(cfg: CoordinatorConfig) -> dict:
    path = cfg.flwr_home / "fedsynth-coordinator.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _superlink_up(cfg: CoordinatorConfig, insecure: bool, timeout: float = 3.0) -> bool:
    """True when the SuperLink answers GET /health over TLS (verified with our CA)."""
    import http.client

    host, port = _parse_address(cfg.address, "address")
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


def _flwr(cfg: CoordinatorConfig, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([_flower_bin("flwr"), *args], env=flower_env(cfg.flwr_home), capture_output=True, text=True,
                          cwd=str(PROJECT_ROOT), timeout=timeout)


def _json_out(proc: subprocess.CompletedProcess) -> dict:
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
        res = _flwr(cfg, ["supernode", "register", str(site.public_key), CONNECTION, "--name", site.name,
                          "--format", "json"])
        data = _json_out(res)
        if data.get("success"):
            registry[site.name] = {"node-id": str(data["node-id"]), "public_key": str(site.public_key)}
            out[site.name] = f"registered as node {data['node-id']}"
        elif "already in use" in str(data.get("error-message", "")):
            known = registry.get(site.name, {}).get("node-id")
            out[site.name] = "already registered" + (f" (node {known})" if known else "")
        else:
            reason = str(data.get("error-message") or res.stderr or res.stdout).strip().splitlines()
            out[site.name] = f"NOT registered: {reason[-1] if reason else 'unknown error'}"
    registry_path.write_text(json.dumps(registry, indent=2))
    return out


def cmd_coordinator(args: argparse.Namespace) -> int:
    try:
        cfg = load_coordinator_config(args.config)
        if args.insecure:
            _loud("INSECURE COORDINATOR: --insecure turns OFF TLS and SuperNode authentication.\n"
                  "Anyone who can reach the port can join as a site or submit runs, and generator weights\n"
                  "travel in clear text. Use it only on a private test network, never with real data.")
        check_coordinator(cfg, insecure=args.insecure)
        if not _port_free(cfg.host if cfg.host not in ("", "::") else "0.0.0.0", cfg.port):
            raise DeployError(f"port {cfg.port} on {cfg.host} is in use (another SuperLink?); stop it or set 'port'")
        cfg.database.parent.mkdir(parents=True, exist_ok=True)
    except DeployError as err:
        print(f"fedsynth coordinator: error: {err}", file=sys.stderr)
        return 2
    cmd = superlink_command(cfg, args.insecure)
    if args.check:
        _info(f"check passed; would run: FLWR_HOME={cfg.flwr_home} {' '.join(cmd)}; then register "
              f"{', '.join(s.name for s in cfg.sites) or 'no sites'}")
        return 0
    cfg.flwr_home.mkdir(parents=True, exist_ok=True)
    write_connection(cfg, args.insecure)
    _info(f"starting the SuperLink on {cfg.host}:{cfg.port} (database {cfg.database})"
          + (" INSECURE" if args.insecure else " with TLS and SuperNode authentication"))
    child = Child(cmd, flower_env(cfg.flwr_home), cwd=cfg.flwr_home)
    _forward_signals(child)
    deadline = time.monotonic() + args.start_timeout
    while not _superlink_up(cfg, args.insecure):
        if child.proc.poll() is not None or time.monotonic() > deadline or child.stopping:
            if not child.stopping:
                child.stop()
                print(f"fedsynth coordinator: the SuperLink did not come up (exit {child.proc.returncode}); "
                      "see its output above", file=sys.stderr)
            child.wait()
            return 0 if child.stopping else 1
        time.sleep(0.5)
    marker = {"pid": os.getpid(), "address": cfg.address, "insecure": bool(args.insecure)}
    (cfg.flwr_home / "fedsynth-coordinator.json").write_text(json.dumps(marker))
    if not args.insecure:
        for name, status in register_sites(cfg).items():
            _info(f"site {name}: {status}")
    _info(f"coordinator ready at {cfg.address}; submit a run with: fedsynth run --config {args.config}")
    code = child.wait()
    if child.stopping:
        _info("coordinator stopped")
        return 0
    print(f"fedsynth coordinator: the SuperLink exited with code {code}", file=sys.stderr)
    return code if 0 < code < 256 else 1


# ==== a run ========================================================================================

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


def _validated_run_config(base: dict[str, Any], overrides: dict[str, Any] | None, out_dir: Path | None = None) -> dict:
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
        _warn("run setting epsilon=inf asks for a NON-private run; every site still enforces its own budget")
    flat = {k: v for k, v in cfg.to_flwr().items() if k in merged}
    return flat


def _online_sites(cfg: CoordinatorConfig) -> int | None:
    res = _flwr(cfg, ["supernode", "list", CONNECTION, "--format", "json"], timeout=60)
    data = _json_out(res)
    if not data.get("success"):
        return None
    return sum(1 for n in data.get("nodes", []) if n.get("status") == "online")


def _run_status(cfg: CoordinatorConfig, run_id: int) -> dict:
    res = _flwr(cfg, ["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=60)
    runs = _json_out(res).get("runs", [])
    for r in runs:
        if str(r.get("run-id")) == str(run_id):
            return r
    return runs[0] if runs else {}


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_coordinator_config(args.config)
        marker = _read_marker(cfg)
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
        settings = _validated_run_config(cfg.run, overrides, out_dir)
        write_connection(cfg, insecure)
        if not _superlink_up(cfg, insecure):
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
        _warn(f"only {online} of {want} site(s) online after {args.wait:.0f} s; starting anyway (quorum decides)")
    override_file = out_dir / "run-config.toml"
    _write_toml(override_file, settings)
    _info(f"{'resuming' if resuming else 'starting'} a run on {cfg.address} with {online} site(s) online; "
          f"outputs -> {out_dir}")
    cmd = [_flower_bin("flwr"), "run", str(PROJECT_ROOT), CONNECTION, "--run-config", str(override_file), "--stream"]
    run_id: list[int] = []

    def grab(line: str) -> None:
        m = re.search(r"Successfully started run (\d+)", line)
        if m and not run_id:
            run_id.append(int(m.group(1)))

    # The full stream goes to <out>/flower-run.log; the terminal is spared the HTTP polling chatter.
    child = Child(cmd, flower_env(cfg.flwr_home), cwd=PROJECT_ROOT, log_path=out_dir / "flower-run.log", on_line=grab,
                  hide=lambda line: "httpx INFO HTTP Request" in line)
    _forward_signals(child)
    timed_out = False
    try:
        child.proc.wait(timeout=args.timeout if args.timeout and args.timeout > 0 else None)
    except subprocess.TimeoutExpired:
        timed_out = True
        _warn(f"the run did not finish within --timeout {args.timeout:.0f} s; stopping it")
        if run_id:
            _flwr(cfg, ["stop", str(run_id[0]), CONNECTION], timeout=60)
        child.stop()
    code = child.wait()
    if child.stopping and not timed_out:
        if run_id:
            _warn(f"interrupted; the run {run_id[0]} may still be running on the SuperLink "
                  f"(stop it with: FLWR_HOME={cfg.flwr_home} flwr stop {run_id[0]} {CONNECTION})")
        return 130
    resume_hint = (f"the coordinator checkpoints after every round: once the coordinator is up again, rerun the same "
                   f"command (same --out {out_dir}) to continue from {out_dir / 'checkpoint.pt'}")
    if not run_id:
        print(f"fedsynth run: error: the run was not accepted by the SuperLink (flwr exit {code}); see the output "
              f"above ({out_dir / 'flower-run.log'})", file=sys.stderr)
        return 1
    status = _run_status(cfg, run_id[0]) if _superlink_up(cfg, insecure) else {}
    state = str(status.get("status", ""))
    details = str(status.get("status-details", "")).strip()
    report_path = out_dir / "report.json"
    if state == "finished:completed" and report_path.exists() and not timed_out:
        from fedsynth.cli import print_summary

        report = json.loads(report_path.read_text())
        print_summary(report)
        _info(f"run {run_id[0]} completed; outputs in {out_dir}")
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


# ==== command registration ==========================================================================

def add_subcommands(subparsers) -> None:
    """Register `site`, `coordinator`, `run` and `ledger` on the `fedsynth` argparse subparsers."""
    p = subparsers.add_parser("site", help="validate a site's config and data, then run its Flower SuperNode",
                              description="Start a site next to its private data: validates the YAML, the "
                                          "credentials and the data, then runs flower-supernode (TLS + auth).")
    p.add_argument("--config", required=True, help="the site's YAML (see deploy/site.yaml)")
    p.add_argument("--check", action="store_true", help="only validate config, credentials, data and ledger; connect to nothing")
    p.add_argument("--insecure", action="store_true", help="NO TLS and NO authentication (test networks only)")
    p.add_argument("--retry-rejected", type=float, default=120.0, metavar="SECONDS",
                   help="keep retrying for this long when the coordinator refuses to activate the site (a site "
                        "restarted within a minute of a crash is refused until its old connection expires)")
    p.set_defaults(func=cmd_site)

    p = subparsers.add_parser("ledger", help="what a site has spent and has left of its privacy budget")
    p.add_argument("--config", required=True, help="the site's YAML")
    p.add_argument("--json", action="store_true", help="machine-readable output (infinity as \"inf\")")
    p.set_defaults(func=cmd_ledger)

    p = subparsers.add_parser("coordinator", help="run the Flower SuperLink (TLS, SuperNode auth) and register the sites")
    p.add_argument("--config", required=True, help="the coordinator's YAML (see deploy/coordinator.yaml)")
    p.add_argument("--check", action="store_true", help="only validate certificates, keys and settings")
    p.add_argument("--insecure", action="store_true", help="NO TLS and NO authentication (test networks only)")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the SuperLink to come up")
    p.set_defaults(func=cmd_coordinator)

    p = subparsers.add_parser("run", help="submit a synthesis run to the coordinator, follow it, collect the outputs")
    p.add_argument("--config", required=True, help="the coordinator's YAML")
    p.add_argument("--run-config", default=None,
                   help="run settings: a .toml file or \"key=value ...\" (TOML values, strings quoted); they "
                        "override the YAML's run: section")
    p.add_argument("--out", default=None, help="output folder on the coordinator host (default: out_dir of the YAML); "
                                               "rerun with the same --out to resume after a crash")
    p.add_argument("--min-sites", type=int, default=None, help="wait for this many online sites (default: all listed)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the sites before starting")
    p.add_argument("--timeout", type=float, default=0.0, help="stop the run after this many seconds (0 = no limit)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="talk to an --insecure coordinator (default: what fedsynth coordinator started)")
    p.set_defaults(func=cmd_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsynth", description="fedsynth deployment commands")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
