"""Loading, validating and saving labelled image datasets.

Every supported source becomes one in-memory :class:`ImageDataset` with images shaped
(N, C, H, W), float32 in [0, 1], and labels (N,) int64. Sources (see :func:`load_dataset`):

* ``"digits"``: scikit-learn's bundled 8x8 digits (works on any fresh install);
* a folder with MNIST IDX files (gzip or plain);
* a ``.npz`` file in the MedMNIST layout (also what :func:`save_npz` writes) or Keras's (``x_train``, ``y_train``, ...);
* an image folder ``root/<class>/*.png|jpg|jpeg|bmp``, optionally split into ``root/train``,
  ``root/test`` (and ``root/val``);
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive of such a folder tree, read without extracting;
* UTKFace folders or archives, labelled from the file names (``label_from="utkface-..."``).

Anything wrong with the input raises :class:`DataError` whose message names the file and says
what to do, because site operators see these messages before they can join a federation.

Modules (everything public is re-exported here, so ``from common.data import X`` is the way in):

* ``dataset``: :class:`ImageDataset`, :class:`DataError`, :func:`describe`, ``SPLITS``;
* ``load``: :func:`load_dataset`, which checks its arguments and picks the reader below, and
  :func:`looks_like_dataset`;
* ``arrays``: shared array helpers (channels, resizing, uint8 <-> float, the train/test splits of sources without one);
* ``digits``: scikit-learn's 8x8 digits;
* ``idx``: folders of MNIST IDX files;
* ``npz``: MedMNIST-style ``.npz`` files and :func:`save_npz`;
* ``tree``: the common file tree of image folders and tar(.gz) archives;
* ``decode``: decoding image files into arrays;
* ``folders``: the ``root/<class>/*.png`` layout and :func:`save_image_folder`;
* ``labels``: UTKFace labels from file names.
"""

from common.data.arrays import SPLIT_SEED, TEST_FRACTION
from common.data.dataset import SPLITS, DataError, ImageDataset, NoRecords, describe
from common.data.folders import save_image_folder
from common.data.labels import (LABEL_FROM_CLASSES, SENSITIVE_ATTRIBUTES, joint_attribute_values,
                                 sensitive_attribute_problem, split_joint_labels)
from common.data.load import dataset_root, load_dataset, looks_like_dataset
from common.data.npz import save_npz
from common.data.tree import ARCHIVE_SUFFIXES, IMAGE_EXTENSIONS

__all__ = [
    "ARCHIVE_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "LABEL_FROM_CLASSES",
    "SENSITIVE_ATTRIBUTES",
    "joint_attribute_values",
    "sensitive_attribute_problem",
    "split_joint_labels",
    "SPLITS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "DataError",
    "NoRecords",
    "ImageDataset",
    "describe",
    "load_dataset",
    "dataset_root",
    "looks_like_dataset",
    "save_image_folder",
    "save_npz",
]
