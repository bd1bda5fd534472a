"""Exact discrete Gaussian noise for the site's counting releases (Canonne, Kamath & Steinke, NeurIPS 2020).

Why: a count released as ``count + x`` with ``x`` a floating-point Gaussian draw leaks through its low-order bits.
The doubles a sampler can return are not spread evenly, and which sums ``count + x`` can come out, after rounding,
depends on ``count`` (Mironov, CCS 2012, for the Laplace mechanism; Jin et al., IEEE S&P 2022, for the Gaussian
samplers of common libraries): a coordinator that reads the exact bits of one noisy count can rule out counts the
noise should hide. Every release of integer counts at a site -- the census, the ledger's noisy size, the per-layer
norm histograms that pick clip bounds, the statistics release's class counts, the evaluation table and the audit
histograms -- adds integer noise instead, drawn exactly with integer arithmetic and the operating system's CSPRNG, so
the release is an integer whose distribution is the one the accounting assumes, bit for bit.

Accounting: for integer queries, ``N_Z(0, sigma^2)`` noise gives the continuous Gaussian's Renyi divergence or less,
``D_alpha(N_Z(mu, s^2) || N_Z(nu, s^2)) <= alpha (mu - nu)^2 / (2 s^2)`` (CKS, Prop. 5), and independent coordinates
add, so a vector of counts of L2 sensitivity Delta with noise ``N_Z(0, (z Delta)^2)`` per count is charged exactly as
``DPEvent(z, 1.0, 1)`` is today (CKS Thm. 14: (1/2)(Delta / sigma)^2-concentrated DP). Nothing in the ledger changes.

The sampler (CKS Algorithms 1-3): a Bernoulli(exp(-gamma)) for rational gamma from Bernoulli(gamma / k) draws, a
discrete Laplace of integer scale t from those, and a discrete Gaussian by rejection from the discrete Laplace with
t = floor(sigma) + 1. ``sigma^2`` is taken as an exact fraction, never below the variance asked for.
"""

from __future__ import annotations

import math
import random
import secrets
import time
from fractions import Fraction
from typing import Callable

import numpy as np

RandBelow = Callable[[int], int]  # n -> a uniform integer in [0, n)


def _bernoulli(num: int, den: int, below: RandBelow) -> bool:
    """True with probability num / den (0 <= num <= den)."""
    return below(den) < num


def _bernoulli_exp_unit(num: int, den: int, below: RandBelow) -> bool:
    """True with probability exp(-num/den), for 0 <= num/den <= 1 (CKS Algorithm 1, first case)."""
    k = 1
    while _bernoulli(num, den * k, below):
        k += 1
    return k % 2 == 1


def _bernoulli_exp(num: int, den: int, below: RandBelow) -> bool:
    """True with probability exp(-num/den), for any num/den >= 0 (CKS Algorithm 1)."""
    whole = num // den
    for _ in range(whole):
        if not _bernoulli_exp_unit(1, 1, below):
            return False
    return _bernoulli_exp_unit(num - whole * den, den, below)


def _discrete_laplace(scale: int, below: RandBelow) -> int:
    """An integer Y with P(Y = y) proportional to exp(-|y| / scale) (CKS Algorithm 2)."""
    while True:
        u = below(scale)
        if not _bernoulli_exp(u, scale, below):
            continue
        v = 0
        while _bernoulli_exp_unit(1, 1, below):
            v += 1
        x = u + scale * v
        negative = below(2) == 1
        if negative and x == 0:
            continue
        return -x if negative else x


def _one_discrete_gaussian(var: Fraction, below: RandBelow) -> int:
    """An integer Y with P(Y = y) proportional to exp(-y^2 / (2 var)) (CKS Algorithm 3)."""
    a, b = var.numerator, var.denominator  # var = a / b
    t = math.isqrt(a // b) + 1  # floor(sigma) + 1 (isqrt of the integer part is floor(sigma))
    while True:
        y = _discrete_laplace(t, below)
        # accept with probability exp(-(|y| - var/t)^2 / (2 var)) = exp(-(|y| b t - a)^2 / (2 a b t^2))
        if _bernoulli_exp((abs(y) * b * t - a) ** 2, 2 * a * b * t * t, below):
            return y


def exact_variance(std: float) -> Fraction:
    """``std**2`` as an exact fraction, never below the real square of ``std`` (one float step up)."""
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"the noise std must be a positive number, got {std}")
    return Fraction(math.nextafter(std * std, math.inf))


# The sampler's loops run longer for larger |noise| (about 12 us for a small draw, 90 us at the 99.9th percentile,
# up to 0.5 ms in 100,000 draws on this project's CPUs), and the release is count + noise: a draw's time is a hint
# at its noise (Jin et al. 2022 time this very sampler). A site's draws therefore end at a fixed deadline of
# DRAW_SECONDS per count from their start (or its next whole multiple, on a machine so loaded that they outlast it),
# whatever the noise came out as.
DRAW_SECONDS = 1e-3


def discrete_gaussian(std: float, shape: int | tuple[int, ...], seed: int | None = None,
                      *, sleep: Callable[[float], None] = time.sleep) -> np.ndarray:
    """int64 array of ``shape``, each an independent ``N_Z(0, std^2)`` draw.

    ``seed=None`` (every site release) draws from the operating system's CSPRNG (``secrets``) and returns at the
    deadline ``DRAW_SECONDS`` per draw after it began; a seed gives a reproducible stream, at once (tests and
    benchmarks only).
    """
    began = time.monotonic()
    var = exact_variance(std)
    below: RandBelow = secrets.randbelow if seed is None else random.Random(seed).randrange
    count = int(np.prod(shape, dtype=np.int64))
    draws = [_one_discrete_gaussian(var, below) for _ in range(count)]
    if seed is None:  # end at the first whole multiple of the deadline the draws did not outlast (a loaded machine)
        deadline = max(count, 1) * DRAW_SECONDS
        took = time.monotonic() - began
        sleep(max(1, math.ceil(took / deadline)) * deadline - took)
    return np.asarray(draws, dtype=np.int64).reshape(shape)


def noisy_counts(exact: np.ndarray, std: float, seed: int | None = None) -> np.ndarray:
    """``exact`` (whole numbers, any float or int dtype) plus ``N_Z(0, std^2)`` noise, as float64 whole numbers.

    ``std = 0`` returns the exact counts (a run the site agreed to make non-private). Refuses counts that are not
    whole numbers: the discrete mechanism's guarantee is for integer queries only.
    """
    exact = np.asarray(exact, dtype=np.float64)
    if not np.all(np.isfinite(exact)) or not np.array_equal(exact, np.round(exact)):
        raise ValueError("noisy_counts adds integer noise to whole-number counts only")
    if std == 0:
        return exact.copy()
    return exact + discrete_gaussian(std, exact.shape, seed).astype(np.float64)
