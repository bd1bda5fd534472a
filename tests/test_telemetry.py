"""Flower's usage telemetry (platform, CPU count, a machine id, to telemetry.flower.ai) is off wherever fedsynth runs
Flower, unless an operator turns it on explicitly (fedsynth/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedsynth.ops.processes import flower_env

ROOT = Path(__file__).resolve().parents[1]
READ = "import fedsynth.ops.supernode_guard, flwr.supercore.telemetry as t; print(t.FLWR_TELEMETRY_ENABLED)"


def _flower_reads(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", READ], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_flower_telemetry_is_off_in_fedsynth_processes_unless_the_operator_turns_it_on(tmp_path, monkeypatch):
    clean = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    clean["PYTHONPATH"] = str(ROOT)
    assert _flower_reads(clean) == "0"  # the SuperNode guard's entry (Docker), as any fedsynth entry point
    assert _flower_reads({**clean, "FLWR_TELEMETRY_ENABLED": "1"}) == "1"  # an explicit choice stands
    # the SuperLink / SuperNode / flwr processes fedsynth starts
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    assert flower_env(tmp_path)["FLWR_TELEMETRY_ENABLED"] == "0"
    for dockerfile in ("Dockerfile.supernode", "Dockerfile.superlink"):
        assert "ENV FLWR_TELEMETRY_ENABLED=0" in (ROOT / "deploy" / dockerfile).read_text()
