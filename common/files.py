"""Crash-safe file writes shared by sites, coordinator and CLI."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_torch_atomic(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` so that a kill at any moment leaves either the old or the new file.

    Writes ``<name>.tmp`` beside it, fsyncs it, then renames it over ``path`` (atomic on one filesystem).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
