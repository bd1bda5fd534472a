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

The manifest is not in the digest, but it must list exactly the bundle's other members, each once, with
their own sha256 and size (``check_manifest``): Flower's installer hashes every path the manifest names
(``tmpdir / path``, so an absolute or ``..`` path reaches the site's own files) in every ClientApp process,
before the app runs, and sends any failure's text to the SuperLink. A manifest with an extra line would
have turned an approved bundle into a free oracle of the site's files. Anything in the bytes the digest
cannot read (bad compression, a pyproject that is not TOML, a member too large) is a ``BundleError``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import zipfile
from pathlib import Path

try:  # Python >= 3.11
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ".info/CONTENT"
DIGEST_RE = re.compile(r"[0-9a-f]{64}")  # a bundle digest: sha256, lower-case hex


class BundleError(ValueError):
    """The bundle cannot be digested (not a zip, duplicate or unsafe member names)."""


MAX_BUNDLE_BYTES = 64 * 2**20  # uncompressed, all members; fedsynth's own bundle holds about 0.7 MB
MAX_BUNDLE_MEMBERS = 10_000  # fedsynth's own holds about 80


def bundle_digest(fab: bytes) -> str:
    """The content digest of a FAB (module docstring), after ``check_manifest``; BundleError if unreadable."""
    try:
        return _digest(fab)
    except BundleError:
        raise
    except Exception as err:  # bytes the SuperLink chose: refuse them, never let the SuperNode stop on them
        raise BundleError(f"the bundle cannot be read ({type(err).__name__})") from None


MAX_DIRECTORY_BYTES = 2**20  # the zip's central directory (46 bytes a member, and its name); fedsynth's: ~8 KB
# (zipfile parses it by its size, whatever the count says: 4 MiB of empty entries took 0.35 s a refused bundle, which
# is digested again each time it is sent: review s62)
_END_RECORD, _ZIP64_LOCATOR = b"PK\x05\x06", b"PK\x06\x07"


def _check_directory(fab: bytes) -> None:
    """Refuse, before ``zipfile`` reads it, a bundle too long or whose central directory is too large: zipfile parses
    every entry of the directory its end record names before any count can be checked (review s62: 44 MB of empty
    entries held the SuperNode 6 s and 270 MB, and Flower accepts bundles of up to 2 GiB). The end record is found
    where zipfile finds it (the last 22 bytes, else the last one in the final 64 KiB); zip64 archives are refused."""
    if len(fab) > 2 * MAX_BUNDLE_BYTES:
        raise BundleError(f"the bundle is larger than {2 * MAX_BUNDLE_BYTES} bytes")
    if len(fab) >= 22 and fab[-22:-18] == _END_RECORD and fab[-2:] == b"\0\0":
        end = len(fab) - 22
    else:
        end = fab.rfind(_END_RECORD, max(0, len(fab) - 22 - 65_535))
        if end < 0 or end + 22 > len(fab):
            raise BundleError("the bundle is not a zip archive (no end record)")
    if end >= 20 and fab[end - 20:end - 16] == _ZIP64_LOCATOR:
        raise BundleError("the bundle is a zip64 archive, which no fedsynth bundle is")
    entries, directory = struct.unpack_from("<HI", fab, end + 10)
    if entries > MAX_BUNDLE_MEMBERS or directory > MAX_DIRECTORY_BYTES:
        raise BundleError(f"the bundle's directory names {entries} members in {directory} bytes; at most "
                          f"{MAX_BUNDLE_MEMBERS} members in {MAX_DIRECTORY_BYTES} bytes")


def _digest(fab: bytes) -> str:
    _check_directory(fab)
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        infos = archive.infolist()
    except zipfile.BadZipFile as err:
        raise BundleError(f"the bundle is not a zip archive: {err}") from None
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        raise BundleError("the bundle holds two members with the same name")
    if len(infos) > MAX_BUNDLE_MEMBERS or sum(info.file_size for info in infos) > MAX_BUNDLE_BYTES:
        raise BundleError(f"the bundle holds more than {MAX_BUNDLE_MEMBERS} members or {MAX_BUNDLE_BYTES} bytes")
    if len(fab) > archive_bytes_bound(infos):
        raise BundleError("the bundle carries bytes its members do not account for (padding, a comment or data "
                          "before the archive)")
    lines, members = [], {}
    for info in sorted(infos, key=lambda i: i.filename):
        name = info.filename
        if not name or name.startswith("/") or ".." in name.split("/") or "\\" in name or name.endswith("/"):
            raise BundleError(f"the bundle member {name!r} points outside the bundle or is a folder")
        if name == MANIFEST:
            continue
        data = archive.read(name)  # at most info.file_size bytes (zipfile stops there), capped above
        members[name] = (hashlib.sha256(data).hexdigest(), 8 * len(data))  # Flower writes sizes in bits
        if name == "pyproject.toml":
            data = json.dumps(tomllib.loads(data.decode("utf-8")), sort_keys=True).encode()
        lines.append(f"{name}\0{hashlib.sha256(data).hexdigest()}")
    check_manifest(archive.read(MANIFEST).decode("utf-8") if MANIFEST in names else None, members)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def archive_bytes_bound(infos: list[zipfile.ZipInfo]) -> int:
    """The most bytes a zip of these members may take (review s59: the digest reads members only, so junk before
    the archive, a comment or a padded member made byte variants of an approved bundle without bound): each member
    at most its size plus deflate's worst-case growth (5 bytes a 16 KiB stored block), its two headers with the
    name and extra field each, and the end record."""
    def member(info: zipfile.ZipInfo) -> int:
        return (info.file_size + 5 * (info.file_size // 16_383 + 1) + 64
                + 2 * (46 + len(info.filename.encode()) + len(info.extra)))
    return sum(member(info) for info in infos) + 22 + 1_024


def check_manifest(manifest: str | None, members: dict[str, tuple[str, int]]) -> None:
    """Refuse a manifest that is not exactly one ``name,sha256,size`` line per other member, as Flower builds it
    (``flwr.cli.build``: the size in bits).

    Read the way Flower's installer reads it (``flwr.cli.install._verify_hashes``: lines of the stripped text,
    split on commas), so every path the installer will hash is a member of the bundle itself."""
    if manifest is None:
        raise BundleError(f"the bundle has no manifest ({MANIFEST})")
    listed: dict[str, tuple[str, int]] = {}
    for line in manifest.strip().split("\n"):
        parts = line.split(",")
        if len(parts) != 3 or parts[0] in listed or not parts[2].isdigit():
            raise BundleError(f"the bundle's manifest ({MANIFEST}) has a malformed or repeated line")
        listed[parts[0]] = (parts[1], int(parts[2]))
    if listed != members:
        raise BundleError(f"the bundle's manifest ({MANIFEST}) does not list exactly its members with their "
                          "sha256 and size")


def bundle_app_id(fab: bytes) -> tuple[str, str]:
    """(fab_id, version) from the bundle's own pyproject, as Flower reads them (publisher/name, version)."""
    try:
        config = tomllib.loads(zipfile.ZipFile(io.BytesIO(fab)).read("pyproject.toml").decode("utf-8"))
        return f"{config['tool']['flwr']['app']['publisher']}/{config['project']['name']}", config["project"]["version"]
    except Exception as err:  # noqa: BLE001 - the SuperLink's bytes
        raise BundleError(f"the bundle's pyproject.toml names no app publisher, name and version "
                          f"({type(err).__name__})") from None


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


def is_digest(text: object) -> bool:
    """Whether ``text`` is a bundle digest as the guard computes and compares them: 64 lower-case hex digits. (Any
    64 characters were accepted before review s58: one pasted in upper case, or with a typo, never matched, and the
    site then refused every run with nothing said at its start.)"""
    return isinstance(text, str) and DIGEST_RE.fullmatch(text) is not None


def installed_bundle_digest(project_root: Path = PROJECT_ROOT) -> str:
    return bundle_digest(installed_bundle(project_root))


def write_approvals(path: Path, digests: list[str], source: str) -> Path:
    """The file the guarded SuperNode reads: the approved digests and where the default one came from."""
    from common.files import atomic_write_json

    return atomic_write_json(path, {"approved": sorted(set(digests)), "source": source})


def read_approvals(path: Path) -> set[str]:
    approved = json.loads(Path(path).read_text())["approved"]
    if not approved or not all(is_digest(d) for d in approved):
        raise BundleError(f"{path} lists no valid bundle digest: a site must approve at least one")
    return set(approved)
