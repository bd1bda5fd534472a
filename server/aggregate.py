"""Checking and averaging what the sites sent."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from common import protocol as P

log = logging.getLogger("fedsynth.coordinator")


@dataclass
class SiteUpdate:
    node_id: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]
    bytes_received: int


def accept_reply(reply: Message, array_key: str, expected: dict[str, P.ArraySpec],
                 allowed_metrics: dict[str, str], *, weighted: bool = True) -> tuple[SiteUpdate | None, str]:
    """Validate one reply (arrays under ``array_key`` + metrics) against the protocol.

    Returns (update, "") or (None, why it was rejected). ``weighted`` replies must carry a positive
    ``num-examples`` (the FedAvg weight).
    """
    content = reply.content
    records = set(content.keys())
    allowed = {array_key, P.REPLY_METRICS}
    if records != allowed or array_key not in content.array_records or P.REPLY_METRICS not in content.metric_records:
        return None, f"reply records {sorted(records)} are not exactly {sorted(allowed)}"
    arrays = {k: v.numpy() for k, v in content.array_records[array_key].items()}
    metrics = {k: float(v) for k, v in content.metric_records[P.REPLY_METRICS].items()}
    problems = P.validate_reply(arrays, metrics, expected, allowed_metrics)
    if weighted and not metrics.get("num-examples", 0) > 0:
        problems.append("missing or non-positive num-examples")
    if problems:
        return None, "; ".join(problems[:5])
    size = sum(a.nbytes for a in arrays.values()) + 8 * len(metrics)
    return SiteUpdate(reply.metadata.src_node_id, arrays, metrics, size), ""


def accept_gan_reply(reply: Message, expected: dict[str, P.ArraySpec]) -> tuple[SiteUpdate | None, str]:
    """A train.gan reply: exactly the generator's parameters and the declared metrics."""
    return accept_reply(reply, P.REPLY_GENERATOR, expected, P.GAN_REPLY_METRICS)


def weighted_average(updates: list[SiteUpdate]) -> dict[str, np.ndarray]:
    """FedAvg: parameters averaged with weights proportional to each site's record count."""
    if not updates:
        raise ValueError("nothing to average")
    weights = np.array([u.metrics["num-examples"] for u in updates], dtype=np.float64)
    weights /= weights.sum()
    keys = updates[0].arrays.keys()
    return {k: sum(w * u.arrays[k].astype(np.float64) for w, u in zip(weights, updates)).astype(np.float32)
            for k in keys}
