"""Networks both sides agree on: the class-conditional generator and the site's discriminator.

The coordinator and every site build the generator from the same :class:`GanShape`, so a generator's
``state_dict`` can be shipped, averaged and loaded anywhere. The discriminator is only ever built at a
site; it is defined here because its shape follows the data shape just like the generator's.

Images are (B, C, H, W) in [-1, 1] inside the GAN; data in [0, 1] is mapped with ``x * 2 - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def resize_to_side(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, s, s) images as (B, C, side, side), with no parameters: averaged down when larger (each output
    pixel the mean of the pixels it covers), bilinear up when smaller, unchanged at ``side``.

    The DP networks draw and judge at a side below the images' (``GanShape.side``, ``BNNetShape.side``): the
    way down keeps a record's per-sample gradients and statistics those of one record, the way up keeps
    values inside the range of the input (bilinear weights are convex).
    """
    if x.shape[-1] == side:
        return x
    if x.shape[-1] > side:
        return F.adaptive_avg_pool2d(x, side)
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


# Phase a of a nearest 2x upsampling seen through a 3-tap kernel (padding 1): row 2i + a of the upsampled map
# reads upsampled rows 2i+a-1, 2i+a, 2i+a+1, i.e. low-resolution rows (i-1, i, i) for a = 0 and (i, i, i+1) for
# a = 1. So on the low-resolution map (padded by 1) the kernel's taps (w0, w1, w2) become (w0, w1+w2, 0) and
# (0, w0+w1, w2): PHASE_TAPS[a] @ (w0, w1, w2).
PHASE_TAPS = torch.tensor([[[1., 0., 0.], [0., 1., 1.], [0., 0., 0.]],
                           [[0., 0., 0.], [1., 1., 0.], [0., 0., 1.]]])  # (phase a, new tap r, old tap k)


class UpsampleConv2d(nn.Conv2d):
    """Nearest-neighbour 2x upsampling followed by this 3x3 convolution (padding 1), computed at the input's side.

    The same function as ``nn.Upsample(scale_factor=2, mode="nearest")`` then ``nn.Conv2d(in, out, 3, padding=1)``
    with the same weights (up to float rounding; tests/test_models.py checks), computed as a sub-pixel
    convolution: each of the four output phases (a, b) (output pixel (2i + a, 2j + b)) is a 3x3 convolution of the
    low-resolution input with taps merged from the kernel (``PHASE_TAPS``), and ``pixel_shuffle`` interleaves
    them. Why: on CPU the upsampled map's convolution and the upsampling's copies made the generator most of a
    DP-GAN step; this form runs each stage 2-3.5x faster forward and backward (bench_speed.py).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.register_buffer("phase_taps", PHASE_TAPS.clone(), persistent=False)

    def phase_kernels(self) -> torch.Tensor:
        """(4 out, in, 3, 3): the kernel of output channel o's phase (a, b) at row o*4 + a*2 + b (pixel_shuffle's)."""
        m = self.phase_taps.to(self.weight.dtype)  # (2, 3, 3)
        k = torch.einsum("ark,oikl,bsl->oabirs", m, self.weight, m)  # (out, 2, 2, in, 3, 3)
        return k.reshape(-1, self.in_channels, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in, s, s) -> (B, out, 2s, 2s)
        bias = None if self.bias is None else self.bias.repeat_interleave(4)  # (4 out,)
        return F.pixel_shuffle(F.conv2d(x, self.phase_kernels(), bias, padding=1), 2)


@dataclass(frozen=True)
class GanShape:
    """Everything that fixes the GAN's tensor shapes (part of the run config, identical at every site)."""

    channels: int  # C of the images
    image_size: int  # H == W; a multiple of 2**stages (4 up to 32 pixels, 8 up to 64, ...)
    num_classes: int
    latent_dim: int = 64
    width: int = 64  # base channel count of G (the site's D picks its own, usually smaller, width)
    resolution: int = 0  # side G draws at and D judges at; 0 = image_size (see ``side``)

    @property
    def side(self) -> int:
        """The side G's convolutions draw at and D's judge at: ``resolution``, or the image side when 0.

        Below the image side, G's drawing is resized to the image (bilinear) by G's last, fixed layer and
        D averages each input down to it first (parameter-free, so D's per-sample gradients and the DP
        argument are unchanged).
        """
        return self.resolution or self.image_size

    @property
    def stages(self) -> int:
        """How many times G doubles its map (and D halves it): enough that the smallest map is at most 8x8.

        Why: the map at the bottom is what G's linear projection and D's heads see, and their parameter
        count grows with its area; keeping it at most 8x8 keeps both small whatever the image size (D's
        DP-SGD noise grows with its parameter count). 8..32 pixels: 2 stages (28 -> 7, 32 -> 8, the
        networks every MNIST/PneumoniaMNIST/CIFAR-10 result used); 64: 3 stages (64 -> 8).
        """
        n = 2
        while self.side >> n > 8:
            n += 1
        return n

    def validate(self) -> None:
        if not 0 <= self.resolution <= self.image_size:
            raise ValueError(f"the GAN's resolution (gan-resolution) must be at most the image side "
                             f"{self.image_size} (and at least 8), or 0 for the image side; got {self.resolution}")
        step = 1 << self.stages
        if self.side % step or self.side < 8:
            what = "resolution" if self.resolution else "images"
            raise ValueError(
                f"the GAN needs a side at least 8 pixels wide that is a multiple of {step} "
                f"(it halves a {self.side}-pixel image {self.stages} times), got {what} {self.side}; "
                + ("set gan-resolution to a side such as 32 or 0 (the image side)" if self.resolution else
                   f"resize the data to a side such as {max(8, self.side // step * step)} (image-size in the config)")
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
    (2^(stages-1) w, side/2^stages, side/2^stages) map and upsampled ``stages`` times (twice up to 32 pixels), then
    resized to the image side S when the GAN draws at a smaller side (``GanShape.side``).
    Only per-sample normalisation (GroupNorm): the output for one (z, y) never depends on the other rows of the batch, so sampling class-sorted batches at the
    coordinator gives the same images as training on mixed batches, and the state_dict is weights only.
    """

    def __init__(self, shape: GanShape) -> None:
        super().__init__()
        shape.validate()
        self.shape = shape
        n, s = shape.stages, shape.side >> shape.stages
        self.base_channels = c = shape.width << (n - 1)  # 2w for 2 stages, 4w for 3, ...
        self.label_embedding = nn.Embedding(shape.num_classes, shape.latent_dim)
        self.project = nn.Sequential(
            nn.Linear(2 * shape.latent_dim, c * s * s),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = [nn.GroupNorm(_groups(c), c)]
        for _ in range(n):  # each stage: (c, s, s) -> (c/2, 2s, 2s): nearest 2x upsampling, 3x3 conv, norm
            # (the Identity keeps the slot the separate nn.Upsample had, so state_dict keys are those of every
            # generator saved before UpsampleConv2d fused the two)
            layers += [nn.Identity(), UpsampleConv2d(c, c // 2), nn.GroupNorm(_groups(c // 2), c // 2),
                       nn.ReLU(inplace=True)]
            c //= 2
        # c == w/2 now, the map is (w/2, side, side)
        layers += [nn.Conv2d(c, shape.channels, 3, padding=1), nn.Tanh()]
        self.upsample = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.shape.side >> self.shape.stages
        h = self.project(torch.cat([z, self.label_embedding(y)], dim=1))  # (B, c*s*s)
        # channels-last through the convolutions (20 % faster forward and backward on CPU, bench_speed.py)
        x = self.upsample(h.view(z.shape[0], self.base_channels, s, s).contiguous(memory_format=torch.channels_last))
        x = resize_to_side(x, self.shape.image_size)  # (B, C, S, S); bilinear keeps tanh's [-1, 1]
        # the standard layout out, strides rewritten even where C = 1 (where .contiguous() keeps them): the
        # discriminator's per-sample gradients of fake rows need it, as of real ones (client.dpsgd.opacus_input)
        return x.clone(memory_format=torch.contiguous_format)

    def sample_latent(self, n: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randn(n, self.shape.latent_dim, generator=generator, device=device)


class Discriminator(nn.Module):
    """Small conditional discriminator that Opacus can privatize (stays at its site unless a run sets gan-average-d).

    An input larger than the GAN's side is first averaged down to it, then ``shape.stages`` strided convolutions
    (two up to 32 pixels, three at 64; GroupNorm, no BatchNorm: Opacus has no per-sample gradients for it and it
    would mix records), then two heads on the flattened features h: a real/fake logit with a projection
    term (Miyato & Koyama 2018) ``w.h + <embed(y), h>`` and class logits (AC-GAN head, Odena et al. 2017).

    It is deliberately small: DP-SGD adds noise of norm ~ sigma*C*sqrt(#params)/batch to every step, so
    every parameter that is not needed costs signal-to-noise. ``width`` defaults to ``shape.width // 4``.
    """

    def __init__(self, shape: GanShape, width: int = 0, projection: bool = True) -> None:
        super().__init__()
        shape.validate()
        c = width or max(4, shape.width // 4)
        self.side = shape.side
        n, s = shape.stages, shape.side >> shape.stages
        layers: list[nn.Module] = [nn.Conv2d(shape.channels, c, 4, stride=2, padding=1),  # (w, side/2, side/2)
                                   nn.LeakyReLU(0.2)]
        for _ in range(n - 1):  # (c, m, m) -> (2c, m/2, m/2)
            layers += [nn.Conv2d(c, 2 * c, 4, stride=2, padding=1), nn.GroupNorm(_groups(2 * c), 2 * c),
                       nn.LeakyReLU(0.2)]
            c *= 2
        self.features = nn.Sequential(*layers, nn.Flatten())  # (B, c * s * s), s = side / 2**stages
        feat = c * s * s
        self.linear = nn.Linear(feat, 1)
        self.classifier = nn.Linear(feat, shape.num_classes)
        self.label_embedding = nn.Embedding(shape.num_classes, feat) if projection else None
        if self.label_embedding is not None:
            nn.init.zeros_(self.label_embedding.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(real/fake logit (B,), class logits (B, K)) of images x (B, C, S, S)."""
        x = resize_to_side(x, self.side)  # (B, C, side, side): each image averaged down to the GAN's side
        h = self.features(x)  # (B, feat)
        adv = self.linear(h).squeeze(1)
        if self.label_embedding is not None:
            adv = adv + (self.label_embedding(y) * h).sum(dim=1)
        return adv, self.classifier(h)
