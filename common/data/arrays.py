"""Helpers on in-memory arrays shared by the loaders and savers: channels, resizing, uint8 <-> float,
and the deterministic train/test splits of sources that ship without one."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Sources without an official split get a deterministic one: scikit-learn's digits (public, fixed) a seeded
# stratified one, UTKFace (a site's own files) one decided for each face by its file name alone.
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLIT_SALT = b"fedsynth-split-v1:"


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
    """Sorted indices of ``split`` ("train"/"test") in a seeded stratified 80/20 split of ``keys``.

    For fixed public data only (scikit-learn's digits): adding or removing one record re-deals the others of its
    group and of every later group, so a site's own files are split by :func:`_hashed_split`."""
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


def _hashed_split(names: Sequence[str], split: str) -> np.ndarray:
    """Sorted indices of ``split`` ("train"/"test") in an 80/20 split that puts each record on its side by its own
    name alone: test where sha256(salt + name), read as a number in [0, 1), is below TEST_FRACTION.

    Why not the seeded stratified shuffle: there, adding or removing one file re-dealt every later record of its
    group and of every group after it, so one added face moved 34-277 others between a site's training and held-out
    sets (median 94 on the shared UTKFace subset), and each release computed on either set moved by that many
    records, not the one its noise is scaled to (review s58). Here a record's side never depends on the others; the
    price is that each group's test share is 20 % only on average."""
    limit = int(TEST_FRACTION * 2**64)
    is_test = np.array([int.from_bytes(hashlib.sha256(SPLIT_SALT + name.encode("utf-8", "surrogatepass")).digest()[:8],
                                       "big") < limit for name in names], dtype=bool)
    return np.flatnonzero(is_test if split == "test" else ~is_test)
