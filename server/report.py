"""report.json (and report.html) for a finished run, with the privacy statement of what each site released."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from common import protocol as P
from common.config import RunConfig
from common.files import atomic_write_text
from server.html_parts import bound_text
from server.run_state import RunState
from server.sites import SiteRecord

log = logging.getLogger("fedsynth.coordinator")

# What each kind of release is, and the mechanism that makes it DP (for the statement).
RELEASE_MEANING = {
    "generator": "the generator after each round (trained only through a DP-SGD discriminator)",
    "shared net": "the shared net after each round of DP-SGD",
    "class statistics": "noisy class counts and clipped class-wise sums of the shared net's norm inputs (Gaussian)",
    "evaluation counts": f"noisy right/wrong counts of the classifier on held-out records (Gaussian, std "
                         f"{P.EVALUATION_NOISE:g})",
    "generator (secure sum)": "the generator after each round, inside a SecAgg+ sum over the sites (the coordinator "
                              "saw only the sites' weighted average)",
    "shared net (secure sum)": "the shared net after each round of DP-SGD, inside a SecAgg+ sum over the sites",
    "class statistics (secure sum)": "its DP class statistics inside a SecAgg+ sum over the sites (the coordinator saw "
                                     "only the pooled sums)",
    "audit histograms": f"noisy histograms of record-to-synthetic distances (Gaussian, std {P.AUDIT_NOISE:g})",
}
CENSUS_MEANING = (f"a noisy class histogram (Gaussian, std {P.CENSUS_NOISE:g}): its total is the site's averaging weight; "
                  "in the DP-GAN mode it also sets how many of each class's synthetic images the coordinator draws "
                  "from the site's generator (the statistics mode sends only the total)")

CENSUS_SECURE_MEANING = (f"a noisy class histogram (Gaussian, std {P.CENSUS_NOISE:g}), whose total weights the site's "
                         "model inside each round's SecAgg+ sums: two sums over different sets of sites (a site that "
                         "dropped out of one round) give that total alone, by subtraction")


def jsonable(obj: Any) -> Any:
    """Infinities and NaN as strings (strict JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else "nan")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_report(report: dict, out_dir: Path) -> Path:
    """Write report.json (infinities as the string "inf") and, if possible, report.html next to it."""
    path = atomic_write_text(Path(out_dir) / "report.json", json.dumps(jsonable(report), indent=2))
    from server.report_html import render_report

    try:
        render_report(report, Path(out_dir))
    except Exception as err:  # noqa: BLE001 - a broken picture must not lose the run's numbers
        log.warning("report.html could not be rendered: %s", err)
    return path


def site_privacy(site: SiteRecord, epsilon: float) -> dict:
    """What one site released in this run and the guarantee that covers it."""
    released = [RELEASE_MEANING.get(r, r) for r in site.released]
    # every training round rests on the run's census, in the clear or inside the SecAgg+ sums, where the coordinator
    # never sees the weight (0 here): listed whenever the site trained (review s67 found it left out of secure runs)
    trained = any(r.removesuffix(" (secure sum)") in ("generator", "shared net") for r in site.released)
    if site.weight or trained:
        released.append(CENSUS_MEANING if site.weight else CENSUS_SECURE_MEANING)
    return {"name": site.name, "released": released, "epsilon_bound": epsilon, "delta_bound": site.delta_bound}


def privacy_statement(private: bool, epsilon: float, rows: list[dict], *, secure: bool = False,
                      noise_shares: int = 1) -> str:
    """Plain sentences on what the run's privacy numbers mean."""
    if not private:
        return ("NOT differentially private: this run asked the sites for no privacy (epsilon = inf). A site "
                "whose operator set no budget released without noise; a site with a budget of its own still added "
                "noise and spent what was left of its budget on the run (its ledger holds what it charged), so its "
                "releases are private at that budget, which this report does not know. This run only shows what "
                "the pipeline reaches without privacy; never use it on real private data.")
    delta = max((r["delta_bound"] for r in rows), default=P.DEFAULT_DELTA_BOUND)
    eps, delta = bound_text(epsilon), bound_text(delta)  # (rounded up: a bound must not read below itself)
    lines = [f"Everything each site released in this run is together ({eps}, {delta})-differentially "
             "private for one record of that site (one image and its label, added or removed): whatever the "
             "coordinator does with it, no one can tell much more than that about any single record. Smaller "
             f"epsilon is stronger privacy; epsilon {eps} per site bounds how much any one record can change "
             f"the odds of anything learned from the releases (by a factor of at most e^{eps}, except "
             f"with probability {delta}). Each site charged every release to its own privacy ledger before "
             "computing it; the coordinator never saw a site's record count, budget or spending. A site whose "
             "ledger began with this run also charged it a noisy count of its records, once, which sets its default "
             "delta (client/site_delta.py): a small release outside the epsilon above, inside the site's budget."]
    for row in rows:
        if row["released"]:
            lines.append(f"{row['name']} released: " + "; ".join(row["released"]) + ".")
    if secure:
        lines.append("Secure aggregation (SecAgg+): the coordinator received each round's models and the statistics "
                     "only as sums over the sites, never one site's model or statistics (a site's noisy record "
                     "total, a DP release listed above, can be read off two sums over different sets of sites); "
                     "this assumes it follows the protocol (honest-but-curious) and that the sites do not collude "
                     "with it.")
    if noise_shares > 1:
        lines.append(f"Distributed noise: each site added only part of the statistics release's noise (at least "
                     f"1/sqrt({noise_shares}) of it), and every sum held at least {noise_shares} sites' releases, so "
                     "the sum carries all of it and the guarantee above holds -- under the trust assumption of secure "
                     f"aggregation. Were one site's release seen alone, it would carry up to sqrt({noise_shares}) "
                     "times less noise than charged (a weaker guarantee, written in each site's ledger as its own "
                     "noise multiplier).")
    return "\n".join(lines)


def build_report(cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord], history: list[dict], utility: dict,
                 fed_eval: dict, audits: dict, synth_info: dict, device: torch.device) -> dict:
    rows = [s.row() for s in sorted(sites.values(), key=lambda s: s.name)]
    privacy_rows = [site_privacy(s, cfg.epsilon) for s in sorted(sites.values(), key=lambda s: s.name)]
    rounds = cfg.num_rounds if cfg.mode == "dpgan" else (0 if cfg.bn_net else cfg.bn_rounds)
    noise_shares = 1
    if cfg.distributed_noise and cfg.mode == "bnstats":
        from server.modes.bnstats import noise_shares as shares_for

        noise_shares = shares_for(cfg, len(sites))
    return {
        "mode": cfg.mode, "private": cfg.private, "epsilon_target": cfg.epsilon,
        "delta_bound": max((s.delta_bound for s in sites.values()), default=P.DEFAULT_DELTA_BOUND),
        "privacy_statement": privacy_statement(cfg.private, cfg.epsilon, privacy_rows, secure=cfg.secure_aggregation,
                                               noise_shares=noise_shares),
        "privacy": {"adjacency": "add or remove one record at one site", "sites": privacy_rows},
        "experiment": run.experiment, "num_rounds": rounds, "rounds": history, "sites": rows,
        "utility": utility, "site_evaluation": fed_eval, "site_audits": audits,
        "synthetic": synth_info, "timings": run.timings, "config": cfg.to_flwr(), "device": str(device),
        "secure_aggregation": secure_aggregation_facts(cfg, len(sites), noise_shares),
    }


def secure_aggregation_facts(cfg: RunConfig, num_sites: int, noise_shares: int) -> dict:
    """What secure aggregation did to the numbers (empty when it was off)."""
    if not cfg.secure_aggregation:
        return {}
    from server.secure_agg import default_threshold

    k = num_sites
    return {
        "threshold": cfg.secure_threshold or default_threshold(k), "sites": k, "noise_shares": noise_shares,
        "clipping_range": P.SECAGG_CLIPPING_RANGE, "quantization_step": P.SECAGG_STEP,
        "precision": (f"every value a site adds is rounded stochastically to a step of {P.SECAGG_STEP:g} (unbiased); "
                      f"a pooled statistic is off by at most {k * P.SECAGG_STEP:g} from the exact pooling of the same "
                      f"releases, an averaged parameter x by at most {k * P.SECAGG_STEP:g} * (1 + |x|) / (sum of the "
                      "sites' weights)"),
    }
