"""From the final generator to a labelled synthetic dataset a person can open."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch

from common import protocol as P
from common.data import ImageDataset, save_image_folder, save_npz
from common.models import Generator
from common.progress import progress as progress_bar
from server.report_plots import image_grid, save_class_grid


def balanced_class_sizes(num_classes: int, total: int) -> np.ndarray:
    """(K,) images per class for a balanced set of ``total``: total//K each, the first total%K one more."""
    sizes = np.full(num_classes, total // num_classes, dtype=np.int64)
    sizes[: total % num_classes] += 1
    return sizes


# The least share of the synthetic set a class gets under the census mix, as a fraction of its balanced share.
MIN_CLASS_SHARE = 0.1


def class_sizes(census: np.ndarray, total: int, mix: str) -> np.ndarray:
    """(K,) images per class of a synthetic set of ``total``: ``mix = "balanced"`` (:func:`balanced_class_sizes`)
    or ``"census"``: in proportion to the pooled noisy class counts (``census`` (S, K), the histograms the
    sites already released, summed over sites; negative noisy counts count as 0), each class at least
    ``MIN_CLASS_SHARE`` of its balanced share so that no class the noise undercounts vanishes.

    Why the census: the central learner, like any classifier, learns the class prior of what it is trained on;
    the same learner on the real pooled data learns the data's prior, and a balanced synthetic set teaches a
    uniform one instead, which costs accuracy on data whose classes are not balanced. Post-processing of DP
    releases: no privacy cost. A census of equal counts (secure aggregation: the coordinator holds none) gives
    the balanced set."""
    k = census.shape[1]
    if mix == "balanced":
        return balanced_class_sizes(k, total)
    pooled = np.clip(np.asarray(census, dtype=np.float64), 0.0, None).sum(axis=0)  # (K,)
    prior = pooled / pooled.sum() if pooled.sum() > 0 else np.full(k, 1.0 / k)
    prior = np.maximum(prior, MIN_CLASS_SHARE / k)
    return round_largest_remainder(prior / prior.sum() * total, total)


def class_mix_note(mix: str, sizes: np.ndarray, *, census_held: bool) -> dict:
    """The report's account of the synthetic set's class mix."""
    why = {"balanced": "every class equally often (synthetic-class-mix = balanced)",
           "census": ("each class as often as the noisy class counts the sites already released say (no privacy "
                      "cost), so the learner learns the data's class prior as it does on real data"
                      if census_held else "every class equally often: the coordinator holds no census (secure "
                                          "aggregation)")}[mix]
    return {"mix": mix, "images-per-class": [int(n) for n in sizes], "why": why}


def round_largest_remainder(share: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` from fractional ``share`` (n,) summing to it: floors, then one more
    to the largest remainders (ties: the first)."""
    counts = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - counts), kind="stable")
    counts[order[:int(total - counts.sum())]] += 1
    return counts


def allocate_by_census(census: np.ndarray, total: int, sizes: np.ndarray | None = None) -> np.ndarray:
    """(S, K) images to draw from each of S sites' generators for each of K classes.

    Each class gets its balanced share of ``total`` (or ``sizes[c]`` images when given), split among the
    sites in proportion to their noisy counts of it (``census`` (S, K), the per-run class histograms the
    sites already released; negative noisy counts count as 0; a class that no site reports is split
    equally), rounded by largest remainder.
    Why: under label skew a site that holds few records of a class trains that class badly, and an
    average of the sites' generators mixes its bad version in; drawing each class from the sites that
    hold it avoids that. It is post-processing of DP releases, so it costs no privacy.
    """
    num_sites, k = census.shape
    sizes = balanced_class_sizes(k, total) if sizes is None else np.asarray(sizes, dtype=np.int64)  # (K,)
    w = np.clip(np.asarray(census, dtype=np.float64), 0.0, None)  # (S, K)
    w[:, w.sum(axis=0) <= 0] = 1.0
    share = w / w.sum(axis=0) * sizes  # (S, K) fractional images
    return np.stack([round_largest_remainder(share[:, c], int(sizes[c])) for c in range(k)], axis=1)


def _draw(gen: Generator, labels: np.ndarray, rng: torch.Generator, device: torch.device, batch_size: int,
          bar) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] of ``gen`` for ``labels`` (N,)."""
    out = []
    for start in range(0, len(labels), batch_size):
        y = torch.from_numpy(labels[start:start + batch_size]).to(device)
        z = torch.randn(len(y), gen.shape.latent_dim, generator=rng).to(device)
        out.append(((gen(z, y) + 1) / 2).clamp(0, 1).cpu().numpy())  # (b, C, H, W)
        bar.update(1)
    return np.concatenate(out).astype(np.float32)  # callers never ask for 0 labels


@torch.no_grad()
def sample_generator(gen: Generator, classes: tuple[str, ...], total: int, *, seed: int,
                     device: torch.device, batch_size: int = 500, progress: bool = True,
                     sizes: np.ndarray | None = None) -> ImageDataset:
    """``total`` images of one generator: ``sizes[c]`` of class c (:func:`class_sizes`), balanced when None."""
    sizes = balanced_class_sizes(len(classes), total) if sizes is None else np.asarray(sizes, dtype=np.int64)
    labels = np.repeat(np.arange(len(classes)), sizes).astype(np.int64)
    rng = torch.Generator(device="cpu").manual_seed(seed)
    gen = gen.to(device).eval()
    with progress_bar(total=-(-total // batch_size), desc="sampling synthetic set", unit="batch",
                      enabled=progress) as bar:
        images = _draw(gen, labels, rng, device, batch_size, bar)
    return ImageDataset(images=images, labels=labels, classes=tuple(classes), source="synthetic")


@torch.no_grad()
def _draw_sites(gen: Generator, site_states: list[dict[str, np.ndarray]], alloc: np.ndarray, *, seed: int,
                device: torch.device, batch_size: int, progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each site with images to draw: (its labels (n,), sorted by class, and their images (n, C, H, W)),
    ``alloc[s, c]`` images of class c from site s's generator, in site order."""
    rng = torch.Generator(device="cpu").manual_seed(seed)
    model = copy.deepcopy(gen).to(device).eval()
    drawn = []
    batches = sum(-(-int(row.sum()) // batch_size) for row in alloc)
    with progress_bar(total=batches, desc="sampling synthetic set", unit="batch", enabled=progress) as bar:
        for state, row in zip(site_states, alloc):
            if row.sum() == 0:
                continue
            P.load_state(model, state)
            site_labels = np.repeat(np.arange(len(row)), row).astype(np.int64)
            drawn.append((site_labels, _draw(model, site_labels, rng, device, batch_size, bar)))
    return drawn


def sample_site_generators(gen: Generator, site_states: list[dict[str, np.ndarray]], census: np.ndarray,
                           classes: tuple[str, ...], total: int, *, seed: int, device: torch.device,
                           batch_size: int = 500, progress: bool = True,
                           sizes: np.ndarray | None = None) -> tuple[ImageDataset, np.ndarray]:
    """``total`` images, ``sizes[c]`` of class c (balanced when None), class c drawn from each site's generator
    (``site_states``, S state dicts of ``gen``'s architecture) in proportion to the site's noisy count of c
    (``census`` (S, K)); and the (S, K) allocation used (:func:`allocate_by_census`)."""
    alloc = allocate_by_census(census, total, sizes)
    drawn = _draw_sites(gen, site_states, alloc, seed=seed, device=device, batch_size=batch_size, progress=progress)
    return (ImageDataset(images=np.concatenate([images for _, images in drawn]),
                         labels=np.concatenate([labels for labels, _ in drawn]), classes=tuple(classes),
                         source="synthetic"), alloc)


def draw_by_census(gen: Generator, site_states: list[dict[str, np.ndarray]], census: np.ndarray,
                   labels: np.ndarray, *, seed: int, device: torch.device, batch_size: int = 500,
                   progress: bool = True) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] for the conditioning ``labels`` (N,), in their order: each class's
    images come from the sites in proportion to their noisy counts of it (:func:`allocate_by_census`), and
    which site drew the image at a position is random (``seed``) among that class's positions.

    Why random: the caller's records may carry more than the conditioning class (the attribute replacement's
    claimed value, laid out sorted); images placed site after site in the records' order would make the
    drawing site -- its generator's style shows in the image -- a function of the position, hence of whatever
    the caller sorted by, and an adversary would read the claim off the style."""
    k = census.shape[1]
    alloc = allocate_by_census(census, len(labels), sizes=np.bincount(labels, minlength=k))
    drawn = _draw_sites(gen, site_states, alloc, seed=seed, device=device, batch_size=batch_size, progress=progress)
    out = np.empty((len(labels), *drawn[0][1].shape[1:]), dtype=np.float32)
    rng = np.random.default_rng(seed)
    # where class c's images go, in random order, taken site by site
    slots = [rng.permutation(np.flatnonzero(labels == c)) for c in range(k)]
    for site_labels, images in drawn:
        for c in range(k):
            n = int((site_labels == c).sum())
            out[slots[c][:n]], slots[c] = images[site_labels == c], slots[c][n:]
    return out


def save_grids(ds: ImageDataset, out_dir: Path, per_class: int = 16) -> list[str]:
    """One PNG per class (``per_class`` samples) plus ``grid_all.png`` with a row per class; relative paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scale = max(1, 64 // ds.image_shape[1])
    names = []
    for k, cls in enumerate(ds.classes):
        imgs = ds.images[ds.labels == k][:per_class]
        if len(imgs) == 0:
            continue
        safe = "".join(ch if ch.isalnum() else "_" for ch in cls)
        image_grid(imgs, cols=min(8, per_class), scale=scale).save(out_dir / f"grid_class_{k}_{safe}.png")
        names.append(f"grids/grid_class_{k}_{safe}.png")
    if names:  # one row per class, labelled with the class name
        save_class_grid(ds.images, ds.labels, ds.classes, out_dir / "grid_all.png", per_class=per_class)
        names.insert(0, "grids/grid_all.png")
    return names


def save_synthetic(ds: ImageDataset, out_dir: Path) -> dict:
    """Write synthetic.npz, the image folder synthetic/<class>/*.png and the grids; their relative paths."""
    save_npz(ds, out_dir / "synthetic.npz")
    if (out_dir / "synthetic").exists():  # our own output of an earlier attempt (resume / re-run)
        shutil.rmtree(out_dir / "synthetic")
    save_image_folder(ds, out_dir / "synthetic")
    grids = save_grids(ds, out_dir / "grids")
    return {"count": len(ds), "npz": "synthetic.npz", "folder": "synthetic", "grids": grids,
            "class_counts": ds.class_counts().tolist()}
