"""Coordinator side of the BN-statistics mode: pool the sites' releases and synthesize images.

Pooling: counts and sums add exactly across sites, so the pooled statistics are those of the union of
the sites' data (plus the sum of the sites' independent noises). Per class k and layer l:
    mean_kl = sum_kl / count_k,   var_kl = sumsq_kl / count_k - mean_kl^2   (over records, H, W)
Noise can make a count tiny or negative and a variance negative: both are clamped, with a warning.

Synthesis (DeepInversion, Yin et al. 2020, as used by Soufleri et al. 2022 and DP-ImgSyn): start from random
images x = sigmoid(z) (so pixels stay in [0, 1]) and optimise z with Adam to minimise, per class k,
    w_stats * sum_l ( ||mu_l(x_k) - mean_kl||_2 + ||var_l(x_k) - var_kl||_2 ) / scale_kl
  + w_ce    * CE(net(x_k), k)
  + w_tv    * TV(x_k) + w_l2 * mean(x_k^2)
where mu_l, var_l are the channel mean and variance of layer l's norm input over (batch, H, W) of
the class-k part of the batch, and scale_kl = ||[mean_kl, sqrt(var_kl)]||_2 / sqrt(C_l) makes the
layers' terms comparable (optionally times a per-layer weight). All classes are optimised together,
m images each, in one batch. With ``BNNet(head_norm=True)`` the last layer's statistics are per
(feature map, position), which pins the class's spatial layout; on MNIST that is the difference
between unrecognisable stroke fragments and digits.
The whole synthesis only post-processes DP releases and the (DP-trained) shared net: no privacy cost.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from common.bnnet import capture_norm_inputs, norm_layer_channels
from common.data import ImageDataset
from common.models import resize_to_side
from common.progress import progress as progress_bar
from common.protocol import STATS_COUNT as COUNT_KEY
from common.protocol import STATS_SUM as SUM_PREFIX
from common.protocol import STATS_SUMSQ as SUMSQ_PREFIX
from common.protocol import stats_layers


@dataclass(frozen=True)
class PooledStats:
    """Class-wise statistics pooled over sites (float64).

    counts: (K,) noisy total count per class (after clamping to ``min_count``).
    mean[layer], var[layer]: (K, C_l) per-class channel mean and variance of the layer's norm input.
    clamped_classes: classes whose noisy count was below ``min_count`` (their statistics are unreliable).
    """

    counts: np.ndarray
    mean: dict[str, np.ndarray]
    var: dict[str, np.ndarray]
    num_sites: int
    clamped_classes: tuple[int, ...] = field(default_factory=tuple)

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[0])

    @property
    def layers(self) -> list[str]:
        return list(self.mean)


def _check_release(i: int, release: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    if COUNT_KEY not in release:
        raise ValueError(f"site release #{i} has no '{COUNT_KEY}' array; it is not a BN-statistics release")
    if set(release) != set(reference):
        raise ValueError(
            f"site release #{i} has keys {sorted(release)} but site #0 has {sorted(reference)}; "
            "all sites must record statistics of the same shared net"
        )
    for key, arr in release.items():
        if np.shape(arr) != np.shape(reference[key]):
            raise ValueError(f"site release #{i}: '{key}' has shape {np.shape(arr)}, site #0 has {np.shape(reference[key])}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"site release #{i}: '{key}' contains NaN or inf; reject this site's reply")


def pool_statistics(site_releases: Sequence[dict[str, np.ndarray]], *, min_count: float = 1.0,
                    min_var: float = 1e-4) -> PooledStats:
    """Add the sites' releases and turn them into class-wise means and variances.

    A class whose pooled noisy count is below ``min_count`` gets count ``min_count`` and a warning
    (its statistics are dominated by noise). Variances below ``min_var`` (noise can make them negative)
    are raised to ``min_var``.
    """
    if not site_releases:
        raise ValueError("no site releases to pool: at least one site must answer")
    if not min_count > 0:
        raise ValueError(f"min_count must be > 0, got {min_count}")
    ref = site_releases[0]
    for i, rel in enumerate(site_releases):
        _check_release(i, rel, ref)
    total = {k: np.sum([np.asarray(r[k], dtype=np.float64) for r in site_releases], axis=0) for k in ref}
    counts = total[COUNT_KEY]  # (K,)
    low = np.flatnonzero(counts < min_count)
    if low.size:
        warnings.warn(
            f"classes {low.tolist()} have pooled noisy counts {np.round(counts[low], 2).tolist()} < {min_count}: "
            "clamped; their statistics are mostly noise (too few records for this privacy level)",
            RuntimeWarning, stacklevel=2,
        )
    counts = np.maximum(counts, min_count)
    mean, var = {}, {}
    for name in stats_layers(ref):
        m = total[SUM_PREFIX + name] / counts[:, None]  # (K, C_l)
        v = total[SUMSQ_PREFIX + name] / counts[:, None] - m * m
        mean[name], var[name] = m, np.maximum(v, min_var)
    return PooledStats(counts=counts, mean=mean, var=var, num_sites=len(site_releases),
                       clamped_classes=tuple(int(k) for k in low))


def release_center(pooled: PooledStats) -> dict[str, np.ndarray]:
    """A public per-class centre for a later, centred statistics release (``client.bnstats``).

    Keys "sum/<layer>" (per-record mean reference) and "sumsq/<layer>" (per-record mean-of-squares
    reference), (K, C_l) float32: the pooled class means and mean + variance. The spatial variance
    inside a record is part of ``var``, so mean^2 + var is the class's average per-record mean of squares.
    """
    out: dict[str, np.ndarray] = {}
    for name in pooled.layers:
        m = pooled.mean[name]
        out[SUM_PREFIX + name] = m.astype(np.float32)
        out[SUMSQ_PREFIX + name] = (m * m + pooled.var[name]).astype(np.float32)
    return out


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels of (B, C, H, W) images (a smoothness prior)."""
    return ((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).mean() + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean()


def _stats_loss(inputs: dict[str, torch.Tensor], targets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                classes: torch.Tensor, m: int, weights: dict[str, float] | None = None) -> torch.Tensor:
    """Sum over layers and classes of the scaled L2 distances of batch mean/var to the targets.

    inputs[l]: (k*m, C_l, H, W), images grouped class by class, m per class.
    targets[l]: (mean (K, C_l), var (K, C_l), scale (K, 1)); ``classes`` (k,) picks the rows.
    """
    loss = torch.zeros((), device=classes.device)
    for name, (t_mean, t_var, scale) in targets.items():
        w = 1.0 if weights is None else weights.get(name, 1.0)
        if w == 0:
            continue
        a = inputs[name]
        a = a.reshape(-1, m, a.shape[1], a.shape[2] * a.shape[3])  # (k, m, C_l, H*W)
        mu = a.mean(dim=(1, 3))  # (k, C_l)
        var = a.var(dim=(1, 3), unbiased=False)  # (k, C_l)
        d = ((mu - t_mean[classes]).norm(dim=1) + (var - t_var[classes]).norm(dim=1)) / scale[classes, 0]
        loss = loss + w * d.mean()
    return loss


def synthesize(
    model: nn.Module,
    pooled: PooledStats,
    num_per_class: int | Sequence[int],
    *,
    iterations: int = 300,
    batch_size: int = 200,
    lr: float = 0.1,
    w_stats: float = 1.0,
    w_ce: float = 1.0,
    w_tv: float = 1.0,
    w_l2: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    jitter: int = 0,
    classes: tuple[str, ...] | None = None,
    layer_weights: dict[str, float] | None = None,
    lr_schedule: str = "constant",
    init_bias: float = 0.0,
    threads: int | None = None,
) -> ImageDataset:
    """Synthesize a labelled image set whose class-wise norm-input statistics match ``pooled``.

    Each optimisation batch holds m = max(1, batch_size // K) images of every class still to be
    generated; ``iterations`` Adam steps (lr ``lr``) on the logits z of x = sigmoid(z).
    ``jitter`` > 0 randomly shifts the batch by up to that many pixels each step (DeepInversion's
    augmentation; off by default since digits are position-sensitive at 8x8).
    ``layer_weights``: optional weight per norm layer of its statistics term (missing layers: 1).
    ``lr_schedule``: "constant" or "cosine" (decay to 0 over the iterations).
    ``threads``: torch CPU threads for the synthesis (restored afterwards; None = leave as is).
    ``init_bias``: the start logits are N(init_bias, 1) (negative: darker start images).
    The images are optimised at the net's side R (``BNNetShape.side``) and resized to the images' side S
    (bilinear) when the net was built with a smaller ``resolution``.
    Deterministic for a seed on a given device. Returns images (N, C, S, S) float32 in [0, 1] with
    labels int64, ordered by optimisation batch.
    """
    shape = getattr(model, "shape", None)
    if shape is None:
        raise ValueError("synthesize needs the shared common.bnnet.BNNet (it reads model.shape)")
    k_all = shape.num_classes
    if pooled.num_classes != k_all:
        raise ValueError(f"the statistics have {pooled.num_classes} classes but the net has {k_all}")
    channels = norm_layer_channels(model)
    if set(channels) != set(pooled.layers):
        raise ValueError(f"the statistics cover layers {pooled.layers} but the net has {list(channels)}")
    per_class = [int(num_per_class)] * k_all if np.isscalar(num_per_class) else [int(n) for n in num_per_class]
    if len(per_class) != k_all or min(per_class) < 0 or sum(per_class) == 0:
        raise ValueError(f"num_per_class must be a count >= 0 per class ({k_all} classes), got {num_per_class}")
    if iterations < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"iterations, batch_size and lr must be positive, got {iterations}, {batch_size}, {lr}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
    if classes is not None and len(classes) != k_all:
        raise ValueError(f"classes has {len(classes)} names for {k_all} classes")

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # only the images are optimised

    targets = {}
    for name in channels:
        t_mean = torch.as_tensor(pooled.mean[name], dtype=torch.float32, device=dev)  # (K, C_l)
        t_var = torch.as_tensor(pooled.var[name], dtype=torch.float32, device=dev)  # (K, C_l)
        scale = torch.cat([t_mean, t_var.sqrt()], dim=1).norm(dim=1, keepdim=True) / math.sqrt(channels[name])
        targets[name] = (t_mean, t_var, scale.clamp_min(1e-6))  # scale: (K, 1)

    m = max(1, batch_size // k_all)
    remaining = np.array(per_class)
    rounds = int(np.ceil(max(per_class) / m))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images, labels = [], []
    bar = progress_bar(total=rounds * iterations, desc="bn-synthesis", unit="step", enabled=progress)
    try:
        with capture_norm_inputs(model) as inputs:
            for _ in range(rounds):
                active = np.flatnonzero(remaining > 0)
                cls = torch.as_tensor(active, device=dev)  # (k,)
                y = cls.repeat_interleave(m)  # (k*m,), class-major like the reshape in _stats_loss
                # Drawn at the net's side R; resized to the images' side S at the end (identity when R = S).
                z = torch.randn((len(y), shape.in_channels, shape.side, shape.side), generator=gen)
                z = z.to(dev).requires_grad_(True)
                if init_bias:
                    z = (z.detach() + init_bias).requires_grad_(True)
                opt = torch.optim.Adam([z], lr=lr)
                for _step in range(iterations):
                    if lr_schedule == "cosine":
                        for g in opt.param_groups:
                            g["lr"] = 0.5 * lr * (1 + math.cos(math.pi * _step / iterations))
                    x = torch.sigmoid(z)  # (k*m, C, S, S) in [0, 1]
                    if jitter > 0:
                        dx, dy = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
                        x_in = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
                    else:
                        x_in = x
                    logits = model(x_in)
                    loss = (w_stats * _stats_loss(inputs, targets, cls, m, layer_weights)
                            + w_ce * nn.functional.cross_entropy(logits, y)
                            + w_tv * total_variation(x) + w_l2 * (x * x).mean())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                with torch.no_grad():
                    # The net averages its input down to R, so the synthesis pinned the R-pixel image; its smooth
                    # upscale is the least-structured full-size image the net sees as that one.
                    x = resize_to_side(torch.sigmoid(z), shape.image_size).clamp(0, 1)  # (k*m, C, S, S)
                    x = x.reshape(len(active), m, *x.shape[1:])  # (k, m, C, S, S)
                for j, c in enumerate(active):
                    take = min(m, remaining[c])
                    images.append(x[j, :take].cpu().numpy())
                    labels.append(np.full(take, c, dtype=np.int64))
                    remaining[c] -= take
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    names = classes if classes is not None else tuple(str(k) for k in range(k_all))
    out = ImageDataset(images=np.concatenate(images).astype(np.float32), labels=np.concatenate(labels),
                       classes=names, source=f"bnsynth(seed={seed})")
    return out
