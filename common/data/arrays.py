"""Helpers on in-memory arrays shared by the loaders and savers: channels, resizing, uint8 <-> float,
and the deterministic stratified train/test split."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Sources without an official split (digits, UTKFace) get a deterministic stratified one.
TEST_FRACTION = 0.2
SPLIT_SEED = 0


# --------------------------------------------------------------------------------------------
# In-memory arrays: channel conversion and resizing of (N, C, H, W) float32
# --------------------------------------------------------------------------------------------

# ITU-R 601-2 luma, the weights PIL uses for RGB -> L, so folder and array sources agree.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _adapt(images: np.ndarray, channels: int | None, image_size: int | None) -> np.ndarray:
    """Apply the requested channel count and size to (N, C, H, W) float32 images."""
    if channels == 1 and images.shape[1] == 3:
        images = np.einsum("nchw,c->nhw", images, _LUMA)[:, None].astype(np.float32)
    if image_size is not None and images.shape[2:] != (image_size, image_size):
        images = _resize_float(images, image_size)
    if channels == 3 and images.shape[1] == 1:
        images = np.repeat(images, 3, axis=1)
    return np.clip(images, 0.0, 1.0, out=images)


def _resize_float(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, C, H, W) float32 to (N, C, size, size) with PIL's antialiased bilinear filter."""
    n, c = images.shape[:2]
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for ch in range(c):
            plane = Image.fromarray(np.ascontiguousarray(images[i, ch]))  # float32 -> mode "F"
            out[i, ch] = np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR))
    return out


def _uint8_to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    arr = arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    out = arr.astype(np.float32)
    return np.divide(out, 255.0, out=out)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    """float32 (N, C, H, W) in [0, 1] -> uint8 (N, H, W) for C = 1 or (N, H, W, C)."""
    u8 = np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
    return u8[:, 0] if u8.shape[1] == 1 else u8.transpose(0, 2, 3, 1)


def _stratified_split(keys: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of ``split`` ("train"/"test") in a seeded stratified 80/20 split of ``keys``."""
    rng = np.random.default_rng(SPLIT_SEED)
    test_parts = []
    for key in np.unique(keys):
        members = rng.permutation(np.flatnonzero(keys == key))
        n_test = int(np.floor(TEST_FRACTION * len(members) + 0.5))
        test_parts.append(members[:n_test])
    is_test = np.zeros(len(keys), dtype=bool)
    if test_parts:
        is_test[np.concatenate(test_parts)] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)
