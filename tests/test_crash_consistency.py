"""What a crash, a power cut or a lost file can leave in a site's state folder, and why none of it yields a release
that the ledger has not paid for, a fresh budget, or a run that spends more than it asked.

Crashes are simulated by deleting or emptying files and by monkeypatching (never by real power cuts):

1. durability: every rename of a saved reply, census or plan is followed by an fsync of its folder, and an attempt's
   mark is on disk (file and folder fsync'ed) before its work starts; only a positive "interrupted" mark, written
   on Ctrl-C, lets a deployed site reuse a charge, and a census whose file is lost is charged again when redrawn;
2. a deleted or emptied ledger at a site that has released before is refused, never started afresh;
3. a run's own charges never exceed the epsilon it asked for, however often its work fails.

(A complete, newline-terminated, but invalid last ledger line is damage, not a torn write: tests/test_ledger.py.)
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

import common.files as files
from client.census import CENSUS_FILE, run_census
from client.ledger import BudgetExceeded, LedgerDamaged, PrivacyLedger
from client.refusal import Refusal
from client.charged_work import attempt_mark, charged_work
from client.site import SiteSettings, open_ledger
from common import protocol as P
from common.accounting import DPEvent, epsilon_for
from common.data import load_dataset, save_npz

DELTA = 1e-5
ROUND = DPEvent(1.0, 0.02, 100)
DATA = load_dataset("digits", "train").subset(np.arange(300))


def _site(tmp_path: Path, *, simulated: bool = False, budget: float = 30.0) -> SiteSettings:
    extra = {"partition_id": 0, "num_partitions": 1} if simulated else {}
    return SiteSettings(name="site-a", data="digits", state_dir=tmp_path / "state", epsilon_budget=budget,
                        dataset_id="site-a", delta=DELTA, **extra)


def _fsync_log(monkeypatch) -> list[tuple[str, str]]:
    """Record every os.fsync (as ("dir"|"file", path)) and os.replace (as ("rename", target)), in order."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        calls.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        calls.append(("rename", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


# ================================================================================================
# 1. durability
# ================================================================================================

def test_an_atomic_write_fsyncs_its_folder_after_the_rename(tmp_path, monkeypatch):
    calls = _fsync_log(monkeypatch)
    target = tmp_path / "new" / "reply.pt"
    files.atomic_write_bytes(target, b"x")
    renamed = calls.index(("rename", str(target)))
    assert ("file", str(target) + ".tmp") in calls[:renamed]
    assert ("dir", str(target.parent)) in calls[renamed + 1:]  # the new name survives a power cut
    assert ("dir", str(tmp_path)) in calls  # and so does the folder it created


def test_the_attempt_mark_is_on_disk_before_the_work_starts(tmp_path, monkeypatch):
    site = _site(tmp_path)
    ledger = open_ledger(site, DATA)
    folder = tmp_path / "state" / "runs" / "e1"
    calls = _fsync_log(monkeypatch)
    with charged_work(ledger, [ROUND], DATA, site, purpose="dpgan", run="e1", rnd=1, folder=folder,
                      run_epsilon=10.0):
        mark = attempt_mark(folder, "dpgan", 1)
        assert mark.read_text() == "running"
        assert ("rename", str(mark)) in calls
        assert ("dir", str(folder)) in calls[calls.index(("rename", str(mark))) + 1:]
        files.atomic_write_bytes(folder / "gan-round-1.pt", b"reply")
    assert not mark.exists()


def _charged_then(tmp_path, site, before: str | None, *, run_epsilon: float = 10.0) -> list[dict]:
    """Charge round 1 of run e1, leave its mark as ``before`` (None: no mark) as a crash would, and attempt round 1
    again; the run's charges of round 1."""
    ledger = open_ledger(site, DATA)
    ledger.charge([ROUND], purpose="dpgan", run="e1", round=1)
    folder = tmp_path / "state" / "runs" / "e1"
    folder.mkdir(parents=True, exist_ok=True)
    mark = attempt_mark(folder, "dpgan", 1)
    if before is not None:
        mark.write_bytes(before.encode("latin-1"))
    with charged_work(ledger, [ROUND], DATA, site, purpose="dpgan", run="e1", rnd=1, folder=folder,
                      run_epsilon=run_epsilon):
        pass
    return [e for e in ledger.entries() if e["purpose"] == "dpgan"]


@pytest.mark.parametrize("before", ["", "running", "\xff\xfe", None], ids=["empty", "running", "unreadable", "none"])
def test_a_mark_a_power_cut_can_leave_makes_a_deployed_site_charge_again(tmp_path, before):
    """The old site read an empty or missing mark as "interrupted by its operator" and reused the charge, so a
    re-sent round whose saved reply a power cut had lost got a second release for one charge."""
    entries = _charged_then(tmp_path, _site(tmp_path), before)
    assert len(entries) == 2
    assert entries[-1]["details"]["after-an-unfinished-attempt"] == (
        {None: "none", "": "empty", "\xff\xfe": "unreadable"}.get(before, before))


def test_only_an_interrupted_mark_reuses_the_charge_at_a_deployed_site(tmp_path):
    assert len(_charged_then(tmp_path, _site(tmp_path), "interrupted")) == 1


@pytest.mark.parametrize("before", ["running", None])
def test_a_simulated_site_still_reuses_a_killed_attempts_charge(tmp_path, before):
    assert len(_charged_then(tmp_path, _site(tmp_path, simulated=True), before)) == 1


@pytest.mark.parametrize("error, state", [(KeyboardInterrupt(), "interrupted"), (RuntimeError("x"), "failed")])
def test_ctrl_c_leaves_a_positive_durable_mark_and_a_failure_another(tmp_path, monkeypatch, error, state):
    site = _site(tmp_path)
    ledger = open_ledger(site, DATA)
    folder = tmp_path / "state" / "runs" / "e1"
    calls = _fsync_log(monkeypatch)
    with pytest.raises(type(error)):
        with charged_work(ledger, [ROUND], DATA, site, purpose="dpgan", run="e1", rnd=1, folder=folder,
                          run_epsilon=10.0):
            calls.clear()
            raise error
    mark = attempt_mark(folder, "dpgan", 1)
    assert mark.read_text() == state
    assert ("rename", str(mark)) in calls and ("dir", str(folder)) in calls


def test_a_census_whose_file_was_lost_is_charged_again_before_it_is_drawn_again(tmp_path):
    """The old site reused the census's charge when census.json was missing: a second census draw, sent with the
    run's replies, under one charge."""
    site = _site(tmp_path)
    ledger = open_ledger(site, DATA)
    folder = tmp_path / "state" / "runs" / "e1"

    def census():
        return run_census(DATA, ledger, folder, mode="dpgan", experiment="e1", epsilon=10.0, budget=30.0,
                          delta_bound=DELTA, fingerprint="f")

    first = census()
    assert census() == first  # read back: no charge
    (folder / CENSUS_FILE).unlink()  # lost (a power cut before the folder's fsync, an operator's mistake)
    census()
    entries = [e for e in ledger.entries() if e["purpose"] == "dpgan-census"]
    assert len(entries) == 2 and entries[-1]["details"] == {"census-drawn-again": 1}


# ================================================================================================
# 2. a deleted or emptied ledger is never started afresh
# ================================================================================================

def _released(tmp_path: Path) -> SiteSettings:
    site = _site(tmp_path, budget=5.0)
    ledger = open_ledger(site, DATA)
    ledger.charge([ROUND], purpose="dpgan", run="e1", round=1)
    files.atomic_write_bytes(site.state_dir / "runs" / "e1" / "gan-round-1.pt", b"a released reply")
    return site


@pytest.mark.parametrize("how", ["emptied", "deleted", "deleted-and-its-mark", "emptied-and-its-mark",
                                 "deleted-and-its-mark-queries-only"])
def test_a_lost_ledger_at_a_site_that_has_released_is_refused_before_anything_is_charged(tmp_path, how):
    site = _released(tmp_path)
    path = site.ledger_path
    if how.endswith("queries-only"):  # (review s62: a site that only answered queries; their marks tell)
        (site.state_dir / "runs" / "e1" / "gan-round-1.pt").unlink()
        files.atomic_write_bytes(site.state_dir / "runs" / "q1" / "evaluation-1.answered", b"{}")
    if how.startswith("emptied"):
        path.write_bytes(b"")
    else:
        path.unlink()
    if "its-mark" in how:  # the runs folder's saved replies (or query marks) still tell
        (path.parent / "site-a.started").unlink()
    with pytest.raises(LedgerDamaged, match="released before") as err:
        open_ledger(site, DATA)
    assert "restore" in str(err.value)
    assert (path.read_bytes() == b"") if how.startswith("emptied") else not path.exists()  # nothing written
    with pytest.raises(LedgerDamaged, match="released before"):  # the operator's read-only view says the same
        open_ledger(site, DATA, create=False)


def test_a_lost_ledger_with_only_its_mark_left_is_refused(tmp_path):
    site = _site(tmp_path)
    open_ledger(site, DATA)  # started, nothing released in a run yet
    assert (site.ledger_path.parent / "site-a.started").exists()
    site.ledger_path.unlink()
    with pytest.raises(LedgerDamaged):
        open_ledger(site, DATA)
    assert not site.ledger_path.exists()


def test_a_live_site_whose_ledger_was_deleted_answers_nothing(tmp_path):
    from client.app import app as client_app
    from fedsynth.localgrid import LocalGrid
    from tests.spine_helpers import fast_config
    from tests.test_faults import gan_request, send
    from tests.test_hostile_coordinator import deployed_site

    cfg = fast_config(tmp_path, num_rounds=2)
    grid = LocalGrid(client_app, [deployed_site(tmp_path, train=DATA, epsilon=30.0)], cfg.to_flwr())
    assert not send(grid, 1000, gan_request(cfg, experiment="e1")).has_error()
    (ledger,) = (tmp_path / "site-a" / "ledger").glob("*.jsonl")
    ledger.unlink()
    reply = send(grid, 1000, gan_request(cfg, experiment="e2"))
    assert reply.has_error() and reply.error.code == P.SITE_FAILURE
    assert not ledger.exists()


def test_fedsynth_ledger_and_site_check_report_a_deleted_ledger(tmp_path, capsys):
    import yaml

    from fedsynth.cli import main

    state = tmp_path / "state"
    save_npz(DATA, tmp_path / "d.npz")
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"name": "site-a", "data": str(tmp_path / "d.npz"), "epsilon": 5.0,
                                   "dataset_id": "site-a", "state_dir": str(state), "coordinator": "127.0.0.1:9",
                                   "supernode_port": 39998}))
    from fedsynth.ops.site_cmd import load_site_config

    site = load_site_config(str(cfg)).settings
    ledger = open_ledger(site, DATA)
    ledger.charge([ROUND], purpose="dpgan", run="e1", round=1)
    files.atomic_write_bytes(state / "runs" / "e1" / "gan-round-1.pt", b"a released reply")
    assert main(["ledger", "--config", str(cfg)]) == 0
    shown = capsys.readouterr().out  # what was spent, and the share of the budget used at the ledger's order
    assert "spent epsilon" in shown and "budget used" in shown and "allows at order" in shown, shown
    site.ledger_path.unlink()
    assert main(["ledger", "--config", str(cfg)]) == 1
    assert "released before" in capsys.readouterr().out
    assert main(["ledger", "--state-dir", str(state)]) == 1  # the mark lists it
    assert main(["site", "--config", str(cfg), "--check", "--insecure"]) == 2
    assert "released before" in capsys.readouterr().err
    assert not site.ledger_path.exists()


# ================================================================================================
# 3. a run never spends more than its epsilon
# ================================================================================================

def test_a_charge_past_the_runs_epsilon_is_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.jsonl", epsilon_budget=math.inf, delta=DELTA)
    one = epsilon_for([ROUND], DELTA)
    two = epsilon_for([ROUND, ROUND], DELTA)
    ledger.charge([ROUND], purpose="dpgan", run="e1", round=1, run_epsilon=two)
    ledger.charge([ROUND], purpose="dpgan", run="e2", round=1, run_epsilon=one)  # other runs do not count
    ledger.charge([ROUND], purpose="dpgan", run="e1", round=1, run_epsilon=two)  # a retry that still fits
    with pytest.raises(BudgetExceeded, match="the epsilon .* the run asked for"):
        ledger.charge([ROUND], purpose="dpgan", run="e1", round=2, run_epsilon=two)
    assert len(ledger.entries()) == 3
    assert ledger.run_spent("e1") == pytest.approx(two)
    _, reused = ledger.charge_once([ROUND], purpose="dpgan", run="e1", round=1, run_epsilon=two)
    assert reused  # reusing a charge adds nothing


def test_failed_retries_cannot_make_a_run_spend_past_its_epsilon(tmp_path):
    """The old site charged each failed attempt anew, checked only against its lifetime budget: one run of epsilon
    1 spent 2.4 of a site's 20 by failing 12 times. Now the retry that would pass the run's epsilon is refused with
    the generic budget refusal, before anything is charged."""
    site = _site(tmp_path, budget=30.0)
    ledger = open_ledger(site, DATA)
    folder = tmp_path / "state" / "runs" / "e1"
    run_epsilon = epsilon_for([ROUND, ROUND], DELTA) * 1.0000001
    refused = 0
    for _ in range(5):
        try:
            with charged_work(ledger, [ROUND], DATA, site, purpose="dpgan", run="e1", rnd=1, folder=folder,
                              run_epsilon=run_epsilon):
                raise RuntimeError("fails after its charge")
        except RuntimeError:
            pass
        except Refusal as err:
            refused += 1
            assert err.code == P.REFUSED_BUDGET
            assert err.public == "the requested work does not fit this site's privacy budget"
    assert refused == 3 and ledger.run_spent("e1") <= run_epsilon


def test_a_power_cut_after_a_sent_round_costs_a_new_charge_and_never_more_than_the_runs_epsilon(tmp_path):
    """The reviewer's case end to end: round 1 answered, then the saved reply and the mark lost. The re-sent round
    is charged again (a second release needs a second charge), and the run's last round no longer fits its
    epsilon."""
    from client.app import app as client_app
    from fedsynth.localgrid import LocalGrid
    from tests.spine_helpers import fast_config
    from tests.test_faults import gan_request, send
    from tests.test_hostile_coordinator import deployed_site

    cfg = fast_config(tmp_path, num_rounds=2)
    grid = LocalGrid(client_app, [deployed_site(tmp_path, train=DATA, epsilon=30.0)], cfg.to_flwr())
    assert not send(grid, 1000, gan_request(cfg, experiment="e1")).has_error()
    folder = tmp_path / "site-a" / "runs" / "e1"
    (folder / "gan-round-1.pt").unlink()
    (folder / "attempt-dpgan-1").write_text("")
    assert not send(grid, 1000, gan_request(cfg, experiment="e1")).has_error()
    last = send(grid, 1000, gan_request(cfg, experiment="e1", server_round=2))
    assert last.has_error() and last.error.code == P.REFUSED_BUDGET
    (path,) = (tmp_path / "site-a" / "ledger").glob("*.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()[1:]]
    run = [x for x in lines if x["type"] == "charge" and x["run"] == "e1"]
    assert [(x["purpose"], x["round"]) for x in run] == [("dpgan-census", 0), ("dpgan", 1), ("dpgan", 1)]
    assert epsilon_for([DPEvent.from_dict(e) for x in run for e in x["events"]], run[0]["delta"]) <= cfg.epsilon


def test_evaluation_queries_cannot_take_a_run_past_its_epsilon_either(tmp_path, monkeypatch):
    """A run's plan reserves room for the queries its sites allow; failed rounds charged again can use that room up,
    and the queries were charged against the site's budget alone: a run of epsilon 2 ended at 2.3. Now a query of a
    run with a plan is held to the run's epsilon too (a query under an id that never trained is bounded by the
    site's budget and, being charged, by nothing else: docs/privacy.md)."""
    from client.app import app as client_app
    from common.learner import build_learner
    from fedsynth.localgrid import LocalGrid
    from tests.spine_helpers import fast_config
    from tests.test_faults import gan_request, send
    from tests.test_hostile_coordinator import _evaluation, _train_round_raising, deployed_site

    digits = load_dataset("digits", "train")
    cfg = fast_config(tmp_path, num_rounds=2, epsilon=2.0)
    node = deployed_site(tmp_path, train=digits.subset(np.arange(600)), heldout=digits.subset(np.arange(600, 800)),
                         epsilon=30.0, evaluation=True, **{"queries-per-run": 10})
    grid = LocalGrid(client_app, [node], cfg.to_flwr(), parallel=False)
    for call in range(1, 5):  # round 1 fails after its charge, four times, each charged again
        _train_round_raising(monkeypatch, 1, RuntimeError("fails after its charge"))
        send(grid, 1000, gan_request(cfg, experiment="e1", server_round=1, epsilon=2.0))
    codes = []
    for query in range(10):  # (ten different classifiers: the same one re-sent gets its saved answer, review s63)
        torch.manual_seed(query)
        arrays = P.state_arrays(build_learner("logreg", (1, 8, 8), 10))
        reply = _evaluation(grid, 1000, arrays, "logreg", "e1")
        codes.append(reply.error.code if reply.has_error() else 0)
    assert P.REFUSED_BUDGET in codes  # the queries stop at the run's epsilon
    ledger = PrivacyLedger(tmp_path / "site-a" / "ledger" / "site-a.jsonl", epsilon_budget=math.inf, create=False)
    assert ledger.run_spent("e1") <= 2.0 + 1e-9


def test_a_run_id_used_for_queries_before_it_trained_cannot_then_train(tmp_path):
    """Queries under an id that has not trained have no run epsilon to be held to; training on top of them took the
    run past the epsilon it asked for (review: ten queries, then a census, 1.33 for a run of epsilon 1). A run's
    first census now refuses an id already charged for queries, before anything more is charged."""
    from client.app import app as client_app
    from common.learner import build_learner
    from fedsynth.localgrid import LocalGrid
    from tests.spine_helpers import fast_config
    from tests.test_faults import gan_request, send
    from tests.test_hostile_coordinator import _evaluation, deployed_site

    digits = load_dataset("digits", "train")
    cfg = fast_config(tmp_path, num_rounds=1, epsilon=1.0)
    node = deployed_site(tmp_path, train=digits.subset(np.arange(600)), heldout=digits.subset(np.arange(600, 800)),
                         epsilon=30.0, evaluation=True, **{"queries-per-run": 10})
    grid = LocalGrid(client_app, [node], cfg.to_flwr(), parallel=False)
    arrays = P.state_arrays(build_learner("logreg", (1, 8, 8), 10))
    assert not _evaluation(grid, 1000, arrays, "logreg", "e1").has_error()
    # (review s62: each answered query leaves a mark with its epsilon alone, for restoring a ledger from a backup)
    import json

    mark = json.loads((tmp_path / "site-a" / "runs" / "e1" / "evaluation-1.answered").read_text())
    assert mark["purpose"] == "evaluation" and mark["query"] == 1 and 0 < mark["epsilon-alone"] < 1
    # (at epsilon 10: at 1 no census could make a plan that also reserves the site's ten queries, which is refused
    # before this, at no cost: client.census.check_plan_possible)
    reply = send(grid, 1000, gan_request(cfg, experiment="e1", server_round=1, epsilon=10.0))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "trains first" in reply.error.reason
    ledger = PrivacyLedger(tmp_path / "site-a" / "ledger" / "site-a.jsonl", epsilon_budget=math.inf, create=False)
    assert [e["purpose"] for e in ledger.entries() if e["run"] == "e1"] == ["evaluation"]  # no census charged
    # a new id trains (at epsilon 10: at 1 the plan cannot also reserve the site's ten queries)
    assert not send(grid, 1000, gan_request(cfg, experiment="e2", server_round=1, epsilon=10.0)).has_error()


def test_a_census_drawn_again_is_held_to_the_runs_planned_epsilon_not_the_requests(tmp_path):
    """Review s68 K: a census drawn again (its file lost after the run's plan) was charged under the epsilon the
    request named, then the plan refused the request for changing it: a charge above the run's cap, for nothing.
    Now a request naming another epsilon is refused before the redraw's charge; the run's own epsilon redraws."""
    from client.app import app as client_app
    from fedsynth.localgrid import LocalGrid
    from tests.spine_helpers import charges, fast_config, nodes, spent
    from tests.test_faults import gan_request, send

    cfg = fast_config(tmp_path, epsilon=3.0, num_rounds=2)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    assert not send(grid, 1000, gan_request(cfg, epsilon=3.0)).has_error()
    census_file = next((tmp_path / "sites").rglob(CENSUS_FILE))
    census_file.unlink()  # lost after the plan (a crash, a partial restore)
    for _ in range(2):
        reply = send(grid, 1000, gan_request(cfg, server_round=2, epsilon=1000.0))
        assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "(epsilon)" in reply.error.reason
    assert [e["purpose"] for e in charges(tmp_path)[0]] == ["dpgan-census", "dpgan"]  # nothing charged
    # the run's own epsilon passes the check: the redraw is charged, held to the run's epsilon. The plan may have left
    # too little of it for a second census (refused, nothing charged) or for the round after it (the redraw charged,
    # the round refused): a budget refusal either way, and never past the run's epsilon
    reply = send(grid, 1000, gan_request(cfg, server_round=2, epsilon=3.0))
    entries = charges(tmp_path)[0]
    assert spent(tmp_path)[0] <= 3.0 + 1e-9
    if reply.has_error():
        assert reply.error.code == P.REFUSED_BUDGET
        assert [e["purpose"] for e in entries] in (["dpgan-census", "dpgan"],
                                                   ["dpgan-census", "dpgan", "dpgan-census"])
    else:
        assert [e["purpose"] for e in entries] == ["dpgan-census", "dpgan", "dpgan-census", "dpgan"]
        assert entries[2]["details"] == {"census-drawn-again": 1}
