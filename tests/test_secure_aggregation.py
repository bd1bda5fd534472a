"""Secure aggregation (SecAgg+ through Flower's mod): the coordinator gets only sums over the sites.

In-process sites (``LocalGrid``: the real ClientApp with its mods, a copy of each message per site). The
sums are checked against the same releases in the clear: a site that does not require secure aggregation answers a
re-sent plain request from its saved reply (a release without split noise is DP on its own), so asking the same sites
the same request in the clear afterwards shows exactly what each added. A second *secure* sum of a saved release is
refused (it went into one masked vector already: the tests at the end).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from client.app import app as client_app
from common import protocol as P
from common import secure_wire
from common.models import Generator
from fedsynth.localgrid import LocalGrid
from server.collect import broadcast
from server.fedavg import weighted_average
from server.modes.dpgan import gan_request
from server.secure_agg import default_threshold, secure_sum
from tests.spine_helpers import charges, fast_config, nodes, run, spent


def _grid(cfg, k: int, **kwargs) -> LocalGrid:
    return LocalGrid(client_app, nodes(k), cfg.to_flwr(), **kwargs)


def _gan_request(cfg, rnd: int = 1) -> P.GanTrainRequest:
    shape = cfg.gan_shape(1, 8, 10)
    return gan_request(cfg, shape, "exp-secure", rnd, P.state_arrays(Generator(shape)))


def _saved_replies(tmp_path, name: str, reply_cls) -> list:
    """Every simulated site's saved reply of one release (the file ``name`` in its run folder), as sent."""
    import torch

    paths = sorted((tmp_path / "sites").rglob(name))
    assert len(paths) == 3, paths
    def arrays(value):  # (saved as tensors where the reply holds arrays)
        return {k: np.asarray(v) for k, v in value.items()} if isinstance(value, dict) else value

    return [reply_cls(**{k: arrays(v) for k, v in torch.load(p, weights_only=True)["reply"].items()}) for p in paths]


def test_the_secure_average_is_the_plain_weighted_average_within_the_quantization_error(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=2)
    grid = _grid(cfg, 3)
    request = _gan_request(cfg)
    names = list(request.generator)
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=1, timeout=30)
    assert got.contributors == [1000, 1001, 1002] and not got.failures
    secure = secure_wire.from_sum(P.TRAIN_GAN, names, got.total)
    charged = spent(tmp_path)
    # the same request in the clear is refused (client/release_marks.py: a release leaves one way) with nothing
    # charged; the sites' saved replies are what the sum summed
    plain = broadcast(grid, request, P.GanTrainReply, "again", 30, sorted(grid.get_node_ids()))
    assert not plain.replies and all(P.ALREADY_SUMMED in why for why in plain.failures.values())
    assert spent(tmp_path) == charged and [len(c) for c in charges(tmp_path)] == [2, 2, 2]  # census, round 1
    replies = _saved_replies(tmp_path, "gan-round-1.pt", P.GanTrainReply)
    clear = weighted_average([r.generator for r in replies], [r.weight for r in replies])
    total_weight = sum(r.weight for r in replies)
    # stochastic rounding moves each of the 3 sites' w*x and w by less than one step (0.125): the average
    # sum(w x) / sum(w) is off by at most 3 step (1 + |x|) / sum(w)
    for k in names:
        bound = 3 * P.SECAGG_STEP * (1 + np.abs(clear[k])) / (total_weight - 3 * P.SECAGG_STEP) + 1e-6
        assert np.all(np.abs(secure[k] - clear[k]) <= bound), k
    assert max(float(np.max(np.abs(secure[k] - clear[k]))) for k in names) > 0  # it went through the quantizer


def test_the_secure_statistics_are_the_plain_pooled_sums_within_the_quantization_error(tmp_path):
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)
    from common.bnnet import BNNet, norm_layer_channels
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    net = BNNet(1, 10, 8, 8)
    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "exp-secure-stats")
    settings["net_rounds"] = 0
    request = P.BnStatsRequest(**settings, net=P.state_arrays(net))
    names = list(P.stats_layout(norm_layer_channels(net), 10))
    grid = _grid(cfg, 3)
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=0, timeout=30)
    pooled = secure_wire.from_sum(P.QUERY_BNSTATS, names, got.total)
    replies = _saved_replies(tmp_path, "stats-release.pt", P.BnStatsReply)  # (in the clear: refused, above)
    clear = {k: sum(np.asarray(r.stats[k], dtype=np.float64) for r in replies) for k in names}
    for k in names:
        assert pooled[k].shape == clear[k].shape
        assert np.max(np.abs(pooled[k] - clear[k])) <= 3 * P.SECAGG_STEP + 1e-9, k


def test_no_message_the_coordinator_receives_holds_a_sites_release_in_the_clear(tmp_path):
    seen = []
    report = run(fast_config(tmp_path, secure_aggregation=True, num_rounds=1), k=3, tap=seen.append)
    assert report["rounds"][0]["aggregated"] and report["rounds"][0]["secure"]
    assert {s["released"][0] for s in report["sites"]} == {"generator (secure sum)"}
    assert all(s["weight"] == 0 for s in report["sites"])  # no site's weight either: it travels in the sum
    # nor a site's census: the synthetic set is balanced over the classes, and the report says why
    mix = json.loads((tmp_path / "out" / "report.json").read_text())["synthetic"]["made"]["class-mix"]
    assert mix["images-per-class"] == [10] * 10 and "secure aggregation" in mix["why"]
    train = [m for m in seen if m.metadata.message_type == P.SECURE_TRAIN]
    assert len(train) == 4 * 3  # four SecAgg+ stages, three sites
    stages = list(P.SECURE_REPLY_DECLARATIONS)
    masked = []
    for i, reply in enumerate(train):
        assert not reply.has_error()
        keys = set(reply.content[P.SECAGG_RECORD].keys())
        stage = stages[i // 3]
        assert keys == set(P.SECURE_REPLY_DECLARATIONS[stage]), (stage, keys)
        others = set(reply.content.keys()) - {P.SECAGG_RECORD}
        assert others <= set(P.SECURE_FITRES_RECORDS), others
        # no array leaves in the clear: the FitRes parameters are emptied, the vector is only masked
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())
        if stage == "collect_masked_vectors":
            assert reply.content.metric_records["fitres.num_examples"]["num_examples"] == 1
            assert dict(reply.content.config_records["fitres.metrics"]) == {}
            masked.append(reply.content[P.SECAGG_RECORD]["masked_params"])
    # a masked vector looks uniform: the generator's small weights (|x| < 10) would sit near the range's middle
    from flwr.common import bytes_to_ndarray

    for vec in masked:
        values = np.concatenate([bytes_to_ndarray(b).ravel() for b in vec[1:]]).astype(np.float64)
        assert abs(values.mean() / P.SECAGG_MODULUS - 0.5) < 0.01 and values.std() / P.SECAGG_MODULUS > 0.25


@pytest.mark.parametrize("dies_after", ["setup", "share_keys", "collect_masked_vectors"])
def test_a_site_killed_mid_aggregation_does_not_stop_the_round(tmp_path, dies_after):
    """(review s62: a site that left after the setup stage, before sharing its keys, stayed among the sampled sites
    in Flower's workflow and was listed as dropped at unmask, where nobody held its shares: the sum failed after every
    site's charge. server.secure_agg drops it from the sampled sites.)"""
    cfg = fast_config(tmp_path, num_rounds=1)
    victim = 1003
    answered = {"n": 0}
    stage_replies = {"setup": 1, "share_keys": 2, "collect_masked_vectors": 3}[dies_after]

    def tap(reply):
        if reply.metadata.src_node_id == victim and reply.metadata.message_type == P.SECURE_TRAIN:
            answered["n"] += 1
            if answered["n"] == stage_replies:
                grid.drop_nodes.add(victim)  # its next message is never answered

    grid = _grid(cfg, 4, tap=tap)
    request = _gan_request(cfg)
    assert default_threshold(4) == 3
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=1, timeout=5)
    assert got.total is not None, got.reason
    # a site dead before its masked vector is left out; one dead after it is inside the sum
    assert got.contributors == ([1000, 1001, 1002] if dies_after != "collect_masked_vectors" else
                                [1000, 1001, 1002, 1003])
    assert victim in got.failures or dies_after == "collect_masked_vectors"


def test_below_the_threshold_the_round_fails_cleanly_and_a_retry_cannot_sum_the_sent_releases_again(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = _grid(cfg, 4, parallel=False)  # one site after another, so two can die after two others trained
    request = _gan_request(cfg)

    def kill_two(reply):
        if reply.metadata.src_node_id == 1001 and "masked_params" in reply.content[P.SECAGG_RECORD]:
            grid.drop_nodes.update({1002, 1003})  # once two sites trained, the other two die: 2 < threshold 3

    grid.tap = kill_two
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=1, timeout=5)
    assert got.total is None and "threshold" in got.reason
    first = spent(tmp_path)
    assert len(first) == 2  # two sites trained (and charged) before the aggregation failed
    grid.drop_nodes.clear()
    grid.tap = None
    again = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=1, timeout=5)
    # the two that sent their masked vectors refuse a second sum of the same release (with the first, it would
    # isolate theirs); the two that never reached that stage add theirs, too few to unmask: a clear failure that
    # says to start a new experiment, and nobody is charged twice
    assert again.total is None and "start a new experiment" in again.reason
    assert {n for n, why in again.failures.items() if P.ALREADY_SUMMED in why} == {1000, 1001}
    assert [len(c) for c in charges(tmp_path)] == [2, 2, 2, 2]  # each site's census and round 1, once
    assert spent(tmp_path)[:2] == first[:2]


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_run_and_spends_nothing(tmp_path):
    from fedsynth.localgrid import run_inprocess
    from server.app import run_coordinator
    from server.sites import RunFailed

    strict = [{**n, "require-secure-aggregation": True} for n in nodes(3)]
    cfg = fast_config(tmp_path, num_rounds=1)
    with pytest.raises(RunFailed, match="quorum"):
        run_inprocess(run_coordinator, client_app, cfg.to_flwr(), strict)
    assert spent(tmp_path) == []  # no ledger was even opened
    secure = fast_config(tmp_path, num_rounds=1, secure_aggregation=True, out_dir=str(tmp_path / "out2"))
    report = run_inprocess(run_coordinator, client_app, secure.to_flwr(), strict)
    assert report["rounds"][0]["aggregated"] and all(0 < e <= 10 for e in spent(tmp_path))


def test_secure_aggregation_needs_three_sites(tmp_path):
    from server.sites import RunFailed

    with pytest.raises(RunFailed, match="needs 3 to"):
        run(fast_config(tmp_path, secure_aggregation=True, num_rounds=1), k=2)


def test_a_secure_statistics_run_completes(tmp_path):
    cfg = fast_config(tmp_path, mode="bnstats", secure_aggregation=True, distributed_noise=True, bn_rounds=1,
                      bn_local_steps=2, bn_width=8, bn_iterations=3, bn_synth_batch=50, synthetic_size=50)
    report = run(cfg, k=3)
    assert "Secure aggregation (SecAgg+)" in report["privacy_statement"]
    statement = report["privacy_statement"]
    assert "Distributed noise: each site added only part" in statement and "1/sqrt(2)" in statement
    facts = report["secure_aggregation"]
    assert facts["threshold"] == 2 and facts["noise_shares"] == 2 and facts["quantization_step"] == 0.125
    assert "a pooled statistic is off by at most 0.375" in facts["precision"]
    released = {r for s in report["sites"] for r in s["released"]}
    assert released == {"shared net (secure sum)", "class statistics (secure sum)"}
    # the shared net's census is charged and summed too, though the coordinator never sees a site's weight
    # (review s67: it was left out of the statement of secure runs)
    assert all(any("noisy class histogram" in r and "by subtraction" in r for r in row["released"])
               for row in report["privacy"]["sites"])
    assert report["synthetic"]["count"] == 50


def _split_noise_request(cfg, experiment: str, shares: int) -> tuple[dict, P.BnStatsRequest]:
    """(plan settings, query.bnstats request) of a statistics release with a provided net and its noise split over
    ``shares`` sites."""
    from common.bnnet import BNNet
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), experiment)
    settings.update(net_rounds=0, noise_shares=shares)
    return settings, P.BnStatsRequest(**settings, net=P.state_arrays(BNNet(1, 10, 8, 8)))


def test_distributed_noise_is_refused_in_the_clear_and_split_inside_a_secure_sum(tmp_path):
    from client.bn_site import noise_share

    # (the run asks for distributed noise, so its virtual sites allow it: allow_distributed_noise)
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50, secure_aggregation=True,
                      distributed_noise=True)
    settings, request = _split_noise_request(cfg, "exp-distributed", 2)
    grid = _grid(cfg, 3)
    # a coordinator asking for the split noise in the clear would see a release with too little noise: refused
    plain = broadcast(grid, request, P.BnStatsReply, "clear", 30, sorted(grid.get_node_ids()))
    assert not plain.replies and set(plain.codes.values()) == {P.REFUSED_BAD_REQUEST}
    assert spent(tmp_path) == []
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=0, timeout=30)
    assert got.total is not None
    for entries in charges(tmp_path):  # charged for the sum's guarantee; the site's own noise is written down
        (release,) = [e for e in entries if e["purpose"] == "bnstats-release"]
        own, charged = release["details"]["own-noise-multiplier"], release["events"][-1]["noise_multiplier"]
        assert release["details"]["distributed-noise-shares"] == 2 and own == noise_share(charged, request)
        assert charged / np.sqrt(2) <= own < charged
    # the saved split-noise release asked for again in the clear (noise-shares 1), as every other release may be:
    # it would show each site's release alone with 1/sqrt(2) of its noise, so it is refused, and nothing is charged
    after = spent(tmp_path)
    again = broadcast(grid, P.BnStatsRequest(**{**settings, "noise_shares": 1}, net=request.net), P.BnStatsReply,
                      "replay", 30, sorted(grid.get_node_ids()))
    assert not again.replies and set(again.codes.values()) == {P.REFUSED_BAD_REQUEST}
    assert all(P.ALREADY_SUMMED in why for why in again.failures.values())  # (client/release_marks.py)
    assert spent(tmp_path) == after
    # nor inside a second secure sum with the same split: it went into one masked vector already, and the difference
    # of two sums over other sets of sites would show it alone (client.secure_site: the mark)
    resent = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=1, timeout=30)
    assert resent.total is None and all(P.ALREADY_SUMMED in why for why in resent.failures.values())
    assert spent(tmp_path) == after
    # a release saved by a fedsynth that did not keep the split with it: not sent again in any way
    import torch

    for path in (tmp_path / "sites").rglob("stats-release.pt"):
        saved = torch.load(path, weights_only=True)
        torch.save({"reply": saved["reply"]}, path)
    for mark in (tmp_path / "sites").rglob("*.in-secure-sum"):  # (the split's own check, not the sum's mark)
        mark.unlink()
    legacy = broadcast(grid, P.BnStatsRequest(**{**settings, "noise_shares": 1}, net=request.net), P.BnStatsReply,
                       "legacy", 30, sorted(grid.get_node_ids()))
    assert not legacy.replies and all("older fedsynth" in why for why in legacy.failures.values())


def test_split_noise_carries_each_sites_own_sigma_whatever_the_other_sites_plans(tmp_path):
    """Review s60: each site added sigma / sqrt(t) of its OWN plan's sigma, which differs with its delta, its budget
    and its reserved queries, so a sum of t shares could carry less than the largest sigma among them (and, with
    layer-clips=auto, bounds differed too). Every honest plan's sigma is at least the public floor (the run's
    epsilon, or its stats share, at delta DEFAULT_DELTA_BOUND), and each site adds what others may fall short of."""
    import itertools

    from client.bn_site import noise_share
    from client.budget import PlanRequest, make_plan

    for net_rounds in (0, 2):
        cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=net_rounds, bn_width=8, secure_aggregation=True,
                          distributed_noise=True)
        _, request = _split_noise_request(cfg, "exp-floor", 3)
        request = dataclasses.replace(request, net_rounds=net_rounds)
        sigmas = []
        for delta, budget, queries in itertools.product((1e-5, 1e-7, 1e-10, 1e-12), (100.0, 0.7 * request.epsilon),
                                                        (0, 5)):
            preq = PlanRequest(mode="bnstats", epsilon=request.epsilon, rounds=net_rounds, steps=10, batch_size=64,
                               census=net_rounds > 0, stats_share=request.stats_share, evaluation_queries=queries)
            sigmas.append(make_plan(preq, num_records=5000.0, delta=delta, budget=budget, prior=[]).stats.noise_multiplier)
        assert max(sigmas) > 1.2 * min(sigmas)  # the plans do differ
        for group in itertools.combinations_with_replacement(sorted(set(sigmas)), 3):
            carried = sum(noise_share(s, request) ** 2 for s in group)
            assert carried >= max(group) ** 2 * (1 - 1e-9), (group, carried)
        lowest, highest = min(sigmas), max(sigmas)
        assert (2 * lowest ** 2 + highest ** 2) / 3 < highest ** 2  # what t equal splits carried: too little
    from common.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="distributed-noise needs clip bounds every site shares"):
        RunConfig.from_mapping({"secure-aggregation": True, "distributed-noise": True, "bn-layer-clips": "auto"})
    with pytest.raises(ConfigError, match="distributed-noise needs every site's delta at most 1e-05"):  # (s61: sites
        RunConfig.from_mapping({"secure-aggregation": True, "distributed-noise": True, "delta": 1e-4})  # all refused it)
    # and a site refuses split noise over bounds each site chooses itself, before its census
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, secure_aggregation=True, distributed_noise=True)
    _, request = _split_noise_request(cfg, "exp-auto", 2)
    grid = _grid(cfg, 3)
    auto = {n: dataclasses.replace(request, layer_clips="auto") for n in grid.get_node_ids()}
    got = secure_sum(grid, auto, round_label=0, timeout=30)
    assert got.total is None and set(got.codes.values()) == {P.REFUSED_BAD_REQUEST}
    assert all("clip bounds every site shares" in why for why in got.failures.values()) and spent(tmp_path) == []


def test_a_secure_round_whose_model_would_leave_the_sums_range_holds_its_weight_or_is_refused_before_its_charge(tmp_path):
    """Review s60: a generator of large, finite weights passed every check, was charged (census and round) and
    trained, then could not go into the sum (w * x beyond +-2^20), and failed so again at every re-send; it was then
    refused after the census (and so was an honest generator at a site of some 244,000 records or more). Since s62 the
    FedAvg weight is held where the weighted model would leave the range (post-processing of the census): the round
    goes into the sum."""
    from common.models import Generator

    cfg = fast_config(tmp_path, num_rounds=2)
    grid = _grid(cfg, 3)
    shape = cfg.gan_shape(1, 8, 10)
    generator = P.state_arrays(Generator(shape))
    generator["label_embedding.weight"] = (generator["label_embedding.weight"] * 1e4).astype(np.float32)
    largest = secure_wire.largest_weight(generator)
    assert 10 < largest < 600  # below a digits site's noisy total: held
    request = gan_request(cfg, shape, "exp-range", 1, generator)
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=1, timeout=30)
    assert got.total is not None, got.failures
    assert float(got.total[-1][0]) == 3 * largest  # the sum of the three sites' held weights
    assert all([e["purpose"] for e in entries] == ["dpgan-census", "dpgan"] for entries in charges(tmp_path))
    # review s61: a model that no census could bring inside the range (one value above it: the weight is at least 1)
    # was refused only after the run's census; now before it, for the generator and the shared net alike
    from common.bnnet import BNNet
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    generator["label_embedding.weight"][0, 0] = 2.0 * P.SECAGG_CLIPPING_RANGE
    never = gan_request(cfg, shape, "exp-never", 1, generator)
    net = P.state_arrays(BNNet(1, 10, 8, 8))
    first = next(k for k, v in net.items() if v.dtype.kind == "f" and v.size)
    net[first] = np.full_like(net[first], 2.0 * P.SECAGG_CLIPPING_RANGE)
    bn_cfg = fast_config(tmp_path, mode="bnstats", bn_width=8, bn_rounds=1)
    settings = plan_settings(bn_cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "exp-never-bn")
    settings.update(local_steps=2, batch_size=16)  # (a request this site would otherwise train)
    for request in (never, P.BnTrainRequest(**settings, server_round=1, net=net)):
        got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=2, timeout=30)
        assert got.total is None and set(got.codes.values()) == {P.REFUSED_BAD_REQUEST}
        assert all("would leave the secure aggregation's range" in why for why in got.failures.values()), got.failures
    assert all([e["run"] for e in entries] == ["exp-range"] * 2 for entries in charges(tmp_path))  # no census either


def test_a_secure_statistics_release_whose_noise_cannot_fit_the_sums_range_is_refused_before_its_charge(tmp_path):
    """Review s61: a clip of 1e6 or a count weight of 1e-6 (both inside the recipe's ranges) gave the statistics noise
    of std about 3e6, beyond the sum's range of 2^20 whatever the records: the release was charged (the run's whole
    epsilon) and then failed at every re-send. Such a release is refused before its charge, from public values."""
    from common.bnnet import BNNet
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)
    grid = _grid(cfg, 3)
    net = P.state_arrays(BNNet(1, 10, 8, 8))
    # (review s61's eighth helper: auto clips skipped the check; a trained net's run paid its census and rounds first)
    for run, clip, weight, clips, rounds in (("exp-clip", 1e6, 0.5, "", 0), ("exp-weight", 1.0, 1e-6, "", 0),
                                             ("exp-auto", 1.0, 1e-6, "auto", 0), ("exp-trained", 1e6, 0.5, "", 1)):
        settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), run)
        settings.update(net_rounds=rounds, local_steps=2, batch_size=16, clip=clip, count_weight=weight,
                        layer_clips=clips)
        request = (P.BnTrainRequest(**settings, server_round=1, net=net) if rounds else
                   P.BnStatsRequest(**settings, net=net))
        got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=0, timeout=30)
        assert got.total is None and set(got.codes.values()) == {P.REFUSED_BAD_REQUEST}, run
        assert all("leave no room inside the secure aggregation's range" in why for why in got.failures.values())
    assert not list(tmp_path.rglob("ledger/*.jsonl"))  # refused before anything, a ledger's noisy size included
    # auto clips are chosen inside the release: a secure one caps them where the range has room (post-processing)
    from client.bn_site import _within_room
    from client.bnstats import release_noise_std

    capped = _within_room({"a": 1e5, "b": 1.0}, 3.0, 0.5)
    assert capped["b"] == 1.0 and capped["a"] < 1e5
    assert 8 * release_noise_std(3.0, capped, 0.5)["sum/a"] + capped["a"] <= P.SECAGG_CLIPPING_RANGE


def test_a_model_that_outgrew_the_sums_range_while_it_trained_is_clamped_not_lost(caplog):
    """Review s60: a learning rate inside the recipe's range (lr-g 1000) grew a generator past the range while it
    trained, after the round's charge, and the site then failed at every re-send. The trained model is the round's DP
    release, so bringing it into the range is post-processing: it is clamped (with a warning), and the weight itself
    is held to the range before the charge (check_room). A statistics release whose sums outgrew it likewise."""
    from types import SimpleNamespace

    limit = P.SECAGG_CLIPPING_RANGE
    reply = SimpleNamespace(weight=1000.0, generator={"a": np.array([5000.0, -2.0], np.float32),
                                                      "b": np.array([np.nan, np.inf], np.float32)})
    with caplog.at_level("WARNING", logger="fedsynth.site"):
        a, b, w = secure_wire.summand(P.TRAIN_GAN, reply)
    assert list(a) == [limit, -2000.0] and list(b) == [0.0, limit] and list(w) == [1000.0]
    assert "3 weighted values" in caplog.text  # the NaN and the inf too, each said in the site's log
    # statistics whose exact sums outgrew the range (review s61: n records at clip bound c, n c > 2^20, refused after
    # the release's charge, at every re-send): clamped too, no weight entry added
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedsynth.site"):
        got = secure_wire.summand(P.QUERY_BNSTATS, SimpleNamespace(stats={"sum/x": np.array([2.0 * limit, -3.0]),
                                                                          "count": np.array([-np.inf])}))
    assert [list(a) for a in got] == [[-limit], [limit, -3.0]]  # sorted names: count, sum/x
    assert "2 values of the query.bnstats release" in caplog.text
    with pytest.raises(secure_wire.RangeError):  # a weight the [w] entry cannot carry, whatever the model
        secure_wire.check_room(limit + 1, {"a": np.array([1e-3], np.float32)})
    secure_wire.check_room(600_000, {"a": np.array([0.5], np.float32)})  # fits, the weight cannot grow


def test_a_site_splits_its_noise_only_where_its_operator_allows_it(tmp_path):
    """Distributed noise trusts the coordinator to run SecAgg+ honestly (one that fakes sites can unmask a
    site's release alone), so a site adds all of its noise unless its operator allowed the split; the refusal
    comes before the census, so such a run costs the site nothing."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)  # no distributed noise
    _, request = _split_noise_request(cfg, "exp-not-allowed", 2)
    grid = _grid(cfg, 3)
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=0, timeout=30)
    assert got.total is None and set(got.codes.values()) == {P.REFUSED_NOT_ALLOWED}
    assert all("allow_distributed_noise" in why for why in got.failures.values())
    assert spent(tmp_path) == []


def test_distributed_noise_needs_secure_aggregation():
    from common.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="distributed-noise needs secure-aggregation"):
        RunConfig.from_mapping({"distributed-noise": True})


def test_a_site_splits_its_noise_no_further_than_the_aggregations_threshold(tmp_path):
    """A coordinator asking for more noise shares than every unmaskable sum holds is refused."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)
    _, request = _split_noise_request(cfg, "exp-too-many-shares", 3)  # threshold with 3 sites is 2
    grid = _grid(cfg, 3)
    got = secure_sum(grid, {n: request for n in grid.get_node_ids()}, round_label=0, timeout=30)
    assert got.total is None and set(got.codes.values()) == {P.REFUSED_BAD_REQUEST}
    assert all("reconstruction threshold" in why for why in got.failures.values())
    assert spent(tmp_path) == []


@pytest.mark.parametrize("hostile", [
    {"modulus_range": 2, "quantization_range": 1},  # every mask randint(0, 1) = 0: each vector in the clear
    {"clipping_range": 1e-6},  # each value clipped to its sign
])
def test_secure_sum_settings_that_would_expose_one_site_are_refused_before_anything_is_charged(tmp_path, monkeypatch,
                                                                                               hostile):
    """Flower's SecAgg+ mod checks only the types of the coordinator's settings; a coordinator following the
    four stages with other values saw one site's vector alone. The sites refuse at the setup stage."""
    import flwr.server.workflow as workflows

    honest = workflows.SecAggPlusWorkflow

    class Hostile(honest):
        def __init__(self, **settings):
            super().__init__(**{**settings, **hostile})

    monkeypatch.setattr(workflows, "SecAggPlusWorkflow", Hostile)
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = _grid(cfg, 3)
    got = secure_sum(grid, {n: _gan_request(cfg) for n in grid.get_node_ids()}, round_label=1, timeout=30)
    assert got.total is None and set(got.codes.values()) == {P.REFUSED_BAD_REQUEST}
    assert spent(tmp_path) == []


def test_the_stages_cannot_ask_for_a_sum_of_one_or_for_both_secrets_of_one_site():
    """Stages a coordinator can send without Flower's workflow (which would not): a threshold of 1 or fewer than
    three sites make a site's own seed share its seed; a node listed both active and dropped got both its seed share
    and its key share back, so its vector could be unmasked alone. The site refuses them, and lists that leave it
    out or name strangers."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    from client.secure_site import secagg_problem

    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: P.SECAGG_CLIPPING_RANGE, Key.TARGET_RANGE: P.SECAGG_QUANTIZATION_LEVELS,
             Key.MOD_RANGE: P.SECAGG_MODULUS, Key.MAX_WEIGHT: 1.0}
    assert secagg_problem(setup, {}, 1) == ""
    # (threshold 2 of 4 sites: half the neighbours told a site dropped, half that it is active, give both of its
    # secrets; more than half of the shares are needed)
    for hostile in ({Key.THRESHOLD: 1}, {Key.SHARE_NUMBER: 1, Key.THRESHOLD: 1}, {Key.SHARE_NUMBER: 2},
                    {Key.THRESHOLD: 4}, {Key.MOD_RANGE: 2}, {Key.MAX_WEIGHT: 1e9}, {Key.SHARE_NUMBER: 4}):
        assert secagg_problem({**setup, **hostile}, {}, 1), hostile
    # (review s59: no upper bound let a setup of 1,024 shares cost the site 388 s of key sharing, uncharged, and 255
    # still 14.5 s; a sum of more than SECAGG_MAX_SITES overflows the modulus anyway)
    from client.secure_site import MAX_SECURE_SUM_SITES as most

    assert most < P.SECAGG_MAX_SITES
    assert secagg_problem({**setup, Key.SHARE_NUMBER: most, Key.THRESHOLD: most // 2 + 1}, {}, 1) == ""
    assert f"{most} sites" in secagg_problem({**setup, Key.SHARE_NUMBER: most + 1, Key.THRESHOLD: most}, {}, 1)

    state = {"share_num": 3, "threshold": 2, "public_keys_dict:K": [1, 2, 3], "rd_seed_share_dict:K": [1, 2, 3],
             "sk1_share_dict:K": [1, 2, 3]}
    unmask = {Key.STAGE: Stage.UNMASK}
    assert secagg_problem({**unmask, Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: []}, state, 1) == ""
    assert secagg_problem({**unmask, Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]}, state, 1) == ""
    for active, dead in (([1, 2], [2]), ([1, 1], []), ([2, 3], [1]), ([1, 2, 9], []),
                         (5, []), ([1, 2, 3], 2.5), (True, []), ([1, 2, True], [])):  # (not lists of ids: s57)
        assert secagg_problem({**unmask, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}, state, 1)
    # fewer active than the threshold, or a site that sent this one no share (Flower's mod raised on both: the generic
    # failure, s62)
    assert "threshold" in secagg_problem({**unmask, Key.ACTIVE_NODE_ID_LIST: [1], Key.DEAD_NODE_ID_LIST: [2]}, state, 1)
    no_share = {**state, "rd_seed_share_dict:K": [1, 2], "sk1_share_dict:K": [1, 2]}
    for active, dead in (([1, 2, 3], []), ([1, 2], [3])):
        assert "no share" in secagg_problem({**unmask, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead},
                                            no_share, 1)
    assert secagg_problem({**unmask, Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: []}, no_share, 1) == ""
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

    keys, other = ([public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)] for _ in range(2))
    share_keys = {Key.STAGE: Stage.SHARE_KEYS}
    assert secagg_problem({**share_keys, "1": keys, "2": other}, state, 1) == ""
    assert secagg_problem({**share_keys, "2": keys, "3": other}, state, 1)  # without this site
    assert secagg_problem({**share_keys, **{str(i): keys for i in range(1, 5)}}, state, 1)  # more than announced
    assert secagg_problem({**share_keys, "1": keys, "2": [b"a", b"b"]}, state, 1)  # keys that do not parse
    # two neighbours with the same keys (review s60: Flower's mod raised on it, a generic failure)
    assert "not all different" in secagg_problem({**share_keys, "1": keys, "2": keys}, state, 1)


def test_a_secure_stage_addressed_to_another_node_is_refused():
    """Flower's mod takes a site's id from the setup message's destination; the site checks its neighbours and the
    unmasking lists against its own id, so a stage addressed to another id is refused."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from client.secure_site import _Refused, secagg_settings_mod
    from fedsynth.localgrid import set_task_identity

    set_task_identity()
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: P.SECAGG_CLIPPING_RANGE, Key.TARGET_RANGE: P.SECAGG_QUANTIZATION_LEVELS,
             Key.MOD_RANGE: P.SECAGG_MODULUS, Key.MAX_WEIGHT: 1.0}
    context = Context(run_id=1, node_id=1, node_config={"site-name": "site-1"}, state=RecordDict(), run_config={})

    def stage(dst: int):
        msg = Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}), dst_node_id=dst, message_type="train")
        return secagg_settings_mod(msg, context, lambda m, c: "passed on")

    assert stage(1) == "passed on"
    with pytest.raises(_Refused) as refused:
        stage(99)
    assert refused.value.reply.error.code == P.REFUSED_BAD_REQUEST


# ---- a saved release goes into at most one masked vector ------------------------------------------------------------
# A site answers a re-sent request from its saved release at no charge. Two secure sums of the same saved releases
# over different sets of sites would give the coordinator their difference: one site's release alone (with split
# noise, carrying only 1/sqrt(t) of its charged noise). So a release that went into one masked vector goes into no
# other (client.secure_site: the mark, written before the vector leaves).

def _summed_refusals(got) -> set[int]:
    return {n for n, why in got.failures.items() if P.ALREADY_SUMMED in why}


def test_split_noise_statistics_summed_over_four_sites_are_not_summed_again_over_three(tmp_path):
    """The regroup attack (review s55): sum all 4, then 3 of them, and subtract: site 1000's split release alone."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50, secure_aggregation=True,
                      distributed_noise=True)
    _, request = _split_noise_request(cfg, "exp-regroup", 2)
    grid = _grid(cfg, 4)
    ids = sorted(grid.get_node_ids())
    everyone = secure_sum(grid, {n: request for n in ids}, round_label=0, timeout=30, threshold=3)
    assert everyone.total is not None and everyone.contributors == ids  # the honest single aggregation
    charged = spent(tmp_path)
    rest = secure_sum(grid, {n: request for n in ids[1:]}, round_label=1, timeout=30, threshold=2)
    assert rest.total is None and rest.contributors == []  # no second sum: nothing to subtract
    assert _summed_refusals(rest) == set(ids[1:]) and set(rest.codes.values()) == {P.REFUSED_BAD_REQUEST}
    assert all("start a new experiment" in why and "exp-regroup" in why for why in rest.failures.values())
    assert "start a new experiment" in rest.reason and "already went into a secure sum" in rest.reason
    assert spent(tmp_path) == charged  # and nothing was charged for the refused attempt


def test_a_withheld_masked_vector_stage_does_not_let_a_second_sum_isolate_the_site(tmp_path):
    """Binding a release to its neighbours would not do: the first sum leaves site 1000 out by never delivering its
    "collect masked vectors" stage (a dropout, to the sites), the second asks the same four again. The three that
    sent their vectors refuse; 1000, which never reached that stage, may still add its release, but alone it is
    below the threshold and nothing is unmasked."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50, secure_aggregation=True,
                      distributed_noise=True)
    _, request = _split_noise_request(cfg, "exp-withheld", 2)
    victim = 1000

    def tap(reply):  # after the victim's share-keys reply its next stage is never delivered
        if reply.metadata.src_node_id == victim and "ctxts" in reply.content[P.SECAGG_RECORD]:
            grid.drop_nodes.add(victim)

    grid = _grid(cfg, 4, tap=tap)
    ids = sorted(grid.get_node_ids())
    first = secure_sum(grid, {n: request for n in ids}, round_label=0, timeout=5, threshold=3)
    assert first.total is not None and first.contributors == ids[1:]
    grid.drop_nodes.clear()
    grid.tap = None
    second = secure_sum(grid, {n: request for n in ids}, round_label=1, timeout=5, threshold=3)
    assert second.total is None and _summed_refusals(second) == set(ids[1:])
    assert P.ALREADY_SUMMED not in second.failures.get(victim, "")  # its release went into no sum before
    assert "start a new experiment" in second.reason


def test_a_secure_dp_gan_round_is_not_summed_again_over_a_subset(tmp_path):
    """Sites that require secure aggregation: a DP-GAN round re-sent as a second SecAgg+ sum to all sites but one
    would give that site's generator and weight alone; the sites refuse the second sum, and the clear."""
    cfg = fast_config(tmp_path, num_rounds=2, secure_aggregation=True)
    strict = [{**n, "require-secure-aggregation": True} for n in nodes(4)]
    grid = LocalGrid(client_app, strict, cfg.to_flwr())
    ids = sorted(grid.get_node_ids())
    request = _gan_request(cfg)
    first = secure_sum(grid, {n: request for n in ids}, round_label=1, timeout=30, threshold=3)
    assert first.total is not None and first.contributors == ids
    charged = spent(tmp_path)
    subset = secure_sum(grid, {n: request for n in ids[:3]}, round_label=2, timeout=30, threshold=2)
    assert subset.total is None and _summed_refusals(subset) == set(ids[:3])
    assert all("round 1's generator" in why for why in subset.failures.values())
    plain = broadcast(grid, request, P.GanTrainReply, "clear", 30, ids)
    assert not plain.replies and set(plain.codes.values()) == {P.REFUSED_NOT_ALLOWED}
    assert spent(tmp_path) == charged
    # the run's next round is a new release: it goes into a sum of its own
    nxt = secure_sum(grid, {n: _gan_request(cfg, rnd=2) for n in ids}, round_label=2, timeout=30, threshold=3)
    assert nxt.total is not None and nxt.contributors == ids


def test_the_mark_is_written_before_the_masked_vector_leaves(tmp_path, monkeypatch):
    """A site that crashes after marking its release and before its vector leaves counts it as sent: a retry is
    refused, never answered with a vector the coordinator could pair with one it got before."""
    import client.secure_site as secure_site

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)
    settings, request = _split_noise_request(cfg, "exp-crash", 1)
    marked = secure_site.mark_summed

    def mark_then_crash(release, req):
        marked(release, req)
        raise OSError("power cut")

    monkeypatch.setattr(secure_site, "mark_summed", mark_then_crash)
    grid = _grid(cfg, 3)
    ids = sorted(grid.get_node_ids())
    crashed = secure_sum(grid, {n: request for n in ids}, round_label=0, timeout=30)
    assert crashed.total is None and set(crashed.codes.values()) == {P.SITE_FAILURE}
    monkeypatch.undo()
    retry = secure_sum(grid, {n: request for n in ids}, round_label=0, timeout=30)
    assert retry.total is None and _summed_refusals(retry) == set(ids)
    assert len(list((tmp_path / "sites").rglob("stats-release" + secure_site.SUMMED_SUFFIX))) == 3


def test_the_same_masked_vector_stage_sent_twice_is_refused(tmp_path):
    """Within one SecAgg+ aggregation each stage runs once, in order: the "collect masked vectors" stage sent again
    (during the aggregation or after it) is refused (the site's claim of the stage; Flower's stage check behind it),
    so a second vector only comes from a new aggregation, which the mark refuses."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)
    _, request = _split_noise_request(cfg, "exp-same-stage", 1)
    grid = _grid(cfg, 3, parallel=False)
    ids = sorted(grid.get_node_ids())
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    sent = []
    push = grid.push_messages

    def record(messages):
        messages = list(messages)
        sent.extend(m for m in messages if RECORD_KEY_CONFIGS in m.content.config_records
                    and m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.COLLECT_MASKED_VECTORS)
        return push(messages)

    grid.push_messages = record
    got = secure_sum(grid, {n: request for n in ids}, round_label=0, timeout=30)
    assert got.total is not None and len(sent) == 3
    again = grid._answer(sent[0])  # (refused by the site's claim of the stage, before Flower's own stage check)
    assert again.has_error() and again.error.code == P.REFUSED_BAD_REQUEST and "already ran its" in again.error.reason


def test_a_secure_release_is_never_answered_outside_the_secagg_stages(tmp_path):
    """Flower routes "train.default" (and a "train" message without SecAgg+ settings) to the secure handler, but its
    SecAgg+ mod masks only type "train": answered, the summand left unmasked -- even at a site that requires secure
    aggregation, and, after one honest-looking setup, a split-noise statistics release with 1/sqrt(t) of its noise."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat

    cfg = fast_config(tmp_path, num_rounds=1)
    strict = [{**n, "require-secure-aggregation": True} for n in nodes(3)]
    grid = LocalGrid(client_app, strict, cfg.to_flwr(), parallel=False)
    shape = cfg.gan_shape(1, 8, 10)
    req = gan_request(cfg, shape, "clear", 1, P.state_arrays(Generator(shape)))
    wrapped = compat.fitins_to_recorddict(secure_wire.wrap_request(req), keep_input=True)
    for mtype in ("train.default", "train"):  # (plain "train" carries no SecAgg+ settings here)
        reply = list(grid.send_and_receive([grid.create_message(wrapped, mtype, 1000, "g")]))[0]
        assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST, mtype
        assert "SecAgg+ stages" in reply.error.reason
    assert not list((tmp_path / "sites").rglob("*.in-secure-sum")) and not any(charges(tmp_path))

    # split noise: a setup with threshold 2 accepted, then the release asked for as "train.default"
    bn = fast_config(tmp_path / "bn", mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50,
                     secure_aggregation=True, distributed_noise=True)
    _, request = _split_noise_request(bn, "split-clear", 2)
    grid = LocalGrid(client_app, strict, bn.to_flwr(), parallel=False)
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: float(P.SECAGG_CLIPPING_RANGE), Key.TARGET_RANGE: P.SECAGG_QUANTIZATION_LEVELS,
             Key.MOD_RANGE: P.SECAGG_MODULUS, Key.MAX_WEIGHT: 1.0}
    accepted = list(grid.send_and_receive([grid.create_message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(setup)}), "train", 1000, "g")]))[0]
    assert not accepted.has_error()
    content = compat.fitins_to_recorddict(secure_wire.wrap_request(request), keep_input=True)
    reply = list(grid.send_and_receive([grid.create_message(content, "train.default", 1000, "g")]))[0]
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    assert not any(e["purpose"] == "bnstats-release" for site in charges(tmp_path / "bn") for e in site)


def test_two_masked_vector_stages_of_one_setup_sent_at_once_are_refused(tmp_path):
    """Review s56: a SuperNode runs each message as its own task on the context as it was when the task started, so
    two "collect masked vectors" stages of one setup sent at once both pass Flower's stage check. The two vectors
    carry the same masks; their difference is the site's two releases' difference in the clear (with one of them a
    full-noise release sent in the clear before, the other alone). Emulated as the second task sees it: the victim's
    context copied just before its stage, the second stage (another run's request) answered from the copy."""
    import copy

    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.compat.common import recorddict_compat as compat

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50, secure_aggregation=True,
                      distributed_noise=True)
    _, split = _split_noise_request(cfg, "exp-A", 2)
    _, full = _split_noise_request(cfg, "exp-B", 1)
    grid = _grid(cfg, 3, parallel=False)
    ids = sorted(grid.get_node_ids())
    victim = ids[0]
    answer, seen = grid._answer, {}

    def answer_twice(msg):
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if (msg.metadata.dst_node_id == victim and stage is not None and not seen
                and stage[Key.STAGE] == Stage.COLLECT_MASKED_VECTORS):
            snapshot = copy.deepcopy(grid.nodes[victim])  # the context a second task of the run pulls
            seen["first"] = answer(msg)
            second = copy.deepcopy(msg)
            fit = compat.fitins_to_recorddict(secure_wire.wrap_request(full), keep_input=True)
            for key in list(second.content.array_records):
                del second.content.array_records[key]
            for key, value in fit.array_records.items():
                second.content.array_records[key] = value
            second.content.config_records["fitins.config"] = fit.config_records["fitins.config"]
            seen["second"] = client_app(second, snapshot)
            return seen["first"]
        return answer(msg)

    grid._answer = answer_twice
    got = secure_sum(grid, {n: split for n in ids}, round_label=0, timeout=30)
    assert got.total is not None and got.contributors == ids  # the aggregation itself goes on
    assert not seen["first"].has_error()
    assert seen["second"].has_error() and "already ran its 'collect_masked_vectors' stage" in seen["second"].error.reason
    assert not list((tmp_path / "sites").rglob("exp-B"))  # refused before any work: nothing of run B charged
    assert all(entry["run"] != "exp-B" for site in charges(tmp_path) for entry in site)
    assert any(entry["run"] == "exp-A" for entry in charges(tmp_path)[0])  # (run A's was: the check is not vacuous)


def _victims_tampered_reply(tmp_path, experiment: str, stage_name: str, tamper) -> object:
    """One plain secure statistics sum over 3 sites in which the first site's ``stage_name`` stage is changed by
    ``tamper(configs, node_ids)`` before it is answered; returns that site's reply to the tampered stage."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)
    _, request = _split_noise_request(cfg, experiment, 1)
    grid = _grid(cfg, 3, parallel=False)
    ids = sorted(grid.get_node_ids())
    answer, seen = grid._answer, {}

    def tampered(msg):
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if msg.metadata.dst_node_id == ids[0] and stage is not None and stage[Key.STAGE] == stage_name:
            tamper(stage, ids)
            seen["reply"] = answer(msg)
            return seen["reply"]
        return answer(msg)

    grid._answer = tampered
    secure_sum(grid, {n: request for n in ids}, round_label=0, timeout=30)
    return seen["reply"]


@pytest.mark.parametrize("tamper", ["no shares", "garbage share"])
def test_a_masked_vector_stage_flowers_mod_would_refuse_is_refused_before_any_work(tmp_path, tamper):
    """Review s56: Flower's mod calls the handler first and checks the stage's shares after, so a stage it refuses
    (too few shares, one that does not decrypt) was worked on, charged and marked summed first: a charged release
    that could never be sent. The site now checks the shares before the work."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    def change(stage, ids):
        if tamper == "no shares":
            stage[Key.CIPHERTEXT_LIST], stage[Key.SOURCE_LIST] = [], []
        else:
            stage[Key.CIPHERTEXT_LIST] = [b"not a share"] * len(stage[Key.CIPHERTEXT_LIST])

    reply = _victims_tampered_reply(tmp_path, "exp-tamper", Stage.COLLECT_MASKED_VECTORS, change)
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST, reply.error.reason
    assert "masked-vector stage" in reply.error.reason
    from client.secure_site import SUMMED_SUFFIX

    victim_site = tmp_path / "sites" / reply.error.reason.split(":")[0]  # the refusal begins with the site's name
    others = [p for p in (tmp_path / "sites").iterdir() if p != victim_site]
    assert len(others) == 2 and all(list(p.rglob("*" + SUMMED_SUFFIX)) for p in others)  # the others worked
    # the victim wrote no ledger, charge, release or mark (only its claims of the setup's stages)
    assert victim_site.is_dir() and not [p for p in victim_site.rglob("*") if "secure-setups" not in p.parts]


def test_the_unmask_stage_sent_twice_on_one_setup_is_refused(tmp_path):
    """Review s56, second pass: with only the masked vector claimed, each neighbour could be asked to unmask twice
    from one state (two tasks at once): once with the victim listed active (shares of its self-mask seed), once
    dropped (shares of its pairwise key), and the victim's one vector came out alone. Every stage after the setup now
    runs once per setup at a site."""
    import copy

    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50, secure_aggregation=True,
                      distributed_noise=True)
    _, request = _split_noise_request(cfg, "exp-fork", 3)
    grid = LocalGrid(client_app, [{**n, "require-secure-aggregation": True} for n in nodes(4)], cfg.to_flwr(),
                     parallel=False)
    ids = sorted(grid.get_node_ids())
    victim, answer, forks = ids[0], grid._answer, []

    def fork_unmask(msg):
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if stage is None or stage[Key.STAGE] != Stage.UNMASK or msg.metadata.dst_node_id == victim:
            return answer(msg)
        snapshot = copy.deepcopy(grid.nodes[msg.metadata.dst_node_id])  # the context a second task pulls
        real = answer(msg)
        forged = copy.deepcopy(msg)
        listed = forged.content.config_records[RECORD_KEY_CONFIGS]
        listed[Key.ACTIVE_NODE_ID_LIST] = [n for n in listed[Key.ACTIVE_NODE_ID_LIST] if n != victim]
        listed[Key.DEAD_NODE_ID_LIST] = [*listed[Key.DEAD_NODE_ID_LIST], victim]
        forks.append(client_app(forged, snapshot))
        return real

    grid._answer = fork_unmask
    got = secure_sum(grid, {n: request for n in ids}, round_label=0, timeout=30, threshold=3)
    assert got.total is not None  # the honest aggregation itself completes
    assert len(forks) == 3 and all(f.has_error() and "already ran its 'unmask' stage" in f.error.reason
                                   for f in forks)


def test_a_neighbours_key_that_does_not_parse_is_refused_before_any_work(tmp_path):
    """Review s56, second pass: Flower parses a neighbour's first public key only after the handler, to make the
    pairwise masks; a garbage one made a charged release fail there, marked summed and never sent."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    def bad_key(stage, ids):
        stage[str(ids[1])] = [b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
                              stage[str(ids[1])][1]]

    reply = _victims_tampered_reply(tmp_path, "exp-badkey", Stage.SHARE_KEYS, bad_key)
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "public keys" in reply.error.reason
    assert not list((tmp_path / "sites" / reply.error.reason.split(":")[0]).rglob("*.pt"))  # nothing worked on


def test_a_stage_name_that_is_a_path_is_refused_and_creates_nothing(tmp_path):
    """Review s57: the site's claim of a stage named its file after the stage the coordinator sent, so after one
    setup a stage of "x/../../<any path>" answered "already ran" where a file existed and created one where none did:
    a free, exact oracle of the site's files (a patient's image by its name), and files or folders written anywhere.
    Only the four stages of SecAgg+ are accepted now, and a claim's file takes the protocol's own name of the stage."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    cfg = fast_config(tmp_path)
    grid = _grid(cfg, 1, parallel=False)
    held = tmp_path / "held.png"
    held.write_bytes(b"a record")

    def send(stage: dict):
        message = grid.create_message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(stage)}), P.SECURE_TRAIN,
                                      sorted(grid.get_node_ids())[0], "g")
        return list(grid.send_and_receive([message]))[0]

    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2,
             Key.CLIPPING_RANGE: float(P.SECAGG_CLIPPING_RANGE), Key.TARGET_RANGE: P.SECAGG_QUANTIZATION_LEVELS,
             Key.MOD_RANGE: P.SECAGG_MODULUS, Key.MAX_WEIGHT: 1.0}
    assert not send(setup).has_error()
    before = sorted(p for p in tmp_path.rglob("*"))
    up = "x/" + "../" * 40  # past the root from the claims' folder
    replies = [send({Key.STAGE: up + str(path).lstrip("/")}) for path in (held, tmp_path / "missing.png")]
    assert all(r.has_error() and r.error.code == P.REFUSED_BAD_REQUEST and "is not a stage of a secure sum" in
               r.error.reason for r in replies), [r.error.reason[:120] for r in replies]
    assert not any("already ran" in r.error.reason for r in replies)  # the same answer whether the file exists or not
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing created
    assert "is not a stage" in send({Key.STAGE: Stage.SETUP + "/.."}).error.reason


def test_a_sites_stage_claims_are_cleared_when_its_supernode_starts(tmp_path):
    """Review s58: a coordinator could make a site keep two empty claim files per SecAgg+ setup, for free and for ever.
    A setup's secrets live in the SuperNode's memory only, so the guarded SuperNode clears the claims of the site its
    node config names at each start (fedsynth site and the Docker entry point alike)."""
    from common.state_layout import SETUPS_FOLDER
    from fedsynth.ops import supernode_guard

    claims, others = tmp_path / "state" / SETUPS_FOLDER / "s", tmp_path / "state" / SETUPS_FOLDER / "t"
    for folder in (claims, others):
        folder.mkdir(parents=True)
        (folder / "abc-share_keys").touch()
    node_config = tmp_path / "node-config.toml"
    node_config.write_text(f'state-dir = "{tmp_path / "state"}"\nsite-name = "s"\n')
    supernode_guard.clear_stage_claims(["--superlink", "x:1", "--node-config", str(node_config)])
    assert not claims.exists() and (tmp_path / "state").exists()
    # review s60: another SuperNode over the same records, on the same state folder, keeps its claims
    assert (others / "abc-share_keys").exists()
    (claims.parent / "old-share_keys").touch()  # a claim an earlier fedsynth kept at the top
    supernode_guard.clear_stage_claims(["--node-config", str(node_config)])
    assert not (claims.parent / "old-share_keys").exists() and (others / "abc-share_keys").exists()
    claims.mkdir()
    supernode_guard.clear_stage_claims([f"--node-config={node_config}"])  # deploy/compose.yaml's form
    assert not claims.exists()
    supernode_guard.clear_stage_claims(["--node-config", str(tmp_path / "missing.toml")])  # nothing to clear: no error


def test_a_secure_statistics_runs_room_is_checked_at_the_most_noise_any_plan_uses_before_its_census(tmp_path):
    """Review s61 (ninth and tenth helpers): checked at the least noise a plan could give (the run's epsilon at the
    published delta), a run whose plan, limited by a small budget, had more noise paid its census and a training
    round before its statistics were refused; checked then against the plan, it still paid its census. The room is
    now checked before the census at the most noise any plan uses (MAX_USEFUL_NOISE), so nothing is charged; and a
    train request's noise-shares is checked too (1e9 brought the least noise to nothing, 0 crashed)."""
    import math

    from flwr.app import Context, RecordDict

    from client import bn_site
    from client.budget import MAX_USEFUL_NOISE
    from client.refusal import Refusal
    from client.site import SiteSettings
    from common.bnnet import BNNet
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    ctx = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={"device": "cpu"})
    site = SiteSettings(name="s", data="digits", state_dir=tmp_path / "state", epsilon_budget=2.0, delta=1e-5,
                        allow_distributed_noise=True)
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=1, bn_width=8)
    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "exp-budget")
    settings.update(net_rounds=1, local_steps=2, batch_size=16, epsilon=50.0, stats_share=0.5, layer_clips="",
                    count_weight=0.5, clip=3e5)  # room at the run's epsilon of 50, none at this site's budget of 2
    net = P.state_arrays(BNNet(1, 10, 8, 8))
    with pytest.raises(Refusal, match="leave no room inside the secure aggregation's range"):
        bn_site.train_bnnet(P.BnTrainRequest(**settings, server_round=1, net=net), ctx, site, secure=True)
    assert not site.ledger_path.exists()  # nothing charged, not even the census or the ledger's start
    with pytest.raises(Refusal, match="leave no room"):  # epsilon inf at a finite budget is private (the eleventh)
        bn_site.train_bnnet(P.BnTrainRequest(**{**settings, "experiment": "exp-inf", "epsilon": math.inf, "clip": 3e4},
                                             server_round=1, net=net), ctx, site, secure=True)
    assert not site.ledger_path.exists()
    for shares in (0, -4, 10 ** 9):
        with pytest.raises(Refusal, match="noise-shares must be 1"):
            bn_site.train_bnnet(P.BnTrainRequest(**{**settings, "experiment": f"exp-{shares}", "noise_shares": shares},
                                                 server_round=1, net=net), ctx, site, secure=True)
    # honest settings have room to spare at the most noise a plan uses: the default flat bound and the README's
    # per-layer ones (bn_site._check_stats_room raises otherwise)
    bn_site._check_stats_room(MAX_USEFUL_NOISE, 2.3, 0.5)
    bn_site._check_stats_room(MAX_USEFUL_NOISE, {"a": 1.4, "b": 2.4, "c": 4.0, "d": 44.0}, 0.5)


def _ledger_entries(site) -> list[dict]:
    import json

    return [json.loads(line) for line in site.ledger_path.read_text().splitlines()[1:] if '"purpose"' in line]


def test_a_wrapped_array_of_a_zero_size_type_is_refused_before_it_is_handled():
    """Review s62: 128 bytes of .npy header declaring 1e18 elements of numpy's zero-size type |V0 decode at once (no
    bytes to read), and re-wrapping them for the typed request wrote them in a Python loop over the declared count: the
    site's ClientApp spun for hours, answering no run. Only arrays of numbers are unwrapped."""
    import io
    import threading

    from flwr.common import FitIns, Parameters
    from numpy.lib import format as npf

    def fitins(descr: str, count: int) -> FitIns:
        buf = io.BytesIO()
        npf.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": (count,)})
        config = {secure_wire.INNER_TYPE: P.TRAIN_GAN, secure_wire.INNER_FIELD: "generator",
                  secure_wire.INNER_NAMES: "w"}
        return FitIns(Parameters(tensors=[buf.getvalue()], tensor_type="numpy.ndarray"), config)

    for descr in ("|V0", "|S0", "<U0"):
        outcome: list[BaseException] = []

        def unwrap(message: FitIns = fitins(descr, 10**18)) -> None:
            try:
                secure_wire.unwrap_request(message)
            except BaseException as err:  # noqa: BLE001 - kept for the assertion below
                outcome.append(err)

        worker = threading.Thread(target=unwrap, daemon=True)  # (a hang detector, not a timing: the loop took hours)
        worker.start()
        worker.join(60)
        assert not worker.is_alive() and isinstance(outcome[0], P.ProtocolError), descr
        assert "not all arrays of numbers" in str(outcome[0])
    with pytest.raises(P.ProtocolError):  # a float32 array declared without its bytes: numpy cannot decode it
        secure_wire.unwrap_request(fitins("<f4", 10**18))


def test_a_release_sent_in_the_clear_goes_into_no_secure_sum(tmp_path):
    """Review s67: a release sent in the clear could also go into a secure sum (and one summed could be sent in the
    clear after). The coordinator asked three of four sites for the statistics in the clear, summed all four with
    the fourth's noise split, and subtracted: the fourth's release alone, with 1/sqrt(3) of its charged noise. A
    release now leaves one way only (client/release_marks.py); the other way is refused before any work."""
    from common.bnnet import BNNet
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, synthetic_size=50)
    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "exp-clear-then-sum")
    request = P.BnStatsRequest(**{**settings, "net_rounds": 0}, net=P.state_arrays(BNNet(1, 10, 8, 8)))
    grid = _grid(cfg, 3)
    first, *others = sorted(grid.get_node_ids())
    clear = broadcast(grid, request, P.BnStatsReply, "clear", 30, [first])
    assert list(clear.replies) == [first]
    for mark in (tmp_path / "sites").rglob("*.in-the-clear"):  # as a fedsynth before the marks left it: a saved
        mark.unlink()  # release not made for a sum is refused too (review s67's eighth helper)
    charged = spent(tmp_path)
    got = secure_sum(grid, {n: request for n in [first, *others]}, round_label=0, timeout=30)
    assert first in got.failures and "in the clear" in got.failures[first]
    assert sorted(got.contributors) == others  # the others' fresh releases (charged), never the clear one
    assert spent(tmp_path)[0] == charged[0]  # the first site: nothing charged again


def test_a_refused_secure_request_leaves_no_mark_behind(tmp_path):
    """Review s67: the mark that a release is made for a sum was written before the request's checks, so refused
    requests (a round outside the run, a made-up experiment id) left marks and run folders at every site, free."""
    cfg = fast_config(tmp_path, num_rounds=2)
    grid = _grid(cfg, 3)
    got = secure_sum(grid, {n: _gan_request(cfg, rnd=10**6) for n in grid.get_node_ids()}, round_label=1, timeout=30)
    assert got.total is None and len(got.failures) == 3
    assert not list((tmp_path / "sites").rglob("*.for-secure-sum")) and spent(tmp_path) == []
