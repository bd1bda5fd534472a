"""The in-memory dataset type: :class:`ImageDataset`, its validation, and :class:`DataError`."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """Bad input data; the message says what is wrong and what to do."""


class NoRecords(DataError):
    """The data holds no record: an empty folder, archive or split, or none labelled in its classes. A site's
    held-out set that is emptied while it runs is a set of no records, not a failure (``client.evaluation``)."""


# --------------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------------


# eq=False: comparing numpy arrays with == is ambiguous; repr=False: the default repr would
# print every pixel.
@dataclass(frozen=True, eq=False, repr=False)
class ImageDataset:
    """A labelled image dataset held in memory.

    Attributes:
        images: (N, C, H, W) float32 in [0, 1], C is 1 or 3.
        labels: (N,) int64 in [0, len(classes)).
        classes: class names; label i is ``classes[i]``.
        source: where the data came from, for logs and reports.

    The constructor validates shapes, dtypes and ranges and raises :class:`DataError`;
    integer labels of another dtype are converted to int64, float images to float32.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        where = f" ({self.source})" if self.source else ""
        images = np.asarray(self.images)
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(
                f"images{where} must be shaped (N, C, H, W) with C = 1 or 3, got shape "
                f"{images.shape}; move the channel axis to position 1 (e.g. x.transpose(0, 3, 1, 2))"
            )
        if not np.issubdtype(images.dtype, np.floating):
            raise DataError(
                f"images{where} must be floats in [0, 1], got dtype {images.dtype}; "
                "for uint8 pixels divide by 255"
            )
        images = images.astype(np.float32, copy=False)
        if images.strides != _c_strides(images):
            # One canonical memory layout: a size-1 axis can carry any stride (a [:, None] view has 0, a
            # fancy-indexed copy of it the item size), and torch may read such an (N, 1, H, W) array as
            # channels-last, which Opacus' per-sample conv gradients get wrong (client.dpsgd.opacus_input).
            images = np.array(images, dtype=np.float32, order="C", copy=True)
        if images.size:
            lo, hi = float(images.min()), float(images.max())
            # NaN fails both comparisons, so it is reported here too.
            if not (lo >= 0.0 and hi <= 1.0):
                raise DataError(
                    f"images{where} must lie in [0, 1], found values in [{lo}, {hi}]; "
                    "rescale or clip them (e.g. np.clip(x, 0, 1))"
                )
        labels = np.asarray(self.labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(
                f"labels{where} must be shaped (N,) with N = {images.shape[0]} images, got "
                f"shape {labels.shape}; one integer class id per image is needed"
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"labels{where} must be integers, got dtype {labels.dtype}; convert them with "
                "labels.astype(np.int64) if they are whole numbers"
            )
        labels = labels.astype(np.int64, copy=False)
        if isinstance(self.classes, str):
            raise DataError(f"classes{where} must be a sequence of names, not the string {self.classes!r}")
        classes = tuple(str(c) for c in self.classes)
        if not classes or len(set(classes)) != len(classes) or any(not c for c in classes):
            raise DataError(
                f"classes{where} must be non-empty, unique, non-empty names, got {classes!r}"
            )
        bad = np.flatnonzero((labels < 0) | (labels >= len(classes)))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"label {int(labels[i])} at index {i}{where} is outside the {len(classes)} classes "
                f"{_short(classes)}; labels must be integers in [0, {len(classes)}) "
                f"({bad.size} bad labels in all): fix the labels or give the full class list"
            )
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "classes", classes)

    @property
    def num_classes(self) -> int:
        """Number of classes (including classes without any image)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return f"ImageDataset({describe(self)})"

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageDataset:
        """Return the records at ``indices`` (integer positions or a boolean mask), as copies."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise DataError(f"boolean mask has shape {idx.shape}, expected ({len(self)},)")
            idx = np.flatnonzero(idx)
        elif idx.size == 0:
            idx = idx.astype(np.int64)
        elif idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(f"indices must be a 1-D integer array, got shape {idx.shape} dtype {idx.dtype}")
        elif idx.min() < -len(self) or idx.max() >= len(self):
            raise DataError(
                f"indices range over [{idx.min()}, {idx.max()}] but the dataset has {len(self)} records"
            )
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.source)

    def in_classes(self, classes: Sequence[str]) -> ImageDataset:
        """The records of ``classes`` (matched by name), labelled by their place in it; records of another class left
        out. A class without records stays a class."""
        index = {name: i for i, name in enumerate(classes)}
        names = np.asarray(self.classes, dtype=object)[self.labels]  # (N,) each record's class name
        keep = np.array([name in index for name in names], dtype=bool)
        labels = np.array([index[name] for name in names[keep]], dtype=np.int64)
        return ImageDataset(self.images[keep], labels, tuple(classes), source=self.source)

    def class_counts(self) -> np.ndarray:
        """Number of records per class, (num_classes,) int64."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of shape, pixels, labels and class names.

        Identifies a site's dataset (e.g. to key its privacy ledger): the same data loaded the
        same way gives the same fingerprint; ``source`` is not included.
        """
        h = hashlib.sha256(b"fedsynth.ImageDataset.v1\0")
        header = {"shape": list(self.images.shape), "classes": list(self.classes)}
        h.update(json.dumps(header, sort_keys=True).encode())
        # Explicit little-endian so the digest does not depend on the machine.
        h.update(np.ascontiguousarray(self.images, dtype="<f4"))
        h.update(np.ascontiguousarray(self.labels, dtype="<i8"))
        return h.hexdigest()


def _c_strides(arr: np.ndarray) -> tuple[int, ...]:
    """The strides of a C-ordered array of ``arr``'s shape and item size (size-1 axes included)."""
    strides, step = [], arr.itemsize
    for size in reversed(arr.shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def describe(ds: ImageDataset) -> str:
    """One line: source, N images, CxHxW, K classes, counts per class."""
    c, h, w = ds.image_shape
    counts = ", ".join(f"{name}={n}" for name, n in zip(ds.classes, ds.class_counts()))
    prefix = f"{ds.source}: " if ds.source else ""
    return f"{prefix}{len(ds)} images, {c}x{h}x{w}, {ds.num_classes} classes, per class: {counts}"


def _short(items: Sequence[str], limit: int = 10) -> str:
    """Items for an error message, cut after ``limit``."""
    shown = ", ".join(repr(x) for x in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"({shown}{more})"
