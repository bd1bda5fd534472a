"""``.npz`` files in the MedMNIST layout (or Keras's ``x_train``/``y_train``): one split, and :func:`save_npz`."""

from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np

from common.data.arrays import _adapt, _to_uint8, _uint8_to_float
from common.data.dataset import DataError, ImageDataset, NoRecords
from common.files import atomic_write_bytes

# --------------------------------------------------------------------------------------------
# npz (MedMNIST layout; also fedsynth's own output)
# --------------------------------------------------------------------------------------------

_NPZ_LAYOUT = (
    "expected the MedMNIST layout: '<split>_images' uint8 (N, H, W) or (N, H, W, C) and "
    "'<split>_labels' (N, 1) or (N,), optionally 'classes' (names); or Keras's: 'x_<split>' and 'y_<split>'"
)


def _npz_keys(keys: list[str], split: str) -> tuple[str, str]:
    """(images key, labels key) of ``split``: MedMNIST's '<split>_images'/'<split>_labels', else Keras's
    'x_<split>'/'y_<split>' (how keras.datasets ships mnist.npz) when the file has those and not the first."""
    medmnist = (f"{split}_images", f"{split}_labels")
    keras = (f"x_{split}", f"y_{split}")
    if not any(k in keys for k in medmnist) and all(k in keys for k in keras):
        return keras
    return medmnist


def _npz_labels(path: Path, key: str, arr: np.ndarray) -> np.ndarray:
    """Validate one labels array: (N,) or (N, 1) integers -> (N,) int64."""
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise DataError(
            f"{path}: '{key}' has shape {arr.shape}; only one class label per image is supported "
            "((N,) or (N, 1)), multi-label datasets are not"
        )
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: '{key}' has dtype {arr.dtype}; class labels must be integers")
    return arr.astype(np.int64)


def _load_npz(path: Path, split: str, image_size: int | None, channels: int | None,
              skip_unreadable: bool = False) -> ImageDataset:
    """One split of an npz file with '<split>_images' / '<split>_labels' (+ optional 'classes'); with
    ``skip_unreadable`` (a site's loader) a record labelled outside the named classes is left out with a warning."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}; the file is corrupt or not an npz archive") from exc
    with npz:
        keys = sorted(npz.files)
        img_key, lab_key = _npz_keys(keys, split)
        missing = [k for k in (img_key, lab_key) if k not in keys]
        if missing:  # (no records of the split: an exporter may leave an empty split's keys out; review s66)
            raise NoRecords(f"{path} lacks {missing} for split {split!r}; keys present: {keys}; {_NPZ_LAYOUT}")
        try:
            images = npz[img_key]
            labels = _npz_labels(path, lab_key, npz[lab_key])
            # Class count from every split's labels, so train/val/test agree on it.
            label_keys = [k for k in keys if k.endswith("_labels") or (lab_key.startswith("y_") and k.startswith("y_"))]
            all_labels = [_npz_labels(path, k, npz[k]) for k in label_keys]
            names = npz["classes"] if "classes" in keys else None
        except ValueError as exc:  # object arrays need pickle, which we never enable
            if isinstance(exc, DataError):
                raise
            raise DataError(f"cannot read {path}: {exc}; store plain numeric/string arrays") from exc
    if images.ndim >= 1 and images.shape[0] == 0 == labels.shape[0]:  # before the layout check: np.array([]) is an
        # empty split too, of dtype float64 and shape (0,) (review s66: it failed as a bad layout, free, at a site)
        raise NoRecords(f"{path}: split {split!r} holds no images")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"{path}: '{img_key}' has dtype {images.dtype} shape {images.shape}; {_NPZ_LAYOUT}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: '{img_key}' has {images.shape[0]} images but '{lab_key}' has {labels.shape[0]} "
            "labels; they must match one to one"
        )
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{path}: 'classes' must be a 1-D array of strings, got {names.dtype} {names.shape}")
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    else:
        top = max((int(a.max()) for a in all_labels if a.size), default=0)
        classes = tuple(str(i) for i in range(top + 1))
    if skip_unreadable:
        # one such record made the whole file fail, so every request failed before any charge (review s59)
        keep = (labels >= 0) & (labels < len(classes))
        if not keep.all():
            warnings.warn(f"{path}: skipped {int((~keep).sum())} records of split {split!r} labelled outside its "
                          f"{len(classes)} classes", stacklevel=3)
            images, labels = images[keep], labels[keep]
            if not len(labels):
                raise NoRecords(f"{path}: split {split!r} holds no records labelled in its classes")
    data = _adapt(_uint8_to_float(images), channels, image_size)
    return ImageDataset(data, labels, classes, source=f"{path}[{split}]")


def save_npz(ds: ImageDataset, path: Path) -> None:
    """Write ``ds`` as npz in the MedMNIST layout, readable by :func:`load_dataset`.

    Keys: ``train_images`` uint8 (N, H, W) for grayscale or (N, H, W, C); ``train_labels``
    int64 (N, 1); ``classes`` (K,) strings. Pixels are quantized to 8 bits (error <= 1/510).
    Written atomically (``common.files``), so a crash leaves no partial file.
    """
    buffer = io.BytesIO()  # a file object also stops numpy from appending ".npz" to the name
    np.savez_compressed(buffer, train_images=_to_uint8(ds.images), train_labels=ds.labels.reshape(-1, 1),
                        classes=np.array(ds.classes, dtype=str))
    atomic_write_bytes(Path(path), buffer.getvalue())
