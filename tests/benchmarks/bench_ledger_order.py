"""What the ledger's one Renyi order costs honest sites: noise of the product's default plans, best order vs the order.

    .venv/bin/python tests/benchmarks/bench_ledger_order.py

For each budget (epsilon 0.5 to 20) and site size (300 to 60,000 records), the site's own planner
(``client.budget.make_plan``) makes the product's default plan twice: with the dataset's total read at the best of
RDP_ORDERS (the ledger's rule until 2026-12-07) and at the ledger's order (``client.ledger_order``). The prior is
the ledger's noisy-size release; delta is the default a site of that size gets (``client.site_delta``, its noise
drawn as 0). Plans: the DP-GAN (10 rounds x 60 D steps at expected batch 256, 120 at a site of 10,000 records or
more), the statistics mode (10 x 30 DP-SGD steps at 256, 30 % of epsilon for the statistics, clip bounds
chosen privately), and the statistics mode with a net the coordinator provides (one Gaussian release). Printed as
a table and written to tests/benchmarks/results/ledger_order.json. Pure accounting: about a minute on one core.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from client.budget import PlanRequest, make_plan  # noqa: E402
from client.ledger_order import ledger_order  # noqa: E402
from client.refusal import Refusal  # noqa: E402
from client.site_delta import delta_from_noisy_size, size_event  # noqa: E402
from client.site_schedule import LARGE_SITE_RECORDS  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "ledger_order.json"
EPSILONS = (0.5, 1.0, 2.0, 4.0, 10.0, 20.0)
SIZES = (300, 2_000, 5_000, 20_000, 60_000)


def request(mode: str, epsilon: float, records: int) -> PlanRequest:
    if mode == "dpgan":
        return PlanRequest(mode="dpgan", epsilon=epsilon, rounds=10,
                           steps=120 if records >= LARGE_SITE_RECORDS else 60, batch_size=256)
    if mode == "bnstats-net":  # a net the coordinator provides: one Gaussian release of the statistics
        return PlanRequest(mode="bnstats", epsilon=epsilon, rounds=0, steps=1, batch_size=1, census=False)
    return PlanRequest(mode="bnstats", epsilon=epsilon, rounds=10, steps=30, batch_size=256, stats_share=0.3,
                       auto_clip=True)


def noise(plan) -> float:
    """The tuned noise of a plan: DP-SGD's where it trains, else the statistics release's."""
    return plan.train_sigma if plan.train_sigma else plan.stats.noise_multiplier


def main() -> int:
    logging.disable(logging.WARNING)
    rows = []
    for epsilon in EPSILONS:
        for mode in ("dpgan", "bnstats", "bnstats-net"):
            for records in SIZES:
                delta = delta_from_noisy_size(records)
                order = ledger_order(epsilon, delta, sized=True)  # (delta read off the noisy size)
                req, prior = request(mode, epsilon, records), [size_event()]
                plans = []
                for at in (None, order):
                    try:
                        plans.append(make_plan(req, num_records=records, delta=delta, budget=epsilon, prior=prior,
                                               order=at))
                    except Refusal as refusal:  # (noise above MAX_USEFUL_NOISE: nothing would be learned)
                        plans.append(refusal)
                if any(isinstance(plan, Refusal) for plan in plans):
                    refused = [isinstance(plan, Refusal) for plan in plans]
                    rows.append({"epsilon": epsilon, "mode": mode, "records": records, "order": order,
                                 "refused_best_order": refused[0], "refused_ledger_order": refused[1]})
                    print(f"eps {epsilon:>4g} {mode:7s} n {records:>6,}  refused: best order {refused[0]}, "
                          f"ledger order {refused[1]}", flush=True)
                    continue
                best, fixed = plans
                row = {"epsilon": epsilon, "mode": mode, "records": records, "delta": delta, "order": order,
                       "sigma_best_order": noise(best), "sigma_ledger_order": noise(fixed),
                       "noise_ratio": noise(fixed) / noise(best),
                       "run_epsilon_best_order": best.planned_epsilon,
                       "run_epsilon_ledger_order": fixed.planned_epsilon}
                rows.append(row)
                print(f"eps {epsilon:>4g} {mode:11s} n {records:>6,}  order {order:>4g}  sigma {noise(best):7.4f} "
                      f"-> {noise(fixed):7.4f}  x{row['noise_ratio']:.3f}   run epsilon "
                      f"{best.planned_epsilon:.3f} -> {fixed.planned_epsilon:.3f}", flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "tests/benchmarks/bench_ledger_order.py", "rows": rows}, indent=1))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
