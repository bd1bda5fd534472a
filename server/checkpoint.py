"""Atomic coordinator checkpoints: a killed coordinator resumes after its last completed round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from common.files import save_torch_atomic


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that a crash at any moment leaves either the old or the new file."""
    save_torch_atomic(path, state)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The last checkpoint, or None when there is none."""
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
