"""Choose where tensors live: the GPU when one is present, the CPU otherwise; and in what shape a site's batches
are (``padded_rows``)."""

from __future__ import annotations

import re

import torch

from common.wire import quoted

_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,2})?")  # what a device setting may say, after strip() and lower()


def pick_device(preference: str = "auto") -> torch.device:
    """Return the torch device for ``preference`` ("auto", "cpu", "cuda" or "cuda:N").

    "auto" picks CUDA when a GPU is visible and the CPU otherwise, so the same run config works on a
    laptop, a 2-core site box and a GPU server.
    """
    pref = (preference or "auto").strip().lower()
    if not _DEVICE.fullmatch(pref):  # (a run config's string: never quoted whole into a refusal or a log line)
        raise ValueError(f"unknown device {quoted(preference)}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device '{pref}' was requested but no CUDA GPU is visible to PyTorch; "
            "use device='auto' or 'cpu'"
        )
    return torch.device(pref)


def padded_rows(rows, size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``rows`` (n <= size rows: an array or tensor) as a freshly allocated, C-contiguous float32 tensor of exactly
    ``size`` rows on ``device`` (CPU by default), the rest zeros.

    A site computes on its records in such fixed shapes (``client.evaluation`` through ``common.learner``, the
    statistics blocks of ``common.bnnet.iter_record_blocks``, the DP-SGD chunks of ``client.dpsgd``): on CPU, float32
    kernels round a row differently with its batch's size and memory layout, so only at one shape and one layout does
    a row's result depend on that row alone."""
    batch = torch.zeros((size, *rows.shape[1:]), dtype=torch.float32, device=device)
    batch[:len(rows)] = torch.as_tensor(rows, dtype=torch.float32, device=device)
    return batch
