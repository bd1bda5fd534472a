"""The folders a site keeps in its state folder, named once for the site (``client``) and the SuperNode tools
(``fedsynth.ops``) alike; import-light (no torch, no Flower), so that the SuperNode guard can read it.

    <state_dir>/
        ledger/<dataset id>.jsonl     the privacy ledger (client.ledger), one per dataset id
        runs/<run id>/                one run's plan, census, saved replies and discriminator states
        secure-setups/<site name>/    an empty file per SecAgg+ stage the site ran (client.secure_site)
        nodes/<site name>/            one SuperNode's node config, approvals, Flower home and lock
                                      (fedsynth.ops.node_folder; two SuperNodes over one dataset share the rest)
        row-checks/<sha256>.ok        a network shape whose rows this machine computes alone (client.row_check)
"""

from __future__ import annotations

from pathlib import Path

LEDGER_FOLDER = "ledger"
RUNS_FOLDER = "runs"
SETUPS_FOLDER = "secure-setups"
NODES_FOLDER = "nodes"
ROW_CHECKS_FOLDER = "row-checks"


def ledger_folder(state_dir: Path | str) -> Path:
    """Where a site's ledgers live."""
    return Path(state_dir) / LEDGER_FOLDER


def runs_folder(state_dir: Path | str) -> Path:
    """Where a site keeps its runs, one folder each."""
    return Path(state_dir) / RUNS_FOLDER


def setups_folder(state_dir: Path | str) -> Path:
    """Where every SuperNode of a state folder records its SecAgg+ stages, a folder per site name."""
    return Path(state_dir) / SETUPS_FOLDER


def nodes_folder(state_dir: Path | str) -> Path:
    """Where every SuperNode of a state folder keeps its own files, a folder per site name."""
    return Path(state_dir) / NODES_FOLDER


def row_checks_folder(state_dir: Path | str) -> Path:
    """Where a site remembers the network shapes whose rows its machine was found to compute alone."""
    return Path(state_dir) / ROW_CHECKS_FOLDER
