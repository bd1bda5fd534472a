"""``fedsynth ledger``: what a site has spent and has left, for a deployed site or a simulation's sites.

    fedsynth ledger --config site.yaml         # a deployed site: its dataset id's ledger (and any others)
    fedsynth ledger --state-dir runs/x/sites   # every ledger under a folder (a simulation's virtual sites)

Reading a ledger never writes one: "no ledger yet" (nothing released) is an answer, not an error -- unless the
ledger's ``.started`` mark or the site's saved releases show that it existed: a deleted or emptied ledger is
reported as damaged (exit 1), never as a fresh one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fedsynth.ops.fields import DeployError, warn


def _summary(path: Path, budget: float, history: str = "") -> dict:
    from client.ledger import PrivacyLedger

    try:
        return PrivacyLedger(path, epsilon_budget=budget, create=False, history=history).summary()
    except FileNotFoundError as err:  # (its header not written yet: a site creating it now, or a crash there)
        return {"path": str(path), "dataset_id": path.stem, "pending": str(err)}
    except Exception as err:  # noqa: BLE001 - a damaged ledger is reported, never skipped silently
        return {"path": str(path), "dataset_id": path.stem, "error": str(err)}


def ledger_rows(state_dir: Path, budget: float = math.inf, skip: Path | None = None) -> list[dict]:
    """Summaries of every ledger under ``state_dir`` (recursively), in path order; a ledger whose ``.started`` mark
    is there but whose file is not is listed with its error."""
    paths = set(Path(state_dir).rglob("ledger/*.jsonl"))
    paths |= {m.with_suffix(".jsonl") for m in Path(state_dir).rglob("ledger/*.started")}
    return [_summary(p, budget) for p in sorted(paths) if skip is None or p.resolve() != skip.resolve()]


def site_ledger_rows(config: str) -> tuple[list[dict], str | None]:
    """A deployed site's ledgers: its dataset id's first (with its records), then any others on disk."""
    from client.site import released_before
    from fedsynth.ops.site_cmd import load_data_checked, load_site_config

    dep = load_site_config(config)
    current = dep.settings.ledger_path.resolve()
    rows = ledger_rows(dep.state_dir, dep.settings.epsilon_budget, skip=current)  # the site's own: read below,
    history = released_before(dep.settings)  # with its runs' evidence
    if history or dep.settings.ledger_path.exists():  # (emptied with saved releases on disk: damaged, not pending)
        rows.append(_summary(dep.settings.ledger_path, dep.settings.epsilon_budget, history))
    note = None
    try:
        records = len(load_data_checked(dep))
    except DeployError as err:
        records, note = None, f"the site's current data cannot be loaded ({err}); showing the ledgers on disk"
    for row in rows:
        row["current"] = Path(row["path"]).resolve() == current
        row["records"] = records if row["current"] else None
    rows.sort(key=lambda r: not r["current"])
    return rows, note


def _json_safe(obj):
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _fmt(x) -> str:
    return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.4g}"


def print_rows(title: str, rows: list[dict]) -> None:
    print(title)
    if not rows:
        print("  no ledger yet: nothing has been released")
        return
    for r in rows:
        label = f"dataset id {r.get('dataset_id') or Path(r['path']).stem}"
        if r.get("current"):
            label += f" (this site's data, {r['records']} records)" if r.get("records") is not None else " (current)"
        print(f"  {label}  [{r['path']}]")
        if "error" in r:
            print(f"    DAMAGED: {r['error']}")
            continue
        if "pending" in r:
            print(f"    not started yet: {r['pending']} (a site writing its first entry, or one that stopped there, "
                  "which its next request completes)")
            continue
        per = ", ".join(f"{p}: {n}" for p, n in r["per_purpose_releases"].items()) or "none"
        # (the spent epsilon is read at the best Renyi order, the budget at the ledger's: "8.2 of 10" read as 1.8
        # left when 99 % was used (review s67), so the budget is named on the line that says how much of it is used)
        print(f"    spent epsilon  : {_fmt(r['spent_epsilon'])}   (delta {r['delta']:.3g}; the tightest reading of "
              "the releases, at the best Renyi order)")
        if r.get("budget_used") is not None and r.get("order") is not None:
            from client.ledger_refusals import share

            budget = f" of epsilon {_fmt(r['budget_epsilon'])}" if "records" in r else ""
            fixed = "recorded in the ledger" if r["order_recorded"] else "to be recorded at its next release"
            over = (" (over 100 %: releases allowed by the rule used before 2026-12-07, which read the best order)"
                    if 1 < r["budget_used"] < math.inf else "")
            print(f"    budget used    : {share(r['budget_used'])}{budget}   (of the Renyi divergence the budget "
                  f"allows at order {r['order']:g}, {fixed}; what the ledger enforces, so what is left){over}")
        elif "records" in r and math.isinf(r["budget_epsilon"]):  # (its spent line named it "of inf" until s67)
            print("    budget used    : no limit (the site's epsilon budget is inf)")
        print(f"    releases       : {r['releases']} ({per}); runs: {', '.join(r['runs']) or 'none'}")
        if r["releases"]:
            print(f"    first / last   : {r['first_release']} / {r['last_release']}")


def cmd_ledger(args: argparse.Namespace) -> int:
    if bool(args.config) == bool(args.state_dir):
        print("fedsynth ledger: error: give either --config site.yaml or --state-dir FOLDER", file=sys.stderr)
        return 2
    try:
        if args.config:
            rows, note = site_ledger_rows(args.config)
            title = f"privacy ledger of the site in {args.config}"
        else:
            if not Path(args.state_dir).is_dir():
                raise DeployError(f"--state-dir {args.state_dir} is not a folder (a simulation keeps its sites' state "
                                  "in <out>/sites)")
            rows, note = ledger_rows(Path(args.state_dir)), None
            title = f"privacy ledgers under {args.state_dir}"
    except DeployError as err:
        print(f"fedsynth ledger: error: {err}", file=sys.stderr)
        return 2
    if note:
        warn(note)
    if args.json:
        print(json.dumps(_json_safe({"ledgers": rows}), indent=2))
    else:
        print_rows(title, rows)
    return 1 if any("error" in r or "pending" in r for r in rows) else 0
