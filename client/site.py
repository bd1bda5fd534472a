"""Who this site is: its name, its private data, its budget, its policy and where it keeps its state.

:class:`SiteSettings` is the one definition of a site's settings. Two sources fill it:

- Deployment: the SuperNode's node config, written by ``fedsynth site`` from the site's own YAML
  (:meth:`SiteSettings.to_node_config` / :meth:`SiteSettings.from_node_config`). The budget, the
  dataset id and the query policy are the site's, never the coordinator's.
- Simulation: the node config only carries ``partition-id``/``num-partitions`` (plus what the
  simulation adds); the site loads its partition of the run's dataset and, since the person running a
  simulation owns every virtual site, takes its budget from the run config.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from client import ledger_file as lf
from client.ledger import BudgetExceeded, PrivacyLedger
from client.limits import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_PARAMETERS,
    DEFAULT_MAX_RUN_DISK_MB,
    DEFAULT_MAX_STATE_DISK_MB,
    DEFAULT_MAX_STEP_MEMORY_MB,
    DEFAULT_MAX_STEPS_PER_RUN,
)
from client.refusal import Refusal
from client.site_delta import PURPOSE as DELTA_PURPOSE
from client.site_delta import draw_default_delta, least_budget, size_event
from common import protocol as P
from common.config import MODES, RunConfig
from common.data import DataError, ImageDataset, NoRecords, load_dataset, sensitive_attribute_problem
from common.files import fsync_dir
from common.partition import parse_partition, partition_indices
from common.state_layout import ledger_folder, runs_folder

log = logging.getLogger("fedsynth.site")


@dataclass(frozen=True)
class SiteSettings:
    """Everything about a site that its handlers need. Defaults are THE defaults (site.yaml documents them)."""

    name: str
    data: str  # dataset source (path or "digits")
    state_dir: Path  # private folder: ledger, plans, cached replies, discriminator
    epsilon_budget: float  # the site's total budget for this dataset (inf = unlimited, allows non-private runs)
    dataset_id: str = ""  # the ledger's key; "" = the site's name
    split: str = "train"
    image_size: int = 0
    channels: int = 0  # 0 = as the images are; a deployed site's start pins the shape it validated (site_cmd)
    classes: str = ""  # JSON list of class names a deployed site's start pinned (site_cmd.pinned); "" = the data's
    # JSON list: the folder inside an image folder or archive that holds the split's class folders, pinned at start
    # like the classes (common.data.dataset_root); "" = resolved at each load
    data_root: str = ""
    heldout_root: str = ""
    label_from: str = ""
    sensitive_attribute: str = ""  # an attribute the synthetic set must draw independently (seed 004); published
    delta: float = 0.0  # 0 = min(1e-5, 1/(10 n~)), n~ a noisy size, when the ledger is created, then the ledger's
    modes: tuple[str, ...] = MODES  # synthesis modes this site's operator allows
    heldout: str = ""  # the site's own held-out records (for evaluation and audits); "" = none
    heldout_split: str = "test"
    evaluation: bool = False  # answer DP evaluation queries (noisy, charged, capped)
    audits: bool = False  # answer DP audit queries (noisy, charged, capped)
    queries_per_run: int = 1  # cap on evaluation queries and on audit queries per run
    require_secure_aggregation: bool = False  # refuse every request that is not part of a secure aggregation
    # add only 1/sqrt(t) of the statistics release's noise when a secure aggregation promises that every sum the
    # coordinator can unmask holds t releases (distributed noise): trusts the coordinator to run SecAgg+ honestly
    allow_distributed_noise: bool = False
    min_reply_seconds: float = 0.0  # no reply leaves before this many seconds after its request came (0 = off):
    # hides how long the work took, which depends on the record count (client.requests.site_handler)
    device: str = ""  # where the site computes (auto | cpu | cuda | cuda:N); wins over the run's; "" = the run's
    # work limits (client.limits): a request beyond one is refused before anything is built
    max_parameters: int = DEFAULT_MAX_PARAMETERS  # of any one network a request makes the site build
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE  # expected DP-SGD batch
    max_steps_per_run: int = DEFAULT_MAX_STEPS_PER_RUN  # DP-SGD steps over one run
    max_step_memory_mb: int = DEFAULT_MAX_STEP_MEMORY_MB  # one step on a batch: per-sample gradients + activations
    max_run_disk_mb: int = DEFAULT_MAX_RUN_DISK_MB  # what one run keeps in state_dir over its rounds
    max_state_disk_mb: int = DEFAULT_MAX_STATE_DISK_MB  # what all runs keep there together
    # simulation only: which partition of `data` this site holds
    partition_id: int | None = None
    num_partitions: int | None = None
    partition: str = "iid"
    seed: int = 0

    def __post_init__(self) -> None:
        why = sensitive_attribute_problem(self.label_from, self.sensitive_attribute)
        if why:
            raise ValueError(f"site {self.name}: {why}")
        pinned_classes(self)  # (refuses a pin that is not a list of class names)
        for pin in (self.data_root, self.heldout_root):
            _pinned_root(self.name, pin)
        if not (0 <= self.min_reply_seconds < 86_400):
            raise ValueError(f"site {self.name}: min_reply_seconds must be in [0, 86400), got {self.min_reply_seconds}")

    @property
    def delta_bound(self) -> float:
        """The delta bound the site publishes (``query.info``): its configured delta, or the default's bound. Public:
        a decision taken before the census reads this, never the ledger's delta (which the default sets from a
        noisy size, client.site_delta)."""
        return self.delta if self.delta > 0 else P.DEFAULT_DELTA_BOUND

    @property
    def ledger_id(self) -> str:
        return self.dataset_id or self.name

    @property
    def ledger_path(self) -> Path:
        return ledger_folder(self.state_dir) / f"{_safe_id(self.ledger_id)}.jsonl"

    def to_node_config(self) -> dict[str, Any]:
        """The Flower node config a deployed SuperNode carries (flat TOML scalars)."""
        return {"site-name": self.name, "data-path": self.data, "state-dir": str(self.state_dir),
                "epsilon": self.epsilon_budget, "dataset-id": self.dataset_id, "split": self.split,
                "image-size": self.image_size, "channels": self.channels, "classes": self.classes,
                "data-root": self.data_root, "heldout-root": self.heldout_root,
                "label-from": self.label_from,
                "sensitive-attribute": self.sensitive_attribute, "delta": self.delta,
                "modes": ",".join(self.modes), "heldout-path": self.heldout, "heldout-split": self.heldout_split,
                "evaluation": self.evaluation, "audits": self.audits, "queries-per-run": self.queries_per_run,
                "require-secure-aggregation": self.require_secure_aggregation,
                "allow-distributed-noise": self.allow_distributed_noise,
                "min-reply-seconds": self.min_reply_seconds, "device": self.device,
                "max-parameters": self.max_parameters, "max-batch-size": self.max_batch_size,
                "max-steps-per-run": self.max_steps_per_run, "max-step-memory-mb": self.max_step_memory_mb,
                "max-run-disk-mb": self.max_run_disk_mb, "max-state-disk-mb": self.max_state_disk_mb}

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> "SiteSettings":
        """Build the site's settings from its node config (and, in simulation, the run config)."""
        if "data-path" in node_config:  # a deployed site: everything comes from its own config
            if not node_config.get("state-dir"):
                raise ValueError("node config 'state-dir' is missing: a site needs a private folder for its "
                                 "ledger and local models (set state_dir in the site YAML)")
            if "epsilon" not in node_config:
                raise ValueError("node config 'epsilon' is missing: a site must set its own privacy budget")
            return cls(**_from_dashed(node_config, {
                "site-name": "name", "data-path": "data", "state-dir": "state_dir", "epsilon": "epsilon_budget",
                "heldout-path": "heldout"}))
        if "partition-id" not in node_config:
            raise ValueError("node config has neither 'data-path' (deployment) nor 'partition-id' (simulation); "
                             "start the SuperNode with fedsynth site --config site.yaml")
        run = RunConfig.from_mapping(run_config)
        pid = int(node_config["partition-id"])
        root = run.state_dir or str(Path(run.out_dir) / "sites")
        name = str(node_config.get("site-name") or f"site-{pid + 1}")
        base = {"name": name, "data": run.data, "image_size": run.image_size, "label_from": run.label_from,
                "sensitive_attribute": run.sensitive_attribute, "partition_id": pid,
                "num_partitions": int(node_config["num-partitions"]),
                "partition": run.partition, "seed": run.seed, "state_dir": Path(root) / name,
                "epsilon_budget": run.epsilon, "delta": run.delta, "heldout": run.test_data,
                "evaluation": run.site_evaluation, "audits": run.site_audits,
                # the simulation's owner operates every virtual site: a run that asks for distributed noise allows it
                "allow_distributed_noise": run.distributed_noise}
        extra = _from_dashed({k: v for k, v in node_config.items() if k not in ("partition-id", "num-partitions")},
                             {"site-name": "name", "epsilon": "epsilon_budget", "state-dir": "state_dir"})
        return cls(**{**base, **extra})


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80] or "dataset"


_FIELD_TYPES = {f.name: f.type for f in fields(SiteSettings)}


def _from_dashed(raw: Mapping[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    """Node-config keys (dashed) -> SiteSettings fields, converted to the field's type."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = renames.get(key, key.replace("-", "_"))
        if name not in _FIELD_TYPES:
            raise ValueError(f"unknown site setting '{key}' in the node config")
        kind = str(_FIELD_TYPES[name])
        if kind == "Path":
            value = Path(str(value))
        elif kind == "tuple[str, ...]":
            value = tuple(m.strip() for m in str(value).split(",") if m.strip())
        elif kind == "bool":
            value = value if isinstance(value, bool) else str(value).lower() in ("true", "1", "yes")
        elif kind == "int":
            value = int(value)
        elif kind == "float":
            value = float(value)
        else:
            value = str(value)
        out[name] = value
    return out


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSettings:
    return SiteSettings.from_node_config(node_config, run_config)


@functools.lru_cache(maxsize=8)
def _load_cached(source: str, split: str, image_size: int, label_from: str, whole: bool = False,
                 channels: int = 0, root: tuple[str, ...] | None = None) -> ImageDataset:
    # empty_classes: a class folder its operator emptied is a class without records, not a failure of every request
    # (which would tell the coordinator, through the free query.info, that the class has no record now); image_size
    # and channels, pinned when a deployed site starts, bring a record of another size or mode added later to the
    # shape the site published, where it made every request fail (review s58); skip_unreadable: so did one file that
    # does not decode (a record's incomplete copy, review s59); root, pinned at start too: which folder holds the
    # split's classes (review s66)
    return load_dataset(source, split, image_size=image_size or None, channels=channels or None,
                        label_from=label_from or None, whole=whole, empty_classes=True, skip_unreadable=True,
                        root=root)


def _is_pinned(site: SiteSettings) -> bool:
    """Whether the site pinned its data's shape and classes when it started (a deployed site: fedsynth site)."""
    return bool(pinned_classes(site) and site.image_size and site.channels)


def _pinned_root(name: str, pin: str) -> tuple[str, ...] | None:
    """The folder parts a ``data_root`` / ``heldout_root`` pin names, or None when it pins none."""
    if not pin:
        return None
    try:
        parts = json.loads(pin)
    except ValueError:
        parts = None
    if not (isinstance(parts, list) and all(isinstance(p, str) and p and p not in (".", "..") and "/" not in p
                                            for p in parts)):
        raise ValueError(f"site {name}: a pinned data root must be a JSON list of folder names, got {pin[:200]!r}")
    return tuple(parts)


def pinned_classes(site: SiteSettings) -> tuple[str, ...]:
    """The class names ``site.classes`` pins (a JSON list of distinct strings), or () when it pins none."""
    if not site.classes:
        return ()
    try:
        names = json.loads(site.classes)
    except ValueError:
        names = None
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)
            and len(set(names)) == len(names)):
        raise ValueError(f"site {site.name}: 'classes' must be a JSON list of distinct, non-empty class names, got "
                         f"{site.classes[:200]!r}")
    return tuple(names)


def load_site_data(site: SiteSettings) -> ImageDataset:
    """The site's private training records (its partition in simulation). Cached per process.

    A deployed site reads them in the classes it pinned when it started (``site.classes``): the class list its data's
    layout gives can hinge on one record (a class folder removed with its last record, an npz's label range over
    every split, held-out included), and it is published free by ``query.info`` and shapes every release (review
    s66); a record of a class added later is left out, with a warning, until the site restarts."""
    try:
        data = _load_cached(site.data, site.split, site.image_size, site.label_from, channels=site.channels,
                            root=_pinned_root(site.name, site.data_root))
    except DataError as err:
        if not _is_pinned(site):
            raise  # not pinned at start (a simulation's partition, an unpinned site): nothing to publish it in
        # At a running site, data that holds no records or cannot be read now -- every record withdrawn, the folder
        # or file removed, an IDX pair or an archive half rewritten -- is a set of no records in the shape and
        # classes it published at start: each request is checked and charged as any other and its releases are
        # noise alone. Failing them (until stop 67) told the coordinator, free, whether the site held any record at
        # all, or that a record was being added or withdrawn (review s67). The operator sees why in the log.
        (log.warning if isinstance(err, NoRecords) else log.error)(
            "[%s] the site's training data %s now (%s): its releases are noise alone until it can be read again",
            site.name, "holds no records" if isinstance(err, NoRecords) else "cannot be read", err)
        shape = (0, site.channels, site.image_size, site.image_size)
        data = ImageDataset(np.zeros(shape, np.float32), np.zeros(0, np.int64), pinned_classes(site), site.data)
    if pinned := pinned_classes(site):
        kept = data.in_classes(pinned)
        if len(kept) < len(data):
            log.warning("[%s] left out %d records of classes the site did not publish when it started (%s); restart "
                        "the site to publish them", site.name, len(data) - len(kept),
                        sorted(set(data.classes) - set(pinned))[:5])
        data = kept
    if site.partition_id is None:
        return data
    scheme, alpha = parse_partition(site.partition)
    parts = partition_indices(data.labels, site.num_partitions, scheme, alpha, seed=site.seed)
    if not 0 <= site.partition_id < len(parts):
        raise DataError(f"partition-id {site.partition_id} is outside 0..{len(parts) - 1}")
    return data.subset(parts[site.partition_id])


def load_site_heldout(site: SiteSettings) -> ImageDataset | None:
    """The site's held-out records (never trained on): its partition of the test split in simulation."""
    if not site.heldout:
        return None
    # the folder the operator named as held-out is the held-out data, split into train/test or not
    try:
        data = _load_cached(site.heldout, site.heldout_split, site.image_size, site.label_from, True, site.channels,
                            root=_pinned_root(site.name, site.heldout_root))
    except DataError as err:
        if isinstance(err, NoRecords) or not _is_pinned(site):
            raise
        # (a running site's held-out data that cannot be read now is a set of no records too, as its training data)
        log.error("[%s] the site's held-out data cannot be read now (%s): its answers are noise alone until it "
                  "can be read again", site.name, err)
        raise NoRecords(f"the held-out data {site.heldout} cannot be read now: no records") from err
    if site.partition_id is None:
        return data
    scheme, alpha = parse_partition(site.partition)
    parts = partition_indices(data.labels, site.num_partitions, scheme, alpha, seed=site.seed, min_size=1)
    return data.subset(parts[site.partition_id])


def open_ledger(site: SiteSettings, data: ImageDataset, *, create: bool = True) -> PrivacyLedger:
    """The ledger of the site's declared dataset id.

    Its delta: the site's configured one, else the ledger's own, else (creating it) min(1e-5, 1/(10 n~)) for a
    noisy size n~ >= n but for probability 3e-7, a release charged as the ledger's first entry
    (:mod:`client.site_delta`: a delta read off the exact n would let refusals reveal n).
    A ledger that an older fedsynth keyed by the data's fingerprint is taken over under the dataset id.
    A data fingerprint that differs from the last charge's is logged: the ledger continues, because
    adding or removing records must never give the records already there a fresh budget.
    A ledger that is missing or emptied at a site that has released before (its ``.started`` mark, or saved
    releases in its runs folder: :func:`released_before`) is refused (``LedgerDamaged``), in the live site and in
    the operator's read-only checks alike, before anything is charged: it is never started afresh.
    """
    path = site.ledger_path
    legacy = lf.fingerprint_named(path, data_fingerprint(data))
    if create and not path.exists() and legacy.exists():
        legacy.rename(path)
        fsync_dir(path.parent)
        log.warning("[%s] took over the privacy ledger %s as the ledger of dataset id '%s'", site.name, legacy.name,
                    site.ledger_id)
    elif not path.exists() and legacy.exists():  # read-only (the operator's checks): read it where it is (review s61:
        path = legacy  # it counted as another dataset id's, so --check refused the site that would take it over)
    new_delta, first_charge = None, None
    history = released_before(site)
    if others := lf.ledgers_of_data(path, data_fingerprint(data), site.ledger_id):  # at every opening: an id switched and back (s60)
        raise lf.LedgerDamaged(f"the records of this site have released under dataset id {others[0]!r} (its privacy "
                               f"ledger is in {path.parent}); a ledger under dataset id {site.ledger_id!r} beside it would "
                               "give them a second privacy budget, so nothing is charged or computed: set dataset_id back to "
                               f"{others[0]!r} in the site config")
    if create and not site.delta:
        # The default delta is read off a noisy size, charged as the ledger's first entry (client.site_delta).
        # Drawn at every opening (cheap); used and charged only by the call that writes the ledger's header.
        if site.epsilon_budget < least_budget() and not _ledger_started(path) \
                and not lf.released_before(path, history):  # public settings only, no draw
            raise Refusal(P.REFUSED_BUDGET, "this site's privacy budget cannot pay the start of its ledger",
                          f"the budget {site.epsilon_budget:g} is below {least_budget():.3g}, what the noisy size its "
                          "default delta is read off may cost: raise epsilon_budget, or set delta in site.yaml")
        new_delta, first_charge = draw_default_delta(len(data)), ([size_event()], DELTA_PURPOSE, data_fingerprint(data))
    try:
        ledger = PrivacyLedger(path, epsilon_budget=site.epsilon_budget, delta=site.delta or None,
                               new_delta=new_delta, first_charge=first_charge, dataset_id=site.ledger_id,
                               create=create, history=history)
    except BudgetExceeded as err:
        raise Refusal(P.REFUSED_BUDGET, "this site's privacy budget cannot pay the start of its ledger", str(err)) \
            from None
    if not site.delta and ledger.delta > P.DEFAULT_DELTA_BOUND:  # (review s60: the bound query.info publishes)
        raise ValueError(f"privacy ledger {path} was created with delta={ledger.delta:g}, above the bound a site without "
                         f"a delta publishes ({P.DEFAULT_DELTA_BOUND:g}); set delta: {ledger.delta:g} in the site config")
    last = ledger.last_fingerprint()
    current = data_fingerprint(data)
    if last is not None and last != current:
        log.warning("[%s] the data of dataset id '%s' changed since its last release (fingerprint %s -> %s); the "
                    "privacy ledger continues, so every record keeps the budget it had", site.name, site.ledger_id,
                    last, current)
    return ledger


def released_before(site: SiteSettings) -> str:
    """Evidence in the site's state folder that it has released before, in words ('' when there is none): saved
    releases (census.json, *.pt) and answered queries' marks (*.answered) in its runs folder, each written only after
    its charge."""
    runs = runs_folder(site.state_dir)
    if not runs.is_dir():
        return ""
    folders = sorted({p.parent.name for pattern in ("*/census.json", "*/*.pt", "*/*.answered")
                      for p in runs.glob(pattern)})
    if not folders:
        return ""
    return f"{runs} holds releases of {len(folders)} run(s), e.g. {folders[0]!r}"


def _ledger_started(path: Path) -> bool:
    """Whether the ledger file exists with its header (a file a crash left without one has not started)."""
    try:
        return lf.parse(path.read_bytes(), path).header is not None
    except FileNotFoundError:
        return False


@functools.lru_cache(maxsize=16)
def data_fingerprint(data: ImageDataset) -> str:
    """Short fingerprint of the data a charge was computed on (cached per loaded dataset object)."""
    return data.fingerprint()[:16]


def budget_is_private(site: SiteSettings) -> bool:
    return math.isfinite(site.epsilon_budget)
