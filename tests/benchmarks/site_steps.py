"""Timing a DP-GAN site step the way the product runs it (shared by bench_generator_speed and bench_site_step).

A site step is what ``LocalGanTrainer.train_round`` does per accounted D step with the defaults' round settings:
DP-SGD on D at the expected batch, noise multiplier 0.63, the generator's EMA, the mode-seeking term, G's labels
from a (uniform) class histogram. The records are random: speed does not depend on pixel values.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

from client.dpgan import LocalGanTrainer, RoundSettings
from common.data import ImageDataset
from common.models import GanShape

SHAPES = {  # name: (channels, image side, generator width, resolution) as server/defaults.py chooses them
    "gray28": (1, 28, 24, 0),
    "colour32": (3, 32, 32, 0),
    "colour64-at-32": (3, 64, 32, 32),
}
RECORDS = 20_000  # a large site of ../shared/data's (MNIST's and CIFAR-10's are 11,000-28,000 records)


def random_site(shape: GanShape, n: int = RECORDS) -> LocalGanTrainer:
    """A trainer over ``n`` random records of ``shape``."""
    rng = np.random.default_rng(0)
    data = ImageDataset(rng.random((n, shape.channels, shape.image_size, shape.image_size), dtype=np.float32),
                        rng.integers(0, shape.num_classes, n), tuple(str(i) for i in range(shape.num_classes)))
    return LocalGanTrainer(shape, data, torch.device("cpu"), progress=False)


def defaults_round(trainer: LocalGanTrainer, batch: int, steps: int, **recipe) -> RoundSettings:
    """The defaults' round settings for ``steps`` D steps at expected batch ``batch``; ``recipe`` overrides."""
    settings = dict(noise_multiplier=0.63, sample_rate=batch / len(trainer.data), steps=steps, max_grad_norm=1.0,
                    lr_d=1e-3, lr_g=1e-3, seed=0, noise_seed=1, ema=0.99, mode_seeking=1.0, d_width=16,
                    label_weights=(1.0,) * trainer.shape.num_classes)
    return RoundSettings(**{**settings, **recipe})


def per_step_ms(round_ms: dict[str, Callable[[int], float]], steps: int, repeats: int) -> dict[str, float]:
    """Median ms per site step of each named round (a callable timing a round of k steps, in ms).

    The round's fixed cost (a 2-step round) is subtracted; the names alternate within each repeat, so background
    load hits them alike."""
    for timed in round_ms.values():
        timed(2)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in round_ms}
    for _ in range(repeats):
        for name, timed in round_ms.items():
            samples[name].append((timed(steps + 2) - timed(2)) / steps)
    return {name: round(statistics.median(v), 1) for name, v in samples.items()}


def time_round(trainer: LocalGanTrainer, state: dict, rs: RoundSettings) -> float:
    """ms of one ``train_round``."""
    t = time.perf_counter()
    trainer.train_round(state, rs)
    return 1e3 * (time.perf_counter() - t)
