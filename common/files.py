"""Crash-safe file writes shared by sites, coordinator and CLI: the one atomic-write helper.

Every write goes to ``<name>.tmp`` beside the target, is fsync'ed, then renamed over the target (atomic
on one filesystem), so a kill at any moment leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (optionally with permission bits ``mode``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if mode is not None:
        os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode(), mode)


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


def save_torch_atomic(path: Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist yet (atomically, ``O_EXCL``), and make it
    durable before returning: the file is fsync'ed, and so is its folder where the system allows it (POSIX),
    so that a crash right after the call cannot lose it. True when this call created it, False when it existed.

    The file's existence is what counts: one left empty by a crash during the write still exists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # (Windows cannot open a folder; its file systems write the entry with the file)
        return True
    try:
        os.fsync(folder)
    except OSError:  # (a file system that cannot sync a folder: the file itself is synced)
        pass
    finally:
        os.close(folder)
    return True
