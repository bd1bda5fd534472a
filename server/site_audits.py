"""Ask the sites to audit the synthetic set against their own records (diagnostics, aggregates only)."""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import protocol as P
from common.data import ImageDataset
from server.rounds import broadcast, failures_by_site, site_name

log = logging.getLogger("fedsynth.coordinator")


def request_site_audits(grid: Grid, synth: ImageDataset, names: dict[int, str], *, max_records: int,
                        seed: int, timeout: float) -> dict:
    """{"sites": [{"name", **summary}], "failed": {name: why}} (layout read by server.report_html)."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(synth), size=min(max_records, len(synth)), replace=False))
    rec = ArrayRecord({"images": Array(np.ascontiguousarray(synth.images[idx])),
                       "labels": Array(np.ascontiguousarray(synth.labels[idx]))})
    cfg = ConfigRecord({"max-records": max_records, "seed": seed})
    ex = broadcast(grid, {P.REQ_SYNTHETIC: rec, P.REQ_CONFIG: cfg}, P.QUERY_AUDIT, "audit", timeout)
    sites, failed = [], failures_by_site(ex, names)
    for reply in ex.ok:
        name = site_name(names, reply.metadata.src_node_id)
        content = reply.content
        if set(content.keys()) != {P.REPLY_DIAGNOSTIC} or P.REPLY_DIAGNOSTIC not in content.config_records:
            failed[name] = "reply does not follow the protocol"
            continue
        summary = P.unflatten_diagnostic(dict(content.config_records[P.REPLY_DIAGNOSTIC]))
        if summary.get("kind") != "diagnostic":
            failed[name] = "reply is not labelled as a diagnostic"
            continue
        sites.append({"name": name, **summary})
    return {"sites": sorted(sites, key=lambda s: s["name"]), "failed": failed}
