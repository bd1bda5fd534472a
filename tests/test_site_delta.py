"""A site's default delta is read off a charged noisy size, never off its record count (client.site_delta).

The attack this closes: a plan's noise multiplier is calibrated at the ledger's delta, and so is whether the plan
refuses (noise above 50, a budget that cannot pay). With the default delta 1/(10 n) read off the exact n, a
coordinator could binary-search the requested epsilon for where a site starts refusing and read n back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import client.site
from client.budget import PlanRequest, make_plan, plan_for_site
from client.refusal import Refusal
from client.site import SiteSettings, open_ledger
from client.site_delta import PURPOSE, SIZE_MARGIN, delta_from_noisy_size, draw_default_delta, size_event
from common import protocol as P
from common.accounting import default_delta, epsilon_for
from common.data import ImageDataset


def _data(n: int) -> ImageDataset:
    """n blank 8x8 records over 10 classes (only their number matters here)."""
    return ImageDataset(np.zeros((n, 1, 8, 8), np.float32), np.arange(n) % 10, tuple(str(c) for c in range(10)))


def _site(tmp_path, name: str, *, delta: float = 0.0, budget: float = 10.0) -> SiteSettings:
    return SiteSettings(name=name, data="digits", state_dir=tmp_path / name, epsilon_budget=budget, delta=delta)


def test_golden_numbers_of_the_size_release():
    assert epsilon_for([size_event()], 1e-5) == pytest.approx(0.0146454, rel=1e-4)  # the release on its own
    assert delta_from_noisy_size(20_000.0) == pytest.approx(1.0 / (10 * (20_000 + SIZE_MARGIN)))
    assert delta_from_noisy_size(100.0) == 1e-5 and delta_from_noisy_size(-5_000.0) == 1e-5  # capped at 1e-5
    with pytest.raises(ValueError, match="finite"):
        delta_from_noisy_size(math.nan)


def test_the_default_delta_is_at_most_one_over_ten_n_and_varies_with_the_noise():
    n = 30_000
    deltas = [draw_default_delta(n, seed) for seed in range(200)]
    assert max(deltas) <= 1.0 / (10 * n)  # the margin: 5 noise stds
    assert len(set(deltas)) > 100  # a noisy size, not a function of n


def test_a_new_ledger_records_its_noisy_size_as_its_first_charge(tmp_path):
    site, data = _site(tmp_path, "a"), _data(30_000)
    ledger = open_ledger(site, data)
    entries = ledger.entries()
    assert [e["purpose"] for e in entries] == [PURPOSE]
    assert entries[0]["events"] == [size_event().to_dict()]
    assert 1.0 / (10 * (30_000 + 3 * SIZE_MARGIN)) < ledger.delta < 1.0 / (10 * 30_000)
    assert ledger.spent().epsilon == pytest.approx(epsilon_for([size_event()], ledger.delta))
    again = open_ledger(site, data)  # opened again: nothing charged, the delta kept
    assert again.delta == ledger.delta and len(again.entries()) == 1


def test_a_configured_delta_needs_no_release(tmp_path):
    ledger = open_ledger(_site(tmp_path, "b", delta=1e-6), _data(500))
    assert ledger.delta == 1e-6 and ledger.entries() == []


def test_a_budget_that_cannot_pay_the_size_release_is_refused_with_advice_and_writes_nothing(tmp_path):
    site = _site(tmp_path, "c", budget=0.001)
    with pytest.raises(Refusal) as refused:
        open_ledger(site, _data(500))
    assert refused.value.code == P.REFUSED_BUDGET and "delta" in refused.value.detail
    assert not site.ledger_path.exists()


def test_the_plan_reads_delta_from_the_noisy_size_not_from_the_record_count(tmp_path, monkeypatch):
    """Two sites of 12,000 and 16,000 records whose noisy sizes and censuses came out the same get the same delta
    and the same plan. With delta read off n (the old default) their noise multipliers differ, so the epsilon at
    which each starts refusing would differ too."""
    monkeypatch.setattr(client.site, "draw_default_delta", lambda n: delta_from_noisy_size(14_000.0))
    census = [1_400.0] * 10
    req = PlanRequest(mode="dpgan", epsilon=2.0, rounds=10, steps=60, batch_size=256)
    plans = []
    for name, n in (("small", 12_000), ("large", 16_000)):
        site = _site(tmp_path, name)
        ledger = open_ledger(site, _data(n))
        run_dir = tmp_path / name / "run"
        run_dir.mkdir()
        plans.append(plan_for_site(site, ledger, run_dir, req, "e", census=census))
    assert plans[0].delta == plans[1].delta == delta_from_noisy_size(14_000.0)
    assert plans[0].train_sigma == plans[1].train_sigma
    # what the exact record count would have given: different noise, so a different refusal threshold
    old = [make_plan(req, num_records=14_000, delta=default_delta(n), budget=10.0, prior=[]).train_sigma
           for n in (12_000, 16_000)]
    assert abs(old[0] - old[1]) > 1e-3


def test_the_site_command_warns_about_a_ledger_whose_delta_an_earlier_fedsynth_read_off_n(tmp_path, capsys):
    from client.ledger import PrivacyLedger
    from fedsynth.ops.site_cmd import SiteCheck, _announce, load_site_config
    from tests.deployment_helpers import minimal_site_yaml

    dep = load_site_config(minimal_site_yaml(tmp_path))
    old = PrivacyLedger(tmp_path / "old.jsonl", epsilon_budget=2.0, new_delta=default_delta(20_000))  # 1/(10 n)
    _announce(dep, SiteCheck(data=_data(20), ledger=old.summary(), approved=["0" * 64]))
    assert "set from the exact record count" in capsys.readouterr().err
    new = open_ledger(dep.settings, _data(20_000))  # today's: read off a noisy size, so no warning
    _announce(dep, SiteCheck(data=_data(20), ledger=new.summary(), approved=["0" * 64]))
    assert "exact record count" not in capsys.readouterr().err


def test_a_ledger_file_left_without_its_header_gets_the_same_checks(tmp_path):
    """A crash between creating the file and writing its header leaves an empty file: the next opening writes the
    header and the noisy size together, and still refuses a budget that cannot pay the size."""
    poor = _site(tmp_path, "d", budget=0.001)
    poor.ledger_path.parent.mkdir(parents=True)
    poor.ledger_path.write_bytes(b"")
    with pytest.raises(Refusal):
        open_ledger(poor, _data(500))
    assert poor.ledger_path.read_bytes() == b""  # nothing written, and the file it did not create is kept
    ledger = open_ledger(_site(tmp_path, "d"), _data(500))
    assert [e["purpose"] for e in ledger.entries()] == [PURPOSE] and ledger.delta == 1e-5


def test_whether_a_small_budget_is_refused_reads_public_settings_not_the_draw(tmp_path, monkeypatch):
    """A budget of 0.02 pays the size release at delta 1e-5 (0.0146) but not at the smallest delta a draw can give
    (least_budget, 0.032): it is refused before any draw, so no uncharged draw decides a refusal. A ledger that has
    started needs no size release and opens at any budget."""
    from client.site_delta import least_budget

    assert least_budget() == pytest.approx(0.0320571, rel=1e-4)

    def no_draw(n):
        raise AssertionError("the size was drawn for a refusal")

    monkeypatch.setattr(client.site, "draw_default_delta", no_draw)
    with pytest.raises(Refusal) as refused:
        open_ledger(_site(tmp_path, "e", budget=0.02), _data(500))
    assert refused.value.code == P.REFUSED_BUDGET and "set delta" in refused.value.detail
    monkeypatch.undo()
    started = open_ledger(_site(tmp_path, "e"), _data(500))
    assert open_ledger(_site(tmp_path, "e", budget=0.02), _data(500)).delta == started.delta
