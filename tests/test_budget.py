"""The site's budget planner: every release of a run within its epsilon, everything ever within the budget."""

from __future__ import annotations

import math

import pytest

from client.budget import PlanRequest, load_or_make_plan, make_plan
from client.refusal import Refusal
from common import protocol as P
from common.accounting import DPEvent, epsilon_for

DELTA = 1e-5
GAN = PlanRequest(mode="dpgan", epsilon=10.0, rounds=10, steps=60, batch_size=256)


def _plan(req: PlanRequest, prior=(), budget=math.inf, n=20000):
    return make_plan(req, num_records=n, delta=DELTA, budget=budget, prior=list(prior))


def test_a_gan_plan_ends_within_the_runs_epsilon_with_everything_it_may_release():
    plain = _plan(GAN)
    events = plain.all_events(10, 60)
    assert events[0] == DPEvent(P.CENSUS_NOISE, 1.0, 1)  # the census is part of the plan
    assert 9.8 < epsilon_for(events, DELTA) <= 10.0
    with_queries = _plan(PlanRequest(**{**GAN.__dict__, "evaluation_queries": 2, "audit_queries": 1}))
    events = with_queries.all_events(10, 60)
    queries = [e for e in events if e.sample_rate == 1.0 and e.noise_multiplier in (P.EVALUATION_NOISE, P.AUDIT_NOISE)]
    assert len(queries) == 3  # two evaluation queries and one audit query, reserved
    assert epsilon_for(events, DELTA) <= 10.0  # the reserved queries are inside the run's epsilon...
    assert with_queries.train_sigma >= plain.train_sigma  # ...paid for with (at most) a little more DP-SGD noise


def test_a_statistics_plan_shares_epsilon_and_a_provided_net_gives_the_statistics_all_of_it():
    trained = _plan(PlanRequest(mode="bnstats", epsilon=10.0, rounds=10, steps=30, batch_size=256, stats_share=0.3,
                                auto_clip=True))
    events = trained.all_events(10, 30)
    assert trained.clip_choice is not None and epsilon_for(events, DELTA) <= 10.0
    assert epsilon_for([trained.clip_choice, trained.stats], DELTA) == pytest.approx(3.0, rel=0.02)
    provided = _plan(PlanRequest(mode="bnstats", epsilon=10.0, rounds=0, steps=1, batch_size=1, census=True))
    assert provided.census is None and provided.train_sigma == 0.0  # no training: no census, no DP-SGD
    assert 9.8 < epsilon_for(provided.all_events(0, 1), DELTA) <= 10.0


def test_spending_before_the_run_shrinks_the_run_to_the_budget_left():
    prior = [DPEvent(0.8, 0.01, 2000)]
    plan = _plan(GAN, prior=prior, budget=10.0)
    assert plan.budget_limited
    assert epsilon_for(prior + plan.all_events(10, 60), DELTA) <= 10.0 + 1e-9
    assert plan.train_sigma > _plan(GAN).train_sigma


def test_a_plan_that_cannot_fit_is_refused_without_naming_the_budget():
    with pytest.raises(Refusal) as info:
        _plan(GAN, budget=0.01)
    assert info.value.code == P.REFUSED_BUDGET and not any(ch.isdigit() for ch in info.value.public)
    assert "0.01" in info.value.detail  # the site's own log gets the numbers


def test_a_non_private_run_needs_an_unlimited_budget_at_the_site():
    free = _plan(PlanRequest(mode="dpgan", epsilon=math.inf, rounds=1, steps=5, batch_size=32))
    assert free.train_sigma == 0.0 and math.isinf(free.planned_epsilon)
    capped = _plan(PlanRequest(mode="dpgan", epsilon=math.inf, rounds=1, steps=5, batch_size=32), budget=2.0)
    assert capped.train_sigma > 0 and capped.planned_epsilon <= 2.0  # the site's budget wins


def test_the_plan_is_fixed_at_the_first_request(tmp_path):
    path = tmp_path / "plan.json"
    first, made = load_or_make_plan(path, GAN, num_records=20000, delta=DELTA, budget=10.0, prior=[])
    again, made_again = load_or_make_plan(path, GAN, num_records=20000, delta=DELTA, budget=10.0, prior=[])
    assert made and not made_again and again == first
    with pytest.raises(Refusal, match="changes settings fixed at the run's first request"):
        load_or_make_plan(path, PlanRequest(**{**GAN.__dict__, "steps": 600}), num_records=20000, delta=DELTA,
                          budget=10.0, prior=[])


def test_a_site_takes_the_longer_gan_schedule_only_where_its_noisy_census_says_it_is_large():
    from client.site_schedule import LARGE_SITE_RECORDS, choose_local_steps

    def chosen(records: float, epsilon: float) -> int:  # the product's schedule: 10 rounds of 60 or 120 steps
        return choose_local_steps(60, 120, epsilon=epsilon, noisy_counts=[records / 10] * 10)[0]

    assert LARGE_SITE_RECORDS == 10_000
    # MNIST's and CIFAR-10's sites (~11,000-28,000 records) at either budget; PneumoniaMNIST's (283-2,429) never
    assert [chosen(n, 10.0) for n in (28000, 20000, 10000, 9999, 5000, 2200, 283)] == [120, 120, 120, 60, 60, 60, 60]
    assert [chosen(n, 1.0) for n in (20000, 11000, 2200)] == [120, 120, 60]
    assert chosen(300, math.inf) == 120  # no noise to grow
    assert choose_local_steps(60, 60, epsilon=10.0, noisy_counts=[1e6])[0] == 60  # no longer schedule offered
    # a census that came out negative or tiny is a small site, never a division by zero
    assert chosen(-500, 10.0) == 60


def test_a_large_site_takes_the_extra_generator_steps_and_no_other_site_does():
    from client.site_schedule import LARGE_SITE_RECORDS, choose_g_steps

    def g(records: float, *, long_g: int = 2) -> int:
        return choose_g_steps(1, long_g, noisy_counts=[records / 10] * 10)

    assert LARGE_SITE_RECORDS == 10_000
    assert g(20000) == 2 and g(10000) == 2  # large: on either D schedule (the D steps taken do not enter)
    assert g(9999) == 1 and g(2200) == 1 and g(-500) == 1  # small sites (PneumoniaMNIST's) keep one
    assert g(20000, long_g=1) == 1  # nothing offered
    assert choose_g_steps(3, 5, noisy_counts=[1e5]) == 5
