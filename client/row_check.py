"""The premise of the evaluation's and the audit's sensitivity 1, checked on the site's own machine.

A site answers an evaluation query with a table of counts (per class, its held-out records classified right and
wrong) and an audit with histograms of counts (records by the distance to their nearest synthetic image), each
noised for one record moving one count. That holds only if a record's prediction or distance depends on that
record alone: float32 kernels round a row differently with another row count, so the site runs every forward pass
on fixed, zero-padded batches (``common.learner._batched(fixed_rows=True)``, ``client.evaluation.audit_block``).
At one shape and layout a row's result then depends on that row alone -- on the CPUs the tests ran on. Another CPU
(other vector instructions, more threads splitting a batch) could round a row by its position or its batch-mates,
and one added record could then move other records' cells: a release past its sensitivity (review s59, which
found such a case in numpy's float64 sum of one row against two, ``common.audits.neighbors._exact_sq``).

So ``fedsynth site`` checks it before a site that answers such queries starts (:func:`batch_mate_problems`), on
random images of the site's own shape: each built-in learner's logits, and the audit's distance blocks, for the
same rows permuted, among other rows, and in a short padded batch, bitwise.

The training releases rest on the same premise, in their own fixed blocks: the statistics release's per-record
features and block norms (``common.bnnet.RECORD_BLOCK_ROWS``-row blocks) and every DP-SGD per-sample gradient, the
shared net's and the discriminator's (``client.dpsgd.DPSGD_CHUNK``-row chunks). A per-sample gradient rounded by its
row's position would let one added record move another's clipped contribution (review s56's attack, through position
rather than batch size; review s62 asked for the check, which found no such case on the CPUs it ran on), so
:func:`training_problems` checks them too, at random weights of the default widths, before any site starts, and
:func:`check_network_rows` checks each run's own shapes (its widths, resolution, head norm) before its census: at an
odd width this machine's linear layers summed a row by its place in the chunk (review s63). Both run on the device the
site trains on (a run's device setting can choose the site's GPU), the evaluation and audit checks on the CPU, where
those answers are always computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import opacus
import torch

from client.dpgan import TORCH_SEED_LOCK
from client.dpsgd import DPSGD_CHUNK, opacus_input
from client.evaluation import audit_block, evaluation_batch
from client.requests import Refusal
from common import protocol as P
from common.audits.neighbors import _exact_sq, _sq_block
from common.bnnet import RECORD_BLOCK_ROWS, BNNet, iter_record_blocks, pad_rows
from common.data import ImageDataset
from common.files import atomic_write_text
from common.learner import LEARNERS, _batched, build_learner
from common.models import Discriminator, GanShape
from common.state_layout import row_checks_folder
from common.wire import quoted

log = logging.getLogger("fedsynth.site")


def _same_rows(rows_of, n: int, rng: np.random.Generator) -> bool:
    """Whether ``rows_of(idx)`` (one result row per index, in a fixed batch of ``n``) gives each row the same bits
    permuted, beside other rows, and in a short padded batch. Indices < 2n are valid."""
    base_idx = np.arange(n)
    base = rows_of(base_idx)
    perm = rng.permutation(n)
    mates = np.concatenate([np.arange(n, n + n // 2), base_idx[n // 2:]])  # half the rows replaced by others
    return (np.array_equal(rows_of(base_idx[perm]), base[perm])
            and np.array_equal(rows_of(mates)[n // 2:], base[n // 2:])
            and np.array_equal(rows_of(base_idx[: max(1, n - 7)]), base[: max(1, n - 7)]))


def batch_mate_problems(image_shape: tuple[int, int, int], num_classes: int, *, evaluation: bool,
                        audits: bool) -> list[str]:
    """What on this machine makes a record's answer depend on the other records (empty: nothing), for a site
    with images of ``image_shape`` (C, H, W) answering evaluation queries and/or audits."""
    rng = np.random.default_rng(0)
    problems = []
    if evaluation:
        n = evaluation_batch(image_shape)
        images = rng.random((2 * n, *image_shape), dtype=np.float32)  # (2n, C, H, W)
        for name in LEARNERS:
            torch.manual_seed(0)
            model = build_learner(name, image_shape, num_classes, allow_import=False)

            def logits(idx: np.ndarray) -> np.ndarray:  # (len(idx), K), each row in the site's fixed batches
                return np.concatenate(_batched(lambda m, t: m(t), model, images[idx], "cpu", n, True))

            if not _same_rows(logits, n, rng):
                problems.append(f"the {name} classifier's logits of an image change with the other images in its "
                                "batch")
    if audits:
        rows, cols = audit_block(image_shape)
        values = int(np.prod(image_shape))
        records = torch.from_numpy(rng.random((2 * rows, values), dtype=np.float32))  # (2 rows, D)
        synthetic = torch.zeros(cols, values)  # (cols, D): a few images, the rest padding, as an audit's block
        few = min(16, cols)  # (large images: audit_block's blocks of fewer images)
        synthetic[:few] = torch.rand(few, values, generator=torch.Generator().manual_seed(0))
        synthetic_sq = (synthetic * synthetic).sum(1)

        def distances(idx: np.ndarray) -> np.ndarray:  # (len(idx), cols) from one fixed, padded block of records
            block = torch.zeros(rows, values)
            block[: len(idx)] = records[idx]
            return _sq_block(block, (block * block).sum(1), synthetic, synthetic_sq)[: len(idx)].numpy()

        def exact(idx: np.ndarray) -> np.ndarray:  # (len(idx),) float64 distances to the first synthetic image
            mine = records[idx].numpy()
            return _exact_sq(mine, np.broadcast_to(synthetic[0].numpy(), mine.shape))

        if not _same_rows(distances, rows, rng) or not _same_rows(exact, rows, rng):
            problems.append("an image's distance to the synthetic images changes with the other images in its block")
    return problems


CHECK_CLASSES = 100  # classes the training check's nets have at most (below)
CHECK_SIDE = 32  # the side the training check's nets work at for larger images (the rule both modes use up to 64)


def training_problems(image_shape: tuple[int, int, int], num_classes: int, modes: tuple[str, ...],
                      device: torch.device | str = "cpu") -> list[str]:
    """What on this machine makes a record's contribution to a training release depend on the other records (empty:
    nothing), for a site with images of ``image_shape`` (C, H, W) that trains in ``modes`` (dpgan, bnstats) on
    ``device``, at the default widths (a run's own widths are checked at its first request:
    :func:`check_network_rows`)."""
    channels, side = image_shape[0], image_shape[1]
    # (at most CHECK_CLASSES classes: the class count sizes only the heads and D's label embedding, whose per-sample
    # gradients at 1,000 classes took this check 18 s and 3 GiB, review s62; the rows' shapes are the site's own)
    num_classes = min(num_classes, CHECK_CLASSES)
    resolution = 0 if side <= CHECK_SIDE else CHECK_SIDE
    problems = []
    if "bnstats" in modes:
        torch.manual_seed(0)
        net = BNNet(channels, num_classes, side, head_norm=True, resolution=resolution)
        problems += bnnet_problems(net, image_shape, num_classes, device=device)
    if "dpgan" in modes:
        torch.manual_seed(0)
        problems += discriminator_problems(Discriminator(GanShape(channels, side, num_classes, resolution=resolution),
                                                         width=16), image_shape, num_classes, device=device)
    return problems


def bnnet_problems(net: BNNet, image_shape: tuple[int, int, int], num_classes: int, *,
                   gradients: bool = True, device: torch.device | str = "cpu") -> list[str]:
    """What on this machine makes a record's statistics features (its block's, ``RECORD_BLOCK_ROWS``) or, with
    ``gradients``, its per-sample gradient of the shared ``net`` (its chunk's) depend on the other records, on
    ``device`` (where the site computes them)."""
    rng = np.random.default_rng(1)
    rows = RECORD_BLOCK_ROWS
    images = rng.random((2 * rows, *image_shape), dtype=np.float32)  # (2 rows, C, H, W)

    def features(idx: np.ndarray) -> np.ndarray:  # (len(idx), sum of 2 C_l + L): features and block norms
        data = ImageDataset(images[idx], np.zeros(len(idx), np.int64), tuple(map(str, range(num_classes))))
        parts = []
        for _, blocks in iter_record_blocks(net, data, device=device):
            norms = [pad_rows(b, rows).norm(dim=1, keepdim=True)[:len(b)] for b in blocks.values()]
            parts.append(torch.cat([*blocks.values(), *norms], dim=1))
        return torch.cat(parts).cpu().numpy()

    problems = []
    if not _same_rows(features, rows, rng):
        problems.append("a record's statistics features change with the other records in its block")
    # (the same net: the features' pass leaves its weights as they were)
    if gradients and not _same_rows(_gradients(net, lambda m, x, y: nn_cross_entropy(m(x), y), image_shape,
                                               num_classes, rng, device), DPSGD_CHUNK, rng):
        problems.append("a record's per-sample gradient of the shared net changes with the other records in its chunk")
    return problems


def discriminator_problems(disc: torch.nn.Module, image_shape: tuple[int, int, int], num_classes: int, *,
                           device: torch.device | str = "cpu") -> list[str]:
    """What on this machine makes a record's per-sample gradient of the discriminator ``disc`` (its chunk's), on
    ``device``, depend on the other records."""
    def judged(m, x, y):  # (rows,) a real pass's loss per row: the logit and the class logits, as a D step's
        logit, class_logits = m(x, y)
        return logit.reshape(len(x)) + nn_cross_entropy(class_logits, y)

    rng = np.random.default_rng(1)
    if _same_rows(_gradients(disc, judged, image_shape, num_classes, rng, device), DPSGD_CHUNK, rng):
        return []
    return ["a record's per-sample gradient of the discriminator changes with the other records in its chunk"]


def generator_problems(gen: torch.nn.Module, latent_dim: int, num_classes: int, *,
                       device: torch.device | str = "cpu") -> list[str]:
    """What on this machine makes the fake G draws for a chunk's row depend on the chunk's other rows: each record of
    a D step is paired with the fake at its place (client.dpgan.discriminator_backward draws a chunk's fakes in one
    zero-padded pass), so a fake rounded by its place would move a record's clipped contribution as its own per-sample
    gradient would (review s63's seventh: none on this machine)."""
    rng = np.random.default_rng(1)
    dev = torch.device(device)
    latents = torch.from_numpy(rng.standard_normal((2 * DPSGD_CHUNK, latent_dim)).astype(np.float32)).to(dev)
    labels = torch.from_numpy(rng.integers(0, num_classes, 2 * DPSGD_CHUNK)).to(dev)
    gen = gen.to(dev)

    def fakes(idx: np.ndarray) -> np.ndarray:  # (len(idx), C, H, W): each row's fake, from one padded chunk
        z = torch.zeros(DPSGD_CHUNK, latent_dim, device=dev)
        y = torch.zeros(DPSGD_CHUNK, dtype=torch.long, device=dev)
        z[:len(idx)], y[:len(idx)] = latents[idx], labels[idx]
        with torch.no_grad():
            return gen.eval()(z, y)[:len(idx)].cpu().numpy()

    if _same_rows(fakes, DPSGD_CHUNK, rng):
        return []
    return ["the generator's fake for a record's place changes with the other rows of its chunk"]


def check_network_rows(state_dir: Path, what: str, shape: dict, network: torch.nn.Module,
                       problems_of: Callable[[torch.device], list[str]], device: torch.device | str = "cpu") -> None:
    """Refuse (before any charge) a run whose network, of the ``shape`` its request chose, this machine computes with
    a record's rows rounded by their place in the block or chunk (``problems_of(device)``, at random weights, on random
    images of the site's shape); a shape found sound is remembered in ``<state>/row-checks/`` (keyed as below). The
    start-up check covers the default widths only: on this machine a linear layer of 64 rows sums a row in another
    order by its place when its input size is not a multiple of 4, which an odd width gives the heads at 28 pixels, and with finite weights near float32's limit a coordinator turned that into a
    logit that is NaN at even places and finite at odd ones, so that one added record moved every later record of
    its chunk between a zeroed and a clipped gradient: a DP-SGD step's sum moved by L2 30 against the clip bound 1
    (review s63). Whether a shape passes is a property of the machine and the request, never of the records. The key
    holds every tensor shape of ``network`` (the run's, built as its round builds it: a setting the request leaves to
    the site, D's width from G's, is in it) besides the request's ``shape`` settings, and the CPU capability torch
    dispatches its kernels by, the Opacus version and ROW_CHECK_VERSION; and the ``device`` the run computes on
    (:func:`device_key`), the one ``problems_of`` is handed to check on (until 2026-12-07 the check ran on the CPU even
    where the run's device setting had the site train on its GPU)."""
    tensors = [[name, list(t.shape)] for name, t in network.state_dict().items()]
    key = json.dumps({"what": what, **shape, "tensors": tensors, "network": type(network).__name__,
                      "torch": torch.__version__, "opacus": opacus.__version__, "check": ROW_CHECK_VERSION,
                      "threads": torch.get_num_threads(), "machine": platform.machine(),
                      "cpu": torch.backends.cpu.get_cpu_capability(), "device": device_key(device)}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()
    mark = row_checks_folder(state_dir) / f"{digest}.ok"
    if digest in _PASSED or mark.exists():
        return
    # seeded random weights, torch's global stream left as it was, and held against the simulation's other sites'
    # threads, whose seeded D inits draw from the same stream (review s63's sixth: 16 of 988 inits differed); the
    # simulation's sites, threads of one process, check a shape once between them (they wait here for the first)
    dev = torch.device(device)
    with TORCH_SEED_LOCK, torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        if digest in _PASSED:
            return
        torch.manual_seed(0)
        problems = problems_of(dev)  # (on the device the key names: one value for both)
        if not problems:
            _PASSED.add(digest)
    if problems:
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"on this site's machine {'; '.join(problems)} at the {what} shape "
                                             f"this run asks for ({quoted(json.dumps(shape, sort_keys=True))}), so "
                                             "one record could move others' contributions past the noise's "
                                             "sensitivity: use another width (the defaults pass where the site "
                                             f"started){_on_gpu(dev)}")
    try:  # (best effort: unremembered, the next request checks again; a full disk is the free-disk check's to say;
        # at most MAX_ROW_CHECK_MARKS: each new shape a coordinator names is checked before any charge, review s63's
        # eighth, so past that it is checked again each time rather than remembered without bound)
        if not mark.parent.is_dir() or len(os.listdir(mark.parent)) < MAX_ROW_CHECK_MARKS:
            atomic_write_text(mark, key)
    except OSError as err:
        log.warning("could not remember a checked network shape in %s (%s)", mark.parent, type(err).__name__)


# Environment settings that change which GPU kernels run or how they round (review s65): a mark made under one
# setting is not trusted under another
GPU_KERNEL_ENV = ("NVIDIA_TF32_OVERRIDE", "CUBLAS_WORKSPACE_CONFIG", "TORCH_CUDNN_V8_API_DISABLED")


def device_key(device: torch.device | str) -> str:
    """What the row checks' result depends on besides the CPU: "cpu", or the GPU's name, compute capability, the
    CUDA and cuDNN versions torch runs it with, torch's TF32 switches and GPU_KERNEL_ENV."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev.type
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    tf32 = f"tf32:{int(torch.backends.cuda.matmul.allow_tf32)}{int(torch.backends.cudnn.allow_tf32)}"
    env = ",".join(f"{name}={os.environ.get(name, '')}" for name in GPU_KERNEL_ENV)
    return (f"cuda:{torch.cuda.get_device_name(index)}:sm{major}{minor}:cuda{torch.version.cuda}:"
            f"cudnn{torch.backends.cudnn.version()}:{tf32}:{env}")


def _on_gpu(device: torch.device) -> str:
    return (" or have the site compute on its CPU (device: cpu in site.yaml); this check ran on the GPU the run's "
            "device setting chose") if device.type == "cuda" else ""


_PASSED: set[str] = set()  # shapes this process found sound (the in-process simulation's sites share them)
MAX_ROW_CHECK_MARKS = 10_000  # shapes a state folder remembers (files of ~200 bytes)
# Bump when the check, or the networks' forward passes it covers, change: a mark of the older check is not trusted
# (review s63's eighth: after an upgrade that kept torch's version, a shape passed before was never checked again)
ROW_CHECK_VERSION = 2


def nn_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # (rows,)


def _gradients(model: torch.nn.Module, row_losses, image_shape: tuple[int, int, int], num_classes: int,
               rng: np.random.Generator, device: torch.device | str = "cpu"):
    """rows_of(idx) for :func:`_same_rows`: the per-sample gradients of ``model`` for the rows ``idx`` of 2 DPSGD_CHUNK
    random images, in one zero-padded chunk of DPSGD_CHUNK rows on ``device``, as client.dpsgd takes them:
    (len(idx),) digests of each row's bits."""
    from opacus import GradSampleModule

    dev = torch.device(device)
    model.to(dev)
    images = opacus_input(rng.random((2 * DPSGD_CHUNK, *image_shape), dtype=np.float32), dev)
    labels = torch.from_numpy(rng.integers(0, num_classes, 2 * DPSGD_CHUNK)).to(dev)

    def rows_of(idx: np.ndarray) -> np.ndarray:
        x = torch.zeros(DPSGD_CHUNK, *image_shape, device=dev)
        y = torch.zeros(DPSGD_CHUNK, dtype=torch.long, device=dev)
        weight = torch.zeros(DPSGD_CHUNK, device=dev)
        x[:len(idx)], y[:len(idx)], weight[:len(idx)] = images[idx], labels[idx], 1.0
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        try:
            with warnings.catch_warnings():  # (the input needs no grad: torch's note on the first conv's hook)
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                (row_losses(gsm, x, y) * weight).sum().backward()
            # each row's gradient as a digest of its bits, parameter by parameter: no copy of the chunk's gradients
            # beside Opacus' own (review s63's fifth: whole copies took the check to twice a DP step's memory)
            digests = [hashlib.blake2b(digest_size=16) for _ in idx]
            for p in model.parameters():
                grad = p.grad_sample.reshape(DPSGD_CHUNK, -1).detach().cpu().numpy()  # (DPSGD_CHUNK, p's values)
                for row, digest in enumerate(digests):
                    digest.update(grad[row].tobytes())
            return np.array([d.digest() for d in digests], dtype=object)
        finally:
            gsm.zero_grad(set_to_none=True)
            gsm.cleanup()

    return rows_of
