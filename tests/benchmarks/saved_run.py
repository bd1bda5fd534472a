"""What the benchmarks that re-draw a finished DP-GAN run's synthetic set read from it: the run's settings, its
real test split, a validation subset of its real training split (what a choice of default may look at), and a
generator of the run's architecture to load the sites' saved weights into."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common.config import RunConfig
from common.data import ImageDataset, load_dataset
from common.learner import evaluate_learner
from common.models import Generator


def add_scoring_arguments(p: argparse.ArgumentParser) -> None:
    """The options every such benchmark takes: the validation subset's size, torch threads, the JSON to write."""
    p.add_argument("--val", type=int, default=5000, help="validation images drawn from the training split")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)


def run_config(run: Path) -> RunConfig:
    """The settings a run recorded in its report."""
    return RunConfig.from_mapping(json.loads((Path(run) / "report.json").read_text())["config"])


def test_and_validation(cfg: RunConfig, data: str, val: int) -> tuple[ImageDataset, ImageDataset]:
    """The dataset's test split and ``val`` images of its training split (a fixed draw, seed 123), loaded the way
    the run loaded its records."""
    load = dict(image_size=cfg.image_size or None, label_from=cfg.label_from or None)
    test, train = load_dataset(data, "test", **load), load_dataset(data, "train", **load)
    pick = np.random.default_rng(123).permutation(len(train))[:val]
    return test, ImageDataset(images=train.images[pick], labels=train.labels[pick], classes=train.classes,
                              source="val")


def run_generator(cfg: RunConfig, data: ImageDataset) -> Generator:
    """A generator of the run's architecture for images like ``data``'s (weights to be loaded)."""
    c, h, _ = data.image_shape
    return Generator(cfg.gan_shape(c, h, len(data.classes)))


def score(model, val: ImageDataset, test: ImageDataset) -> dict[str, float]:
    """Accuracy and MCC of a learner on the validation subset (what a choice may look at) and the test split."""
    v, t = evaluate_learner(model, val, device="cpu"), evaluate_learner(model, test, device="cpu")
    return {"val_accuracy": round(v["accuracy"], 4), "val_mcc": round(v["mcc"], 3),
            "test_accuracy": round(t["accuracy"], 4), "test_mcc": round(t["mcc"], 3)}
