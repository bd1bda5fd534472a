"""UTKFace: flat folders or archives of face JPEGs labelled from their file names."""

from __future__ import annotations

import re
import warnings

import numpy as np

from common.data.arrays import _hashed_split
from common.data.dataset import DataError, ImageDataset, NoRecords
from common.data.decode import _decode_files
from common.data.tree import _ImageFile, _Tree

_ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "gender": ("male", "female"),
    "race": ("white", "black", "asian", "indian", "other"),
    "age": ("0-19", "20-39", "40-59", "60+"),  # age groups: seed 000's age task on faces
}
# One attribute ("utkface-gender"), or two as one joint label ("utkface-gender+race": class a * |B| + b,
# named "a_b"), which is what a generator conditioned on both attributes learns (seed 004's replacement of a
# sensitive attribute, the second one, needs it; common.attributes splits a joint label again).
LABEL_FROM_CLASSES: dict[str, tuple[str, ...]] = {
    **{f"utkface-{a}": names for a, names in _ATTRIBUTE_CLASSES.items()},
    **{f"utkface-{a}+{b}": tuple(f"{x}_{y}" for x in _ATTRIBUTE_CLASSES[a] for y in _ATTRIBUTE_CLASSES[b])
       for a in _ATTRIBUTE_CLASSES for b in _ATTRIBUTE_CLASSES if a != b},
}

SENSITIVE_ATTRIBUTES = tuple(_ATTRIBUTE_CLASSES)  # what a site may declare sensitive (seed 004)


def sensitive_attribute_problem(label_from: str, attribute: str) -> str:
    """Why records labelled by ``label_from`` cannot have ``attribute`` declared sensitive ("" = they can).

    Replacing an attribute (server.attribute_replacement) needs a generator that learned it: the joint label
    must name it second, as in ``utkface-gender+race`` for race."""
    if not attribute:
        return ""
    if attribute not in SENSITIVE_ATTRIBUTES:
        return f"sensitive attribute '{attribute}' is not one of {', '.join(SENSITIVE_ATTRIBUTES)} (or '' for none)"
    first, plus, second = label_from.removeprefix("utkface-").partition("+")
    if label_from.startswith("utkface-") and plus and second == attribute:
        return ""
    other = next(a for a in SENSITIVE_ATTRIBUTES if a != attribute)
    task = first if label_from.startswith("utkface-") and first in SENSITIVE_ATTRIBUTES and first != attribute \
        else other
    return (f"sensitive attribute '{attribute}' needs labels that name it as the second attribute, so that the "
            f"generator learns it and the synthetic set can draw it independently of everything else: set "
            f"label-from = utkface-{task}+{attribute} (got label-from = '{label_from}')")


AGE_GROUP_STARTS = (0, 20, 40, 60)  # the first age of each "utkface-age" class


def age_group(age: int) -> int:
    """The "utkface-age" class of an age in years."""
    return sum(age >= start for start in AGE_GROUP_STARTS) - 1


# --------------------------------------------------------------------------------------------
# UTKFace: labels from file names
# --------------------------------------------------------------------------------------------

_UTK_NAME = re.compile(r"^(\d+)_(\d+)_(\d+)_\d+")


def _load_utkface(
    tree: _Tree, split: str, label_from: str, image_size: int | None, channels: int | None,
    skip_unreadable: bool = False,
) -> ImageDataset:
    """Flat UTKFace JPEGs named ``age_gender_race_datetime.jpg.chip.jpg`` (any folder depth).

    Files whose name does not parse, or whose gender is not 0/1 or race not 0..4, are skipped
    with one warning (the public UTKFace release has a few such files). The train/test split (80/20) puts
    each face on its side by a hash of its file name alone (``_hashed_split``), so it is the same whichever
    label is chosen, and adding or removing a face moves no other face between the two.
    """
    if split not in ("train", "test"):
        raise DataError(f"UTKFace ({tree.origin}) has only the splits 'train' and 'test', not {split!r}")
    kept: list[_ImageFile] = []
    genders: list[int] = []
    races: list[int] = []
    ages: list[int] = []
    malformed: list[str] = []
    for f in tree.all_files:
        m = _UTK_NAME.match(f.parts[-1])
        if m is None or int(m.group(2)) > 1 or int(m.group(3)) > 4:
            malformed.append(f.parts[-1])
            continue
        kept.append(f)
        genders.append(int(m.group(2)))
        races.append(int(m.group(3)))
        ages.append(age_group(int(m.group(1))))
    if not kept:  # (no file at all, or none named as a face: no records either way; review s66)
        raise NoRecords(
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
    idx = _hashed_split([f.parts[-1] for f in kept], split)  # a face's side is decided by its own file name
    if idx.size == 0:
        raise NoRecords(
            f"the {split!r} split of the {len(kept)} UTKFace images in {tree.origin} is empty (each image goes to "
            "'test' with probability 20 %, decided by its file name); use more images"
        )
    by_name = {"gender": gender, "race": race, "age": np.array(ages, dtype=np.int64)}
    first, _, second = label_from.removeprefix("utkface-").partition("+")
    labels = by_name[first] if not second else by_name[first] * len(_ATTRIBUTE_CLASSES[second]) + by_name[second]
    images, decoded = _decode_files([kept[i] for i in idx], image_size, channels, skip_unreadable)
    labels = labels[idx][decoded]
    source = f"{tree.origin}[{split},{label_from}]"
    return ImageDataset(images, labels, LABEL_FROM_CLASSES[label_from], source=source)


def joint_attribute_values(classes: tuple[str, ...] | list[str], source: str = "the data"
                           ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The two attributes' values of joint classes ("a_b", every pair, a-major), or a DataError saying why not."""
    pairs = [name.split("_") for name in classes]
    if any(len(p) != 2 for p in pairs):
        raise DataError(f"{source}: classes {list(classes)} are not joint labels 'a_b' "
                        "(load the data with label_from='utkface-A+B')")
    first = tuple(dict.fromkeys(p[0] for p in pairs))
    second = tuple(dict.fromkeys(p[1] for p in pairs))
    if [f"{a}_{b}" for a in first for b in second] != list(classes):
        raise DataError(f"{source}: classes {list(classes)} are not every 'a_b' pair in a-major order")
    return first, second


def split_joint_labels(ds: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """A joint-label dataset (classes "a_b", class = a * |B| + b) as two datasets of the same images: one
    labelled with the first attribute, one with the second (the attribute-level evaluation's view)."""
    first, second = joint_attribute_values(ds.classes, ds.source)
    labels = np.asarray(ds.labels)
    return (ImageDataset(ds.images, labels // len(second), first, source=f"{ds.source}[first attribute]"),
            ImageDataset(ds.images, labels % len(second), second, source=f"{ds.source}[second attribute]"))
