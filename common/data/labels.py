"""UTKFace: flat folders or archives of face JPEGs labelled from their file names."""

from __future__ import annotations

import re
import warnings

import numpy as np

from common.data.arrays import _stratified_split
from common.data.dataset import DataError, ImageDataset
from common.data.decode import _decode_files
from common.data.tree import _ImageFile, _Tree

LABEL_FROM_CLASSES: dict[str, tuple[str, ...]] = {
    "utkface-gender": ("male", "female"),
    "utkface-race": ("white", "black", "asian", "indian", "other"),
}


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
