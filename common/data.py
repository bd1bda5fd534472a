"""Loading, validating and saving labelled image datasets.

Every supported source becomes one in-memory :class:`ImageDataset` with images shaped
(N, C, H, W), float32 in [0, 1], and labels (N,) int64. Sources (see :func:`load_dataset`):

* ``"digits"``: scikit-learn's bundled 8x8 digits (works on any fresh install);
* a folder with MNIST IDX files (gzip or plain);
* a ``.npz`` file in the MedMNIST layout (also what :func:`save_npz` writes);
* an image folder ``root/<class>/*.png|jpg|jpeg|bmp``, optionally split into ``root/train``,
  ``root/test`` (and ``root/val``);
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of such a folder tree, read without extracting;
* UTKFace folders or archives, labelled from the file names (``label_from="utkface-..."``).

Anything wrong with the input raises :class:`DataError` whose message names the file and says
what to do, because site operators see these messages before they can join a federation.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import warnings
import zipfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
from PIL import Image

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
LABEL_FROM_CLASSES: dict[str, tuple[str, ...]] = {
    "utkface-gender": ("male", "female"),
    "utkface-race": ("white", "black", "asian", "indian", "other"),
}
# Sources without an official split (digits, UTKFace) get a deterministic stratified one.
TEST_FRACTION = 0.2
SPLIT_SEED = 0

_SUPPORTED = (
    "'digits', a folder of MNIST IDX files, a MedMNIST-style .npz file, an image folder "
    "root/<class>/*.png|jpg|jpeg|bmp, or a .tar.gz/.tgz/.tar archive of such a folder"
)


class DataError(ValueError):
    """Bad input data; the message says what is wrong and what to do."""


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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_dataset(
    source: str | Path,
    split: str = "train",
    *,
    image_size: int | None = None,
    channels: int | None = None,
    label_from: str | None = None,
) -> ImageDataset:
    """Load one split of a labelled image dataset.

    Args:
        source: ``"digits"`` (scikit-learn, wins over a path of that name), a folder of MNIST IDX
            files, a MedMNIST-style ``.npz``, an image folder ``root/<class>/*.png``, or a
            ``.tar.gz``/``.tgz``/``.tar`` archive of such a folder.
        split: ``"train"``, ``"val"`` or ``"test"``; which ones exist depends on the source.
            digits and UTKFace get a deterministic stratified 80/20 train/test split (seed 0).
        image_size: resize every image to image_size x image_size (bilinear, antialiased).
            Without it, images of different sizes are an error.
        channels: 1 (grayscale) or 3 (RGB). Default: 1 if every image is grayscale, else 3.
        label_from: ``"utkface-gender"`` or ``"utkface-race"``: label flat UTKFace JPEGs
            (folder or archive) from their ``age_gender_race_datetime`` file names. Files with
            malformed names are skipped with a warning.

    Returns:
        The split as an :class:`ImageDataset`, ordered deterministically (by class, then file
        name, for folders and archives).

    Raises:
        DataError: missing path, unsupported format, corrupt file, bad labels, missing split, ...
    """
    if split not in SPLITS:
        raise DataError(f"unsupported split {split!r}; use one of {SPLITS}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer or None, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 (grayscale), 3 (RGB) or None (automatic), got {channels!r}")
    if label_from is not None and label_from not in LABEL_FROM_CLASSES:
        raise DataError(
            f"unknown label_from {label_from!r}; use one of {sorted(LABEL_FROM_CLASSES)} or None "
            "(labels from class folder names)"
        )

    if isinstance(source, str) and source == "digits":
        if label_from is not None:
            raise DataError("label_from only applies to UTKFace folders or archives, not to 'digits'")
        return _load_digits(split, image_size, channels)

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"no such file or folder: {path}; pass {_SUPPORTED}")
    is_archive = path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)
    if label_from is not None:
        if not (path.is_dir() or is_archive):
            raise DataError(
                f"label_from={label_from!r} needs a folder or a .tar.gz archive of UTKFace JPEGs, got {path}"
            )
        tree = _scan_archive(path) if is_archive else _scan_folder(path)
        return _load_utkface(tree, split, label_from, image_size, channels)
    if is_archive:
        return _load_tree(_scan_archive(path), split, image_size, channels)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _load_npz(path, split, image_size, channels)
        if _IDX_NAME.search(path.name):
            raise DataError(f"{path} is a single MNIST IDX file; pass the folder that holds all four IDX files")
        raise DataError(f"{path} is not a supported format; pass {_SUPPORTED}")
    if path.is_dir():
        if any(_IDX_NAME.search(p.name) for p in path.iterdir()):
            return _load_idx_folder(path, split, image_size, channels)
        return _load_tree(_scan_folder(path), split, image_size, channels)
    raise DataError(f"{path} is neither a regular file nor a folder; pass {_SUPPORTED}")


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


# --------------------------------------------------------------------------------------------
# MNIST IDX
# --------------------------------------------------------------------------------------------

_IDX_NAME = re.compile(r"^(train|t10k)-(images|labels)[.-]idx[13]-ubyte(\.gz)?$")
_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # ubyte data, 3 dims / 1 dim
_IDX_PREFIX = {"train": "train", "test": "t10k"}


def _find_idx_file(folder: Path, prefix: str, kind: str) -> Path:
    """Locate e.g. train-images-idx3-ubyte(.gz) (or the train-images.idx3-ubyte spelling)."""
    ndim = 3 if kind == "images" else 1
    for sep in ("-", "."):
        for ext in (".gz", ""):
            candidate = folder / f"{prefix}-{kind}{sep}idx{ndim}-ubyte{ext}"
            if candidate.is_file():
                return candidate
    present = sorted(p.name for p in folder.iterdir() if _IDX_NAME.search(p.name))
    raise DataError(
        f"{folder} has no {prefix}-{kind}-idx{ndim}-ubyte[.gz]; IDX files present: {present}. "
        "Put all four MNIST IDX files (train/t10k images and labels) into the folder"
    )


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse one IDX file (gzip or plain) into a uint8 array, validating header and size."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic; decide by content, not by the file name
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}; the file is corrupt, re-download it") from exc
    expected = _IDX_MAGIC[kind]
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected:
        found = "a file shorter than 4 bytes" if magic is None else f"magic number {magic} (0x{magic:08x})"
        raise DataError(
            f"{path} is not an IDX {kind} file: found {found}, expected {expected} (0x{expected:08x}); "
            "the file is corrupt or not what its name says: re-download it"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; re-download it")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    n_bytes = int(np.prod(dims))
    if len(raw) - header != n_bytes:
        raise DataError(
            f"{path}: header says dims {dims} = {n_bytes} data bytes but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_idx_folder(folder: Path, split: str, image_size: int | None, channels: int | None) -> ImageDataset:
    """MNIST-format folder: train-* for split 'train', t10k-* for split 'test'."""
    if split not in _IDX_PREFIX:
        raise DataError(f"MNIST IDX folder {folder} has only the splits 'train' and 'test' (t10k), not {split!r}")
    prefix = _IDX_PREFIX[split]
    images = _read_idx(_find_idx_file(folder, prefix, "images"), "images")  # (N, H, W) uint8
    labels = _read_idx(_find_idx_file(folder, prefix, "labels"), "labels").astype(np.int64)  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{folder}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels; "
            "the files belong to different datasets, re-download them"
        )
    if images.shape[0] == 0:
        raise DataError(f"{folder}: the {prefix} IDX files hold no images")
    num_classes = max(10, int(labels.max()) + 1)
    classes = tuple(str(i) for i in range(num_classes))
    data = _adapt(_uint8_to_float(images), channels, image_size)
    return ImageDataset(data, labels, classes, source=f"{folder}[{split}]")


# --------------------------------------------------------------------------------------------
# npz (MedMNIST layout; also fedsynth's own output)
# --------------------------------------------------------------------------------------------

_NPZ_LAYOUT = (
    "expected the MedMNIST layout: '<split>_images' uint8 (N, H, W) or (N, H, W, C) and "
    "'<split>_labels' (N, 1) or (N,), optionally 'classes' (names)"
)


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


def _load_npz(path: Path, split: str, image_size: int | None, channels: int | None) -> ImageDataset:
    """One split of an npz file with '<split>_images' / '<split>_labels' (+ optional 'classes')."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}; the file is corrupt or not an npz archive") from exc
    with npz:
        keys = sorted(npz.files)
        img_key, lab_key = f"{split}_images", f"{split}_labels"
        missing = [k for k in (img_key, lab_key) if k not in keys]
        if missing:
            raise DataError(f"{path} lacks {missing} for split {split!r}; keys present: {keys}; {_NPZ_LAYOUT}")
        try:
            images = npz[img_key]
            labels = _npz_labels(path, lab_key, npz[lab_key])
            # Class count from every split's labels, so train/val/test agree on it.
            all_labels = [_npz_labels(path, k, npz[k]) for k in keys if k.endswith("_labels")]
            names = npz["classes"] if "classes" in keys else None
        except ValueError as exc:  # object arrays need pickle, which we never enable
            if isinstance(exc, DataError):
                raise
            raise DataError(f"cannot read {path}: {exc}; store plain numeric/string arrays") from exc
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DataError(f"{path}: '{img_key}' has dtype {images.dtype} shape {images.shape}; {_NPZ_LAYOUT}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{path}: '{img_key}' has {images.shape[0]} images but '{lab_key}' has {labels.shape[0]} "
            "labels; they must match one to one"
        )
    if images.shape[0] == 0:
        raise DataError(f"{path}: split {split!r} holds no images")
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise DataError(f"{path}: 'classes' must be a 1-D array of strings, got {names.dtype} {names.shape}")
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    else:
        top = max((int(a.max()) for a in all_labels if a.size), default=0)
        classes = tuple(str(i) for i in range(top + 1))
    data = _adapt(_uint8_to_float(images), channels, image_size)
    return ImageDataset(data, labels, classes, source=f"{path}[{split}]")


def save_npz(ds: ImageDataset, path: Path) -> None:
    """Write ``ds`` as npz in the MedMNIST layout, readable by :func:`load_dataset`.

    Keys: ``train_images`` uint8 (N, H, W) for grayscale or (N, H, W, C); ``train_labels``
    int64 (N, 1); ``classes`` (K,) strings. Pixels are quantized to 8 bits (error <= 1/510).
    The file is written to a temporary name and renamed, so a crash leaves no partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:  # a file handle stops numpy from appending ".npz"
            np.savez_compressed(
                fh,
                train_images=_to_uint8(ds.images),
                train_labels=ds.labels.reshape(-1, 1),
                classes=np.array(ds.classes, dtype=str),
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Image folders and archives: a common file tree
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageFile:
    parts: tuple[str, ...]  # path relative to the tree root; the last part is the file name
    name: str  # how error messages name the file
    data: bytes | Path  # member bytes (archive) or file path (folder)


def _hidden(part: str) -> bool:
    """Skip dot-files/folders (also '..') and macOS archive debris."""
    return part.startswith(".") or part == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _Tree:
    """Image files of a folder or archive, indexed by parent folder (paths as part tuples)."""

    def __init__(self, origin: str, files: list[_ImageFile], dirs: list[tuple[str, ...]]) -> None:
        self.origin = origin
        self._files: dict[tuple[str, ...], list[_ImageFile]] = defaultdict(list)
        self._subdirs: dict[tuple[str, ...], set[str]] = defaultdict(set)
        all_dirs = set(dirs)
        for f in files:
            self._files[f.parts[:-1]].append(f)
            all_dirs.update(f.parts[:i] for i in range(1, len(f.parts)))
        for d in all_dirs:
            self._subdirs[d[:-1]].add(d[-1])
        self.all_files = sorted(files, key=lambda f: f.parts)

    def files(self, folder: tuple[str, ...]) -> list[_ImageFile]:
        """Image files directly in ``folder``, sorted by name."""
        return sorted(self._files.get(folder, []), key=lambda f: f.parts[-1])

    def subdirs(self, folder: tuple[str, ...]) -> list[str]:
        """Names of the folders directly in ``folder``, sorted."""
        return sorted(self._subdirs.get(folder, ()))

    def where(self, folder: tuple[str, ...]) -> str:
        """Human-readable location of ``folder``."""
        return self.origin if not folder else f"{self.origin}/{'/'.join(folder)}"


def _scan_folder(root: Path) -> _Tree:
    """List the image files under ``root`` (recursively, following links, skipping hidden ones)."""

    def fail(exc: OSError) -> None:
        raise DataError(f"cannot read folder {exc.filename}: {exc.strerror}; check its permissions") from exc

    files: list[_ImageFile] = []
    dirs: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: do not walk the same folder twice
            dirnames[:] = []
            continue
        seen.add(real)
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        dirs.extend(rel + (d,) for d in dirnames)
        for fn in filenames:
            if not _hidden(fn) and _is_image_name(fn):
                full = Path(dirpath, fn)
                files.append(_ImageFile(rel + (fn,), str(full), full))
    return _Tree(str(root), files, dirs)


def _scan_archive(path: Path) -> _Tree:
    """Read every image member of a tar(.gz) archive into memory, in one streaming pass.

    Streaming (``r|*``) decompresses the archive once; random access into a gzip stream would
    decompress it again for each member. Compressed image bytes are small (CIFAR-10: ~20 MB).
    """
    files: list[_ImageFile] = []
    dirs: list[tuple[str, ...]] = []
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in ("/", "."))
                if not parts or any(_hidden(p) for p in parts):
                    continue
                if member.isdir():
                    dirs.append(parts)
                elif member.isfile() and _is_image_name(parts[-1]):
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    files.append(_ImageFile(parts, f"{'/'.join(parts)} in {path}", data))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read archive {path}: {exc}; the file is corrupt or not a tar/tar.gz archive"
        ) from exc
    return _Tree(str(path), files, dirs)


def _dataset_root(tree: _Tree, split: str) -> tuple[str, ...]:
    """Folder (inside the tree) whose subfolders are the classes of ``split``."""
    folder: tuple[str, ...] = ()
    # `tar czf data.tar.gz mydata/` wraps everything in one folder: look inside such wrappers.
    # A lone folder that directly holds images is a class folder, not a wrapper.
    while not tree.files(folder) and len(subs := tree.subdirs(folder)) == 1 and tree.subdirs(folder + (subs[0],)):
        folder = folder + (subs[0],)
    subs = tree.subdirs(folder)
    if "train" in subs and "test" in subs:
        available = [s for s in SPLITS if s in subs]
        if split not in available:
            raise DataError(f"{tree.where(folder)} has no {split!r} split; available splits: {available}")
        return folder + (split,)
    if split != "train":
        raise DataError(
            f"{tree.where(folder)} has no {split!r} split (no train/ and test/ subfolders, so the whole "
            f"folder is the 'train' split); pass the folder or archive holding the {split} images separately"
        )
    return folder


def _load_tree(tree: _Tree, split: str, image_size: int | None, channels: int | None) -> ImageDataset:
    """Image-folder layout: class names are the sorted subfolder names."""
    root = _dataset_root(tree, split)
    classes = tree.subdirs(root)
    if not classes:
        raise DataError(
            f"{tree.where(root)} has no class folders ({len(tree.files(root))} images directly inside); "
            "put the images into one folder per class (root/<class>/image.png), or for UTKFace pass "
            "label_from='utkface-gender' or 'utkface-race'"
        )
    stray = tree.files(root)
    if stray:
        warnings.warn(
            f"ignoring {len(stray)} images directly in {tree.where(root)} (e.g. {stray[0].parts[-1]}): "
            "only images inside class folders are loaded",
            stacklevel=3,
        )
    files: list[_ImageFile] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        members = tree.files(root + (name,))
        if not members:
            nested = ""
            if tree.subdirs(root + (name,)):
                nested = " (it holds only subfolders; images must lie directly in the class folder)"
            raise DataError(
                f"class folder {tree.where(root + (name,))} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}){nested}; add images or remove the folder"
            )
        files.extend(members)
        labels.extend([label] * len(members))
    images = _decode_files(files, image_size, channels)
    return ImageDataset(images, np.array(labels, dtype=np.int64), tuple(classes), source=f"{tree.origin}[{split}]")


# --------------------------------------------------------------------------------------------
# UTKFace: labels from file names
# --------------------------------------------------------------------------------------------

_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_\d+")


def _load_utkface(
    tree: _Tree, split: str, label_from: str, image_size: int | None, channels: int | None
) -> ImageDataset:
    """Flat UTKFace JPEGs named ``age_gender_race_datetime.jpg.chip.jpg`` (any folder depth).

    Files whose name does not parse, or whose gender is not 0/1 or race not 0..4, are skipped
    with one warning (the public UTKFace release has a few such files). The train/test split is
    stratified on (gender, race) so it is the same whichever label is chosen.
    """
    if split not in ("train", "test"):
        raise DataError(f"UTKFace ({tree.origin}) has only the splits 'train' and 'test', not {split!r}")
    kept: list[_ImageFile] = []
    genders: list[int] = []
    races: list[int] = []
    malformed: list[str] = []
    for f in tree.all_files:
        m = _UTK_NAME.match(f.parts[-1])
        if m is None or int(m.group(2)) > 1 or int(m.group(3)) > 4:
            malformed.append(f.parts[-1])
            continue
        kept.append(f)
        genders.append(int(m.group(2)))
        races.append(int(m.group(3)))
    if not kept:
        raise DataError(
            f"{tree.origin} holds no UTKFace images named age_gender_race_datetime.jpg.chip.jpg "
            f"({len(malformed)} other images, e.g. {malformed[:3]}); check the source or drop label_from"
        )
    if malformed:
        warnings.warn(
            f"skipped {len(malformed)} files in {tree.origin} whose names are not "
            f"age_gender(0/1)_race(0-4)_datetime.jpg: {malformed[:3]}",
            stacklevel=3,
        )
    gender, race = np.array(genders, dtype=np.int64), np.array(races, dtype=np.int64)
    idx = _stratified_split(gender * 5 + race, split)
    if idx.size == 0:
        raise DataError(
            f"the {split!r} split of the {len(kept)} UTKFace images in {tree.origin} is empty: each "
            "(gender, race) group is too small for a 20 % test share; use more images"
        )
    labels = (gender if label_from == "utkface-gender" else race)[idx]
    images = _decode_files([kept[i] for i in idx], image_size, channels)
    source = f"{tree.origin}[{split},{label_from}]"
    return ImageDataset(images, labels, LABEL_FROM_CLASSES[label_from], source=source)


# --------------------------------------------------------------------------------------------
# Decoding image files
# --------------------------------------------------------------------------------------------

_GRAY_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_l_or_rgb(img: Image.Image, channels: int | None) -> Image.Image:
    """Convert any PIL mode to 'L' or 'RGB' (alpha dropped); force ``channels`` if given."""
    mode = img.mode
    if mode in _GRAY_16BIT:
        # 16-bit grayscale PNG: scale 0..65535 to 0..255 (PIL's own convert would clip instead).
        wide = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    elif mode in ("1", "L", "LA", "F"):
        img = img.convert("L")
    elif mode in ("P", "PA"):
        rgb = img.convert("RGB")
        a = np.asarray(rgb)
        # A palette of grays is a grayscale image for the automatic channel choice.
        is_gray = bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())
        img = Image.fromarray(np.ascontiguousarray(a[..., 0])) if is_gray else rgb
    elif mode != "RGB":
        img = img.convert("RGB")  # RGBA, CMYK, YCbCr, ...
    if channels == 1 and img.mode == "RGB":
        img = img.convert("L")
    elif channels == 3 and img.mode == "L":
        img = img.convert("RGB")
    return img


def _decode_image(f: _ImageFile, image_size: int | None, channels: int | None) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode one file -> (uint8 (H, W) or (H, W, 3), original (width, height))."""
    try:
        with Image.open(io.BytesIO(f.data) if isinstance(f.data, bytes) else f.data) as img:
            size = img.size
            out = _to_l_or_rgb(img, channels)
            if image_size is not None and out.size != (image_size, image_size):
                # PIL's bilinear resize widens its kernel when shrinking, i.e. it antialiases.
                out = out.resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(out), size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot decode image {f.name}: {exc}; the file is corrupt or not an image: replace or delete it"
        ) from exc


def _decode_files(files: Sequence[_ImageFile], image_size: int | None, channels: int | None) -> np.ndarray:
    """Decode files into (N, C, H, W) float32 in [0, 1], checking that sizes agree."""
    if not files:
        raise DataError("no images to load: the dataset (or this split of it) is empty")
    arrays: list[np.ndarray] = []
    first_name, first_size = "", (0, 0)
    for f in files:
        arr, size = _decode_image(f, image_size, channels)
        if image_size is None:
            if not arrays:
                first_name, first_size = f.name, size
            elif size != first_size:
                raise DataError(
                    f"images have different sizes: {first_name} is {first_size[0]}x{first_size[1]} but "
                    f"{f.name} is {size[0]}x{size[1]}; pass image_size (e.g. image_size=32) to resize "
                    "every image to the same square size"
                )
        arrays.append(arr)
    c = channels or (3 if any(a.ndim == 3 for a in arrays) else 1)
    h, w = arrays[0].shape[:2]
    out = np.empty((len(arrays), c, h, w), dtype=np.float32)
    for i, a in enumerate(arrays):
        # (H, W, 3) -> (3, H, W); a grayscale (H, W) broadcasts over the channels, which is
        # what PIL's L -> RGB conversion does too.
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a
    return np.divide(out, 255.0, out=out)


# --------------------------------------------------------------------------------------------
# Writing an image folder
# --------------------------------------------------------------------------------------------


def _check_folder_name(name: str) -> None:
    if not name or name.startswith(".") or any(ch in name for ch in "/\\\0"):
        raise DataError(
            f"class name {name!r} cannot be a folder name (empty, starts with '.', or contains a "
            "path separator); rename the class before saving an image folder"
        )


def save_image_folder(ds: ImageDataset, root: Path) -> None:
    """Write ``ds`` as PNGs ``root/<class name>/<index>.png`` that a person can open.

    ``index`` is the record's position in ``ds``, zero-padded to at least 5 digits, so
    :func:`load_dataset` reads the images back grouped by class, in the original order within
    each class. Every class gets a folder, even one without images (which the loader then reports
    as an empty class folder). ``root`` must not exist or be empty; the tree is written to a
    hidden sibling folder first and renamed, so a crash never leaves a half-written ``root``.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} already exists and is not an empty folder; choose a new folder or delete it")
    for name in ds.classes:
        _check_folder_name(name)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left over by an earlier crash of a process with our pid
    tmp.mkdir(parents=True)
    try:
        for name in ds.classes:
            (tmp / name).mkdir()
        width = max(5, len(str(max(len(ds) - 1, 0))))
        pixels = _to_uint8(ds.images)  # (N, H, W) or (N, H, W, 3)
        for i, label in enumerate(ds.labels.tolist()):
            Image.fromarray(pixels[i]).save(tmp / ds.classes[label] / f"{i:0{width}d}.png")
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
