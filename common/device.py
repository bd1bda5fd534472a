"""Choose where tensors live: the GPU when one is present, the CPU otherwise."""

from __future__ import annotations

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """Return the torch device for ``preference`` ("auto", "cpu", "cuda" or "cuda:N").

    "auto" picks CUDA when a GPU is visible and the CPU otherwise, so the same run config works on a
    laptop, a 2-core site box and a GPU server.
    """
    pref = (preference or "auto").strip().lower()
    if pref == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device '{preference}' was requested but no CUDA GPU is visible to PyTorch; "
            "use device='auto' or 'cpu'"
        )
    if pref != "cpu" and not pref.startswith("cuda"):
        raise ValueError(f"unknown device '{preference}': use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device(pref)
