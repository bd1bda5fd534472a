"""A site's work limits (client.limits): requests too large for the site's machine are refused, not crashed on."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from client.app import app as client_app
from client.limits import meta_module, parameter_count
from client.site import SiteSettings
from common import protocol as P
from common.bnnet import BNNet
from common.models import Discriminator, GanShape, Generator
from fedsynth.localgrid import LocalGrid
from server import defaults
from server.sites import Schema
from tests.deployment_helpers import minimal_site_yaml
from tests.spine_helpers import charges, fast_config, nodes
from tests.test_faults import gan_request, send

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _refused(reply, *words: str) -> None:
    assert reply.has_error(), "the request was answered"
    assert reply.error.code == P.REFUSED_NOT_ALLOWED, reply.error.reason
    for word in words:
        assert word in reply.error.reason, (word, reply.error.reason)


def test_a_gan_request_beyond_the_sites_limits_is_refused_before_anything_is_built(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    start = time.perf_counter()
    # a generator of width 10^6 would need ~10^14 weights: the site counts them without allocating any
    _refused(send(grid, 1000, gan_request(cfg, width=10**6)), "generator", "max_parameters")
    _refused(send(grid, 1000, gan_request(cfg, latent_dim=10**8)), "generator", "max_parameters")
    _refused(send(grid, 1000, gan_request(cfg, d_width=10**5)), "discriminator", "max_parameters")
    _refused(send(grid, 1000, gan_request(cfg, batch_size=10**6)), "batch size", "max_batch_size")
    # the steps over the whole run count, the longer schedule's included
    _refused(send(grid, 1000, gan_request(cfg, num_rounds=1000, local_steps=51)), "51,000", "max_steps_per_run")
    _refused(send(grid, 1000, gan_request(cfg, num_rounds=100, local_steps=4, long_steps=501)), "max_steps_per_run")
    assert time.perf_counter() - start < 30  # nothing of that size was built
    assert charges(tmp_path) in ([], [[]])  # and nothing was charged


def test_the_per_sample_gradients_of_one_step_are_bounded_by_the_operator(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    # this digits discriminator (width 16 at 8x8) has ~11,000 parameters; a batch of 4,096 holds ~176 MB of
    # per-sample gradients, the run's batch of 32 about 1.4 MB
    shape = GanShape(1, 8, 10, cfg.gan_latent_dim, cfg.gan_width)
    d_params = parameter_count(meta_module(lambda: Discriminator(shape, width=16)))
    node = {**nodes(1)[0], "max-step-memory-mb": 10}
    grid = LocalGrid(client_app, [node], cfg.to_flwr())
    reply = send(grid, 1000, gan_request(cfg, batch_size=4096, d_width=16))
    _refused(reply, "per-sample gradients", f"{d_params:,} discriminator parameters", "max_step_memory_mb")
    assert charges(tmp_path) in ([], [[]])
    reply = send(grid, 1000, gan_request(cfg, d_width=16))  # the run's own batch (32) fits in 10 MB
    assert not reply.has_error(), reply.error.reason
    assert [e["purpose"] for e in charges(tmp_path)[0]] == ["dpgan-census", "dpgan"]  # charged once


def test_a_statistics_request_with_an_oversized_shared_net_is_refused(tmp_path):
    from server.modes.bnstats import plan_settings

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=2, bn_width=8)
    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "exp-limits")
    net = P.state_arrays(BNNet(1, 10, 8, 8))
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    hostile = P.BnTrainRequest(**{**settings, "width": 10**5}, server_round=1, net=net)
    _refused(send(grid, 1000, hostile), "shared net", "max_parameters")
    hostile = P.BnTrainRequest(**{**settings, "net_rounds": 10**4, "local_steps": 10}, server_round=1, net=net)
    _refused(send(grid, 1000, hostile), "max_steps_per_run")
    # with a net the coordinator provides the site takes no DP-SGD step: its batch setting is not work
    provided = P.BnStatsRequest(**{**settings, "net_rounds": 0, "batch_size": 10**6}, net=net)
    assert not send(grid, 1000, provided).has_error()


@pytest.mark.parametrize("channels,side,classes", [(1, 28, 10), (3, 32, 10), (3, 64, 2), (1, 28, 2), (1, 28, 47),
                                                   (3, 32, 100), (3, 128, 10), (1, 224, 2)])
def test_the_products_own_settings_fit_the_default_limits_with_margin(channels, side, classes):
    schema = Schema(channels, side, side, tuple(str(i) for i in range(classes)))
    limits = SiteSettings(name="s", data="digits", state_dir=PROJECT_ROOT, epsilon_budget=10.0)
    gan, _ = defaults.resolve(replace(fast_config(PROJECT_ROOT), **{k: 0 for k in (
        "num_rounds", "gan_local_steps", "gan_long_local_steps", "gan_batch_size", "gan_width", "gan_d_width",
        "gan_resolution")}, gan_latent_dim=64), schema, 3)
    shape = GanShape(channels, side, classes, gan.gan_latent_dim, gan.gan_width, resolution=gan.gan_resolution)
    g = parameter_count(meta_module(lambda: Generator(shape)))
    d = parameter_count(meta_module(lambda: Discriminator(shape, width=gan.gan_d_width)))
    assert max(g, d) * 10 < limits.max_parameters
    assert gan.gan_batch_size * 10 <= limits.max_batch_size
    assert gan.num_rounds * gan.gan_long_local_steps * 10 <= limits.max_steps_per_run
    assert gan.gan_batch_size * d * 4 / 2**20 * 10 < limits.max_step_memory_mb
    bn = parameter_count(meta_module(lambda: BNNet(channels, classes, side, 64, head_norm=True,
                                                   resolution=defaults.bn_resolution_rule(side).value)))
    assert bn * 10 < limits.max_parameters


def test_the_operator_sets_the_limits_in_site_yaml(tmp_path):
    from fedsynth.ops.fields import DeployError
    from fedsynth.ops.site_cmd import WORK_LIMITS, load_site_config

    example = yaml.safe_load((PROJECT_ROOT / "deploy" / "site.yaml").read_text())
    defaults_of = {key: getattr(SiteSettings(name="s", data="d", state_dir=tmp_path, epsilon_budget=1.0), key)
                   for key in WORK_LIMITS}
    assert {key: example[key] for key in WORK_LIMITS} == defaults_of  # the documented values are the defaults

    def config(**extra) -> SiteSettings:
        return load_site_config(minimal_site_yaml(tmp_path, **extra)).settings

    assert config().max_batch_size == defaults_of["max_batch_size"]
    site = config(max_batch_size=512, max_step_memory_mb=100)
    assert (site.max_batch_size, site.max_step_memory_mb) == (512, 100)
    # the node config a SuperNode carries round-trips them
    again = SiteSettings.from_node_config(site.to_node_config(), {})
    assert (again.max_batch_size, again.max_step_memory_mb, again.max_parameters) == (512, 100, 20_000_000)
    with pytest.raises(DeployError, match="max_batch_size.*at least 1"):
        config(max_batch_size=0)
    with pytest.raises(DeployError, match="max_parameters.*integer"):
        config(max_parameters="lots")
