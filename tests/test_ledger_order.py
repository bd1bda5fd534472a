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
from client.ledger_order import REFERENCE_BATCH, REFERENCE_RECORDS, REFERENCE_STEPS, ledger_order, reference_records
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
    assert ledger_order(10.0, 4.76e-6) == 2.7  # a site of 20,000 records under the default delta
    assert reference_records(4.76e-6) == 21_008 and reference_records(1e-5) == reference_records(1e-3) == 10_000
    assert ledger_order(math.inf, DELTA) is None  # nothing is ever refused: no stopping rule, no order
    assert ledger_order(0.0, DELTA) == RDP_ORDERS[-1]
    assert ledger_order(0.01, DELTA) in RDP_ORDERS  # below the census's own epsilon: a single release's order
    # the conversion at one order, as Opacus writes it (Balle et al. 2020)
    assert rdp_to_epsilon(0.0, 2.9, DELTA) == pytest.approx(5.076203532326177, rel=1e-12)


def test_the_reference_plan_is_the_products_default_at_a_large_site():
    rules = {c.setting: c.value for c in gan_rules(Schema(1, 28, 28, tuple("0123456789")), 3, 28)}
    assert REFERENCE_RECORDS == LARGE_SITE_RECORDS
    assert REFERENCE_BATCH == rules["gan-batch-size"]
    assert REFERENCE_STEPS == rules["num-rounds"] * rules["gan-long-local-steps"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_ledger_fixes_its_order_when_made_and_keeps_it(tmp_path):
    path = tmp_path / "l.jsonl"
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    assert [line["type"] for line in _lines(path)] == ["header", "order"] and ledger.order == 2.9
    ledger.charge([DPEvent(1.0, 0.01, 100)], purpose="x")
    raised = PrivacyLedger(path, epsilon_budget=12.0, delta=DELTA)  # the operator changes the budget: the order stays
    assert raised.order == 2.9 and raised.summary()["order_recorded"]
    raised.charge([DPEvent(50.0, 1.0, 1)], purpose="y")
    assert [line["type"] for line in _lines(path)].count("order") == 1
    lowered = PrivacyLedger(path, epsilon_budget=1.0, delta=DELTA)  # below what order 2.9 holds at delta 1e-5 (5.08)
    with pytest.raises(BudgetExceeded, match="too small for order 2.9 to hold anything"):
        lowered.charge([DPEvent(50.0, 1.0, 1)], purpose="z")
    assert lowered.spent().used == math.inf and share(lowered.summary()["budget_used"]) == "more than all of it"


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


def test_a_second_or_broken_order_line_is_damage(tmp_path):
    path = tmp_path / "l.jsonl"
    PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA).charge([DPEvent(1.0, 0.01, 100)], purpose="x")
    good = path.read_bytes()
    for extra in (b'{"type":"order","order":18.0,"time":"t","budget":1.0}\n', b'{"type":"order","order":1.0}\n'):
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
    order = ledger_order(10.0, delta)
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
        assert epsilon_for([size_event()], delta, ledger_order(budget, delta)) <= budget, (budget, delta)
