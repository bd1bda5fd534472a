"""How much work one request may make a site do: checked before anything is built or trained.

A hostile or mistaken coordinator cannot make a site release more than its ledger allows (``client.budget``),
but without these limits it could still make it build a network too large for its memory, or steps whose
per-sample gradients or activations do not fit, and the site's process would be killed by the operating system
(or fail inside PyTorch) after the round was charged: a crash, not a refusal. So every request is measured
first, from its settings alone (never from the site's data):

- the parameters of every network it makes the site build (the generator, the discriminator, the shared
  statistics net), counted on PyTorch's ``meta`` device, where modules have shapes but no memory;
- the memory of every step it makes the site run on a batch (:class:`Step`: a G step, a DP-SGD step of D or of
  the shared net, a block of the statistics pass): the per-sample gradients a DP-SGD step holds (batch x
  parameters x 4 bytes, once per forward pass its records go through) plus its activations, i.e. the floats its
  forward pass creates (every tensor an operation makes, views and in-place results left out), counted on the
  ``meta`` device for the step's rows, x 4 bytes x a factor for what the backward pass adds (:data:`BACKWARD_FACTOR`,
  :data:`DPSGD_BACKWARD_FACTOR`, :data:`NO_GRAD_FACTOR`: measured, see there);
- the expected batch, and the DP-SGD steps over the whole run.

The limits are the site operator's (``site.yaml``: ``max_parameters``, ``max_batch_size``,
``max_steps_per_run``, ``max_step_memory_mb``); the defaults below leave room for every setting the product
chooses, with a wide margin (the product's largest default network has about 0.55 million parameters, its
batch is 256, its longest run 1,200 DP-SGD steps, its largest default step about 1 GB by this count). A request
beyond one of them is refused with a reply that names the limit, before anything is charged to the ledger.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from client.refusal import Refusal
from common import protocol as P
from common.state_layout import runs_folder

# Defaults of the site's work limits (SiteSettings and site.yaml take them from here).
DEFAULT_MAX_PARAMETERS = 20_000_000  # any one network a request makes the site build (80 MB of float32 weights)
DEFAULT_MAX_BATCH_SIZE = 4096  # expected DP-SGD batch
DEFAULT_MAX_STEPS_PER_RUN = 50_000  # DP-SGD steps over one run: rounds x steps per round
DEFAULT_MAX_STEP_MEMORY_MB = 8192  # one step on a batch: per-sample gradients + activations (Step)
DEFAULT_MAX_RUN_DISK_MB = 2048  # what one run keeps in the state folder over all its rounds (saved replies, D states)
DEFAULT_MAX_STATE_DISK_MB = 20480  # what all runs keep there together: a new run id must not bring a fresh allowance
# torch.save's bytes beyond a file's values: per tensor (its record, alignment, pickled key) and per file. Measured on
# small networks' round files in review s58 (about 27 KB a file beyond the values); both are generous above that.
TENSOR_OVERHEAD = 1024
FILE_OVERHEAD = 64 * 1024


def saved_file_bytes(values: int, tensors: int) -> int:
    """At most the bytes of a torch.save file of ``values`` float32 values in ``tensors`` tensors."""
    return 4 * values + TENSOR_OVERHEAD * tensors + FILE_OVERHEAD

BYTES_PER_GRADIENT_VALUE = 4  # float32
BYTES_PER_ACTIVATION = 4  # float32
# What a step holds, over its forward pass's floats as counted here (per-sample gradients apart): measured on one CPU
# thread, peak RSS growth of one step (less its per-sample gradients) over the count, 28x28 gray unless said
# (tests/benchmarks/bench_step_memory.py).
# A G step (G and D forward, mode-seeking pairs, backward into G, Adam), G width 24 / 96 / 384 / 768 at batch 256 /
# 256 / 256 / 64: 0.97, 0.59, 0.42, 0.26; width 32 at 32x32 colour 0.92, width 16 at 64x64 colour 0.95. So 1.5.
BACKWARD_FACTOR = 1.5
# A DP-SGD step (Opacus' hooks keep every layer's input, its per-sample convolution gradients unfold them). Of D
# (real and fake pass; both copies of per-sample gradients taken off), D width 16 / 64 / 64 / 128 at batch 256 / 256
# / 512 / 128: 0.62, 0.59, 0.71, 0.86; width 32 at 32x32 colour 0.46, width 16 at 64x64 colour 1.03. Of the shared
# net, width 16 / 64 / 256 at batch 1024 / 256 / 128: 1.73, 2.02, 1.98 (a rerun of width 64: 1.67). So 3.
DPSGD_BACKWARD_FACTOR = 3
# A pass without gradients (the statistics release and the automatic clip bounds, in blocks of records): the count
# is of every tensor the forward creates, none freed, but the pass keeps every norm input and makes float64 copies
# of each; measured, shared net width 16 / 64 at 512 records, 576 at 128: 1.39, 1.16, 1.08. So 1.5.
NO_GRAD_FACTOR = 1.5


class WorkLimits(Protocol):
    """The limits a site's settings carry (client.site.SiteSettings)."""

    max_parameters: int
    max_batch_size: int
    max_steps_per_run: int
    max_step_memory_mb: int
    max_run_disk_mb: int
    max_state_disk_mb: int


@dataclass(frozen=True)
class Step:
    """One step a request makes the site run on a batch, as the limits see it.

    ``forward(rows)`` runs the step's forward pass on ``rows`` rows of meta tensors (built inside it, so on the
    meta device: :func:`forward_floats` calls it there); it is only called once the networks' parameters passed.
    """

    name: str  # what the refusal calls it: "one generator step"
    rows: int  # rows of the batch its forward passes take (all passes together)
    forward: Callable[[int], Any]
    backward: str = "autograd"  # "dpsgd": Opacus' DP-SGD backward; "": a pass without gradients
    gradient_rows: int = 0  # per-sample gradients it holds: rows x the parameters of ...
    dpsgd_network: str = ""  # ... this network of ``check_work``'s
    gradient_copies: int = 1  # per-sample gradient tensors held at once: D's real and fake passes' (summed), or a
    # chunk's and its copy with a non-finite record's rows zeroed (client.nonfinite)
    ask: str = "a smaller batch or narrower networks"


class _CountFloats(TorchDispatchMode):
    """Counts the elements of every tensor an operation creates (views and in-place results left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.floats = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ret, t in zip(func._schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                self.floats += t.numel()
        return out


def forward_floats(forward: Callable[[int], Any]) -> tuple[int, int]:
    """(floats per row, floats of the pass that do not grow with the rows) of ``forward``, run on the meta device
    with one row and with two: shapes only, no memory, no data."""
    counts = []
    for rows in (1, 2):
        with torch.device("meta"), _CountFloats() as counter:
            forward(rows)
        counts.append(counter.floats)
    per_row = max(0, counts[1] - counts[0])
    return per_row, max(0, counts[0] - per_row)


def meta_module(build: Callable[[], nn.Module]) -> nn.Module:
    """The module ``build()`` makes, on the ``meta`` device: its shapes and state_dict keys, no weights."""
    with torch.device("meta"):
        return build()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_work(site: WorkLimits, *, networks: dict[str, int], batch_size: int, steps_per_run: int,
               steps: tuple[Step, ...] = (), kept_mb: float = 0.0, others_mb: float = 0.0,
               smaller: str = "a smaller width") -> None:
    """Refuse the request if it exceeds one of ``site``'s work limits.

    ``networks``: parameters of every network the request makes the site build, by a name the refusal shows;
    ``steps``: every step it makes the site run on a batch (its per-sample gradients name one of ``networks``),
    checked in this order once the parameters, the batch and the run's steps passed; ``kept_mb``: what the run
    keeps in the site's state folder over all its rounds, counted from the request's shapes and rounds alone (each
    round's saved reply, for a free re-send, and what the next round starts from). Uncounted, one run of 50,000
    one-step rounds with a wide D would have written 1.2 TiB, each round charged next to nothing, and a full disk
    then made later rounds fail after their charge (review s58); ``others_mb``: what the site's other runs keep there
    (:func:`other_runs_mb`: files the site wrote, whose sizes follow from requests and DP releases, never from the
    records), so that a new run id brings no fresh allowance (the same review: a thousand runs, each paying a census).
    """
    for name, count in networks.items():
        if count > site.max_parameters:
            raise Refusal(P.REFUSED_NOT_ALLOWED,
                          f"the {name} this request asks for has {count:,} parameters; this site builds networks "
                          f"of at most {site.max_parameters:,} (its operator's max_parameters): ask for "
                          f"{smaller}")
    if batch_size > site.max_batch_size:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"batch size {batch_size:,} is above this site's limit of {site.max_batch_size:,} (its "
                      "operator's max_batch_size): ask for a smaller batch")
    if steps_per_run > site.max_steps_per_run:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"the run asks for {steps_per_run:,} DP-SGD steps (rounds x steps per round); this site "
                      f"takes at most {site.max_steps_per_run:,} per run (its operator's max_steps_per_run): ask "
                      "for fewer rounds or steps")
    if kept_mb > site.max_run_disk_mb:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"the run would keep {kept_mb:,.0f} MB in this site's state folder over its rounds (their saved "
                      f"replies and states); this site keeps at most {site.max_run_disk_mb:,} MB per run (its "
                      "operator's max_run_disk_mb): ask for fewer rounds or smaller networks")
    if kept_mb and others_mb + kept_mb > site.max_state_disk_mb:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"the run would keep {kept_mb:,.0f} MB in this site's state folder, where its other runs keep "
                      f"{others_mb:,.0f} MB; this site keeps at most {site.max_state_disk_mb:,} MB for all runs (its "
                      "operator's max_state_disk_mb, who may archive finished runs): ask for fewer rounds or smaller "
                      "networks")
    for step in steps:
        _check_step(site, step, networks)


def other_runs_mb(site: object, experiment: str) -> float:
    """MB of the files the site's runs other than ``experiment`` keep in its state folder (``runs/``); 0 for limits
    without a state folder (tests)."""
    state_dir = getattr(site, "state_dir", None)
    runs = runs_folder(state_dir) if state_dir else None
    if runs is None or not runs.is_dir():
        return 0.0
    return sum(_folder_mb(folder) for folder in runs.iterdir() if folder.name != experiment)


FREE_DISK_MARGIN_MB = 64  # free space a run must leave on the state folder's disk (the ledger, logs, claim files)
FREE_DISK_UNIT_MB = 64  # free space is read in whole units of this (docs/privacy.md, "Not covered"): a small run needs
# 128 MB free (a first version read whole GiB, which would stop a site, or a test machine, with under 1 GiB free)


def check_free_disk(site: object, run_folder: Path, kept_mb: float) -> None:
    """Refuse, before any charge, a run whose files the state folder's disk has no room for: what the run keeps
    (``kept_mb``, as :func:`check_work` counts it) less what it keeps there already, plus ``FREE_DISK_MARGIN_MB``.
    Review s62: the limits count only the files a request implies, so on a disk with less free space than them a
    coordinator could fill it with ordinary runs, after which each new run's census was charged and its file could not
    be written (budget spent, the generic failure, at every new run id). A full disk already showed as those failures;
    this refusal says so before the charge, without a number; the free space is read in whole units of
    ``FREE_DISK_UNIT_MB``. ``run_folder``: the run's folder as ``client.requests.run_dir`` gives it, after it checked
    the run id (review s62: a first version made the coordinator's id a path itself, and '/' had the site walk and
    size every file of the machine, and refuse by a folder's size). No-op for limits without a state folder (tests)."""
    state_dir = getattr(site, "state_dir", None)
    if not state_dir or not Path(state_dir).is_dir():
        return
    have = _folder_mb(run_folder)
    need = max(0.0, kept_mb - have) + FREE_DISK_MARGIN_MB
    # Free space in whole units only: it counts every file on the disk, the data's among them, and a finer reading
    # against the coordinator's own kept_mb would answer, at no cost, how much the disk holds to the byte.
    free_units = shutil.disk_usage(state_dir).free // (FREE_DISK_UNIT_MB * 2**20)
    if free_units * FREE_DISK_UNIT_MB < need:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      "this site's disk has too little free space for the run's files: its operator must free space "
                      "(or archive finished runs) before it takes new work")


# Every file counts as whole units of this size (_folder_mb). A run's small files -- its census, plan and marks --
# are JSON whose byte length follows the digits of its noisy counts and the plan's floats, and the state-folder limit
# compares in bytes: a coordinator stepping a request's size by a few bytes could read those digits off where the
# refusal begins, in a secure run too, which shows no site's census alone (review s68 L). Counted in whole units,
# a small file adds one unit whatever its digits, so what the run's files add follows from which files the
# coordinator's requests made (a file's digits would have to carry it across a unit's edge); the large ones (saved
# replies and D's state) have sizes set by the request's shapes.
FILE_UNIT_BYTES = 16 * 1024


def _folder_mb(folder: Path) -> float:
    total = 0
    if folder.is_dir():
        for f in folder.rglob("*"):
            try:
                total += -(-f.stat().st_size // FILE_UNIT_BYTES) * FILE_UNIT_BYTES if f.is_file() else 0
            except OSError:  # (gone while counted: the operator archiving a run)
                pass
    return total / 2**20


def _check_step(site: WorkLimits, step: Step, networks: dict[str, int]) -> None:
    per_row, fixed = forward_floats(step.forward)
    factor, why = {"autograd": (BACKWARD_FACTOR, "for the backward pass"),
                   "dpsgd": (DPSGD_BACKWARD_FACTOR, "for DP-SGD's backward pass"),
                   "": (NO_GRAD_FACTOR, "for a pass without gradients")}[step.backward]
    act_mb = (step.rows * per_row + fixed) * BYTES_PER_ACTIVATION * factor / 2**20
    parts = []
    grad_mb = 0.0
    if step.gradient_rows:
        params = networks[step.dpsgd_network]
        grad_mb = step.gradient_copies * step.gradient_rows * params * BYTES_PER_GRADIENT_VALUE / 2**20
        copies = f" x {step.gradient_copies} passes" if step.gradient_copies > 1 else ""
        parts.append(f"{grad_mb:,.1f} MB of per-sample gradients ({step.gradient_rows:,} rows x {params:,} "
                     f"{step.dpsgd_network} parameters x {BYTES_PER_GRADIENT_VALUE} bytes{copies})")
    parts.append(f"{act_mb:,.1f} MB of activations ({step.rows:,} rows x {per_row:,} activation floats per row"
                 + (f" + {fixed:,} per step" if fixed else "")
                 + f", x {BYTES_PER_ACTIVATION} bytes x {factor:g} {why})")
    if grad_mb + act_mb > site.max_step_memory_mb:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"{step.name} of this request would hold {grad_mb + act_mb:,.1f} MB: {' and '.join(parts)}; "
                      f"this site allows at most {site.max_step_memory_mb:,} MB per step (its operator's "
                      f"max_step_memory_mb): ask for {step.ask}")
