"""Local DP-SGD of the shared BN-statistics net on one site's data (one federated round).

The coordinator sends the global net, the site calls :func:`train_dpsgd_local` once, and returns the
updated weights; the coordinator averages them (FedAvg). Privacy: every step is one Poisson-subsampled
Gaussian mechanism (Opacus per-sample clipping to ``max_grad_norm``, noise std ``noise_multiplier *
max_grad_norm`` on the summed gradient), so one call is accounted by the caller, *before* calling, as
``DPEvent(noise_multiplier, sample_rate, steps)``. Releasing the weights is post-processing.

Batches are drawn by true Poisson sampling (each record independently with probability
``sample_rate``) straight from in-memory tensors, which is faster on a 2-core CPU than a DataLoader
and keeps the step count exact. Empty batches still take a (noise-only) step, as the accountant
assumes.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn

from client.nonfinite import FiniteDPOptimizer
from client.secret_random import poisson_mask, secret_generator
from common.bnnet import check_images_fit
from common.device import padded_rows

if TYPE_CHECKING:  # only for type hints; the dataset object is passed in by the caller
    from common.data import ImageDataset


def opacus_input(images: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(N, C, H, W) images as a tensor in the standard (N, C, H, W) memory layout, for a model under Opacus.

    Why: Opacus' per-sample gradient of a convolution unfolds its input with ``as_strided`` assuming that
    layout. An (N, 1, H, W) array whose channel stride is 1 (a fancy-indexed copy of a ``[:, None]`` view,
    i.e. every simulated site's partition) is also a valid channels-last tensor; torch then runs the
    convolutions channels-last and the "per-sample" gradients of the discriminator's second convolution
    came out wrong (off by 1.06 in max-norm for a digits record, tests/test_dpgan_step.py). Each row still
    depended on its own record only -- clipping still bounded the sensitivity -- but the update was not the
    gradient. ``clone`` with the standard format rewrites the strides whatever they were.
    """
    return torch.as_tensor(images, dtype=torch.float32, device=device).clone(memory_format=torch.contiguous_format)


def _check_args(model: nn.Module, dataset: "ImageDataset", noise_multiplier: float, sample_rate: float,
                steps: int, max_grad_norm: float, lr: float) -> None:
    """Raise ValueError naming the bad argument and the fix."""
    # (No record is a valid dataset: every Poisson batch is empty and each step is noise alone, as accounted. A
    # deployed site whose every record was withdrawn trains so, where a refusal would tell the coordinator free that
    # it holds none: client.site.load_site_data.)
    if not (0.0 < sample_rate <= 1.0) or not math.isfinite(sample_rate):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}; use batch_size / len(dataset)")
    # (No check that sample_rate x len(dataset) >= 1: at a site that compares the exact record count with what
    # the plan read off the noisy census, after the charge, and a failure there is a data-dependent answer.)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if not (noise_multiplier >= 0.0) or not math.isfinite(noise_multiplier):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (max_grad_norm > 0.0) or not math.isfinite(max_grad_norm):
        raise ValueError(f"max_grad_norm must be finite and > 0, got {max_grad_norm}")
    if not (lr > 0.0) or not math.isfinite(lr):
        raise ValueError(f"lr must be > 0, got {lr}")
    was_training = model.training
    model.train()  # the validator also demands training mode; only the architecture matters here
    errors = ModuleValidator.validate(model, strict=False)
    model.train(was_training)
    if errors:
        raise ValueError(f"the model cannot be trained with DP-SGD: {errors}; use common.bnnet.BNNet")
    check_images_fit(model, dataset.images)
    shape = getattr(model, "shape", None)
    if shape is not None and len(dataset):
        if int(dataset.labels.max()) >= shape.num_classes or int(dataset.labels.min()) < 0:
            raise ValueError(
                f"labels range {int(dataset.labels.min())}..{int(dataset.labels.max())} does not fit the "
                f"net's {shape.num_classes} classes"
            )


DPSGD_CHUNK = 64  # rows of every forward pass of a site's DP-SGD: the shared net's and D's (a public constant)


def padded_chunks(x_all: torch.Tensor, y_all: torch.Tensor, idx: torch.Tensor):
    """(images, labels, weights) of the rows ``idx`` in chunks of exactly DPSGD_CHUNK rows: freshly allocated in the
    standard layout, the last zero-padded with weight 0; at least one chunk (an empty batch: padding only).

    Why: on CPU a row's float32 results round differently with its batch's size (a batch of 1 against 2 or more), so
    a record's gradient hung on how many others the Poisson mask sampled, and a network tuned to that rounding made
    one added record move the clipped sum by 2C (review s56). At one shape and layout a row's result is its own."""
    for start in range(0, max(1, len(idx)), DPSGD_CHUNK):
        chunk = idx[start:start + DPSGD_CHUNK]
        yb = torch.zeros(DPSGD_CHUNK, dtype=torch.long, device=x_all.device)
        weight = torch.zeros(DPSGD_CHUNK, dtype=torch.float32, device=x_all.device)
        yb[:len(chunk)], weight[:len(chunk)] = y_all[chunk], 1.0
        yield padded_rows(x_all[chunk], DPSGD_CHUNK, x_all.device), yb, weight


def train_dpsgd_local(
    model: nn.Module,
    dataset: "ImageDataset",
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    max_grad_norm: float,
    lr: float,
    device: torch.device | str | None = None,
    seed: int | None = None,
    momentum: float = 0.9,
    expected_batch: int = 0,
) -> dict[str, Any]:
    """Train ``model`` in place with ``steps`` DP-SGD steps on ``dataset``; return training metrics.

    Each step: Poisson batch (rate ``sample_rate``), per-sample gradients of the cross-entropy,
    each clipped to L2 norm ``max_grad_norm``, summed, Gaussian noise of std ``noise_multiplier *
    max_grad_norm`` added, divided by the expected batch size, SGD(momentum) update.
    ``noise_multiplier=0`` runs the same clipped path without noise (non-private).

    The caller must account ``DPEvent(noise_multiplier, sample_rate, steps)`` before calling.
    ``seed=None`` draws batches and noise from OS entropy (production); a fixed seed makes runs
    reproducible (tests, benchmarks).

    Returns {"steps", "loss_first", "loss_last", "mean_batch_size", "empty_batches", "num_samples",
    "noise_multiplier", "sample_rate", "max_grad_norm", "seconds"}; the losses are means over the
    Poisson batches of the first / last 10% of the steps (they are computed on private data: treat
    them as site-side diagnostics, not as something to release).
    """
    _check_args(model, dataset, noise_multiplier, sample_rate, steps, max_grad_norm, lr)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    t0 = time.perf_counter()
    model.to(dev).train()
    x_all = opacus_input(dataset.images, dev)  # (N, C, H, W), standard layout (see opacus_input)
    y_all = torch.as_tensor(dataset.labels, dtype=torch.long, device=dev)  # (N,)
    n = x_all.shape[0]
    # what the noisy sum is divided by: a site passes rate x its census total (public); 0 = rate x n (tests)
    expected_batch = expected_batch or max(1, int(round(sample_rate * n)))

    # Poisson batches and noise from secret ChaCha20 streams (client.secret_random); seed=None: OS entropy
    batch_rng, noise_rng = secret_generator(seed).spawn(2)

    # loss_reduction="sum": each record's per-sample gradient is that of its own loss, computed without the realised
    # batch size b. With a mean loss autograd carried (p - y) / b through the backward pass and Opacus multiplied b
    # back at each weighted layer, so the values between depended on b: a coordinator's net built to round them to 0
    # (subnormal head weights) from b = 41 on made every record of a batch flip between contributing and not with
    # one added record (review s56: L2 41 against the accounted 1). The optimizer still divides by the expected batch.
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = FiniteDPOptimizer(  # a record whose gradient overflows contributes 0 (client.nonfinite)
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        noise_rng=noise_rng,
    )
    losses: list[float] = []
    sizes: list[int] = []
    try:
        for _ in range(int(steps)):
            idx = poisson_mask(batch_rng, n, sample_rate).nonzero().squeeze(1).to(dev)  # each record independently
            optimizer.zero_grad(set_to_none=True)
            loss = 0.0
            # The Poisson batch (b rows, b may be 0) in padded chunks of exactly DPSGD_CHUNK rows (padded_chunks: why),
            # each through its own forward and backward. Padding rows weigh 0 in the loss: their per-sample gradients
            # are 0 (or non-finite, which FiniteDPOptimizer zeroes). An empty batch runs one chunk of padding only.
            for xb, yb, weight in padded_chunks(x_all, y_all, idx):
                chunk_loss = (nn.functional.cross_entropy(gsm(xb), yb, reduction="none") * weight).sum()
                with warnings.catch_warnings():
                    # The input batch needs no grad, so torch warns that the first conv's full backward
                    # hook sees no input gradients; Opacus only needs the output gradients there.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    chunk_loss.backward()
                optimizer.accumulate_chunk()  # clipped into the step's sum now: a step holds one chunk's gradients
                loss += float(chunk_loss.detach())
            optimizer.step_accumulated()  # noise once, / the expected batch, the update
            sizes.append(len(idx))
            if len(idx):
                losses.append(loss / len(idx))  # (the batch's mean loss: a site-side diagnostic)
    finally:
        optimizer.zero_grad(set_to_none=True)
        gsm.cleanup()  # removes hooks and grad_sample attributes: the caller gets a plain module back
    model.eval()
    # Every Poisson batch empty is a valid run (noise-only steps, as accounted), not a failure: whether it happens
    # depends on the record count, and a failure would say so to the coordinator. Its losses are NaN.
    k = max(1, len(losses) // 10)
    return {
        "steps": int(steps),
        "loss_first": float(np.mean(losses[:k])) if losses else math.nan,
        "loss_last": float(np.mean(losses[-k:])) if losses else math.nan,
        "mean_batch_size": float(np.mean(sizes)),
        "empty_batches": int(sum(s == 0 for s in sizes)),
        "num_samples": int(n),
        "noise_multiplier": float(noise_multiplier),
        "sample_rate": float(sample_rate),
        "max_grad_norm": float(max_grad_norm),
        "seconds": time.perf_counter() - t0,
    }
