"""A dropped site, a hostile or over-budget request, bad replies, and resume from a checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from client.app import app as client_app
from common import protocol as P
from common.models import GanShape, Generator
from fedsynth.localgrid import LocalGrid, run_inprocess, set_task_identity
from server.app import run_coordinator
from server.sites import RunFailed
from tests.spine_helpers import budget_used, charges, fast_config, ledger_paths, nodes, run, spent


def test_run_completes_with_quorum_when_a_site_never_answers(tmp_path):
    cfg = fast_config(tmp_path, round_timeout=2.0, quorum=0.5)
    report = run(cfg, k=3, drop_nodes=[1002])  # the third site is dead from the start
    assert [h["accepted"] for h in report["rounds"]] == [2, 2]
    assert all(h["aggregated"] and h["missing"] == 1 for h in report["rounds"])
    dropped = [s for s in report["sites"] if s["dropped"]]
    # the dead site never answered discovery either, so it is reported by node id
    assert len(dropped) == 1 and "no reply before the deadline" in json.dumps(dropped[0]["rounds_failed"])


def test_run_fails_clearly_without_quorum(tmp_path):
    cfg = fast_config(tmp_path, round_timeout=1.0, quorum=1.0, num_rounds=1)
    with pytest.raises(RunFailed, match="quorum"):
        run(cfg, k=2, drop_nodes=[1001])


def gan_request(cfg, **changes) -> P.GanTrainRequest:
    shape = GanShape(1, 8, 10, cfg.gan_latent_dim, cfg.gan_width)
    req = P.GanTrainRequest(
        experiment="hostile", server_round=1, num_rounds=cfg.num_rounds, local_steps=cfg.gan_local_steps,
        batch_size=cfg.gan_batch_size, max_grad_norm=1.0, lr_d=2e-4, lr_g=2e-4, d_width=0, ac_weight=0.3,
        mode_seeking=1.0, class_histogram=True, epsilon=cfg.epsilon, seed=0, channels=1, image_size=8,
        num_classes=10, latent_dim=shape.latent_dim, width=shape.width,
        generator={k: v.numpy() for k, v in Generator(shape).state_dict().items()})
    return replace(req, **changes)


def send(grid, node, request, extra_config=None):
    content = request.to_record()
    content[P.CONFIG].update(extra_config or {})
    from flwr.app import Message

    msg = Message(content, dst_node_id=node, message_type=request.MESSAGE_TYPE, group_id="1")
    return list(grid.send_and_receive([msg]))[0]


def test_site_refuses_over_budget_and_hostile_requests_without_spending(tmp_path):
    cfg = fast_config(tmp_path, epsilon=1.0, num_rounds=1)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    # far more rounds than a budget of 1 can pay for at this sampling rate -> refused before any training, with
    # only the run's census charged (the plan's sampling rate is set from the census: client.census.run_census)
    reply = send(grid, 1000, gan_request(cfg, num_rounds=50, local_steps=1000, batch_size=4096))  # within work limits
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET
    # the refusal says why without revealing the site's budget, spending or the noise it would need
    assert "budget" in reply.error.reason and "1" not in reply.error.reason.replace("site-1", "")
    # an attempt to dictate zero noise is not part of the protocol
    reply = send(grid, 1000, gan_request(cfg), extra_config={"noise-multiplier": 0.0})
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "noise-multiplier" in reply.error.reason
    # wrong data shape / a generator of another architecture
    reply = send(grid, 1000, gan_request(cfg, image_size=28))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    # recipe values that would only wreck the round (negative or NaN weights, zero learning rate, an EMA that
    # never moves, a CPU-burning number of G steps)
    for bad, name in (({"mode_seeking": -1.0}, "mode-seeking"), ({"ac_weight": float("inf")}, "ac-weight"),
                      ({"lr_g": 0.0}, "lr-g"), ({"ema": 1.0}, "ema"), ({"ema": float("nan")}, "ema"),
                      ({"g_steps": 10**6}, "g-steps"), ({"g_steps": 0}, "g-steps"),
                      ({"d_steps": 0}, "d-steps"), ({"d_steps": 201}, "d-steps"),
                      ({"long_steps": 1}, "long-steps"), ({"long_steps": -8}, "long-steps")):
        reply = send(grid, 1000, gan_request(cfg, **bad))
        assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
        assert name in reply.error.reason
    # an unknown message type is an error reply, not a crash
    from flwr.app import Message, RecordDict

    bogus = Message(RecordDict({}), dst_node_id=1000, message_type="query.dump", group_id="x")
    assert list(grid.send_and_receive([bogus]))[0].has_error()
    # nothing else was charged: every other refusal came before the census
    assert [[e["purpose"] for e in entries] for entries in charges(tmp_path)] == [["dpgan-census"]]


def test_a_crash_inside_a_handler_sends_no_traceback(tmp_path, monkeypatch):
    import client.gan_site as gan_site

    def explode(*args, **kwargs):
        raise RuntimeError("secret record value 0.123456 at /private/data/patient-17.png")

    monkeypatch.setattr(gan_site.LocalGanTrainer, "train_round", explode)
    cfg = fast_config(tmp_path, num_rounds=1)
    reply = send(LocalGrid(client_app, nodes(1), cfg.to_flwr()), 1000, gan_request(cfg))
    assert reply.has_error() and reply.error.code == P.SITE_FAILURE
    assert "secret" not in reply.error.reason and "patient" not in reply.error.reason
    assert "site's log" in reply.error.reason


def test_site_budget_is_the_sites_not_the_coordinators(tmp_path):
    cfg = fast_config(tmp_path, epsilon=float("inf"), num_rounds=1)
    node = {**nodes(1)[0], "epsilon": 2.0}  # the site's own budget (node config) is finite
    reply = send(LocalGrid(client_app, [node], cfg.to_flwr()), 1000, gan_request(cfg, epsilon=float("inf")))
    assert not reply.has_error()
    assert 0.9 < budget_used(tmp_path, 2.0)[0] <= 1.0 + 1e-9  # a non-private request got the site's budget...
    assert spent(tmp_path)[0] <= 2.0  # ... not more
    plan = json.loads(next((tmp_path / "sites").rglob("plan.json")).read_text())
    # the site's budget, read at its ledger's order, set the noise (this 4-step test plan is far from the order's
    # reference plan: at its own best order it costs 1.17 of the 2, client.ledger_order)
    assert plan["train_sigma"] > 0 and plan["budget_limited"] is True and plan["order"] == 9.9


def test_coordinator_rejects_nan_and_undeclared_arrays():
    from server.collect import exchange

    set_task_identity()
    shape = GanShape(1, 8, 10, 16, 16)
    spec = P.state_spec(Generator(shape).state_dict())
    good = {k: np.zeros(s.shape, np.float32) for k, s in spec.items()}
    assert P.check_arrays(good, spec) == []
    bad = dict(good)
    first = next(iter(bad))
    bad[first] = np.full_like(bad[first], np.nan)
    assert "NaN" in P.check_arrays(bad, spec)[0]
    assert "undeclared" in P.check_arrays({**good, "images": np.zeros(4, np.float32)}, spec)[0]
    assert exchange  # the collector applies check_arrays to every reply (test_protocol covers real runs)


class _CoordinatorKilled(Exception):
    pass


def test_coordinator_killed_after_round_one_resumes_at_round_two(tmp_path, monkeypatch):
    import server.fedavg as fedavg

    cfg = fast_config(tmp_path, num_rounds=2, experiment="exp-resume")
    real_save = fedavg.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["round"] == 1:
            raise _CoordinatorKilled()

    monkeypatch.setattr(fedavg, "save_checkpoint", save_then_die)
    with pytest.raises(_CoordinatorKilled):
        run(cfg)
    monkeypatch.setattr(fedavg, "save_checkpoint", real_save)
    sent = []
    report = run(cfg, tap=sent.append)  # same out-dir: resumes from the checkpoint
    assert [h["round"] for h in report["rounds"]] == [1, 2]
    rounds_sent = {m.metadata.group_id for m in sent if m.metadata.message_type == P.TRAIN_GAN}
    assert rounds_sent == {"2"}  # round 1 was not redone
    # each site charged its census and exactly two rounds in its ledger: no double spending across the restart
    assert [[e["round"] for e in entries] for entries in charges(tmp_path)] == [[0, 1, 2]] * 3


def test_coordinator_killed_after_the_last_round_samples_from_the_sites_on_resume(tmp_path, monkeypatch):
    """The last round's site generators and noisy class counts live in the checkpoint, not only in memory."""
    import server.fedavg as fedavg

    cfg = fast_config(tmp_path, num_rounds=1, experiment="exp-resume-last")
    real_save = fedavg.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        raise _CoordinatorKilled()

    monkeypatch.setattr(fedavg, "save_checkpoint", save_then_die)
    with pytest.raises(_CoordinatorKilled):
        run(cfg, k=2)
    monkeypatch.setattr(fedavg, "save_checkpoint", real_save)
    sent = []
    report = run(cfg, k=2, tap=sent.append)
    assert not [m for m in sent if m.metadata.message_type == P.TRAIN_GAN]  # nothing retrained
    made = report["synthetic"]["made"]
    assert made["from"] == "sites" and len(made["images-per-site-and-class"]) == 2


def test_a_run_keeps_the_g_steps_its_earlier_rounds_took_when_the_rule_changes(tmp_path, monkeypatch):
    """A run begun under one G-step rule and resumed under another (a newer fedsynth) stays one run."""
    import client.site_schedule

    cfg = fast_config(tmp_path, num_rounds=3)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())

    def g_steps(reply) -> int:
        assert not reply.has_error(), reply.error.reason
        return P.GanTrainReply.from_message(reply).g_steps

    # 8x8 digits at one site: far below the large-site size, so the rule gives g_steps
    assert g_steps(send(grid, 1000, gan_request(cfg, num_rounds=3, long_g_steps=2))) == 1
    monkeypatch.setattr(client.site_schedule, "LARGE_SITE_RECORDS", 0)  # the rule now calls every site large
    assert g_steps(send(grid, 1000, gan_request(cfg, experiment="new", num_rounds=3, long_g_steps=2))) == 2
    # ... but the run begun under the old rule keeps what its round 1 took
    assert g_steps(send(grid, 1000, gan_request(cfg, server_round=2, num_rounds=3, long_g_steps=2))) == 1
    # a request that cannot give the run's G steps is refused, with nothing charged for the round
    before = [len(entries) for entries in charges(tmp_path)]
    reply = send(grid, 1000, gan_request(cfg, server_round=3, num_rounds=3, g_steps=3))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "G steps" in reply.error.reason
    assert [len(entries) for entries in charges(tmp_path)] == before


def test_resent_round_is_answered_from_the_site_cache_without_spending(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1, experiment="exp-cache")
    run(cfg, k=2)
    first = spent(tmp_path)
    (tmp_path / "out" / "checkpoint.pt").unlink()  # coordinator lost its state: it re-sends round 1
    run(cfg, k=2)
    assert spent(tmp_path) == first
    assert [len(entries) for entries in charges(tmp_path)] == [2, 2]  # the census and round 1, once each


def test_site_refuses_modes_its_operator_did_not_allow(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, [{**nodes(1)[0], "modes": "bnstats"}], cfg.to_flwr())
    reply = send(grid, 1000, gan_request(cfg))
    assert reply.has_error() and reply.error.code == P.REFUSED_NOT_ALLOWED and "dpgan" in reply.error.reason


def test_replies_are_attributed_to_the_site_asked_even_when_the_superlink_answers(tmp_path):
    """A SuperLink answers for an unreachable site with its own id as sender; the loop must not lose the site."""
    from flwr.app import Error, Message

    from server.collect import broadcast

    set_task_identity()

    class SuperLinkAnswers(LocalGrid):
        def push_messages(self, messages):
            ids = []
            for msg in messages:
                msg.metadata.__dict__["_message_id"] = mid = f"m{len(ids)}"
                reply = Message(error=Error(code=5, reason="Node unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = 1  # the SuperLink, not the site
                reply.metadata.__dict__["_reply_to_message_id"] = mid
                self._replies[mid] = reply
                ids.append(mid)
            return ids

    grid = SuperLinkAnswers(client_app, nodes(2), fast_config(tmp_path).to_flwr())
    got = broadcast(grid, P.InfoRequest(), P.InfoReply, "x", timeout=1.0)
    assert sorted(got.failures) == [1000, 1001]


def test_run_stops_when_every_site_refuses_for_budget(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=3, epsilon=10.0)
    site_nodes = [{**n, "epsilon": 0.001} for n in nodes(2)]  # below what any useful noise can reach
    with pytest.raises(RunFailed, match="refused round 1 for lack of privacy budget"):
        run_inprocess(run_coordinator, client_app, cfg.to_flwr(), site_nodes)
    assert all(entries == [] for entries in charges(tmp_path))


def test_rerun_with_other_settings_into_the_same_out_dir_is_refused(tmp_path):
    run(fast_config(tmp_path, num_rounds=1), k=2)
    with pytest.raises(RunFailed, match=r"other settings \(changed: epsilon\)"):
        run(fast_config(tmp_path, num_rounds=1, epsilon=5.0), k=2)
    # an explicit fresh start in the same out-dir (new virtual sites: these ones spent their budget of 10 already)
    report = run(fast_config(tmp_path, num_rounds=1, epsilon=5.0, resume=False, state_dir=str(tmp_path / "new")), k=2)
    assert report["epsilon_target"] == 5.0
    assert len(ledger_paths(tmp_path)) == 2


def test_a_run_recorded_before_a_setting_existed_resumes_with_that_setting_at_its_default(tmp_path):
    import hashlib

    cfg = fast_config(tmp_path, num_rounds=1)
    first = run(cfg, k=2)
    charged = charges(tmp_path)
    path = Path(cfg.out_dir) / "run.json"
    recorded = json.loads(path.read_text())
    del recorded["settings"]["sensitive-attribute"]  # as an older fedsynth wrote it
    recorded["settings_hash"] = hashlib.sha256(json.dumps(recorded["settings"], sort_keys=True).encode()).hexdigest()[:16]
    path.write_text(json.dumps(recorded))
    again = run(cfg, k=2)  # resumes the same run: no new experiment, nothing charged twice
    assert again["experiment"] == first["experiment"] and charges(tmp_path) == charged
    with pytest.raises(RunFailed, match=r"changed: sensitive-attribute"):  # but a real change still counts
        recorded["settings"]["sensitive-attribute"] = "race"
        path.write_text(json.dumps(recorded))
        run(cfg, k=2)


def test_a_resumed_run_must_arrive_at_the_values_the_product_chose_when_it_began(tmp_path, caplog):
    """run.json keeps the rule-chosen values; a fedsynth whose rules now choose otherwise refuses to resume
    and names the --set that resumes it, and that --set does."""
    cfg = fast_config(tmp_path, num_rounds=1)  # gan-d-width left to the product: 16
    first = run(cfg, k=2)
    path = Path(cfg.out_dir) / "run.json"
    recorded = json.loads(path.read_text())
    assert recorded["chosen"]["gan-d-width"] == 16 and recorded["chosen"]["gan-resolution"] == 8
    charged = charges(tmp_path)
    recorded["chosen"]["gan-d-width"] = 8  # as if an older fedsynth's rule had chosen 8
    path.write_text(json.dumps(recorded))
    with pytest.raises(RunFailed, match=r"began with gan-d-width = 8; this run resolves gan-d-width = 16.*"
                                        r"--set gan-d-width=8"):
        run(cfg, k=2)
    again = run(replace(cfg, gan_d_width=8), k=2)  # the same run: resumed, nothing charged twice
    assert again["experiment"] == first["experiment"] and charges(tmp_path) == charged
    with pytest.raises(RunFailed, match=r"began with gan-d-width = 8; this run resolves gan-d-width = 4"):
        run(replace(cfg, gan_d_width=4), k=2)  # named, but not the value the run began with
    recorded = json.loads(path.read_text())
    del recorded["chosen"]["gan-long-g-steps"]  # recorded before that rule existed: it took gan-g-steps, as now
    path.write_text(json.dumps(recorded))
    assert run(replace(cfg, gan_d_width=8), k=2)["experiment"] == first["experiment"]
    from server.run_state import RunState

    as_before = RunState._as_recorded_before_rules_existed  # where the rule now chooses otherwise: refused, names 1
    assert as_before({"settings": {"gan-g-steps": 1}}, {"gan-long-g-steps": 2}) == {"gan-long-g-steps": 1}
    assert as_before({"settings": {}}, {"gan-long-g-steps": 0}) == {"gan-long-g-steps": 0}  # bnstats: no rule
    recorded = json.loads(path.read_text())
    del recorded["chosen"]  # a run recorded before fedsynth kept its choices: a named value is trusted, and said so
    path.write_text(json.dumps(recorded))
    assert run(replace(cfg, gan_d_width=16), k=2)["experiment"] == first["experiment"]
    assert "cannot be checked against them; resuming with the values named now" in caplog.text


def test_a_site_that_refused_the_run_is_not_asked_its_queries(tmp_path):
    """Review s67: a site whose plan could not pay for the evaluation and audit queries it reserves refuses the run's
    training, and so holds no plan for it; its queries were then bounded by its own budget alone, so it answered them
    past the epsilon the report states for the run (0.55 at a run of 0.3). The coordinator now asks only the sites
    that released something in the run, and the report names the others."""
    cfg = fast_config(tmp_path, num_rounds=1, epsilon=0.3, site_evaluation=True, site_audits=True)
    sites = nodes(3)
    for node in sites:
        node["epsilon"] = 10.0  # each site's budget is far above the run's epsilon
    for node in sites[1:]:
        node["evaluation"] = node["audits"] = False
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), sites)
    assert report["site_evaluation"]["not_trained"] == report["site_audits"]["not_trained"] == ["site-1"]
    assert [s["released"] for s in report["sites"] if s["name"] == "site-1"] == [[]]
    # site-1 was refused before its ledger began: only the two sites that trained have one, without queries
    assert [[e["purpose"] for e in entries] for entries in charges(tmp_path)] == [["dpgan-census", "dpgan"]] * 2
