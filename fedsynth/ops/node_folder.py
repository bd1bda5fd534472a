"""A SuperNode's own folder in its site's state folder, and what the guard clears and locks in it at each start.

Two SuperNodes over the same records share one state folder, for its one privacy ledger (deploy/README.md, section
3). Until review s60 they shared every other file there too: the second one's check rewrote the first's node config
(which a Docker SuperNode reads at its next start), its approvals and its Flower home, and its start cleared the first's
SecAgg+ stage claims. Each now keeps them under its site name (``<state_dir>/nodes/<name>/``,
``<state_dir>/secure-setups/<name>/``), and holds a lock on its folder while it runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

from common.state_layout import NODES_FOLDER, nodes_folder, setups_folder
from fedsynth.ops.fields import NAME_RE

NODE_LOCK = "supernode.lock"  # in a SuperNode's own folder (site_config.SiteDeployment.node_dir), held while it runs
_held_lock: list[int] = []  # the lock's descriptor, kept open for the life of this process


def node_dir(state_dir: Path, name: str) -> Path:
    """A site's own folder in its state folder (its node config, approvals, Flower home and lock)."""
    return nodes_folder(state_dir) / name


def _node_config(supernode_args: list[str]) -> tuple[Path | None, dict]:
    """(the file, or None for an inline ``key=value`` config; the settings) of the node config Flower's SuperNode
    will read from ``supernode_args``, read as Flower reads them (review s61: its own parser, so an abbreviated
    ``--node-conf`` or a repeated option is seen; a value ending in .toml is a file, ``~`` expanded; anything else
    inline settings). ({} where there is none or it does not parse: Flower then refuses it itself.)"""
    import importlib

    from flwr.common.config import parse_config_args

    parser = importlib.import_module("flwr.supernode.cli.flower_supernode")._parse_args_run_supernode()
    try:
        value = parser.parse_known_args(supernode_args)[0].node_config
    except SystemExit:  # (arguments Flower refuses: it will refuse them itself, and start nothing)
        return None, {}
    if not value:
        return None, {}
    if value.endswith(".toml"):
        path = Path(value).expanduser()
        return path, read_node_config(path)
    try:
        return None, parse_config_args([value])
    except Exception:  # noqa: BLE001 - a string Flower cannot read either
        return None, {}


def _same_folder(a: Path, b: Path) -> bool:
    return a.is_dir() and b.is_dir() and os.path.samefile(a, b)  # (as files: a bind-mounted alias is the same)


def _sits_elsewhere(config_path: Path, state_dir: Path) -> bool:
    """Whether a node config in a ``nodes/`` folder -- as given, or once links are resolved -- lies outside the
    ``nodes/`` of ``state_dir`` (review s61: a link into a state folder's nodes/ from a config kept elsewhere; a
    state folder whose nodes/ is itself a link to another disk is the same folder)."""
    given, real = Path(os.path.abspath(config_path)), config_path.resolve()
    return any(path.parent.parent.name == NODES_FOLDER and not _same_folder(path.parent.parent, nodes_folder(state_dir))
               for path in (given, real))


def lock_node_folder(folder: Path) -> int | None:
    """An exclusive lock on a SuperNode's own folder, held by the returned descriptor until it is closed; None when
    another process holds it. Two SuperNodes over the same records share a state folder, for its one ledger, and each
    keeps its node config, approvals and Flower home in a folder of its site's name (review s60): the lock refuses a
    second SuperNode of the same name there, which would overwrite the first's files and clear its stage claims."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / NODE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _node_folder(config: dict) -> Path | None:
    """:func:`node_dir` of a node config fedsynth wrote (its ``state-dir`` and ``site-name``), else None."""
    state, name = config.get("state-dir"), config.get("site-name")
    if isinstance(state, str) and state and isinstance(name, str) and NAME_RE.fullmatch(name):
        return node_dir(Path(state), name)
    return None


def read_node_config(path: Path | None) -> dict:
    """A node config file's settings (a .toml file), read as Flower's SuperNode reads it (``parse_config_args``:
    flattened, so a ``[""]`` table's keys are top-level ones: review s61), so that the guard, ``fedsynth site``'s
    checks and Flower read one config alike; {} where there is none or it does not parse."""
    from flwr.common.config import parse_config_args

    try:
        return parse_config_args([str(path)]) if path is not None else {}
    except Exception:  # noqa: BLE001 - a missing or unreadable file, or one Flower cannot read either
        return {}


def hold_node_lock(supernode_args: list[str]) -> None:
    """Lock the site's own folder, read from the node config ``--node-config`` names (the file's folder for a config
    fedsynth did not write), for the life of this process, or stop. From the config's contents, so that a SuperNode
    started with an older compose file's path locks the same folder as one ``fedsynth site`` starts; a config in one
    site's folder that names another site is refused (review s60: it would use one folder under the other's lock), and
    so is one in a state folder's ``nodes/`` that names another state folder (review s61: a Docker SuperNode given
    a config written with the host's paths kept its ledger where the config said, off the mounted volume, where a
    rebuilt container starts afresh)."""
    path, config = _node_config(supernode_args)
    folder = _node_folder(config)
    if folder is None and {"site-name", "state-dir", "data-path"} & set(config):  # a site's, which fedsynth reads
        sys.exit(f"fedsynth: the node config {path or 'given inline'} names no valid site-name and state-dir "
                 "(letters, digits, '-', '_', '.'); run `fedsynth site --check` for the site to write its own")
    if folder is not None and not Path(config["state-dir"]).is_dir():  # never made here: that is --check's work
        sys.exit(f"fedsynth: the node config {path or 'given inline'} names state-dir {config['state-dir']}, which "
                 "is not a folder here; run `fedsynth site --check` where this SuperNode runs (in a container: inside "
                 "it), with site.yaml's paths as the SuperNode sees them")
    for where in {Path(os.path.abspath(path)), path.resolve()} if folder is not None and path is not None else ():
        if where.parent.parent.name == NODES_FOLDER and where.parent.name != folder.name:
            sys.exit(f"fedsynth: the node config {path} names site '{folder.name}' but sits in the folder of site "
                     f"'{where.parent.name}'; run `fedsynth site --check` for the site to write its own")
    if folder is not None and path is not None and _sits_elsewhere(path, Path(config["state-dir"])):
        sys.exit(f"fedsynth: the node config {path} sits in another state folder than the state-dir it names, "
                 f"{config['state-dir']}: the site would keep its ledger there instead; run `fedsynth site --check` "
                 "where this SuperNode runs (in a container: inside it), with site.yaml's paths as the SuperNode sees "
                 "them")
    if folder is None and path is None:
        return  # (an inline config of no site: no folder of ours to lock)
    folder = folder or path.parent
    try:
        fd = lock_node_folder(folder)
    except OSError as err:
        sys.exit(f"fedsynth: cannot lock {folder} ({err.strerror}): a SuperNode needs its own folder to be writable")
    if fd is None:
        sys.exit(f"fedsynth: another SuperNode runs with the node files in {folder}; stop it first, or give a "
                 "second SuperNode over the same records a site name of its own (and the same dataset_id)")
    _held_lock.append(fd)


def clear_stage_claims(supernode_args: list[str]) -> None:
    """Remove the SecAgg+ stage claims of the site whose node config ``--node-config`` names (its ``state-dir`` and
    ``site-name``): only its own, since another SuperNode over the same records may run on the state folder.

    A setup's secrets live in the SuperNode's memory only, so its claims (client.secure_site) mean nothing once it
    restarts; a coordinator could make a site keep two empty files per setup, for free and for ever (review s58).
    Cleared here, at every start, whether ``fedsynth site`` or a Docker entry point starts the SuperNode."""
    config = _node_config(supernode_args)[1]
    if (folder := _node_folder(config)) is not None:  # (nothing of ours to clear in a file fedsynth did not write)
        claims = setups_folder(config["state-dir"])
        shutil.rmtree(claims / folder.name, ignore_errors=True)
        for old in claims.glob("*"):  # claims a fedsynth before review s60 kept at the top, for every node alike
            if old.is_file():
                old.unlink(missing_ok=True)
