"""The common file tree of image folders and ``.tar.gz``/``.tgz``/``.tar`` archives: scanning either
into a :class:`_Tree` of :class:`_ImageFile` records (archive members are read into memory)."""

from __future__ import annotations

import os
import tarfile
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from common.data.dataset import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


# --------------------------------------------------------------------------------------------
# Image folders and archives: a common file tree
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ImageFile:
    parts: tuple[str, ...]  # path relative to the tree root; the last part is the file name
    name: str  # how error messages name the file
    data: bytes | Path  # member bytes (archive) or file path (folder)


def _hidden(part: str) -> bool:
    """Skip dot-files/folders (also '..') and macOS archive debris."""
    return part.startswith(".") or part == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


class _Tree:
    """Image files of a folder or archive, indexed by parent folder (paths as part tuples)."""

    def __init__(self, origin: str, files: list[_ImageFile], dirs: list[tuple[str, ...]]) -> None:
        self.origin = origin
        self._files: dict[tuple[str, ...], list[_ImageFile]] = defaultdict(list)
        self._subdirs: dict[tuple[str, ...], set[str]] = defaultdict(set)
        all_dirs = set(dirs)
        for f in files:
            self._files[f.parts[:-1]].append(f)
            all_dirs.update(f.parts[:i] for i in range(1, len(f.parts)))
        for d in all_dirs:
            self._subdirs[d[:-1]].add(d[-1])
        self.all_files = sorted(files, key=lambda f: f.parts)

    def files(self, folder: tuple[str, ...]) -> list[_ImageFile]:
        """Image files directly in ``folder``, sorted by name."""
        return sorted(self._files.get(folder, []), key=lambda f: f.parts[-1])

    def subdirs(self, folder: tuple[str, ...]) -> list[str]:
        """Names of the folders directly in ``folder``, sorted."""
        return sorted(self._subdirs.get(folder, ()))

    def where(self, folder: tuple[str, ...]) -> str:
        """Human-readable location of ``folder``."""
        return self.origin if not folder else f"{self.origin}/{'/'.join(folder)}"


def _scan_folder(root: Path) -> _Tree:
    """List the image files under ``root`` (recursively, following links, skipping hidden ones)."""

    def fail(exc: OSError) -> None:
        raise DataError(f"cannot read folder {exc.filename}: {exc.strerror}; check its permissions") from exc

    files: list[_ImageFile] = []
    dirs: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop: do not walk the same folder twice
            dirnames[:] = []
            continue
        seen.add(real)
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        dirs.extend(rel + (d,) for d in dirnames)
        for fn in filenames:
            if not _hidden(fn) and _is_image_name(fn):
                full = Path(dirpath, fn)
                files.append(_ImageFile(rel + (fn,), str(full), full))
    return _Tree(str(root), files, dirs)


def _scan_archive(path: Path) -> _Tree:
    """Read every image member of a tar(.gz) archive into memory, in one streaming pass.

    Streaming (``r|*``) decompresses the archive once; random access into a gzip stream would
    decompress it again for each member. Compressed image bytes are small (CIFAR-10: ~20 MB).
    """
    files: list[_ImageFile] = []
    dirs: list[tuple[str, ...]] = []
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                parts = tuple(p for p in PurePosixPath(member.name).parts if p not in ("/", "."))
                if not parts or any(_hidden(p) for p in parts):
                    continue
                if member.isdir():
                    dirs.append(parts)
                elif member.isfile() and _is_image_name(parts[-1]):
                    fh = tar.extractfile(member)
                    data = fh.read() if fh is not None else b""
                    files.append(_ImageFile(parts, f"{'/'.join(parts)} in {path}", data))
    except tarfile.ReadError as exc:
        if str(exc) != "empty file":  # (a stream of no bytes, compressed or not, is an archive of no members)
            raise DataError(f"cannot read archive {path}: {exc}; the file is corrupt or not a tar/tar.gz "
                            "archive") from exc
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"cannot read archive {path}: {exc}; the file is corrupt or not a tar/tar.gz archive"
        ) from exc
    return _Tree(str(path), files, dirs)
