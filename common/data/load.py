"""The entry point :func:`load_dataset`: checks its arguments and dispatches on the kind of source."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from common.data.dataset import SPLITS, DataError, ImageDataset
from common.data.digits import _load_digits
from common.data.folders import _dataset_root, _load_tree
from common.data.idx import _IDX_NAME, _load_idx_folder
from common.data.labels import LABEL_FROM_CLASSES, _load_utkface
from common.data.npz import _load_npz
from common.data.tree import ARCHIVE_SUFFIXES, _scan_archive, _scan_folder, _Tree

_SUPPORTED = (
    "'digits', a folder of MNIST IDX files, a MedMNIST- or Keras-style .npz file, an image folder "
    "root/<class>/*.png|jpg|jpeg|bmp, or a .tar.gz/.tgz/.tar archive of such a folder"
)


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
    whole: bool = False,
    empty_classes: bool = False,
    skip_unreadable: bool = False,
    root: Sequence[str] | None = None,
) -> ImageDataset:
    """Load one split of a labelled image dataset.

    Args:
        source: ``"digits"`` (scikit-learn, wins over a path of that name), a folder of MNIST IDX
            files, a MedMNIST-style ``.npz``, an image folder ``root/<class>/*.png``, or a
            ``.tar.gz``/``.tgz``/``.tar`` archive of such a folder.
        split: ``"train"``, ``"val"`` or ``"test"``; which ones exist depends on the source.
            digits get a deterministic stratified 80/20 train/test split (seed 0), UTKFace an 80/20 one that
            puts each face on its side by a hash of its file name alone (adding a face moves no other).
        image_size: resize every image to image_size x image_size (bilinear, antialiased).
            Without it, images of different sizes are an error.
        channels: 1 (grayscale) or 3 (RGB). Default: 1 if every image is grayscale, else 3.
        label_from: ``"utkface-gender"``, ``"utkface-race"`` or ``"utkface-age"`` (groups 0-19, 20-39,
            40-59, 60+): label flat UTKFace JPEGs (folder or archive) from their ``age_gender_race_datetime`` file names. Files with
            malformed names are skipped with a warning.
        whole: an image folder or archive without train/ and test/ subfolders is then the requested
            split as a whole (what a user means by "--test FOLDER"); otherwise it is only 'train'.
        empty_classes: a class folder without images is a class with no records, not an error. A site loads its
            data so: at a running site whose operator emptied a class folder, an error would make every request
            fail, ``query.info`` included, which would tell anyone that the class has no record now (review s58);
            its published classes stay the folder names either way.
        skip_unreadable: an image file that does not decode (an incomplete copy, a corrupt file, one past PIL's
            pixel warning), or an npz record labelled outside its named classes, is left out with a warning instead
            of an error. A site loads its data so: one such file made every request fail, ``query.info`` included,
            which told anyone that a record was being added (review s59).
        root: for an image folder or archive, the folder inside it that holds the split's class folders, as
            :func:`dataset_root` resolved it before (a site pins it when it starts: which folder the layout rules
            pick can hang on which records are there, review s66); ignored for other sources.

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
        return _load_utkface(tree, split, label_from, image_size, channels, skip_unreadable)
    if (tree := _class_tree(path)) is not None:
        return _load_tree(tree, split, image_size, channels, whole, empty_classes, skip_unreadable, root)
    if path.is_file():
        if path.suffix.lower() == ".npz":
            return _load_npz(path, split, image_size, channels, skip_unreadable)
        if _IDX_NAME.search(path.name):
            raise DataError(f"{path} is a single MNIST IDX file; pass the folder that holds all four IDX files")
        raise DataError(f"{path} is not a supported format; pass {_SUPPORTED}")
    if path.is_dir():  # (a folder that is not a class-folder tree: _class_tree)
        return _load_idx_folder(path, split, image_size, channels)
    raise DataError(f"{path} is neither a regular file nor a folder; pass {_SUPPORTED}")


def dataset_root(source: str | Path, split: str = "train", *, whole: bool = False,
                 label_from: str | None = None) -> list[str] | None:
    """The folder inside an image folder or archive that holds ``split``'s class folders, as :func:`load_dataset`
    resolves it now (its parts; [] = the top), for a site to pin; None for a source without such a layout (digits,
    an npz, MNIST IDX files, UTKFace labels from file names). Decodes no image (an archive is still read through)."""
    if label_from is not None or (isinstance(source, str) and source == "digits"):
        return None
    tree = _class_tree(Path(source).expanduser())
    return None if tree is None else list(_dataset_root(tree, split, whole))


def _class_tree(path: Path) -> _Tree | None:
    """The tree of an image-folder source -- a tar(.gz) archive, or a folder that holds no MNIST IDX file -- or None
    for any other source (the one test :func:`load_dataset` and :func:`dataset_root` both dispatch on)."""
    if path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES):
        return _scan_archive(path)
    if path.is_dir() and not any(_IDX_NAME.search(p.name) for p in path.iterdir()):
        return _scan_folder(path)
    return None


def looks_like_dataset(path: str | Path) -> bool:
    """Whether :func:`load_dataset` would read ``path`` as a dataset, judged by its layout alone (no image is
    read): an npz or tar(.gz) file, or a folder of MNIST IDX files or of class folders."""
    path = Path(path)
    if path.is_file():
        return path.name.lower().endswith((".npz", *ARCHIVE_SUFFIXES))
    if not path.is_dir():
        return False
    children = list(path.iterdir())
    return any(_IDX_NAME.search(c.name) for c in children) or any(c.is_dir() for c in children)
