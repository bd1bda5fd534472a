"""The ``"digits"`` source: scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import numpy as np

from common.data.arrays import _adapt, _stratified_split
from common.data.dataset import DataError, ImageDataset

# --------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------


def _load_digits(split: str, image_size: int | None, channels: int | None) -> ImageDataset:
    """8x8 digits, pixel values 0..16 scaled to [0, 1]; stratified 80/20 split, seed 0."""
    from sklearn.datasets import load_digits  # local: only this source needs scikit-learn

    if split not in ("train", "test"):
        raise DataError(f"'digits' has only the splits 'train' and 'test', not {split!r}")
    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    idx = _stratified_split(labels, split)
    images = (bunch.images[idx] / 16.0).astype(np.float32)[:, None]  # (n, 1, 8, 8)
    images = _adapt(images, channels, image_size)
    classes = tuple(str(i) for i in range(10))
    return ImageDataset(images, labels[idx], classes, source=f"digits[{split}]")
