"""The discriminator's DP step: each record's per-sample gradient is exactly its own (real, fake) pair's."""

from __future__ import annotations

import copy

import numpy as np
import torch
from opacus import GradSampleModule

from client.dpgan import discriminator_loss
from common.models import Discriminator, GanShape


def test_per_sample_gradients_are_each_records_own_real_and_fake_pair() -> None:
    torch.manual_seed(0)
    shape = GanShape(channels=1, image_size=16, num_classes=3, latent_dim=8, width=8)
    disc = Discriminator(shape, width=4)
    reference = copy.deepcopy(disc)
    b = 5
    real, fake = torch.rand(b, 1, 16, 16), torch.rand(b, 1, 16, 16)  # (b, C, H, W)
    labels = torch.tensor([0, 2, 1, 2, 0])

    model = GradSampleModule(disc, loss_reduction="sum")
    loss, real_cls = discriminator_loss(model, real, fake, labels, ac_weight=0.3)
    loss.backward()
    assert real_cls.shape == (b, 3)

    for i in range(b):  # record i alone, plain autograd: its real row and its fake row
        reference.zero_grad()
        own, _ = discriminator_loss(reference, real[i:i + 1], fake[i:i + 1], labels[i:i + 1], ac_weight=0.3)
        own.backward()
        for (name, p), q in zip(disc.named_parameters(), reference.parameters()):
            assert p.grad_sample.shape == (b, *p.shape), name
            torch.testing.assert_close(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)
    model._close()


class _ZBlindGenerator(torch.nn.Module):
    """A collapsed generator: one image per class, whatever the latent."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.rand(3, 1, 8, 8))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.table[y] + 0.0 * z.sum()


def test_mode_seeking_penalty_punishes_a_generator_that_ignores_its_latent() -> None:
    from client.dpgan import mode_seeking_penalty, paired_labels
    from common.models import Generator

    torch.manual_seed(0)
    labels = paired_labels(torch.randint(0, 3, (16,)), 32)  # (32,): rows 2i and 2i+1 share a label
    z = torch.randn(32, 8)
    collapsed = _ZBlindGenerator()
    healthy = Generator(GanShape(channels=1, image_size=8, num_classes=3, latent_dim=8, width=8))
    collapsed_penalty = mode_seeking_penalty(z, collapsed(z, labels))
    healthy_penalty = mode_seeking_penalty(z, healthy(z, labels))
    assert float(collapsed_penalty.detach()) > 1e3 * float(healthy_penalty.detach())
    # the penalty's gradient reaches the generator (it is a G-only loss term)
    healthy_penalty.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in healthy.parameters())


def test_the_mode_seeking_pairs_share_a_label_and_an_odd_batch_keeps_its_size() -> None:
    """The term compares rows 2i and 2i+1 only: they must be images of one class (two classes would differ
    anyway and hide a collapse), and every row of the G batch keeps a label (the adversarial loss uses all)."""
    from client.dpgan import mode_seeking_penalty, paired_labels

    half = torch.tensor([4, 0, 7])
    assert paired_labels(half, 6).tolist() == [4, 4, 0, 0, 7, 7]
    assert paired_labels(half, 5).tolist() == [4, 4, 0, 0, 7]
    # an odd last row is left out of the term: the penalty of 5 rows is that of their first 4
    z, fake = torch.randn(5, 8), torch.randn(5, 1, 8, 8)
    assert torch.equal(mode_seeking_penalty(z, fake), mode_seeking_penalty(z[:4], fake[:4]))


def _flat(state: dict) -> torch.Tensor:
    """A generator's state_dict as one vector."""
    return torch.cat([v.flatten().float() for v in state.values()])


def _digits_trainer(tmp_path, name: str):
    from client.dpgan import LocalGanTrainer
    from common.data import load_dataset

    data = load_dataset("digits", "train")
    shape = GanShape(channels=1, image_size=8, num_classes=10, latent_dim=8, width=8)
    return shape, LocalGanTrainer(shape, data, torch.device("cpu"), progress=False)


def _one_round(tmp_path, name: str, **settings) -> torch.Tensor:
    """A site's generator (flat) after one round on the digits from one fixed start, coordinator seed 7."""
    from client.dpgan import RoundSettings
    from common.models import Generator

    shape, trainer = _digits_trainer(tmp_path, name)
    torch.manual_seed(0)
    start = Generator(shape).state_dict()
    rs = RoundSettings(max_grad_norm=1.0, lr_d=1e-3, lr_g=1e-3, seed=7, **settings)
    state, _, _ = trainer.train_round(start, rs)
    return _flat(state)


def test_dp_noise_and_batches_do_not_follow_the_coordinators_seed(tmp_path) -> None:
    """The coordinator sends ``seed``; if it also fixed the DP noise it could replay and subtract it."""
    def run(name: str, noise_seed):
        return _one_round(tmp_path, name, noise_multiplier=1.0, sample_rate=0.05, steps=3, noise_seed=noise_seed)

    assert not torch.equal(run("a", None), run("b", None))  # same coordinator seed, fresh secret noise
    assert torch.equal(run("c", 123), run("d", 123))  # a fixed noise seed (tests, benchmarks) replays exactly


def test_the_fakes_latents_do_not_follow_the_coordinators_seed(tmp_path) -> None:
    """A D step draws one fake per sampled record, so a latent stream's position after t steps is the sum of the
    Poisson batch sizes so far (a count of private records). From the coordinator's seed, the fakes and G's
    updates would carry that count outside the DP steps. With no noise and every record in every batch
    (q = 1), nothing else random is left: two rounds differ only if the latents are the site's own."""
    def run(name: str, noise_seed):
        return _one_round(tmp_path, name, noise_multiplier=0.0, sample_rate=1.0, steps=2, noise_seed=noise_seed,
                          mode_seeking=1.0)

    assert not torch.equal(run("a", 1), run("b", 2))
    assert torch.equal(run("c", 3), run("d", 3))


def test_extra_generator_steps_and_the_generators_ema_change_what_a_site_sends(tmp_path) -> None:
    """gan-g-steps and gan-ema reach the site's round: n G steps after each D step, and the EMA of G's
    weights (which lags behind G's last weights, so it sits closer to the round's start) is what is sent."""
    from client.dpgan import RoundSettings
    from common.models import Generator

    shape, _ = _digits_trainer(tmp_path, "probe")
    torch.manual_seed(0)
    start = Generator(shape).state_dict()

    def run(name: str, **recipe):
        _, trainer = _digits_trainer(tmp_path, name)
        rs = RoundSettings(noise_multiplier=1.0, sample_rate=0.05, steps=6, max_grad_norm=1.0, lr_d=1e-3, lr_g=1e-3,
                           seed=7, noise_seed=5, **recipe)
        state, metrics, _ = trainer.train_round(start, rs)
        return _flat(state), metrics

    plain, metrics = run("plain")
    assert metrics["g-steps"] == 6
    _, metrics = run("two", g_steps_per_d=2)
    assert metrics["g-steps"] == 12
    _, metrics = run("n_D", d_steps_per_g=3)  # a G step after every third D step
    assert metrics["g-steps"] == 2 and metrics["local-steps"] == 6
    averaged, _ = run("ema", ema=0.9)
    assert not torch.equal(averaged, plain)
    assert (averaged - _flat(start)).norm() < (plain - _flat(start)).norm()


def test_generator_labels_follow_the_sites_class_histogram() -> None:
    from client.dpgan import class_sampling_weights

    assert class_sampling_weights((), 3) is None  # uniform
    p = class_sampling_weights((100.0, -4.0, 300.0), 3)  # a noisy count below 0 is cut to 0
    assert torch.allclose(p, torch.tensor([0.25, 0.0, 0.75]))
    assert class_sampling_weights((-1.0, -2.0), 2) is None  # nothing left: uniform
    try:
        class_sampling_weights((1.0, 2.0), 3)
    except ValueError as err:
        assert "3 classes" in str(err)
    else:
        raise AssertionError("a histogram of the wrong length must be refused")


def test_the_discriminator_gets_each_records_true_gradient_whatever_the_array_layout() -> None:
    """Opacus' per-sample conv gradients are only right for the standard (N, C, H, W) memory layout; an
    (N, 1, H, W) array with channel stride 1 (what fancy indexing of a [:, None] view gives, i.e. every
    simulated site's partition) got wrong rows. ``gan_input`` rewrites the layout: every row is then the
    gradient of its own record (and pair), as plain autograd computes it for that record alone."""
    from opacus import GradSampleModule

    from client.dpgan import discriminator_loss, gan_input
    from common.data import load_dataset
    from common.models import Discriminator, GanShape, Generator

    digits = load_dataset("digits", "train")
    images = digits.images[:, 0][:, None][np.arange(16)]  # channel stride = item size
    assert images.strides[1] == images.itemsize
    labels = torch.from_numpy(digits.labels[:16])
    torch.manual_seed(0)
    shape = GanShape(1, 8, 10, 8, 16)
    gen, disc = Generator(shape), Discriminator(shape)
    model = GradSampleModule(disc, loss_reduction="sum")
    with torch.no_grad():
        fakes = gen(torch.randn(16, 8), labels)
    for p in disc.parameters():
        p.grad_sample = None
    discriminator_loss(model, gan_input(images, "cpu"), fakes, labels, 0.3)[0].backward()
    rows = torch.cat([p.grad_sample.flatten(1) for p in disc.parameters()], dim=1)  # (16, params)
    model.disable_hooks()
    for i in (0, 7, 15):
        for p in disc.parameters():
            p.grad = None
        one = torch.from_numpy(np.array(images[i:i + 1], copy=True)) * 2 - 1
        discriminator_loss(model, one, fakes[i:i + 1], labels[i:i + 1], 0.3)[0].backward()
        assert torch.allclose(rows[i], torch.cat([p.grad.flatten() for p in disc.parameters()]), atol=1e-5)


def _record_gradient(model, gen, disc, x, y, idx: list[int], latents: torch.Tensor, chunked: bool) -> torch.Tensor:
    """Record 0's per-sample gradient in one D step on the records ``idx`` (each record with its own latent): through
    the site's padded chunks (``discriminator_backward``), or the way the step ran before them (one pass on the b
    sampled rows)."""
    from client.dpgan import discriminator_backward

    for p in disc.parameters():
        p.grad_sample = None
    if chunked:
        drawn = [0]

        def latent(rows: int) -> torch.Tensor:  # the sampled records' own latents, chunk by chunk
            drawn[0] += rows
            return latents[idx[drawn[0] - rows:drawn[0]]]

        discriminator_backward(model, gen, x, y, torch.tensor(idx), latent, lambda t: t, 0.3)
        for p in disc.parameters():  # the chunks' per-sample gradients (one list entry each) as one batch's rows
            if isinstance(p.grad_sample, list):
                p.grad_sample = torch.cat(p.grad_sample, dim=0)
    else:
        with torch.no_grad():
            fake = gen(latents[idx], y[idx])
        discriminator_loss(model, x[idx], fake, y[idx], 0.3)[0].backward()
    row = idx.index(0)
    return torch.cat([p.grad_sample[row].flatten() for p in disc.parameters()])


def test_a_records_discriminator_gradient_does_not_depend_on_how_many_others_were_sampled() -> None:
    """Review s57 (the shared net's s56 hole, in D): on CPU a row's float32 results round differently with its batch's
    size, and the coordinator chooses D's weights (the averaged D it sends) and G's, so a record's clipped gradient
    could hang on how many others the Poisson mask sampled (the shared net's version moved the step by 2C for one
    added record). D's step now runs fixed, padded chunks, its fakes too: a record's per-sample gradient is its own,
    wherever in its chunk the records sampled before it put it."""
    from client.dpgan import gan_input
    from common.data import load_dataset
    from common.models import Generator

    digits = load_dataset("digits", "train")
    x, y = gan_input(digits.images[:200], "cpu"), torch.as_tensor(digits.labels[:200]).long()
    torch.manual_seed(0)
    shape = GanShape(1, 8, 10, latent_dim=8, width=16)
    gen, disc = Generator(shape).eval(), Discriminator(shape, width=8)
    latents = torch.randn(200, 8)
    model = GradSampleModule(disc, loss_reduction="sum")

    def record0(idx: list[int], chunked: bool = True) -> torch.Tensor:
        return _record_gradient(model, gen, disc, x, y, idx, latents, chunked)

    batches = ([0, 1], [0, 1, 2, 3], [0, *range(5, 40)], [0, *range(1, 130)],  # record 0 first, then later in its chunk
               [*range(100, 117), 0], [*range(100, 163), 0], [*range(100, 180), 0, 1])
    alone = record0([0])
    for batch in batches:
        assert torch.equal(record0(batch), alone), len(batch)  # bitwise
    old_alone = record0([0], chunked=False)  # (the rounding the chunks take away: not vacuous)
    assert any(not torch.equal(record0(batch, chunked=False), old_alone) for batch in batches)
    model._close()


def test_the_chunked_discriminator_step_is_the_sum_of_each_records_clipped_pair_gradient() -> None:
    """The Poisson batch runs in padded chunks: the DP step must still be one logical batch, every padding row 0, and
    each record's gradient that of its own (real, fake) pair, clipped. The trainer clips each chunk into the step's
    sum as it comes (``accumulate_chunk``), so no more than one chunk's per-sample gradients are held at once (review
    s58: kept to the step's end, a batch of b held 64 x ceil(b / 64) rows, twice, which the limits did not count)."""
    from client.dpgan import discriminator_backward, gan_input
    from client.dpsgd import DPSGD_CHUNK
    from client.nonfinite import FiniteDPOptimizer
    from common.data import load_dataset
    from common.models import Generator

    digits = load_dataset("digits", "train")
    n = 2 * DPSGD_CHUNK + 22  # three chunks, the last padded
    x, y = gan_input(digits.images[:n], "cpu"), torch.as_tensor(digits.labels[:n]).long()
    torch.manual_seed(0)
    shape = GanShape(1, 8, 10, latent_dim=8, width=16)
    gen, disc = Generator(shape).eval(), Discriminator(shape, width=8)
    reference = copy.deepcopy(disc)
    latents = torch.randn(n, 8)
    drawn = []

    def latent(rows: int) -> torch.Tensor:  # the chunks' latents in order, as a secret stream gives them
        start = sum(drawn)
        drawn.append(rows)
        return latents[start:start + rows]

    model = GradSampleModule(disc, loss_reduction="sum")
    opt = FiniteDPOptimizer(torch.optim.SGD(disc.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=1.0,
                            expected_batch_size=1, loss_reduction="mean")
    before = torch.cat([p.detach().double().flatten() for p in disc.parameters()])
    held = []

    def accumulate() -> None:  # the trainer's after_chunk, noting how many rows of per-sample gradients are held
        held.append({len(p.grad_sample) for p in disc.parameters()})
        opt.accumulate_chunk()

    discriminator_backward(model, gen, x, y, torch.arange(n), latent, lambda t: t, 0.3, accumulate)
    assert drawn == [DPSGD_CHUNK, DPSGD_CHUNK, 22]
    assert held == [{DPSGD_CHUNK}] * 3 and all(p.grad_sample is None for p in disc.parameters())
    opt.step_accumulated()
    step = before - torch.cat([p.detach().double().flatten() for p in disc.parameters()])
    model._close()

    expected = torch.zeros_like(step)
    with torch.no_grad():
        fakes = gen(latents, y)
    for i in range(n):  # each record alone: its own pair's gradient, clipped to 1
        reference.zero_grad()
        discriminator_loss(reference, x[i:i + 1], fakes[i:i + 1], y[i:i + 1], 0.3)[0].backward()
        g = torch.cat([p.grad.double().flatten() for p in reference.parameters()])
        expected += g * min(1.0, 1.0 / (float(g.norm()) + 1e-6))
    assert float((step - expected).abs().max()) < 1e-4 * float(expected.abs().max())
