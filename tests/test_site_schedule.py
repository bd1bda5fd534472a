"""A DP-GAN site chooses its own schedule from its noisy census, charged before the plan it decides."""

from __future__ import annotations

import json
import math

import pytest

from client.app import app as client_app
from client.gan_site import STEPS_CHANGED
from common import protocol as P
from fedsynth.localgrid import LocalGrid
from tests.spine_helpers import charges, fast_config, nodes, run, spent
from tests.test_faults import gan_request, send


def _census_of_a_large_site(monkeypatch) -> None:
    """From now on every site's census is drawn for real, then comes out as a 20,000-record site's."""
    import client.census

    real_draw = client.census.draw_census

    def census_of_a_large_site(data, noise, folder):
        real_draw(data, noise, folder)  # the real draw, then a census that came out large
        fake = [2000.0] * 10
        (folder / client.census.CENSUS_FILE).write_text(json.dumps({"noisy-counts": fake, "noise": noise}))
        return fake

    monkeypatch.setattr(client.census, "draw_census", census_of_a_large_site)


def _round_settings_seen(monkeypatch) -> list:
    """The RoundSettings of every local DP-GAN round trained from now on (the round still runs)."""
    import client.gan_site as gan_site

    seen = []
    real_round = gan_site.LocalGanTrainer.train_round

    def recording(self, generator, rs, *args, **kwargs):
        seen.append(rs)
        return real_round(self, generator, rs, *args, **kwargs)

    monkeypatch.setattr(gan_site.LocalGanTrainer, "train_round", recording)
    return seen


def test_a_non_private_run_takes_the_longer_schedule_and_the_report_shows_each_sites_steps(tmp_path):
    cfg = fast_config(tmp_path, epsilon=math.inf, gan_local_steps=3, gan_long_local_steps=6)
    report = run(cfg, k=2)
    assert [h["local-steps"] for h in report["rounds"]] == [{"site-1": 6, "site-2": 6}] * 2
    for entries in charges(tmp_path):
        # the census first, on its own, then each round's DP-SGD steps alone
        assert [(e["purpose"], e["round"], len(e["events"])) for e in entries] == [
            ("dpgan-census", 0, 1), ("dpgan", 1, 1), ("dpgan", 2, 1)]
        assert [e["events"][0]["steps"] for e in entries[1:]] == [6, 6]
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="site-steps"' in html and "<td>site-2</td><td>6</td>" in html
    assert not any(c["setting"] == "gan-long-local-steps" for c in report["settings_chosen"])  # set, not chosen


def test_a_private_site_keeps_the_shorter_schedule_within_the_runs_epsilon_and_holds_to_it(tmp_path):
    cfg = fast_config(tmp_path, epsilon=1.0, num_rounds=2)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    # a site of ~1,800 records (the digits) is small by its noisy census: it keeps 4 steps, not 100 times that
    reply = send(grid, 1000, gan_request(cfg, long_steps=400))
    assert not reply.has_error()
    assert P.GanTrainReply.from_message(reply).local_steps == 4
    [entries] = charges(tmp_path)
    assert [(e["purpose"], e["round"]) for e in entries] == [("dpgan-census", 0), ("dpgan", 1)]
    plan = json.loads(next((tmp_path / "sites").rglob("plan.json")).read_text())
    assert plan["request"]["steps"] == 4 and plan["planned_epsilon"] <= 1.0 + 1e-9
    # the census charged before the plan is counted once: the run's whole plan fits the run's epsilon
    assert spent(tmp_path)[0] <= 1.0
    # round 2 must ask for the schedule the first round asked for (review s68 L); anything else is refused
    reply = send(grid, 1000, gan_request(cfg, server_round=2, local_steps=5, long_steps=400))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    assert reply.error.reason.endswith(STEPS_CHANGED)
    reply = send(grid, 1000, gan_request(cfg, server_round=2))  # settings the first round did not ask for
    assert reply.has_error() and reply.error.reason.endswith(STEPS_CHANGED)
    reply = send(grid, 1000, gan_request(cfg, server_round=2, long_steps=400))
    assert not reply.has_error() and P.GanTrainReply.from_message(reply).local_steps == 4
    assert [(e["purpose"], e["round"]) for e in charges(tmp_path)[0]] == [
        ("dpgan-census", 0), ("dpgan", 1), ("dpgan", 2)]


def test_a_plan_that_does_not_fit_is_refused_after_the_census_alone(tmp_path):
    """Whether a plan fits depends on the sampling rate, so on the size the plan is set from: the census's noisy
    total, drawn (and charged) first. A refused plan costs the run its census and nothing more; a malformed
    request, or a run whose epsilon cannot pay for the census, costs nothing."""
    cfg = fast_config(tmp_path, epsilon=1.0, num_rounds=1)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    reply = send(grid, 1000, gan_request(cfg, num_rounds=25, local_steps=1000, long_steps=2000,
                                                batch_size=4096))  # within work limits, not the budget
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET
    [entries] = charges(tmp_path)
    assert [(e["purpose"], len(e["events"]), e["events"][0]["noise_multiplier"]) for e in entries] == [
        ("dpgan-census", 1, P.CENSUS_NOISE)]
    assert spent(tmp_path)[0] < 0.5  # the census's epsilon, far below the run's 1
    reply = send(grid, 1000, gan_request(cfg, experiment="bad", batch_size=0))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    reply = send(grid, 1000, gan_request(cfg, experiment="tiny", epsilon=0.01))
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET and "epsilon" in reply.error.reason
    assert len(charges(tmp_path)[0]) == 1  # neither was charged


def test_the_product_offers_the_longer_schedule_except_on_tiny_images_or_when_the_steps_are_set():
    from common.config import ConfigError, RunConfig
    from server.defaults import resolve
    from server.sites import Schema

    mnist = Schema(channels=1, height=28, width=28, classes=tuple("0123456789"))
    cfg, chosen = resolve(RunConfig(), mnist, num_sites=3)
    assert (cfg.gan_local_steps, cfg.gan_long_local_steps) == (60, 120)
    assert any(c.setting == "gan-long-local-steps" and "noisy census" in c.reason for c in chosen)
    assert cfg.gan_g_steps == 1 and cfg.gan_long_g_steps == 2
    assert any(c.setting == "gan-long-g-steps" and "free in privacy" in c.reason for c in chosen)
    digits = Schema(channels=1, height=8, width=8, classes=tuple("0123456789"))
    assert resolve(RunConfig(), digits, num_sites=3)[0].gan_long_local_steps == 100  # = its local steps: never
    assert resolve(RunConfig(), digits, num_sites=3)[0].gan_long_g_steps == 1
    # G steps the user set are taken exactly, unless the user sets the long G steps too
    assert resolve(RunConfig(gan_g_steps=3), mnist, num_sites=3)[0].gan_long_g_steps == 3
    assert resolve(RunConfig(gan_g_steps=2, gan_long_g_steps=4), mnist, 3)[0].gan_long_g_steps == 4
    with pytest.raises(ConfigError, match="gan-long-g-steps must be 0 .auto. or in gan-g-steps"):
        RunConfig.from_mapping({"gan-g-steps": 3, "gan-long-g-steps": 2})
    # steps the user set are taken exactly, unless the user sets the longer schedule too
    assert resolve(RunConfig(gan_local_steps=200), mnist, num_sites=3)[0].gan_long_local_steps == 200
    assert resolve(RunConfig(gan_local_steps=50, gan_long_local_steps=75), mnist, 3)[0].gan_long_local_steps == 75
    with pytest.raises(ConfigError, match="gan-long-local-steps must be 0 .auto. or at least gan-local-steps"):
        RunConfig.from_mapping({"gan-local-steps": 60, "gan-long-local-steps": 30})


def test_a_refusal_of_other_steps_reads_the_same_whichever_schedule_the_census_chose(tmp_path, monkeypatch):
    """Which schedule a site took follows from its noisy census, and a secure run shows the coordinator no site's
    census or steps alone: a round naming other D or G steps is refused, free, in the same words at a small site
    and a large one (review s68 K: the refusal quoted the site's own counts, telling one bit of its census free;
    review s68 L: which refusal came, or whether one came, still told it, for requests naming one size's steps)."""
    reasons = {}
    for size in ("small", "large"):
        if size == "large":
            _census_of_a_large_site(monkeypatch)
        cfg = fast_config(tmp_path / size, epsilon=1.0, num_rounds=2)
        grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
        first = send(grid, 1000, gan_request(cfg, long_steps=8, long_g_steps=2))
        assert not first.has_error()
        took = (P.GanTrainReply.from_message(first).local_steps, P.GanTrainReply.from_message(first).g_steps)
        assert took == ((4, 1) if size == "small" else (8, 2))
        for other in (dict(local_steps=5, long_steps=6), dict(long_steps=8, g_steps=3, long_g_steps=4),
                      # (review s68 L) the very steps one size took, asked without the other size's option
                      dict(local_steps=8, long_steps=0, long_g_steps=0), dict(long_steps=6),
                      dict(local_steps=8, long_steps=0, g_steps=2, long_g_steps=0)):
            reply = send(grid, 1000, gan_request(cfg, server_round=2, **other))
            assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
            reasons.setdefault(size, []).append(reply.error.reason.removeprefix("site-1: "))
        assert [e["purpose"] for e in charges(tmp_path / size)[0]] == ["dpgan-census", "dpgan"]  # free refusals
    assert reasons["small"] == reasons["large"] == [STEPS_CHANGED] * 5


def test_the_schedule_and_the_plan_follow_the_noisy_census_not_the_record_count(tmp_path, monkeypatch):
    """What the reply shows (the steps taken) and every choice of the plan must be post-processing of the census:
    a site of ~150 records whose census said 20,000 takes the schedule and the sampling rate a 20,000-record site
    would (its DP-SGD then samples ~150 x that rate records per step: accounted at that rate, so still within the
    run's epsilon)."""
    small_site = nodes(10)[:1]  # a tenth of the digits: ~150 records
    honest = fast_config(tmp_path / "honest", epsilon=1.0)
    reply = send(LocalGrid(client_app, small_site, honest.to_flwr()), 1000,
                 gan_request(honest, long_steps=8, long_g_steps=2))
    # its own census: too small for the longer D schedule and for the extra G steps
    assert (P.GanTrainReply.from_message(reply).local_steps, P.GanTrainReply.from_message(reply).g_steps) == (4, 1)
    _census_of_a_large_site(monkeypatch)
    cfg = fast_config(tmp_path, epsilon=1.0)
    reply = send(LocalGrid(client_app, small_site, cfg.to_flwr()), 1000, gan_request(cfg, long_steps=8,
                                                                                      long_g_steps=2))
    # a large site: the longer D schedule, and the extra G steps on it
    assert not reply.has_error() and P.GanTrainReply.from_message(reply).local_steps == 8
    assert P.GanTrainReply.from_message(reply).g_steps == 2
    plan = json.loads(next((tmp_path / "sites").rglob("plan.json")).read_text())
    assert plan["sample_rate"] == pytest.approx(cfg.gan_batch_size / 20000.0)  # from the census, not ~150 records
    assert plan["planned_epsilon"] <= 1.0 + 1e-9


def test_a_large_site_whose_budget_cannot_fit_the_longer_plan_keeps_the_shorter_with_the_extra_g_steps(
        tmp_path, monkeypatch, caplog):
    """The longer schedule is the census's choice for a large site, but never at the price of a refusal: where the
    longer plan would need noise past MAX_USEFUL_NOISE (here 2,000 steps at a sampling rate of 0.2 within epsilon
    0.5) the site trains on the shorter one, within the run's epsilon, and gives G the run's extra steps instead;
    its log says why it kept the shorter schedule."""
    from client.budget import MAX_USEFUL_NOISE

    _census_of_a_large_site(monkeypatch)
    cfg = fast_config(tmp_path, epsilon=0.5, gan_batch_size=4096)
    with caplog.at_level("INFO", logger="fedsynth.site"):
        reply = send(LocalGrid(client_app, nodes(10)[:1], cfg.to_flwr()), 1000,
                     gan_request(cfg, long_steps=1000, long_g_steps=2))
    assert not reply.has_error()
    assert "takes 4 D steps per round" in caplog.text
    assert "the longer schedule's plan does not fit its budget" in caplog.text
    assert (P.GanTrainReply.from_message(reply).local_steps, P.GanTrainReply.from_message(reply).g_steps) == (4, 2)
    plan = json.loads(next((tmp_path / "sites").rglob("plan.json")).read_text())
    assert plan["request"]["steps"] == 4 and plan["planned_epsilon"] <= 0.5 + 1e-9
    [entries] = charges(tmp_path)
    assert [(e["purpose"], e["round"]) for e in entries] == [("dpgan-census", 0), ("dpgan", 1)]
    assert entries[1]["events"][0]["noise_multiplier"] <= MAX_USEFUL_NOISE


def test_the_free_census_refusal_reads_the_published_delta_bound_not_the_ledgers_delta(tmp_path):
    """A refusal that costs nothing may depend only on what is public: the check before the census reads the
    published delta bound, not the ledger's delta (set from a noisy size, client.site_delta). A run epsilon between
    the census's epsilon at the bound and at the ledger's smaller delta passes it (and is charged at the ledger's
    delta, within the site's budget)."""
    from client.budget import census_event
    from client.census import run_census
    from client.ledger import PrivacyLedger
    from common.accounting import epsilon_for
    from common.data import load_dataset

    data = load_dataset("digits", "train")
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl", epsilon_budget=10.0, new_delta=1e-9)  # as if n were 1e8
    at_bound, at_ledger = (epsilon_for([census_event(True)], d) for d in (P.DEFAULT_DELTA_BOUND, 1e-9))
    assert at_bound < at_ledger
    between = 0.5 * (at_bound + at_ledger)
    census = run_census(data, ledger, tmp_path, mode="dpgan", experiment="e", epsilon=between, budget=10.0,
                        delta_bound=P.DEFAULT_DELTA_BOUND, fingerprint="f")
    assert len(census) == 10 and ledger.spent().epsilon == pytest.approx(at_ledger)
    from client.refusal import Refusal

    with pytest.raises(Refusal) as refused:  # below the census's epsilon at the bound: refused, nothing charged
        run_census(data, ledger, tmp_path / "other", mode="dpgan", experiment="f", epsilon=0.5 * at_bound,
                   budget=10.0, delta_bound=P.DEFAULT_DELTA_BOUND, fingerprint="f")
    assert "epsilon is too small" in refused.value.public and len(ledger.events()) == 1


def test_the_requests_d_steps_reach_the_sites_round_and_change_nothing_it_spends(tmp_path, monkeypatch):
    """gan-d-steps (n_D) is training recipe: the site runs a G step after every n_D D steps, and charges the
    same D steps at the same noise as with n_D = 1."""
    seen = _round_settings_seen(monkeypatch)
    plans = []
    for name, d_steps in (("one", 1), ("two", 2)):
        cfg = fast_config(tmp_path / name, epsilon=5.0, num_rounds=2)
        grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
        reply = send(grid, 1000, gan_request(cfg, d_steps=d_steps))
        assert not reply.has_error()
        plans.append(json.loads(next((tmp_path / name / "sites").rglob("plan.json")).read_text()))
    assert [rs.d_steps_per_g for rs in seen] == [1, 2]
    assert seen[0].steps == seen[1].steps == 4
    assert plans[0]["request"] == plans[1]["request"]  # the plan reads no n_D: the same steps at the same q
    for name in ("one", "two"):
        [entries] = charges(tmp_path / name)
        assert [(e["purpose"], [ev["steps"] for ev in e["events"]]) for e in entries] == [
            ("dpgan-census", [1]), ("dpgan", [4])]


def test_a_large_site_on_the_shorter_schedule_takes_two_generator_steps_charged_exactly_as_one(tmp_path,
                                                                                             monkeypatch):
    """gan-long-g-steps: a site whose noisy census counts 10,000 records or more and that keeps the shorter D
    schedule runs two G steps per D step; its plan, noise and charges are those of one (G never sees a record)."""
    seen = _round_settings_seen(monkeypatch)
    plans = []
    for name, large in (("small", False), ("large", True)):
        if large:
            _census_of_a_large_site(monkeypatch)
        cfg = fast_config(tmp_path / name, epsilon=5.0, num_rounds=2)
        grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
        reply = send(grid, 1000, gan_request(cfg, long_g_steps=2))
        assert not reply.has_error() and P.GanTrainReply.from_message(reply).g_steps == (2 if large else 1)
        plans.append(json.loads(next((tmp_path / name / "sites").rglob("plan.json")).read_text()))
        [entries] = charges(tmp_path / name)
        assert [(e["purpose"], [ev["steps"] for ev in e["events"]]) for e in entries] == [
            ("dpgan-census", [1]), ("dpgan", [4])]
    assert [(rs.g_steps_per_d, rs.steps) for rs in seen] == [(1, 4), (2, 4)]
    assert plans[0]["request"] == plans[1]["request"]  # the plan reads no G steps
    # a request offering fewer long G steps than its G steps is refused before anything is charged
    cfg = fast_config(tmp_path / "bad", epsilon=5.0, num_rounds=2)
    reply = send(LocalGrid(client_app, nodes(1), cfg.to_flwr()), 1000, gan_request(cfg, g_steps=3, long_g_steps=2))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "long-g-steps" in reply.error.reason
    assert charges(tmp_path / "bad") in ([], [[]])  # nothing charged


def test_the_report_shows_the_generator_steps_each_site_took(tmp_path):
    cfg = fast_config(tmp_path, epsilon=math.inf, gan_local_steps=3, gan_g_steps=2)
    report = run(cfg, k=2)
    assert [h["g-steps"] for h in report["rounds"]] == [{"site-1": 2, "site-2": 2}] * 2
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<td>site-2</td><td>3</td><td>2</td>" in html
