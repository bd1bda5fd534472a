"""The central learner: the unchanged classifier the coordinator trains on synthetic data.

The same functions train it on real data (the baseline of the report and of benchmarks) and on
synthetic data, which is the whole point: the learner does not know where its data came from.
Sites use :func:`evaluate_learner` to score the central classifier on their own held-out data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, matthews_corrcoef
from torch import nn

from common.data import ImageDataset
from common.device import pick_device
from common.progress import progress as progress_bar

LEARNERS = ("cnn", "mlp", "logreg")


@dataclass
class LearnerConfig:
    """Model and hyper-parameters of the central learner: THE defaults, used by runs (run config keys
    ``learner-*``, whose defaults are these) and by ``fedsynth evaluate`` alike."""

    name: str = "cnn"  # cnn | mlp | logreg
    epochs: int = 10
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        if self.name not in LEARNERS:
            raise ValueError(f"unknown learner '{self.name}': choose one of {', '.join(LEARNERS)}")
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"learner epochs, batch size and lr must be positive, got {asdict(self)}")


class ConvNet(nn.Module):
    """A small VGG-style CNN for 8x8 to 32x32 images: two conv blocks, global pooling, two linear layers."""

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        pool_twice = image_size >= 16  # 8x8 digits only have room for one pooling step
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),  # (32, S/2, S/2)
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2) if pool_twice else nn.Identity(),  # (64, S/4, S/4)
            nn.AdaptiveAvgPool2d(2),  # (64, 2, 2)
            nn.Flatten(),
            nn.Linear(256, 128), nn.ReLU(), nn.Dropout(0.3),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MLP(nn.Module):
    """Two hidden layers on flattened pixels."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 256) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class LogReg(nn.Module):
    """Multinomial logistic regression on flattened pixels (features = the pixels themselves)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.head = nn.Linear(in_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(x))


def build_learner(name: str, image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Instantiate the learner ``name`` for images of ``image_shape`` (C, H, W)."""
    c, h, w = image_shape
    if name == "cnn":
        return ConvNet(c, num_classes, min(h, w))
    if name == "mlp":
        return MLP(c * h * w, num_classes)
    if name == "logreg":
        return LogReg(c * h * w, num_classes)
    raise ValueError(f"unknown learner '{name}': choose one of {', '.join(LEARNERS)}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    # [0, 1] -> roughly zero-mean, unit-scale inputs; fixed (not data-derived) so it needs no statistics.
    return (x - 0.5) / 0.5


def train_learner(train: ImageDataset, cfg: LearnerConfig, *, device: torch.device | str | None = None,
                  progress: bool = True, desc: str = "learner") -> nn.Module:
    """Train the learner ``cfg`` on ``train`` and return it in eval mode (on ``device``)."""
    cfg.validate()
    if len(train) == 0:
        raise ValueError("cannot train the learner on an empty dataset")
    dev = torch.device(device) if device is not None else pick_device()
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = build_learner(cfg.name, train.image_shape, train.num_classes).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    x_all = torch.from_numpy(train.images)
    y_all = torch.from_numpy(train.labels)
    loss_fn = nn.CrossEntropyLoss()
    bar = progress_bar(range(cfg.epochs), desc=desc, unit="epoch", enabled=progress)
    for _ in bar:
        model.train()
        order = torch.randperm(len(train), generator=gen)
        total, count = 0.0, 0
        for start in range(0, len(train), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2 and cfg.name == "cnn":  # BatchNorm cannot train on a single image
                continue
            xb = _normalize(x_all[idx].to(dev))
            yb = y_all[idx].to(dev)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
    model.eval()
    return model


@torch.no_grad()
def _batched(fn, model: nn.Module, images: np.ndarray, device: torch.device | str | None,
             batch_size: int) -> list[np.ndarray]:
    """Apply ``fn(model, normalized batch)`` over images (N, C, H, W) in [0, 1], in eval mode."""
    dev = next(model.parameters()).device if device is None else torch.device(device)
    model.eval()
    return [fn(model, _normalize(torch.from_numpy(images[start:start + batch_size]).to(dev))).cpu().numpy()
            for start in range(0, len(images), batch_size)]


def predict(model: nn.Module, images: np.ndarray, *, device: torch.device | str | None = None,
            batch_size: int = 1024) -> np.ndarray:
    """Predicted labels (N,) for images (N, C, H, W) in [0, 1]."""
    out = _batched(lambda m, x: m(x).argmax(dim=1), model, images, device, batch_size)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def extract_features(model: nn.Module, images: np.ndarray, *, device: torch.device | str | None = None,
                     batch_size: int = 1024) -> np.ndarray:
    """Penultimate-layer features (N, F) of the learner, for feature-space privacy audits."""
    return np.concatenate(_batched(lambda m, x: m.features(x), model, images, device, batch_size)).astype(np.float32)


def evaluate_learner(model: nn.Module, test: ImageDataset, *, device: torch.device | str | None = None) -> dict:
    """Accuracy, per-class accuracy, Matthews correlation and confusion matrix on ``test``."""
    pred = predict(model, test.images, device=device)
    k = test.num_classes
    conf = confusion_matrix(test.labels, pred, labels=list(range(k)))
    support = conf.sum(axis=1)
    per_class = [float(conf[i, i] / support[i]) if support[i] else float("nan") for i in range(k)]
    return {
        "accuracy": float((pred == test.labels).mean()) if len(test) else float("nan"),
        "per_class_accuracy": per_class,
        "mcc": float(matthews_corrcoef(test.labels, pred)) if len(test) else float("nan"),
        "confusion": conf.tolist(),
        "num_test": int(len(test)),
    }
