"""The site's secret randomness: every draw a DP release's guarantee assumes the coordinator cannot replay.

DP-SGD's noise, its Poisson batches, and the random numbers whose count depends on those batches (the GAN's
latents and augmentations) must be unpredictable to the coordinator. Drawn from a stream the coordinator can
reproduce, the noise can be subtracted from the released weights, leaving the clipped gradients in the clear.

Why not ``torch.Generator``: on the CPU it keeps only the low 32 bits of its seed (``manual_seed(s)`` and
``manual_seed(s + 2**32)`` give the same numbers; ``tests/test_secret_random.py``), so its stream is one of 2**32
whatever entropy the seed had. A coordinator that asks for one DP-SGD step can try every stream against the released
weights: that is a search of about 10**14 Gaussian draws for a small network, days on a GPU, and the true stream
stands out.

Why not numpy's PCG64 either (review s61): its 128-bit state is enough against a search, but PCG64 is not a
cryptographic generator, and a coordinator can make a site publish its raw output: a provided statistics net whose
first channels are zero for every record releases exactly the stream's noise draws there, at known positions at the
start of the stream (and a DP-SGD parameter with no gradient moves by noise alone). PCG64's state has been recovered
from 512 of its outputs (Bouillaguet, Martinez, Sauvage 2020); once recovered, every other noise value of the
release could be subtracted. So every secret stream here is ChaCha20 (the stream cipher of TLS and of Linux's own
random numbers; randomgen's numpy bit generator, 20 rounds), keyed from 256 bits of OS entropy: predicting its
output from earlier output is breaking the cipher. A float32 normal takes 1.8x PCG64's time: 0.75 s against 0.43 s
for the noise of a whole default DP-GAN run at a site (tests/benchmarks/bench_secret_random.py).
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from randomgen import ChaCha

CHACHA_ROUNDS = 20  # the full cipher (randomgen also offers 8 and 12: faster, with less margin)


def secret_generator(seed: int | np.random.SeedSequence | None = None) -> np.random.Generator:
    """A ChaCha20 stream keyed from 256 bits of fresh OS entropy, or from ``seed`` (tests and benchmarks only, or a
    child of a SeedSequence that drew OS entropy itself: a site passes None, and nothing the coordinator sends ever
    becomes a seed here). ``spawn`` gives independent child streams, ChaCha20 as well."""
    if not isinstance(seed, np.random.SeedSequence):  # a pool of 8 words: numpy's default 4 would keep 128 of the
        # 256 bits (review s61); spawned children inherit it
        seed = np.random.SeedSequence(secrets.randbits(256) if seed is None else seed, pool_size=8)
    return np.random.Generator(ChaCha(seed=seed, rounds=CHACHA_ROUNDS))


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
