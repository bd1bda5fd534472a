"""Which code a site runs: the app bundles (FABs) its operator approved, identified by a content digest.

A Flower SuperNode runs the ClientApp from the bundle the SuperLink hands it for each run, so whoever
submits a run chooses the code that executes next to the site's data. A site therefore pins the
bundles it will run. The default approval is computed from the site's own installed fedsynth: the
bundle Flower's builder makes of it, i.e. exactly the bundle a coordinator running the same release
submits. The operator may approve more digests (another release they reviewed) in site.yaml.

Digest: SHA-256 over the sorted list of (member name, SHA-256 of its bytes) of every member of the
bundle's zip, except Flower's generated manifest ``.info/CONTENT``; ``pyproject.toml`` is hashed in a
canonical form (parsed TOML as sorted JSON) because Flower re-serialises it when building. So the
digest changes with any byte of any file, any added or removed file, and any change of settings --
and does not change with zip compression or TOML formatting. A bundle with duplicate members or
paths outside its root is refused outright.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ".info/CONTENT"


class BundleError(ValueError):
    """The bundle cannot be digested (not a zip, duplicate or unsafe member names)."""


def bundle_digest(fab: bytes) -> str:
    """The content digest of a FAB (module docstring)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        names = archive.namelist()
    except zipfile.BadZipFile as err:
        raise BundleError(f"the bundle is not a zip archive: {err}") from None
    if len(set(names)) != len(names):
        raise BundleError("the bundle holds two members with the same name")
    lines = []
    for name in sorted(names):
        if name.startswith("/") or ".." in name.split("/") or "\\" in name:
            raise BundleError(f"the bundle member {name!r} points outside the bundle")
        if name == MANIFEST:
            continue
        data = archive.read(name)
        if name == "pyproject.toml":
            data = json.dumps(tomllib.loads(data.decode("utf-8")), sort_keys=True).encode()
        lines.append(f"{name}\0{hashlib.sha256(data).hexdigest()}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


APP_PACKAGES = ("client", "common", "server")  # what `fab-include` in pyproject.toml puts in the bundle


def installed_bundle(project_root: Path = PROJECT_ROOT) -> bytes:
    """The bundle Flower builds from the installed fedsynth (what `fedsynth run` of this release submits).

    Flower's own builder makes it, from the files it would pick from the whole tree: pyproject.toml,
    .gitignore and the app packages (``fab-include`` keeps nothing else), so the tree's other folders
    (a virtualenv, run outputs) need not be walked."""
    from flwr.cli.build import build_fab_from_files
    from flwr.cli.utils import collect_files

    if not (project_root / "pyproject.toml").is_file():
        raise BundleError(f"no pyproject.toml in {project_root}: fedsynth is not installed from its source tree, so "
                          "the site cannot compute its own bundle; list approved_bundles in site.yaml instead")
    files: dict = {name: project_root / name for name in ("pyproject.toml", ".gitignore")
                   if (project_root / name).is_file()}
    for package in APP_PACKAGES:
        files.update({f"{package}/{rel}": path for rel, path in collect_files(project_root / package).items()})
    return build_fab_from_files(files)[0]


def installed_bundle_digest(project_root: Path = PROJECT_ROOT) -> str:
    return bundle_digest(installed_bundle(project_root))


def write_approvals(path: Path, digests: list[str], source: str) -> Path:
    """The file the guarded SuperNode reads: the approved digests and where the default one came from."""
    from common.files import atomic_write_json

    return atomic_write_json(path, {"approved": sorted(set(digests)), "source": source})


def read_approvals(path: Path) -> set[str]:
    approved = json.loads(Path(path).read_text())["approved"]
    if not approved or not all(isinstance(d, str) and len(d) == 64 for d in approved):
        raise BundleError(f"{path} lists no valid bundle digest: a site must approve at least one")
    return set(approved)
