"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020).

Why: a site's discriminator sees few records through heavy DP noise, the regime in which a GAN's
discriminator memorises its real batch and stops teaching the generator. Zhao et al. showed that the same
random, differentiable transformation applied to *every* image D judges -- real rows, fake rows of D's step
and fake rows of G's step -- keeps D from that without teaching G the transformation (G is judged on
transformed fakes against transformed reals, so it is still pushed toward the untransformed data). Their
defaults for small data are the two transformations here: a translation by up to 1/8 of the side and a
cutout of half the side.

Privacy: the transformation is applied to each row on its own, before D; record i's per-sample gradient is
still a function of record i (and of its paired fake) alone, clipped to C as before, so the sensitivity and
the accounting are unchanged. Its randomness comes from the site's secret stream (how many draws a step makes
depends on its Poisson batch size, which is private; see ``LocalGanTrainer.train_round``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

TRANSLATION_RATIO = 0.125  # Zhao et al.'s default: shifts of up to side/8
CUTOUT_RATIO = 0.5  # Zhao et al.'s default: a square of side/2
# What fills the uncovered border and the cut square: 0, mid-grey in D's [-1, 1] range (Zhao et al.'s choice).
# Black (-1) was measured too, on MNIST and CIFAR-10 gray (docs/results.md, "DiffAugment"): MNIST lost as much with it
# (0.906 against 0.903 grey, ~0.96 without augmentation) and CIFAR-10 gray gained less (0.263 against 0.320 grey).
FILL = 0.0


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"translation,cutout"`` -> ("translation", "cutout"); ``""`` -> (). Unknown names raise ValueError."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    unknown = [n for n in names if n not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {[n[:40] for n in unknown[:3]]}; choose from "
                         f"{sorted(AUGMENTATIONS)} (comma-separated) or leave it empty for none")
    if len(set(names)) != len(names):
        raise ValueError(f"augmentation {spec[:80]!r} names one transformation twice")
    return names


def _offsets(b: int, low: int, high: int, rng: np.random.Generator, device: torch.device) -> torch.Tensor:
    """(b,) integers in [low, high], drawn from ``rng`` (a site's secret numpy stream: client.secret_random) on the
    CPU, so the same on any device."""
    return torch.from_numpy(rng.integers(low, high + 1, size=b)).to(device)


def translate(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each image of x (B, C, H, W) shifted by its own (dy, dx) in [-H/8, H/8] x [-W/8, W/8], zeros (mid-grey) coming in."""
    b, c, h, w = x.shape
    sy, sx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    dy = _offsets(b, -sy, sy, rng, x.device)  # (B,)
    dx = _offsets(b, -sx, sx, rng, x.device)
    padded = F.pad(x, (sx, sx, sy, sy), value=FILL)  # (B, C, H + 2sy, W + 2sx)
    rows = (sy - dy)[:, None] + torch.arange(h, device=x.device)[None]  # (B, H): source row of each output row
    cols = (sx - dx)[:, None] + torch.arange(w, device=x.device)[None]  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W), standard layout


def cutout(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Each image of x (B, C, H, W) with a (H/2, W/2) square at its own random centre set to 0 (mid-grey)."""
    b, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    cy = _offsets(b, 0, h + (1 - ch % 2) - 1, rng, x.device)  # (B,) centre rows
    cx = _offsets(b, 0, w + (1 - cw % 2) - 1, rng, x.device)
    ys = torch.arange(h, device=x.device)[None] - (cy[:, None] - ch // 2)  # (B, H): row relative to the square
    xs = torch.arange(w, device=x.device)[None] - (cx[:, None] - cw // 2)
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]  # (B, H, W)
    return torch.where(inside[:, None], torch.full_like(x, FILL), x)  # (B, C, H, W)


# name -> transformation; GanTrainRequest.augment names a comma-separated subset, applied in the order named
AUGMENTATIONS = {"translation": translate, "cutout": cutout}


def augment(x: torch.Tensor, names: tuple[str, ...], rng: np.random.Generator) -> torch.Tensor:
    """x (B, C, H, W) through each named transformation in turn (differentiable in x); ``names`` () = x itself."""
    for name in names:
        x = AUGMENTATIONS[name](x, rng)
    return x
