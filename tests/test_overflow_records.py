"""A hostile coordinator's weights that make some records overflow float32 leak nothing (client.nonfinite).

The attack: the coordinator chooses the weights a site computes with (the shared statistics net it provides
or averages, the generator), so it can make one kind of record -- here any image with a bright pixel --
produce inf, while dark records stay finite. Before the fix, clipping turned inf into NaN (0 * inf) and the
whole release came back NaN exactly when such a record was present: an answer with no noise on it. Each
test first checks that the crafted weights really overflow, then that every release stays finite and moves
by at most its sensitivity when the bright record is added.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.bnnet import BNNet, iter_record_blocks, norm_layer_names
from common.data import ImageDataset

CLASSES = tuple(str(i) for i in range(10))


def _dark_records(n: int = 16) -> ImageDataset:
    """n all-black 8x8 records, labels 0..9 in turn."""
    return ImageDataset(np.zeros((n, 1, 8, 8), np.float32), np.arange(n) % 10, CLASSES)


def _with_bright_record(data: ImageDataset, label: int = 3) -> ImageDataset:
    bright = np.full((1, 1, 8, 8), 0.8, np.float32)
    return ImageDataset(np.concatenate([data.images, bright]), np.append(data.labels, label), data.classes)


def _overflowing_net(head_norm: bool = False) -> BNNet:
    """The coordinator's crafted net: every tap of the first conv is 3e38 (biases 0), so a black image gives 0
    everywhere and any 3x3 neighbourhood whose pixels add up to more than ~1.13 gives inf (float32 ends at
    3.4e38): a threshold on brightness that the coordinator chose."""
    torch.manual_seed(0)
    net = BNNet(1, 10, 8, 8, head_norm=head_norm).eval()
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        conv.weight.fill_(3e38)
        conv.bias.zero_()
    return net


def test_the_crafted_net_really_overflows_on_the_bright_record_only():
    blocks = dict(next(iter_record_blocks(_overflowing_net(), _with_bright_record(_dark_records())))[1])
    finite = torch.stack([torch.isfinite(b).all(dim=1) for b in blocks.values()]).all(dim=0)  # (17,)
    assert finite[:-1].all() and not finite[-1]


@pytest.mark.parametrize("per_layer", [False, True])
def test_the_statistics_release_stays_finite_and_within_its_sensitivity(per_layer):
    from client.bnstats import exact_class_sums, record_class_statistics, release_sensitivity

    net = _overflowing_net(head_norm=True)
    layers = norm_layer_names(net)
    bound = {name: c for name, c in zip(layers, (0.5, 1.0, 2.0, 40.0))} if per_layer else 2.3
    a = 0.5
    dark, grown = _dark_records(), _with_bright_record(_dark_records())

    def scaled(ds):  # the release as the mechanism sees it: count x a, block l / (c_l sqrt L)
        sums = exact_class_sums(net, ds, num_classes=10, clip_bound=bound)
        parts = [sums["count"] * a]
        for name in layers:
            c = bound[name] * math.sqrt(len(layers)) if per_layer else bound
            parts += [sums["sum/" + name].ravel() / c, sums["sumsq/" + name].ravel() / c]
        return np.concatenate(parts)

    before, after = scaled(dark), scaled(grown)
    assert np.isfinite(after).all()
    assert np.linalg.norm(after - before) <= release_sensitivity(a) + 1e-9
    noisy = record_class_statistics(net, grown, num_classes=10, clip_bound=bound, noise_multiplier=1.0)
    assert all(np.isfinite(v).all() for v in noisy.values())
    assert noisy["count"].shape == (10,)


def _clipped_sum(optimizer_cls, net: BNNet, data: ImageDataset, clip: float = 1.0) -> torch.Tensor:
    """One DP-SGD step's sum of per-sample clipped gradients (no noise) of the shared net's cross-entropy."""
    from opacus import GradSampleModule

    model = GradSampleModule(net, loss_reduction="sum")
    opt = optimizer_cls(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                        expected_batch_size=len(data))
    x, y = torch.from_numpy(data.images), torch.from_numpy(data.labels).long()
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    opt.clip_and_accumulate()
    out = torch.cat([p.summed_grad.reshape(-1) for p in opt.params]).detach().clone()
    model._close()
    return out


def test_a_dpsgd_step_of_the_shared_net_stays_finite_and_within_its_sensitivity():
    from opacus.optimizers import DPOptimizer

    from client.nonfinite import FiniteDPOptimizer

    dark, grown = _dark_records(), _with_bright_record(_dark_records())
    plain = _clipped_sum(DPOptimizer, _overflowing_net().train(), grown)
    assert not torch.isfinite(plain).all()  # Opacus alone: the bright record makes the whole step NaN
    g1 = _clipped_sum(FiniteDPOptimizer, _overflowing_net().train(), dark)
    g2 = _clipped_sum(FiniteDPOptimizer, _overflowing_net().train(), grown)
    assert torch.isfinite(g2).all()
    assert float((g2 - g1).norm()) <= 1.0 + 1e-6


def test_the_shared_nets_local_training_returns_finite_weights():
    from client.dpsgd import train_dpsgd_local

    net = _overflowing_net()
    train_dpsgd_local(net, _with_bright_record(_dark_records()), noise_multiplier=1.0, sample_rate=1.0, steps=2,
                      max_grad_norm=1.0, lr=0.1, seed=0)
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_finite_rows_of_clean_blocks_are_returned_unchanged():
    from client.nonfinite import zero_nonfinite_rows

    blocks = {"a": torch.randn(4, 3), "b": torch.randn(4, 2)}
    assert zero_nonfinite_rows(blocks) is blocks
    blocks["b"][2, 1] = float("nan")
    out = zero_nonfinite_rows(blocks)
    assert torch.equal(out["a"][2], torch.zeros(3)) and torch.equal(out["b"][2], torch.zeros(2))
    assert torch.equal(out["a"][[0, 1, 3]], blocks["a"][[0, 1, 3]])


def test_every_kind_of_non_finite_row_is_found():
    """finite_rows reads each row's sum: +inf, -inf, NaN, +inf beside -inf (a sum of NaN) and finite values whose
    sum overflows float32 are all caught, in any of the tensors; rows of ordinary values pass."""
    from client.nonfinite import finite_rows

    a, b = torch.randn(7, 5), torch.randn(7, 2, 3)
    a[1, 0], a[2, 4], b[3, 1, 2] = float("inf"), float("-inf"), float("nan")
    a[4, 0], a[4, 1] = float("inf"), float("-inf")
    b[5] = 3e38  # each finite, the sum not
    assert finite_rows([a, b]).tolist() == [True, False, False, False, False, False, True]


def test_a_site_answers_a_crafted_net_with_finite_releases_through_the_message_path(tmp_path):
    """The same net sent as a hostile coordinator would: provided for the statistics (no DP-SGD at the site) and
    as the shared net of a federated training round. The site's digits are all brighter than black, so every
    record overflows: the releases must still be finite (noise and counts), not NaN."""
    from client.app import app as client_app
    from common import protocol as P
    from fedsynth.localgrid import LocalGrid
    from server.modes.bnstats import plan_settings
    from server.sites import Schema
    from tests.spine_helpers import fast_config, nodes
    from tests.test_faults import send

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=2, bn_width=8, bn_local_steps=3, bn_batch_size=64)
    settings = plan_settings(cfg, Schema(1, 8, 8, CLASSES), "exp-overflow")
    net = _overflowing_net(head_norm=settings["head_norm"])
    assert net.shape.width == settings["width"] == 8
    crafted = P.state_arrays(net)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    reply = send(grid, 1000, P.BnTrainRequest(**settings, server_round=1, net=crafted))
    assert not reply.has_error(), reply.error.reason
    assert all(np.isfinite(v).all() for v in P.BnTrainReply.from_message(reply).net.values())
    provided = P.BnStatsRequest(**{**settings, "experiment": "exp-overflow-2", "net_rounds": 0,
                                   "layer_clips": ""}, net=crafted)
    reply = send(grid, 1000, provided)
    assert not reply.has_error(), reply.error.reason
    stats = P.BnStatsReply.from_message(reply).stats
    assert stats and all(np.isfinite(v).all() for v in stats.values())


def test_a_non_finite_records_gradient_is_zeroed_in_place_not_beside_a_copy():
    """Review s58: zeroing a non-finite record's per-sample gradients made a zeroed copy beside the original, about
    three chunks' per-sample gradients where the work limits count two, at a time the coordinator's weights decide.
    They are zeroed in place now; the step is still the finite records' clipped sum."""
    from client.nonfinite import FiniteDPOptimizer

    layer = torch.nn.Linear(3, 2)
    opt = FiniteDPOptimizer(torch.optim.SGD(layer.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=10.0,
                            expected_batch_size=1, loss_reduction="mean")
    weight_rows = torch.tensor([[[1.0, 0, 0], [0, 0, 0]], [[math.nan, 0, 0], [0, 0, 0]], [[0, 2.0, 0], [0, 0, 0]]])
    layer.weight.grad_sample, layer.bias.grad_sample = weight_rows, torch.zeros(3, 2)
    where = layer.weight.grad_sample.data_ptr()
    opt.clip_and_accumulate()
    assert layer.weight.grad_sample.data_ptr() == where  # no second copy
    torch.testing.assert_close(layer.weight.summed_grad, torch.tensor([[1.0, 2.0, 0], [0, 0, 0]]))
