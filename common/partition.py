"""Splitting one labelled dataset into per-site shards, for simulations and benchmarks.

Two schemes:

* ``iid``: a seeded shuffle split into near-equal parts (sizes differ by at most one);
* ``dirichlet:<alpha>``: label skew. For every class, site proportions are drawn from
  Dirichlet(alpha, ..., alpha) and the class's records are cut accordingly; small alpha (0.1)
  gives each site a few dominant classes, large alpha (100) approaches IID. Draws are repeated
  (seeded, at most ``MAX_DIRICHLET_ATTEMPTS`` times) until every site has ``min_size`` records.
"""

from __future__ import annotations

import math

import numpy as np

SCHEMES = ("iid", "dirichlet")
MAX_DIRICHLET_ATTEMPTS = 1000
_FORMS = "'iid' or 'dirichlet:<alpha>' with alpha > 0 (e.g. 'dirichlet:0.5')"


def parse_partition(spec: str) -> tuple[str, float | None]:
    """Parse a partition spec: ``"iid"`` -> ("iid", None); ``"dirichlet:0.5"`` -> ("dirichlet", 0.5).

    Case and surrounding spaces are ignored. Raises ValueError naming the accepted forms.
    """
    if not isinstance(spec, str):
        raise ValueError(f"partition spec must be a string, got {spec!r}; accepted forms: {_FORMS}")
    text = spec.strip().lower()
    if text == "iid":
        return "iid", None
    name, sep, value = text.partition(":")
    if name.strip() == "dirichlet" and sep:
        try:
            alpha = float(value)
        except ValueError:
            alpha = math.nan
        if math.isfinite(alpha) and alpha > 0:
            return "dirichlet", alpha
        raise ValueError(
            f"bad Dirichlet alpha in partition spec {spec!r}: alpha must be a finite number > 0; "
            f"accepted forms: {_FORMS}"
        )
    raise ValueError(f"unknown partition spec {spec!r}; accepted forms: {_FORMS}")


def partition_indices(
    labels: np.ndarray,
    num_sites: int,
    scheme: str = "iid",
    alpha: float | None = None,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split record indices ``0..N-1`` among ``num_sites`` sites.

    Args:
        labels: (N,) integer class labels (only their equality matters).
        num_sites: number of shards, >= 1.
        scheme: ``"iid"`` or ``"dirichlet"`` (see :func:`parse_partition`).
        alpha: Dirichlet concentration, required (> 0) for ``"dirichlet"``, must be None for ``"iid"``.
        seed: the result is a pure function of (labels, num_sites, scheme, alpha, seed, min_size).
        min_size: every site gets at least this many records.

    Returns:
        ``num_sites`` sorted int64 arrays, pairwise disjoint, together covering every index.

    Raises:
        ValueError: bad arguments, or no split with ``min_size`` records per site was found.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (one label per record), got shape {labels.shape}")
    if isinstance(num_sites, bool) or not isinstance(num_sites, (int, np.integer)) or num_sites < 1:
        raise ValueError(f"num_sites must be an integer >= 1, got {num_sites!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    n = labels.shape[0]
    if n < num_sites * min_size:
        raise ValueError(
            f"{n} records cannot give {num_sites} sites at least {min_size} records each; "
            "use fewer sites, a smaller min_size or more data"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        if alpha is not None:
            raise ValueError(f"alpha={alpha} is only used by scheme='dirichlet'; pass alpha=None for 'iid'")
        shards = np.array_split(rng.permutation(n), num_sites)
    elif scheme == "dirichlet":
        if alpha is None or not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"scheme='dirichlet' needs a finite alpha > 0, got {alpha!r}")
        shards = _dirichlet_shards(labels, num_sites, float(alpha), min_size, rng)
    else:
        raise ValueError(f"unknown partition scheme {scheme!r}; use one of {SCHEMES}")
    return [np.sort(s).astype(np.int64) for s in shards]


def _dirichlet_shards(
    labels: np.ndarray, num_sites: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label-skewed shards; resample the proportions until every site has ``min_size`` records."""
    # Shuffle each class once; an attempt then only draws proportions, so retries are cheap
    # (the records a site receives are still a uniformly random subset of each class).
    members = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        cuts = []  # per class: (num_sites - 1,) cut positions into that class's records
        sizes = np.zeros(num_sites, dtype=np.int64)
        for idx in members:
            proportions = rng.dirichlet(np.full(num_sites, alpha))  # (num_sites,)
            bounds = np.floor(np.cumsum(proportions) * len(idx)).astype(np.int64)
            bounds[-1] = len(idx)  # guard against cumsum rounding below 1.0
            sizes += np.diff(bounds, prepend=0)
            cuts.append(bounds[:-1])
        if sizes.min() >= min_size:
            per_site: list[list[np.ndarray]] = [[] for _ in range(num_sites)]
            for idx, c in zip(members, cuts):
                for site, part in enumerate(np.split(idx, c)):
                    per_site[site].append(part)
            return [np.concatenate(parts) if parts else np.empty(0, np.int64) for parts in per_site]
    raise ValueError(
        f"Dirichlet(alpha={alpha}) split of {labels.shape[0]} records ({len(members)} classes) into "
        f"{num_sites} sites left some site with fewer than {min_size} records in all "
        f"{MAX_DIRICHLET_ATTEMPTS} attempts; raise alpha, use fewer sites, lower min_size or use more data"
    )
