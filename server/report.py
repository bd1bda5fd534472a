"""report.json (and report.html when the renderer is available) for a finished run."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger("fedsynth.coordinator")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_report(report: dict, out_dir: Path) -> Path:
    """Write report.json (infinities as the string "inf") and, if possible, report.html next to it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(_jsonable(report), indent=2))
    try:
        from server.report_html import render_report
    except ImportError:  # the HTML renderer is optional for the spine
        return path
    try:
        render_report(report, out_dir)
    except Exception as err:  # a broken picture must not lose the run's numbers
        log.warning("report.html could not be rendered: %s", err)
    return path


def privacy_statement(private: bool, epsilon: float, sites: list[dict], mode: str = "dpgan") -> str:
    """One plain sentence on what the run's privacy numbers mean."""
    if not private:
        return ("NOT differentially private: sites released without noise (epsilon = inf). This run only shows "
                "what the pipeline reaches without privacy; never use it on real private data.")
    worst = max((float(s.get("epsilon", math.inf)) for s in sites), default=math.inf)
    released = {"dpgan": "generator weights", "bnstats": "shared-net updates and class statistics"}.get(
        mode, "releases")
    return (f"Everything a site released in this run (its {released}) is ({worst:.3g}, delta)-differentially "
            f"private for one record of that site (worst site shown; run requested epsilon <= {epsilon:g}), "
            "accounted in the site's own ledger.")
