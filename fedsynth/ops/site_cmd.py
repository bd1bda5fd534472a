"""``fedsynth site --config site.yaml``: validate a site, then run its SuperNode, guarded.

The YAML (read by ``fedsynth.ops.site_config``) fills the one definition of a site's settings,
``client.site.SiteSettings``, plus what only the process needs: where the coordinator is, the credentials,
the local port and the approved app bundles. Everything is checked -- credentials, state folder, the data loaded exactly as the handlers will load it, the ledger
-- before anything connects. The SuperNode is started through ``fedsynth.ops.supernode_guard``, so it
runs only app bundles whose digest the site approved (its own installed fedsynth by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from client.ledger_refusals import share
from client.site import SiteSettings
from common.data import dataset_root
from fedsynth.ops.approved_code import BundleError, installed_bundle_digest, write_approvals
from fedsynth.ops.fields import DeployError, info, loud, port_free, warn, write_toml
from fedsynth.ops.processes import Child, flower_env, forward_signals
from fedsynth.ops.node_folder import lock_node_folder
from fedsynth.ops.site_checks import check_delta, check_disjoint, check_rows_alone, check_shared_ledger
from fedsynth.ops.site_config import SITE_KEYS, WORK_LIMITS, SiteDeployment, load_site_config  # noqa: F401 (re-exported)
from fedsynth.ops.tls import check_ca, check_private_key

LARGE_EPSILON = 100.0  # a site budget above it gets the loud warning an unlimited one gets

@dataclass
class SiteCheck:
    data: Any  # ImageDataset
    ledger: dict | None  # PrivacyLedger.summary(), None before the first release
    approved: list[str]


def load_data_checked(dep: SiteDeployment, split_of: str = "data"):
    """The site's training (or held-out) data, loaded exactly as the handlers load it; DeployError if unusable."""
    from client.site import load_site_data, load_site_heldout
    from common.data import DataError

    s = dep.settings
    source = s.data if split_of == "data" else s.heldout
    where = "the built-in digits dataset" if source == "digits" else source
    what = f"the {'held-out ' if split_of != 'data' else ''}data at {where}"
    said: list = []
    if source != "digits" and not Path(source).expanduser().exists():
        # (checked here: a running site that pinned its layout reads a source it cannot read as no records,
        # client.site.load_site_data)
        raise DeployError(f"site '{s.name}': {what} cannot be used: no such file or folder")
    try:
        with warnings.catch_warnings(record=True) as said:  # (the loader's own, e.g. files it leaves out)
            warnings.simplefilter("always")
            return load_site_data(s) if split_of == "data" else load_site_heldout(s)
    except DataError as err:
        raise DeployError(f"site '{s.name}': {what} cannot be used: {err}") from None
    except (OSError, ValueError, RuntimeError) as err:  # unexpected decoder / IO failures
        raise DeployError(f"site '{s.name}': reading the data at {where} failed ({type(err).__name__}: {err}); "
                          "check the files are complete and readable") from None
    finally:
        for w in said:
            if issubclass(w.category, UserWarning):
                warn(f"site '{s.name}': {what}: {w.message}")


def _check_data(dep: SiteDeployment, data) -> None:
    import numpy as np

    s = dep.settings
    counts = data.class_counts()
    present = int((counts > 0).sum())
    if len(data) < 10:
        raise DeployError(f"site '{s.name}': the data at {s.data} holds only {len(data)} record(s) in split "
                          f"'{s.split}'; DP training needs at least 10 (more is much better)")
    if present < 2:
        raise DeployError(f"site '{s.name}': the data at {s.data} has records of {present} class(es) only "
                          f"(classes {list(data.classes)}); a labelled dataset needs at least 2 classes present -- "
                          "check the class folders / label arrays")
    if not np.isfinite(data.images).all():
        raise DeployError(f"site '{s.name}': the data at {s.data} contains NaN or infinite pixels")
    empty = [c for c, k in zip(data.classes, counts) if k == 0]
    if empty:
        warn(f"site '{s.name}': no records of class(es) {empty}; the site still joins (its GAN learns the classes "
             "it has)")
    _, h, w = data.image_shape
    if h != w:
        raise DeployError(f"site '{s.name}': images are {h}x{w}; the GAN needs square images -- set image_size "
                          "(e.g. image_size: 32) to resize them")


def read_ledger(dep: SiteDeployment, data) -> dict | None:
    """The ledger's summary, or None when the site has released nothing yet. Reading never writes."""
    from client.ledger import LedgerDamaged
    from client.site import open_ledger

    try:
        return open_ledger(dep.settings, data, create=False).summary()
    except FileNotFoundError:
        return None
    except (ValueError, LedgerDamaged) as err:
        raise DeployError(f"site '{dep.name}': the privacy ledger cannot be used: {err}") from None


def approved_digests(dep: SiteDeployment) -> list[str]:
    digests = list(dep.approved_bundles)
    if dep.approve_installed:
        try:
            digests.append(installed_bundle_digest())
        except BundleError as err:
            raise DeployError(f"site '{dep.name}': {err}") from None
    if not digests:
        raise DeployError(f"{dep.source}: no app bundle is approved (approve_installed is false and approved_bundles "
                          "is empty): the site would refuse every run")
    return sorted(set(digests))


def check_site(dep: SiteDeployment, insecure: bool = False) -> SiteCheck:
    """Validate everything a site needs, without connecting to anything or writing its ledger."""
    if not insecure:
        if dep.ca_cert is None:
            raise DeployError(f"{dep.source}: 'ca_cert' is missing: the site verifies the coordinator with the CA "
                              "certificate (ca.crt from deploy/make_certs.sh)")
        if dep.private_key is None:
            raise DeployError(f"{dep.source}: 'private_key' is missing: the site authenticates with its own EC key "
                              "(deploy/make_certs.sh makes keys/SITE; the coordinator registers keys/SITE.pub)")
        check_ca(dep.ca_cert)
        check_private_key(dep.private_key)
    if not port_free("127.0.0.1", dep.supernode_port):
        raise DeployError(f"site '{dep.name}': port {dep.supernode_port} on 127.0.0.1 is in use (another SuperNode?); "
                          "set supernode_port to a free port -- each SuperNode on a host needs its own")
    s = dep.settings
    for what, folder in (("data", s.data), ("held-out data", s.heldout)):  # before the state folder is made (s60)
        if folder and folder != "digits" and Path(dep.state_dir).resolve().is_relative_to(Path(folder).resolve()):
            raise DeployError(f"site '{dep.name}': state_dir {dep.state_dir} lies inside the {what} folder {folder}; "
                              "put it elsewhere so the site's own files are never read as data")
    try:
        dep.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(dep.state_dir, 0o700)
        with tempfile.NamedTemporaryFile(dir=dep.state_dir):
            pass
    except OSError as err:
        raise DeployError(f"site '{dep.name}': state_dir {dep.state_dir} is not a writable folder ({err.strerror}); "
                          "it holds the privacy ledger and the local models") from None
    if (lock := lock_node_folder(dep.node_dir)) is None:
        raise DeployError(f"site '{dep.name}': a SuperNode named '{dep.name}' runs on state_dir {dep.state_dir} (its "
                          f"files in {dep.node_dir} are locked): stop it first, or, for a second SuperNode over the "
                          "same records, give it a name of its own and the same dataset_id (they share the state "
                          "folder and its ledger)")
    os.close(lock)
    check_shared_ledger(dep)
    data = load_data_checked(dep)
    _check_data(dep, data)
    check_delta(dep, data)
    if s.heldout:
        held = load_data_checked(dep, "heldout")
        if held.image_shape != data.image_shape or held.classes != data.classes:
            raise DeployError(f"site '{dep.name}': held-out data {held.image_shape} with classes {list(held.classes)} "
                              f"does not match the training data {data.image_shape} with classes {list(data.classes)}; "
                              "both must have the same image shape and class list")
        check_disjoint(dep, data, held)
    check_rows_alone(dep, data)  # (every site: its training releases rest on it too; review s62 found it skipped
    # at sites without a held-out set)
    return SiteCheck(data=data, ledger=read_ledger(dep, data), approved=approved_digests(dep))


def pinned(settings: SiteSettings, data) -> SiteSettings:
    """The site's settings with the image shape it validated at start pinned (``image_size``, ``channels``): its
    handlers then bring a record of another size or mode, added while it runs, to that shape. Unpinned, one such
    record made every load fail, so every request failed, the free query.info included, which told the coordinator
    it had come (review s58). Its class list too (``classes``): read afresh, it could hinge on one record -- a class
    folder removed with its last record, an npz's label range over every split (review s66) -- and query.info
    publishes it free. And which folder of an image folder or archive holds the split's classes (``data_root``,
    ``heldout_root``): the layout rules read the folders as they are, so the answer could hang on the records there
    (review s66: train/ and test/ beside another folder became a class layout once test/ lost its last record)."""
    channels, side, _ = data.image_shape
    root = dataset_root(settings.data, settings.split, label_from=settings.label_from or None)
    held = (dataset_root(settings.heldout, settings.heldout_split, whole=True, label_from=settings.label_from or None)
            if settings.heldout else None)
    return replace(settings, image_size=settings.image_size or side, channels=settings.channels or channels,
                   classes=settings.classes or json.dumps(list(data.classes)),
                   data_root=settings.data_root or ("" if root is None else json.dumps(root)),
                   heldout_root=settings.heldout_root or ("" if held is None else json.dumps(held)))


def fmt_eps(x: float) -> str:
    return "inf" if isinstance(x, float) and math.isinf(x) else f"{x:.4g}"


def supernode_command(dep: SiteDeployment, insecure: bool, approvals: Path) -> list[str]:
    """The guarded SuperNode (fedsynth.ops.supernode_guard) with flower-supernode's arguments."""
    cmd = [sys.executable, "-m", "fedsynth.ops.supernode_guard", str(approvals), "--superlink", dep.coordinator,
           "--host", "127.0.0.1", "--port", str(dep.supernode_port), "--node-config", str(dep.node_config)]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(dep.ca_cert), "--auth-supernode-private-key", str(dep.private_key)]
    return cmd


def _site_hint(line: str, dep: SiteDeployment, hints: list[str]) -> None:
    if "Failed to activate SuperNode" in line or "code: 2004" in line:
        hints.append(f"the coordinator rejected this site's key: ask the coordinator operator to register "
                     f"{dep.private_key}.pub for '{dep.name}' (sites: in coordinator.yaml), then start the site again")
    elif "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line:
        hints.append(f"TLS verification of the coordinator failed: is {dep.ca_cert} the CA that signed the "
                     f"SuperLink certificate, and does that certificate name the host in '{dep.coordinator}'?")
    elif "could not establish a connection" in line.lower():
        hints.append(f"could not connect to the coordinator at {dep.coordinator}: check the address, that "
                     "fedsynth coordinator is running, the CA certificate, and that the site's key is registered")


def _announce(dep: SiteDeployment, check: SiteCheck) -> None:
    from common.data import describe

    s, led = dep.settings, check.ledger
    info(f"site '{dep.name}' OK: {describe(check.data)}")
    if led is None:
        info(f"privacy budget epsilon={fmt_eps(s.epsilon_budget)} for dataset id '{s.ledger_id}': nothing released "
             f"yet (ledger {s.ledger_path} is created at the first request"
             + (f", with delta {s.delta:g})" if s.delta else ", with a delta read off a noisy size: epsilon 0.015)"))
    else:
        info(f"privacy budget epsilon={fmt_eps(s.epsilon_budget)} delta={led['delta']:.3g} for dataset id "
             f"'{s.ledger_id}': spent {fmt_eps(led['spent_epsilon'])}; budget used: {share(led['budget_used'])} "
             f"({led['releases']} releases; ledger {led['path']})")
        if led.get("order") is not None and led.get("order_for_budget") not in (None, led["order"]):
            warn(f"this ledger reads its total at Renyi order {led['order']:g}, fixed under an earlier budget; a "
                 f"fresh ledger at epsilon {fmt_eps(s.epsilon_budget)} would use order {led['order_for_budget']:g}, "
                 "and the order cannot move there without weakening the guarantee (client/ledger_order.py), so runs "
                 "here get more noise than at a fresh ledger (docs/privacy.md: 'The ledger's order')")
        if not s.delta and led["delta"] < 1e-5 and "ledger-delta" not in led.get("per_purpose_releases", {}):
            warn(f"this ledger's delta {led['delta']:.3g} was set from the exact record count by an earlier fedsynth "
                 "(1/(10 n)); a coordinator that searches the epsilon at which this site starts refusing could read "
                 "n back from it. A ledger's delta cannot change: to remove the risk, start a new ledger with a "
                 "delta you choose (site.yaml 'delta') under a new dataset_id only if the data is new too")
    info(f"runs only the app bundle(s) {', '.join(d[:16] + '...' for d in check.approved)}"
         + (" (this site's own fedsynth)" if dep.approve_installed else ""))
    answers = [q for q, on in (("evaluation", s.evaluation), ("audits", s.audits)) if on]
    info(f"answers {' and '.join(answers)} queries (DP, charged, at most {s.queries_per_run} of each per run)"
         if answers else "answers no evaluation or audit queries (switch them on in site.yaml)")
    info(f"work limits per request: networks of at most {s.max_parameters:,} parameters, batches of at most "
         f"{s.max_batch_size:,}, {s.max_steps_per_run:,} DP-SGD steps per run, {s.max_step_memory_mb:,} MB per "
         "step on a batch, per-sample gradients and activations (site.yaml max_*)")
    info(f"computes on {s.device} (site.yaml device)" if s.device else "computes where each run asks (its device "
         "setting; auto: the GPU when one is present); site.yaml device pins it")
    if s.require_secure_aggregation:
        info("takes part only in runs with secure aggregation: the coordinator sees only sums over the sites")
    if s.allow_distributed_noise:
        warn("allows distributed noise: inside a secure aggregation its statistics release carries only part of the "
             "noise its ledger charges, which holds only while the coordinator runs SecAgg+ honestly "
             "(allow_distributed_noise)")
    info(f"holds every reply until {s.min_reply_seconds:g} s after its request came (min_reply_seconds)"
         if s.min_reply_seconds else "replies as soon as the work is done: reply times show how long it took, which "
         "grows with the record count (site.yaml min_reply_seconds hides it)")
    if math.isinf(s.epsilon_budget):
        loud(f"site '{dep.name}' has an UNLIMITED budget (epsilon: inf): it may release NON-PRIVATE models of its data.")
    elif led is not None and led["budget_used"] >= 1 - 1e-9:
        warn(f"site '{dep.name}' has no budget left; it will refuse every request that releases anything")
    if LARGE_EPSILON < s.epsilon_budget < math.inf:
        loud(f"site '{dep.name}' has a budget of epsilon {s.epsilon_budget:g}: above {LARGE_EPSILON:g} a DP guarantee "
             "says next to nothing (e^epsilon bounds how much likelier any outcome is with a record than without); "
             "typical budgets are 1 to 10.")


def cmd_site(args: argparse.Namespace) -> int:
    try:
        dep = load_site_config(args.config)
        if args.insecure:
            loud("INSECURE SITE: --insecure turns OFF TLS and SuperNode authentication.\n"
                 "Generator weights and requests travel in clear text, and the coordinator cannot tell this\n"
                 "site from an impostor. Use it only on a private test network, never with real data.")
        check = check_site(dep, insecure=args.insecure)
    except DeployError as err:
        print(f"fedsynth site: error: {err}", file=sys.stderr)
        print("fedsynth site: nothing was started; fix the problem above and run again "
              "(fedsynth site --config ... --check only validates).", file=sys.stderr)
        return 2
    _announce(dep, check)
    dep.settings = pinned(dep.settings, check.data)
    info(f"pins the images' shape it checked, {dep.settings.channels} x {dep.settings.image_size} x "
         f"{dep.settings.image_size}, and its {len(check.data.classes)} classes: a record of another size or mode "
         "added while it runs is converted to it, one of another class is left out until the site restarts")
    approvals = dep.node_dir / "approved-bundles.json"
    cmd = supernode_command(dep, args.insecure, approvals)
    # written by --check too: a Docker site's SuperNode reads it (deploy/README.md), pinned shape included (review s58)
    write_toml(dep.node_config, dep.settings.to_node_config())
    if (old := dep.state_dir / "node-config.toml").exists():  # before review s60 it was here, shared by every node
        old.replace(kept := old.with_name("node-config.toml.pre-s60"))  # (kept, not deleted: review s61)
        warn(f"moved {old} to {kept.name}: a site's node config is now {dep.node_config} (a Docker SuperNode still "
             "started with the old path fails to start instead of reading settings that may be another site's: "
             "update its --node-config and FLWR_HOME as deploy/compose.yaml shows)")
    if args.check:
        info(f"check passed; `fedsynth site --config {args.config}` would run:\n  FLWR_HOME={dep.flwr_home} "
             + " ".join(cmd) + f"\n  with node config {dep.node_config} (written): "
             + json.dumps(dep.settings.to_node_config()))
        return 0
    write_approvals(approvals, check.approved, "installed fedsynth" if dep.approve_installed else "site.yaml")
    dep.flwr_home.mkdir(parents=True, exist_ok=True)
    return _run_supernode(dep, cmd, args)


def _run_supernode(dep: SiteDeployment, cmd: list[str], args: argparse.Namespace) -> int:
    # Flower keeps a node "online" for up to 2 heartbeats (60 s) after its last sign of life, and refuses to
    # activate it again meanwhile: a site restarted right after a crash is rejected like an unknown key.
    # So activation refusals are retried for --retry-rejected seconds before giving up.
    first = time.monotonic()
    while True:
        info(f"starting the SuperNode of '{dep.name}' -> {dep.coordinator}"
             + (" (INSECURE)" if args.insecure else " (TLS, authenticated)"))
        hints: list[str] = []
        child = Child(cmd, flower_env(dep.flwr_home), cwd=dep.state_dir,
                      on_line=lambda line, hints=hints: _site_hint(line, dep, hints))
        forward_signals(child)
        code = child.wait()
        if child.stopping:
            info(f"site '{dep.name}' stopped")
            return 0
        rejected = any("rejected this site's key" in h for h in hints)
        left = args.retry_rejected - (time.monotonic() - first)
        if code == 0 or not rejected or left <= 0:
            break
        warn(f"the coordinator refused to activate '{dep.name}'. If this site restarted within the last minute, "
             f"the coordinator still counts its previous connection; retrying for {left:.0f} more s "
             "(an unregistered key keeps failing)")
        stop = time.monotonic() + min(10.0, left)
        while time.monotonic() < stop and not child.stopping:
            time.sleep(0.5)
        if child.stopping:
            return 0
    if code != 0:
        print(f"fedsynth site: the SuperNode of '{dep.name}' exited with code {code}.", file=sys.stderr)
        if hints:  # the first one is the most specific
            print(f"fedsynth site: {hints[0]}", file=sys.stderr)
        return code if 0 < code < 256 else 1
    return 0
