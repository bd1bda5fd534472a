"""How much work one request may make a site do: checked before anything is built or trained.

A hostile or mistaken coordinator cannot make a site release more than its ledger allows (``client.budget``),
but without these limits it could still make it build a network too large for its memory, or DP-SGD steps
whose per-sample gradients do not fit, and the site's process would be killed by the operating system: a
crash, not a refusal. So every training request is measured first, from its settings alone:

- the parameters of every network it makes the site build (the generator, the discriminator, the shared
  statistics net), counted on PyTorch's ``meta`` device, where modules have shapes but no memory;
- the per-sample gradients of one DP-SGD step: expected batch x parameters of the network DP-SGD trains,
  4 bytes each (Opacus holds one gradient per record of the batch);
- the expected batch, and the DP-SGD steps over the whole run.

The limits are the site operator's (``site.yaml``: ``max_parameters``, ``max_batch_size``,
``max_steps_per_run``, ``max_step_memory_mb``); the defaults below leave room for every setting the product
chooses, with a wide margin (the product's largest default network has about 0.55 million parameters, its
batch is 256, its longest run 1,200 DP-SGD steps). A request beyond one of them is refused with a reply
that names the limit, before anything is charged to the ledger.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from client.refusal import Refusal
from common import protocol as P

# Defaults of the site's work limits (SiteSettings and site.yaml take them from here).
DEFAULT_MAX_PARAMETERS = 20_000_000  # any one network a request makes the site build (80 MB of float32 weights)
DEFAULT_MAX_BATCH_SIZE = 4096  # expected DP-SGD batch
DEFAULT_MAX_STEPS_PER_RUN = 50_000  # DP-SGD steps over one run: rounds x steps per round
DEFAULT_MAX_STEP_MEMORY_MB = 8192  # per-sample gradients of one DP-SGD step: batch x parameters x 4 bytes

BYTES_PER_GRADIENT_VALUE = 4  # float32


class WorkLimits(Protocol):
    """The limits a site's settings carry (client.site.SiteSettings)."""

    max_parameters: int
    max_batch_size: int
    max_steps_per_run: int
    max_step_memory_mb: int


def meta_module(build: Callable[[], nn.Module]) -> nn.Module:
    """The module ``build()`` makes, on the ``meta`` device: its shapes and state_dict keys, no weights."""
    with torch.device("meta"):
        return build()


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_work(site: WorkLimits, *, networks: dict[str, int], dpsgd_network: str, batch_size: int,
               steps_per_run: int) -> None:
    """Refuse the request if it exceeds one of ``site``'s work limits.

    ``networks``: parameters of every network the request makes the site build, by a name the refusal shows;
    ``dpsgd_network``: the one of them DP-SGD trains on the site's records (its per-sample gradients).
    """
    for name, count in networks.items():
        if count > site.max_parameters:
            raise Refusal(P.REFUSED_NOT_ALLOWED,
                          f"the {name} this request asks for has {count:,} parameters; this site builds networks "
                          f"of at most {site.max_parameters:,} (its operator's max_parameters): ask for a "
                          "smaller width")
    if batch_size > site.max_batch_size:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"batch size {batch_size:,} is above this site's limit of {site.max_batch_size:,} (its "
                      "operator's max_batch_size): ask for a smaller batch")
    if steps_per_run > site.max_steps_per_run:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"the run asks for {steps_per_run:,} DP-SGD steps (rounds x steps per round); this site "
                      f"takes at most {site.max_steps_per_run:,} per run (its operator's max_steps_per_run): ask "
                      "for fewer rounds or steps")
    step_mb = batch_size * networks[dpsgd_network] * BYTES_PER_GRADIENT_VALUE / 2**20
    if step_mb > site.max_step_memory_mb:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"one DP-SGD step of this request would hold {step_mb:,.1f} MB of per-sample gradients "
                      f"(batch {batch_size:,} x {networks[dpsgd_network]:,} {dpsgd_network} parameters x "
                      f"{BYTES_PER_GRADIENT_VALUE} bytes); "
                      f"this site allows at most {site.max_step_memory_mb:,} MB (its operator's "
                      "max_step_memory_mb): ask for a smaller batch or a narrower network")
