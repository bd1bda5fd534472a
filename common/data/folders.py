"""Image folders ``root/<class>/*.png`` (optionally split into train/, val/, test/), from a folder or
an archive: loading one split, and :func:`save_image_folder`."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.arrays import _to_uint8
from common.data.dataset import SPLITS, DataError, ImageDataset, NoRecords
from common.data.decode import _decode_files
from common.data.tree import IMAGE_EXTENSIONS, _ImageFile, _Tree


def _dataset_root(tree: _Tree, split: str, whole: bool = False) -> tuple[str, ...]:
    """Folder (inside the tree) whose subfolders are the classes of ``split``.

    A folder with train/ and test/ subfolders (in any case), or whose only subfolders are splits (train/, val/,
    test/), holds splits: the one asked for is its folder, and one it lacks holds no records (:class:`NoRecords`);
    other folders beside the splits are ignored, with a warning. Any other folder is one split, 'train'; with
    ``whole`` it is whatever split is asked for (a folder a user gives as test data is the test data).

    The answer reads the layout as it is, so it can hang on which records are there (review s66: train/ and test/
    beside another folder became a class layout once test/ lost its last record; a lone class folder holding a
    subfolder was taken as a wrapper once the other class's last record went). A deployed site therefore resolves it
    once, when it starts, and loads that folder from then on (``load_dataset(root=...)``, ``fedsynth site``'s pins).
    """
    folder: tuple[str, ...] = ()
    # `tar czf data.tar.gz mydata/` wraps everything in one folder: look inside such wrappers. A lone folder that
    # directly holds images is a class folder, not a wrapper; nor is a lone split folder (train/ alone is a split
    # layout, below: taken as a wrapper, what was left of train/ and test/ once every test record was withdrawn made
    # the training records a site's held-out set, review s66)
    while (not tree.files(folder) and len(subs := tree.subdirs(folder)) == 1 and subs[0].lower() not in SPLITS
           and tree.subdirs(folder + (subs[0],))):
        folder = folder + (subs[0],)
    subs = tree.subdirs(folder)
    splits = {s.lower(): s for s in subs if s.lower() in SPLITS}  # (Train/ is train/ too)
    if len(splits) < sum(s.lower() in SPLITS for s in subs):  # Train/ and train/ both: which one is meant?
        raise DataError(f"{tree.where(folder)} holds splits that differ only in case "
                        f"({sorted(s for s in subs if s.lower() in SPLITS)}): merge them into one folder each")
    if ("train" in splits and "test" in splits) or (splits and len(splits) == len(subs)):
        ignored = [s for s in subs if s.lower() not in SPLITS]
        if ignored:
            warnings.warn(f"ignoring {ignored} in {tree.where(folder)}: it holds splits {sorted(splits.values())}",
                          stacklevel=4)
        if split not in splits:
            raise NoRecords(f"{tree.where(folder)} has no {split!r} split; available splits: "
                            f"{[s for s in SPLITS if s in splits]}")
        return folder + (splits[split],)
    if split != "train" and not whole:
        raise DataError(
            f"{tree.where(folder)} has no {split!r} split (no train/ and test/ subfolders, so the whole "
            f"folder is the 'train' split); pass the folder or archive holding the {split} images separately"
        )
    return folder


def _load_tree(tree: _Tree, split: str, image_size: int | None, channels: int | None,
               whole: bool = False, empty_classes: bool = False, skip_unreadable: bool = False,
               root: tuple[str, ...] | None = None) -> ImageDataset:
    """Image-folder layout: class names are the sorted subfolder names; with ``empty_classes`` a class folder
    without images is a class with no records (a site's loader: see ``load_dataset``), otherwise an error. ``root``:
    the folder :func:`_dataset_root` resolved before (a site pins it when it starts), instead of resolving it now."""
    site = root is not None or empty_classes  # a site's loader (load_dataset's empty_classes), or a pinned folder
    root = _dataset_root(tree, split, whole) if root is None else tuple(root)
    classes = tree.subdirs(root)
    if not classes and (site or not any(f.parts[:len(root)] == root for f in tree.all_files)):
        # every record withdrawn, their class folders with them (rm -r test/*, review s66): no image at or below root.
        # At a site, images lying directly in the root are no records either, whether a class folder is there or
        # not: they are ignored beside class folders (below), so they must not turn "no records" into a failure
        # (review s67: a stray preview image made the withdrawal of the last class folder fail every request, free)
        inside = len(tree.files(root))
        raise NoRecords(f"{tree.where(root)} holds no images: the dataset is empty" if not inside else
                        f"{tree.where(root)} has no class folders ({inside} images directly inside, which are no "
                        "records): put the images into one folder per class (root/<class>/image.png), or for "
                        "UTKFace pass label_from='utkface-gender', 'utkface-race' or 'utkface-age'")
    if not classes:
        raise DataError(
            f"{tree.where(root)} has no class folders ({len(tree.files(root))} images directly inside); "
            "put the images into one folder per class (root/<class>/image.png), or for UTKFace pass "
            "label_from='utkface-gender', 'utkface-race' or 'utkface-age'"
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
        if not members and not empty_classes:
            nested = ""
            if tree.subdirs(root + (name,)):
                nested = " (it holds only subfolders; images must lie directly in the class folder)"
            raise DataError(
                f"class folder {tree.where(root + (name,))} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}){nested}; add images or remove the folder"
            )
        files.extend(members)
        labels.extend([label] * len(members))
    images, kept = _decode_files(files, image_size, channels, skip_unreadable)
    return ImageDataset(images, np.array(labels, dtype=np.int64)[kept], tuple(classes),
                        source=f"{tree.origin}[{split}]")


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
