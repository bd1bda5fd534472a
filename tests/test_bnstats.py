"""Site side of the BN-statistics mode: the shared net, local DP-SGD and the DP statistics release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from client.bnstats import (
    COUNT_KEY,
    SUM_PREFIX,
    SUMSQ_PREFIX,
    exact_class_sums,
    expected_release_keys,
    record_class_statistics,
    release_noise_std,
    release_num_bytes,
    release_sensitivity,
)
from client.dpsgd import train_dpsgd_local
from common.bnnet import BNNet, capture_norm_inputs, norm_layer_channels, norm_layer_names
from common.data import ImageDataset, load_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits", "train")


def small_net(width: int = 4, seed: int = 0) -> BNNet:
    torch.manual_seed(seed)
    return BNNet(1, 10, 8, width).eval()


# ---- shared net -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cin,size", [(1, 8), (1, 28), (3, 32), (3, 64)])
def test_bnnet_shapes_and_opacus_validation(cin: int, size: int) -> None:
    net = BNNet(cin, 7, size, width=8)
    assert ModuleValidator.validate(net, strict=False) == []
    x = torch.rand(3, cin, size, size)
    with capture_norm_inputs(net) as inputs:
        logits = net(x)
    assert logits.shape == (3, 7)
    assert list(inputs) == ["block1.norm", "block2.norm", "block3.norm"]
    assert [inputs[n].shape[:2] for n in inputs] == [(3, 8), (3, 16), (3, 16)]
    assert inputs["block1.norm"].shape[2:] == (size, size)
    assert net.head.in_features == 16 * (size // 8 if size >= 48 else size // 4) ** 2  # at most 8x8 at the head
    # hooks are gone after the block: a new forward does not refill the dict
    inputs.clear()
    net(x)
    assert inputs == {}


def test_bnnet_layer_names_stable_and_shape_checked() -> None:
    assert norm_layer_names(BNNet(1, 10, 28, 16)) == norm_layer_names(BNNet(3, 2, 32, 4))
    assert norm_layer_channels(BNNet(1, 10, 8, 16)) == {"block1.norm": 16, "block2.norm": 32, "block3.norm": 32}
    with pytest.raises(ValueError, match="at least 8x8"):
        BNNet(1, 10, 4)
    with pytest.raises(ValueError, match="2 classes"):
        BNNet(1, 1, 8)


# ---- release format -------------------------------------------------------------------------------

def test_release_keys_shapes_dtype_and_size(digits: ImageDataset) -> None:
    net = small_net()
    rel = record_class_statistics(net, digits.subset(np.arange(200)), clip_bound=2.0, noise_multiplier=1.0, seed=0)
    expected = expected_release_keys(net, 10)
    assert {k: v.shape for k, v in rel.items()} == expected
    assert set(expected) == {COUNT_KEY} | {p + n for n in norm_layer_names(net) for p in (SUM_PREFIX, SUMSQ_PREFIX)}
    assert all(v.dtype == np.float32 for v in rel.values())
    assert release_num_bytes(net, 10) == sum(v.nbytes for v in rel.values())
    # 10 counts + 2 * 10 * (4 + 8 + 8) per-class channel sums, 4 bytes each
    assert release_num_bytes(net, 10) == 4 * (10 + 2 * 10 * 20)


def test_exact_statistics_without_noise(digits: ImageDataset) -> None:
    """noise 0, no clipping: counts are the class counts and sums are the per-record channel moments."""
    net = small_net()
    ds = digits.subset(np.arange(150))
    rel = record_class_statistics(net, ds, clip_bound=math.inf, noise_multiplier=0.0, batch_size=64)
    np.testing.assert_array_equal(rel[COUNT_KEY], np.bincount(ds.labels, minlength=10))
    with torch.no_grad(), capture_norm_inputs(net) as inputs:
        net(torch.as_tensor(ds.images))
        for name, a in inputs.items():
            a = a.double().numpy()  # (N, C, H, W)
            for k in range(10):
                rows = a[ds.labels == k]
                np.testing.assert_allclose(rel[SUM_PREFIX + name][k], rows.mean(axis=(2, 3)).sum(0), rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(rel[SUMSQ_PREFIX + name][k], (rows**2).mean(axis=(2, 3)).sum(0),
                                           rtol=1e-5, atol=1e-5)


def test_same_seed_same_noise_other_seed_other_noise(digits: ImageDataset) -> None:
    net, ds = small_net(), digits.subset(np.arange(100))
    a = record_class_statistics(net, ds, clip_bound=1.0, noise_multiplier=1.0, seed=3)
    b = record_class_statistics(net, ds, clip_bound=1.0, noise_multiplier=1.0, seed=3)
    c = record_class_statistics(net, ds, clip_bound=1.0, noise_multiplier=1.0, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a[COUNT_KEY], c[COUNT_KEY])


# ---- DP properties --------------------------------------------------------------------------------

def test_noise_has_the_calibrated_scale(digits: ImageDataset) -> None:
    """Empirical std of (noisy - exact) per coordinate = sigma * Delta (/a for counts, *C for sums).

    With ~16k feature and 600 count residuals the std estimates are within a few % of the truth, so
    the 12% / 20% tolerances fail for a noise scale that is off by any factor far from 1 (e.g. 2x, 0.5x).
    """
    net, ds = small_net(), digits.subset(np.arange(120))
    sigma, clip, a = 1.7, 3.0, 0.5
    exact = exact_class_sums(net, ds, num_classes=10, clip_bound=clip)
    count_res, feat_res = [], []
    for seed in range(40):
        rel = record_class_statistics(net, ds, clip_bound=clip, noise_multiplier=sigma, seed=seed, count_weight=a)
        count_res.append(rel[COUNT_KEY] - exact[COUNT_KEY])
        feat_res += [(rel[k] - exact[k]).ravel() for k in rel if k != COUNT_KEY]
    count_res, feat_res = np.concatenate(count_res), np.concatenate(feat_res)
    delta = release_sensitivity(a)
    assert delta == pytest.approx(math.sqrt(1.25))
    std = release_noise_std(sigma, clip, a)
    assert std["count"] == pytest.approx(sigma * delta / a)
    assert std["sum"] == pytest.approx(sigma * delta * clip)
    assert np.std(count_res) == pytest.approx(std["count"], rel=0.2)
    assert np.std(feat_res) == pytest.approx(std["sum"], rel=0.12)
    assert abs(np.mean(feat_res)) < 0.1 * std["sum"]  # centred


def _scaled_vector(sums: dict[str, np.ndarray], clip: float, a: float) -> np.ndarray:
    """The release in the mechanism's units (count * a, features / C), as one vector."""
    return np.concatenate([sums[COUNT_KEY] * a] + [sums[k].ravel() / clip for k in sorted(sums) if k != COUNT_KEY])


def test_clipping_bounds_one_records_contribution(digits: ImageDataset) -> None:
    """Adding one extreme record moves the scaled exact release by at most the sensitivity."""
    net = small_net()
    with torch.no_grad():  # blow up the activations so that records are far outside the clip bound
        for p in net.parameters():
            p.mul_(30.0)
    base = digits.subset(np.arange(60))
    extreme = ImageDataset(np.concatenate([base.images, np.ones((1, 1, 8, 8), np.float32)]),
                           np.concatenate([base.labels, [7]]), base.classes)
    clip, a = 0.8, 0.5
    diff = _scaled_vector(exact_class_sums(net, extreme, num_classes=10, clip_bound=clip), clip, a) \
        - _scaled_vector(exact_class_sums(net, base, num_classes=10, clip_bound=clip), clip, a)
    # 1e-6 slack: float32 convolutions of the other records differ in the last bits between batchings
    assert np.linalg.norm(diff) <= release_sensitivity(a) * (1 + 1e-6)
    # the bound is active: the same record unclipped moves the release far more than the bound
    unclipped = _scaled_vector(exact_class_sums(net, extreme, num_classes=10), clip, a) \
        - _scaled_vector(exact_class_sums(net, base, num_classes=10), clip, a)
    assert np.linalg.norm(unclipped) > 10 * release_sensitivity(a)
    # and every record, not just this one, stays within the bound on its own
    for i in range(len(base)):
        one = exact_class_sums(net, base.subset([i]), num_classes=10, clip_bound=clip)
        assert np.linalg.norm(_scaled_vector(one, clip, a)) <= release_sensitivity(a) * (1 + 1e-9)


def test_release_rejects_misuse(digits: ImageDataset) -> None:
    net, ds = small_net(), digits.subset(np.arange(50))
    with pytest.raises(ValueError, match="finite clip_bound"):
        record_class_statistics(net, ds, clip_bound=math.inf, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        record_class_statistics(net, ds, clip_bound=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="expects"):
        record_class_statistics(BNNet(1, 10, 28, 4), ds, clip_bound=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="does not fit"):
        record_class_statistics(net, ds, clip_bound=1.0, noise_multiplier=1.0, num_classes=5)


# ---- local DP-SGD ---------------------------------------------------------------------------------

def _loss(net: nn.Module, ds: ImageDataset) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(net(torch.as_tensor(ds.images)), torch.as_tensor(ds.labels)))


def test_a_dpsgd_step_holds_one_chunks_per_sample_gradients_and_sums_every_records_clipped_gradient(
        digits: ImageDataset, monkeypatch) -> None:
    """Review s58: the chunks' per-sample gradients were kept to the step's end (and copied once more when joined),
    64 x ceil(b / 64) rows for a batch of b, which grew with the records sampled and was not what the work limits
    counted. Each chunk is now clipped into the step's sum as it comes. Without noise, at lr 1 and plain SGD, one step
    moves the net by exactly the sum of each record's clipped gradient over the expected batch."""
    from client.dpsgd import DPSGD_CHUNK
    from client.nonfinite import FiniteDPOptimizer

    held, original = [], FiniteDPOptimizer.accumulate_chunk

    def noting(optimizer) -> None:
        held.append({len(p.grad_sample) for p in optimizer.params})
        original(optimizer)

    monkeypatch.setattr(FiniteDPOptimizer, "accumulate_chunk", noting)
    torch.manual_seed(0)
    net = small_net(width=4)
    before = [p.detach().clone() for p in net.parameters()]
    reference = [p.detach().clone() for p in net.parameters()]
    train_dpsgd_local(net, digits, noise_multiplier=0.0, sample_rate=1.0, steps=1, max_grad_norm=0.5, lr=1.0,
                      momentum=0.0, seed=0, expected_batch=100)
    n = len(digits)
    assert held == [{DPSGD_CHUNK}] * math.ceil(n / DPSGD_CHUNK)  # rate 1: every record, in chunks of 64
    expected = [torch.zeros_like(w, dtype=torch.float64) for w in reference]
    ref_net = small_net(width=4)
    with torch.no_grad():
        for q, w in zip(ref_net.parameters(), reference):
            q.copy_(w)
    for i in range(n):  # each record alone, its gradient clipped to 0.5
        ref_net.zero_grad()
        x = torch.as_tensor(digits.images[i:i + 1])
        nn.functional.cross_entropy(ref_net(x), torch.as_tensor(digits.labels[i:i + 1])).backward()
        g = [q.grad.double() for q in ref_net.parameters()]
        norm = float(torch.sqrt(sum((t ** 2).sum() for t in g)))
        for e, t in zip(expected, g):
            e += t * min(1.0, 0.5 / (norm + 1e-6))
    step = [(b - a.detach()).double() * 100 for b, a in zip(before, net.parameters())]
    worst = max(float((s - e).abs().max()) for s, e in zip(step, expected))
    assert worst < 1e-3 * max(float(e.abs().max()) for e in expected)


def test_dpsgd_lowers_the_loss_in_place(digits: ImageDataset) -> None:
    net = small_net(width=8)
    before = _loss(net, digits)
    weights = [p.detach().clone() for p in net.parameters()]
    metrics = train_dpsgd_local(net, digits, noise_multiplier=0.8, sample_rate=0.05, steps=60,
                                max_grad_norm=1.0, lr=0.3, seed=0)
    after = _loss(net, digits)
    assert after < 0.6 * before, (before, after)
    assert metrics["steps"] == 60 and metrics["num_samples"] == len(digits)
    assert metrics["mean_batch_size"] == pytest.approx(0.05 * len(digits), rel=0.15)
    assert any(not torch.equal(w, p) for w, p in zip(weights, net.parameters()))
    # Opacus is detached again: no hooks, no per-sample gradient attributes left on the caller's net
    assert all(not hasattr(p, "grad_sample") for p in net.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


def test_dpsgd_is_reproducible_for_a_seed(digits: ImageDataset) -> None:
    ds = digits.subset(np.arange(300))
    nets = [small_net(), small_net()]
    for net in nets:
        train_dpsgd_local(net, ds, noise_multiplier=1.0, sample_rate=0.1, steps=5, max_grad_norm=1.0, lr=0.1, seed=7)
    assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))


@pytest.mark.parametrize("bad,match", [
    (dict(sample_rate=0.0), "sample_rate"),
    (dict(sample_rate=1.5), "sample_rate"),
    (dict(steps=0), "steps"),
    (dict(noise_multiplier=-0.1), "noise_multiplier"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(lr=float("nan")), "lr"),
])
def test_dpsgd_rejects_bad_arguments(digits: ImageDataset, bad: dict, match: str) -> None:
    args = dict(noise_multiplier=1.0, sample_rate=0.1, steps=3, max_grad_norm=1.0, lr=0.1)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        train_dpsgd_local(small_net(), digits.subset(np.arange(100)), **args)


def test_dpsgd_with_every_batch_empty_is_a_noise_only_run_not_a_failure(digits: ImageDataset) -> None:
    """At a site the sampling rate comes from the noisy census, so a tiny expected batch or batches that all come
    out empty depend on the record count; failing then, after the charge, told the coordinator so. Such a run takes
    its noise-only steps, as accounted, and reports NaN losses (they stay at the site)."""
    net = small_net()
    before = [p.detach().clone() for p in net.parameters()]
    metrics = train_dpsgd_local(net, digits.subset(np.arange(100)), noise_multiplier=1.0, sample_rate=1e-6, steps=2,
                                max_grad_norm=1.0, lr=0.1, seed=0)
    assert metrics["empty_batches"] == 2 and math.isnan(metrics["loss_first"]) and math.isnan(metrics["loss_last"])
    assert any(not torch.equal(w, p) for w, p in zip(before, net.parameters()))  # the noise moved the weights


def test_dpsgd_rejects_batchnorm_and_wrong_shapes(digits: ImageDataset) -> None:
    ds = digits.subset(np.arange(100))
    bn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 10))
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD"):
        train_dpsgd_local(bn, ds, noise_multiplier=1.0, sample_rate=0.1, steps=1, max_grad_norm=1.0, lr=0.1)
    with pytest.raises(ValueError, match="expects"):
        train_dpsgd_local(BNNet(1, 10, 28, 4), ds, noise_multiplier=1.0, sample_rate=0.1, steps=1,
                          max_grad_norm=1.0, lr=0.1)


# ---- centred release ------------------------------------------------------------------------------

def _center_of(net: BNNet, ds: ImageDataset, shift: float) -> dict[str, np.ndarray]:
    """A (deliberately inexact) per-class centre: the exact class averages, shifted by ``shift``."""
    exact = exact_class_sums(net, ds, num_classes=10)
    n = np.maximum(exact[COUNT_KEY], 1)[:, None]
    return {k: (v / n + shift).astype(np.float32) for k, v in exact.items() if k != COUNT_KEY}


def test_centring_keeps_the_meaning_of_the_release(digits: ImageDataset) -> None:
    """Without noise and clipping, a centred release equals the plain one (sums in original units)."""
    net, ds = small_net(), digits.subset(np.arange(200))
    plain = record_class_statistics(net, ds, clip_bound=math.inf, noise_multiplier=0.0)
    centred = record_class_statistics(net, ds, clip_bound=math.inf, noise_multiplier=0.0,
                                      center=_center_of(net, ds, 0.05))
    for k in plain:
        np.testing.assert_allclose(centred[k], plain[k], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="center must have exactly the keys"):
        record_class_statistics(net, ds, clip_bound=1.0, noise_multiplier=1.0, center={"sum/x": np.zeros((10, 4))})


def test_centring_shrinks_the_needed_clip_bound_and_keeps_the_sensitivity(digits: ImageDataset) -> None:
    net, ds = small_net(), digits.subset(np.arange(300))
    center = _center_of(net, ds, 0.0)
    clip, a = 0.2, 0.5
    # with a small clip bound the centred sums stay close to the truth, the plain ones do not
    truth = record_class_statistics(net, ds, clip_bound=math.inf, noise_multiplier=0.0)
    plain = record_class_statistics(net, ds, clip_bound=clip, noise_multiplier=0.0)
    centred = record_class_statistics(net, ds, clip_bound=clip, noise_multiplier=0.0, center=center)
    err = {name: sum(np.abs(rel[k] - truth[k]).sum() for k in truth) for name, rel in (("plain", plain), ("centred", centred))}
    assert err["centred"] < 0.2 * err["plain"], err
    # each record's centred contribution still lies within the sensitivity
    for i in range(0, len(ds), 10):
        one = exact_class_sums(net, ds.subset([i]), num_classes=10, clip_bound=clip, center=center)
        assert np.linalg.norm(_scaled_vector(one, clip, a)) <= release_sensitivity(a) * (1 + 1e-9)


# ---- head norm and per-layer clipping -------------------------------------------------------------

def test_head_norm_net_records_a_positional_layer() -> None:
    net = BNNet(1, 10, 28, 4, head_norm=True)
    assert ModuleValidator.validate(net, strict=False) == []
    assert net.shape.build().shape == net.shape and net.shape.head_norm
    assert norm_layer_channels(net) == {"block1.norm": 4, "block2.norm": 8, "block3.norm": 8,
                                        "head_norm.norm": 8 * 7 * 7}
    with capture_norm_inputs(net) as inputs:
        assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert inputs["head_norm.norm"].shape == (3, 8 * 7 * 7, 1, 1)


def _layer_scaled_vector(sums: dict[str, np.ndarray], bounds: dict[str, float], a: float) -> np.ndarray:
    """A per-layer-clipped release in the mechanism's units: count * a, block l / (c_l sqrt(L))."""
    root = math.sqrt(len(bounds))
    return np.concatenate([sums[COUNT_KEY] * a] + [sums[k].ravel() / (bounds[k.split("/", 1)[1]] * root)
                                                   for k in sorted(sums) if k != COUNT_KEY])


def test_per_layer_clipping_bounds_each_record_and_scales_the_noise_per_layer(digits: ImageDataset) -> None:
    net = small_net()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(10.0)
    ds, a = digits.subset(np.arange(40)), 0.5
    bounds = {"block1.norm": 0.1, "block2.norm": 2.0, "block3.norm": 0.5}
    for i in range(len(ds)):  # every record's scaled contribution lies within the sensitivity
        one = exact_class_sums(net, ds.subset([i]), num_classes=10, clip_bound=bounds)
        assert np.linalg.norm(_layer_scaled_vector(one, bounds, a)) <= release_sensitivity(a) * (1 + 1e-9)
        for name, c in bounds.items():  # and each layer's block on its own within its bound
            block = np.concatenate([one[SUM_PREFIX + name].ravel(), one[SUMSQ_PREFIX + name].ravel()])
            assert np.linalg.norm(block) <= c * (1 + 1e-9)
    sigma = 2.0
    std = release_noise_std(sigma, bounds, a)
    delta = release_sensitivity(a)
    for name, c in bounds.items():
        assert std[SUM_PREFIX + name] == pytest.approx(sigma * delta * c * math.sqrt(3))
    assert std["sum"] == pytest.approx(sigma * delta * 2.0 * math.sqrt(3))
    exact = exact_class_sums(net, ds, num_classes=10, clip_bound=bounds)
    res = {n: [] for n in bounds}
    for seed in range(30):
        rel = record_class_statistics(net, ds, clip_bound=bounds, noise_multiplier=sigma, seed=seed, count_weight=a)
        for n in bounds:
            res[n].append((rel[SUM_PREFIX + n] - exact[SUM_PREFIX + n]).ravel())
    for n in bounds:
        assert np.std(np.concatenate(res[n])) == pytest.approx(std[SUM_PREFIX + n], rel=0.15)
    with pytest.raises(ValueError, match="exactly the layers"):
        record_class_statistics(net, ds, clip_bound={"block1.norm": 1.0}, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="finite clip_bound"):
        record_class_statistics(net, ds, clip_bound={**bounds, "block1.norm": math.inf}, noise_multiplier=1.0)



def test_a_records_clip_factor_is_the_same_alone_in_the_last_block_as_among_others(monkeypatch):
    """Review s61: with 2+ threads a row alone in a short last block summed its squares in another order than among
    other rows (at 65,536 features), so one added record could move another record's flat clip factor by an ulp.
    Every row reduction now runs on a block of one shape (the last padded with zero rows)."""
    import client.bnstats as bnstats
    from common.data import ImageDataset

    torch.manual_seed(0)
    rows = (torch.randn(514, 65_536, dtype=torch.float64) * 3 + 1)  # (N, 2 C): one layer of 32,768 channels
    monkeypatch.setattr(bnstats, "norm_layer_channels", lambda model: {"layer": 32_768})
    monkeypatch.setattr(bnstats, "check_images_fit", lambda model, images: None)

    def class_one_sum(n: int) -> np.ndarray:
        """The clipped row of record 512, the only one of class 1, in a dataset of the first n rows."""
        def iterate(model, dataset, *, device=None, batch_size=512):
            for start in range(0, n, batch_size):
                yield start, {"layer": rows[start:min(n, start + batch_size)]}
        monkeypatch.setattr(bnstats, "iter_record_blocks", iterate)
        labels = (np.arange(n) == 512).astype(np.int64)
        data = ImageDataset(np.zeros((n, 1, 1, 1), np.float32), labels, ("a", "b"))
        out = bnstats.exact_class_sums(torch.nn.Linear(1, 1), data, num_classes=2, clip_bound=100.0, device="cpu")
        return np.concatenate([out["sum/layer"][1], out["sumsq/layer"][1]])

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        alone, among = class_one_sum(513), class_one_sum(514)  # record 512 alone in the last block, then one of two
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(alone, among)
