"""Networks both sides agree on: the class-conditional generator and the site's discriminator.

The coordinator and every site build the generator from the same :class:`GanShape`, so a generator's
``state_dict`` can be shipped, averaged and loaded anywhere. The discriminator is only ever built at a
site; it is defined here because its shape follows the data shape just like the generator's.

Images are (B, C, H, W) in [-1, 1] inside the GAN; data in [0, 1] is mapped with ``x * 2 - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GanShape:
    """Everything that fixes the GAN's tensor shapes (part of the run config, identical at every site)."""

    channels: int  # C of the images
    image_size: int  # H == W; must be a multiple of 4
    num_classes: int
    latent_dim: int = 64
    width: int = 64  # base channel count of G (the site's D picks its own, usually smaller, width)

    def validate(self) -> None:
        if self.image_size % 4 or self.image_size < 8:
            raise ValueError(
                f"the GAN needs square images whose side is a multiple of 4 and at least 8, got {self.image_size}; "
                "resize the data (image-size in the config)"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels, got {self.channels}")
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.num_classes}")


def _groups(channels: int) -> int:
    return max(1, min(8, channels // 4))


class Generator(nn.Module):
    """Class-conditional generator: (z, y) -> image in [-1, 1].

    z (B, latent) and a learned label embedding (B, latent) are concatenated, projected to a
    (2w, S/4, S/4) map and upsampled twice. Only per-sample normalisation (GroupNorm): the output for
    one (z, y) never depends on the other rows of the batch, so sampling class-sorted batches at the
    coordinator gives the same images as training on mixed batches, and the state_dict is weights only.
    """

    def __init__(self, shape: GanShape) -> None:
        super().__init__()
        shape.validate()
        self.shape = shape
        w, s = shape.width, shape.image_size // 4
        self.label_embedding = nn.Embedding(shape.num_classes, shape.latent_dim)
        self.project = nn.Sequential(
            nn.Linear(2 * shape.latent_dim, 2 * w * s * s),
            nn.ReLU(inplace=True),
        )
        self.upsample = nn.Sequential(
            nn.GroupNorm(_groups(2 * w), 2 * w),
            nn.Upsample(scale_factor=2, mode="nearest"),  # (2w, S/2, S/2)
            nn.Conv2d(2 * w, w, 3, padding=1),
            nn.GroupNorm(_groups(w), w),
            nn.ReLU(inplace=True),
            nn.Upsample(scale_factor=2, mode="nearest"),  # (w, S, S)
            nn.Conv2d(w, w // 2, 3, padding=1),
            nn.GroupNorm(_groups(w // 2), w // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w // 2, shape.channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.shape.image_size // 4
        h = self.project(torch.cat([z, self.label_embedding(y)], dim=1))  # (B, 2w*s*s)
        return self.upsample(h.view(z.shape[0], 2 * self.shape.width, s, s))  # (B, C, S, S)

    def sample_latent(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randn(n, self.shape.latent_dim, generator=generator, device=device)


class Discriminator(nn.Module):
    """Small conditional discriminator that Opacus can privatize (site-only; never leaves the site).

    Two strided convolutions (GroupNorm, no BatchNorm: Opacus has no per-sample gradients for it and it
    would mix records), then two heads on the flattened features h: a real/fake logit with a projection
    term (Miyato & Koyama 2018) ``w.h + <embed(y), h>`` and class logits (AC-GAN head, Odena et al. 2017).

    It is deliberately small: DP-SGD adds noise of norm ~ sigma*C*sqrt(#params)/batch to every step, so
    every parameter that is not needed costs signal-to-noise. ``width`` defaults to ``shape.width // 4``.
    """

    def __init__(self, shape: GanShape, width: int = 0, projection: bool = True) -> None:
        super().__init__()
        shape.validate()
        w = width or max(4, shape.width // 4)
        s = shape.image_size // 4
        feat = 2 * w * s * s
        self.features = nn.Sequential(
            nn.Conv2d(shape.channels, w, 4, stride=2, padding=1),  # (w, S/2, S/2)
            nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1),  # (2w, S/4, S/4)
            nn.GroupNorm(_groups(2 * w), 2 * w),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
        )
        self.linear = nn.Linear(feat, 1)
        self.classifier = nn.Linear(feat, shape.num_classes)
        self.label_embedding = nn.Embedding(shape.num_classes, feat) if projection else None
        if self.label_embedding is not None:
            nn.init.zeros_(self.label_embedding.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real/fake logit (B,), class logits (B, K))."""
        h = self.features(x)  # (B, feat)
        adv = self.linear(h).squeeze(1)
        if self.label_embedding is not None:
            adv = adv + (self.label_embedding(y) * h).sum(dim=1)
        return adv, self.classifier(h)
