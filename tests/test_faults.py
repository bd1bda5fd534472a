"""A dropped site, a hostile or over-budget request, bad replies, and resume from a checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.app import app as client_app
from common import protocol as P
from common.models import GanShape, Generator
from fedsynth.localgrid import LocalGrid, run_inprocess, set_task_identity
from server.aggregate import accept_gan_reply
from server.app import RunFailed, run_coordinator
from tests.spine_helpers import fast_config, nodes, run


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


def _gan_request(cfg, shape, **changes):
    req = {"experiment": "hostile", "server-round": 1, "num-rounds": cfg.num_rounds,
           "local-steps": cfg.gan_local_steps, "batch-size": cfg.gan_batch_size, "max-grad-norm": 1.0,
           "lr-d": 2e-4, "lr-g": 2e-4, "d-width": 0, "ac-weight": 0.3, "mode-seeking": 1.0, "class-histogram": True, "epsilon": cfg.epsilon, "delta": 0.0, "seed": 0, "channels": 1,
           "image-size": 8, "num-classes": 10, "latent-dim": shape.latent_dim, "width": shape.width}
    req.update(changes)
    return req


def _send(grid, node, shape, req, extra_config=None):
    cfg_rec = ConfigRecord({**req, **(extra_config or {})})
    msg = Message(RecordDict({P.REQ_GENERATOR: ArrayRecord(Generator(shape).state_dict()), P.REQ_CONFIG: cfg_rec}),
                  dst_node_id=node, message_type=P.TRAIN_GAN, group_id="1")
    return list(grid.send_and_receive([msg]))[0]


def _ledger_lines(tmp_path):
    return sum(len(p.read_text().splitlines()) for p in (tmp_path / "sites").rglob("ledger/*.jsonl"))


def test_site_refuses_over_budget_and_hostile_requests_without_spending(tmp_path):
    cfg = fast_config(tmp_path, epsilon=1.0, num_rounds=1)
    shape = GanShape(1, 8, 10, cfg.gan_latent_dim, cfg.gan_width)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    # far more rounds than a budget of 1 can pay for at this sampling rate -> refused before any work
    reply = _send(grid, 1000, shape, _gan_request(cfg, shape, **{"num-rounds": 10**7, "local-steps": 10**4}))
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET
    assert "budget" in reply.error.reason
    # an attempt to dictate zero noise is not part of the protocol
    reply = _send(grid, 1000, shape, _gan_request(cfg, shape), extra_config={"noise-multiplier": 0.0})
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    # asking for a non-private run does not lift the site's own budget: the site stays private
    assert _ledger_lines(tmp_path) <= 1  # at most a ledger header so far, no release
    # wrong data shape / a generator of another architecture
    reply = _send(grid, 1000, shape, _gan_request(cfg, shape, **{"image-size": 28}))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    # recipe values that would only wreck the round (negative or NaN weights, zero learning rate)
    for bad in ({"mode-seeking": -1.0}, {"ac-weight": float("nan")}, {"lr-g": 0.0}):
        reply = _send(grid, 1000, shape, _gan_request(cfg, shape, **bad))
        assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
        assert next(iter(bad)) in reply.error.reason
    # an unknown message type is an error reply, not a crash
    bogus = Message(RecordDict({}), dst_node_id=1000, message_type="query.dump", group_id="x")
    assert list(grid.send_and_receive([bogus]))[0].has_error()
    ledgers = list((tmp_path / "sites").rglob("ledger/*.jsonl"))
    assert all('"purpose"' not in p.read_text() for p in ledgers)


def test_site_budget_is_the_sites_not_the_coordinators(tmp_path):
    cfg = fast_config(tmp_path, epsilon=float("inf"), num_rounds=1)
    shape = GanShape(1, 8, 10, cfg.gan_latent_dim, cfg.gan_width)
    node = {**nodes(1)[0], "epsilon": 2.0}  # the site's own budget (node config) is finite
    grid = LocalGrid(client_app, [node], cfg.to_flwr())
    reply = _send(grid, 1000, shape, _gan_request(cfg, shape))
    assert not reply.has_error()
    metrics = reply.content.metric_records[P.REPLY_METRICS]
    assert metrics["noise-multiplier"] > 0 and metrics["epsilon"] <= 2.0


def test_coordinator_rejects_nan_and_undeclared_arrays():
    set_task_identity()
    shape = GanShape(1, 8, 10, 16, 16)
    spec = P.generator_spec(Generator(shape).state_dict())
    good = {k: np.zeros(s.shape, np.float32) for k, s in spec.items()}

    def reply(arrays):
        req = Message(RecordDict({}), dst_node_id=1, message_type=P.TRAIN_GAN, group_id="1")
        req.metadata.__dict__["_message_id"] = "m"
        rec = ArrayRecord({k: __import__("flwr.app", fromlist=["Array"]).Array(v) for k, v in arrays.items()})
        return Message(RecordDict({P.REPLY_GENERATOR: rec, P.REPLY_METRICS: MetricRecord({"num-examples": 5})}), reply_to=req)

    assert accept_gan_reply(reply(good), spec)[0] is not None
    bad = dict(good)
    first = next(iter(bad))
    bad[first] = np.full_like(bad[first], np.nan)
    assert "NaN" in accept_gan_reply(reply(bad), spec)[1]
    assert "undeclared" in accept_gan_reply(reply({**good, "images": np.zeros(4, np.float32)}), spec)[1]


class _CoordinatorKilled(Exception):
    pass


def test_coordinator_killed_after_round_one_resumes_at_round_two(tmp_path, monkeypatch):
    import server.fedavg as server_app

    cfg = fast_config(tmp_path, num_rounds=2, experiment="exp-resume")
    real_save = server_app.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state["round"] == 1:
            raise _CoordinatorKilled()

    monkeypatch.setattr(server_app, "save_checkpoint", save_then_die)
    with pytest.raises(_CoordinatorKilled):
        run(cfg)
    monkeypatch.setattr(server_app, "save_checkpoint", real_save)
    sent = []
    report = run(cfg, tap=sent.append)  # same out-dir: resumes from the checkpoint
    assert [h["round"] for h in report["rounds"]] == [1, 2]
    rounds_sent = {m.metadata.group_id for m in sent if m.metadata.message_type == P.TRAIN_GAN}
    assert rounds_sent == {"2"}  # round 1 was not redone
    # each site charged exactly two rounds in its ledger: no double spending across the restart
    for ledger in (tmp_path / "sites").rglob("ledger/*.jsonl"):
        entries = [json.loads(line) for line in ledger.read_text().splitlines() if '"purpose"' in line]
        assert [e["round"] for e in entries] == [1, 2]


def test_resent_round_is_answered_from_the_site_cache_without_spending(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1, experiment="exp-cache")
    first = run(cfg, k=2)
    (tmp_path / "out" / "checkpoint.pt").unlink()  # coordinator lost its state: it re-sends round 1
    second = run(cfg, k=2)
    assert [s["epsilon"] for s in second["sites"]] == [s["epsilon"] for s in first["sites"]]
    for ledger in (tmp_path / "sites").rglob("ledger/*.jsonl"):
        assert sum('"purpose"' in line for line in ledger.read_text().splitlines()) == 1


def test_site_refuses_modes_its_operator_did_not_allow(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    shape = GanShape(1, 8, 10, cfg.gan_latent_dim, cfg.gan_width)
    grid = LocalGrid(client_app, [{**nodes(1)[0], "modes": "bnstats"}], cfg.to_flwr())
    reply = _send(grid, 1000, shape, _gan_request(cfg, shape))
    assert reply.has_error() and reply.error.code == P.REFUSED_NOT_ALLOWED and "dpgan" in reply.error.reason


def test_replies_are_attributed_to_the_site_asked_even_when_the_superlink_answers(tmp_path):
    """A SuperLink answers for an unreachable site with its own id as sender; the loop must not lose the site."""
    from flwr.app import Error

    from server.rounds import send_collect

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
    msgs = [Message(RecordDict({}), dst_node_id=n, message_type=P.QUERY_INFO, group_id="x") for n in (1000, 1001)]
    ex = send_collect(grid, msgs, timeout=1.0)
    assert sorted(r.metadata.src_node_id for r in ex.errors) == [1000, 1001]


def test_run_stops_when_every_site_refuses_for_budget(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=3, epsilon=10.0)
    site_nodes = [{**n, "epsilon": 0.001} for n in nodes(2)]  # below what any noise can reach
    with pytest.raises(RunFailed, match="refused round 1 for lack of privacy budget"):
        run_inprocess(run_coordinator, client_app, cfg.to_flwr(), site_nodes)
