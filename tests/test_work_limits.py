"""A site's work limits (client.limits): requests too large for the site's machine are refused, not crashed on."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from client.app import app as client_app
from client.bn_site import check_net_work
from client.gan_site import check_gan_work
from client.limits import meta_module, parameter_count
from client.refusal import Refusal
from client.site import SiteSettings
from common import protocol as P
from common.bnnet import BNNet
from common.data import ImageDataset, save_npz
from common.models import Discriminator, GanShape, Generator
from fedsynth.localgrid import LocalGrid
from server import defaults
from server.modes.bnstats import plan_settings
from server.modes.dpgan import gan_request as coordinator_gan_request
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
    """A D step holds the per-sample gradients of one padded chunk of 64 rows at a time (client.dpgan; review s58:
    they were held for the whole Poisson batch and counted at the requested batch, so a batch-1 request with a wide
    D held 64 times what was counted): counted so, a D too wide for the limit is refused at batch 1 too."""
    cfg = fast_config(tmp_path, num_rounds=1)
    # a digits discriminator of width 32 at 8x8 has ~43,000 parameters: 64 rows of its per-sample gradients, twice
    # (the real and the fake pass), hold ~21 MB; width 16, the run's own, ~11,000 parameters and ~5.5 MB
    shape = GanShape(1, 8, 10, cfg.gan_latent_dim, cfg.gan_width)
    d_params = parameter_count(meta_module(lambda: Discriminator(shape, width=32)))
    node = {**nodes(1)[0], "max-step-memory-mb": 10}
    grid = LocalGrid(client_app, [node], cfg.to_flwr())
    reply = send(grid, 1000, gan_request(cfg, batch_size=1, d_width=32))
    _refused(reply, "per-sample gradients", f"{d_params:,} discriminator parameters", "max_step_memory_mb")
    assert charges(tmp_path) in ([], [[]])
    reply = send(grid, 1000, gan_request(cfg, d_width=16))  # the run's own batch (32) fits in 10 MB
    assert not reply.has_error(), reply.error.reason
    assert [e["purpose"] for e in charges(tmp_path)[0]] == ["dpgan-census", "dpgan"]  # charged once


def test_a_statistics_request_with_an_oversized_shared_net_is_refused(tmp_path):
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


def _site(tmp_path: Path, channels: int, side: int, records: int, **node) -> tuple[LocalGrid, Path]:
    """A deployed site holding ``records`` random images of ``side`` x ``side``; its grid and its state folder."""
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.random((records, channels, side, side), dtype=np.float32),
                        np.arange(records) % 10, tuple(str(i) for i in range(10)))
    save_npz(data, tmp_path / "train.npz")
    state = tmp_path / "state"
    config = {"site-name": "site-a", "data-path": str(tmp_path / "train.npz"), "state-dir": str(state),
              "epsilon": 10.0, "dataset-id": "site-a", **node}
    return LocalGrid(client_app, [config], {"device": "cpu", "progress": False}), state


def _nothing_charged(state: Path) -> None:
    assert not list(state.rglob("ledger/*.jsonl")), "a ledger was started"
    assert not list(state.rglob("census.json")) and not list(state.rglob("plan.json"))


def test_a_generator_whose_activations_do_not_fit_is_refused_before_anything_is_charged(tmp_path, monkeypatch):
    """The review's request (2026-12-06): at 28x28 a generator of width 768 (15.8 million parameters, under
    max_parameters) with a discriminator of width 4 (its per-sample gradients at batch 4,096 only ~138 MB) needs
    ~6.6 MB of memory per fake row in a G step, ~27 GiB at batch 4,096: the site ran out of memory after the census
    and the round were charged, and again for every new experiment id."""

    class OutOfMemory:  # what the site's training would have met; here so that an unguarded site fails fast
        def __init__(self, *args, **kwargs) -> None:
            raise MemoryError("one G step of this request does not fit the site's memory")

    monkeypatch.setattr("client.gan_site.LocalGanTrainer", OutOfMemory)
    grid, state = _site(tmp_path, 1, 28, 4500)
    shape = GanShape(1, 28, 10, 16, 768)
    generator = {k: v.numpy() for k, v in Generator(shape).state_dict().items()}
    assert 15_000_000 < sum(v.size for v in generator.values()) < 20_000_000
    for experiment in ("greedy-1", "greedy-2"):  # a new experiment id each time: each would be charged anew
        hostile = P.GanTrainRequest(
            experiment=experiment, server_round=1, num_rounds=1, local_steps=1, batch_size=4096, max_grad_norm=1.0,
            lr_d=2e-4, lr_g=2e-4, d_width=4, ac_weight=0.3, mode_seeking=1.0, class_histogram=True, epsilon=5.0,
            seed=0, channels=1, image_size=28, num_classes=10, latent_dim=16, width=768, generator=generator)
        reply = send(grid, 1000, hostile)
        _refused(reply, "one generator step", "4,096 rows", "activation floats per row", "8,192 MB",
                 "max_step_memory_mb", "smaller batch or a narrower generator")
        _nothing_charged(state)


def test_a_shared_net_whose_statistics_pass_does_not_fit_is_refused(tmp_path, monkeypatch):
    """The statistics release runs the coordinator's net over the records in blocks of 512: an 18.5-million-parameter
    net (under max_parameters) takes ~5 GB at 28x28 (the review's measurement), more at 32x32 colour."""
    monkeypatch.setattr("client.bn_site.record_class_statistics", lambda *a, **k: (_ for _ in ()).throw(
        MemoryError("the statistics pass of this request does not fit the site's memory")))
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=2)
    # the default limits: width 576 at 32x32 colour (18.8 million parameters) is counted at ~9 GB
    grid, state = _site(tmp_path / "colour", 3, 32, 64)
    settings = plan_settings(cfg, Schema(3, 32, 32, tuple(str(i) for i in range(10))), "greedy-stats")
    net = P.state_arrays(BNNet(3, 10, 32, 576))
    assert sum(v.size for v in net.values()) < 20_000_000
    reply = send(grid, 1000, P.BnStatsRequest(**{**settings, "net_rounds": 0, "width": 576}, net=net))
    _refused(reply, "512-record block of the statistics release", "8,192 MB", "max_step_memory_mb", "narrower net")
    _nothing_charged(state)
    # a site whose operator has 4 GB to spare: the review's 18.5-million-parameter net at 28x28 (~7 GB counted)
    grid, state = _site(tmp_path / "gray", 1, 28, 64, **{"max-step-memory-mb": 4096})
    settings = plan_settings(cfg, Schema(1, 28, 28, tuple(str(i) for i in range(10))), "greedy-stats")
    net = P.state_arrays(BNNet(1, 10, 28, 576))
    reply = send(grid, 1000, P.BnStatsRequest(**{**settings, "net_rounds": 0, "width": 576}, net=net))
    _refused(reply, "512-record block of the statistics release", "4,096 MB", "max_step_memory_mb")
    _nothing_charged(state)
    # a run that would train that net is refused at its first round, before its census (its DP-SGD step too)
    train = P.BnTrainRequest(**{**settings, "width": 576, "batch_size": 64}, server_round=1, net=net)
    _refused(send(grid, 1000, train), "max_step_memory_mb")
    _nothing_charged(state)


def _limits_over(margin: int) -> SimpleNamespace:
    """The default work limits, the step memory and a run's disk divided by ``margin``."""
    limits = SiteSettings(name="s", data="digits", state_dir=PROJECT_ROOT, epsilon_budget=10.0)
    return SimpleNamespace(max_parameters=limits.max_parameters, max_batch_size=limits.max_batch_size,
                           max_steps_per_run=limits.max_steps_per_run,
                           max_step_memory_mb=limits.max_step_memory_mb // margin,
                           max_run_disk_mb=limits.max_run_disk_mb // margin,
                           max_state_disk_mb=limits.max_state_disk_mb // margin)


@pytest.mark.parametrize("channels,side,classes", [(1, 28, 10), (3, 32, 10), (3, 64, 2), (1, 28, 2), (1, 28, 47),
                                                   (3, 32, 100), (3, 128, 10), (1, 224, 2)])
def test_the_products_own_steps_fit_the_default_step_memory_with_margin(channels, side, classes):
    """Every step the product's default requests make a site run (D's DP-SGD step, a G step, the shared net's DP-SGD
    step, a block of the statistics release), counted as the site counts them, fits in an eighth of the default
    max_step_memory_mb; a shared net of width 64 with the head norm (the MNIST recipe's) in a third."""
    schema = Schema(channels, side, side, tuple(str(i) for i in range(classes)))
    gan, _ = defaults.resolve(replace(fast_config(PROJECT_ROOT), **{k: 0 for k in (
        "num_rounds", "gan_local_steps", "gan_long_local_steps", "gan_batch_size", "gan_width", "gan_d_width",
        "gan_resolution")}, gan_latent_dim=64), schema, 3)
    assert gan.gan_batch_size == (64 if side <= 16 else 256)
    shape = GanShape(channels, side, classes, gan.gan_latent_dim, gan.gan_width, resolution=gan.gan_resolution)
    check_gan_work(coordinator_gan_request(gan, shape, "defaults", 1, {}), _limits_over(8), shape)
    bn, _ = defaults.resolve(fast_config(PROJECT_ROOT, mode="bnstats", bn_rounds=0, bn_local_steps=0,
                                         bn_batch_size=0), schema, 3)
    for width, head_norm, margin in ((bn.bn_width, False, 8), (64, True, 3)):
        settings = {**plan_settings(bn, schema, "defaults"), "width": width, "head_norm": head_norm}
        assert settings["net_rounds"] > 0 and settings["batch_size"] == 256
        check_net_work(P.BnTrainRequest(**settings, server_round=1, net={}), _limits_over(margin),
                       lambda: BNNet(channels, classes, side, width, head_norm=head_norm, resolution=bn.bn_resolution))


def test_the_operator_pins_the_device_in_site_yaml(tmp_path):
    """Review s58: the device came from the coordinator's run config alone, so an operator could not keep a site on
    the machine its work limits measure (or on the CPU, where the bitwise one-record checks ran). site.yaml's
    ``device`` now wins over the run's; left out, the run's choice stands."""
    from flwr.app import Context, RecordDict

    from client.requests import site_device
    from fedsynth.ops.fields import DeployError
    from fedsynth.ops.site_cmd import load_site_config

    def context(node: dict, run: dict) -> Context:
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=run)

    site = load_site_config(minimal_site_yaml(tmp_path, device="cpu")).settings
    node = site.to_node_config()
    assert node["device"] == "cpu" and SiteSettings.from_node_config(node, {}).device == "cpu"
    assert site_device(context(node, {"device": "cuda:7"})).type == "cpu"  # the operator's wins
    assert load_site_config(minimal_site_yaml(tmp_path)).settings.device == ""  # default: the run's
    unset = load_site_config(minimal_site_yaml(tmp_path)).settings.to_node_config()
    with pytest.raises(Refusal, match="device"):
        site_device(context(unset, {"device": "tpu"}))
    with pytest.raises(DeployError, match="'device'.*unknown device"):
        load_site_config(minimal_site_yaml(tmp_path, device="tpu"))
    assert yaml.safe_load((PROJECT_ROOT / "deploy" / "site.yaml").read_text())["device"] == ""


def test_what_a_run_keeps_on_the_sites_disk_is_bounded_by_the_operator(tmp_path):
    """Review s58: nothing bounded what a run writes in the state folder (each round's saved reply and D's state with
    its optimizer's moments): 50,000 one-step rounds with a 2.1-million-parameter D, each charged next to nothing,
    would have written 1.2 TiB, and a full disk then made honest rounds fail after their charge. A run is now counted
    from its shapes and rounds (4 bytes x (3 G + 4 D) a round) against max_run_disk_mb before anything is charged."""
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, [{**nodes(1)[0], "max-run-disk-mb": 50}], cfg.to_flwr())
    wide = gan_request(cfg, d_width=256, num_rounds=5000, local_steps=1)
    _refused(send(grid, 1000, wide), "state folder", "max_run_disk_mb")
    assert charges(tmp_path) in ([], [[]])
    reply = send(grid, 1000, gan_request(cfg))  # the run's own settings keep well under 50 MB
    assert not reply.has_error(), reply.error.reason


@pytest.mark.parametrize("width,d_width,latent", [(4, 1, 1), (16, 16, 16)])
def test_a_rounds_file_is_no_larger_than_the_disk_count(tmp_path, width, d_width, latent):
    """Review s58: the count was 4 bytes a value only, and torch.save's records made a small network's round file 3.8
    times that, so a run of many small rounds wrote 1.6 times max_run_disk_mb. The count now has them."""
    from client.gan_site import round_file_bytes

    cfg = fast_config(tmp_path, num_rounds=1, gan_width=width, gan_d_width=d_width, gan_latent_dim=latent)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    req = gan_request(cfg, share_d=True)
    assert not send(grid, 1000, req).has_error()
    files = [f for f in tmp_path.rglob("*") if f.is_file() and "round" in f.name and f.suffix == ".pt"]
    assert files, sorted(str(f) for f in tmp_path.rglob("*"))
    shape = GanShape(req.channels, req.image_size, req.num_classes, req.latent_dim, req.width,
                     resolution=req.resolution)
    bound = round_file_bytes(meta_module(lambda: Generator(shape)), meta_module(lambda: Discriminator(shape,
                                                                                                     width=d_width)))
    assert max(f.stat().st_size for f in files) <= bound


def test_what_all_runs_keep_on_the_sites_disk_is_bounded_by_the_operator(tmp_path):
    """Review s58: max_run_disk_mb bounded one run, and each new run id brought a fresh allowance (each paying only a
    census). What the site's other runs keep is now counted too, against max_state_disk_mb."""
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, [{**nodes(1)[0], "max-state-disk-mb": 1, "epsilon": 1e6}], cfg.to_flwr())
    answered = 0  # runs of one round each (a 0.17 MB round file), until the others' files fill the megabyte
    while not (reply := send(grid, 1000, gan_request(cfg, experiment=f"run-{answered}"))).has_error():
        answered += 1
        assert answered < 10
    assert answered >= 2  # one run alone fits: the refusal is the other runs' doing
    _refused(reply, "its other runs keep", "max_state_disk_mb")


def test_a_disk_without_room_for_a_runs_files_is_refused_before_its_charge(tmp_path, monkeypatch):
    """Review s62: the limits count only the files a request implies, so on a disk with less free space than them a
    coordinator filled it with ordinary runs, after which every new run id's census was charged and its file could not
    be written (budget spent, the generic failure; the part written left behind kept the disk full). The site now
    refuses a run its disk has no room for before any charge, and a failed write leaves no part behind."""
    import shutil

    from common.files import atomic_write_bytes

    cfg = fast_config(tmp_path, num_rounds=2)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    real = shutil.disk_usage

    def low_disk() -> None:
        monkeypatch.setattr("client.limits.shutil.disk_usage",
                            lambda path: real(path)._replace(free=128 * 2**20 - 1))  # read in units: 64 MB

    low_disk()
    _refused(send(grid, 1000, gan_request(cfg)), "too little free space")
    assert charges(tmp_path) in ([], [[]])
    # (review s62, second round: the run id was made a path before it was checked, so '/' or '../..' had the site
    # walk and size every file there, and answer by a folder's size; the id is checked first)
    import client.limits

    walked: list = []
    size = client.limits._folder_mb
    monkeypatch.setattr(client.limits, "_folder_mb", lambda folder: walked.append(folder) or size(folder))
    for hostile in ("/", "../../..", "..", "a/../../.."):
        reply = send(grid, 1000, gan_request(cfg, experiment=hostile))
        assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST, hostile
    assert walked == []
    monkeypatch.undo()
    assert not send(grid, 1000, gan_request(cfg)).has_error()
    # (review s62, honest-user helper: a re-sent round, answered from its saved reply, writes nothing and is answered
    # on a full disk too; the next round, new work, is refused before its charge)
    low_disk()
    before = charges(tmp_path)
    assert not send(grid, 1000, gan_request(cfg)).has_error()
    _refused(send(grid, 1000, gan_request(cfg, server_round=2)), "too little free space")
    assert charges(tmp_path) == before
    monkeypatch.undo()

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("common.files.os.fsync", full)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "census.json", b"{}")
    assert not list(tmp_path.glob("census.json*"))


@pytest.mark.parametrize("classes,head_norm", [(10, False), (1000, True)])
def test_a_statistics_runs_files_are_no_larger_than_the_disk_count(tmp_path, classes, head_norm):
    """Review s62: the statistics release's file was counted as one more net's, where it holds 2 K sum(C_l) + K values,
    twice the head's parameters at many classes (a real release at K = 1,000 wrote 30.2 MB where 14.9 were counted),
    so a write the free-disk check let through could fail after its charge. It is counted from its own layout."""
    import torch

    from client.requests import save_reply

    settings = plan_settings(fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=16, bn_head_norm=head_norm),
                             Schema(1, 28, 28, tuple(str(i) for i in range(classes))), "exp-count")
    req = P.BnStatsRequest(**settings, net={})
    limits = SiteSettings(name="s", data="digits", state_dir=tmp_path, epsilon_budget=10.0)

    def build() -> BNNet:
        return BNNet(1, classes, 28, req.width, head_norm=req.head_norm, resolution=req.resolution)

    counted = check_net_work(req, limits, build) * 2**20
    from client.bnstats import expected_release_keys

    stats = {k: torch.zeros(shape) for k, shape in expected_release_keys(build(), classes).items()}
    save_reply(tmp_path / "stats-release.pt", {"reply": {"stats": stats}, "noise_shares": 1})
    assert (tmp_path / "stats-release.pt").stat().st_size <= counted


def test_a_network_shape_whose_rows_this_machine_rounds_by_place_is_refused_before_any_charge(tmp_path, monkeypatch):
    """Review s63: the start-up row check covered the default widths only. On this machine a linear layer of 64 rows
    sums a row in another order by its place when its input size is not a multiple of 4 (an odd width at 28 pixels),
    and a hostile net turned that into a logit that was NaN at even places and finite at odd ones: one added record
    moved a DP-SGD step's sum by L2 30 against C = 1. A run's own network shape is now checked at its first request,
    before its census; a machine that rounds a record's rows by their place (here: a loss weighted by the row's place)
    refuses it, and a shape that passed is remembered (the check is not run again)."""
    import torch

    from client import bn_site, gan_site, row_check

    def placed(logits, labels):  # a machine whose per-sample results depend on the row's place in its chunk
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none") * (
            1 + 1e-3 * torch.arange(len(labels)))

    monkeypatch.setattr(row_check, "_PASSED", set())  # (shapes this process found sound: other tests' too)
    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=2, bn_width=8, bn_local_steps=2, bn_batch_size=32)
    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "exp-rows")
    net = P.state_arrays(BNNet(1, 10, 8, 8))
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    marks = tmp_path / "sites" / "site-1" / "row-checks"
    with monkeypatch.context() as patch:
        patch.setattr(row_check, "nn_cross_entropy", placed)
        _refused(send(grid, 1000, P.BnTrainRequest(**settings, server_round=1, net=net)),
                 "per-sample gradient of the shared net", "another width")
        reply = send(grid, 1000, gan_request(cfg, experiment="exp-rows-gan"))
        assert reply.has_error() and "per-sample gradient of the discriminator" in reply.error.reason
    assert not (tmp_path / "sites" / "site-1" / "ledger").exists() or charges(tmp_path)[0] == []  # nothing charged
    assert not marks.exists() or not list(marks.iterdir())
    assert not send(grid, 1000, P.BnTrainRequest(**settings, server_round=1, net=net)).has_error()
    assert not send(grid, 1000, gan_request(cfg, experiment="exp-rows-gan")).has_error()
    assert len(list(marks.glob("*.ok"))) == 2  # the shared net's shape and D's, on this machine
    with monkeypatch.context() as patch:  # a re-send of a saved reply computes nothing: never refused by the check
        patch.setattr(row_check, "_PASSED", set())  # (review s63's sixth: the statistics mode checked it first)
        patch.setattr(row_check, "nn_cross_entropy", placed)
        kept = {mark: mark.read_text() for mark in marks.glob("*.ok")}
        for mark in kept:
            mark.unlink()
        assert not send(grid, 1000, P.BnTrainRequest(**settings, server_round=1, net=net)).has_error()
        assert not send(grid, 1000, gan_request(cfg, experiment="exp-rows-gan")).has_error()
        for mark, text in kept.items():
            mark.write_text(text)
    with monkeypatch.context() as patch:  # remembered on disk: a later run of the same shapes does not check them
        patch.setattr(row_check, "_PASSED", set())  # again, in another process too (a deployed site's next message)
        patch.setattr(bn_site, "bnnet_problems", lambda *a, **k: pytest.fail("checked again"))
        patch.setattr(gan_site, "discriminator_problems", lambda *a, **k: pytest.fail("checked again"))
        assert not send(grid, 1000, P.BnTrainRequest(**plan_settings(cfg, Schema(1, 8, 8, tuple(
            str(i) for i in range(10))), "exp-rows-2"), server_round=1, net=net)).has_error()
        assert not send(grid, 1000, gan_request(cfg, experiment="exp-rows-gan-2")).has_error()
    # a later round naming another D shape is refused by the run's plan before any check (review s63's seventh:
    # the site checked and remembered each d-width a re-sent round named, uncharged, before the plan refused it)
    with monkeypatch.context() as patch:
        patch.setattr(gan_site, "discriminator_problems", lambda *a, **k: pytest.fail("checked a changed shape"))
        for d_width in (12, 24):
            reply = send(grid, 1000, gan_request(cfg, experiment="exp-rows-gan", server_round=2, d_width=d_width))
            assert reply.has_error() and "changes settings fixed at the run's first request" in reply.error.reason
    # G's fakes are checked too: each record is paired with the fake at its place in the chunk (review s63's seventh)
    class Placed(torch.nn.Module):  # a machine whose G rounds a row's fake by its place
        def __init__(self, gen):
            super().__init__()
            self.gen = gen

        def forward(self, z, y):
            return self.gen(z, y) + 1e-3 * torch.arange(len(z)).reshape(-1, 1, 1, 1)

    shape = GanShape(1, 8, 10, cfg.gan_latent_dim, cfg.gan_width)
    assert row_check.generator_problems(Generator(shape), shape.latent_dim, 10) == []
    assert row_check.generator_problems(Placed(Generator(shape)), shape.latent_dim, 10)
    with monkeypatch.context() as patch:
        real = row_check.generator_problems
        patch.setattr(gan_site, "generator_problems", lambda gen, *args, **kw: real(Placed(gen), *args, **kw))
        reply = send(grid, 1000, gan_request(fast_config(tmp_path, gan_width=24), experiment="exp-rows-gan-g"))
        assert reply.has_error() and "the generator's fake" in reply.error.reason
    # the key is the network as built, not the request's words (review s63's fifth: at d-width 0 D's width follows G's,
    # and a shape checked at one G width let another, whose D rounds by place, through)
    checked = []
    with monkeypatch.context() as patch:
        patch.setattr(gan_site, "discriminator_problems", lambda *a, **k: checked.append(1) or [])
        wider = fast_config(tmp_path, gan_width=32)
        assert not send(grid, 1000, gan_request(wider, experiment="exp-rows-gan-3")).has_error()
    assert checked == [1] and len(list(marks.glob("*.ok"))) == 3
    # (review s63's eighth) a mark is trusted only by the Opacus and the check it was made with, and a state folder
    # remembers at most MAX_ROW_CHECK_MARKS shapes (each new shape is checked before any charge, so without bound)
    import opacus

    with monkeypatch.context() as patch:
        patch.setattr(row_check, "_PASSED", set())
        patch.setattr(opacus, "__version__", "99.0")
        patch.setattr(gan_site, "discriminator_problems", lambda *a, **k: checked.append(2) or [])
        patch.setattr(row_check, "MAX_ROW_CHECK_MARKS", 3)
        assert not send(grid, 1000, gan_request(wider, experiment="exp-rows-gan-4")).has_error()
    assert checked == [1, 2] and len(list(marks.glob("*.ok"))) == 3  # checked again; past the cap, not remembered


def test_the_row_checks_run_on_the_device_the_run_trains_on(tmp_path, monkeypatch):
    """Until 2026-12-07 a run's row checks ran on the CPU, while a run whose device setting is "auto" or "cuda" (the
    coordinator's choice where site.yaml names no device) trained on the site's GPU: the premise of every DP-SGD
    step's sensitivity was unchecked where the steps ran. The checks now run on the run's device, and a shape is
    remembered per device (a GPU's name, capability and CUDA/cuDNN versions). No GPU here: torch.cuda's queries are
    stood in for, and the check itself (which would compute on the GPU) is replaced by one that records its device."""
    import torch

    from client import bn_site, gan_site, row_check

    monkeypatch.setattr(row_check, "_PASSED", set())
    assert row_check.device_key("cpu") == "cpu"
    for name, value in (("get_device_capability", lambda i=None: (9, 0)), ("get_device_name", lambda i=None: "H100"),
                        ("current_device", lambda: 0), ("get_rng_state", lambda *a: torch.zeros(8, dtype=torch.uint8)),
                        ("set_rng_state", lambda *a: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91002)
    for name in row_check.GPU_KERNEL_ENV:
        monkeypatch.delenv(name, raising=False)
    key = row_check.device_key("cuda")
    assert key.startswith(f"cuda:H100:sm90:cuda{torch.version.cuda}:cudnn91002:tf32:"), key
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")  # an operator's kernel setting is part of the key
    assert row_check.device_key("cuda") != key
    seen = []

    def on(mode):  # a check that records the device it was given and finds a problem there
        def check(*args, **kw):
            seen.append(torch.device(kw["device"]).type)
            return [f"rounded by place on {kw['device']}"]
        return check

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=2, bn_width=8, bn_local_steps=2, bn_batch_size=32)
    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "exp-dev")
    net = P.state_arrays(BNNet(1, 10, 8, 8))
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    monkeypatch.setattr(gan_site, "discriminator_problems", on("dpgan"))
    monkeypatch.setattr(gan_site, "generator_problems", lambda *a, **kw: seen.append(f"G on {kw['device'].type}") or [])
    monkeypatch.setattr(bn_site, "bnnet_problems", on("bnstats"))
    for device in ("cpu", "cuda"):  # what the run's device setting chose (site_device: site.yaml names none)
        monkeypatch.setattr(gan_site, "site_device", lambda context, d=device: torch.device(d))
        monkeypatch.setattr(bn_site, "site_device", lambda context, d=device: torch.device(d))
        reply = send(grid, 1000, gan_request(cfg, experiment=f"exp-dev-gan-{device}"))
        assert reply.has_error() and f"rounded by place on {device}" in reply.error.reason
        assert ("device: cpu in site.yaml" in reply.error.reason) == (device == "cuda")
        reply = send(grid, 1000, P.BnTrainRequest(**settings, server_round=1, net=net))
        _refused(reply, f"rounded by place on {device}")
    assert seen == ["cpu", "G on cpu", "cpu", "cuda", "G on cuda", "cuda"]
    assert not (tmp_path / "sites" / "site-1" / "ledger").exists() or charges(tmp_path)[0] == []  # nothing charged
    # a shape that passed on the CPU is checked again for the GPU, and remembered for each
    marks = tmp_path / "sites" / "site-1" / "row-checks"
    monkeypatch.setattr(gan_site, "discriminator_problems", lambda *a, **kw: seen.append(kw["device"].type) or [])

    def stop(*args, **kw):  # (no GPU here to train on: the round stops at its charge, after the check)
        raise RuntimeError("stopped at the charge")

    monkeypatch.setattr(gan_site, "charged_work", stop)
    for device in ("cpu", "cuda", "cpu", "cuda"):
        monkeypatch.setattr(gan_site, "site_device", lambda context, d=device: torch.device(d))
        assert send(grid, 1000, gan_request(cfg, experiment="exp-dev-gan-ok")).has_error()
    assert seen[6:] == ["cpu", "G on cpu", "cuda", "G on cuda"] and len(list(marks.glob("*.ok"))) == 2


def test_what_other_runs_keep_is_counted_in_whole_units_whatever_their_small_files_digits(tmp_path):
    """Review s68 L: the state-folder limit compared byte counts, and a run's census.json and plan.json are JSON
    whose length follows the digits of its noisy counts: a coordinator stepping a request's size by bytes could read
    them off where the refusal begins. Every file now counts in whole units of FILE_UNIT_BYTES."""
    from client.limits import FILE_UNIT_BYTES, other_runs_mb

    kept = []
    for name, census in (("a", "[2018.0, 7.0]"), ("b", "[-19.0, 5506.0, 12345.0]")):
        run = tmp_path / name / "state" / "runs" / "old"
        run.mkdir(parents=True)
        (run / "census.json").write_text('{"noisy-counts": %s}' % census)
        (run / "gan-round-1.pt").write_bytes(b"x" * 100_000)
        kept.append(other_runs_mb(SimpleNamespace(state_dir=tmp_path / name / "state"), "new"))
    assert kept[0] == kept[1] == (1 + 7) * FILE_UNIT_BYTES / 2**20  # one unit, and 100,000 bytes in 7
