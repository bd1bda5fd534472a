"""Who this site is: its name, its private data, its budget and where it keeps its state.

Two sources, one result (:class:`SiteSettings`):
- Deployment: the SuperNode's node config, written by ``fedsynth site`` from the site's own YAML
  (``site-name``, ``data-path``, ``state-dir``, ``epsilon``, ``delta``, ...). The budget is the site's,
  never the coordinator's.
- Simulation: the node config only carries ``partition-id``/``num-partitions`` (plus whatever the
  in-process engine adds); the site loads its partition of the run's dataset and, since the person
  running a simulation owns every virtual site, takes its budget from the run config.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from common.accounting import default_delta
from common.config import RunConfig
from common.data import DataError, ImageDataset, load_dataset
from common.partition import parse_partition, partition_indices


@dataclass(frozen=True)
class SiteSettings:
    name: str
    data: str  # dataset source (path or "digits")
    split: str
    image_size: int
    label_from: str
    partition_id: int | None  # simulation: which partition of `data` this site holds
    num_partitions: int | None
    partition: str
    seed: int
    state_dir: Path
    epsilon_budget: float  # the site's total budget for this dataset
    delta: float  # 0 = default for the dataset size
    audits: bool
    modes: tuple[str, ...] = ("dpgan", "bnstats")  # synthesis modes this site's operator allows
    heldout: str = ""  # the site's own held-out records (for evaluation and audits); "" = none
    heldout_split: str = "test"


def _modes(node_config: Mapping[str, Any]) -> tuple[str, ...]:
    raw = str(_get(node_config, "modes", "dpgan,bnstats"))
    return tuple(m.strip() for m in raw.split(",") if m.strip())


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value == "" else value


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSettings:
    """Build the site's settings from its node config (and, in simulation, the run config)."""
    run = RunConfig.from_mapping(run_config)
    if "data-path" in node_config:  # a deployed site: everything comes from its own config
        state_dir = node_config.get("state-dir")
        if not state_dir:
            raise ValueError("node config 'state-dir' is missing: a site needs a private folder for its "
                             "ledger and local models (set state_dir in the site YAML)")
        if "epsilon" not in node_config:
            raise ValueError("node config 'epsilon' is missing: a site must set its own privacy budget")
        return SiteSettings(
            name=str(_get(node_config, "site-name", "site")),
            data=str(node_config["data-path"]), split=str(_get(node_config, "split", "train")),
            image_size=int(_get(node_config, "image-size", 0)), label_from=str(_get(node_config, "label-from", "")),
            partition_id=None, num_partitions=None, partition="iid", seed=0,
            state_dir=Path(str(state_dir)), epsilon_budget=float(node_config["epsilon"]),
            delta=float(_get(node_config, "delta", 0.0)), audits=bool(_get(node_config, "audits", True)),
            modes=_modes(node_config),
            heldout=str(_get(node_config, "heldout-path", "")), heldout_split=str(_get(node_config, "heldout-split", "test")),
        )
    if "partition-id" not in node_config:
        raise ValueError("node config has neither 'data-path' (deployment) nor 'partition-id' (simulation); "
                         "start the SuperNode with fedsynth site --config site.yaml")
    pid, count = int(node_config["partition-id"]), int(node_config["num-partitions"])
    root = run.state_dir or str(Path(run.out_dir) / "sites")
    return SiteSettings(
        name=str(_get(node_config, "site-name", f"site-{pid}")), data=run.data, split="train",
        image_size=run.image_size, label_from=run.label_from, partition_id=pid, num_partitions=count,
        partition=run.partition, seed=run.seed,
        state_dir=Path(str(_get(node_config, "state-dir", Path(root) / f"site-{pid}"))),
        epsilon_budget=float(_get(node_config, "epsilon", run.epsilon)), delta=run.delta,
        audits=bool(_get(node_config, "audits", True)), modes=_modes(node_config), heldout=run.test_data,
    )


@functools.lru_cache(maxsize=8)
def _load_cached(source: str, split: str, image_size: int, label_from: str) -> ImageDataset:
    return load_dataset(source, split, image_size=image_size or None, label_from=label_from or None)


def load_site_data(site: SiteSettings) -> ImageDataset:
    """The site's private training records (its partition in simulation). Cached per process."""
    data = _load_cached(site.data, site.split, site.image_size, site.label_from)
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
    data = _load_cached(site.heldout, site.heldout_split, site.image_size, site.label_from)
    if site.partition_id is None:
        return data
    scheme, alpha = parse_partition(site.partition)
    parts = partition_indices(data.labels, site.num_partitions, scheme, alpha, seed=site.seed, min_size=1)
    return data.subset(parts[site.partition_id])


def site_delta(site: SiteSettings, num_records: int) -> float:
    """The site's delta: its configured value, else min(1e-5, 1/(10 n)) for its n records."""
    if site.delta > 0:
        return site.delta
    return default_delta(num_records)


def ledger_path(site: SiteSettings, data: ImageDataset) -> Path:
    """One ledger per dataset, keyed by the dataset's fingerprint, so every run and mode composes."""
    return site.state_dir / "ledger" / f"{data.fingerprint()[:16]}.jsonl"


def budget_is_private(site: SiteSettings) -> bool:
    return math.isfinite(site.epsilon_budget)
