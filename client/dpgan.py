"""Local DP-GAN training at a site: DP-SGD on the discriminator, the generator trained through it.

Privacy argument: the discriminator D is the only network that sees
real records, and it is trained with DP-SGD (Poisson sampling at rate q, per-sample clipping to C,
Gaussian noise of std sigma*C per step). The generator G only receives gradients through D's
DP-noised parameters, so G's weights, the only thing that leaves the site, are DP by
post-processing. Each D step is one subsampled Gaussian release: the caller charges
``DPEvent(sigma, q, steps)`` in the site's ledger *before* calling :meth:`LocalGanTrainer.train_round`.

Implementation notes (verified against Opacus 1.6):
- Poisson sampling is done here with an explicit Bernoulli mask so the sampling rate q is exactly the
  one accounted; Opacus' ``GradSampleModule`` + ``DPOptimizer`` do the clipping and noise (a record whose
  gradient overflows contributes 0: ``client.nonfinite``).
- D step = one backward over two forward passes (real rows, fake rows with the same labels): Opacus
  sums row i of both passes, so "record i" is grad(real_i) + grad(fake_i), clipped jointly (dcgan.py's
  scheme; sensitivity stays C because fake_i carries no other record's data). The rows, and the fakes G draws for
  them, run in fixed, zero-padded chunks (``discriminator_backward``), so that no record's result rounds with the
  realised batch size: the coordinator chooses D's and G's weights and could tune them to that rounding.
- G step: D's hooks are disabled and its parameters frozen (freezing alone, with hooks on, makes Opacus'
  backward hook fail with "pop from empty list"; with neither, the G step adds a second per-sample
  gradient and Opacus refuses the next step). Fake labels are
  drawn uniformly or from the site's *DP* class histogram (charged in the ledger by the caller), so G's
  update never touches a real label directly. A mode-seeking term keeps G from ignoring its latent
  (without it every image of a class came out the same on MNIST; the README's results table has the
  numbers with and without both).
- The DP randomness (Poisson masks, Gaussian noise) and every latent of a fake image come from site-held
  entropy, never from the coordinator's seed (see ``train_round`` for why the latents too).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule

from client.dpsgd import DPSGD_CHUNK, opacus_input, padded_chunks
from client.nonfinite import FiniteDPOptimizer
from client.secret_random import poisson_mask, secret_gaussian, secret_generator
from common import protocol as P
from common.data import ImageDataset
from common.gan_augment import augment
from common.models import Discriminator, GanShape, Generator
from common.progress import progress

# Opacus' per-sample hooks on the first layer fire with inputs that need no gradient (the images);
# PyTorch warns about that on every D step although it is exactly what we want.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

# torch's global random generator is one per process; sites answering in threads of one process (the in-process
# simulation, fedsynth.localgrid) seed it and build their networks from it one at a time. Nothing else a site
# computes draws from it: its secret draws come from generators of its own (train_round).
TORCH_SEED_LOCK = threading.Lock()


@dataclass(frozen=True)
class RoundSettings:
    """What one train.gan round does at a site (noise chosen by the site, the rest requested).

    Only the first eight fields and ``expected_batch`` are privacy-relevant (fixed by the site's plan); the rest
    are training recipe with defaults tuned on digits and MNIST at epsilon 10 (bench_dpgan.py).
    The DP noise, the Poisson batches and G's latents never come from ``seed``: the coordinator sends that
    seed, and whoever can replay the noise can subtract it. They come from ``noise_seed``, which only tests
    and benchmarks fix; at a site it is None, i.e. drawn from the operating system's entropy.
    """

    noise_multiplier: float  # sigma; 0 = non-private
    sample_rate: float  # q of Poisson sampling
    steps: int  # D steps this round (= accounted DP-SGD steps)
    max_grad_norm: float  # C
    lr_d: float
    lr_g: float
    seed: int  # the coordinator's seed: G's labels and D's first initialisation (nothing secret)
    noise_seed: int | None = None  # Poisson masks, DP noise, G's latents; None = fresh OS entropy (production)
    d_steps_per_g: int = 1  # n_D: D steps per G step (Bie et al. 2023)
    g_steps_per_d: int = 1  # G steps after each n_D D steps (free in privacy: G never sees data)
    g_batch_size: int = 0  # fake batch of a G step; 0 = the expected real batch size
    ac_weight: float = 0.3  # weight of the auxiliary classifier loss (0 = pure projection cGAN)
    ema: float = 0.0  # decay of the EMA of G's weights returned to the coordinator (0 = none)
    mode_seeking: float = 0.0  # weight of the mode-seeking term (Mao et al. 2019) against within-class collapse
    label_weights: tuple = ()  # (K,) how often G's steps draw each class (the site's DP class histogram); () = uniform
    d_width: int = 0  # D base width; 0 = GanShape.width // 4
    expected_batch: int = 0  # what DP-SGD divides its noisy sum by (a site: rate x its census total); 0 = rate x n
    augment: tuple = ()  # DiffAugment transformations of every image D judges (common.gan_augment); () = none
    betas_d: tuple = (0.5, 0.999)
    betas_g: tuple = (0.5, 0.999)


def discriminator_loss(d_model: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor,
                       ac_weight: float, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """D's summed loss over b real and b fake rows, row i weighted by ``weight[i]`` (None: all 1; a padding row of
    a chunk weighs 0); returns (loss, class logits of the real rows).

    Two forward passes, real then fake: under Opacus the per-sample gradients of row i of both passes
    are summed, so record i's sample is the pair (real_i, fake_i with label y_i), clipped jointly, and
    the sensitivity stays C. (One pass over the concatenation is equivalent but slower on CPU at batch
    256: its (2b, ...) per-sample gradient buffers miss the allocator's cache; bench_speed.py.)
    """
    real_adv, real_cls = d_model(real, labels)  # (b,), (b, K)
    fake_adv, fake_cls = d_model(fake, labels)
    per_row = (F.binary_cross_entropy_with_logits(real_adv, torch.ones_like(real_adv), reduction="none")
               + F.binary_cross_entropy_with_logits(fake_adv, torch.zeros_like(fake_adv), reduction="none")
               + ac_weight * F.cross_entropy(real_cls, labels, reduction="none"))  # (b,)
    loss = per_row.sum() if weight is None else (per_row * weight).sum()
    # Every head's output must enter the backward of both passes, or Opacus' per-layer activation
    # stacks get out of step; the unused fake class logits enter with weight 0.
    return loss + 0.0 * fake_cls.sum(), real_cls


def discriminator_backward(d_model: torch.nn.Module, gen: torch.nn.Module, x_all: torch.Tensor, y_all: torch.Tensor,
                           idx: torch.Tensor, latent, seen_by_d, ac_weight: float,
                           after_chunk: Callable[[], None] | None = None) -> tuple[float, int]:
    """The backward passes of one D step on the records ``idx`` of ``x_all``/``y_all``; returns (summed loss, real
    rows D classed right), site-side diagnostics.

    The rows run in padded chunks of exactly DPSGD_CHUNK (``client.dpsgd.padded_chunks``: on CPU a row's results
    round with its batch's size, so a record's gradient would hang on how many others were sampled), their fakes too:
    G draws each chunk's fakes from that chunk's latents, zero-padded. Under Opacus the chunks' per-sample gradients
    are clipped into the step's sum after each chunk's backward pass (``after_chunk``: the optimizer's
    ``accumulate_chunk``), so a step holds one chunk's; without it they stay on the parameters, one list entry per
    chunk (what tests read). ``latent(rows)`` gives secret (rows, latent) draws;
    ``seen_by_d`` is D's input transformation."""
    total, correct = 0.0, 0
    gen.eval()
    for xb, yb, weight in padded_chunks(x_all, y_all, idx):  # (CHUNK, C, H, W), (CHUNK,), (CHUNK,)
        rows = int(weight.sum())
        z = torch.zeros((DPSGD_CHUNK, gen.shape.latent_dim), device=xb.device)
        z[:rows] = latent(rows)
        with torch.no_grad():
            fake = gen(z, yb)  # (CHUNK, C, H, W)
        loss, real_cls = discriminator_loss(d_model, seen_by_d(xb), seen_by_d(fake), yb, ac_weight, weight)
        loss.backward()
        if after_chunk is not None:
            after_chunk()
        total += float(loss.detach())
        correct += int(((real_cls.argmax(1) == yb) & (weight > 0)).sum())
    gen.train()
    return total, correct


def mode_seeking_penalty(z: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Mode-seeking term (Mao et al., CVPR 2019): small when two latents of one class give different images.

    The G batch comes in pairs (``paired_labels``): rows 2i and 2i+1 share a label and have independent
    latents. Returns 1 / mean_i( |fake_2i - fake_2i+1|_1 / |z_2i - z_2i+1|_1 ): a generator that ignores z
    (every image of a class the same, the collapse we measured on MNIST) pays a large penalty. G-only: no real
    record is involved, so it costs no privacy. Why pairs inside the batch rather than a second image per row
    from a fresh latent (the paper's form, what this did before): the second image was a second generator
    forward and backward per G step (tests/benchmarks/bench_site_step.py, 28x28 gray, 2 threads: a site step
    with one G step 354 ms, with the pairs 237, without the term 224); the pairs give the same term from the
    images the adversarial loss draws anyway.
    z: (g, latent), fake: (g, C, H, W), g even (an odd last row is left out).
    """
    m = z.shape[0] // 2
    image_gap = (fake[0:2 * m:2] - fake[1:2 * m:2]).abs().flatten(1).mean(dim=1)  # (m,)
    latent_gap = (z[0:2 * m:2] - z[1:2 * m:2]).abs().mean(dim=1)  # (m,)
    return 1.0 / ((image_gap / latent_gap).mean() + 1e-5)


def paired_labels(half: torch.Tensor, g: int) -> torch.Tensor:
    """(g,) labels with rows 2i and 2i+1 equal to ``half[i]`` (the mode-seeking pairs); half: (ceil(g/2),)."""
    return half.repeat_interleave(2)[:g]


def class_sampling_weights(weights: tuple | list, num_classes: int) -> torch.Tensor | None:
    """G's label distribution at a site, from its DP class histogram: (K,) probabilities, or None = uniform.

    Why: with label skew (Dirichlet 0.5 on MNIST a site can hold 5 of the 5,842 fours), a site that trains
    G on a class its discriminator has hardly seen teaches G that class from noise, and FedAvg mixes that
    into the other sites' good updates (measured: 1% test accuracy on the fours). Noisy counts below 0
    are cut to 0; a histogram that is all zeros falls back to uniform.
    """
    if not len(weights):
        return None
    if len(weights) != num_classes:
        raise ValueError(f"label_weights has {len(weights)} entries for {num_classes} classes")
    w = torch.tensor([max(0.0, float(v)) for v in weights], dtype=torch.float64)
    if not torch.isfinite(w).all() or w.sum() <= 0:
        return None
    return (w / w.sum()).float()


def gan_input(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Images in [0, 1] -> the discriminator's input range [-1, 1], standard layout (see ``opacus_input``)."""
    return opacus_input(images, device) * 2 - 1


class LocalGanTrainer:
    """Trains the received generator against the site's discriminator for one round.

    The discriminator's state (D, both optimizers, the step counter) goes in and comes out of
    :meth:`train_round`; the caller saves it with the round's reply, in one atomic file, so that a
    round redone after an interruption starts from the state *before* the round (an attempt that was
    interrupted must not leave its DP-SGD steps in D uncharged). D's weights leave the site only when a request
    asks for them to average (``share_d``): DP-SGD's output, which the round's charge covers.
    """

    def __init__(self, shape: GanShape, data: ImageDataset, device: torch.device, progress: bool = True,
                 label: str = "site") -> None:
        self.shape = shape
        self.data = data
        self.device = device
        self.progress = progress
        self.label = label
        # Real records in the GAN's range [-1, 1], in the memory layout Opacus needs (client.dpsgd.opacus_input);
        # kept on the device to avoid per-step copies.
        self.x = gan_input(data.images, device)  # (N, C, H, W)
        self.y = torch.from_numpy(data.labels).to(device)  # (N,)

    # ---- one round -------------------------------------------------------------------------------
    def train_round(self, generator_state: dict[str, torch.Tensor], rs: RoundSettings,
                    d_state: dict | None = None,
                    d_weights: dict[str, np.ndarray] | None = None) -> tuple[dict, dict, dict]:
        """Train D (DP-SGD, ``rs.steps`` steps) and G through it, starting from ``d_state`` (None = a new D);
        ``d_weights`` (the sites' averaged D, as the request carries it; empty = none) replace D's weights, the
        optimizers' states staying the site's.

        Returns (generator state_dict, metrics, D's new state). The metrics stay on the site except
        those the protocol declares (``g_loss``)."""
        start = time.perf_counter()
        n = len(self.data)
        k = self.shape.num_classes
        expected_batch = rs.expected_batch or max(1, round(rs.sample_rate * n))
        g_batch = rs.g_batch_size or expected_batch
        n_d, n_g = max(1, int(rs.d_steps_per_g)), max(1, int(rs.g_steps_per_d))
        pairs = rs.mode_seeking > 0 and g_batch >= 2  # G's batch in mode-seeking pairs (mode_seeking_penalty)
        n_labels = (g_batch + 1) // 2 if pairs else g_batch  # labels drawn per G step: one per pair
        with TORCH_SEED_LOCK:  # D's first weights from the coordinator's seed, whatever other sites' threads do
            torch.manual_seed(rs.seed)
            gen = Generator(self.shape).to(self.device)
            disc = Discriminator(self.shape, width=rs.d_width).to(self.device)
        gen.load_state_dict(generator_state)
        opt_g = torch.optim.Adam(gen.parameters(), lr=rs.lr_g, betas=tuple(rs.betas_g))
        opt_d_inner = torch.optim.Adam(disc.parameters(), lr=rs.lr_d, betas=tuple(rs.betas_d))
        saved = None if d_state is None else {k: _to_device(v, self.device) for k, v in d_state.items()}
        if saved is not None:
            disc.load_state_dict(saved["disc"])
            opt_d_inner.load_state_dict(saved["opt_d"])
            opt_g.load_state_dict(saved["opt_g"])
        if d_weights:
            P.load_state(disc, d_weights)
        total_steps = int(saved["steps"]) if saved is not None else 0
        ema = [p.detach().clone() for p in gen.parameters()] if rs.ema > 0 else None

        private = rs.noise_multiplier > 0
        # Secret randomness of the DP mechanism: which records each step samples, the Gaussian noise, and the
        # latents of every fake image. Why the latents too: a D step draws one fake per sampled record, so
        # how many latents a stream has given depends on the Poisson batch sizes so far (on the records). From
        # a stream the coordinator can replay (its seed) the fakes paired with the records, and G's updates,
        # would carry that private count outside the DP steps; fresh secret draws are independent of it.
        # Each a ChaCha20 stream (client.secret_random: torch's CPU seeds keep 32 bits, and PCG64 is no cipher).
        sampler, noise_rng, latents, aug_rng = secret_generator(rs.noise_seed).spawn(4)
        # (aug_rng: D's input transformations, secret too: how many it draws depends on the Poisson batch sizes)

        def latent(rows: int) -> torch.Tensor:  # (rows, latent) secret draws for G's fakes
            return secret_gaussian(latents, (rows, self.shape.latent_dim), self.device)

        def seen_by_d(images: torch.Tensor) -> torch.Tensor:  # (b, C, H, W) -> what D judges, same shape
            if not rs.augment:
                return images
            # the standard layout again for Opacus' per-sample convolution gradients (client.dpsgd.opacus_input)
            return augment(images, rs.augment, aug_rng).clone(memory_format=torch.contiguous_format)
        if private:
            # loss_reduction="sum": per-sample gradients are those of each record's own loss; the
            # DPOptimizer then divides the noisy sum by the *expected* batch size (not the realised
            # Poisson size, which would leak it).
            d_model = GradSampleModule(disc, loss_reduction="sum")
            opt_d = FiniteDPOptimizer(opt_d_inner, noise_multiplier=rs.noise_multiplier,
                                      max_grad_norm=rs.max_grad_norm, expected_batch_size=expected_batch,
                                      loss_reduction="mean", noise_rng=noise_rng)
        else:
            d_model, opt_d = disc, opt_d_inner

        label_p = class_sampling_weights(rs.label_weights, k)  # (K,) or None
        label_rng = torch.Generator(device="cpu").manual_seed(rs.seed + 1)  # G's labels; apart from the batch masks
        d_losses, g_losses, d_acc = [], [], []
        g_updates = 0
        bar = progress(range(rs.steps), desc=f"{self.label} D/G steps", unit="step", enabled=self.progress)
        for t in bar:
            # --- D step: one DP-SGD release on a Poisson batch ------------------------------------
            mask = poisson_mask(sampler, n, rs.sample_rate)  # (N,) Bernoulli(q)
            idx = mask.nonzero().squeeze(1).to(self.device)  # (b,)
            b = len(idx)
            opt_d.zero_grad(set_to_none=True)
            # An empty Poisson batch still releases pure noise when private (one chunk of padding, every per-sample
            # gradient 0): skipping the step would reveal that the batch was empty.
            if b or private:
                loss_sum, correct = discriminator_backward(d_model, gen, self.x, self.y, idx, latent, seen_by_d,
                                                           rs.ac_weight, opt_d.accumulate_chunk if private else None)
                if private:
                    opt_d.step_accumulated()  # noise once, / the expected batch, the update
                else:
                    opt_d.step()
                if b:
                    d_losses.append(loss_sum / b)
                    d_acc.append(correct / b)
            opt_d.zero_grad(set_to_none=True)  # also clears grad_sample before the G pass

            if (t + 1) % n_d:
                continue
            # --- G step(s): through D with hooks off and D frozen; labels from the DP histogram, in pairs -----
            if private:
                d_model.disable_hooks()
            for p in disc.parameters():
                p.requires_grad_(False)
            for _ in range(n_g):
                yg = (torch.multinomial(label_p, n_labels, replacement=True, generator=label_rng)
                      if label_p is not None else torch.randint(0, k, (n_labels,), generator=label_rng))
                yg = (paired_labels(yg, g_batch) if pairs else yg).to(self.device)  # (g,)
                z = latent(g_batch)  # (g, latent)
                fake_g = gen(z, yg)  # (g, C, H, W)
                adv, cls = disc(seen_by_d(fake_g), yg)
                loss_g = F.binary_cross_entropy_with_logits(adv, torch.ones_like(adv))
                if rs.ac_weight > 0:
                    loss_g = loss_g + rs.ac_weight * F.cross_entropy(cls, yg)
                if pairs:
                    loss_g = loss_g + rs.mode_seeking * mode_seeking_penalty(z, fake_g)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                g_updates += 1
                if ema is not None:
                    decay = min(rs.ema, (1 + g_updates) / (10 + g_updates))
                    with torch.no_grad():
                        for e, p in zip(ema, gen.parameters()):
                            e.lerp_(p.detach(), 1 - decay)
                g_losses.append(float(loss_g.detach()))
            for p in disc.parameters():
                p.requires_grad_(True)
            if private:
                d_model.enable_hooks()
            if d_losses:
                bar.set_postfix(d=f"{d_losses[-1]:.3f}", g=f"{g_losses[-1]:.3f}")

        if private:
            d_model._close()  # remove Opacus hooks; `disc` is the plain module again
        new_d_state = {"disc": disc.state_dict(), "opt_d": opt_d_inner.state_dict(), "opt_g": opt_g.state_dict(),
                       "steps": total_steps + rs.steps}
        if ema is not None:
            with torch.no_grad():
                for e, p in zip(ema, gen.parameters()):
                    p.copy_(e)
        metrics = {
            "d-loss": float(np.mean(d_losses)) if d_losses else 0.0,
            "g-loss": float(np.mean(g_losses)) if g_losses else 0.0,
            "d-real-class-acc": float(np.mean(d_acc[-50:])) if d_acc else 0.0,
            "local-steps": rs.steps,
            "g-steps": g_updates,
            "train-seconds": time.perf_counter() - start,
        }
        out = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
        return out, metrics, _to_device(new_d_state, torch.device("cpu"))


def _to_device(obj, device: torch.device):
    """A (nested) state dict moved to ``device`` (optimizer states are dicts of dicts of tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    return obj
