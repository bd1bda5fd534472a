"""The BN-statistics mode through the real Flower apps: protocol, ledger, refusals, provided net."""

from __future__ import annotations

import math

import numpy as np
import torch

from client.app import app as client_app
from common import protocol as P
from common.bnnet import BNNet, net_file_payload
from common.data import load_dataset
from fedsynth.localgrid import run_inprocess
from server.app import run_coordinator
from server.sites import RunFailed
from tests.spine_helpers import charges, fast_config, nodes

import pytest


def bn_config(tmp_path, **overrides):
    base = dict(mode="bnstats", bn_rounds=2, bn_local_steps=2, bn_width=8, bn_iterations=5, bn_synth_batch=50,
                synthetic_size=50)
    base.update(overrides)
    return fast_config(tmp_path, **base)


def test_bnstats_run_sends_only_declared_arrays_and_accounts_every_release(tmp_path):
    cfg = bn_config(tmp_path, epsilon=10.0)
    seen = []
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(3), tap=seen.append)
    assert report["mode"] == "bnstats" and report["private"]
    net = BNNet(1, 10, 8, 8)
    net_spec = P.state_spec(net.state_dict())
    layout = P.stats_layout(__import__("common.bnnet", fromlist=["x"]).norm_layer_channels(net), 10)
    kinds = sorted({m.metadata.message_type for m in seen})
    assert kinds == sorted([P.QUERY_INFO, P.TRAIN_BNNET, P.QUERY_BNSTATS])
    released: list[np.ndarray] = []
    for reply in seen:
        assert not reply.has_error()
        if reply.metadata.message_type == P.TRAIN_BNNET:
            decoded = P.BnTrainReply.from_message(reply)
            assert P.check_arrays(decoded.net, net_spec) == [] and decoded.weight >= 1
        if reply.metadata.message_type == P.QUERY_BNSTATS:
            stats = P.BnStatsReply.from_message(reply).stats
            assert P.check_arrays(stats, {k: P.ArraySpec(v) for k, v in layout.items()}) == []
            # whole numbers: integer noise (client.discrete_gaussian), so no float bits beyond the noisy value
            assert np.array_equal(stats["count"], np.round(stats["count"]))
            released.append(stats["count"])
    # noisy: the three sites' counts together are not the pooled training data's exact class counts
    assert len(released) == 3
    assert not np.array_equal(np.sum(released, axis=0), load_dataset("digits").class_counts())
    # every site: its census (on its own, before the plan), 2 net rounds + 1 statistics release in its ledger,
    # total within the run's epsilon
    for entries in charges(tmp_path):
        assert [e["purpose"] for e in entries] == ["bnstats-census", "bnstats-net", "bnstats-net", "bnstats-release"]
        assert [len(e["events"]) for e in entries] == [1, 1, 1, 1]
        assert 9.0 < entries[-1]["epsilon_after"] <= 10.0
    assert len(report["synthetic"]["class_counts"]) == 10 and report["synthetic"]["count"] == 50


def test_sites_with_budgets_below_the_request_spend_only_their_budget(tmp_path):
    cfg = bn_config(tmp_path, epsilon=10.0, quorum=1.0)
    site_nodes = [{**n, "epsilon": 0.5} for n in nodes(2)]  # the sites' own budgets are far below the request
    run_inprocess(run_coordinator, client_app, cfg.to_flwr(), site_nodes)
    for entries in charges(tmp_path):  # the one planner gave the whole run the site's budget, not the request
        assert [e["purpose"] for e in entries] == ["bnstats-census", "bnstats-net", "bnstats-net", "bnstats-release"]
        assert 0.4 < entries[-1]["epsilon_after"] <= 0.5 + 1e-9


def test_sites_without_budget_refuse_before_any_work(tmp_path):
    cfg = bn_config(tmp_path, epsilon=10.0, quorum=1.0)
    site_nodes = [{**n, "epsilon": 0.001} for n in nodes(2)]  # no useful noise level fits
    with pytest.raises(RunFailed, match="refused round 1 for lack of privacy budget"):
        run_inprocess(run_coordinator, client_app, cfg.to_flwr(), site_nodes)
    assert all(entries == [] for entries in charges(tmp_path))  # nothing was spent


def test_coordinator_provided_net_costs_the_sites_nothing_but_the_statistics(tmp_path):
    torch.manual_seed(0)
    net_file = tmp_path / "public_net.pt"
    torch.save(net_file_payload(BNNet(1, 10, 8, 8)), net_file)
    # a file trained at another side than the run's net works at is refused before anything is asked or spent
    wrong_side = tmp_path / "wrong_side.pt"
    torch.save({**net_file_payload(BNNet(1, 10, 8, 8)), "side": 16}, wrong_side)
    refused = bn_config(tmp_path / "refused", bn_net=str(wrong_side), bn_rounds=0, epsilon=2.0)
    with pytest.raises(RunFailed, match="trained at 16 pixels .* set bn-resolution=16"):
        run_inprocess(run_coordinator, client_app, refused.to_flwr(), nodes(2))
    assert all(entries == [] for entries in charges(tmp_path / "refused"))
    cfg = bn_config(tmp_path, bn_net=str(net_file), bn_rounds=0, epsilon=2.0)
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(2))
    assert report["rounds"] == []
    for entries in charges(tmp_path):
        assert [e["purpose"] for e in entries] == ["bnstats-release"]
        assert 1.8 < entries[0]["epsilon_after"] <= 2.0  # no DP-SGD: the statistics get the whole epsilon


def test_non_private_bnstats_is_exact_and_marked(tmp_path):
    cfg = bn_config(tmp_path, epsilon=math.inf)
    seen = []
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(2), tap=seen.append)
    assert report["private"] is False and "NOT differentially private" in report["privacy_statement"]
    stats = [m for m in seen if m.metadata.message_type == P.QUERY_BNSTATS]
    counts = sum(P.BnStatsReply.from_message(m).stats["count"] for m in stats)
    assert np.allclose(counts, np.bincount(__import__("common.data", fromlist=["x"]).load_dataset("digits").labels))


def test_head_norm_net_with_per_layer_clips_runs_and_sends_the_head_statistics(tmp_path):
    cfg = bn_config(tmp_path, bn_head_norm=True, bn_layer_clips="1,2,3,40", bn_rounds=1)
    seen = []
    run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(2), tap=seen.append)
    stats = [m for m in seen if m.metadata.message_type == P.QUERY_BNSTATS]
    assert stats and all(not m.has_error() for m in stats)
    assert "sum/head_norm.norm" in P.BnStatsReply.from_message(stats[0]).stats
    # a wrong number of bounds is a bad request, refused before any release
    bad = bn_config(tmp_path / "bad", bn_head_norm=True, bn_layer_clips="1,2", bn_rounds=1)
    with pytest.raises(RunFailed):
        run_inprocess(run_coordinator, client_app, bad.to_flwr(), nodes(2))
    assert all(all(e["purpose"] != "bnstats-release" for e in entries) for entries in charges(tmp_path / "bad"))


def test_auto_clip_bounds_are_chosen_privately_and_accounted_with_the_release(tmp_path):
    net_file = tmp_path / "public_net.pt"
    torch.manual_seed(0)
    torch.save(BNNet(1, 10, 8, 8, head_norm=True).state_dict(), net_file)  # a bare state dict (older files) loads
    cfg = bn_config(tmp_path, bn_net=str(net_file), bn_rounds=0, bn_head_norm=True, bn_layer_clips="auto",
                    epsilon=3.0)
    seen = []
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(2), tap=seen.append)
    assert report["synthetic"]["count"] == 50
    stats = [m for m in seen if m.metadata.message_type == P.QUERY_BNSTATS and not m.has_error()]
    assert len(stats) == 2
    for entries in charges(tmp_path):
        # one ledger entry: the clip-bound histogram (z = 10) and the statistics release, within epsilon
        assert [e["purpose"] for e in entries] == ["bnstats-release"]
        sigmas = [ev["noise_multiplier"] for ev in entries[0]["events"]]
        assert len(sigmas) == 2 and sigmas[0] == 10.0 and 0 < sigmas[1] < 10.0
        assert 2.7 < entries[0]["epsilon_after"] <= 3.0


def test_the_net_works_at_bn_resolution_and_the_synthesis_is_resized_to_the_image_side(tmp_path):
    """16x16 records, bn-resolution 8: the sites average each record down to 8x8 inside the shared net, the
    synthesis draws at 8x8 and the synthetic set comes out at the images' 16x16."""
    cfg = bn_config(tmp_path, epsilon=10.0, image_size=16, bn_resolution=8)
    seen = []
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(2), tap=seen.append)
    net_spec = P.state_spec(BNNet(1, 10, 16, 8, resolution=8).state_dict())
    assert net_spec != P.state_spec(BNNet(1, 10, 16, 8).state_dict())  # the head is that of an 8-pixel net
    replies = [P.BnTrainReply.from_message(m) for m in seen if m.metadata.message_type == P.TRAIN_BNNET]
    assert replies and all(P.check_arrays(r.net, net_spec) == [] for r in replies)
    synth = load_dataset(tmp_path / "out" / "synthetic.npz", "train", whole=True)
    assert synth.image_shape == (1, 16, 16) and report["config"]["bn-resolution"] == 8


def test_a_site_refuses_a_net_resolution_its_images_cannot_have(tmp_path, monkeypatch, caplog):
    import server.modes.bnstats as mode

    real = mode.plan_settings
    monkeypatch.setattr(mode, "plan_settings", lambda *a, **k: {**real(*a, **k), "resolution": 16})  # 8x8 data
    cfg = bn_config(tmp_path, epsilon=10.0, quorum=1.0)
    with pytest.raises(RunFailed, match="never trained"):
        run_inprocess(run_coordinator, client_app, cfg.to_flwr(), nodes(2))
    assert "refused (bad request): site-1: the shared net's shape cannot be built" in caplog.text
    assert "bn-resolution) must be between 8 and the image side 8" in caplog.text
    assert all(entries == [] for entries in charges(tmp_path))  # refused before any work: nothing spent
