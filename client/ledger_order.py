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
ledger's budget and delta, for a site of REFERENCE_RECORDS (10,000) records, or, where delta was read off the
ledger's own noisy size (``client.site_delta``: about 1/(10 n)), of the size it stands for, 1/(10 delta), if larger.
An operator's delta says nothing of the size (review s64: read as one, delta 1e-7 took the order of a site of a
million records, x1.74 the noise at 2,000). It reads the budget and delta only: public configuration, or
post-processing of the noisy size the ledger charged first. Golden numbers: 2.9 at epsilon 10 and 18 at epsilon 1
(delta 1e-5), 2.7 at epsilon 10 for a site of 20,000 records under its default delta.

What it costs honest sites against the best order of each plan, as noise (``tests/benchmarks/bench_ledger_order.py``,
the product's default plans made by the site's own planner, prior the noisy-size release, delta the default of the
site's size; results/ledger_order.json):

  - DP-GAN: x1.000 at every size from 2,000 to 60,000 records at epsilon 0.5-4, and from 5,000 up at 10 and 20;
    x1.012 (2,000 records) and x1.021 (300) at epsilon 10; x1.015 and x1.035 at 20.
  - Statistics mode, net trained: x1.000-1.022 at small sites (x1.051 at 300 records and epsilon 20); at 20,000
    records x1.087 at epsilon 2, x1.031 at 4, x1.005 at 10 (its 300 DP-SGD steps want a higher order).
  - Statistics mode, net provided (one Gaussian release, which wants the order of a single Gaussian): x1.000-1.022
    up to 5,000 records; x1.086 at 20,000 and x1.22 at 60,000 records at epsilon 10; x1.19-1.38 at 60,000 and
    epsilon 1-4. With distributed noise the sum carries more again: each site's share keeps the public floor of
    the best order (``client.bn_site.noise_share``), so its extra noise goes straight into the sum.

Plans far from the reference pay more: few steps with noise multipliers below 1 (e.g. 10 steps at rate 0.001) up
to x1.36 at epsilon 1 and x1.19 at epsilon 10 (calibrate_noise_multiplier at the order against the best order, after
a census, in review s64), and the tests' 2 x 4-step plans spend 8.4-8.5 of a budget of 10 at their best order. The
alternatives cost more where it matters: a reference fixed at 10,000
records x1.058 at 60,000 records and epsilon 10 and x1.20 at epsilon 1; the order of a single Gaussian release
filling the budget (review s63's proposal) x1.04-1.08 at 20,000-60,000 records and epsilon 10; a union bound over
all 162 orders (delta split 162 ways) up to x1.27.

A run's own epsilon (the cap a run asks for, ``planned_epsilon``, and what a report prints as spent) is still read
at the best order: it describes one run's fixed plan, and a cap can only refuse more than the filter does.

Budget changes (:func:`order_in_force`). The order never rises. When the operator changes the budget, the rule's
order for the new budget takes over where it is lower and allows at least the Renyi divergence the order in force
allowed under every budget it was in force with: divergence never grows as the order falls, so everything released
stays within the new order's allowance and the filter's condition carries over (a budget raised from 1 to 10 at
delta 1e-5 moves the order from 18 to 2.9; review s64: kept at 18, a run of epsilon 9 got 2.7 times the noise).
Otherwise the order stays; a budget lowered below what it needs before it can hold anything (epsilon 5.08 at order
2.9 and delta 1e-5) has every release refused, with that reason. Each (order, budget) in force at a charge is
recorded in the ledger (its order lines), so the condition reads every budget an order was in force with at a
charge. Left open (review s64's third): whether a budget is recorded depends on whether a charge came while it was
in force, which the coordinator chooses; when the operator changes the budget several times while requests come in,
that choice can decide between two orders (a budget of 3.11, then 3.13, then 3.175: order 7.0 if a request came
under 3.13, else 6.8), and no single order covers both outcomes. The reviewer's search over budget triples from 2.80
to 3.20 found the largest excess at 0.0055 in epsilon. A ledger whose budget never changes is not affected.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from common import protocol as P
from common.accounting import (RDP_ORDERS, BudgetTooSmall, DPEvent, calibrate_noise_multiplier, epsilon_for,
                               rdp_to_epsilon)

# The reference plan the order is chosen for (tests/test_ledger_order.py checks these against the product's
# defaults): a site of client.site_schedule.LARGE_SITE_RECORDS records on the DP-GAN's longer schedule.
REFERENCE_RECORDS = 10_000
REFERENCE_BATCH = 256
REFERENCE_STEPS = 10 * 120  # rounds x D steps per round


def reference_records(delta: float, sized: bool = True) -> int:
    """The site size the order is chosen for: with ``sized`` (delta read off the ledger's noisy size,
    ``client.site_delta``) the size delta stands for, 1/(10 delta), at least REFERENCE_RECORDS; else (an operator's
    delta, which says nothing of the size) REFERENCE_RECORDS."""
    return max(REFERENCE_RECORDS, round(1.0 / (10.0 * delta))) if sized else REFERENCE_RECORDS


def allowance(order: float, budget: float, delta: float) -> float:
    """The Renyi divergence at ``order`` that ``budget`` allows at ``delta`` (its epsilon less the conversion's own
    cost there; at most 0: nothing fits)."""
    return budget - rdp_to_epsilon(0.0, order, delta)


def order_in_force(orders: tuple[tuple[float, float], ...], budget: float, delta: float, sized: bool) -> float | None:
    """The order the ledger's next charge is read at, given its order lines ((order, budget in force), oldest first).

    None recorded: the rule's (:func:`ledger_order`). Else the last line's, unless the operator changed the budget
    and the rule's order for the new one is lower and allows at least the Renyi divergence the last order allowed
    under any budget it was in force with: then every record's divergence at the new order, over everything
    released, stays within the new allowance (divergence never grows as the order falls, so what the last order
    held below its allowance holds below it at the new order too), and the filter's condition carries over. A
    budget raised from 1 to 10 at delta 1e-5 moves the order from 18 to 2.9; one lowered keeps it."""
    wanted = ledger_order(budget, delta, sized)
    if not orders or wanted is None or budget == orders[-1][1]:
        return wanted if not orders else orders[-1][0]
    current = orders[-1][0]
    since = [b for _, b in _last_run(orders)]
    held = max(allowance(current, b, delta) for b in since)
    return wanted if wanted < current and allowance(wanted, budget, delta) >= held else current


def _last_run(orders: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    """The order lines since the order in force was set (the budgets it has been in force with)."""
    out = []
    for line in reversed(orders):
        if line[0] != orders[-1][0]:
            break
        out.append(line)
    return out


@lru_cache(maxsize=256)
def ledger_order(epsilon_budget: float, delta: float, sized: bool = False) -> float | None:
    """The Renyi order a ledger with this budget and delta composes its total at (module docstring; ``sized``: delta
    was read off the ledger's noisy size, :func:`reference_records`); None for an unlimited budget (nothing is ever
    refused, so no stopping rule needs one)."""
    if not math.isfinite(epsilon_budget):
        return None
    if not epsilon_budget > 0:  # a site that releases nothing: any order refuses everything
        return float(RDP_ORDERS[-1])
    q = REFERENCE_BATCH / reference_records(delta, sized)
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
