"""Small, fast run settings, an in-process runner and ledger readers shared by the spine tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.app import app as client_app
from client.ledger import PrivacyLedger
from client.site_delta import PURPOSE as DELTA_PURPOSE
from common.config import RunConfig
from fedsynth.localgrid import run_inprocess
from server.app import run_coordinator


# `fedsynth simulate` flags that make a CLI run take seconds on digits (tests of the command line)
FAST_CLI = ["--quiet", "--set", "gan-local-steps=3", "--set", "gan-width=16", "--set", "learner-epochs=1",
            "--set", "synthetic-size=50", "--set", "real-baseline=false"]


def fast_config(tmp: Path, **overrides: Any) -> RunConfig:
    base = dict(out_dir=str(tmp / "out"), state_dir=str(tmp / "sites"), num_rounds=2, gan_local_steps=4,
                gan_batch_size=32, gan_width=16, gan_latent_dim=16, synthetic_size=100, learner_epochs=1,
                real_baseline=False, progress=False, round_timeout=30.0, experiment="")
    base.update(overrides)
    cfg = RunConfig(**base)
    cfg.validate()
    return cfg


def nodes(k: int) -> list[dict]:
    return [{"partition-id": i, "num-partitions": k, "site-name": f"site-{i + 1}"} for i in range(k)]


def run(cfg: RunConfig, k: int = 3, **grid_kwargs: Any) -> dict:
    """The coordinator's report of an in-process run with ``k`` sites (no simulation-owner additions)."""
    return run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(k), **grid_kwargs)


def ledger_paths(tmp: Path, sites: str = "sites") -> list[Path]:
    """The ledgers under ``tmp/sites`` (the simulated sites' state root; or another folder of site state)."""
    return sorted((tmp / sites).rglob("ledger/*.jsonl"))


def charges(tmp: Path, sites: str = "sites", *, with_delta: bool = False) -> list[list[dict]]:
    """Every site's charge entries (one list per site, sites in name order). Each ledger must begin with the noisy
    size its default delta was read from (client.site_delta); it is left out unless ``with_delta``."""
    out = []
    for p in ledger_paths(tmp, sites):
        entries = [json.loads(line) for line in p.read_text().splitlines() if '"purpose"' in line]
        assert entries and entries[0]["purpose"] == DELTA_PURPOSE, f"{p}: the ledger does not begin with its size"
        out.append(entries if with_delta else entries[1:])
    return out


def spent(tmp: Path, sites: str = "sites") -> list[float]:
    """Every site's spent epsilon, read from its ledger (sites in name order)."""
    return [PrivacyLedger(p, epsilon_budget=float("inf"), create=False).spent().epsilon
            for p in ledger_paths(tmp, sites)]


def budget_used(tmp: Path, budget: float, sites: str = "sites") -> list[float]:
    """Every site's share of ``budget`` used, at its ledger's order: what the ledger enforces (client.ledger_order)."""
    return [PrivacyLedger(p, epsilon_budget=budget, create=False).spent().used for p in ledger_paths(tmp, sites)]
