"""A coordinator's value that would make a site's work fail after its charge is refused before anything is charged.

Each value below passed the site's type and "finite > 0" checks and then failed inside ``client.site.charged_work``
(a seed that overflows torch's seeds, a learning rate Adam cannot hold, a count weight whose square overflows, a
round that changes the networks' shapes from the state the site saved): the site charged the attempt, released
nothing, and charged it again on every re-send. Every one now goes through the real message path and must come back
as a bad-request refusal that names the setting, with the site's ledger exactly as it was.
"""

from __future__ import annotations

import json

import pytest

from client.app import app as client_app
from client.budget import PLAN_FILE, plan_changes
from common import protocol as P
from common import recipe_ranges as R
from common.bnnet import BNNet, norm_layer_names
from common.config import ConfigError, RunConfig
from common.models import GanShape, Generator
from fedsynth.localgrid import LocalGrid
from tests.spine_helpers import charges, fast_config, ledger_paths, nodes
from tests.test_faults import gan_request, send


def _refused(reply, *words: str) -> None:
    assert reply.has_error(), "the request was worked on"
    assert reply.error.code == P.REFUSED_BAD_REQUEST, reply.error.reason
    for word in words:
        assert word in reply.error.reason, reply.error.reason


def _generator(latent_dim: int, width: int) -> dict:
    return {k: v.numpy() for k, v in Generator(GanShape(1, 8, 10, latent_dim, width)).state_dict().items()}


GAN_OUT_OF_RANGE = [
    ({"seed": 2 ** 55}, "seed"), ({"seed": -1}, "seed"), ({"seed": R.MAX_SEED}, "seed"),
    ({"lr_d": 1e308}, "lr-d"), ({"lr_g": 1e308}, "lr-g"), ({"lr_g": 1e4}, "lr-g"),
    ({"max_grad_norm": 1e308}, "max-grad-norm"), ({"max_grad_norm": 5e-324}, "max-grad-norm"),
    ({"ac_weight": 1e308}, "ac-weight"), ({"mode_seeking": 1e308}, "mode-seeking"),
    ({"width": 1, "generator": _generator(16, 1)}, "width"),  # G's last stage would have no channels
]


def test_out_of_range_gan_values_are_refused_before_anything_is_charged(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    for i, (bad, name) in enumerate(GAN_OUT_OF_RANGE):
        reply = send(grid, 1000, gan_request(cfg, experiment=f"bad-{i}", **bad))
        _refused(reply, name, "must be")
        assert repr(next(iter(bad.values()))) in reply.error.reason  # the coordinator's own value, quoted
    assert ledger_paths(tmp_path) == []  # not even the census: no ledger was started


def test_widths_torch_cannot_build_are_a_bad_request_before_anything_is_charged(tmp_path):
    """Review s56: a G width GroupNorm cannot split (900) or widths that overflow torch's sizes failed as a generic
    site failure; they are the request's own settings, so they are refused as a bad request that says which."""
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    for i, bad in enumerate(({"width": 900}, {"width": 2 ** 62}, {"d_width": 2 ** 62})):
        _refused(send(grid, 1000, gan_request(cfg, experiment=f"wide-{i}", **bad)), "cannot be built")
    assert ledger_paths(tmp_path) == []


def _bn_request(cfg, experiment: str, **changes):
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(k) for k in range(10))), experiment)
    settings.update(net_rounds=0, noise_shares=1)
    settings.update(changes)
    net = P.state_arrays(BNNet(1, 10, 8, settings["width"]))
    if settings["net_rounds"]:
        return P.BnTrainRequest(**settings, server_round=1, net=net)
    return P.BnStatsRequest(**settings, net=net)


BN_OUT_OF_RANGE = [
    ({"count_weight": 1e200}, "count-weight"), ({"count_weight": 1e-300}, "count-weight"),
    ({"clip": 1e308}, "clip"), ({"clip": 5e-324}, "clip"), ({"layer_clips": "1e308,1e308,1e308"}, "layer-clips"),
    ({"seed": 2 ** 55}, "seed"),
    ({"net_rounds": 2, "local_steps": 2, "batch_size": 16, "lr": 1e308}, "lr"),
    ({"net_rounds": 2, "local_steps": 2, "batch_size": 16, "max_grad_norm": 1e308}, "max-grad-norm"),
]


def test_out_of_range_statistics_values_are_refused_before_anything_is_charged(tmp_path):
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, epsilon=5.0)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    for i, (bad, name) in enumerate(BN_OUT_OF_RANGE):
        reply = send(grid, 1000, _bn_request(cfg, f"bad-{i}", **bad))
        _refused(reply, name, "must be")
    # the same layer-clips count check the release made after the plan now comes before the census as well
    reply = send(grid, 1000, _bn_request(cfg, "few-clips", net_rounds=2, local_steps=2, batch_size=16,
                                         layer_clips="1,1"))
    _refused(reply, "layer-clips")
    assert ledger_paths(tmp_path) == []


def test_layer_clips_are_bounded_and_recorded_parsed(tmp_path):
    """Review s56: the coordinator's layer-clips string went into the ledger verbatim (a 10 MB line, read back by every
    later request); it is now at most 1,000 characters and the ledger records the parsed bounds."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, epsilon=5.0)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    padded = "1." + "0" * 300 + "1"
    _refused(send(grid, 1000, _bn_request(cfg, "long-clips", layer_clips=",".join([padded] * 4))),
             "layer-clips", "at most 1000 characters")
    assert ledger_paths(tmp_path) == []
    request = _bn_request(cfg, "short-clips")
    layers = len(norm_layer_names(BNNet(1, 10, 8, request.width)))
    reply = send(grid, 1000, _bn_request(cfg, "short-clips", layer_clips=",".join(["1.5"] * layers)))
    assert not reply.has_error(), reply.error.reason
    [entry] = [e for e in charges(tmp_path)[0] if e["run"] == "short-clips"]
    assert entry["details"]["clip"] == [1.5] * layers


def test_a_statistics_release_no_ledger_can_pay_is_refused_before_a_new_ledger(tmp_path):
    """Review s56: with a provided net, a statistics release at epsilon 0.01 started the site's ledger (its noisy
    size, epsilon 0.015) before its plan refused it; the plan is a function of public values alone there."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, epsilon=0.01)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    reply = send(grid, 1000, _bn_request(cfg, "tiny"))
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET, reply.error.reason
    assert ledger_paths(tmp_path) == []


def test_a_run_planned_without_a_census_is_not_charged_one_by_a_later_training_request(tmp_path):
    """Review s56: a statistics release with a provided net plans no census; a training request under the same id
    drew and charged one (the run past its epsilon, which the release had spent) and was then refused by the plan."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, epsilon=5.0)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    released = send(grid, 1000, _bn_request(cfg, "planned"))
    assert not released.has_error(), released.error.reason
    before = charges(tmp_path)
    for late in (gan_request(cfg, experiment="planned"),
                 _bn_request(cfg, "planned", net_rounds=2, local_steps=2, batch_size=16)):
        _refused(send(grid, 1000, late), "'planned'", "start a new experiment")
    assert charges(tmp_path) == before
    assert before and not [p for p in (tmp_path / "sites").rglob("census.json") if p.parent.name == "planned"]


def test_a_provided_net_release_after_a_drawn_census_is_refused_not_planned_past_the_runs_epsilon(tmp_path):
    """Review s59: a training request whose plan was refused after its census, then a statistics release with a
    provided net under the same id: the new plan left the census out and spent the whole run's epsilon, so every
    release was then refused by the run's cap, for ever. It is now refused before a plan is made."""
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=2, bn_width=8, epsilon=0.5)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    too_much = send(grid, 1000, _bn_request(cfg, "drawn", net_rounds=500, local_steps=100, batch_size=512))
    assert too_much.has_error() and too_much.error.code == P.REFUSED_BUDGET, too_much.error.reason
    census_only = charges(tmp_path)
    assert [e["purpose"] for e in census_only[0] if e["run"] == "drawn"] == ["bnstats-census"]
    _refused(send(grid, 1000, _bn_request(cfg, "drawn", net_rounds=0)), "'drawn'", "start a new experiment")
    assert charges(tmp_path) == census_only
    assert not list((tmp_path / "sites").rglob("runs/drawn/plan.json"))


@pytest.fixture()
def one_round_trained(tmp_path):
    """A site that trained round 1 of a 2-round DP-GAN run at the defaults of tests.test_faults.gan_request."""
    cfg = fast_config(tmp_path, num_rounds=2)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    reply = send(grid, 1000, gan_request(cfg, experiment="run"))
    assert not reply.has_error(), reply.error.reason
    return cfg, grid, charges(tmp_path)


ARCHITECTURE_CHANGES = [
    ({"d_width": 8}, "d_width: 0 at the first request, 8 now"),
    ({"width": 32}, "width: 16 at the first request, 32 now"),
    ({"latent_dim": 8}, "latent_dim: 16 at the first request, 8 now"),
    ({"resolution": 8}, "resolution: 0 at the first request, 8 now"),
]


def _changed(cfg, **change) -> P.GanTrainRequest:
    latent, width = change.get("latent_dim", cfg.gan_latent_dim), change.get("width", cfg.gan_width)
    return gan_request(cfg, experiment="run", server_round=2, generator=_generator(latent, width), **change)


def test_a_later_round_that_changes_the_networks_shapes_is_refused_before_its_charge(tmp_path, one_round_trained):
    cfg, grid, after_round_one = one_round_trained
    (plan_path,) = (tmp_path / "sites").rglob(f"runs/run/{PLAN_FILE}")
    recorded = json.loads(plan_path.read_text())["request"]
    assert {k: recorded.get("architecture." + k) for k in ("latent_dim", "width", "d_width", "resolution")} == {
        "latent_dim": 16, "width": 16, "d_width": 0, "resolution": 0}
    for change, says in ARCHITECTURE_CHANGES:
        for _ in range(2):  # a re-send costs nothing either
            _refused(send(grid, 1000, _changed(cfg, **change)), says, "start a new experiment")
    assert charges(tmp_path) == after_round_one
    assert not send(grid, 1000, gan_request(cfg, experiment="run", server_round=2)).has_error()  # the run goes on


def test_a_plan_recorded_before_the_architecture_was_is_read_and_the_saved_state_checked(tmp_path,
                                                                                        one_round_trained):
    """A plan made by a fedsynth that did not record the architecture lacks those settings: missing means "not
    recorded" (the run resumes), and a changed shape is still refused before the charge, from the saved state."""
    cfg, grid, after_round_one = one_round_trained
    (plan_path,) = (tmp_path / "sites").rglob(f"runs/run/{PLAN_FILE}")
    plan = json.loads(plan_path.read_text())
    for key in ("channels", "image_size", "num_classes", "latent_dim", "width", "d_width", "resolution"):
        plan["request"].pop("architecture." + key, None)
    plan_path.write_text(json.dumps(plan))
    for change in ({"d_width": 8}, {"width": 32}, {"latent_dim": 8}):
        _refused(send(grid, 1000, _changed(cfg, **change)), "differs in shape", "start a new experiment")
    assert charges(tmp_path) == after_round_one
    # a change that keeps every shape (d_width 4 is D's width at the default 0 for G's width 16) still trains
    reply = send(grid, 1000, gan_request(cfg, experiment="run", server_round=2, d_width=4))
    assert not reply.has_error(), reply.error.reason
    assert [e["round"] for e in charges(tmp_path)[0]] == [e["round"] for e in after_round_one[0]] + [2]


def test_plan_changes_reads_a_missing_architecture_setting_as_not_recorded():
    recorded = {"mode": "dpgan", "steps": 4}
    assert plan_changes(recorded, {"mode": "dpgan", "steps": 4, "architecture.width": 32}) == []
    assert plan_changes({**recorded, "architecture.width": 16}, {"mode": "dpgan", "steps": 4,
                                                                 "architecture.width": 32}) == [
        "architecture.width: 16 at the first request, 32 now"]
    # any other setting a plan lacks is a change, as before (every plan records those)
    assert plan_changes(recorded, {"mode": "dpgan", "steps": 4, "batch_size": 32}) == ["batch_size"]


@pytest.mark.parametrize("setting, value", [
    ("seed", 2 ** 40), ("seed", -1), ("gan_lr_d", 1e308), ("gan_lr_g", 1e4), ("gan_max_grad_norm", 1e308),
    ("gan_ac_weight", 1e308), ("gan_mode_seeking", 1e308), ("bn_lr", 1e308), ("bn_max_grad_norm", 1e-9),
    ("bn_clip", 1e308), ("bn_count_weight", 1e200), ("bn_layer_clips", "1e308,1"),
])
def test_the_run_config_refuses_what_a_site_would(setting, value):
    with pytest.raises(ConfigError, match=setting.replace("_", "-")):
        RunConfig(**{setting: value}).validate()


def test_the_edges_of_every_range_are_accepted():
    cfg = RunConfig(seed=R.MAX_SEED - 1, gan_lr_d=R.MAX_LEARNING_RATE, gan_max_grad_norm=R.BOUND_RANGE[0],
                    gan_ac_weight=R.MAX_LOSS_WEIGHT, gan_mode_seeking=0.0, bn_clip=R.BOUND_RANGE[1],
                    bn_count_weight=R.COUNT_WEIGHT_RANGE[0], bn_layer_clips=f"{R.BOUND_RANGE[1]},1")
    cfg.validate()
