"""The checks of an operator's set-up that ``fedsynth site`` makes before a SuperNode starts, beyond its settings'
own (``fedsynth.ops.site_config``): each refuses, with what to change, a set-up that would weaken the site or fail
every request (a second budget over one dataset, a weak or unpayable delta, held-out records that are training
records, a machine where a record's answer depends on other records)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from common.state_layout import nodes_folder
from fedsynth.ops.fields import DeployError, info, warn
from fedsynth.ops.node_folder import read_node_config
from fedsynth.ops.site_config import SiteDeployment


def check_shared_ledger(dep: SiteDeployment) -> None:
    """Refuse a second SuperNode over the same data in one state folder under another dataset_id (review s60): the two
    share the folder for its one ledger, so each would otherwise keep a budget of its own, and the site's ledger
    check refuses the second at its first request after the first one released."""
    s = dep.settings
    for other in sorted(nodes_folder(dep.state_dir).glob("*/node-config.toml")):
        config = read_node_config(other)
        same_data = config.get("data-path") == s.data or (
            s.data != "digits" and str(config.get("data-path", "")) not in ("", "digits")
            and Path(str(config["data-path"])).resolve() == Path(s.data).resolve())
        other_id = str(config.get("dataset-id") or config.get("site-name") or "")
        if other.parent.name != dep.name and same_data and config.get("split", s.split) == s.split \
                and other_id and other_id != s.ledger_id:
            raise DeployError(f"site '{dep.name}': the SuperNode '{other.parent.name}' in this state folder serves the "
                              f"same data under dataset_id {other_id!r}; two SuperNodes over the same records share "
                              f"one ledger: set dataset_id: {other_id} in {dep.source}")
        if other.parent.name != dep.name and other_id == s.ledger_id:
            _check_same_privacy(dep, other.parent.name, config)


# What two SuperNodes sharing one state folder and ledger must agree on: they share the runs' saved releases too, so
# one that allows less (secure aggregation only, no split noise, fewer queries a run, a smaller budget) would see its
# releases handed out by the other on its terms (review s67: a release made for a secure sum at a SuperNode that
# requires one, sent in the clear by the other)
_SHARED_PRIVACY = ("epsilon_budget", "delta", "require_secure_aggregation", "allow_distributed_noise",
                   "queries_per_run")


def _check_same_privacy(dep: SiteDeployment, other: str, config: dict) -> None:
    """Compared with a SuperNode that runs now (its node folder locked): a stopped one's node config is rewritten at
    its next start, so two stopped ones given a new budget together must not refuse each other (review s67). Both
    read as the site reads them (types and defaults filled in: an older node config lacks a key it defaults)."""
    from client.site import SiteSettings
    from fedsynth.ops.node_folder import lock_node_folder

    if (probe := lock_node_folder(nodes_folder(dep.state_dir) / other)) is not None:
        os.close(probe)  # not running
        return
    try:
        theirs = SiteSettings.from_node_config(config, {})
    except ValueError as err:  # (another fedsynth's keys, a hand edit: say whose config, never a traceback)
        raise DeployError(f"site '{dep.name}': the node config of the SuperNode '{other}' running in this state folder "
                          f"cannot be read to compare its privacy settings with this one's ({err}); stop it, or run "
                          "the same fedsynth at both") from None
    differ = [k for k in _SHARED_PRIVACY
              if not math.isclose(float(getattr(theirs, k)), float(getattr(dep.settings, k)), rel_tol=1e-12)]
    if differ:
        raise DeployError(f"site '{dep.name}': the SuperNode '{other}' running in this state folder shares its ledger "
                          f"and saved releases (dataset_id {dep.settings.ledger_id!r}) but sets "
                          + ", ".join(f"{k} = {getattr(theirs, k)!r} (here {getattr(dep.settings, k)!r})"
                                      for k in differ)
                          + f"; two SuperNodes over one ledger must agree on them: make {dep.source} match")


def check_delta(dep: SiteDeployment, data) -> None:
    """Refuse a ``delta`` set in site.yaml at 1/n or more, and warn above 1e-5, the usual bound (review s60: 0.5 was
    taken without a word, and the coordinator sees the bound a site publishes). A delta of 1/n lets a mechanism
    publish one of n records outright and still meet (epsilon, delta). Without a delta, a budget too small to pay the
    noisy size the default is read off is refused here too (review s61: it passed --check, and the site then refused
    every request)."""
    from client import ledger_file as lf
    from client.site import data_fingerprint, released_before
    from client.site_delta import least_budget

    delta, n = dep.settings.delta, len(data)
    ledgers = (dep.settings.ledger_path, lf.fingerprint_named(dep.settings.ledger_path, data_fingerprint(data)))  # (and
    # an older fedsynth's, named by the data's fingerprint, which the site takes over: review s61)
    released = lf.started_mark(dep.settings.ledger_path).exists() or released_before(dep.settings)  # (its ledger
    # lost: the site's own refusal says what to do, review s61)
    if not delta and dep.settings.epsilon_budget < least_budget() and not any(p.exists() for p in ledgers) \
            and not released:
        raise DeployError(f"site '{dep.name}': epsilon {dep.settings.epsilon_budget:g} cannot pay the noisy size its "
                          f"default delta is read off ({least_budget():.3g}), so the site would refuse every request: "
                          "raise epsilon, or set delta in site.yaml (e.g. 1e-6)")
    if delta and delta * n >= 1:
        raise DeployError(f"site '{dep.name}': delta {delta:g} is at least 1 / (its {n:,} records): a release may "
                          "then publish a record outright and still meet its guarantee. Set delta far below that, or "
                          "0 for the default, min(1e-5, 1/(10 n)) read off a noisy count")
    if delta and delta > 1e-5:
        warn(f"site '{dep.name}': delta {delta:g} is above 1e-5, the usual bound (and the default's, min(1e-5, "
             f"1/(10 n)) = {min(1e-5, 0.1 / n):.2g} for its {n:,} records); 0 gives the default")
        if dep.settings.allow_distributed_noise:  # (review s61: it passed, and the site refused every such run)
            warn(f"site '{dep.name}': allow_distributed_noise has no effect at delta {delta:g}: distributed noise "
                 "needs a delta of at most 1e-5, so this site adds all of its noise or refuses a run that splits it")


def check_disjoint(dep: SiteDeployment, data, held) -> None:
    """Refuse held-out data that shares a tenth of either set with the training records (review s59): a folder
    without train/ and test/ is held out whole, so ``heldout`` naming the training folder (or its train/ part) passed
    the path check in site_config and put every record in both audit histograms, moving the release by sqrt(2) where
    its noise is calibrated to 1, and made the evaluation score training records. A few records equal in both are
    real data's own duplicates (PneumoniaMNIST's val split repeats 8 of its 524 images in train): they are counted,
    not refused. The tenth detects the mistake and is no privacy bound (review s60; docs/privacy.md): the guarantee is
    per record, and a copy of a record in the other set is another record."""
    import hashlib

    import numpy as np

    def digests(d) -> list[bytes]:  # one per record: its image's bytes, and its label
        return [hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest() + int(y).to_bytes(8, "little", signed=True)
                for x, y in zip(d.images, d.labels)]
    training = set(digests(data))
    shared = sum(h in training for h in digests(held))
    if shared * 10 >= min(len(held), len(data)):  # a tenth of either set
        raise DeployError(f"site '{dep.name}': {shared:,} of the {len(held):,} held-out records are also training "
                          f"records (heldout {dep.settings.heldout}, split {dep.settings.heldout_split}); held-out "
                          "records must never be trained on -- name a folder or split of records kept apart")
    if shared:
        warn(f"site '{dep.name}': {shared:,} of the {len(held):,} held-out records equal a training record (the data's "
             "own duplicates?); each is a record of both sets: make sure no record sits in both (one file, or a link)")


def check_rows_alone(dep: SiteDeployment, data) -> None:
    """Refuse to start on a machine where a record's contribution to a release depends on the other records
    (client.row_check, on random images of the site's shape): its training releases' per-record features and
    per-sample gradients in their fixed blocks (review s62), and, where it answers them, evaluation queries and
    audits (the premise of their sensitivity 1)."""
    import torch

    from client.row_check import batch_mate_problems, training_problems
    from common.device import pick_device

    s = dep.settings
    info(f"checking that one record's contribution depends on that record alone on this machine ({data.image_shape})")
    problems = training_problems(data.image_shape, data.num_classes, tuple(s.modes))
    # and on the GPU where a run may train: the one site.yaml names, or, where it names none, the one a run's
    # "auto" or "cuda" picks (evaluation and audits always compute on the CPU: client.evaluation)
    gpu = pick_device(s.device) if s.device else (torch.device("cuda") if torch.cuda.is_available() else None)
    if not problems and gpu is not None and gpu.type == "cuda":
        info(f"checking the same on {gpu} ({torch.cuda.get_device_name(gpu)})")
        problems = [f"{p} on {gpu}" for p in training_problems(data.image_shape, data.num_classes, tuple(s.modes),
                                                                device=gpu)]
    if problems:
        raise DeployError(f"site '{dep.name}': on this machine {'; '.join(problems)}, so one record could move other "
                          "records' contributions to a training release past the sensitivity its noise is calibrated "
                          "to. Run the site on another machine, or with OMP_NUM_THREADS=1 (or, where the problem is on "
                          "a GPU, with device: cpu in site.yaml), and check again")
    if not (s.evaluation or s.audits):
        return
    problems = batch_mate_problems(data.image_shape, data.num_classes, evaluation=s.evaluation, audits=s.audits)
    if problems:
        raise DeployError(f"site '{dep.name}': on this machine {'; '.join(problems)}, so one record could move other "
                          "records' counts in an evaluation or audit answer (their noise is calibrated to one). Set "
                          "'evaluation' and 'audits' to false, or run the site on another machine (or with "
                          "OMP_NUM_THREADS=1) and check again")
