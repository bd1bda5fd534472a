"""One record changes a site's evaluation table / audit histograms by exactly one count, whatever the coordinator sends.

On CPU, float32 kernels round a row differently when its batch grows by one row (the built-in learners at a few
small sizes, the audit's distance blocks at 1-2 rows). A coordinator that sends near-ties (two classes' logits
1e-9 apart, two synthetic images straddling a bin edge) lets that rounding decide other records' results: with
batches sized to the data, adding one record moved the (K, 2) table by up to L2 4.8 and the histograms by 1.7,
against the sensitivity 1 their noise is calibrated to. The site now computes on fixed, zero-padded shapes
(``client.evaluation.EVALUATION_BATCH`` / ``AUDIT_BLOCK``); the last tests check the premise that at a fixed
shape a row's result depends on that row alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from client import evaluation
from client.evaluation import distance_histogram, evaluation_table
from common import protocol as P
from common.audits import mutual_nearest_distances, nearest_neighbors
from common.audits.neighbors import _exact_sq, _sq_block
from common.learner import _batched, build_learner

_DIGITS = load_digits()
X8 = (_DIGITS.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8)
Y = _DIGITS.target.astype(np.int64)
X28 = np.repeat(np.repeat(X8, 4, axis=2), 4, axis=3)[:, :, :28, :28]  # 28x28, as the MNIST-size learners see


def _images(shape) -> np.ndarray:
    return X8 if shape[1] == 8 else X28


def _near_tie(name: str, shape, seed: int) -> torch.nn.Module:
    """A classifier whose classes 0 and 1 are 1e-9 apart on every record (the others ruled out): float32 rounding
    decides which wins, so a record's prediction flips if its rounding depends on its batch-mates."""
    torch.manual_seed(seed)
    model = build_learner(name, shape, 10, allow_import=False).eval()
    with torch.no_grad():
        model.head.weight[1] = model.head.weight[0] + 3e-10 * torch.randn_like(model.head.weight[0])
        model.head.bias[1] = model.head.bias[0]
        model.head.bias[2:] = -1e4
    site_copy = build_learner(name, shape, 10, allow_import=False)  # what the site builds from the sent arrays
    P.load_state(site_copy, P.state_arrays(model))
    return site_copy


# (image shape, seed) where the batch-sized code moved the table by more than 1 on a 2-core x86 CPU
_CASES = {"logreg": ((1, 28, 28), 0), "mlp": ((1, 28, 28), 0), "cnn": ((1, 8, 8), 1)}


@pytest.mark.parametrize("name", sorted(_CASES))
def test_one_record_changes_the_evaluation_table_by_one_count(name, monkeypatch):
    monkeypatch.setattr(evaluation, "EVALUATION_BATCH", 32, raising=False)  # >= every set below: one padded batch
    shape, seed = _CASES[name]
    images = _images(shape)
    model = _near_tie(name, shape, seed)
    zero_one = np.flatnonzero(Y < 2)  # records of the near-tied classes
    # held-out sets of 2..25 records: the sizes of a last batch that the old batches of 1024 left at n = 1024 k + m
    for size in (2, 3, 6, 11, 16, 25):
        records = zero_one[:size]
        table = evaluation_table(model, images[records], Y[records], 10)
        for drop in (size - 1, 0):  # the last record, or the first (every later record moves up one row)
            keep = np.delete(records, drop)
            change = table - evaluation_table(model, images[keep], Y[keep], 10)
            assert np.abs(change).sum() == 1.0 and np.linalg.norm(change) == 1.0, (name, size, drop, change[:2])


def test_a_short_last_batch_after_full_ones_is_padded_too():
    model = _near_tie("mlp", (1, 28, 28), 0)
    zero_one = np.flatnonzero(Y < 2)
    order = np.concatenate([np.setdiff1d(np.arange(len(Y)), zero_one[:40])[:1024], zero_one[:16]])  # 1024 + 16
    change = (evaluation_table(model, X28[order], Y[order], 10)
              - evaluation_table(model, X28[order[:-1]], Y[order[:-1]], 10))
    assert np.abs(change).sum() == 1.0 and np.linalg.norm(change) == 1.0, change[:2]


def _straddling(y0: np.ndarray, u: np.ndarray, edge: float, below: bool) -> np.ndarray:
    """The float32 image y0 + t u whose exact pixel MSE to y0 is just below (or just at/above) ``edge``."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        t = (lo + hi) / 2
        image = (y0 + np.float32(t) * u).astype(np.float32)
        lo, hi = (t, hi) if np.mean((image.astype(np.float64) - y0.astype(np.float64)) ** 2) < edge else (lo, t)
    return (y0 + np.float32(lo if below else hi) * u).astype(np.float32)


def test_one_record_changes_the_audit_histogram_by_one_count(monkeypatch):
    monkeypatch.setattr(evaluation, "AUDIT_BLOCK", (8, 4), raising=False)  # small fixed blocks: a fast test
    # two synthetic images whose exact MSEs to record y0 straddle a bin edge by less than float32 rounding: which
    # one the search picks -- and so y0's bin -- must not depend on whether record x shares y0's distance block
    y0, y1, x = X8[0], X8[1], X8[2]
    edge = P.AUDIT_BIN_EDGES[17]
    rng = np.random.default_rng(0)
    inner = (y0 > 0.05) & (y0 < 0.95)
    for trial in range(12):
        u1, u2 = ((rng.normal(size=y0.shape) * inner).astype(np.float32) for _ in range(2))
        synthetic = np.stack([_straddling(y0, u1, edge, True), _straddling(y0, u2, edge, False)])
        for records, neighbour in ((np.stack([y0, y1, x]), np.stack([y0, y1])),   # x removed from the end
                                   (np.stack([x, y0, y1]), np.stack([y0, y1]))):  # from the front (rows move up)
            change = distance_histogram(records, synthetic) - distance_histogram(neighbour, synthetic)
            assert np.abs(change).sum() == 1.0 and np.linalg.norm(change) == 1.0, (trial, np.flatnonzero(change))


def test_fixed_blocks_find_the_same_neighbours_and_never_the_padding():
    rng = np.random.default_rng(1)
    a = rng.random((37, 20), dtype=np.float32)
    b = rng.random((11, 20), dtype=np.float32)
    b[3] = 0.01  # near the zero rows that pad a and b: padding must never win a search
    a[5] = 0.0
    for block in ((8, 4), (1024, 2048), (37, 11)):
        d, idx = nearest_neighbors(a, b, block_shape=block)
        d_ref, idx_ref = nearest_neighbors(a, b)
        np.testing.assert_array_equal(idx, idx_ref)
        np.testing.assert_allclose(d, d_ref)
        d_a, d_b = mutual_nearest_distances(a, b, block_shape=block)
        ref_a, ref_b = mutual_nearest_distances(a, b)
        np.testing.assert_allclose(d_a, ref_a)
        np.testing.assert_allclose(d_b, ref_b)
        assert np.all(d_b > 0)  # the zero padding rows of a are never b's nearest


# ---- the premise: at one fixed shape, a row's result depends on that row alone (its position and batch-mates
# ---- do not matter), checked bitwise on the shapes the site uses

@pytest.mark.parametrize("name,shape", [("logreg", (1, 8, 8)), ("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                        ("logreg", (1, 28, 28)), ("mlp", (1, 28, 28))])
def test_a_rows_logits_do_not_depend_on_its_batch_mates_at_the_fixed_batch(name, shape):
    torch.manual_seed(0)
    model = build_learner(name, shape, 10, allow_import=False)
    images = _images(shape)
    batch = evaluation.EVALUATION_BATCH
    rng = np.random.default_rng(0)
    logits = lambda idx: np.concatenate(_batched(lambda m, t: m(t), model, images[idx], "cpu", batch, True))  # noqa: E731
    base_idx = rng.choice(len(images), size=batch, replace=False)
    base = logits(base_idx)
    perm = rng.permutation(batch)  # every row at another position, among the same rows
    np.testing.assert_array_equal(logits(base_idx[perm]), base[perm])
    mates = base_idx.copy()
    mates[: batch // 2] = rng.choice(np.setdiff1d(np.arange(len(images)), base_idx), size=batch // 2, replace=False)
    np.testing.assert_array_equal(logits(mates)[batch // 2:], base[batch // 2:])  # other batch-mates
    short = logits(base_idx[: batch - 7])  # a short last batch, padded: the same bits as in a full batch
    np.testing.assert_array_equal(short, base[: batch - 7])


@pytest.mark.parametrize("images", [X8, X28], ids=["8x8", "28x28"])
def test_a_records_distances_do_not_depend_on_its_block_mates_at_the_fixed_block(images):
    rows, cols = evaluation.AUDIT_BLOCK
    rng = np.random.default_rng(0)
    flat = torch.from_numpy(np.ascontiguousarray(images.reshape(len(images), -1)))
    ref = torch.zeros(cols, flat.shape[1])
    ref[:1500] = torch.rand(1500, flat.shape[1])
    ref_sq = (ref * ref).sum(1)

    def block(idx):
        blk = torch.zeros(rows, flat.shape[1])
        blk[: len(idx)] = flat[idx]
        return _sq_block(blk, (blk * blk).sum(1), ref, ref_sq)[: len(idx)]

    base_idx = rng.choice(len(images), size=rows, replace=False)
    base = block(base_idx)
    perm = rng.permutation(rows)
    assert torch.equal(block(base_idx[perm]), base[perm])
    assert torch.equal(block(base_idx[:3]), base[:3])  # 3 records in a padded block: the same bits


@pytest.mark.parametrize("values", [784, 3 * 64 * 64, 3 * 96 * 96], ids=["1x28x28", "3x64x64", "3x96x96"])
def test_a_records_exact_distance_does_not_depend_on_how_many_records_there_are(values):
    """Review s59: the float64 distance of each record to its nearest image (the audit histogram's value) was one
    einsum over all records, which numpy sums in another order for a lone row of more than about 8,200 values: an
    audit at a site with one held-out record could bin it differently from the same record beside a second one,
    so one added record moved two cells. Now every block has the same rows, zero-padded."""
    rng = np.random.default_rng(0)
    a = rng.random((600, values), dtype=np.float32)
    b = rng.random((600, values), dtype=np.float32)
    every = _exact_sq(a, b)
    for n in (1, 2, 3, 257):
        np.testing.assert_array_equal(_exact_sq(a[:n], b[:n]), every[:n])
    shifted = _exact_sq(np.roll(a, -5, axis=0), np.roll(b, -5, axis=0))  # each record at another row of its block
    np.testing.assert_array_equal(np.roll(shifted, 5), every)


def test_odd_strides_on_the_size_one_channel_axis_do_not_change_a_site_batch():
    # numpy may give a (N, 1, H, W) slice any stride on its size-1 channel axis, and torch picks its conv kernel
    # by strides too: a site batch is a fresh standard-layout copy, so the bits do not depend on how it was cut
    torch.manual_seed(0)
    model = build_learner("cnn", (1, 8, 8), 10, allow_import=False)
    odd = np.lib.stride_tricks.as_strided(X8, shape=X8.shape, strides=(256, 4, 32, 4))  # same values, channel stride 4
    assert np.array_equal(odd, X8) and odd.strides != X8.strides
    run = lambda x: np.concatenate(_batched(lambda m, t: m(t), model, x, "cpu", 64, True))  # noqa: E731
    standard = np.empty((100, 1, 8, 8), np.float32)
    standard[...] = X8[:100]  # strides (256, 256, 32, 4); X8 itself, cut by [:, None], has channel stride 0
    expected = run(standard)
    np.testing.assert_array_equal(run(odd[:100]), expected)
    np.testing.assert_array_equal(run(X8[:100]), expected)


@pytest.mark.parametrize("width", [16, 32])
def test_a_records_statistics_features_do_not_depend_on_its_block_mates(width):
    """Review s56: the statistics release and the automatic clip bounds ran the coordinator's net on blocks sized to
    the data, and a record alone in a short last block got other float32 roundings than in a block of two: one added
    record then moved another's block norm across a histogram bin edge the net was tuned to (L2 2.83 against the
    sqrt(L) = 2 the clip-choice noise is scaled to). At the fixed, padded block a record's features are its own."""
    from common.bnnet import BNNet, iter_record_blocks
    from common.data import ImageDataset

    torch.manual_seed(0)
    net = BNNet(1, 10, 8, width).eval()
    images = X8[:514]

    def features(n: int) -> dict[str, np.ndarray]:
        data = ImageDataset(images[:n], Y[:n], tuple(str(k) for k in range(10)))
        blocks = [b for _, b in iter_record_blocks(net, data, batch_size=512)]
        return {name: torch.cat([b[name] for b in blocks]).numpy() for name in blocks[0]}

    alone, paired = features(513), features(514)  # record 512 alone in its block, then with record 513
    for name in alone:
        assert alone[name].shape[0] == 513 and paired[name].shape[0] == 514
        assert np.array_equal(alone[name][512], paired[name][512]), name  # bitwise
        assert np.array_equal(alone[name][:512], paired[name][:512]), name


def test_the_shared_nets_dp_sgd_step_moves_by_at_most_one_clip_bound_for_one_added_record():
    """Review s56: with a mean loss, autograd carried (p - y) / b through the shared net's backward pass (b the realised
    Poisson batch), so a net built to round those values to 0 from b = 41 on (head weights of 205 subnormal ulps,
    behind them a GroupNorm and a conv that blow one ulp up to an overflow, which zeroes a record's contribution)
    made every record flip between contributing and not when one record was added: L2 41 against the accounted 1.
    With a summed loss each record's gradient is computed without b."""
    from client.dpsgd import train_dpsgd_local
    from common.bnnet import BNNet
    from common.data import load_dataset

    ulp = 2.0 ** -149

    def crafted() -> BNNet:
        torch.manual_seed(0)
        net = BNNet(1, 10, 8, 8)
        with torch.no_grad():
            net.block2.norm.weight.zero_()
            net.block2.norm.bias.fill_(ulp)  # block3's conv sees exactly 2^-149
            w3 = torch.zeros_like(net.block3.conv.weight)  # (16, 16, 3, 3)
            for co in range(16):
                for ci in range(co % 2, 16, 2):
                    w3[co, ci, 1, 1] = 2.0 ** 127
            net.block3.conv.weight.copy_(w3)
            net.block3.conv.bias.zero_()
            net.block3.norm.weight.fill_(3e21)  # its input is constant: x_hat = 0, the output is the bias
            net.block3.norm.bias.fill_(1e17)
            net.head.weight.zero_()
            net.head.bias.zero_()  # p = 0.1 for every class
            head = torch.zeros(16, 2, 2)
            head[0::2] = 205 * ulp
            net.head.weight[0] = head.flatten()
        return net

    def summed_update(data) -> torch.Tensor:  # the step's sum of clipped gradients (no noise, rate 1, lr 1)
        net = crafted()
        before = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        train_dpsgd_local(net, data, noise_multiplier=0.0, sample_rate=1.0, steps=1, max_grad_norm=1.0, lr=1.0,
                          momentum=0.0, expected_batch=40, device="cpu", seed=0)
        after = torch.cat([p.detach().double().flatten() for p in net.parameters()])
        small = before.abs() < 1e3  # the huge crafted weights' updates vanish in their rounding
        return (before - after)[small] * 40

    digits = load_dataset("digits", "train")
    threes = np.flatnonzero(digits.labels == 3)[:41]
    change = summed_update(digits.subset(threes[:40])) - summed_update(digits.subset(threes))
    assert float(change.norm()) <= 1.0 + 1e-4


def _summed_clipped_update(net, data, expected_batch: int) -> torch.Tensor:
    """One noiseless DP-SGD step of the site's own code at rate 1 and lr 1: the sum of clipped gradients (flat)."""
    from client.dpsgd import train_dpsgd_local

    before = torch.cat([p.detach().double().flatten() for p in net.parameters()])
    train_dpsgd_local(net, data, noise_multiplier=0.0, sample_rate=1.0, steps=1, max_grad_norm=1.0, lr=1.0,
                      momentum=0.0, expected_batch=expected_batch, device="cpu", seed=0)
    update = (before - torch.cat([p.detach().double().flatten() for p in net.parameters()])) * expected_batch
    return update * (before.abs() < 1e3)  # a crafted weight of 1e10 loses its update in float32's rounding


def test_the_shared_nets_chunked_dp_sgd_step_is_the_sum_of_each_records_clipped_gradient():
    """The Poisson batch runs in padded chunks of DPSGD_CHUNK rows; the step must still be one logical batch (Opacus
    divides by the number of backward passes unless the chunks' per-sample gradients are joined first)."""
    from client.dpsgd import DPSGD_CHUNK
    from common.bnnet import BNNet
    from common.data import load_dataset

    data = load_dataset("digits", "train").subset(np.arange(2 * DPSGD_CHUNK + 22))  # three chunks, the last padded
    torch.manual_seed(0)
    net, alone = BNNet(1, 10, 8, 8), BNNet(1, 10, 8, 8)
    alone.load_state_dict(net.state_dict())
    step = _summed_clipped_update(net, data, len(data))
    expected = torch.zeros_like(step)
    x, y = torch.as_tensor(data.images, dtype=torch.float32), torch.as_tensor(data.labels)
    for i in range(len(data)):  # each record alone: its own loss's gradient, clipped to 1
        alone.zero_grad()
        torch.nn.functional.cross_entropy(alone(x[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        g = torch.cat([p.grad.double().flatten() for p in alone.parameters()])
        expected += g * min(1.0, 1.0 / (float(g.norm()) + 1e-6))
    assert float((step - expected).abs().max()) < 1e-4 * float(expected.abs().max())


def test_a_records_dp_sgd_forward_does_not_depend_on_how_many_others_were_sampled():
    """Review s56, third pass: on CPU a row's features rounded differently in a batch of 1 than of 2 or more (feature
    123 of a width-32 net: 0.066146642 alone, 0.066145889 in a pair), so a shared net whose head thresholds that
    feature made a record's clipped gradient 0 when sampled alone and C when sampled with another (the step moved by
    about 2C for one added record). The site's DP-SGD now runs fixed, padded chunks: a row's logits are its own."""
    from client.dpsgd import opacus_input, padded_chunks
    from common.bnnet import BNNet
    from common.data import load_dataset

    digits = load_dataset("digits", "train")
    x, y = opacus_input(digits.images[:200], "cpu"), torch.as_tensor(digits.labels[:200]).long()
    torch.manual_seed(0)
    net = BNNet(1, 10, 8, width=32).train()
    with torch.no_grad():
        def logits(idx: list[int]) -> torch.Tensor:
            return torch.cat([net(xb) for xb, _, _ in padded_chunks(x, y, torch.tensor(idx))])[:len(idx)]

        alone = logits([0])[0]
        for batch in ([0, 1], [0, *range(5, 40)], [0, *range(1, 130)]):
            assert torch.equal(logits(batch)[0], alone), len(batch)  # bitwise
        assert not torch.equal(net(x[[0, 1]])[0], net(x[[0]])[0])  # (the rounding the chunks take away: not vacuous)
