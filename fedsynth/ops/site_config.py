"""site.yaml: reading and checking a site's configuration into ``SiteDeployment``.

The YAML fills the one definition of a site's settings, ``client.site.SiteSettings`` (what the site's handlers read,
passed to the SuperNode as its node config), plus what only the process needs: where the coordinator is, the
credentials, the local port and the approved app bundles. Every value is checked here, with a message that says
what to write instead; ``fedsynth.ops.site_cmd`` then checks the credentials, data and ledger and runs the site.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from client.site import SiteSettings
from common.config import MODES
from common.data import LABEL_FROM_CLASSES, SENSITIVE_ATTRIBUTES, sensitive_attribute_problem
from common.device import pick_device
from fedsynth.ops.approved_code import is_digest
from fedsynth.ops.fields import DeployError, Fields, NAME_RE, load_yaml, parse_address
from fedsynth.ops.node_folder import node_dir

SETTINGS_DEFAULTS = {f.name: f.default for f in fields(SiteSettings)}
WORK_LIMITS = ("max_parameters", "max_batch_size", "max_steps_per_run", "max_step_memory_mb", "max_run_disk_mb",
               "max_state_disk_mb")  # client.limits
SITE_KEYS = ("name", "data", "dataset_id", "split", "image_size", "label_from", "sensitive_attribute", "heldout",
             "heldout_split", "epsilon",
             "delta", "state_dir", "modes", "evaluation", "audits", "queries_per_run", "require_secure_aggregation",
             "allow_distributed_noise",
             "min_reply_seconds", "device", *WORK_LIMITS, "coordinator", "ca_cert", "private_key", "supernode_port", "approved_bundles",
             "approve_installed")


@dataclass
class SiteDeployment:
    """A site.yaml: the site's settings plus what its SuperNode process needs."""

    settings: SiteSettings
    coordinator: str
    ca_cert: Path | None
    private_key: Path | None
    supernode_port: int
    approved_bundles: list[str]  # extra digests the operator reviewed and approved
    approve_installed: bool  # also approve the bundle of this site's own installed fedsynth (default)
    source: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def node_dir(self) -> Path:
        """This SuperNode's own files in the state folder: its node config, approvals and Flower home. Two SuperNodes
        over the same records share one state folder, for its one ledger, so these are kept apart by site name (review
        s60: the second site's check rewrote the first's node config, approvals and Flower home, and its start cleared
        the first's SecAgg+ stage claims)."""
        return node_dir(self.state_dir, self.name)

    @property
    def node_config(self) -> Path:
        return self.node_dir / "node-config.toml"

    @property
    def flwr_home(self) -> Path:
        return self.node_dir / "flwr-home"


def _choice(f: Fields, key: str, allowed: tuple[str, ...], path) -> str:
    value = f.str(key, SETTINGS_DEFAULTS[key])
    if value not in allowed:
        raise DeployError(f"{path}: '{key}' must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def _min_reply_seconds(f: Fields, path: str | Path) -> float:
    value = f.float("min_reply_seconds", 0.0)
    if not 0 <= value < 86_400:
        raise DeployError(f"{path}: 'min_reply_seconds' must be in [0, 86400) (0 = reply as soon as the work is "
                          f"done), got {value}; set it above this site's slowest round and below the coordinator's "
                          "round timeout")
    return value


def _device(f: Fields, path: str | Path) -> str:
    value = f.str("device", "")
    if value:
        try:
            device = pick_device(value)
        except ValueError as err:
            raise DeployError(f"{path}: 'device': {err}") from None
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise DeployError(f"{path}: 'device': {value!r} names a GPU this machine does not have (it has "
                              f"{torch.cuda.device_count()}); use cuda, auto or cpu")
    return value


def load_site_config(path: str | Path) -> SiteDeployment:
    raw, base = load_yaml(path, "site")
    f = Fields(raw, str(path), base, SITE_KEYS)
    name = f.str("name")
    if not NAME_RE.fullmatch(name):
        raise DeployError(f"{path}: 'name' {name!r} must be 1-64 letters, digits, '.', '_' or '-' (e.g. site1)")
    dataset_id = f.str("dataset_id", name)
    if not NAME_RE.fullmatch(dataset_id):
        raise DeployError(f"{path}: 'dataset_id' {dataset_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    data = f.str("data")
    data = data if data == "digits" else str(f.path("data"))
    split = _choice(f, "split", ("train", "val", "test"), path)
    image_size = f.int("image_size", 0, lo=0, hi=1024)
    if 0 < image_size < 8:
        raise DeployError(f"{path}: 'image_size' must be 0 (keep) or >= 8, got {image_size}")
    label_from = _choice(f, "label_from", ("", *sorted(LABEL_FROM_CLASSES)), path)
    sensitive = _choice(f, "sensitive_attribute", ("", *SENSITIVE_ATTRIBUTES), path)
    if why := sensitive_attribute_problem(label_from, sensitive):
        raise DeployError(f"{path}: 'sensitive_attribute': {why}")
    heldout = f.str("heldout", "")
    if heldout and heldout != "digits":
        heldout = str(f.path("heldout"))
    heldout_split = _choice(f, "heldout_split", ("train", "val", "test"), path)
    if heldout and (heldout, heldout_split) == (data, split):
        raise DeployError(f"{path}: 'heldout' is the training data itself ({heldout} split {split}); held-out "
                          "records must never be trained on -- use another split or folder, or leave heldout empty")
    epsilon = f.float("epsilon")
    if not epsilon > 0:
        raise DeployError(f"{path}: 'epsilon' (this site's total privacy budget for its dataset) must be > 0, "
                          f"got {epsilon}; typical values are 1 to 10")
    delta = f.float("delta", 0.0)
    if not 0 <= delta < 1:
        raise DeployError(f"{path}: 'delta' must be in [0, 1) (0 = min(1e-5, 1/(10 n~)) for a noisy size n~ >= n), got {delta}")
    # a sensitive attribute is replaced by drawing from a generator: only the DP-GAN mode has one
    modes = raw.get("modes", ["dpgan"] if sensitive else list(MODES))
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
        raise DeployError(f"{path}: 'modes' must be a non-empty list taken from {list(MODES)}, got {modes!r}")
    if sensitive and modes != ["dpgan"]:
        raise DeployError(f"{path}: a site that declares a sensitive attribute allows only modes: [dpgan] (the "
                          f"statistics mode has no generator to draw another {sensitive} with), got {modes!r}")
    evaluation, audits = f.bool("evaluation", False), f.bool("audits", False)
    if (evaluation or audits) and not heldout:
        raise DeployError(f"{path}: 'evaluation' and 'audits' answer questions about held-out records: set 'heldout' "
                          "to a folder of records the site never trains on, or switch them off")
    coordinator = f.str("coordinator")
    parse_address(coordinator, f"{path}: 'coordinator'")
    approved = raw.get("approved_bundles") or []
    if not isinstance(approved, list) or not all(is_digest(d) for d in approved):
        raise DeployError(f"{path}: 'approved_bundles' must be a list of bundle digests, 64 lower-case hex digits "
                          "each (fedsynth bundle-digest prints one)")
    settings = SiteSettings(
        name=name, data=data, state_dir=f.path("state_dir"), epsilon_budget=epsilon, dataset_id=dataset_id,
        split=split, image_size=image_size, label_from=label_from, sensitive_attribute=sensitive, delta=delta,
        modes=tuple(dict.fromkeys(modes)),
        heldout=heldout, heldout_split=heldout_split, evaluation=evaluation, audits=audits,
        queries_per_run=f.int("queries_per_run", 1, lo=1, hi=100),
        require_secure_aggregation=f.bool("require_secure_aggregation", False),
        allow_distributed_noise=f.bool("allow_distributed_noise", False),
        min_reply_seconds=_min_reply_seconds(f, path), device=_device(f, path),
        **{key: f.int(key, SETTINGS_DEFAULTS[key], lo=1) for key in WORK_LIMITS})
    return SiteDeployment(
        settings=settings, coordinator=coordinator, ca_cert=f.path("ca_cert") if f.has("ca_cert") else None,
        private_key=f.path("private_key") if f.has("private_key") else None,
        supernode_port=f.int("supernode_port", 9094, lo=1, hi=65535), approved_bundles=list(approved),
        approve_installed=f.bool("approve_installed", True), source=Path(path).resolve())
