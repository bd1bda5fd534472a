"""The default delta of a site's ledger, chosen from a noisy size instead of the record count.

Why. delta should be at most about 1/(10 n) for a site of n records (design.md, "Privacy model"), so the
default depends on n. But delta enters every plan the site makes: the noise multiplier it calibrates
and, through it, whether the plan refuses (noise above 50, a budget that cannot pay). Set from the exact
n -- as ``min(1e-5, 1/(10 n))`` used to be -- a coordinator could binary-search the requested epsilon
for the point where a site starts refusing and read n back from it, to a record or so, paying only a
census per probe. That is a release of n that no DP mechanism covers.

What. When a site creates a dataset's ledger and its operator configured no delta, it draws the size
``n + N(0, SIZE_NOISE^2)`` from the operating system's entropy (one record moves n by 1: a Gaussian
mechanism of sensitivity 1, ``DPEvent(SIZE_NOISE, 1, 1)``), records that release as the ledger's first
charge (purpose ``ledger-delta``, in the same write as the header), and sets

    delta = min(1e-5, 1 / (10 * (noisy size + SIZE_MARGIN)))

The margin (5 noise stds) makes the noisy size plus margin exceed n except with probability 3e-7, so
the default stays at most 1/(10 n). Every later choice that reads delta is then post-processing of a
charged release. The noisy size is never sent: it lives in the ledger's header as delta only.

Cost: epsilon 0.015 on its own at delta 1e-5, once in a ledger's life; composed with a run of epsilon
about 9 it adds 3e-5 (RDP composes sublinearly). The margin makes delta a little smaller than 1/(10 n) for
a large site (4.8e-6 instead of 5e-6 at n = 20,000), which the same run pays with about 0.02 more epsilon.
A site whose budget is below :func:`least_budget` (0.032, the size release's epsilon at the smallest delta it
can give) is refused at its first request, before the draw, with the advice to configure ``delta`` in site.yaml
(then nothing is drawn: an operator's delta is public by declaration).
"""

from __future__ import annotations

import math

import numpy as np

from client.discrete_gaussian import noisy_counts
from common.accounting import DPEvent, default_delta, epsilon_for

SIZE_NOISE = 200.0  # std of the noisy size, in records; sensitivity 1
SIZE_MARGIN = 5.0 * SIZE_NOISE  # added to the noisy size: delta <= 1/(10 n) unless the noise is below -5 std
PURPOSE = "ledger-delta"  # the ledger entry that records the size release
SMALLEST_DELTA = 1e-12  # delta never goes below this (the default for a site of 1e11 records)


def size_event() -> DPEvent:
    """The DP event of the noisy size: one Gaussian release of sensitivity 1."""
    return DPEvent(SIZE_NOISE, 1.0, 1)


def delta_from_noisy_size(noisy_size: float) -> float:
    """The default delta for a noisy size (post-processing): min(1e-5, 1/(10 (noisy size + margin))), at least
    SMALLEST_DELTA."""
    if not math.isfinite(noisy_size):
        raise ValueError(f"the noisy size must be finite, got {noisy_size!r}")
    return max(SMALLEST_DELTA, default_delta(max(1, math.ceil(noisy_size + SIZE_MARGIN))))


def least_budget() -> float:
    """The smallest budget that pays the size release whatever its draw: its epsilon at SMALLEST_DELTA (0.032).

    A site whose budget is below it is refused before the draw. Deciding at the delta a draw gives would let the
    draw, which a refusal leaves uncharged, decide whether the site refuses."""
    return epsilon_for([size_event()], SMALLEST_DELTA)


def draw_default_delta(num_records: int, seed: int | None = None) -> float:
    """Draw the noisy size ``num_records + N_Z(0, SIZE_NOISE^2)`` from the OS CSPRNG (or ``seed``: tests only) and
    return its delta. The noise is an exact integer draw (``client.discrete_gaussian``).

    The caller must record :func:`size_event` in the ledger it creates with this delta (PrivacyLedger's
    ``first_charge``): the draw is a release of the record count.
    """
    return delta_from_noisy_size(float(noisy_counts(np.array([num_records]), SIZE_NOISE, seed)[0]))
