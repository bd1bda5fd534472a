"""Tests for common.accounting: golden numbers from Opacus' RDP analysis and calibration guarantees."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant
from scipy.stats import norm

from common.accounting import (
    MAX_NOISE_MULTIPLIER,
    RDP_ORDERS,
    BudgetTooSmall,
    DPEvent,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_for,
)

DELTA = 1e-5


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float, alphas=None) -> float:
    """Epsilon from Opacus' own RDPAccountant, fed step by step like an optimizer would."""
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta, alphas=alphas)


def test_golden_epsilon_matches_opacus_rdp_accountant():
    eps = epsilon_for([DPEvent(1.1, 0.01, 100)], DELTA)
    assert eps == pytest.approx(0.956, abs=5e-4)
    # The optimum lies inside Opacus' default orders, so the extra large orders change nothing.
    assert eps == pytest.approx(_opacus_epsilon([(1.1, 0.01, 100)], DELTA), rel=1e-12)


def test_mixed_events_match_opacus_with_same_orders():
    history = [(1.1, 0.01, 30), (0.8, 0.02, 20), (1.1, 0.01, 10)]
    events = [DPEvent(s, q, n) for s, q, n in history]
    expected = _opacus_epsilon(history, 1e-6, alphas=list(RDP_ORDERS))
    assert epsilon_for(events, 1e-6) == pytest.approx(expected, rel=1e-9)


def test_calibrate_golden_sigma_for_epsilon_10():
    q, steps = 256 / 20000, 781
    sigma = calibrate_noise_multiplier(10.0, DELTA, q, steps)
    assert sigma == pytest.approx(0.5939, abs=0.01)
    assert epsilon_for([DPEvent(sigma, q, steps)], DELTA) <= 10.0
    # Smallest within the relative tolerance: 1 % less noise already overshoots the target.
    assert epsilon_for([DPEvent(sigma * (1 - 0.01), q, steps)], DELTA) > 10.0


def test_calibrate_tight_tolerance_reproduces_opacus_sigma_table():
    sigma = calibrate_noise_multiplier(10.0, DELTA, 256 / 20000, 781, tol=1e-4)
    assert sigma == pytest.approx(0.5939, abs=1e-3)


def test_composition_of_split_events_equals_merged_event():
    split = epsilon_for([DPEvent(0.9, 0.02, 120), DPEvent(0.9, 0.02, 80)], DELTA)
    merged = epsilon_for([DPEvent(0.9, 0.02, 200)], DELTA)
    assert split == pytest.approx(merged, rel=1e-12)
    assert merged > epsilon_for([DPEvent(0.9, 0.02, 120)], DELTA)


def test_calibrate_with_prior_spending():
    q, steps, target = 0.01, 300, 3.0
    prior = [DPEvent(1.2, 0.01, 500), DPEvent(5.0, 1.0, 1)]
    alone = calibrate_noise_multiplier(target, DELTA, q, steps)
    with_prior = calibrate_noise_multiplier(target, DELTA, q, steps, prior=prior)
    assert with_prior > alone  # less room left, so more noise is needed
    assert epsilon_for([*prior, DPEvent(with_prior, q, steps)], DELTA) <= target
    assert epsilon_for([*prior, DPEvent(with_prior * 0.99, q, steps)], DELTA) > target


def test_calibrate_refuses_when_prior_already_exceeds_target():
    prior = [DPEvent(0.7, 0.05, 1000)]
    spent = epsilon_for(prior, DELTA)
    with pytest.raises(BudgetTooSmall) as info:
        calibrate_noise_multiplier(spent * 0.9, DELTA, 0.01, 10, prior=prior)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert f"{spent:.4g}" in message and "budget" in message


def test_calibrate_refuses_unreachable_target():
    # Even sigma = MAX_NOISE_MULTIPLIER cannot bring a release below ~0.0035 at delta=1e-5.
    assert epsilon_for([DPEvent(MAX_NOISE_MULTIPLIER, 1.0, 1)], DELTA) > 1e-3
    with pytest.raises(BudgetTooSmall, match="fewer rounds or steps"):
        calibrate_noise_multiplier(1e-3, DELTA, 1.0, 1)


def test_infinite_target_and_zero_noise():
    assert calibrate_noise_multiplier(math.inf, DELTA, 0.01, 100) == 0.0
    assert epsilon_for([DPEvent(1.0, 0.01, 10), DPEvent(0.0, 0.01, 1)], DELTA) == math.inf
    assert epsilon_for([], DELTA) == 0.0
    # Events that touch no data cost nothing, even without noise.
    assert epsilon_for([DPEvent(0.0, 0.01, 0), DPEvent(0.0, 0.0, 5)], DELTA) == 0.0


def test_one_shot_gaussian_matches_closed_form_rdp():
    sigma = 4.0
    eps = epsilon_for([DPEvent(sigma, 1.0, 1)], DELTA)
    # RDP of the Gaussian mechanism is alpha / (2 sigma^2); convert with Balle et al. 2020, Thm 21.
    expected = min(
        a / (2 * sigma**2) - (math.log(DELTA) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        for a in RDP_ORDERS
    )
    assert eps == pytest.approx(expected, rel=1e-12)
    # Sound and reasonably tight against the exact privacy profile of the Gaussian mechanism
    # (Balle & Wang 2018): delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s).
    def exact_delta(e: float) -> float:
        return norm.cdf(1 / (2 * sigma) - e * sigma) - math.exp(e) * norm.cdf(-1 / (2 * sigma) - e * sigma)

    assert exact_delta(eps) <= DELTA
    assert exact_delta(0.8 * eps) > DELTA


def test_one_shot_calibration_is_feasible_and_minimal():
    sigma = calibrate_noise_multiplier(1.0, DELTA, 1.0, 1)
    assert epsilon_for([DPEvent(sigma, 1.0, 1)], DELTA) <= 1.0
    assert epsilon_for([DPEvent(sigma * 0.99, 1.0, 1)], DELTA) > 1.0


def test_large_target_needs_little_noise():
    sigma = calibrate_noise_multiplier(200.0, DELTA, 0.01, 10)
    assert 0 < sigma < 0.5
    assert epsilon_for([DPEvent(sigma, 0.01, 10)], DELTA) <= 200.0


def test_default_delta():
    assert default_delta(100) == 1e-5
    assert default_delta(1_000_000) == pytest.approx(1e-7)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="num_records"):
            default_delta(bad)


def test_dp_event_round_trip_and_validation():
    event = DPEvent(1.5, 0.25, 7)
    assert DPEvent.from_dict(event.to_dict()) == event
    assert DPEvent(1, 1, 1) == DPEvent(1.0, 1.0, 1)
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPEvent(-1.0, 0.1, 1)
    with pytest.raises(ValueError, match="sample_rate"):
        DPEvent(1.0, 1.5, 1)
    with pytest.raises(ValueError, match="steps"):
        DPEvent(1.0, 0.1, 2.0)
    with pytest.raises(ValueError, match="lacks steps"):
        DPEvent.from_dict({"noise_multiplier": 1.0, "sample_rate": 0.1})


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="delta"):
        epsilon_for([DPEvent(1.0, 0.1, 1)], 0.0)
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(-1.0, DELTA, 0.1, 10)
    with pytest.raises(ValueError, match="steps"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 0)
    with pytest.raises(ValueError, match="sample_rate"):
        calibrate_noise_multiplier(1.0, DELTA, 0.0, 10)


def test_one_order_alone_is_the_same_number_as_that_order_of_the_whole_curve():
    """rdp_at_order (the ledger's and the planner's one-order reading) computes only its order, where it read the
    whole 162-order curve: the same bits, over noise levels, sampling rates and every order."""
    import random

    from common.accounting import (RDP_ORDERS, _ORDER_INDEX, _mechanisms, _rdp_curve_one_step, _rdp_one_step_at,
                                   rdp_at_order)

    rng = random.Random(0)
    for _ in range(400):
        sigma = rng.choice([rng.uniform(0.3, 3.0), rng.uniform(3.0, 60.0), 20.0])
        q = rng.choice([1.0, rng.uniform(1e-4, 0.5), rng.uniform(0.5, 1.0)])
        order = rng.choice(RDP_ORDERS)
        assert _rdp_one_step_at(sigma, q, order) == _rdp_curve_one_step(sigma, q)[_ORDER_INDEX[order]]
        events = [DPEvent(sigma, q, rng.randint(1, 2000)), DPEvent(20.0, 1.0, 1)]
        whole = sum(steps * _rdp_curve_one_step(sigma, q)[_ORDER_INDEX[order]]  # (the reading before: per mechanism)
                    for (sigma, q), steps in _mechanisms(events).items())
        assert rdp_at_order(events, order) == float(whole)
