"""Pre-train the BN-statistics mode's shared net on PUBLIC data (the ``bn-net`` run setting).

In the BN-statistics mode the shared GroupNorm net (:class:`common.bnnet.BNNet`) is either trained
across the sites with federated DP-SGD, which costs part of every site's epsilon, or provided by the
coordinator as a file (run setting ``bn-net``), in which case no site spends budget on it and the
statistics release gets the whole epsilon. This module makes such a file from data that is public,
so it is trained without any privacy mechanism:

    fedsynth pretrain-net --data digits --image-size 28 --width 16 --head-norm --epochs 150 \\
        --out nets/digits_net.pt
    fedsynth simulate --mode bnstats ... --set bn-net=nets/digits_net.pt --set bn-width=16 \\
        --set bn-head-norm=true [--set bn-layer-clips=<the printed public bounds>]

The net must have the run's shape (channels, classes, image size, ``bn-width``, ``bn-head-norm``):
the coordinator loads the file into ``BNNet(channels, num_classes, image_size, width=bn-width,
head_norm=bn-head-norm)``.

Augmentation. The only public handwritten digits available offline are scikit-learn's 8x8 digits;
upscaled to 28x28 they are blurry and fill the whole frame, while MNIST digits are sharp and sit in a
20x20 box in the middle of the frame. Every training batch is therefore re-drawn with random torch
ops (:class:`Augment`): zoom (mostly shrinking the digit into the frame), rotation, shift, stroke
thickness (grey dilation / erosion) and a levels adjustment that sharpens the blurred strokes. The
default setting ("strong", also :class:`Augment`'s defaults) was chosen by measuring the pre-trained
net's accuracy on the MNIST test split (benchmark only: see the numbers at :data:`AUGMENT_PRESETS`):
0.22 without augmentation, 0.87 with it (150 epochs), while the digits test accuracy stays ~0.99.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.bnnet import BNNet, BNNetShape, load_net_file, net_file_payload
from common.data import ImageDataset
from common.device import pick_device
from common.files import save_torch_atomic
from common.progress import progress as progress_bar


@dataclass(frozen=True)
class Augment:
    """Random per-image transforms of a training batch (all torch ops, on the batch's device).

    Attributes:
        zoom: (lo, hi) factor by which the digit is scaled (0.7 shrinks a frame-filling digit into the
            central ~70% of the frame, as in MNIST's 20x20-in-28x28 layout).
        rotate: maximum rotation in degrees (uniform in [-rotate, rotate]).
        shift: maximum translation as a fraction of the image side (uniform per axis).
        thickness: maximum stroke-thickness change in [0, 1]: t ~ U(-thickness, thickness) blends the
            image towards its 3x3 grey dilation (t > 0, thicker) or erosion (t < 0, thinner).
        levels: maximum levels adjustment: x -> clip((x - lo) / (hi - lo)) with lo ~ U(0, levels) and
            hi ~ U(1 - levels, 1); sharpens blurred strokes and removes faint halos.
        prob: probability that an image is augmented at all (the others pass unchanged).
    """

    zoom: tuple[float, float] = (0.55, 1.0)
    rotate: float = 18.0
    shift: float = 0.12
    thickness: float = 0.9
    levels: float = 0.4
    prob: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        lo, hi = self.zoom
        if not 0 < lo <= hi:
            raise ValueError(f"zoom must be (lo, hi) with 0 < lo <= hi, got {self.zoom}")
        if not 0 <= self.rotate <= 180:
            raise ValueError(f"rotate must be in [0, 180] degrees, got {self.rotate}")
        if not 0 <= self.shift < 1:
            raise ValueError(f"shift must be in [0, 1), got {self.shift}")
        if not 0 <= self.thickness <= 1:
            raise ValueError(f"thickness must be in [0, 1], got {self.thickness}")
        if not 0 <= self.levels < 0.5:
            raise ValueError(f"levels must be in [0, 0.5), got {self.levels}")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"prob must be in [0, 1], got {self.prob}")


# Named settings for the CLI. MNIST test accuracy of a width-16 head-norm net trained on digits at
# 28x28 (seed 0, batch 128, Adam 2e-3; benchmark only, nobody needs MNIST to use them):
#   none 0.217 | light 0.636 | medium 0.797 | strong 0.862 (60 epochs); strong 0.873 (150 epochs).
# Stronger than "strong" (smaller zoom, more rotation, or 10% unaugmented images) measured 0.85-0.86.
AUGMENT_PRESETS: dict[str, Augment | None] = {
    "none": None,
    "light": Augment(zoom=(0.75, 0.95), rotate=8.0, shift=0.05, thickness=0.3, levels=0.15),
    "medium": Augment(zoom=(0.65, 0.95), rotate=12.0, shift=0.08, thickness=0.6, levels=0.3),
    "strong": Augment(zoom=(0.55, 1.0), rotate=18.0, shift=0.12, thickness=0.9, levels=0.4),
}
DEFAULT_AUGMENT = "strong"


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply ``aug`` to a batch: (B, C, S, S) in [0, 1] -> (B, C, S, S) in [0, 1].

    ``generator`` must live on the CPU; the random numbers are drawn there and moved to ``x``'s device
    so a run is reproducible on any device.
    """
    b, dev = x.shape[0], x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:  # (B,) on x's device
        return (torch.rand(b, generator=generator) * (hi - lo) + lo).to(dev)

    # --- geometry: one affine map per image (zoom, rotation, shift), bilinear resampling ------------
    zoom = uniform(*aug.zoom)  # (B,)
    angle = uniform(-aug.rotate, aug.rotate) * (math.pi / 180.0)  # (B,) radians
    shift = torch.stack([uniform(-aug.shift, aug.shift), uniform(-aug.shift, aug.shift)], dim=1) * 2.0  # (B, 2)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # output -> input coordinates: R(-a) / zoom
    a = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)  # (B, 2, 2)
    t = -(a @ shift[:, :, None])  # (B, 2, 1): the digit's centre moves by +shift
    grid = F.affine_grid(torch.cat([a, t], dim=2), list(x.shape), align_corners=False)  # (B, S, S, 2)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B, C, S, S)

    # --- stroke thickness: blend towards the 3x3 grey dilation (t > 0) or erosion (t < 0) ----------
    if aug.thickness > 0:
        thick = uniform(-aug.thickness, aug.thickness)[:, None, None, None]  # (B, 1, 1, 1)
        dilated = F.max_pool2d(out, 3, stride=1, padding=1)  # (B, C, S, S)
        eroded = -F.max_pool2d(-out, 3, stride=1, padding=1)  # (B, C, S, S)
        out = torch.where(thick >= 0, out + thick * (dilated - out), out + (-thick) * (eroded - out))

    # --- levels: stretch [lo, hi] to [0, 1] (sharper strokes, no faint halo) -----------------------
    if aug.levels > 0:
        lo = uniform(0.0, aug.levels)[:, None, None, None]  # (B, 1, 1, 1)
        hi = uniform(1.0 - aug.levels, 1.0)[:, None, None, None]  # (B, 1, 1, 1)
        out = ((out - lo) / (hi - lo)).clamp(0.0, 1.0)

    if aug.prob < 1:
        keep = (torch.rand(b, generator=generator) >= aug.prob).to(dev)[:, None, None, None]  # (B, 1, 1, 1)
        out = torch.where(keep, x, out)
    return out.clamp(0.0, 1.0)


@torch.no_grad()
def accuracy(net: nn.Module, data: ImageDataset, *, device: torch.device | str = "cpu",
             batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``net`` on ``data`` (eval mode, no augmentation); restores the net's mode."""
    check_net_fits(net, data)
    was_training = net.training
    net.to(device).eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        x = torch.as_tensor(data.images[start:start + batch_size], device=device)  # (B, C, S, S)
        y = torch.as_tensor(data.labels[start:start + batch_size], device=device)  # (B,)
        correct += int((net(x).argmax(dim=1) == y).sum())
    net.train(was_training)
    return correct / max(len(data), 1)


def check_net_fits(net: nn.Module, data: ImageDataset) -> None:
    """Raise ValueError with a fix-it hint when ``data`` cannot be fed to ``net`` (a :class:`BNNet`)."""
    shape: BNNetShape | None = getattr(net, "shape", None)
    if shape is None:
        raise ValueError(f"expected a common.bnnet.BNNet, got {type(net).__name__}")
    c, h, w = data.image_shape
    if (c, h, w) != (shape.in_channels, shape.image_size, shape.image_size):
        raise ValueError(
            f"the data {data.source or ''} holds {c}x{h}x{w} images but the net expects "
            f"{shape.in_channels}x{shape.image_size}x{shape.image_size}; load the data with "
            f"image_size={shape.image_size} (--image-size) and {shape.in_channels} channel(s) (--channels)")
    if data.num_classes != shape.num_classes:
        raise ValueError(
            f"the data {data.source or ''} has {data.num_classes} classes {list(data.classes)[:10]} but the net "
            f"has {shape.num_classes} outputs; the public data must have the private data's classes, in the same order")


def save_net_file(net: BNNet, path: str | Path) -> Path:
    """Write the net file (its weights and the side they were trained at, :func:`common.bnnet.net_file_payload`)
    to ``path`` atomically; returns the expanded path."""
    path = Path(path).expanduser()
    save_torch_atomic(path, net_file_payload(net))
    return path


def pretrain_bnnet(
    train: ImageDataset,
    out: str | Path,
    *,
    width: int = 16,
    head_norm: bool = False,
    resolution: int = 0,
    epochs: int = 150,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 1e-4,
    augment: Augment | None = AUGMENT_PRESETS[DEFAULT_AUGMENT],
    test: ImageDataset | None = None,
    eval_data: ImageDataset | None = None,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Train a :class:`BNNet` on public data (non-private) and save it to ``out`` (its weights and side).

    Args:
        train: the PUBLIC training images (N, C, S, S) in [0, 1]; the net gets C channels, S x S input
            and ``train.num_classes`` outputs, which must equal the private run's (the file only loads
            into a net of the run's shape).
        out: the net file to write (atomically); give it to a run as ``bn-net``.
        width, head_norm, resolution: the run's ``bn-width``, ``bn-head-norm`` and ``bn-resolution`` (0: the
            image side; ``fedsynth pretrain-net`` passes the product's choice, as a run would resolve it).
        epochs, batch_size, lr, weight_decay: Adam with a cosine learning-rate decay.
        augment: random per-batch transforms (:class:`Augment`), None for none.
        test: the public data's held-out split, scored at the end (recommended).
        eval_data: another labelled set to score the net on, e.g. the private data's test split.
            Only for benchmarking: a real deployment never shows private data to the coordinator.
        seed: seeds the initialisation, the batch order and the augmentation.
        device: "auto", "cpu" or "cuda[:N]" (``common.device.pick_device``).
        threads: torch CPU threads while training (restored afterwards); None keeps the current number.
            On a busy 2-core machine 1 thread can be many times faster than 2 (no spinning on a shared core).
        progress: show a tqdm bar over the epochs.

    Returns:
        A summary: ``out``, the net's ``shape``, ``run_settings`` (for the run config), ``epochs``,
        ``seconds``, ``train_accuracy`` (last epoch, augmented), ``test_accuracy`` (on ``test``, or
        None), ``eval_accuracy`` (on ``eval_data``, or None), ``augment`` (its settings, or None),
        ``parameters``, ``public_layer_clips`` (a ``bn-layer-clips`` value read off the public data,
        :func:`public_layer_clips`).

    Raises:
        ValueError: bad hyper-parameters, or data that does not fit the net's shape.
    """
    if epochs < 1 or batch_size < 1 or not lr > 0 or weight_decay < 0:
        raise ValueError(f"epochs and batch_size must be >= 1, lr > 0 and weight_decay >= 0; got epochs={epochs}, "
                         f"batch_size={batch_size}, lr={lr}, weight_decay={weight_decay}")
    if len(train) == 0:
        raise ValueError("the public training set is empty")
    if augment is not None:
        augment.validate()
    c, h, w = train.image_shape
    if h != w:
        raise ValueError(f"the shared net needs square images, the public data holds {h}x{w}; load it with an image size")
    shape = BNNetShape(c, train.num_classes, h, width, head_norm, resolution)
    shape.validate()
    for other in (test, eval_data):
        if other is not None:
            check_net_fits(shape.build(), other)

    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    dev = pick_device(device)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _train(train, out, shape, dev, epochs=epochs, batch_size=batch_size, lr=lr,
                      weight_decay=weight_decay, augment=augment, test=test, eval_data=eval_data, seed=seed,
                      progress=progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(train: ImageDataset, out: str | Path, shape: BNNetShape, dev: torch.device, *, epochs: int,
           batch_size: int, lr: float, weight_decay: float, augment: Augment | None, test: ImageDataset | None,
           eval_data: ImageDataset | None, seed: int, progress: bool) -> dict:
    """The training loop of :func:`pretrain_bnnet` (arguments already checked)."""
    torch.manual_seed(seed)
    net = shape.build().to(dev)
    gen = torch.Generator().manual_seed(seed)  # batch order and augmentation (CPU: same on every device)
    images = torch.as_tensor(train.images, device=dev)  # (N, C, S, S)
    labels = torch.as_tensor(train.labels, device=dev)  # (N,)
    n = len(train)
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)

    t0 = time.perf_counter()
    bar = progress_bar(range(epochs), desc="pretrain bn-net", unit="epoch", enabled=progress)
    train_acc = float("nan")
    net.train()
    for _ in bar:
        order = torch.randperm(n, generator=gen).to(dev)
        correct, loss_sum = 0, 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            x, y = images[idx], labels[idx]  # (B, C, S, S), (B,)
            if augment is not None:
                x = augment_batch(x, augment, gen)
            logits = net(x)  # (B, K)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(idx)
        train_acc = correct / n
        bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{train_acc:.3f}")
    seconds = time.perf_counter() - t0

    net.eval()
    path = save_net_file(net, out)
    return {
        "out": str(path),
        "shape": asdict(shape),
        "run_settings": {"bn-net": str(path), "bn-width": shape.width, "bn-head-norm": shape.head_norm,
                         "bn-resolution": shape.side},
        "train_records": n,
        "epochs": epochs,
        "seconds": round(seconds, 1),
        "device": str(dev),
        "train_accuracy": train_acc,
        "test_accuracy": accuracy(net, test, device=dev) if test is not None else None,
        "eval_accuracy": accuracy(net, eval_data, device=dev) if eval_data is not None else None,
        "augment": asdict(augment) if augment is not None else None,
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "public_layer_clips": public_layer_clips(net, train, augment, seed=seed, device=dev),
    }


def public_layer_clips(net: BNNet, public: ImageDataset, augment: Augment | None = None, *, quantile: float = 0.9,
                       passes: int = 3, seed: int = 0, device: torch.device | str = "cpu") -> str:
    """Per-layer clip bounds for the statistics release read off PUBLIC data: a ``bn-layer-clips`` value.

    For every norm layer, the ``quantile`` of the records' block norms ||f_il|| (``client.bnstats``) over
    ``passes`` augmented copies of ``public`` (the augmentation makes the public digits look like the
    private ones; on MNIST the 0.9 quantiles of augmented digits are within ~30% of MNIST's own), in the
    net's layer order, rounded up to 2 significant digits. Public data only, so choosing the bounds costs
    no privacy (unlike ``bn-layer-clips=auto``), but they are only as good as the public data is similar.
    """
    from common.bnnet import record_block_norms  # the sites' own norm definition, so the bounds match

    check_net_fits(net, public)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.as_tensor(public.images)  # (N, C, S, S)
    copies = [augment_batch(x, augment, gen) if augment is not None else x for _ in range(passes)]
    views = ImageDataset(torch.cat(copies).numpy(), public.labels.repeat(passes), public.classes)  # (passes N, ...)
    norms = record_block_norms(net, views, device=device)  # {layer: (passes N,)}
    out = []
    for values in norms.values():
        q = float(np.quantile(values, quantile))
        digits = 10 ** (math.floor(math.log10(q)) - 1) if q > 0 else 1.0
        out.append(f"{math.ceil(q / digits) * digits:.4g}")
    return ",".join(out)


def load_pretrained(path: str | Path, shape: BNNetShape) -> BNNet:
    """Load a net file written by :func:`pretrain_bnnet` into a BNNet of ``shape`` (ValueError on a mismatch,
    saying what to change: :func:`common.bnnet.load_net_file`)."""
    net, _ = load_net_file(str(Path(path).expanduser()), shape)
    return net.eval()
