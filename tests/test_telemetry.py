"""Flower's usage telemetry (platform, CPU count, a machine id, to telemetry.flower.ai) is off wherever fedsynth runs
Flower, unless an operator turns it on explicitly (fedsynth/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fedsynth.ops.processes import flower_env

ROOT = Path(__file__).resolve().parents[1]
READ = ("import os, fedsynth.ops.supernode_guard, flwr.supercore.telemetry as t; "
        "print(t.FLWR_TELEMETRY_ENABLED, os.environ.get('FLWR_DISABLE_UPDATE_CHECK'))")


def _flower_reads(env: dict[str, str]) -> str:
    out = subprocess.run([sys.executable, "-c", READ], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_flower_telemetry_and_update_check_are_off_in_fedsynth_processes_unless_the_operator_turns_them_on(tmp_path, monkeypatch):
    clean = {k: v for k, v in os.environ.items() if k not in ("FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK")}
    clean["PYTHONPATH"] = str(ROOT)
    # the SuperNode guard's entry (Docker), as any fedsynth entry point: no telemetry, no update check (review s58:
    # Flower's daily update check sent its versions, OS, kernel and the machine's address to api.flower.ai)
    assert _flower_reads(clean) == "0 1"
    explicit = {**clean, "FLWR_TELEMETRY_ENABLED": "1", "FLWR_DISABLE_UPDATE_CHECK": "0"}
    assert _flower_reads(explicit) == "1 0"  # an explicit choice stands
    # the SuperLink / SuperNode / flwr processes fedsynth starts
    monkeypatch.delenv("FLWR_TELEMETRY_ENABLED", raising=False)
    monkeypatch.delenv("FLWR_DISABLE_UPDATE_CHECK", raising=False)
    assert flower_env(tmp_path)["FLWR_TELEMETRY_ENABLED"] == "0"
    assert flower_env(tmp_path)["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    for dockerfile in ("Dockerfile.supernode", "Dockerfile.superlink"):
        text = (ROOT / "deploy" / dockerfile).read_text()
        assert "ENV FLWR_TELEMETRY_ENABLED=0" in text and "ENV FLWR_DISABLE_UPDATE_CHECK=1" in text


def test_the_processes_fedsynth_starts_import_nothing_from_their_working_folder(tmp_path):
    """Review s59: `fedsynth site` starts the guarded SuperNode in the site's state_dir, which Python put first on the
    import path: a flwr.py there would have run in place of Flower. With PYTHONSAFEPATH nothing is imported from the
    working folder (the Docker SuperNode's image sets it too)."""
    import subprocess
    import sys

    (tmp_path / "flwr.py").write_text("raise SystemExit('imported from the working folder')\n")
    env = flower_env(tmp_path / "flwr-home")
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", "import flwr; print(flwr.__file__)"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and str(tmp_path) not in done.stdout, done.stdout + done.stderr
    assert "ENV PYTHONSAFEPATH=1" in (ROOT / "deploy" / "Dockerfile.supernode").read_text()
