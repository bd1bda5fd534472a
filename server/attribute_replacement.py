"""Seed 004's synthetic replacement of a sensitive attribute, for a generator conditioned on two attributes.

A site may hold an attribute it does not want the synthetic set to teach (race, say). With a joint label
(``label-from = utkface-gender+race``: class = task value * |values| + sensitive value) the sites' DP
generators learn faces of every (task, sensitive) pair. This module makes the synthetic set the way seed
004's filter + generator makes its censored images: every synthetic record keeps the labels it claims
(task t balanced, sensitive s as often as the sites' noisy counts say within t), but its image is generated
for (t, s') with s' drawn *independently* of t, of s and of everything else, from the pooled noisy
marginal of the sensitive attribute (the sites' census: a DP release already paid for, so this costs no
privacy). A classifier trained on the set to predict s then finds nothing to learn (seed 004's privacy
loss, :mod:`common.audits.attribute`), while the task attribute is untouched (seed 004's utility).

``strength`` in [0, 1] is the share of records whose attribute is replaced: 0 is the usual synthetic set,
1 the full replacement; values between trace seed 004's privacy-utility curve.

Who asks for it: a site's operator declares the attribute sensitive in site.yaml (``sensitive_attribute``,
published in ``query.info``), or the run sets ``sensitive-attribute`` (a simulation: every virtual site
declares it). :func:`run_sensitive_attribute` settles the run's attribute at discovery (or refuses the run
before anything is spent); the DP-GAN requests then name it, a declaring site refuses a request that does
not, and the run's synthetic set is drawn with it replaced for every record (strength 1).

Why no filter: a generative model has no source image to filter -- a synthetic face is drawn from
(latent, labels) only, so conditioning on s' instead of s already removes s from the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.config import RunConfig
from common.data import DataError, ImageDataset, joint_attribute_values
from common.models import Generator
from server.sites import RunFailed, SiteRecord
from server.synthesis import balanced_class_sizes, draw_by_census, round_largest_remainder


@dataclass(frozen=True)
class Replacement:
    """What :func:`sample_with_replaced_attribute` did (for the report)."""

    strength: float
    values: int  # number of values of the sensitive attribute
    marginal: list[float]  # (values,) the distribution s' was drawn from (pooled noisy census)
    replaced: int  # records whose image shows s' (s' == s happens by chance)
    agreement: float  # share of records whose image shows their own s (s' == s by chance counts)


def run_sensitive_attribute(cfg: RunConfig, sites: dict[int, SiteRecord], classes: tuple[str, ...]) -> str:
    """The attribute this run replaces ("" = none): the run's setting or the one the sites declared. Refuses
    (RunFailed) a run that cannot honour a declaration: sites that disagree, a run that names another
    attribute, the statistics mode, or classes that are not joint labels with the attribute second."""
    declared = {s.name: s.sensitive_attribute for s in sites.values() if s.sensitive_attribute}
    wanted = set(declared.values()) | ({cfg.sensitive_attribute} if cfg.sensitive_attribute else set())
    if len(wanted) > 1:
        said = "; ".join(f"{name}: {attr}" for name, attr in sorted(declared.items()))
        raise RunFailed(f"one synthetic set can replace one sensitive attribute, and this run is asked for "
                        f"{sorted(wanted)} (sites: {said or 'none'}; run setting sensitive-attribute = "
                        f"'{cfg.sensitive_attribute}'): the sites' operators must agree on one")
    if not wanted:
        return ""
    attribute = wanted.pop()
    who = f"site(s) {', '.join(sorted(declared))} declare" if declared else "the run sets"
    if cfg.mode != "dpgan":
        raise RunFailed(f"{who} {attribute} sensitive; only the DP-GAN mode can draw it independently in the "
                        f"synthetic set: run with mode = dpgan")
    try:
        joint_attribute_values(classes, "the sites' data")
    except DataError as err:
        raise RunFailed(f"{who} {attribute} sensitive, but {err}: every site must label its faces with "
                        f"label_from = utkface-<task>+{attribute}") from None
    return attribute


def _pooled(census: np.ndarray, values: int) -> np.ndarray:
    """(T, values) the sites' noisy counts of each (task, sensitive) pair summed; negatives count as 0."""
    return np.clip(np.asarray(census, dtype=np.float64), 0.0, None).sum(axis=0).reshape(-1, values)


def sensitive_marginal(census: np.ndarray, values: int) -> np.ndarray:
    """(values,) the sensitive attribute's distribution in the pooled noisy census (S, T * values);
    negative noisy counts count as 0, and no counts at all give the uniform distribution."""
    per_value = _pooled(census, values).sum(axis=0)  # (values,)
    if per_value.sum() <= 0:
        return np.full(values, 1.0 / values)
    return per_value / per_value.sum()


def claimed_labels(census: np.ndarray, values: int, total: int) -> np.ndarray:
    """(total,) joint labels t * values + s: t balanced over the task values, s within each t split by the
    pooled noisy census of (t, s) (negatives count 0; no counts: equal split), by largest remainder."""
    pooled = _pooled(census, values)  # (T, values)
    labels = []
    for t, n_t in enumerate(balanced_class_sizes(len(pooled), total)):
        row = pooled[t] if pooled[t].sum() > 0 else np.ones(values)
        counts = round_largest_remainder(row / row.sum() * n_t, int(n_t))
        labels.append(np.repeat(t * values + np.arange(values), counts))
    return np.concatenate(labels).astype(np.int64)


def sample_with_replaced_attribute(gen: Generator, site_states: list[dict[str, np.ndarray]], census: np.ndarray,
                                   classes: tuple[str, ...], total: int, *, values: int, strength: float,
                                   seed: int, device: torch.device, progress: bool = True
                                   ) -> tuple[ImageDataset, Replacement]:
    """``total`` synthetic records whose images show a sensitive value drawn independently for a ``strength``
    share of them (see the module docstring).

    The records' claimed labels: the task attribute balanced (as the usual synthesis), the sensitive one
    following the pooled noisy census within each task value (:func:`claimed_labels`). Why not balanced
    too: an adversary that learns nothing from the images then learns the attribute's prior and scores the
    real majority rate, the "no leak" level seed 004 compares with; on balanced claims it would score less
    than that and look like a leak-free set even when the images did carry the attribute.

    ``classes`` are the joint classes (task-major: class = t * values + s), ``census`` (S, len(classes))
    the sites' noisy counts, ``site_states`` their generators (``gen``'s architecture)."""
    k = len(classes)
    if values < 2 or k % values:
        raise ValueError(f"{k} joint classes are not (task values) x {values} sensitive values")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"the replacement strength is a share of records in [0, 1], got {strength}")
    rng = np.random.default_rng(seed)
    labels = claimed_labels(census, values, total)  # (N,) what the records claim
    marginal = sensitive_marginal(census, values)
    replaced = rng.random(len(labels)) < strength
    drawn = rng.choice(values, size=len(labels), p=marginal)  # s', independent of t, s and the latents
    shown = np.where(replaced, labels // values * values + drawn, labels)  # (N,) the images' conditioning
    images = draw_by_census(gen, site_states, census, shown, seed=seed, device=device, progress=progress)
    ds = ImageDataset(images=images, labels=labels, classes=tuple(classes), source="synthetic (attribute replaced)")
    info = Replacement(strength=strength, values=values, marginal=[round(float(p), 4) for p in marginal],
                       replaced=int(replaced.sum()), agreement=float((shown == labels).mean()))
    return ds, info
