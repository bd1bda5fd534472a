"""Speed benchmark: the cost of DP at a site and the throughput of both synthesis modes (CPU, one run).

What it measures, side by side, on random 28x28 grayscale data with 10 classes (MNIST shapes; speed
does not depend on pixel values):

1. The discriminator's DP-SGD step exactly as ``client.dpgan.LocalGanTrainer`` does it (Poisson mask,
   fake batch from G, TWO forward passes of b rows each, real then fake (``discriminator_loss``), one
   backward, Opacus ``GradSampleModule`` "hooks" summing row i of both passes' per-sample gradients
   (record i's sample is the pair (real_i, fake_i), clipped jointly), ``DPOptimizer`` step), against the
   trainer's own non-DP step of the same discriminator (plain autograd + the same Adam, same expected
   batch), at batch 256 and 64. Both are timed by calling ``LocalGanTrainer.train_round`` with D steps
   only (``d_steps_per_g`` > ``steps``); the round's fixed cost (a 0-step round) is subtracted.
   Result: ms/step and the ratio DP / non-DP.
2. The same DP step with Opacus' other per-sample-gradient modes: "functorch" and "ew" (expanded
   weights) through the same trainer (its ``GradSampleModule`` swapped for the mode's class), and
   "fgc" (fast gradient clipping) and "ghost" (ghost clipping) with a small re-implementation of the
   step (``OwnDStep``), since they need a per-record loss vector and another optimizer. Each uses the
   first D-step formulation Opacus accepts, the trainer's two-pass one first: fgc runs the two-pass
   step (Opacus accumulates row i of both passes before taking norms); ghost clipping refuses a
   module used twice in one step ("Parameter tying is not supported"), so ghost runs the one-pass step
   (concatenated real+fake) with the pair's norms computed jointly (paired per-sample gradients /
   paired ghost norms); the row's note says which and why. Their per-record norms are checked against
   the trainer's on one batch (in the note). "hooks_own" runs the re-implementation with the trainer's
   own ``discriminator_loss``, i.e. the trainer's computation, so it shows whether the re-implemented
   rows are comparable with the trainer rows. "hooks_one_pass" is the one-pass alternative (one forward
   over the 2b concatenated rows, then rows i and b+i of every ``p.grad_sample`` summed before the
   optimizer step; ``one_pass_vs_two_pass`` in the JSON). The trainer does not use it: measured slower
   than two passes at batch 256 (143 vs 101 ms/step; the (2b, ...) per-sample gradient buffers miss
   the allocator's cache and page-fault; within a few per cent at batch 64).
   A mode that errors is recorded with its message.
3. Throughput: a full local step of the trainer (D step + G step) in real images/s, DP and non-DP;
   the BN-statistics mode's federated DP-SGD local step (``client.dpsgd.train_dpsgd_local``, shared
   ``common.bnnet.BNNet``) against a plain non-DP loop of the same net; DP-GAN sampling
   (``server.synthesis.sample_generator``) and BN-statistics synthesis (``server.bnsynth.synthesize``
   with the ``bn-*`` defaults of ``pyproject.toml``; one batch of ``bn-synth-batch`` images) in images/s.
4. Where the hooks-mode DP step's time goes: a cProfile breakdown and the top torch ops (torch.profiler).

Timings are medians over ``--repeats`` repeats after a warm-up, with the configurations interleaved
(the order rotates every repeat) so that background load hits all of them alike.

Run (about 3 min with the defaults on a 2-core box, 1 thread):

  cd /work/main && PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_speed.py
  PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_speed.py --threads 2 --batch-sizes 256 --repeats 7

Writes tests/benchmarks/results/speed.json (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import inspect
import json
import math
import os
import platform
import pstats
import shlex
import statistics
import sys
import tempfile
import time
import tomllib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import client.dpgan as dpgan_module  # noqa: E402
import opacus  # noqa: E402
from client.bnstats import record_class_statistics  # noqa: E402
from client.dpgan import LocalGanTrainer, RoundSettings, discriminator_loss  # noqa: E402
from client.dpsgd import train_dpsgd_local  # noqa: E402
from common.bnnet import BNNet  # noqa: E402
from common.data import ImageDataset  # noqa: E402
from common.models import Discriminator, GanShape, Generator  # noqa: E402
from opacus import GradSampleModule  # noqa: E402
from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping  # noqa: E402
from opacus.grad_sample import grad_sample_module_fast_gradient_clipping as fgc_module  # noqa: E402
from opacus.grad_sample.embedding import compute_embedding_norm_sample  # noqa: E402
from opacus.grad_sample.linear import compute_linear_norm_sample  # noqa: E402
from opacus.optimizers import DPOptimizerFastGradientClipping  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping  # noqa: E402
from server.bnsynth import pool_statistics, synthesize  # noqa: E402
from server.synthesis import sample_generator  # noqa: E402

warnings.filterwarnings("ignore", message="Full backward hook is firing")
warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="In CPU autocast")  # Opacus' functorch path on CPU

BAR = 1.5  # the product's bar: DP D step <= 1.5x the non-DP D step
ERROR_HINTS = {  # error text -> why, for the JSON
    "Expanded Weights needs an input with a batch size":
        "torch's ExpandedWeights embedding rule wants (B, L) indices; the discriminator's projection "
        "embedding takes the (B,) labels, so the 'ew' mode cannot run this model unchanged",
}
CPU = torch.device("cpu")
_ORIG_CREATE_NORM_SAMPLE = fgc_module.create_norm_sample


# ---- settings ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the box has 2 cores)")
    p.add_argument("--batch-sizes", default="256,64", help="expected Poisson batch sizes of the D step")
    p.add_argument("--modes", default="hooks,functorch,ew,fgc,ghost,hooks_own,hooks_one_pass",
                   help="Opacus per-sample-gradient modes to time (hooks is the trainer's own)")
    p.add_argument("--records", type=int, default=5000, help="random 28x28 records at the site")
    p.add_argument("--steps", type=int, default=10, help="D steps per timed measurement")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats; the median is reported")
    p.add_argument("--gan-width", type=int, default=24, help="generator base width (MNIST benchmark)")
    p.add_argument("--gan-d-width", type=int, default=16, help="discriminator base width (MNIST benchmark)")
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--noise", type=float, default=1.0, help="noise multiplier of the DP steps")
    p.add_argument("--bn-batch", type=int, default=256, help="expected batch of the BN net's DP-SGD step")
    p.add_argument("--bn-steps", type=int, default=8, help="BN DP-SGD steps per timed measurement")
    p.add_argument("--sample-images", type=int, default=5000, help="images per DP-GAN sampling measurement")
    p.add_argument("--bn-iterations", type=int, default=0, help="BN synthesis iterations (0 = pyproject default)")
    p.add_argument("--profile-steps", type=int, default=6, help="hooks D steps profiled (0 = no profile)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "tests" / "benchmarks" / "results" / "speed.json"))
    return p.parse_args(argv)


def run_defaults() -> dict[str, Any]:
    """The run settings' defaults ([tool.flwr.app.config] of pyproject.toml)."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def machine_info(threads: int) -> dict[str, Any]:
    """Versions, threads and CPU of this run (the load average shows the background load)."""
    model = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {
        "torch": torch.__version__, "opacus": opacus.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_model": model, "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads, "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(CPU), "mkldnn": torch.backends.mkldnn.is_available(),
        "loadavg_start": list(os.getloadavg()),
    }


def random_dataset(n: int, seed: int, size: int = 28, classes: int = 10) -> ImageDataset:
    """n random grayscale images (n, 1, size, size) in [0, 1], labels cycling over the classes."""
    rng = np.random.default_rng(seed)
    images = rng.random((n, 1, size, size), dtype=np.float32)
    labels = (np.arange(n) % classes).astype(np.int64)
    return ImageDataset(images=images, labels=labels, classes=tuple(str(k) for k in range(classes)),
                        source="random")


# ---- interleaved timing ----------------------------------------------------------------------------

@dataclass
class Timer:
    """One configuration: ``measure()`` returns seconds per step; samples collect over the repeats."""

    name: str
    measure: Callable[[], float]
    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median_ms(self) -> float | None:
        return 1000 * statistics.median(self.samples) if self.samples else None


def _short_error(err: Exception) -> str:
    """One line of an exception's type and message (300 characters at most)."""
    text = f"{type(err).__name__}: {err}".split(", tensor(")[0]  # no tensor dumps
    return " ".join(text.split())[:300]


def warm_up(timers: list[Timer]) -> None:
    """One untimed measurement each; a configuration that raises is kept with its error and skipped."""
    for t in timers:
        try:
            t.measure()
        except Exception as err:  # noqa: BLE001 - a mode that fails is a result, not a crash
            t.error = _short_error(err)
            print(f"  {t.name}: ERROR {t.error}", flush=True)


def interleave(timers: list[Timer], repeats: int) -> None:
    """``repeats`` rounds over the working timers, the order rotated each round."""
    live = [t for t in timers if t.error is None]
    for r in range(repeats):
        k = r % max(1, len(live))
        for t in live[k:] + live[:k]:
            t.samples.append(t.measure())


# ---- 1+2. the discriminator step through LocalGanTrainer -----------------------------------------

def gsm_factory(mode: str) -> Callable[..., Any]:
    """What ``client.dpgan`` should call instead of ``GradSampleModule(disc, loss_reduction="sum")``."""
    if mode == "hooks":
        return GradSampleModule
    if mode == "functorch":
        return functools.partial(GradSampleModule, force_functorch=True)
    if mode == "ew":
        return lambda m, loss_reduction: GradSampleModuleExpandedWeights(m, loss_reduction=loss_reduction)
    raise ValueError(mode)


@contextlib.contextmanager
def grad_sample_mode(mode: str) -> Iterator[None]:
    """Temporarily make the trainer wrap its discriminator with ``mode``'s GradSampleModule class."""
    original = dpgan_module.GradSampleModule
    dpgan_module.GradSampleModule = gsm_factory(mode)
    try:
        yield
    finally:
        dpgan_module.GradSampleModule = original


@dataclass
class GanBench:
    """A site with random data and the shapes of the MNIST benchmark."""

    shape: GanShape
    data: ImageDataset
    d_width: int
    state_dir: Path

    def trainer(self, tag: str) -> LocalGanTrainer:
        return LocalGanTrainer(self.shape, self.data, self.state_dir / f"{tag}.pt", CPU, progress=False, label=tag)

    def settings(self, batch: int, noise: float, steps: int, d_only: bool, seed: int) -> RoundSettings:
        # d_steps_per_g > steps: the round never reaches a G step (D steps only).
        return RoundSettings(noise_multiplier=noise, sample_rate=batch / len(self.data), steps=steps,
                             max_grad_norm=1.0, lr_d=1e-3, lr_g=1e-3, seed=seed,
                             d_steps_per_g=steps + 1 if d_only else 1, d_width=self.d_width, ac_weight=0.3)


def trainer_timer(bench: GanBench, name: str, mode: str, rs: RoundSettings) -> Timer:
    """Seconds per step of ``train_round``: (round of rs.steps - round of 0 steps) / rs.steps."""
    trainer = bench.trainer(name.replace(" ", "_"))
    gen_state = Generator(bench.shape).state_dict()
    empty = replace(rs, steps=0)

    def round_seconds(settings: RoundSettings) -> float:
        with grad_sample_mode(mode):
            t0 = time.perf_counter()
            trainer.train_round(gen_state, settings)
            return time.perf_counter() - t0

    def measure() -> float:
        fixed = round_seconds(empty)  # models, optimizers, GradSampleModule, state load/save
        return max(0.0, round_seconds(rs) - fixed) / rs.steps

    return Timer(name, measure)


OWN_MODES = {  # benchmark mode -> (OwnDStep mode, D-step formulations to try in order; the first accepted runs)
    "hooks_own": ("hooks", ("two_pass",)),  # the trainer's step: its own discriminator_loss (two passes)
    "hooks_one_pass": ("hooks", ("one_pass",)),  # one pass over 2b rows + rows i and b+i summed (not used)
    "fgc": ("fgc", ("two_pass", "one_pass")),
    "ghost": ("ghost", ("two_pass", "one_pass")),  # Opacus' ghost clipping refuses a module used twice
}
MODE_NOTES = {
    "hooks": "LocalGanTrainer.train_round as is (Opacus GradSampleModule hooks, two D passes of b rows: real, "
             "fake; Opacus sums row i of both)",
    "functorch": "LocalGanTrainer.train_round with GradSampleModule(force_functorch=True)",
    "ew": "LocalGanTrainer.train_round with GradSampleModuleExpandedWeights",
    "hooks_own": "re-implemented step, same computation as the trainer: its discriminator_loss (real pass, fake "
                 "pass; Opacus sums row i of both passes' per-sample gradients) + DPOptimizer",
    "hooks_one_pass": "the one-pass alternative, re-implemented (the trainer does not use it): one D forward over "
                      "the 2b concatenated real+fake rows, one backward, rows i and b+i of every p.grad_sample "
                      "summed before the DPOptimizer step (record i = the pair (real_i, fake_i))",
    "fgc": "fast gradient clipping; per-record loss = loss(real_i) + loss(fake_i)",
    "ghost": "ghost clipping; per-record loss = loss(real_i) + loss(fake_i)",
}
FORMULATION_NOTES = {
    ("fgc", "two_pass"): "on the trainer's two-pass step (Opacus accumulates row i of both passes' per-sample "
                         "gradients, then takes their norms)",
    ("fgc", "one_pass"): "on the one-pass step, per-sample gradients paired (rows i + b+i) before Opacus takes "
                         "their norms",
    ("ghost", "two_pass"): "on the trainer's two-pass step",
    ("ghost", "one_pass"): "on the one-pass step; Linear/Embedding norms of the pair (real_i, fake_i) from Opacus' "
                           "own norm samplers on a (b, 2, ...) view, conv/GroupNorm as in fgc (paired per-sample "
                           "gradients)",
}


def one_pass_loss(d_model: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor,
                  ac_weight: float) -> torch.Tensor:
    """The one-pass D loss: one forward over the 2b rows [real; fake] (same labels twice), summed.

    Equals ``discriminator_loss``'s loss; under Opacus hooks it leaves (2b, ...) per-sample gradients
    that :func:`pair_grad_samples` folds to the b records.
    """
    b = len(real)
    adv, cls = d_model(torch.cat([real, fake]), torch.cat([labels, labels]))  # (2b,), (2b, K)
    is_real = torch.cat([torch.ones(b), torch.zeros(b)])  # (2b,)
    return (F.binary_cross_entropy_with_logits(adv, is_real, reduction="sum")
            + ac_weight * F.cross_entropy(cls[:b], labels, reduction="sum"))


def pair_grad_samples(params: Iterable[torch.Tensor], b: int) -> None:
    """(2b, ...) per-sample gradients of the one-pass step -> (b, ...): row i + row b+i (record i's pair)."""
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is not None:
            p.grad_sample = gs[:b] + gs[b:]


def pair_losses(d_model: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor,
                ac_weight: float) -> torch.Tensor:
    """(b,) per-record losses of the one-pass D step: row i = loss(real_i) + loss(fake_i).

    Their sum is :func:`one_pass_loss` (same single forward over the 2b concatenated rows);
    fast-gradient/ghost clipping need the per-record vector.
    """
    b = len(real)
    adv, cls = d_model(torch.cat([real, fake]), torch.cat([labels, labels]))  # (2b,), (2b, K)
    is_real = torch.cat([torch.ones(b), torch.zeros(b)])  # (2b,)
    bce = F.binary_cross_entropy_with_logits(adv, is_real, reduction="none")  # (2b,)
    return bce[:b] + bce[b:] + ac_weight * F.cross_entropy(cls[:b], labels, reduction="none")


def two_pass_losses(d_model: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor,
                    ac_weight: float) -> torch.Tensor:
    """(b,) per-record losses of the trainer's two-pass D step: row i = loss(real_i) + loss(fake_i).

    Their sum is ``discriminator_loss``'s loss (real pass, then fake pass; the fake class logits enter
    with weight 0 so that every head's hooks fire in both passes, as in the trainer).
    """
    real_adv, real_cls = d_model(real, labels)  # (b,), (b, K)
    fake_adv, fake_cls = d_model(fake, labels)
    return (F.binary_cross_entropy_with_logits(real_adv, torch.ones_like(real_adv), reduction="none")
            + F.binary_cross_entropy_with_logits(fake_adv, torch.zeros_like(fake_adv), reduction="none")
            + ac_weight * F.cross_entropy(real_cls, labels, reduction="none") + 0.0 * fake_cls.sum(1))


def _paired_create_norm_sample(*, param: torch.Tensor, grad_sample: torch.Tensor, max_batch_len: int) -> None:
    """Opacus' FGC ``create_norm_sample`` on the paired (b-row) per-sample gradient of the 2b-row pass."""
    b = len(grad_sample) // 2
    param.grad_sample = grad_sample
    pair_grad_samples([param], b)  # (2b, ...) -> (b, ...)
    _ORIG_CREATE_NORM_SAMPLE(param=param, grad_sample=param.grad_sample, max_batch_len=b)


def _as_pairs(t: torch.Tensor) -> torch.Tensor:
    """(2b, ...) rows [real; fake] -> (b, 2, ...): row i = (real_i, fake_i), a 'sequence' of 2."""
    b = len(t) // 2
    return torch.stack([t[:b], t[b:]], dim=1)


def _paired_linear_norms(layer: torch.nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Ghost norms of the pair's summed Linear gradient (Opacus' 3D rule: norm of the sum over the 2 rows)."""
    return compute_linear_norm_sample(layer, [_as_pairs(activations[0])], _as_pairs(backprops))


def _paired_embedding_norms(layer: torch.nn.Module, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Ghost norms of the pair's summed Embedding gradient: (b, 2) indices, (b, 2, D) backprops."""
    return compute_embedding_norm_sample(layer, [_as_pairs(activations[0])], _as_pairs(backprops))


@contextlib.contextmanager
def paired_fgc_norms() -> Iterator[None]:
    """While active, Opacus' FGC/ghost hooks take norms of the paired per-sample gradients (b records)."""
    fgc_module.create_norm_sample = _paired_create_norm_sample
    try:
        yield
    finally:
        fgc_module.create_norm_sample = _ORIG_CREATE_NORM_SAMPLE


class OwnDStep:
    """The trainer's D step re-implemented for modes that need another loss/optimizer or the other scheme.

    Same per-step work as ``LocalGanTrainer.train_round``: Poisson mask, fake batch from G (no grad),
    D on the real and fake rows with the same labels, BCE + ac_weight * CE, one DP-SGD Adam step, and
    record i's sample is the pair (real_i, fake_i), clipped jointly. ``mode`` x ``form``:
    "hooks"/"two_pass" - the trainer's own computation (its ``discriminator_loss``: real pass, fake pass);
    "hooks"/"one_pass" - one forward over the 2b concatenated rows, then :func:`pair_grad_samples`;
    "fgc"/"ghost" - Opacus' fast-gradient / ghost clipping with the (b,) per-record loss of
    :func:`two_pass_losses` (two passes, Opacus accumulating row i of both) or :func:`pair_losses`
    (one pass, norms paired by :func:`paired_fgc_norms` and the paired ghost norm samplers).
    """

    def __init__(self, bench: GanBench, mode: str, form: str, batch: int, noise: float, seed: int) -> None:
        if form not in ("one_pass", "two_pass"):
            raise ValueError(form)
        torch.manual_seed(seed)
        self.bench, self.mode, self.form = bench, mode, form
        self.q = batch / len(bench.data)
        self.ac_weight = 0.3
        self.x = torch.from_numpy(bench.data.images) * 2 - 1  # (N, 1, 28, 28) in [-1, 1]
        self.y = torch.from_numpy(bench.data.labels)  # (N,)
        self.gen = Generator(bench.shape)
        self.disc = Discriminator(bench.shape, width=bench.d_width)
        inner = torch.optim.Adam(self.disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
        if mode == "hooks":
            self.model = GradSampleModule(self.disc, loss_reduction="sum")
            self.opt = dpgan_module.DPOptimizer(inner, noise_multiplier=noise, max_grad_norm=1.0,
                                                expected_batch_size=batch, loss_reduction="mean")
        elif mode in ("fgc", "ghost"):
            self.model = GradSampleModuleFastGradientClipping(
                self.disc, loss_reduction="sum", max_grad_norm=1.0, use_ghost_clipping=mode == "ghost")
            if form == "one_pass":
                # instance attribute: only this module's Linear/Embedding get the paired ghost norms
                self.model.NORM_SAMPLERS = {torch.nn.Linear: _paired_linear_norms,
                                            torch.nn.Embedding: _paired_embedding_norms}
            self.opt = DPOptimizerFastGradientClipping(inner, noise_multiplier=noise, max_grad_norm=1.0,
                                                       expected_batch_size=batch, loss_reduction="mean")
        else:
            raise ValueError(mode)
        self.sampler = torch.Generator().manual_seed(seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Poisson batch and its fake batch: (b, 1, 28, 28) real, (b, 1, 28, 28) fake, (b,) labels."""
        idx = (torch.rand(len(self.y), generator=self.sampler) < self.q).nonzero().squeeze(1)  # (b,)
        xb, yb = self.x[idx], self.y[idx]
        with torch.no_grad():
            fake = self.gen(self.gen.sample_latent(len(idx)), yb)
        return xb, fake, yb

    def backward(self, xb: torch.Tensor, fake: torch.Tensor, yb: torch.Tensor) -> None:
        """Per-sample gradients (hooks) or the clipped gradient sum (fgc/ghost) of one D step."""
        b = len(yb)
        if self.mode == "hooks" and self.form == "two_pass":  # exactly LocalGanTrainer.train_round's D step
            loss, _ = discriminator_loss(self.model, xb, fake, yb, self.ac_weight)
            loss.backward()
        elif self.mode == "hooks":  # one pass over 2b rows, then rows i and b+i summed
            one_pass_loss(self.model, xb, fake, yb, self.ac_weight).backward()
            pair_grad_samples(self.disc.parameters(), b)
        elif self.form == "two_pass":  # Opacus accumulates row i of both passes before taking norms
            loss = two_pass_losses(self.model, xb, fake, yb, self.ac_weight)  # (b,)
            DPTensorFastGradientClipping(self.model, self.opt, loss, loss_reduction="sum").backward()
        else:  # first backward: paired per-record norms; second: the clipped sum (Opacus' DPTensor does both)
            with paired_fgc_norms():
                loss = pair_losses(self.model, xb, fake, yb, self.ac_weight)  # (b,)
                DPTensorFastGradientClipping(self.model, self.opt, loss, loss_reduction="sum").backward()

    def step(self) -> None:
        xb, fake, yb = self.batch()
        self.opt.zero_grad(set_to_none=True)
        self.backward(xb, fake, yb)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def seconds_per_step(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - t0) / steps

    def record_norms(self, xb: torch.Tensor, fake: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """(b,) per-record gradient norms this mode clips (for the cross-check against the trainer's)."""
        self.opt.zero_grad(set_to_none=True)
        self.backward(xb, fake, yb)
        if self.mode in ("fgc", "ghost"):
            norms = self.model.per_sample_gradient_norms.detach().clone()
        else:
            norms = torch.stack([p.grad_sample.reshape(len(yb), -1).norm(dim=1)
                                 for p in self.disc.parameters()]).norm(dim=0)
        self.opt.zero_grad(set_to_none=True)
        return norms


def norm_check(bench: GanBench, mode: str, form: str, batch: int, seed: int) -> float:
    """Max relative difference between ``mode``'s per-record norms and the trainer's (hooks, two passes)."""
    ref = OwnDStep(bench, "hooks", "two_pass", batch, 0.0, seed)
    other = OwnDStep(bench, mode, form, batch, 0.0, seed)
    other.disc.load_state_dict(ref.disc.state_dict())
    xb, fake, yb = ref.batch()
    a, b = ref.record_norms(xb, fake, yb), other.record_norms(xb, fake, yb)
    return float(((a - b).abs() / a.clamp(min=1e-12)).max())


def own_timer(bench: GanBench, name: str, mode: str, batch: int, noise: float, steps: int, seed: int,
              notes: dict[str, str]) -> Timer:
    """Timer for a re-implemented D step. Its formulations are tried in order and the first that Opacus
    accepts is timed (refusals go in the note); all but the trainer's own computation get a per-record
    norm cross-check in their note."""
    own_mode, forms = OWN_MODES[mode]
    runner: dict[str, OwnDStep] = {}

    def start() -> OwnDStep:
        refused: list[str] = []
        for form in forms:
            r = OwnDStep(bench, own_mode, form, batch, noise, seed=seed)
            try:
                r.seconds_per_step(1)  # raises here if Opacus refuses the step
            except Exception as err:  # noqa: BLE001 - a refused formulation is a result
                refused.append(f"the {form.replace('_', '-')} step refused by Opacus ({_short_error(err)}), "
                               "so the next formulation is used")
                if form == forms[-1]:
                    raise
                continue
            parts = [MODE_NOTES[mode], *refused]
            if (own_mode, form) in FORMULATION_NOTES:
                parts.append(FORMULATION_NOTES[(own_mode, form)])
            if (own_mode, form) != ("hooks", "two_pass"):
                diff = norm_check(bench, own_mode, form, batch, seed)
                parts.append(f"per-record norms vs the trainer's on one batch: max rel. diff {diff:.1e}")
            notes[name] = "; ".join(parts)
            return r
        raise AssertionError("unreachable")

    def measure() -> float:
        if "r" not in runner:
            runner["r"] = start()
        return runner["r"].seconds_per_step(steps)

    return Timer(name, measure)


def fake_batch_timer(bench: GanBench, batch: int, steps: int, seed: int) -> Timer:
    """Seconds of the D step's fake batch alone: G forward without grad, (b, 1, 28, 28), as the trainer does."""
    torch.manual_seed(seed)
    gen = Generator(bench.shape).eval()
    y = torch.arange(batch) % bench.shape.num_classes  # (b,)

    def measure() -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            with torch.no_grad():
                gen(gen.sample_latent(batch), y)  # (b, 1, 28, 28)
        return (time.perf_counter() - t0) / steps

    return Timer(f"g_fake_forward b{batch}", measure)


def d_step_timers(bench: GanBench, batch: int, modes: list[str], args: argparse.Namespace,
                  notes: dict[str, str]) -> list[Timer]:
    """non-DP, the trainer's modes, the re-implemented modes and the full local step at this batch."""
    s = args.steps
    timers = [trainer_timer(bench, f"nodp b{batch}", "hooks", bench.settings(batch, 0.0, s, True, args.seed))]
    for mode in modes:
        name = f"{mode} b{batch}"
        if mode in ("hooks", "functorch", "ew"):
            timers.append(trainer_timer(bench, name, mode, bench.settings(batch, args.noise, s, True, args.seed)))
        elif mode in OWN_MODES:
            timers.append(own_timer(bench, name, mode, batch, args.noise, s, args.seed, notes))
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    timers.append(fake_batch_timer(bench, batch, s, args.seed))
    # Full local step (D step + G step with hooks off and D frozen), DP and non-DP: for images/s.
    timers.append(trainer_timer(bench, f"full_dp b{batch}", "hooks",
                                bench.settings(batch, args.noise, s, False, args.seed)))
    timers.append(trainer_timer(bench, f"full_nodp b{batch}", "hooks",
                                bench.settings(batch, 0.0, s, False, args.seed)))
    return timers


# ---- 3. BN-statistics mode: DP-SGD local step and synthesis ---------------------------------------

def plain_sgd_local(model: torch.nn.Module, data: ImageDataset, *, sample_rate: float, steps: int, lr: float,
                    seed: int, momentum: float = 0.9) -> None:
    """Non-DP twin of ``train_dpsgd_local``: same Poisson batches, mean CE, SGD(momentum); no Opacus."""
    model.train()
    x_all = torch.as_tensor(data.images)  # (N, C, H, W)
    y_all = torch.as_tensor(data.labels)  # (N,)
    rng = np.random.default_rng(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        idx = torch.as_tensor(np.flatnonzero(rng.random(len(y_all)) < sample_rate))  # (b,)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
        opt.step()
    model.eval()


def bn_timers(net: BNNet, data: ImageDataset, cfg: dict[str, Any], args: argparse.Namespace) -> list[Timer]:
    """Seconds per step of the BN net's DP-SGD and plain local step: (T(steps) - T(1)) / (steps - 1)."""
    q = args.bn_batch / len(data)
    lr, clip = float(cfg["bn-lr"]), float(cfg["bn-max-grad-norm"])

    def dp(steps: int) -> None:
        train_dpsgd_local(net, data, noise_multiplier=args.noise, sample_rate=q, steps=steps,
                          max_grad_norm=clip, lr=lr, seed=args.seed)

    def plain(steps: int) -> None:
        plain_sgd_local(net, data, sample_rate=q, steps=steps, lr=lr, seed=args.seed)

    def per_step(fn: Callable[[int], None]) -> Callable[[], float]:
        def measure() -> float:
            t0 = time.perf_counter()
            fn(1)
            t1 = time.perf_counter()
            fn(args.bn_steps)
            t2 = time.perf_counter()
            return max(0.0, (t2 - t1) - (t1 - t0)) / (args.bn_steps - 1)
        return measure

    return [Timer("bn_dpsgd", per_step(dp)), Timer("bn_plain", per_step(plain))]


def gan_sampling_rate(shape: GanShape, total: int, repeats: int, seed: int) -> dict[str, Any]:
    """Images/s of ``sample_generator`` (batches of 500, as the coordinator samples)."""
    gen = Generator(shape)
    classes = tuple(str(k) for k in range(shape.num_classes))
    sample_generator(gen, classes, 500, seed=seed, device=CPU, progress=False)  # warm-up
    secs = []
    for r in range(repeats):
        t0 = time.perf_counter()
        sample_generator(gen, classes, total, seed=seed + r, device=CPU, progress=False)
        secs.append(time.perf_counter() - t0)
    med = statistics.median(secs)
    return {"images": total, "seconds_median": med, "images_per_s": total / med, "seconds": secs}


def bn_synthesis_rate(net: BNNet, data: ImageDataset, cfg: dict[str, Any], iterations: int,
                      threads: int, seed: int) -> dict[str, Any]:
    """Images/s of ``synthesize`` on one batch with the run defaults, on exact (noise-free) statistics."""
    release = record_class_statistics(net, data, clip_bound=math.inf, noise_multiplier=0.0)
    pooled = pool_statistics([release])
    k = net.shape.num_classes
    per_class = max(1, int(cfg["bn-synth-batch"]) // k)  # one optimisation batch
    kwargs = dict(iterations=iterations, batch_size=int(cfg["bn-synth-batch"]), lr=float(cfg["bn-synth-lr"]),
                  w_stats=float(cfg["bn-w-stats"]), w_ce=float(cfg["bn-w-ce"]), w_tv=float(cfg["bn-w-tv"]),
                  w_l2=float(cfg["bn-w-l2"]), seed=seed, device=CPU, progress=False, threads=threads)
    synthesize(net, pooled, per_class, **{**kwargs, "iterations": 2})  # warm-up
    t0 = time.perf_counter()
    out = synthesize(net, pooled, per_class, **kwargs)
    secs = time.perf_counter() - t0
    n = len(out.labels)
    return {"images": n, "iterations": iterations, "batch_size": int(cfg["bn-synth-batch"]), "seconds": secs,
            "images_per_s": n / secs, "ms_per_iteration": 1000 * secs / iterations}


# ---- 4. where the hooks-mode DP step's time goes --------------------------------------------------

def _code_key(fn: Callable[..., Any]) -> tuple[str, int, str]:
    """pstats key (file, first line, name) of a Python function (decorators unwrapped)."""
    code = inspect.unwrap(fn).__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def profile_buckets() -> dict[str, tuple[str, int, str]]:
    """Label -> pstats key of the functions whose cumulative time per D step is reported."""
    from opacus.grad_sample import conv, embedding, grad_sample_module, group_norm, linear
    from opacus.optimizers import DPOptimizer

    return {
        "G forward (fake batch, no grad)": _code_key(Generator.forward),
        "discriminator_loss (two D passes, b rows each)": _code_key(discriminator_loss),
        "  D forward (incl. activation hooks)": _code_key(Discriminator.forward),
        "  Opacus capture_activations_hook": _code_key(GradSampleModule.capture_activations_hook),
        "backward (incl. per-sample grad hooks)": ("~", 0, "<method 'run_backward' of 'torch._C._EngineBase' objects>"),
        "  Opacus capture_backprops_hook": _code_key(GradSampleModule.capture_backprops_hook),
        "    conv grad sampler (unfold + einsum)": _code_key(conv.compute_conv_grad_sample),
        "    linear grad sampler": _code_key(linear.compute_linear_grad_sample),
        "    embedding grad sampler": _code_key(embedding.compute_embedding_grad_sample),
        "    group_norm grad sampler": _code_key(group_norm.compute_group_norm_grad_sample),
        "    create_or_accumulate_grad_sample": _code_key(grad_sample_module.create_or_accumulate_grad_sample),
        "DPOptimizer.step (total)": _code_key(DPOptimizer.step),
        "  clip_and_accumulate (norms, clip, sum)": _code_key(DPOptimizer.clip_and_accumulate),
        "  add_noise": _code_key(DPOptimizer.add_noise),
        "  inner Adam.step": _code_key(torch.optim.Adam.step),
        "DPOptimizer.zero_grad (x2)": _code_key(DPOptimizer.zero_grad),
    }


def cprofile_breakdown(bench: GanBench, rs: RoundSettings) -> dict[str, Any]:
    """cProfile of a D-only round in hooks mode: cumulative ms per step of the interesting functions."""
    trainer = bench.trainer("profile")
    gen_state = Generator(bench.shape).state_dict()
    trainer.train_round(gen_state, rs)  # warm-up
    prof = cProfile.Profile()
    prof.enable()
    trainer.train_round(gen_state, rs)
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, func) -> (cc, nc, tottime, cumtime, callers)
    out = {label: 1000 * stats[key][3] / rs.steps if key in stats else 0.0
           for label, key in profile_buckets().items()}
    total = stats.get(_code_key(LocalGanTrainer.train_round))
    out["train_round total (incl. fixed cost)"] = 1000 * total[3] / rs.steps if total else 0.0
    return {"ms_per_step": out, "steps": rs.steps,
            "note": "cumulative times under cProfile (which adds per-call overhead); indented rows are parts "
                    "of the row above"}


def torch_op_profile(bench: GanBench, rs: RoundSettings, top: int = 10) -> list[dict[str, Any]]:
    """Top torch ops by self CPU time over one D-only hooks-mode round."""
    from torch.profiler import ProfilerActivity, profile

    trainer = bench.trainer("profile_ops")
    gen_state = Generator(bench.shape).state_dict()
    trainer.train_round(gen_state, rs)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_round(gen_state, rs)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / rs.steps, "calls": e.count}
            for e in events]


# ---- report -----------------------------------------------------------------------------------------

def d_step_rows(timers: list[Timer], batch: int, notes: dict[str, str]) -> dict[str, Any]:
    """JSON rows of one batch size: ms/step, ratio to non-DP, bar verdict, errors."""
    base = next(t for t in timers if t.name.startswith("nodp")).median_ms
    fake = next(t for t in timers if t.name.startswith("g_fake_forward")).median_ms or 0.0
    rows: dict[str, Any] = {}
    for t in timers:
        key = t.name.rsplit(" ", 1)[0]
        if t.error is not None:
            rows[key] = {"error": t.error}
            rows[key].update({"why": why for text, why in ERROR_HINTS.items() if text in t.error})
            continue
        row: dict[str, Any] = {"ms_per_step": t.median_ms, "samples_ms": [1000 * s for s in t.samples]}
        if key.startswith("full_"):
            row["real_images_per_s"] = batch / (t.median_ms / 1000) if t.median_ms else None
        elif key not in ("nodp", "g_fake_forward") and base:
            row["ratio_vs_nodp"] = t.median_ms / base
            row["meets_bar"] = t.median_ms / base <= BAR
            # the same ratio without the fake batch's G forward, which both steps do identically
            row["ratio_vs_nodp_excl_fake_batch"] = (t.median_ms - fake) / (base - fake) if base > fake else None
        if t.name in notes:
            row["note"] = notes[t.name]
        rows[key] = row
    return rows


def one_pass_vs_two_pass(rows: dict[str, Any]) -> dict[str, Any]:
    """The one-pass D step (hooks_one_pass) against the trainer's two-pass rows (hooks, hooks_own): time ratio
    one-pass / two-pass (> 1: one pass is slower) and the extra ms per step."""
    one = rows.get("hooks_one_pass", {}).get("ms_per_step")
    out: dict[str, Any] = {"hooks_one_pass_ms": one}
    for key in ("hooks", "hooks_own"):
        two = rows.get(key, {}).get("ms_per_step")
        out[f"{key}_two_pass_ms"] = two
        if one and two:
            out[f"one_pass_over_{key}"] = one / two
            out[f"extra_ms_vs_{key}"] = one - two
    return out


def print_table(result: dict[str, Any]) -> None:
    print("\n== discriminator step (ms/step, median; ratio = DP / non-DP; bar <= %.1fx) ==" % BAR)
    for batch, rows in result["d_step"].items():
        print(f"-- batch {batch}")
        for key, row in rows.items():
            if "error" in row:
                print(f"  {key:<14} ERROR  {row['error'][:110]}")
            elif key == "g_fake_forward":
                print(f"  {key:<14} {row['ms_per_step']:8.1f} ms  (part of every D step above: G makes the fake batch)")
            elif key.startswith("full_"):
                print(f"  {key:<14} {row['ms_per_step']:8.1f} ms  {row['real_images_per_s']:8.0f} real img/s"
                      "  (D step + G step)")
            else:
                ratio = (f"{row['ratio_vs_nodp']:5.2f}x {'meets' if row['meets_bar'] else 'misses'} bar"
                         f"  ({row['ratio_vs_nodp_excl_fake_batch']:.2f}x without the fake batch)"
                         if "ratio_vs_nodp" in row else "  (reference)")
                print(f"  {key:<14} {row['ms_per_step']:8.1f} ms  {ratio}" + ("  [note]" if "note" in row else ""))
    for batch, cmp in result.get("one_pass_vs_two_pass", {}).items():
        if "one_pass_over_hooks" in cmp:
            print(f"-- batch {batch}: one-pass step {cmp['hooks_one_pass_ms']:.1f} ms = "
                  f"{cmp['one_pass_over_hooks']:.2f}x the trainer's two-pass step (hooks)"
                  + (f", {cmp['one_pass_over_hooks_own']:.2f}x hooks_own" if "one_pass_over_hooks_own" in cmp else ""))
    bn = result["bn_dpsgd"]
    print("\n== BN-statistics mode, local step (batch %d) ==" % bn["batch"])
    print(f"  dpsgd        {bn['dp_ms_per_step']:8.1f} ms  {bn['dp_images_per_s']:8.0f} img/s"
          f"   ratio {bn['ratio']:.2f}x")
    print(f"  plain        {bn['plain_ms_per_step']:8.1f} ms  {bn['plain_images_per_s']:8.0f} img/s")
    gs, bs = result["gan_sampling"], result["bn_synthesis"]
    print("\n== synthesis ==")
    print(f"  DP-GAN sampling      {gs['images_per_s']:10.0f} images/s  ({gs['images']} images)")
    print(f"  BN-stats synthesis   {bs['images_per_s']:10.2f} images/s  ({bs['images']} images, "
          f"{bs['iterations']} it, {bs['ms_per_iteration']:.1f} ms/it)")
    prof = result.get("profile")
    if prof:
        print(f"\n== hooks DP D step, batch {prof['batch']}: cProfile, ms/step (cumulative) ==")
        for label, ms in prof["cprofile"]["ms_per_step"].items():
            print(f"  {label:<48} {ms:8.1f}")
        print("  top torch ops by self CPU time (ms/step):")
        for e in prof["torch_ops"][:8]:
            print(f"    {e['op']:<44} {e['self_ms_per_step']:8.2f}  ({e['calls']} calls)")
    print(f"\nmodes meeting the bar: {result['verdict']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = run_defaults()
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    data = random_dataset(args.records, args.seed)  # (N, 1, 28, 28)
    shape = GanShape(channels=1, image_size=28, num_classes=10, latent_dim=args.latent_dim, width=args.gan_width)
    result: dict[str, Any] = {
        "benchmark": "speed",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine_info(args.threads),
        "settings": {**vars(args), "image": [1, 28, 28], "classes": 10,
                     "d_params": sum(p.numel() for p in Discriminator(shape, width=args.gan_d_width).parameters()),
                     "g_params": sum(p.numel() for p in Generator(shape).parameters())},
    }
    with tempfile.TemporaryDirectory(prefix="bench_speed_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        bench = GanBench(shape, data, args.gan_d_width, Path(tmp))

        # 1+2: D step per mode, all batch sizes interleaved in one pool.
        notes: dict[str, str] = {}
        per_batch = {b: d_step_timers(bench, b, modes, args, notes) for b in batches}
        pool = [t for ts in per_batch.values() for t in ts]
        print(f"D step: warm-up of {len(pool)} configurations ...", flush=True)
        warm_up(pool)
        print(f"D step: {args.repeats} interleaved repeats ...", flush=True)
        interleave(pool, args.repeats)
        result["d_step"] = {str(b): d_step_rows(ts, b, notes) for b, ts in per_batch.items()}
        result["verdict"] = {f"batch {b}": [k for k, r in rows.items() if r.get("meets_bar")] or "none"
                             for b, rows in result["d_step"].items()}
        result["d_step_modes"] = {m: MODE_NOTES.get(m, "") for m in modes}
        result["one_pass_vs_two_pass"] = {str(b): one_pass_vs_two_pass(rows) for b, rows in result["d_step"].items()}

        # 3: BN-statistics mode.
        torch.manual_seed(args.seed)
        net = BNNet(1, 10, 28, width=int(cfg["bn-width"]), head_norm=bool(cfg["bn-head-norm"]))
        print("BN DP-SGD: interleaved repeats ...", flush=True)
        bn = bn_timers(net, data, cfg, args)
        warm_up(bn)
        interleave(bn, args.repeats)
        dp_ms, plain_ms = bn[0].median_ms, bn[1].median_ms
        result["bn_dpsgd"] = {
            "batch": args.bn_batch, "net_params": sum(p.numel() for p in net.parameters()),
            "dp_ms_per_step": dp_ms, "plain_ms_per_step": plain_ms, "ratio": dp_ms / plain_ms,
            "dp_images_per_s": args.bn_batch / dp_ms * 1000, "plain_images_per_s": args.bn_batch / plain_ms * 1000,
            "dp_samples_ms": [1000 * s for s in bn[0].samples], "plain_samples_ms": [1000 * s for s in bn[1].samples],
        }
        print("synthesis ...", flush=True)
        result["gan_sampling"] = gan_sampling_rate(shape, args.sample_images, 3, args.seed)
        iters = args.bn_iterations or int(cfg["bn-iterations"])
        result["bn_synthesis"] = bn_synthesis_rate(net, data, cfg, iters, args.threads, args.seed)

        # 4: profile of the hooks-mode DP step at the largest batch.
        if args.profile_steps > 0:
            print("profile ...", flush=True)
            b = max(batches)
            rs = bench.settings(b, args.noise, args.profile_steps, True, args.seed)
            result["profile"] = {"batch": b, "cprofile": cprofile_breakdown(bench, rs),
                                 "torch_ops": torch_op_profile(bench, rs)}

    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wall {result['wall_seconds']} s -> {out}")
    return result


if __name__ == "__main__":
    main()
