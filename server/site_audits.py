"""Federated privacy audits: sites that allow it histogram their records' distances to the synthetic set.

A site that allows audits answers with a DP release (``protocol.AuditReply``): two noisy histograms,
over the fixed grid ``AUDIT_BIN_EDGES``, of the pixel MSE from each of its training records (members)
and each of its held-out records (non-members) to the nearest image of a synthetic sample the
coordinator sends. From them the coordinator reads a membership-inference attack's AUC (an attacker
that calls a record a member when it lies close to the synthetic set; 0.5 = no signal) and the share
of records with a near-copy in the synthetic set, members against non-members.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from common.data import ImageDataset
from server.collect import exchange
from server.run_state import RunState
from server.sites import RunFailed, Schema, SiteRecord, trained_sites

log = logging.getLogger("fedsynth.coordinator")
NEAR_COPY_MSE = 1e-3  # a record with a synthetic image closer than this (pixel MSE) has a near-copy


def auc_from_histograms(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """AUC of "closer to the synthetic set = member" from two distance histograms on the same bins.

    P(member's bin < non-member's bin) + 0.5 P(same bin); noisy counts are clipped at 0 first.
    """
    m = np.clip(np.asarray(members, dtype=np.float64), 0.0, None)
    h = np.clip(np.asarray(nonmembers, dtype=np.float64), 0.0, None)
    if m.sum() <= 0 or h.sum() <= 0:
        return float("nan")
    m, h = m / m.sum(), h / h.sum()
    farther_nonmember = np.cumsum(h[::-1])[::-1] - h  # P(non-member bin > b) for each bin b
    return float(np.sum(m * (farther_nonmember + 0.5 * h)))


def near_copy_share(hist: np.ndarray) -> float:
    """Share of records whose nearest synthetic image is within NEAR_COPY_MSE (noisy counts clipped at 0)."""
    edges = np.asarray(P.AUDIT_BIN_EDGES)
    counts = np.clip(np.asarray(hist, dtype=np.float64), 0.0, None)
    close = counts[edges[1:] <= NEAR_COPY_MSE].sum()
    return float(close / counts.sum()) if counts.sum() > 0 else float("nan")


def summarize(train: np.ndarray, heldout: np.ndarray) -> dict:
    return {"membership_auc": auc_from_histograms(train, heldout),
            "near_copy_share_members": near_copy_share(train), "near_copy_share_nonmembers": near_copy_share(heldout),
            "histograms": {"edges": list(P.AUDIT_BIN_EDGES), "train": [float(v) for v in train],
                           "heldout": [float(v) for v in heldout]}}


# Bytes an audit query carries beyond its images: its content 0.9-1.7 KB at 2-1,000 images (measured with Flower's
# get_all_nested_objects), and the message's own metadata
AUDIT_MESSAGE_SLACK = 2**20


def audit_images(cfg: RunConfig) -> int:
    """Synthetic images an audit query carries: ``audit-records``, or the whole set where it is smaller (a size
    still left to the product's rules, 0, is no bound)."""
    return min(cfg.audit_records, cfg.synthetic_size or cfg.audit_records)


def check_audit_size(cfg: RunConfig, schema: Schema, sites: dict[int, SiteRecord]) -> None:
    """Refuse, before anything is spent, a run whose audit query no guarded site would pull (protocol's
    MAX_MESSAGE_BYTES): the site refuses it only at the run's end, after every round was charged."""
    if not (cfg.site_audits and any(s.audits for s in sites.values())):
        return
    per_image = 4 * int(np.prod(schema.image_shape))  # float32 (C, H, W)
    fits = (P.MAX_MESSAGE_BYTES - AUDIT_MESSAGE_SLACK) // per_image
    images = audit_images(cfg)
    if images > fits:
        shape = "x".join(map(str, schema.image_shape))
        raise RunFailed(f"an audit query of {images:,} synthetic images of {shape} would take "
                        f"{images * per_image / 2**20:,.0f} MiB, more than the {P.MAX_MESSAGE_BYTES // 2**20:,} MiB a "
                        f"site pulls in one message; set audit-records to at most {fits:,} (or site-audits = false) "
                        "before anything is spent")


def request_site_audits(grid: Grid, cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord],
                        synth: ImageDataset) -> dict:
    """{"sites": [...], "pooled": {...}, "failed": {...}} over the sites that allow audits."""
    asked, others = trained_sites(sites, "audits")
    out: dict = {"kind": "dp-audit", "noise_std_per_bin": P.AUDIT_NOISE, "near_copy_mse": NEAR_COPY_MSE,
                 "sites": [], "failed": {}, **others}
    if not asked:
        return out
    rng = np.random.default_rng(cfg.seed)
    idx = np.sort(rng.choice(len(synth), size=min(audit_images(cfg), len(synth)), replace=False))
    request = P.AuditRequest(experiment=run.experiment,
                             synthetic={"images": np.ascontiguousarray(synth.images[idx], dtype=np.float32)})
    spec = P.audit_spec()
    got = exchange(grid, {n: request for n in sorted(asked)}, P.AuditReply, "audit", cfg.round_timeout,
                   check=lambda r: P.check_arrays(r.histograms, spec))
    pooled_train, pooled_heldout = 0.0, 0.0
    for node, reply in sorted(got.replies.items()):
        h = reply.histograms
        pooled_train, pooled_heldout = pooled_train + h["train"], pooled_heldout + h["heldout"]
        asked[node].note_release("audit histograms", got.bytes_received[node])
        out["sites"].append({"name": asked[node].name, **summarize(h["train"], h["heldout"])})
    for node, why in got.failures.items():
        out["failed"][sites[node].name if node in sites else f"node-{node}"] = why
    if got.replies:
        out["pooled"] = summarize(pooled_train, pooled_heldout)
        log.info("DP audits of %d site(s): membership AUC %.3f (0.5 = no signal)", len(got.replies),
                 out["pooled"]["membership_auc"])
    return out
