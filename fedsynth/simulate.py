"""``fedsynth simulate``: K virtual sites over one dataset, and what only the simulation's owner may see.

The coordinator's report (``server.report``) holds what a coordinator can know: the sites' DP releases
and their public declarations. The person running a simulation owns every virtual site, so this module
adds, under ``owner_view`` and in the per-site rows, what the sites' operators would see: each site's
ledger (epsilon and delta actually spent, records), the same learner trained on the real pooled data
(the reference of the TSTR ratio) and full privacy audits of the synthetic set against the real data.
None of it ever crosses the federation.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from client.ledger import PrivacyLedger
from common.audits import site_audit_summary
from common.config import ConfigError, RunConfig
from common.data import DataError, ImageDataset, describe, load_dataset
from common.files import atomic_write_json
from common.learner import evaluate_learner, train_learner
from common.partition import parse_partition, partition_indices
from common.state_layout import ledger_folder

log = logging.getLogger("fedsynth")


def check_data(cfg: RunConfig, sites: int) -> ImageDataset:
    """Load the data and split it once before anything starts, so bad data fails fast and clearly."""
    data = load_dataset(cfg.data, "train", image_size=cfg.image_size or None, label_from=cfg.label_from or None)
    scheme, alpha = parse_partition(cfg.partition)
    try:
        partition_indices(data.labels, sites, scheme, alpha, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(f"cannot split {len(data)} records over {sites} sites with '{cfg.partition}': {err}") from None
    present = int((data.class_counts() > 0).sum())
    if present < 2:
        raise ConfigError(f"{cfg.data} holds records of {present} class only ({describe(data)}); a classifier needs at "
                          "least 2 classes: check the class folders / label arrays")
    log.info("data: %s", describe(data))
    if cfg.test_data:
        kw = {"image_size": cfg.image_size or None, "label_from": cfg.label_from or None}
        if cfg.test_data == cfg.data:
            try:
                load_dataset(cfg.test_data, "test", **kw)
            except DataError:
                raise ConfigError(f"--data and --test are the same source {cfg.data} and it has no test split, so the "
                                  "test records would be the training records; give the test images separately") from None
        test = load_dataset(cfg.test_data, "test", whole=True, **kw)  # a folder given as --test is the test data
        if test.image_shape != data.image_shape or test.classes != data.classes:
            raise ConfigError(f"the test data ({cfg.test_data}: {test.image_shape}, classes {list(test.classes)}) does "
                              f"not match the training data ({data.image_shape}, classes {list(data.classes)}); both "
                              "need the same image shape and class list (set image-size, or convert the images)")
    return data


def check_same_data(cfg: RunConfig, data: ImageDataset, sites: int) -> None:
    """A run resumed in its out-dir must see the same data and sites it started with (the coordinator checks
    the settings; only the simulation's owner can check the data's content)."""
    path = Path(cfg.out_dir) / "simulation.json"
    ours = {"data_fingerprint": data.fingerprint()[:16], "sites": sites}
    if path.exists() and cfg.resume:
        theirs = json.loads(path.read_text())
        if theirs != ours:
            raise ConfigError(f"{cfg.out_dir} holds a run over other data or another number of sites ({theirs} now "
                              f"{ours}); give a new --out for a new run, or --set resume=false to start over in it")
    atomic_write_json(path, ours)


def site_nodes(cfg: RunConfig, sites: int) -> list[dict]:
    """The virtual sites' node configs: one partition each, named site-1..site-K everywhere."""
    return [{"partition-id": i, "num-partitions": sites, "site-name": f"site-{i + 1}"} for i in range(sites)]


def site_state_root(cfg: RunConfig) -> Path:
    return Path(cfg.state_dir or Path(cfg.out_dir) / "sites")


def ledger_rows(cfg: RunConfig, sites: int) -> dict[str, dict]:
    """Each virtual site's ledger summary (the site operator's view), by site name."""
    out = {}
    for node in site_nodes(cfg, sites):
        name = node["site-name"]
        path = ledger_folder(site_state_root(cfg) / name) / f"{name}.jsonl"
        try:
            out[name] = PrivacyLedger(path, epsilon_budget=cfg.epsilon, create=False).summary()
        except FileNotFoundError:  # (none yet, or its header not written: nothing released)
            continue
    return out


def spent_line(cfg: RunConfig, sites: int) -> str:
    rows = ledger_rows(cfg, sites)
    if not rows:
        return "nothing was spent at any site"
    return ", ".join(f"{name} epsilon {row['spent_epsilon']:.3g}" for name, row in rows.items())


def add_owner_view(report: dict, cfg: RunConfig, sites: int, data: ImageDataset) -> dict:
    """The simulation owner's additions to the coordinator's report (module docstring)."""
    from common.device import pick_device
    from server.learn import load_test_data

    ledgers = ledger_rows(cfg, sites)
    scheme, alpha = parse_partition(cfg.partition)
    parts = partition_indices(data.labels, sites, scheme, alpha, seed=cfg.seed)
    by_name = {f"site-{i + 1}": len(idx) for i, idx in enumerate(parts)}
    for row in report["sites"]:
        ledger = ledgers.get(row["name"])
        if ledger is not None:
            row.update(epsilon=ledger["spent_epsilon"], delta=ledger["delta"], releases=ledger["releases"])
        row["examples"] = by_name.get(row["name"])
    owner: dict = {"ledgers": ledgers}
    device = pick_device(cfg.device)
    test = load_test_data(cfg)
    synth = load_dataset(Path(cfg.out_dir) / "synthetic.npz", "train")
    utility = report.setdefault("utility", {})
    if test is not None and cfg.real_baseline:
        real_model = train_learner(data, cfg.learner_config(), device=device, desc="learner on real",
                                   progress=cfg.progress)
        real = evaluate_learner(real_model, test, device=device)
        utility.update(real_accuracy=real["accuracy"], real_per_class_accuracy=real["per_class_accuracy"],
                       real_mcc=real["mcc"])
        if "tstr_accuracy" in utility and real["accuracy"]:
            utility["ratio"] = utility["tstr_accuracy"] / real["accuracy"]
        log.info("same learner on the real pooled data: %.4f", real["accuracy"])
    if test is not None and cfg.real_baseline and synth.image_shape == data.image_shape:
        owner_audit = site_audit_summary(synth.images, data.images, test.images, max_records=cfg.audit_records,
                                         seed=cfg.seed, n_bootstrap=200, device=device)
        report["audits"] = {"pixel": owner_audit,
                            "who": "the simulation's owner, on all sites' real data (exact; never released)"}
    report["owner_view"] = owner
    return report


def simulate(cfg: RunConfig, sites: int, engine: str = "inprocess", progress: bool = True) -> dict:
    """Run one synthesis over ``sites`` virtual sites; returns the report (coordinator's + owner's view)."""
    from server.report import write_report

    if sites < 1:
        raise ConfigError(f"--sites must be >= 1, got {sites}")
    data = check_data(cfg, sites)
    check_same_data(cfg, data, sites)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cfg.progress = progress
    if engine == "flower":
        from fedsynth.flower_sim import run_flower_simulation

        report = run_flower_simulation(cfg.to_flwr(), sites, Path(cfg.out_dir))
    else:
        from client.app import app as client_app
        from fedsynth.localgrid import run_inprocess
        from server.app import run_coordinator

        report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), site_nodes(cfg, sites),
                               parallel=cfg.parallel_sites)
    report = add_owner_view(report, cfg, sites, data)
    write_report(report, Path(cfg.out_dir))
    return report
