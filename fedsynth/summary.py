"""The few lines a finished run prints: privacy, sites, utility, where the outputs are."""

from __future__ import annotations

import math
from typing import Any


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "inf" if math.isinf(x) else f"{x:.4f}"
    return str(x)


def print_summary(report: dict) -> None:
    u = report.get("utility", {})
    print(f"\n== fedsynth {report['mode']} run ({'private' if report['private'] else 'NOT PRIVATE'}) ==")
    print(report.get("privacy_statement", "").split("\n")[0])
    for s in report["sites"]:
        spent = (f" epsilon spent={_fmt(s['epsilon'])} (its ledger, delta {s['delta']:.2g})"
                 if "epsilon" in s else "")
        records = f" records={s['examples']}" if s.get("examples") is not None else ""
        dropped = "  DROPPED in rounds " + ",".join(s["rounds_failed"]) if s.get("dropped") else ""
        print(f"  {s['name']:<10}{records}{spent} bytes sent={s['bytes_sent']}{dropped}")
    if "tstr_accuracy" in u:
        print(f"  TSTR accuracy: {u['tstr_accuracy']:.4f}   MCC: {u['mcc']:.4f}")
    if "real_accuracy" in u:
        print(f"  same learner on real data: {u['real_accuracy']:.4f}   ratio: {u['ratio']:.3f}")
    ev = report.get("site_evaluation") or {}
    if ev.get("sites"):
        print(f"  the sites' DP evaluation: accuracy {_fmt(ev['accuracy'])} (noisy counts, std "
              f"{ev['noise_std_per_cell']:g} each)")
    print(f"  outputs in {report['config']['out-dir']}  (report.html, report.json, synthetic.npz, synthetic/, grids/)")
