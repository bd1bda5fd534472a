"""The ledger's one Renyi order (client.ledger_order): golden numbers, its rule's reference plan, the order line a
ledger keeps for its life, the allow rule read at it, and plans made to fit it."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from client.budget import PlanRequest, make_plan
from client.ledger import BudgetExceeded, LedgerDamaged, PrivacyLedger
from client.ledger_refusals import share
from client.ledger_order import (REFERENCE_BATCH, REFERENCE_RECORDS, REFERENCE_STEPS, allowance, ledger_order,
                                 order_in_force, reference_records)
from client.site_delta import least_budget, size_event
from client.site_schedule import LARGE_SITE_RECORDS
from common.accounting import RDP_ORDERS, DPEvent, epsilon_for, rdp_at_order, rdp_to_epsilon
from server.defaults import gan_rules
from server.sites import Schema

DELTA = 1e-5


def test_golden_orders():
    """Fixed numbers, so that a change to the rule or to the accountant shows (module docstring of ledger_order)."""
    assert ledger_order(10.0, DELTA) == 2.9
    assert ledger_order(1.0, DELTA) == 18.0
    assert ledger_order(10.0, 4.76e-6, sized=True) == 2.7  # a site of 20,000 records under the default delta
    assert reference_records(4.76e-6) == 21_008 and reference_records(1e-5) == reference_records(1e-3) == 10_000
    # an operator's delta says nothing of the site's size: the reference stays at 10,000 records (review s64: read
    # as a size, delta 1e-7 took the order for 1,000,000 records, x1.74 the noise at a site of 2,000)
    assert reference_records(1e-7, sized=False) == 10_000
    assert ledger_order(10.0, 1e-7) == ledger_order(10.0, 1e-7, False)
    assert ledger_order(10.0, 1e-7) > ledger_order(10.0, 1e-7, sized=True)
    assert ledger_order(math.inf, DELTA) is None  # nothing is ever refused: no stopping rule, no order
    assert ledger_order(0.0, DELTA) == RDP_ORDERS[-1]
    assert ledger_order(0.01, DELTA) in RDP_ORDERS  # below the census's own epsilon: a single release's order
    # the conversion at one order, as Opacus writes it (Balle et al. 2020)
    assert rdp_to_epsilon(0.0, 2.9, DELTA) == pytest.approx(5.076203532326177, rel=1e-12)
    # only the accountant's orders: Opacus' series goes negative at some others (review s64: -0.574 a step at 100.5)
    for order in (100.5, 2000.0, 2.95):
        with pytest.raises(ValueError, match="RDP_ORDERS"):
            epsilon_for([DPEvent(20.0, 0.5, 1)], DELTA, order)


def test_the_reference_plan_is_the_products_default_at_a_large_site():
    rules = {c.setting: c.value for c in gan_rules(Schema(1, 28, 28, tuple("0123456789")), 3, 28)}
    assert REFERENCE_RECORDS == LARGE_SITE_RECORDS
    assert REFERENCE_BATCH == rules["gan-batch-size"]
    assert REFERENCE_STEPS == rules["num-rounds"] * rules["gan-long-local-steps"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_ledger_fixes_its_order_when_made_and_a_budget_change_never_raises_it(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    assert [line["type"] for line in _lines(path)] == ["header", "order"] and ledger.order == 2.9
    ledger.charge([DPEvent(1.0, 0.01, 100)], purpose="x")
    # lowered below what order 2.9 holds at delta 1e-5 (epsilon 5.08): the order stays, and nothing fits
    lowered = PrivacyLedger(path, epsilon_budget=1.0, delta=DELTA)
    assert lowered.order == 2.9 and lowered.spent().used == math.inf
    with pytest.raises(BudgetExceeded, match="below the 5.08 that the ledger's Renyi order 2.9 needs"):
        lowered.charge([DPEvent(50.0, 1.0, 1)], purpose="z")
    assert share(lowered.summary()["budget_used"]) == "all of it and more"
    assert lowered.summary()["order_for_budget"] == 18.0  # (what a fresh ledger would take: site --check says so)
    # raised: the rule's lower order takes over, since it allows more than order 2.9 ever held (order_in_force)
    raised = PrivacyLedger(path, epsilon_budget=12.0, delta=DELTA)
    assert raised.order == ledger_order(12.0, DELTA) < 2.9 and not raised.summary()["order_recorded"]
    raised.charge([DPEvent(50.0, 1.0, 1)], purpose="y")
    assert [(line["order"], line["budget"]) for line in _lines(path) if line["type"] == "order"] == [
        (2.9, 10.0), (raised.order, 12.0)]
    assert PrivacyLedger(path, epsilon_budget=12.0, create=False).summary()["order_recorded"]


def test_a_budget_raised_from_one_to_ten_moves_the_order_and_the_noise_with_it(tmp_path):
    """Review s64: a ledger made at epsilon 1 (order 18) and raised to 10 kept order 18, and a run of epsilon 9 got
    2.7 times the noise. The lower order takes over where it allows more divergence than the old one held: every
    record's divergence at it, over everything released, stays within what the new budget allows."""
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path, epsilon_budget=1.0, delta=DELTA).charge([DPEvent(20.0, 1.0, 1)], purpose="census")
    raised = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    assert raised.order == 2.9
    request = PlanRequest(mode="dpgan", epsilon=9.0, rounds=10, steps=120, batch_size=256)
    plan = make_plan(request, num_records=20_000, delta=DELTA, budget=10.0, prior=raised.events(), order=raised.order)
    fresh = make_plan(request, num_records=20_000, delta=DELTA, budget=10.0, prior=raised.events())
    assert plan.train_sigma == fresh.train_sigma  # the run's own epsilon sets the noise, as at a fresh ledger
    # the condition it rests on: order 2.9 at budget 10 allows more than order 18 ever held at budget 1
    assert allowance(2.9, 10.0, DELTA) >= allowance(18.0, 1.0, DELTA) > 0
    # ... and a move that would not: from order 2.9 at budget 10 to 12 and back to 10, the order stays where it is
    assert order_in_force(((2.9, 10.0), (2.6, 12.0)), 10.0, DELTA, False) == 2.6


def test_a_ledger_without_an_order_gets_one_at_its_next_charge_and_reading_writes_nothing(tmp_path):
    """A ledger made before the order existed (or under an unlimited budget) holds no order line: reading it uses the
    order its budget and delta give, and its next charge records that order, in the same write."""
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path, epsilon_budget=math.inf, delta=DELTA).charge([DPEvent(2.0, 0.02, 300)], purpose="old")
    assert "order" not in [line["type"] for line in _lines(path)]
    before = path.read_bytes()
    reader = PrivacyLedger(path, epsilon_budget=10.0, create=False)
    summary = reader.summary()
    assert summary["order"] == 2.9 and not summary["order_recorded"] and path.read_bytes() == before
    writer = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    writer.charge([DPEvent(2.0, 0.02, 300)], purpose="new")
    assert [line["type"] for line in _lines(path)] == ["header", "charge", "order", "charge"]
    assert PrivacyLedger(path, epsilon_budget=1.0, create=False).order == 2.9  # recorded: the budget no longer moves it


def test_an_order_line_that_raises_the_order_or_is_broken_is_damage(tmp_path):
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA).charge([DPEvent(1.0, 0.01, 100)], purpose="x")
    good = path.read_bytes()
    for extra in (b'{"type":"order","order":18.0,"time":"t","budget":1.0}\n', b'{"type":"order","order":1.0}\n',
                  b'{"type":"order","order":2.5}\n', b'{"type":"order","order":2.5,"budget":"10"}\n',
                  b'{"type":"order","order":2.55,"budget":10}\n'):
        path.write_bytes(good + extra + good.splitlines(keepends=True)[-1])  # a charge after it: not a torn line
        with pytest.raises(LedgerDamaged, match="order"):
            PrivacyLedger(path, epsilon_budget=10.0, create=False).spent()


def test_the_allow_rule_reads_the_total_at_the_ledgers_order(tmp_path):
    """Releases whose best order fits the budget but whose total at the ledger's order does not are refused: the rule is
    a Renyi filter at one order, not the best order of whatever the releases turned out to be."""
    ledger = PrivacyLedger(tmp_path / "l.jsonl", epsilon_budget=10.0, delta=DELTA)
    few_large = DPEvent(5.0, 1.0, 1)  # one large-noise release: cheapest at a high order
    count = 1
    while epsilon_for([few_large] * (count + 1), DELTA) <= 10.0:
        count += 1
    assert epsilon_for([few_large] * count, DELTA) <= 10.0 < epsilon_for([few_large] * count, DELTA, ledger.order)
    charged = 0
    with pytest.raises(BudgetExceeded) as info:
        for _ in range(count):
            ledger.charge([few_large], purpose="stats")
            charged += 1
    assert charged < count and info.value.used[1] > 1.0 >= info.value.used[0]


def test_whatever_a_coordinator_chooses_the_ledger_stops_within_its_renyi_budget(tmp_path):
    """The filter's condition, checked over random adaptive sequences: the Renyi divergence of everything charged, at
    the ledger's order, never passes what the budget allows there."""
    rng = random.Random(0)
    for trial in range(6):
        budget = rng.choice([1.0, 3.0, 10.0])
        ledger = PrivacyLedger(tmp_path / f"l{trial}.jsonl", epsilon_budget=budget, delta=DELTA)
        for _ in range(40):
            event = DPEvent(rng.uniform(0.5, 30.0), rng.choice([1.0, 0.1, 0.01]), rng.choice([1, 10, 100]))
            try:
                ledger.charge([event], purpose="q")
            except BudgetExceeded:
                pass
        order = ledger.order
        assert rdp_at_order(ledger.events(), order) <= budget - rdp_to_epsilon(0.0, order, DELTA) + 1e-9
        assert ledger.spent().used <= 1.0 + 1e-9


def test_a_plan_fits_the_site_at_the_ledgers_order_with_little_more_noise():
    """The planner fits prior + plan to the budget at the ledger's order: the product's default DP-GAN plan at a large
    site keeps its noise; at a small one, where the order is not the plan's best, the noise grows a little."""
    request = PlanRequest(mode="dpgan", epsilon=10.0, rounds=10, steps=120, batch_size=256)
    prior = [size_event()]
    delta = 4.76e-6
    order = ledger_order(10.0, delta, sized=True)
    best = make_plan(request, num_records=20_000, delta=delta, budget=10.0, prior=prior)
    fixed = make_plan(request, num_records=20_000, delta=delta, budget=10.0, prior=prior, order=order)
    assert epsilon_for([*prior, *fixed.all_events(10, 120)], delta, order) <= 10.0 + 1e-9
    assert fixed.train_sigma == best.train_sigma and fixed.order == order  # (bench_ledger_order.py: x1.000)
    small = make_plan(replace(request, steps=60), num_records=2_000, delta=DELTA, budget=10.0, prior=prior, order=2.9)
    small_best = make_plan(replace(request, steps=60), num_records=2_000, delta=DELTA, budget=10.0, prior=prior)
    assert epsilon_for([*prior, *small_best.all_events(10, 60)], DELTA, 2.9) > 10.0  # would not fit at the order
    assert epsilon_for([*prior, *small.all_events(10, 60)], DELTA, 2.9) <= 10.0 + 1e-9 and small.budget_limited
    assert 1.0 < small.train_sigma / small_best.train_sigma < 1.02
    stats = PlanRequest(mode="bnstats", epsilon=10.0, rounds=0, steps=1, batch_size=1, census=False)
    plan = make_plan(stats, num_records=1, delta=DELTA, budget=10.0, prior=prior, order=2.9)
    assert epsilon_for([*prior, plan.stats], DELTA, 2.9) <= 10.0 + 1e-9  # a statistics-only run fits too


@pytest.mark.parametrize("delta", [1e-5, 1e-7, 1e-9, 1e-12])
def test_the_noisy_size_release_fits_every_budget_a_site_may_have(delta):
    """A ledger's first charge (its noisy size, client.site_delta) must fit at the ledger's order for every budget the
    site accepts (least_budget and up), whatever delta the draw gives: else the draw would decide a refusal."""
    for budget in (least_budget(), 0.05, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0):
        assert epsilon_for([size_event()], delta, ledger_order(budget, delta, sized=True)) <= budget, (budget, delta)


def test_a_run_planned_before_the_order_is_refused_before_a_charge_it_could_not_finish(tmp_path):
    """Review s64: a run planned by the previous fedsynth (its plan records no order) and resumed after the upgrade
    was refused part-way, after charging rounds (41 % of a budget burnt on a run that could never finish). Now its
    whole plan is checked at the ledger's order before its next charge."""
    from client.budget import _check_older_plan_fits
    from client.refusal import Refusal

    ledger = PrivacyLedger(tmp_path / "l.jsonl", epsilon_budget=10.0, delta=DELTA)
    request = PlanRequest(mode="dpgan", epsilon=10.0, rounds=10, steps=60, batch_size=256)
    older = make_plan(request, num_records=2_000, delta=DELTA, budget=10.0, prior=[])  # the best order's plan
    with pytest.raises(Refusal) as info:
        _check_older_plan_fits(older, ledger, "e1", 10.0)
    assert "planned without the ledger's Renyi order" in info.value.detail and ledger.events() == []
    newer = make_plan(request, num_records=2_000, delta=DELTA, budget=10.0, prior=[], order=ledger.order)
    _check_older_plan_fits(newer, ledger, "e1", 10.0)  # (a plan made at the order fits)
    # the queries a plan reserves are not counted: each is charged, and refused, on its own (review s64's third)
    queries = replace(request, evaluation_queries=3, audit_queries=3)
    with_queries = make_plan(queries, num_records=2_000, delta=DELTA, budget=10.0, prior=[], order=ledger.order)
    assert epsilon_for(with_queries.all_events(10, 60), DELTA, ledger.order) <= 10.0
    unreserved = replace(with_queries, evaluation_queries=30)  # (as if it had reserved far more than fit)
    assert epsilon_for(unreserved.all_events(10, 60), DELTA, ledger.order) > 10.0
    _check_older_plan_fits(unreserved, ledger, "e1", 10.0)


def test_two_processes_starting_a_ledger_at_once_both_succeed(tmp_path, monkeypatch):
    """Review s64: the ledger's .started mark was written through one fixed temporary name, so of two processes
    creating a ledger at once the one whose rename came second failed, after the ledger itself was written."""
    import client.ledger_file as lf

    path = tmp_path / "l.jsonl"
    real = lf.atomic_write_json

    def the_other_process_was_first(target, obj):
        real(target, obj)  # the other process's mark lands, and our rename finds our temporary file gone
        raise FileNotFoundError(str(target) + ".tmp")

    monkeypatch.setattr(lf, "atomic_write_json", the_other_process_was_first)
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    assert lf.started_mark(path).exists() and ledger.order == 2.9


def test_a_refusal_after_a_non_private_release_does_not_call_the_budget_too_small(tmp_path):
    """Review s64's third: every refusal whose 'used' share was infinite said the budget was below what the order
    needs, also when the share was infinite because of an earlier non-private release under an unlimited budget."""
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path, epsilon_budget=math.inf, delta=DELTA).charge([DPEvent(0.0, 1.0, 1)], purpose="nodp")
    with pytest.raises(BudgetExceeded) as info:
        PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA).charge([DPEvent(50.0, 1.0, 1)], purpose="x")
    assert "too small" not in str(info.value) and "cost inf" in str(info.value)
