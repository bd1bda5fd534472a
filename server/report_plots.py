"""The pictures of a report: matplotlib figures as PNG bytes, the sample grid of a synthetic set and its nearest
pairs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display at the coordinator; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from common.audits.neighbors import nearest_neighbors  # noqa: E402
from common.data import ImageDataset  # noqa: E402


def _to_uint8_hwc(img: np.ndarray) -> np.ndarray:
    arr = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)  # (C, H, W)
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def image_grid(images: np.ndarray, cols: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile images (N, C, H, W) in [0, 1] into one picture, ``cols`` per row."""
    n, c, h, w = images.shape
    rows = max(1, -(-n // cols))
    mode = "L" if c == 1 else "RGB"
    canvas = Image.new(mode, (cols * (w + pad) + pad, rows * (h + pad) + pad), color=255 if c == 1 else (255, 255, 255))
    for i in range(n):
        r, col = divmod(i, cols)
        canvas.paste(Image.fromarray(_to_uint8_hwc(images[i]), mode=mode), (pad + col * (w + pad), pad + r * (h + pad)))
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.NEAREST)
    return canvas


def fig_png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def per_class_plot(names: list[str], tstr: Sequence[float], real: Sequence[float] | None) -> bytes:
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3))
    x = np.arange(len(names))
    width = 0.4 if real is not None else 0.7
    ax.bar(x - (width / 2 if real is not None else 0), np.nan_to_num(np.asarray(tstr, float)), width, label="TSTR")
    if real is not None:
        ax.bar(x + width / 2, np.nan_to_num(np.asarray(real, float)), width, label="real")
        ax.legend()
    ax.set_xticks(x, names, rotation=45 if len(names) > 12 else 0)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    return fig_png(fig)


def confusion_plot(conf: np.ndarray, names: list[str]) -> bytes:
    k = len(conf)
    fig, ax = plt.subplots(figsize=(min(10, 1 + 0.45 * k), min(10, 1 + 0.45 * k)))
    ax.imshow(conf, cmap="Blues")
    if k <= 20:  # numbers in cells stay readable up to ~20 classes
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(conf[i, j])), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(k), names, rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return fig_png(fig)


def histogram_plot(hist: dict, metric: str, title: str, ylabel: str = "synthetic records") -> bytes:
    edges = np.asarray(hist["edges"], float)
    fig, ax = plt.subplots(figsize=(6, 3))
    for key, color in (("train", "tab:red"), ("heldout", "tab:blue")):
        counts = np.asarray(hist.get(key, []), float)
        if len(counts) == len(edges) - 1:
            ax.stairs(counts, edges, label=f"to nearest {'training' if key == 'train' else 'held-out'} record",
                      color=color, fill=False, linewidth=1.5)
    ax.set_xlabel(f"nearest-neighbour distance ({metric})")
    ax.set_ylabel(ylabel)
    if edges[0] <= 0 < edges[1] and len(edges) > 2:  # the DP audit grid is log-spaced after a [0, 1e-5) bin
        ax.set_xscale("symlog", linthresh=edges[1])
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig_png(fig)


def save_class_grid(images: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: Path,
                    *, per_class: int = 10, seed: int = 0) -> Path:
    """Write a PNG grid: one row per class, up to ``per_class`` random images (N, C, H, W) in [0, 1].

    The images are tiled into one mosaic first (one imshow instead of K x per_class axes: ~10x faster).
    """
    rng = np.random.default_rng(seed)
    k = len(classes)
    c, h, w = images.shape[1:]
    pad = 2
    # (rows, cols, C) mosaic, background mid-gray so black digits stay visible at tile borders.
    mosaic = np.full((k * (h + pad) + pad, per_class * (w + pad) + pad, c), 0.5, dtype=np.float32)
    for row in range(k):
        idx = np.flatnonzero(labels == row)
        chosen = rng.choice(idx, size=min(per_class, len(idx)), replace=False) if len(idx) else []
        for col, i in enumerate(chosen):
            y, x = pad + row * (h + pad), pad + col * (w + pad)
            mosaic[y:y + h, x:x + w] = np.transpose(images[i], (1, 2, 0))  # (H, W, C)
    scale = 0.5  # inches per tile, whatever the image size
    fig, ax = plt.subplots(figsize=(per_class * scale + 1.0, k * scale + 0.3))
    ax.imshow(mosaic[..., 0] if c == 1 else mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([pad + r * (h + pad) + h / 2 for r in range(k)], [str(n) for n in classes], fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fig_png(fig))
    return path


def attribute_curve_plot(curve: Sequence[dict]) -> bytes:
    """Seed 004's privacy-utility curve: per replacement strength, the adversary's accuracy on the sensitive
    attribute (privacy loss, x) against the task accuracy (utility, y), with the no-leak level."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs, ys = [p["adversary_accuracy"] for p in curve], [p["task_accuracy"] for p in curve]
    ax.plot(xs, ys, "o-", color="tab:blue", label="adversary (kept classifier or constant answer)")
    ax.plot([p["balanced_accuracy"] for p in curve], ys, "s--", color="tab:orange", alpha=0.7,
            label="classifier's balanced accuracy")
    for p, x, y in zip(curve, xs, ys):
        ax.annotate(f"strength {p['strength']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axvline(curve[0]["majority_rate"], color="tab:blue", ls=":", label="no leak: majority rate")
    ax.axvline(curve[0]["chance"], color="tab:orange", ls=":", label="no leak (balanced): 1/K")
    ax.set_xlabel("privacy loss: accuracy on the sensitive attribute (real images)")
    ax.set_ylabel("utility: task accuracy (real images)")
    ax.legend(fontsize=7, loc="best")
    return fig_png(fig)


def save_nearest_pairs(synthetic: ImageDataset, train: ImageDataset, heldout: ImageDataset, path: Path, *,
                       count: int = 8, device: torch.device | str | None = None) -> dict:
    """Seed 000's memorization picture: the ``count`` synthetic images closest to a training image (pixel
    MSE), each above its nearest training image and its nearest held-out image; writes ``path`` (3 rows).

    If the generator copied training records, the middle row repeats the top row and the bottom row does
    not; without memorization both look equally (un)like it. Returns the picture's name and the distances.
    """
    d_train, i_train = nearest_neighbors(synthetic.images, train.images, device=device)
    d_held, i_held = nearest_neighbors(synthetic.images, heldout.images, device=device)
    closest = np.argsort(d_train, kind="stable")[:count]
    rows = np.concatenate([synthetic.images[closest], train.images[i_train[closest]],
                           heldout.images[i_held[closest]]])  # (3 * count, C, H, W)
    image_grid(rows, cols=len(closest), scale=max(1, 64 // synthetic.image_shape[1]), pad=2).save(path)
    return {"image": path.name, "metric": "mse", "rows": ["synthetic", "nearest training", "nearest held-out"],
            "distance_to_train": [float(d) for d in d_train[closest]],
            "distance_to_heldout": [float(d) for d in d_held[closest]]}
