"""Why a privacy ledger refused a release, in words for the site's operator (never for the coordinator).

:class:`BudgetExceeded` carries the numbers; :func:`budget_refusal` (the dataset's total would pass the site's
budget) and :func:`run_refusal` (a run's own charges would pass the epsilon the run asked for) write its message.
"""

from __future__ import annotations

import math

from common.accounting import DPEvent, epsilon_for, rdp_to_epsilon

__all__ = ["BudgetExceeded", "budget_refusal", "run_refusal", "share"]


def share(used: float | None) -> str:
    """A share of the budget for people: "42.0 %", "all of it and more" where the budget cannot hold anything at
    the ledger's order, "no limit" without one."""
    if used is None:
        return "no limit"
    return f"{100 * used:.1f} %" if math.isfinite(used) else "all of it and more"


class BudgetExceeded(Exception):
    """A release was refused because it would push the dataset's epsilon past the site's budget.

    The message names the budget and what is left: it is for the site's operator (its log, `fedsynth
    ledger`), never for the coordinator (the site replies with a generic refusal)."""

    def __init__(self, message: str, *, requested_epsilon: float, spent_epsilon: float, budget_epsilon: float,
                 epsilon_after: float, used: tuple[float, float] | None = None) -> None:
        super().__init__(message)
        self.requested_epsilon = requested_epsilon  # epsilon of the refused release on its own
        self.spent_epsilon = spent_epsilon  # epsilon the releases before the request cost (their best order)
        self.budget_epsilon = budget_epsilon
        self.epsilon_after = epsilon_after  # ... and with the request
        # the share of the budget used before and after the request, at the ledger's order (None: a run's cap refused)
        self.used = used


def run_refusal(events: list[DPEvent], *, delta: float, budget: float, purpose: str, run: str, round_: int,
                run_spent: float, run_after: float, run_epsilon: float, spent: float, after: float) -> BudgetExceeded:
    """The refusal of a release that would bring the run's own charges past ``run_epsilon``."""
    requested = epsilon_for(events, delta)
    message = (
        f"run epsilon exceeded: refused the '{purpose}' release (run {run!r}, round {round_}) before doing any "
        f"work. On its own it costs epsilon {requested:.4g}; it would bring the run's own charges from "
        f"{run_spent:.4g} to {run_after:.4g} (delta {delta:g}), above the epsilon {run_epsilon:g} the run "
        "asked for (an attempt that failed or was killed after its charge, or an interrupted one re-sent with "
        "other settings, e.g. a clip bound, is charged again). The run cannot finish here; start a new run."
    )
    return BudgetExceeded(message, requested_epsilon=requested, spent_epsilon=spent, budget_epsilon=budget,
                          epsilon_after=after)


def budget_refusal(events: list[DPEvent], *, delta: float, order: float | None, budget: float, purpose: str,
                   run: str, round_: int, spent: float, after: float, used: tuple[float, float]) -> BudgetExceeded:
    """The refusal of a release that would take the dataset past ``budget`` at the ledger's ``order``; ``used``: the
    share of the budget used before and after it; ``spent``, ``after``: what the releases cost without and with it
    (their best order)."""
    requested = epsilon_for(events, delta)
    if order is not None and budget <= (least := rdp_to_epsilon(0.0, order, delta)):
        message = (f"privacy budget too small: refused the '{purpose}' release (run {run!r}, round {round_}) before "
                   f"doing any work. The site budget, epsilon {budget:g}, is below the {least:.3g} that the ledger's "
                   f"Renyi order {order:g} needs before it can hold any release at delta {delta:g}. The order was "
                   "fixed for the budget the ledger had when it recorded it, and an order never rises "
                   "(client.ledger_order): set epsilon_budget back to at least that, or keep this dataset's ledger "
                   "as it is and release nothing more from it.")
    else:
        at_order = f" at the ledger's Renyi order {order:g}" if order is not None else " at the best Renyi order"
        message = (
            f"privacy budget exceeded: refused the '{purpose}' release (run {run!r}, round {round_}) before "
            f"doing any work. On its own it costs epsilon {requested:.4g}; this dataset's releases so far cost "
            f"{spent:.4g} and use {share(used[0])} of the site budget (epsilon {budget:g} at delta {delta:g}, read"
            f"{at_order}); with it they would use {share(used[1])}. Ask for a smaller release (fewer rounds or "
            "steps, a lower sampling rate or more noise), or, as the site operator, raise epsilon_budget in the site "
            "config (the coordinator cannot)."
        )
    if any(e.noise_multiplier == 0 and e.releases_anything for e in events):
        message += " Non-private releases (noise_multiplier 0) are only allowed with an unlimited budget."
    return BudgetExceeded(message, requested_epsilon=requested, spent_epsilon=spent, budget_epsilon=budget,
                          epsilon_after=after, used=used)
