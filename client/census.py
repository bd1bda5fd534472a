"""The per-run census: one noisy class histogram a site draws at its first training request of a run.

Mechanism: the exact class counts (K,) plus independent Gaussian noise of std ``noise`` on each
(``protocol.CENSUS_NOISE``); one record changes one count by 1 (L2 sensitivity 1 under add/remove-one
adjacency), so it is ``DPEvent(noise, 1.0, 1)``, charged by the caller in the same ledger entry as the
training round it is drawn with, before it is drawn. It stays on the site; what is built from it is:

- the FedAvg weight the site sends with every reply of the run, :func:`census_weight` (its noisy total);
- in the DP-GAN mode, the class mix of the generator's labels at this site (under label skew a site
  must not teach the generator classes its discriminator has hardly seen).

The noise comes from the operating system's entropy, never from the coordinator's seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.data import ImageDataset
from common.files import atomic_write_json

CENSUS_FILE = "census.json"


def load_census(run_dir: Path) -> list[float] | None:
    """This run's noisy class counts at the site, or None when not drawn yet."""
    path = run_dir / CENSUS_FILE
    if not path.exists():
        return None
    return [float(v) for v in json.loads(path.read_text())["noisy-counts"]]


def draw_census(data: ImageDataset, noise: float, run_dir: Path) -> list[float]:
    """Draw (K,) counts + N(0, noise^2) from fresh OS entropy and keep them on site. Charge it first."""
    counts = data.class_counts().astype(np.float64)  # (K,)
    noisy = counts + np.random.default_rng().normal(0.0, noise, size=counts.shape) if noise > 0 else counts
    values = [float(v) for v in noisy]
    atomic_write_json(run_dir / CENSUS_FILE, {"noisy-counts": values, "noise": noise})
    return values


def census_weight(noisy_counts: list[float]) -> float:
    """The site's FedAvg weight: its noisy record total, at least 1 (post-processing of the census)."""
    return max(1.0, float(sum(noisy_counts)))
