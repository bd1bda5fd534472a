"""Federated evaluation: sites that allow it score the central classifier on their own held-out data.

In a deployment the coordinator has no real test data. A site that allows evaluation answers with a DP
release: per true class, the noisy numbers of its held-out records the classifier got right and wrong
(``protocol.EvaluationReply``; Gaussian noise of std ``EVALUATION_NOISE`` per cell). The coordinator
adds the tables over sites and reads accuracies off the sums; the noise is stated next to each number.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.serverapp import Grid
from torch import nn

from common import protocol as P
from common.config import RunConfig
from server.collect import exchange
from server.run_state import RunState
from server.sites import Schema, SiteRecord, trained_sites

log = logging.getLogger("fedsynth.coordinator")


def accuracy_from_table(table: np.ndarray) -> dict:
    """Accuracy and per-class accuracy from a (K, 2) right/wrong table (noisy cells clipped at 0)."""
    t = np.clip(np.asarray(table, dtype=np.float64), 0.0, None)
    per_class_total = t.sum(axis=1)
    total = float(t.sum())
    acc = float(t[:, 0].sum() / total) if total > 0 else float("nan")
    per_class = [float(r / n) if n > 0 else float("nan") for r, n in zip(t[:, 0], per_class_total)]
    return {"accuracy": acc, "per_class_accuracy": per_class, "records_noisy": total}


def federated_evaluate(grid: Grid, cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord], model: nn.Module,
                       schema: Schema) -> dict:
    """{"accuracy", "sites": [...], "failed": {...}, "noise_std_per_cell"} over the sites that allow evaluation."""
    asked, others = trained_sites(sites, "evaluation")
    out: dict = {"noise_std_per_cell": P.EVALUATION_NOISE, "sites": [], "failed": {}, **others}
    if not asked:
        return out
    state = P.state_arrays(model)
    request = P.EvaluationRequest(experiment=run.experiment, learner=cfg.learner, channels=schema.channels,
                                  height=schema.height, width=schema.width, num_classes=len(schema.classes),
                                  classifier=state)
    spec = P.evaluation_spec(len(schema.classes))
    got = exchange(grid, {n: request for n in sorted(asked)}, P.EvaluationReply, "evaluate", cfg.round_timeout,
                   check=lambda r: P.check_arrays(r.counts, spec))
    total = np.zeros((len(schema.classes), 2))
    for node, reply in sorted(got.replies.items()):
        table = reply.counts["table"]
        total += table
        asked[node].note_release("evaluation counts", got.bytes_received[node])
        out["sites"].append({"name": asked[node].name, **accuracy_from_table(table)})
    for node, why in got.failures.items():
        out["failed"][sites[node].name if node in sites else f"node-{node}"] = why
    if got.replies:
        out.update(accuracy_from_table(total))
        log.info("federated evaluation (DP, noise std %.0f per count): accuracy %.4f at %d site(s)",
                 P.EVALUATION_NOISE, out["accuracy"], len(got.replies))
    else:
        out["accuracy"] = math.nan
    return out
