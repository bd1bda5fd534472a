"""The network of the BN-statistics mode, shared by every site and the coordinator.

In the BN-statistics mode (class-wise batch-norm statistics matching, Soufleri, Saha and Roy 2022, and its
DP successor DP-ImgSyn) the data are summarised by the
class-wise statistics of the inputs of a network's normalisation layers, and the coordinator turns
those statistics back into images by optimising noise so that the synthetic batch reproduces them.
Seed 002 uses BatchNorm; Opacus cannot privatise BatchNorm (it mixes the records of a batch), so this
net uses GroupNorm and the *inputs* of its GroupNorm layers are what gets recorded and matched. The
per-channel mean and variance over (batch, H, W) of a GroupNorm input are exactly what a BatchNorm
layer in the same place would have tracked.

Both sides must build the very same architecture (the coordinator loads the sites' FedAvg weights and
matches the sites' statistics layer by layer), so everything that fixes it is in :class:`BNNetShape`,
and the layer names used as release keys come from :func:`norm_layer_names`.

Architecture for an (C, S, S) input, width w, drawn at side R (``resolution``; R = S unless set):
    [input averaged down to R x R when S > R: parameter-free, so the DP argument is unchanged]
    block1: conv3x3(C -> w)   -> GroupNorm -> ReLU -> avgpool2   (w,  R/2, R/2)
    block2: conv3x3(w -> 2w)  -> GroupNorm -> ReLU -> avgpool2   (2w, R/4, R/4)
    block3: conv3x3(2w -> 2w) -> GroupNorm -> ReLU [-> avgpool2 from 48 px]   (2w, m, m), m = R/4 (R/8)
    [head_norm: GroupNorm of the flattened map, seen as (B, 2w m^2, 1, 1)]   (optional)
    head:   linear(2w * m^2 -> K)
With ``head_norm=True`` the last recorded layer has one channel per (feature map, position), so the
class-wise statistics say *where* each class has which features. On MNIST this is what makes the
synthesis work: exact statistics of a width-16 net give a CNN learner 27.8% TSTR (300 images)
without it and 89.6% (500 images) with it. It costs 2 * K * 2w m^2 floats more per release
(~125 KB for MNIST at width 16). Use per-layer clip bounds with it (``client.bnstats``).
Average pooling (not max pooling) keeps the gradients of the input smooth, which helps the
DeepInversion-style synthesis. S = 8 (digits), 28 (MNIST) and 32 (CIFAR) all work.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from common.device import padded_rows
from common.models import resize_to_side

if TYPE_CHECKING:
    from common.data import ImageDataset

MIN_IMAGE_SIZE = 8  # two 2x poolings must leave at least a 2x2 map
LARGE_IMAGE_SIZE = 48  # from here block3 pools as well (m = S/8 instead of S/4)
# Records per forward pass of a site's statistics release and automatic clip bounds (client.limits bounds its memory)
RECORD_BLOCK_ROWS = 512


@dataclass(frozen=True)
class BNNetShape:
    """Everything that fixes the shared net's tensor shapes (identical at every site and the coordinator)."""

    in_channels: int
    num_classes: int
    image_size: int
    width: int = 32
    head_norm: bool = False
    resolution: int = 0  # side the net's convolutions see (larger inputs are averaged down); 0 = image_size

    @property
    def side(self) -> int:
        """The side the net's layers work at (and the statistics-mode synthesis draws at)."""
        return self.resolution or self.image_size

    def validate(self) -> None:
        """Raise ValueError with a fix-it hint when the shape cannot be built."""
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"the BN-statistics net needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, "
                f"got {self.image_size}; resize the data (image-size in the config)"
            )
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if self.resolution and not MIN_IMAGE_SIZE <= self.resolution <= self.image_size:
            raise ValueError(
                f"the statistics net's resolution (bn-resolution) must be between {MIN_IMAGE_SIZE} and the image "
                f"side {self.image_size}, or 0 for the image side; got {self.resolution}"
            )

    def build(self) -> "BNNet":
        """A freshly initialised net of this shape (seed torch first for identical weights)."""
        return BNNet(self.in_channels, self.num_classes, self.image_size, self.width, head_norm=self.head_norm,
                     resolution=self.resolution)


def _group_count(channels: int) -> int:
    """Number of GroupNorm groups: up to 8, always dividing ``channels``."""
    return math.gcd(8, channels)


class _Block(nn.Module):
    """conv3x3 -> GroupNorm -> ReLU -> pool. The GroupNorm input is the recorded tensor."""

    def __init__(self, cin: int, cout: int, pool: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(_group_count(cout), cout)
        self.act = nn.ReLU()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class _HeadNorm(nn.Module):
    """GroupNorm of the flattened head input, seen as (B, F, 1, 1): F = 2w m^2 'channels'.

    Its input is recorded like any other norm input; as every channel is one (feature map, position)
    pair, its class-wise statistics carry *where* each class has which features, which the spatially
    pooled statistics of the conv blocks cannot (the synthesis then gets the class's layout).
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_group_count(features), features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.flatten(1)[:, :, None, None]).flatten(1)  # (B, F)


class BNNet(nn.Module):
    """Small GroupNorm CNN classifier: (B, C, S, S) images in [0, 1] -> (B, K) logits.

    Passes ``opacus.validators.ModuleValidator.validate`` (no BatchNorm, no in-place ops).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 32, *,
                 head_norm: bool = False, resolution: int = 0) -> None:
        super().__init__()
        self.shape = BNNetShape(in_channels, num_classes, image_size, width, head_norm, resolution)
        self.shape.validate()
        side = self.shape.side  # R
        w = width
        self.block1 = _Block(in_channels, w, nn.AvgPool2d(2))  # (w, S/2, S/2)
        self.block2 = _Block(w, 2 * w, nn.AvgPool2d(2))  # (2w, S/4, S/4)
        # From 48 pixels up block3 pools too: the head's map stays at most 8x8 (64x64 faces: 8x8, not 16x16,
        # i.e. a head and a head-norm release 4x smaller), as the GAN's networks do (common.models).
        large = side >= LARGE_IMAGE_SIZE
        self.block3 = _Block(2 * w, 2 * w, nn.AvgPool2d(2) if large else nn.Identity())  # (2w, m, m)
        # A linear head on the whole map (not global pooling) keeps where strokes are, which both the
        # classifier and the class guidance of the synthesis need.
        m = side // 8 if large else side // 4
        features = 2 * w * m ** 2
        # Optional norm of the head input ("head.norm" is then the last recorded layer).
        self.head_norm = _HeadNorm(features) if head_norm else None
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = resize_to_side(x, self.shape.side)  # (B, C, S, S) -> (B, C, R, R): a site's full-size records averaged
        h = self.block3(self.block2(self.block1(x))).flatten(1)  # (B, 2w m^2)
        if self.head_norm is not None:
            h = self.head_norm(h)
        return self.head(h)  # (B, K)


def check_images_fit(model: nn.Module, images: np.ndarray) -> None:
    """Raise ValueError when ``images`` (N, C, H, W) are not the shape a net with a ``shape`` (:class:`BNNetShape`)
    takes; a model without one is not checked."""
    shape = getattr(model, "shape", None)
    if shape is None:
        return
    want = (shape.in_channels, shape.image_size, shape.image_size)
    if tuple(images.shape[1:]) != want:
        raise ValueError(f"dataset images are {tuple(images.shape[1:])} but the shared net expects {want}; "
                         "load the data with the run's image_size/channels")


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The normalisation layers of ``model`` in forward order, keyed by their stable module names.

    Names come from ``named_modules`` (e.g. ``"block1.norm"``), so they are identical for every
    instance of the same architecture and can be used as release keys.
    """
    layers = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d, nn.LayerNorm))
    }
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no normalisation layer whose inputs could be recorded; "
            "use common.bnnet.BNNet"
        )
    return layers


def norm_layer_names(model: nn.Module) -> list[str]:
    """Stable names of the normalisation layers (see :func:`norm_layers`)."""
    return list(norm_layers(model))


def norm_layer_channels(model: nn.Module) -> dict[str, int]:
    """Number of channels C_l of each normalisation layer's input, by layer name."""
    out: dict[str, int] = {}
    for name, mod in norm_layers(model).items():
        if isinstance(mod, nn.GroupNorm):
            out[name] = mod.num_channels
        elif isinstance(mod, nn.LayerNorm):
            raise ValueError(f"layer {name}: LayerNorm inputs have no channel axis to record statistics on")
        else:
            out[name] = mod.num_features
    return out


@contextmanager
def capture_norm_inputs(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Record the input of every normalisation layer during forward passes inside the ``with`` block.

    Yields a dict that each forward pass refills: ``inputs[name]`` is the (B, C_l, H_l, W_l) tensor
    entering layer ``name``. The tensors are *not* detached, so a loss on them back-propagates to the
    network's input (the synthesis needs that); wrap the forward in ``torch.no_grad()`` when only
    reading them. The hooks are removed on exit, even after an exception.
    """
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            inputs[name] = args[0]

        return hook

    try:
        for name, mod in norm_layers(model).items():
            handles.append(mod.register_forward_pre_hook(make_hook(name)))
        yield inputs
    finally:
        for h in handles:
            h.remove()


# ---- per-record features of the norm inputs: the site's statistics and everyone's clip bounds use these

def per_record_features(inputs: dict[str, torch.Tensor], layers: list[str]) -> dict[str, torch.Tensor]:
    """Per-record blocks [m_l, s_l] of shape (B, 2 C_l) from norm-layer inputs (B, C_l, H_l, W_l)."""
    out = {}
    for name in layers:
        a = inputs[name].double()  # float64: sums over thousands of records must add exactly across sites
        out[name] = torch.cat([a.mean(dim=(2, 3)), (a * a).mean(dim=(2, 3))], dim=1)  # (B, 2 C_l)
    return out


@torch.no_grad()
def iter_record_blocks(model: nn.Module, dataset: "ImageDataset", *, device: torch.device | str | None = None,
                       batch_size: int = RECORD_BLOCK_ROWS) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """(index of the batch's first record, its per-record blocks {layer: (B, 2 C_l)}) over ``dataset``.

    Runs ``model`` in eval mode without gradients and restores its mode afterwards. Private: the
    blocks are single records' features; only DP releases built from them may leave the site.

    Every forward pass sees a freshly allocated, C-contiguous float32 batch of exactly ``batch_size`` rows (the last
    zero-padded; only real rows are yielded; GroupNorm normalises each row alone, so padding changes no real row).
    On CPU a record alone in a short last batch got other float32 roundings than in a batch of two or more, so with
    batches sized to the data one added record could move another record's features across a bin edge the
    coordinator's net was tuned to (review s56: the auto clip bounds' histogram moved by L2 2.83 against the
    sqrt(L) = 2 its noise is scaled to). At one shape a record's features depend on that record alone.
    """
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(dev).eval()
    layers = list(norm_layer_channels(model))
    try:
        with torch.no_grad(), capture_norm_inputs(model) as inputs:
            for start in range(0, len(dataset), batch_size):
                chunk = dataset.images[start:start + batch_size]
                model(padded_rows(chunk, batch_size, dev))
                yield start, {name: block[:len(chunk)] for name, block in per_record_features(inputs, layers).items()}
    finally:
        model.train(was_training)


def pad_rows(block: torch.Tensor, rows: int) -> torch.Tensor:
    """``block`` (B, D) with zero rows appended up to ``rows`` (B <= rows). A per-record reduction over a block's
    rows is then taken at one shape: on 2+ CPU threads a row alone in a short last block summed its squares in
    another order than among other rows (review s61, at 65,536 features), and a GPU may split either differently."""
    return block if len(block) >= rows else torch.cat([block, block.new_zeros(rows - len(block), *block.shape[1:])])


def record_block_norms(model: nn.Module, dataset: "ImageDataset", *, device: torch.device | str | None = None,
                       batch_size: int = RECORD_BLOCK_ROWS) -> dict[str, np.ndarray]:
    """Per layer, every record's block norm ||f_il||_2 (N,), each taken in a block of ``batch_size`` rows (the
    last padded: :func:`pad_rows`). Private: never send this."""
    norms: dict[str, list[np.ndarray]] = {name: [] for name in norm_layer_names(model)}
    for _, blocks in iter_record_blocks(model, dataset, device=device, batch_size=batch_size):
        for name, block in blocks.items():  # (B, 2 C_l)
            norms[name].append(pad_rows(block, batch_size).norm(dim=1)[:len(block)].cpu().numpy())
    # (no record: no block, so every layer's norms are an empty array; a site whose every record was withdrawn
    # answers with noise alone, client.site.load_site_data)
    return {name: np.concatenate(parts) if parts else np.zeros(0, np.float32) for name, parts in norms.items()}


# A net file (``bn-net``): the state dict and the side its layers work at. Two nets of different sides can
# have the very same parameter shapes (a 64-pixel net and a 32-pixel one both end at an 8x8 head map), so a
# strict state-dict load cannot tell them apart: the file says which side it was trained at.
NET_FILE_FORMAT = "fedsynth-bn-net/1"


def net_file_payload(net: BNNet) -> dict:
    """What ``fedsynth pretrain-net`` writes: the weights (on the CPU) and the side they were trained at."""
    return {"format": NET_FILE_FORMAT, "side": net.shape.side,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def load_net_file(path: str, shape: BNNetShape) -> tuple[BNNet, int | None]:
    """A net of ``shape`` with the weights of the file at ``path``; and the side the file records (None: a
    bare state dict, written before files recorded it, whose side cannot be checked).

    Raises:
        ValueError: the file cannot be read, was trained at another side, or its weights do not fit ``shape``
            (the message says which run settings to change).
    """
    net = shape.build()
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise ValueError(f"cannot read the net file '{path}': {str(err)[:200]}") from None
    recorded = None
    if isinstance(payload, dict) and payload.get("format") == NET_FILE_FORMAT:
        try:
            recorded, payload = int(payload["side"]), payload["state_dict"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"the net file '{path}' says it is a {NET_FILE_FORMAT} file but lacks its side or "
                             "weights; write it again with fedsynth pretrain-net") from None
        if recorded != shape.side:
            raise ValueError(f"the net file '{path}' was trained at {recorded} pixels and this run's statistics net "
                             f"works at {shape.side}: set bn-resolution={recorded}, or train a net for this run with "
                             f"fedsynth pretrain-net --resolution {shape.side}")
    try:
        net.load_state_dict(payload)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"the net file '{path}' does not fit BNNet({shape.in_channels}, {shape.num_classes}, "
                         f"{shape.image_size}, width={shape.width}, head_norm={shape.head_norm}, "
                         f"resolution={shape.side}): {str(err)[:300]}. Set bn-width and bn-head-norm to the "
                         f"values it was trained with (fedsynth pretrain-net prints them)") from None
    return net, recorded
