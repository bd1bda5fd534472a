"""Crash-safe file writes shared by sites, coordinator and CLI: the one atomic-write helper.

Every write goes to ``<name>.tmp`` beside the target, is fsync'ed, then renamed over the target (atomic
on one filesystem), and the folder is fsync'ed after the rename, so a kill at any moment leaves either the old
or the new file, never half of one, and a power cut after the call returns cannot undo the rename (without the
folder's fsync the new name, a saved reply or a run's census, may be lost while the ledger's charge for it stays).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(directory: Path) -> None:
    """fsync a folder: makes the names created, renamed or removed in it durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(directory: Path) -> None:
    """mkdir -p, fsync'ing the parent of every directory created so that the new entries survive a crash."""
    missing = []
    current = Path(directory)
    while not current.exists():
        missing.append(current)
        current = current.parent
    for new_dir in reversed(missing):
        try:
            new_dir.mkdir()
        except FileExistsError:  # created concurrently by another process
            pass
        fsync_dir(new_dir.parent)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably (optionally with permission bits ``mode``); returns the
    path. When it returns, the file and its name are on disk (the file and its folder are fsync'ed)."""
    path = Path(path)
    make_dirs_durably(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:  # (a full disk: the part written would keep it full; review s62)
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def remove_durably(path: Path) -> None:
    """Remove ``path`` if it exists, and fsync its folder so that the removal survives a crash."""
    path = Path(path)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode(), mode)


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2))


def save_torch_atomic(path: Path, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def create_once(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist yet (atomically, ``O_EXCL``), and make it
    durable before returning (the file and its folder are fsync'ed), so that a crash right after the call cannot
    lose it. True when this call created it, False when it existed.

    The file's existence is what counts: one left empty by a crash during the write still exists."""
    path = Path(path)
    make_dirs_durably(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)
    return True
