"""Federated evaluation: the sites score the central classifier on their own held-out data.

In a deployment the coordinator has no real test data; each site evaluates the classifier it is sent
and returns only the numbers in ``protocol.EVAL_REPLY_METRICS``. The coordinator reports them per site
and weighted by held-out size.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from torch import nn

from common import protocol as P
from server.rounds import broadcast, failures_by_site, site_name

log = logging.getLogger("fedsynth.coordinator")


def federated_evaluate(grid: Grid, model: nn.Module, learner: str, image_shape: tuple[int, int, int],
                       num_classes: int, names: dict[int, str], timeout: float) -> dict:
    """Send the classifier to every site; return {"accuracy": weighted, "sites": [...], "failed": {...}}."""
    c, h, w = image_shape
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    cfg = ConfigRecord({"learner": learner, "channels": c, "height": h, "width": w, "num-classes": num_classes})
    ex = broadcast(grid, {P.REQ_CLASSIFIER: ArrayRecord(state), P.REQ_CONFIG: cfg}, P.EVALUATE_CLASSIFIER,
                   "evaluate", timeout)
    rows, failed = [], failures_by_site(ex, names)
    for reply in ex.ok:
        name = site_name(names, reply.metadata.src_node_id)
        content = reply.content
        if set(content.keys()) != {P.REPLY_METRICS} or P.REPLY_METRICS not in content.metric_records:
            failed[name] = "reply does not follow the protocol"
            continue
        metrics = {k: float(v) for k, v in content.metric_records[P.REPLY_METRICS].items()}
        problems = P.validate_reply({}, metrics, {}, P.EVAL_REPLY_METRICS)
        if problems or set(metrics) != set(P.EVAL_REPLY_METRICS) or not 0 <= metrics["accuracy"] <= 1:
            failed[name] = "; ".join(problems) or f"unexpected metrics {sorted(metrics)}"
            continue
        rows.append({"name": name, "num_test": int(metrics["num-test"]), "accuracy": metrics["accuracy"]})
    total = sum(r["num_test"] for r in rows)
    acc = sum(r["accuracy"] * r["num_test"] for r in rows) / total if total else float("nan")
    if rows:
        log.info("federated evaluation: accuracy %.4f over %d held-out records at %d site(s)", acc, total, len(rows))
    return {"accuracy": acc, "num_test": total, "sites": sorted(rows, key=lambda r: r["name"]), "failed": failed}
