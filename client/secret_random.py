"""The site's secret randomness: every draw a DP release's guarantee assumes the coordinator cannot replay.

DP-SGD's noise, its Poisson batches, and the random numbers whose count depends on those batches (the GAN's
latents and augmentations) must be unpredictable to the coordinator. Drawn from a stream the coordinator can
reproduce, the noise can be subtracted from the released weights, leaving the clipped gradients in the clear.

Why not ``torch.Generator``: on the CPU it keeps only the low 32 bits of its seed (``manual_seed(s)`` and
``manual_seed(s + 2**32)`` give the same numbers; ``tests/test_secret_random.py``), so its stream is one of 2**32
whatever entropy the seed had. A coordinator that asks for one DP-SGD step can try every stream against the released
weights: that is a search of about 10**14 Gaussian draws for a small network, days on a GPU, and the true stream
stands out. numpy's PCG64 has a 128-bit state, seeded here with 128 bits from the operating system.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch


def secret_generator(seed: int | np.random.SeedSequence | None = None) -> np.random.Generator:
    """A PCG64 stream with 128 bits of fresh OS entropy, or from ``seed`` (tests and benchmarks only, or a child of
    a SeedSequence that drew OS entropy itself: a site passes None, and nothing the coordinator sends ever becomes
    a seed here)."""
    return np.random.Generator(np.random.PCG64(secrets.randbits(128) if seed is None else seed))


def secret_gaussian(rng: np.random.Generator, shape: tuple[int, ...], device: torch.device | str,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws of ``shape`` from ``rng``, as a tensor on ``device`` (drawn on the CPU, then copied:
    a GPU's own generators are not used for secrets either)."""
    draws = rng.standard_normal(shape, dtype=np.float32)
    return torch.from_numpy(draws).to(device=device, dtype=dtype)


def poisson_mask(rng: np.random.Generator, n: int, rate: float) -> torch.Tensor:
    """(n,) bool, each True independently with probability ``rate``: the records a DP-SGD step samples.

    Compared in float64 so that the rate used is the accounted one (a float32 uniform on a 2**-24 grid rounds a
    rate such as 0.0128 up by up to 6e-8)."""
    return torch.from_numpy(rng.random(n) < rate)
