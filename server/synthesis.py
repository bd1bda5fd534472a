"""From the final generator to a labelled synthetic dataset a person can open."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.data import ImageDataset, save_image_folder, save_npz
from common.models import Generator
from common.progress import progress as progress_bar
from server.report_plots import save_class_grid


@torch.no_grad()
def sample_generator(gen: Generator, classes: tuple[str, ...], total: int, *, seed: int,
                     device: torch.device, batch_size: int = 500, progress: bool = True) -> ImageDataset:
    """``total`` images with balanced labels (class i gets total//K, the first total%K one more)."""
    k = len(classes)
    labels = np.repeat(np.arange(k), total // k)
    labels = np.concatenate([labels, np.arange(total % k)]).astype(np.int64)
    rng = torch.Generator(device="cpu").manual_seed(seed)
    gen = gen.to(device).eval()
    out = []
    for start in progress_bar(range(0, total, batch_size), desc="sampling synthetic set", unit="batch",
                      enabled=progress):
        y = torch.from_numpy(labels[start:start + batch_size]).to(device)
        z = torch.randn(len(y), gen.shape.latent_dim, generator=rng).to(device)
        out.append(((gen(z, y) + 1) / 2).clamp(0, 1).cpu().numpy())  # (b, C, H, W) in [0, 1]
    images = np.concatenate(out).astype(np.float32)
    return ImageDataset(images=images, labels=labels, classes=tuple(classes), source="synthetic")


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
