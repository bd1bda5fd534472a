"""The one Renyi order at which a site's ledger composes its total, fixed when the ledger is made.

Why one order. A ledger is a stopping rule: it allows a release while the dataset's total stays within the
site's budget, and the coordinator chooses each next release after seeing the earlier ones (and the site's own
planner chooses noise and sampling rate from earlier DP outputs: the census, the noisy size behind delta). The
proven guarantee for such a rule, the Renyi filter of Feldman & Zrnic (2021), holds when the total is compared at
ONE order fixed before the releases: a sequence whose Renyi divergences at that order sum to at most B is
(order, B)-RDP however each release was chosen, and so (epsilon, delta)-DP by the usual conversion. Taking the best
of many orders after the fact -- right for a fixed list of releases, and what the ledger did until 2026-12-07 --
lets the releases' outputs pick the order, which no theorem covers (review s58; review s63 measured the adaptive
gain at 1.5x a single plan's true delta, still 0.30x the ledger's delta, but measured is not proven).

Which order. The best order depends on the releases: a few large-noise releases at small epsilon want a high one (18
at epsilon 1), many subsampled DP-SGD steps at large epsilon a low one (2.6-3.4 at epsilon 10, lower for larger
sites). The rule takes the order at which the product's default DP-GAN plan -- its census and 10 rounds x 120
DP-SGD steps at expected batch 256, the schedule of a large site (``client.site_schedule``) -- is cheapest at the
ledger's budget and delta, for a site of the size delta stands for (1/(10 delta) records, at least 10,000: a site's
default delta is about 1/(10 n), ``client.site_delta``). It reads the budget and delta only: public configuration,
or post-processing of the noisy size the ledger charged first. Golden numbers: 2.9 at epsilon 10 and 18 at epsilon 1
(delta 1e-5), 2.7 at epsilon 10 for a site of 20,000 records.

What it costs honest sites against the best order of each plan, as DP-SGD noise (``tests/benchmarks/
bench_ledger_order.py``, the product's default plans made by the site's own planner, prior the noisy-size release,
delta the default of the site's size; results/ledger_order.json):

  - DP-GAN: x1.000 at every size from 2,000 to 60,000 records at epsilon 0.5-4, and from 5,000 up at 10 and 20;
    x1.012 (2,000 records) and x1.021 (300) at epsilon 10; x1.015 and x1.035 at 20.
  - Statistics mode: the same for small sites (x1.000-1.022, x1.051 at 300 records and epsilon 20); at 20,000
    records x1.087 at epsilon 2, x1.031 at 4, x1.005 at 10 (its 300 DP-SGD steps want a higher order than the
    reference plan's 1,200).

Plans far from the reference pay more: few steps with noise multipliers below 1 (e.g. 10 steps at rate 0.001) up
to x1.36 at epsilon 1 and x1.19 at epsilon 10 (/work/exp/s64/offplans.py). The alternatives cost more where it
matters: a fixed reference of 10,000 records x1.058 at 60,000 records and epsilon 10 and x1.20 at epsilon 1; the
order of a single Gaussian release filling the budget (review s63's proposal) x1.04-1.08 at 20,000-60,000 records
and epsilon 10; a union bound over all 162 orders (delta split 162 ways) up to x1.27.

A run's own epsilon (the cap a run asks for, ``planned_epsilon``, and what a report prints as spent) is still read
at the best order: it describes one run's fixed plan, and a cap can only refuse more than the filter does. The
order is fixed once for the ledger's life: an operator who lowers the budget below what the order can hold at delta
(e.g. epsilon 5.08 at order 2.9 and delta 1e-5) has every release refused, with that reason.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from common import protocol as P
from common.accounting import RDP_ORDERS, BudgetTooSmall, DPEvent, calibrate_noise_multiplier, epsilon_for

# The reference plan the order is chosen for (tests/test_ledger_order.py checks these against the product's
# defaults): a site of client.site_schedule.LARGE_SITE_RECORDS records on the DP-GAN's longer schedule.
REFERENCE_RECORDS = 10_000
REFERENCE_BATCH = 256
REFERENCE_STEPS = 10 * 120  # rounds x D steps per round


def reference_records(delta: float) -> int:
    """The site size the order is chosen for: the size ``delta`` stands for (1/(10 delta): a site's default delta is
    at most 1/(10 n)), at least REFERENCE_RECORDS."""
    return max(REFERENCE_RECORDS, round(1.0 / (10.0 * delta)))


@lru_cache(maxsize=256)
def ledger_order(epsilon_budget: float, delta: float) -> float | None:
    """The Renyi order a ledger with this budget and delta composes its total at (module docstring); None for an
    unlimited budget (nothing is ever refused, so no stopping rule needs one)."""
    if not math.isfinite(epsilon_budget):
        return None
    if not epsilon_budget > 0:  # a site that releases nothing: any order refuses everything
        return float(RDP_ORDERS[-1])
    q = REFERENCE_BATCH / reference_records(delta)
    census = DPEvent(P.CENSUS_NOISE, 1.0, 1)
    try:
        sigma = calibrate_noise_multiplier(epsilon_budget, delta, q, REFERENCE_STEPS, prior=[census], tol=1e-3)
        events = [census, DPEvent(sigma, q, REFERENCE_STEPS)]
    except BudgetTooSmall:  # a budget below the census's own epsilon: the order of one Gaussian release filling it
        try:
            events = [DPEvent(calibrate_noise_multiplier(epsilon_budget, delta, 1.0, 1, tol=1e-3), 1.0, 1)]
        except BudgetTooSmall:  # a budget nothing fits (every release will be refused): the largest order
            return float(RDP_ORDERS[-1])
    epsilons = np.array([epsilon_for(events, delta, order) for order in RDP_ORDERS])
    return float(RDP_ORDERS[int(np.argmin(epsilons))])
