"""Site side of the BN-statistics mode: record DP class-wise statistics of the shared net's norm inputs.

What a site releases (all float32, K classes, layer l with C_l channels, names from
``common.bnnet.norm_layer_names``)::

    "count"          (K,)      noisy number of records per class
    "sum/<layer>"    (K, C_l)  noisy per-class sum over records of the record's per-channel spatial mean
    "sumsq/<layer>"  (K, C_l)  noisy per-class sum over records of the record's per-channel spatial
                               mean of squares

and nothing else. From these the coordinator gets, per class and layer, the mean and the variance over
(records, H, W) of each channel, i.e. the statistics a BatchNorm layer would track, by
dividing by the count (``server.bnsynth.pool_statistics``).

DP mechanism (exact math)
-------------------------
For record i with label y_i and norm-layer inputs a_l (C_l, H_l, W_l), let
    m_l = mean_{h,w} a_l          (C_l,)   and   s_l = mean_{h,w} a_l^2   (C_l,),
    f_i = concat_l [m_l, s_l]     (D,),  D = 2 * sum_l C_l.
Each record's whole feature vector is clipped to L2 norm C = ``clip_bound`` (flat clipping):
    clip(f_i) = f_i * min(1, C / ||f_i||_2).
(On trained nets these norms are tightly concentrated, e.g. 10%-99% quantiles 3.9-4.6 for a briefly
DP-trained width-16 MNIST net, so a C just above them clips almost nothing.)

Per-layer clipping (``clip_bound`` a mapping layer -> c_l, L layers). When one layer dominates the
norm (the head norm of ``BNNet(head_norm=True)`` has ~50x the norm of the first conv layer), flat
clipping buries the small layers in noise. Instead every layer's block is clipped on its own,
    clip_l(f_il) = f_il * min(1, c_l / ||f_il||_2),
and the record contributes e_{y_i} (x) concat_l clip_l(f_il) / (c_l sqrt(L)) to the scaled sums: the
feature part still has norm <= 1, so the sensitivity Delta, the mechanism and its accounting are
unchanged; rescaling block l by c_l sqrt(L) makes its noise std sigma * Delta * c_l * sqrt(L)
(proportional to the layer's own bound). A float ``clip_bound`` is the flat case above.

Each record contributes the vector u_i = (a * e_{y_i}, e_{y_i} (x) clip(f_i) / C) to the scaled sums,
where a = ``count_weight`` (default 0.5) and e_y is the one-hot class vector; only class y_i's row is
non-zero, so ||u_i||_2 <= sqrt(a^2 + 1) =: Delta. Under add/remove-one adjacency the scaled release
    U = sum_i u_i + N(0, (sigma * Delta)^2 I)
is therefore ONE Gaussian mechanism with L2 sensitivity Delta and noise multiplier sigma =
``noise_multiplier``: account it as ``DPEvent(noise_multiplier, sample_rate=1.0, steps=1)``.
The released arrays are U rescaled (post-processing, no privacy cost):
    count = U_count / a                    -> noise std sigma * Delta / a   per class
    sum, sumsq = U_features * C            -> noise std sigma * Delta * C   per coordinate
(see :func:`release_noise_std`). With ``noise_multiplier=0`` and ``clip_bound=inf`` the release is
the exact statistics (the original, non-private batch-norm statistics matching).

Optional public centre. On trained nets most of f_i is a component common to all records (e.g. on
digits the per-class means differ by ~0.01-0.03 around values ~0.17), which a clip bound must cover.
Given a public per-class reference r_k (e.g. from an earlier DP release, ``server.bnsynth.release_center``),
the mechanism above is applied to f_i - r_{y_i} instead of f_i (same sensitivity, a much smaller C
suffices), and the site adds count_k * r_k to the noisy centred sums: post-processing of released
values, so no extra privacy cost, and the release keeps its meaning (sums in original units; the
noise of the count cancels in sum / count for the r_k part).

The class counts are private too (under add/remove-one adjacency any count of records is): they are only
released inside this mechanism.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from client.discrete_gaussian import noisy_counts
from client.nonfinite import zero_nonfinite_rows
from client.secret_random import secret_generator
from common.bnnet import RECORD_BLOCK_ROWS, check_images_fit, pad_rows
from common.bnnet import iter_record_blocks, norm_layer_channels, per_record_features  # noqa: F401 (re-export)
from common.protocol import STATS_COUNT as COUNT_KEY
from common.protocol import STATS_SUM as SUM_PREFIX
from common.protocol import STATS_SUMSQ as SUMSQ_PREFIX
from common.protocol import stats_layout

if TYPE_CHECKING:
    from common.data import ImageDataset

RELEASE_DTYPE = np.float32


def expected_release_keys(model: nn.Module, num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every array of a release of ``model``'s statistics and its shape (``protocol.stats_layout``)."""
    return stats_layout(norm_layer_channels(model), num_classes)


def release_num_bytes(model: nn.Module, num_classes: int) -> int:
    """Exact payload size in bytes of one release (float32 arrays; transport framing not included)."""
    itemsize = np.dtype(RELEASE_DTYPE).itemsize
    return sum(int(np.prod(shape)) * itemsize for shape in expected_release_keys(model, num_classes).values())


def release_sensitivity(count_weight: float = 0.5) -> float:
    """L2 sensitivity Delta = sqrt(count_weight^2 + 1) of the scaled release (see module docstring)."""
    return math.sqrt(count_weight**2 + 1.0)


def layer_noise_scales(clip_bound: float | Mapping[str, float], layers: list[str]) -> dict[str, float]:
    """Factor kappa_l by which layer l's scaled sums are multiplied back (noise std = sigma*Delta*kappa_l).

    Flat clipping (float C): kappa_l = C for every layer. Per-layer clipping (mapping c_l over the L
    layers): kappa_l = c_l * sqrt(L) (module docstring).
    """
    if isinstance(clip_bound, Mapping):
        if set(clip_bound) != set(layers):
            raise ValueError(f"per-layer clip_bound must have exactly the layers {layers}, got {sorted(clip_bound)}")
        return {n: float(clip_bound[n]) * math.sqrt(len(layers)) for n in layers}
    return {n: float(clip_bound) for n in layers}


def release_noise_std(noise_multiplier: float, clip_bound: float | Mapping[str, float],
                      count_weight: float = 0.5) -> dict[str, float]:
    """Noise std per coordinate of the released arrays: {"count": .., "sum": .., "sumsq": ..}.

    With per-layer bounds (a mapping) it also has "sum/<layer>" and "sumsq/<layer>" entries, and
    "sum"/"sumsq" are the largest of them. Public (a function of the config only), so the coordinator
    may use it, e.g. to judge small counts.
    """
    delta = release_sensitivity(count_weight)
    out = {"count": noise_multiplier * delta / count_weight}
    if isinstance(clip_bound, Mapping):
        scales = layer_noise_scales(clip_bound, list(clip_bound))
        for n, kappa in scales.items():
            out[SUM_PREFIX + n] = out[SUMSQ_PREFIX + n] = noise_multiplier * delta * kappa if noise_multiplier > 0 else 0.0
        feat = max(out[SUM_PREFIX + n] for n in scales)
    else:
        feat = noise_multiplier * delta * clip_bound if noise_multiplier > 0 else 0.0
    out["sum"] = out["sumsq"] = feat
    return out


def clip_blocks(blocks: dict[str, torch.Tensor], clip_bound: float | Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Scale every record's concatenated blocks (its vector f_i) to total L2 norm <= ``clip_bound``.

    With a mapping layer -> c_l every block is clipped on its own to norm <= c_l.
    """
    if isinstance(clip_bound, Mapping):
        out = {}
        for name, b in blocks.items():
            c = float(clip_bound[name])
            out[name] = b if math.isinf(c) else b * torch.clamp(c / b.norm(dim=1).clamp_min(1e-12), max=1.0)[:, None]
        return out
    if math.isinf(clip_bound):
        return blocks
    norms = torch.sqrt(sum((b * b).sum(dim=1) for b in blocks.values()))  # (B,) = ||f_i||_2
    factor = torch.clamp(clip_bound / norms.clamp_min(1e-12), max=1.0)[:, None]  # (B, 1)
    return {name: b * factor for name, b in blocks.items()}


def _check_args(model: nn.Module, dataset: "ImageDataset", num_classes: int, clip_bound: float | Mapping[str, float],
                noise_multiplier: float, count_weight: float, batch_size: int) -> None:
    if not (noise_multiplier >= 0.0) or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    bounds = list(clip_bound.values()) if isinstance(clip_bound, Mapping) else [clip_bound]
    if isinstance(clip_bound, Mapping):
        layer_noise_scales(clip_bound, list(norm_layer_channels(model)))  # checks the layer names
    for c in bounds:
        if not (c > 0.0):
            raise ValueError(f"clip_bound must be > 0, got {c}")
        if noise_multiplier > 0 and math.isinf(c):
            raise ValueError("a private release (noise_multiplier > 0) needs a finite clip_bound")
    if not (count_weight > 0.0) or not math.isfinite(count_weight):
        raise ValueError(f"count_weight must be finite and > 0, got {count_weight}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    labels = np.asarray(dataset.labels)
    # (No record is a valid dataset: its release is noise alone. A deployed site whose every record was withdrawn
    # answers so, where a refusal would tell the coordinator free that it holds none: client.site.load_site_data.)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels range {labels.min()}..{labels.max()} does not fit {num_classes} classes; "
            "check the dataset's label mapping against the run's num_classes"
        )
    check_images_fit(model, dataset.images)


def exact_class_sums(
    model: nn.Module,
    dataset: "ImageDataset",
    *,
    num_classes: int,
    clip_bound: float | Mapping[str, float] = math.inf,
    device: torch.device | str | None = None,
    batch_size: int = RECORD_BLOCK_ROWS,
    center: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The release before noise (float64): counts and clipped per-class sums. Never send this.

    With ``center`` the sums are of the clipped *centred* vectors clip(f_i - r_{y_i}) (the caller adds
    count * r back after the noise). Exposed for tests and site-side diagnostics;
    :func:`record_class_statistics` adds the noise.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    channels = norm_layer_channels(model)
    layers = list(channels)
    labels = np.asarray(dataset.labels, dtype=np.int64)
    sums = {n: torch.zeros(num_classes, 2 * c, dtype=torch.float64, device=dev) for n, c in channels.items()}
    ref = None if center is None else {  # (K, 2 C_l) per layer, same layout as the blocks
        n: torch.as_tensor(np.concatenate([center[SUM_PREFIX + n], center[SUMSQ_PREFIX + n]], axis=1),
                           dtype=torch.float64, device=dev) for n in layers}
    for start, blocks in iter_record_blocks(model, dataset, device=dev, batch_size=batch_size):
        yb = torch.as_tensor(labels[start:start + batch_size], device=dev)  # (B,)
        if ref is not None:
            blocks = {n: b - ref[n][yb] for n, b in blocks.items()}
        # Each record's checks and clip factor are row reductions, taken at one shape, the last block padded with
        # zero rows (common.bnnet.pad_rows: review s61, one added record moved another's clip factor by an ulp
        # at 65,536 features on 2 threads). A zero row clips to zero and is cut off before the sums.
        rows = len(yb)
        blocks = {n: pad_rows(b, batch_size) for n, b in blocks.items()}
        blocks = clip_blocks(zero_nonfinite_rows(blocks), clip_bound)  # an overflowing record adds 0 (client.nonfinite)
        blocks = {n: b[:rows] for n, b in blocks.items()}
        for name in layers:
            sums[name].index_add_(0, yb, blocks[name])  # (K, 2 C_l) += rows by class
    out: dict[str, np.ndarray] = {COUNT_KEY: np.bincount(labels, minlength=num_classes).astype(np.float64)}
    for name, c in channels.items():
        s = sums[name].cpu().numpy()
        out[SUM_PREFIX + name] = s[:, :c]
        out[SUMSQ_PREFIX + name] = s[:, c:]
    return out


def record_class_statistics(
    model: nn.Module,
    dataset: "ImageDataset",
    *,
    clip_bound: float | Mapping[str, float],
    noise_multiplier: float,
    seed: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int = RECORD_BLOCK_ROWS,
    num_classes: int | None = None,
    count_weight: float = 0.5,
    center: Mapping[str, np.ndarray] | None = None,
    integer_counts: bool = True,
) -> dict[str, np.ndarray]:
    """The DP release of the site's class-wise norm-input statistics (keys and math: module docstring).

    Account it as ``DPEvent(noise_multiplier, sample_rate=1.0, steps=1)`` before calling.
    ``num_classes`` defaults to the net's. ``seed=None`` draws the noise from OS entropy (production);
    a fixed seed makes the noise reproducible (tests, benchmarks only).
    ``noise_multiplier=0`` with ``clip_bound=math.inf`` gives the exact, non-private statistics.
    ``clip_bound``: a float (flat clipping of the whole vector) or a mapping layer name -> bound
    (per-layer clipping, see the module docstring; recommended for ``BNNet(head_norm=True)``).
    ``center``: optional public per-class reference, keys "sum/<layer>" and "sumsq/<layer>" with
    shapes (K, C_l) holding reference per-record means and mean squares (module docstring).
    ``integer_counts``: the class counts get exact integer noise (``client.discrete_gaussian``: their floating-point
    bits then say nothing beyond their values); False gives them continuous noise, for a site that adds only a share
    of the noise to a secure sum (the sum of several discrete Gaussians is not one).
    Returns float32 arrays, exactly the keys of :func:`expected_release_keys`.
    """
    if num_classes is None:
        shape = getattr(model, "shape", None)
        if shape is None:
            raise ValueError("pass num_classes: the model has no .shape to take it from")
        num_classes = shape.num_classes
    _check_args(model, dataset, num_classes, clip_bound, noise_multiplier, count_weight, batch_size)
    if center is not None:
        _check_center(center, expected_release_keys(model, num_classes))
    exact = exact_class_sums(model, dataset, num_classes=num_classes, clip_bound=clip_bound,
                             device=device, batch_size=batch_size, center=center)
    std = release_noise_std(noise_multiplier, clip_bound, count_weight)
    rng = secret_generator(seed)  # (ChaCha20: a provided net can make the release show raw draws, client.secret_random)
    noisy: dict[str, np.ndarray] = {}
    for key, value in exact.items():  # dict order is fixed, so a seed fixes every coordinate's noise
        scale = std["count"] if key == COUNT_KEY else std.get(key, std["sum"])
        if key == COUNT_KEY and integer_counts and scale > 0:  # exact integer noise (client.discrete_gaussian)
            noisy[key] = noisy_counts(value, scale, None if seed is None else seed + 1)
            continue
        noisy[key] = value + rng.normal(0.0, scale, size=value.shape) if scale > 0 else value
    if center is not None:  # post-processing: add the public centre back, weighted by the noisy count
        for key in noisy:
            if key != COUNT_KEY:
                noisy[key] = noisy[key] + noisy[COUNT_KEY][:, None] * np.asarray(center[key], dtype=np.float64)
    return {k: v.astype(RELEASE_DTYPE) for k, v in noisy.items()}


def _check_center(center: Mapping[str, np.ndarray], keys: dict[str, tuple[int, ...]]) -> None:
    want = {k: v for k, v in keys.items() if k != COUNT_KEY}
    if set(center) != set(want):
        raise ValueError(f"center must have exactly the keys {sorted(want)}, got {sorted(center)}")
    for k, shape in want.items():
        arr = np.asarray(center[k])
        if arr.shape != shape or not np.all(np.isfinite(arr)):
            raise ValueError(f"center['{k}'] must be a finite array of shape {shape}, got {arr.shape}")
