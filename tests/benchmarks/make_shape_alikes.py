"""Datasets shaped like the ones a user may bring that ../shared/data does not hold, built from ../shared/data.

    .venv/bin/python tests/benchmarks/make_shape_alikes.py --out /tmp/alikes
    .venv/bin/python tests/benchmarks/bench_defaults.py --datasets tiny2=/tmp/alikes/tiny2.npz

The product chooses its settings from an image shape and a class count, so data of a shape nobody ran is where
a rule can break. Each file is an npz in the MedMNIST layout (`train_*`, `val_*`, `test_*`, uint8, labels
(N, 1)), so any `fedsynth` command and `bench_defaults.py --datasets NAME=PATH` read it as they would a user's:

- ``tiny2``: 546 training records, 2 classes, 28x28 gray (BreastMNIST's size): PneumoniaMNIST's training split
  sampled at random, its test split as it is. At 3 Dirichlet-0.5 sites a site holds a few dozen records.
- ``colour28c8``: 12,000 training records, 8 classes, 28x28 colour (BloodMNIST's shape): CIFAR-10's first eight
  classes brought to 28x28, shuffled.
- ``tail20``: 20 classes, 28x28 gray, a long tail (EMNIST's class count, OrganAMNIST's imbalance): MNIST's digits
  as classes 0-9 and CIFAR-10 gray as classes 10-19, class k keeping 3,000 / (1 + k / 3) records (3,000 to 409).

The images are ones the product has already been measured on; the files exercise new shapes and class counts,
and are not a new benchmark to tune the defaults to.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _save(path: Path, train_x, train_y, test_x, test_y) -> None:
    import numpy as np

    np.savez_compressed(path, train_images=train_x, train_labels=train_y.reshape(-1, 1),
                        val_images=test_x[:200], val_labels=test_y[:200].reshape(-1, 1),
                        test_images=test_x, test_labels=test_y.reshape(-1, 1))
    counts = np.bincount(train_y.ravel())
    print(f"{path}: train {train_x.shape} (class sizes {counts.min()}-{counts.max()}), test {test_x.shape}")


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from common.data import load_dataset
    from common.data.arrays import _to_uint8 as uint8  # (N, C, H, W) floats -> the MedMNIST layout, as save_npz

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="folder to write tiny2.npz, colour28c8.npz, tail20.npz")
    p.add_argument("--data-root", type=Path, default=SHARED)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    cifar = args.data_root / "cifar10" / "cifar10-jpg.tar.gz"

    pneumonia = np.load(args.data_root / "medmnist" / "pneumoniamnist.npz")
    pick = rng.choice(len(pneumonia["train_labels"]), 546, replace=False)
    _save(args.out / "tiny2.npz", pneumonia["train_images"][pick], pneumonia["train_labels"][pick].ravel(),
          pneumonia["test_images"], pneumonia["test_labels"].ravel())

    train, test = (load_dataset(cifar, s, image_size=28, channels=3) for s in ("train", "test"))
    first8 = rng.permutation(np.flatnonzero(train.labels < 8))[:12000]
    test8 = np.flatnonzero(test.labels < 8)
    _save(args.out / "colour28c8.npz", uint8(train.images[first8]), train.labels[first8],
          uint8(test.images[test8]), test.labels[test8])

    digits, digits_test = (load_dataset(args.data_root / "mnist", s) for s in ("train", "test"))
    gray, gray_test = (load_dataset(cifar, s, image_size=28, channels=1) for s in ("train", "test"))
    images = np.concatenate([uint8(digits.images), uint8(gray.images)])
    labels = np.concatenate([digits.labels, gray.labels + 10])
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == k))[:int(3000 / (1 + k / 3))]
                           for k in range(20)])
    _save(args.out / "tail20.npz", images[keep], labels[keep],
          np.concatenate([uint8(digits_test.images), uint8(gray_test.images)]),
          np.concatenate([digits_test.labels, gray_test.labels + 10]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
