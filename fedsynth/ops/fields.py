"""Reading an operator's YAML: typed fields whose errors name the file and the key, addresses, ports, files."""

from __future__ import annotations

import json
import math
import re
import socket
import sys
from pathlib import Path
from typing import Any

from common.files import atomic_write_text

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class DeployError(ValueError):
    """A deployment problem; the message says what is wrong and what to do."""


def warn(text: str) -> None:
    print(f"fedsynth: WARNING: {text}", file=sys.stderr, flush=True)


def loud(text: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n{text}\n{bar}\n", file=sys.stderr, flush=True)


def info(text: str) -> None:
    print(f"fedsynth: {text}", flush=True)


def load_yaml(path: str | Path, what: str) -> tuple[dict, Path]:
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


class Fields:
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
            bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else \
                f"at least {lo}" if lo is not None else f"at most {hi}"
            raise self._err(key, f"must be {bounds}, got {value}")
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


def parse_address(text: str, what: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\s/]+):(\d+)", text.strip())
    if not m:
        raise DeployError(f"{what} '{text}' must be HOST:PORT (e.g. 127.0.0.1:9092 or coordinator.example.org:9092), "
                          "without https://")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise DeployError(f"{what} '{text}': port must be in 1..65535")
    return host, port


def port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def readable_file(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise DeployError(f"{what} {path} does not exist; {fix}")
    try:
        path.read_bytes()
    except OSError as err:
        raise DeployError(f"{what} {path} cannot be read ({err.strerror}); fix its permissions") from None


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_toml(path: Path, mapping: dict[str, Any]) -> None:
    """A flat TOML file of scalars (Flower's node and run configs)."""
    atomic_write_text(path, "".join(f"{k} = {toml_value(v)}\n" for k, v in mapping.items()))
