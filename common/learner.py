"""The central learner: the unchanged classifier the coordinator trains on synthetic data.

The same functions train it on real data (the baseline of the report and of benchmarks) and on
synthetic data, which is the whole point: the learner does not know where its data came from.
Sites use :func:`evaluate_learner` to score the central classifier on their own held-out data.
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, matthews_corrcoef
from torch import nn

from common.data import ImageDataset
from common.device import padded_rows, pick_device
from common.progress import progress as progress_bar
from common.wire import quoted

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class LearnerConfig:
    """Model and hyper-parameters of the central learner: THE defaults, used by runs (run config keys
    ``learner-*``, whose defaults are these) and by ``fedsynth evaluate`` alike."""

    name: str = "cnn"  # cnn | mlp | logreg | package.module:factory (your own, see learner_factory)
    epochs: int = 10
    lr: float = 2e-3
    batch_size: int = 128
    weight_decay: float = 1e-4
    seed: int = 0

    def validate(self) -> None:
        learner_factory(self.name)  # unknown names and unimportable factories are refused here
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"learner epochs, batch size and lr must be positive, got {asdict(self)}")


class ConvNet(nn.Module):
    """A small VGG-style CNN: two conv blocks, global pooling, two linear layers; a strided stem from 48 px.

    From 48 pixels up (64x64 faces) a stride-2 convolution first halves the image: the blocks then see a
    32x32 map, so a 64x64 image costs about what a 32x32 one does (without it the learner's 10 epochs on
    10,000 synthetic 64x64 faces took ~5x longer on 2 cores), and the 2x2 global pooling keeps a
    comparable share of the map. Up to 32 pixels it is exactly the network every MNIST, PneumoniaMNIST
    and CIFAR-10 result used.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        pool_twice = image_size >= 16  # 8x8 digits only have room for one pooling step
        stem = [nn.Conv2d(channels, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()] \
            if image_size >= 48 else []  # (32, S/2, S/2)
        self.body = nn.Sequential(
            *stem,
            nn.Conv2d(32 if stem else channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),  # (32, S/2, S/2) (S/4 after a stem)
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


# The built-in learners, by name: (image_shape (C, H, W), num_classes) -> model. A user's own learner is
# named "package.module:factory" instead (learner_factory).
_BUILT_IN: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "cnn": lambda shape, k: ConvNet(shape[0], k, min(shape[1:])),
    "mlp": lambda shape, k: MLP(math.prod(shape), k),
    "logreg": lambda shape, k: LogReg(math.prod(shape), k),
}
LEARNERS = tuple(_BUILT_IN)


def learner_factory(name: str, *, allow_import: bool = True) -> Callable[[tuple[int, int, int], int], nn.Module]:
    """The function that builds learner ``name``: a built-in one, or the user's ``package.module:factory``.

    A user's factory is called as ``factory(image_shape, num_classes)`` with ``image_shape`` = (C, H, W) and
    must return a ``torch.nn.Module`` mapping a batch (B, C, H, W) scaled to [-1, 1] to logits (B, K); a
    ``features(x)`` method, if it has one, gives the feature-space audits their embedding (otherwise the
    input of its last linear layer is used). ``allow_import=False`` accepts built-in names only: a site
    never imports code a coordinator names (it would run code its operator did not approve).
    """
    if name in _BUILT_IN:
        return _BUILT_IN[name]
    if not allow_import:
        raise ValueError(f"learner {quoted(name)} is not built in ({', '.join(LEARNERS)}); this side only runs built-in "
                         "learners")
    if not _FACTORY.match(name):
        raise ValueError(f"unknown learner {quoted(name)}: choose one of {', '.join(LEARNERS)}, or name your own as "
                         "'package.module:factory'")
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module failed while importing
        raise ValueError(f"learner '{name}': cannot import '{module_name}' ({type(err).__name__}: {err}); install the "
                         "package in this environment or fix the name") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"learner '{name}': '{module_name}' has no function '{attr}'")
    return factory


def build_learner(name: str, image_shape: tuple[int, int, int], num_classes: int, *,
                  allow_import: bool = True) -> nn.Module:
    """Instantiate the learner ``name`` for images of ``image_shape`` (C, H, W)."""
    model = learner_factory(name, allow_import=allow_import)(tuple(image_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise ValueError(f"learner '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def check_learner(name: str, image_shape: tuple[int, int, int], num_classes: int) -> None:
    """Build learner ``name`` and run two dummy images through it: (2, K) logits, or a ValueError saying why.

    Called before any site is asked for anything, so a learner that does not fit the data fails in
    seconds instead of after the sites spent their budget."""
    model = build_learner(name, image_shape, num_classes)
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(2, *image_shape))
    except Exception as err:
        raise ValueError(f"learner '{name}' fails on images of shape {tuple(image_shape)} (C, H, W): "
                         f"{type(err).__name__}: {err}") from None
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(f"learner '{name}' returns outputs of shape {tuple(out.shape[1:])} per image for "
                         f"{num_classes} classes; it must return (batch, {num_classes}) logits")


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
    # The built-in CNN trains channels-last: 1.2-1.3x faster per step on CPU (28x28 gray, 32x32 and 64x64 colour,
    # bench_learner_speed.py), the same function. A user's learner keeps its layout (a .view() in it could
    # not take a channels-last batch), and every model is handed back in the standard layout below.
    layout = torch.channels_last if cfg.name == "cnn" else torch.contiguous_format
    model = build_learner(cfg.name, train.image_shape, train.num_classes).to(dev, memory_format=layout)
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
            if len(idx) < 2:  # BatchNorm (in the CNN, maybe in a user's learner) cannot train on one image
                continue
            xb = _normalize(x_all[idx].to(dev)).contiguous(memory_format=layout)  # (B, C, H, W)
            yb = y_all[idx].to(dev)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
    # the standard layout out: state_dict bytes, a site's copy and any later per-sample gradients see the
    # tensors they always saw (client.dpsgd.opacus_input says what a channels-last input did to Opacus)
    return model.to(memory_format=torch.contiguous_format).eval()


@torch.no_grad()
def _batched(fn, model: nn.Module, images: np.ndarray, device: torch.device | str | None,
             batch_size: int, fixed_rows: bool = False) -> list[np.ndarray]:
    """Apply ``fn(model, normalized batch)`` over images (N, C, H, W) in [0, 1], in eval mode.

    ``fixed_rows``: every forward pass sees a freshly allocated, C-contiguous float32 batch of exactly
    ``batch_size`` rows (the last one zero-padded; only the real rows are returned). On CPU, float32 kernels round
    a row differently when the batch grows by one row (mlp at 1, 2, 10 rows, logreg at 15, 24, ...) and numpy's
    strides on a size-1 channel axis can pick another conv kernel, so without it one record's result depends on
    how many records share its batch. A site's answers use it (``client.evaluation``): with one shape and one
    layout, a row's result depends on that row alone (``tests/test_site_query_sensitivity.py`` checks the premise)."""
    dev = next(model.parameters()).device if device is None else torch.device(device)
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if fixed_rows:
            out.append(fn(model, _normalize(padded_rows(chunk, batch_size, dev))).cpu().numpy()[:len(chunk)])
        else:
            out.append(fn(model, _normalize(torch.from_numpy(chunk).to(dev))).cpu().numpy())
    return out


def predict(model: nn.Module, images: np.ndarray, *, device: torch.device | str | None = None,
            batch_size: int = 1024, fixed_rows: bool = False) -> np.ndarray:
    """Predicted labels (N,) for images (N, C, H, W) in [0, 1]; ``fixed_rows``: see :func:`_batched` (a site's
    evaluation sets it so that no record's prediction depends on the others)."""
    out = _batched(lambda m, x: m(x).argmax(dim=1), model, images, device, batch_size, fixed_rows)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def extract_features(model: nn.Module, images: np.ndarray, *, device: torch.device | str | None = None,
                     batch_size: int = 1024) -> np.ndarray:
    """Penultimate-layer features (N, F) of the learner, for feature-space privacy audits.

    The learner's ``features`` method, or (a user's learner without one) the input of its last linear layer."""
    if hasattr(model, "features"):
        embed = lambda m, x: m.features(x)  # noqa: E731
    else:
        last = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
        if not last:
            raise ValueError("this learner has neither a features() method nor a linear layer to embed images with")
        def embed(m, x):
            seen = []
            handle = last[-1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].flatten(1)))
            try:
                m(x)
            finally:
                handle.remove()
            return seen[0]
    return np.concatenate(_batched(embed, model, images, device, batch_size)).astype(np.float32)


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
