"""Privacy accounting for fedsynth: RDP composition of (subsampled) Gaussian releases.

Every number a site releases is described by one or more :class:`DPEvent` (a noise multiplier, a
sampling rate and a number of compositions). :func:`epsilon_for` composes any list of events with
Renyi DP (Opacus' analysis of the Poisson-subsampled Gaussian, Mironov et al. 2019, converted to
(epsilon, delta) with Balle et al. 2020, Thm 21), under add/remove-one adjacency: at the best of
RDP_ORDERS by default, or at one given ``order`` (a site's ledger composes its total at one order fixed when
the ledger was made: ``client.ledger_order``).
:func:`calibrate_noise_multiplier` finds the smallest noise that keeps a planned release within a
target epsilon, given what was already spent.

Adjacency: ONE record (an image and its label) added to or removed from ONE site's data, training or
held-out. That is what every release is calibrated to, and it matches what leaves a site: no reply
carries the site's record count n -- under add/remove-one adjacency n itself is private -- so FedAvg
weights are a noisy census (``client.census``), the sampling rate q = B/n, the noise multiplier and the
spent epsilon stay at the site, and delta comes from the site's own config (default min(1e-5, 1/(10 n~)) for
a noisy size n~, fixed in its ledger: ``client.site_delta``). ``tests/test_hostile_coordinator.py`` measures,
for every released quantity, the largest change one added record makes and checks it against the sensitivity
the noise is scaled to.

Pure math, no I/O; used by the site's budget planner (``client.budget``) and ledger (``client.ledger``).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp

__all__ = [
    "BudgetTooSmall",
    "DPEvent",
    "MAX_NOISE_MULTIPLIER",
    "RDP_ORDERS",
    "calibrate_noise_multiplier",
    "default_delta",
    "epsilon_for",
    "rdp_at_order",
    "rdp_to_epsilon",
]

# Opacus' default orders (1.1 ... 10.9, 12 ... 63) extended upwards. Large orders matter when the
# noise is large and few steps are taken (e.g. one-shot noisy statistics, small epsilon): with
# orders only up to 63 the conversion term log(1/delta)/(alpha-1) alone keeps epsilon above ~0.12
# at delta=1e-5 however much noise is added. Every order gives a valid bound, so adding orders can
# only tighten epsilon. 1024 is the largest integer order whose binomial coefficients still fit in
# a float64 in Opacus' integer-order formula.
RDP_ORDERS: tuple[float, ...] = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS) + (
    64.0, 80.0, 96.0, 128.0, 160.0, 192.0, 256.0, 384.0, 512.0, 768.0, 1024.0,
)
_ORDERS = np.array(RDP_ORDERS)

# The largest noise multiplier calibrate_noise_multiplier will consider; if even this cannot meet
# the target, the target is treated as unreachable.
MAX_NOISE_MULTIPLIER = 1e4


class BudgetTooSmall(ValueError):
    """A target epsilon cannot be met by any noise multiplier up to ``MAX_NOISE_MULTIPLIER``."""


@dataclass(frozen=True)
class DPEvent:
    """One kind of DP release: `steps` compositions of the (Poisson-)subsampled Gaussian mechanism with noise
    multiplier `noise_multiplier` (noise std / L2 sensitivity) and sampling rate `sample_rate` (1.0 = no
    subsampling, e.g. a one-shot release of noisy statistics)."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        sigma, q, steps = self.noise_multiplier, self.sample_rate, self.steps
        if not (isinstance(sigma, numbers.Real) and math.isfinite(sigma) and sigma >= 0):
            raise ValueError(
                f"DPEvent.noise_multiplier must be a finite number >= 0 (0 means no noise), got {sigma!r}"
            )
        if not (isinstance(q, numbers.Real) and math.isfinite(q) and 0.0 <= q <= 1.0):
            raise ValueError(f"DPEvent.sample_rate must be in [0, 1] (1 = no subsampling), got {q!r}")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"DPEvent.steps must be an integer >= 0, got {steps!r}")
        # Normalise types so that equal events compare and hash equal (and cache together).
        object.__setattr__(self, "noise_multiplier", float(sigma))
        object.__setattr__(self, "sample_rate", float(q))
        object.__setattr__(self, "steps", int(steps))

    @property
    def releases_anything(self) -> bool:
        """False when the event touches no data (no steps, or a sampling rate of 0) and so costs nothing."""
        return self.steps > 0 and self.sample_rate > 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict; inverse of :meth:`from_dict`."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, d: dict) -> DPEvent:
        """Rebuild an event from :meth:`to_dict` output; raises ValueError naming what is missing or wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"a DPEvent must be a dict with noise_multiplier, sample_rate, steps; got {d!r}")
        missing = [k for k in ("noise_multiplier", "sample_rate", "steps") if k not in d]
        if missing:
            raise ValueError(f"DPEvent dict {d!r} lacks {', '.join(missing)}")
        return cls(noise_multiplier=d["noise_multiplier"], sample_rate=d["sample_rate"], steps=d["steps"])


@lru_cache(maxsize=8192)
def _rdp_curve_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of ONE step of the subsampled Gaussian at every order of RDP_ORDERS (read-only array).

    Cached because the same (sigma, q) recurs every round and the per-order series is slow (~10 ms).
    """
    curve = np.asarray(
        opacus_rdp.compute_rdp(
            q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
        ),
        dtype=float,
    )
    curve.setflags(write=False)
    return curve


@lru_cache(maxsize=65536)
def _rdp_one_step_at(noise_multiplier: float, sample_rate: float, order: float) -> float:
    """RDP of ONE step of the subsampled Gaussian at ``order`` alone: the same number as that order's entry of
    :func:`_rdp_curve_one_step` (Opacus computes each order on its own), at 1/162 of its cost. A ledger and the
    planner read the total at one order (the Renyi filter), and a calibration at that order tries dozens of noise
    levels: with the whole curve for each, plans took most of the demo's rounds (profiled, 2026-12-07)."""
    return float(opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=[order])[0])


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, numbers.Real) and 0.0 < delta < 1.0):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}; use default_delta(n) for n records")


_ORDER_INDEX = {order: i for i, order in enumerate(RDP_ORDERS)}


def _mechanisms(events: Sequence[DPEvent]) -> dict[tuple[float, float], int]:
    """Total steps per (sigma, q): RDP composes additively, so only the total steps of a mechanism matter."""
    steps_by_mechanism: dict[tuple[float, float], int] = defaultdict(int)
    for event in events:
        if not isinstance(event, DPEvent):
            raise TypeError(f"epsilon_for expects DPEvent objects, got {type(event).__name__}")
        if event.releases_anything:
            steps_by_mechanism[(event.noise_multiplier, event.sample_rate)] += event.steps
    return steps_by_mechanism


def _check_order(order: float) -> None:
    # One of RDP_ORDERS only: Opacus' series for the subsampled Gaussian is checked there (review s64 compared it
    # with an independent integration), but goes negative or NaN at some fractional orders above 63 and at orders
    # above 1024 (review s64: -0.574 per step at order 100.5, sigma 20, q 0.5), which would let a ledger read at
    # such an order release without limit.
    if not (isinstance(order, numbers.Real) and float(order) in _ORDER_INDEX):
        raise ValueError(f"a Renyi order must be one of common.accounting.RDP_ORDERS, got {order!r}")


def rdp_at_order(events: Sequence[DPEvent], order: float) -> float:
    """The Renyi divergence bound of the composition of ``events`` at ``order``, one of RDP_ORDERS (inf if any
    release is noiseless)."""
    _check_order(order)
    mechanisms = _mechanisms(events)
    if any(sigma == 0.0 for sigma, _ in mechanisms):
        return math.inf
    order = float(order)
    return float(sum(steps * _rdp_one_step_at(sigma, q, order) for (sigma, q), steps in mechanisms.items()))


def rdp_to_epsilon(rdp: float, order: float, delta: float) -> float:
    """Epsilon at ``delta`` of a mechanism that is (``order``, ``rdp``)-RDP: the conversion :func:`epsilon_for` uses
    (Balle et al. 2020, Thm 21), linear in ``rdp``; not clamped at 0 (with ``rdp`` 0 it is the conversion's own
    cost at that order, e.g. 5.07 at order 2.9 and delta 1e-5)."""
    _check_delta(delta)
    if not (isinstance(order, numbers.Real) and 1.0 < order < math.inf):
        raise ValueError(f"a Renyi order must be a number > 1, got {order!r}")
    # (Opacus' get_privacy_spent, term for term)
    return float(rdp - (np.log(delta) + np.log(order)) / (order - 1) + np.log((order - 1) / order))


def epsilon_for(events: Sequence[DPEvent], delta: float, order: float | None = None) -> float:
    """Epsilon of the composition of all `events` at `delta` (RDP accounting, add/remove-one adjacency).

    ``order=None``: the smallest epsilon over RDP_ORDERS (right for a fixed list of releases). ``order``: the
    conversion at that one order (right for a stopping rule over adaptively chosen releases, the Renyi filter of
    Feldman & Zrnic 2021: a site's ledger). Returns 0.0 for no events (or only events that touch no data) and
    math.inf if any event releases data without noise (noise_multiplier == 0).
    """
    _check_delta(delta)
    steps_by_mechanism = _mechanisms(events)
    if not steps_by_mechanism:
        return 0.0
    if any(sigma == 0.0 for sigma, _ in steps_by_mechanism):
        return math.inf
    if order is not None:  # (the conversion the ledger's share of its budget reads too: rdp_to_epsilon)
        return max(rdp_to_epsilon(rdp_at_order(events, order), order, delta), 0.0)
    total = np.zeros_like(_ORDERS)
    for (sigma, q), steps in steps_by_mechanism.items():
        total = total + steps * _rdp_curve_one_step(sigma, q)
    with warnings.catch_warnings():
        # Opacus warns when the optimum is at the first/last order; the bound is still valid (just
        # not the tightest possible), and RDP_ORDERS already spans the useful range.
        warnings.simplefilter("ignore")
        eps, _ = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    eps = float(eps)
    if math.isnan(eps):  # cannot happen with sigma > 0; fail safe (never report less than spent)
        return math.inf
    # The conversion can dip slightly below 0 for negligible releases; epsilon is never negative.
    return max(eps, 0.0)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prior: Sequence[DPEvent] = (),
    tol: float = 0.01,
    order: float | None = None,
) -> float:
    """Smallest noise multiplier (within relative `tol`) keeping prior + the planned release within target.

    The planned release is ``DPEvent(sigma, sample_rate, steps)``; the returned sigma always satisfies
    ``epsilon_for([*prior, DPEvent(sigma, sample_rate, steps)], delta) <= target_epsilon`` (bisection keeps
    the feasible end of the bracket; ``order``: epsilon at that one order, as :func:`epsilon_for`).
    Returns 0.0 (no noise, non-private) when target_epsilon is inf.

    Raises:
        BudgetTooSmall: the prior events alone already reach the target, or even a noise multiplier of
            MAX_NOISE_MULTIPLIER cannot meet it.
        ValueError: invalid arguments.
    """
    _check_delta(delta)
    if target_epsilon == math.inf:
        return 0.0
    if not (isinstance(target_epsilon, numbers.Real) and target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ValueError(f"target_epsilon must be > 0 (or math.inf for no privacy), got {target_epsilon!r}")
    if not (isinstance(sample_rate, numbers.Real) and 0.0 < sample_rate <= 1.0):
        raise ValueError(f"sample_rate must be in (0, 1] to calibrate noise for it, got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 to calibrate noise for it, got {steps!r}")
    if not (0.0 < tol < 1.0):
        raise ValueError(f"tol is a relative tolerance and must be in (0, 1), got {tol!r}")
    prior = list(prior)

    def epsilon_with(sigma: float) -> float:
        return epsilon_for([*prior, DPEvent(sigma, sample_rate, steps)], delta, order)

    prior_epsilon = epsilon_for(prior, delta, order)
    plan = f"{steps} step(s) at sample rate {sample_rate:g}"
    if prior_epsilon >= target_epsilon:
        raise BudgetTooSmall(
            f"target epsilon {target_epsilon:g} (delta {delta:g}) is already used up: the releases before it cost "
            f"epsilon {prior_epsilon:.4g}, so no noise level leaves room for {plan}. "
            "Raise the privacy budget or skip this release."
        )
    best_possible = epsilon_with(MAX_NOISE_MULTIPLIER)
    if best_possible > target_epsilon:
        raise BudgetTooSmall(
            f"target epsilon {target_epsilon:g} (delta {delta:g}) cannot be met for {plan}: the releases before it "
            f"cost epsilon {prior_epsilon:.4g} and even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives "
            f"{best_possible:.4g}. Use fewer rounds or steps, or a larger budget."
        )

    # Bracket [lo, hi] with epsilon_with(lo) > target >= epsilon_with(hi), starting at sigma = 1.
    hi = 1.0
    if epsilon_with(hi) <= target_epsilon:
        lo = hi / 2
        while epsilon_with(lo) <= target_epsilon:
            hi, lo = lo, lo / 2
            if lo < 1e-6:  # a huge target: any tiny noise is enough, stop searching
                return hi
    else:
        lo = hi
        hi = min(2 * hi, MAX_NOISE_MULTIPLIER)
        while epsilon_with(hi) > target_epsilon:
            lo, hi = hi, min(2 * hi, MAX_NOISE_MULTIPLIER)
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if epsilon_with(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi


def default_delta(num_records: int) -> float:
    """Default delta for a dataset of `num_records` records: min(1e-5, 1/(10 n)), i.e. at most 1/(10 n)."""
    if isinstance(num_records, bool) or not isinstance(num_records, (int, np.integer)) or num_records < 1:
        raise ValueError(f"num_records must be a positive integer, got {num_records!r}")
    return min(1e-5, 1.0 / (10.0 * int(num_records)))
