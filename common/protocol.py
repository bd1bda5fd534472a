"""The message protocol: every message type, and every array and number a site may send.

This module is the privacy boundary written down. A site builds its replies only through the
``*_reply_*`` helpers here, the coordinator validates every reply with :func:`validate_reply`, and
``tests/test_protocol.py`` runs real rounds and checks that nothing else ever leaves a site.

Flower message types must be ``train|evaluate|query`` + ``.identifier`` (flower-notes §2.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

# ---- message types --------------------------------------------------------------------------------
TRAIN_GAN = "train.gan"  # coordinator -> site: global generator in, locally trained generator out
QUERY_INFO = "query.info"  # coordinator -> site: the data schema (image shape, class names), no records
EVALUATE_CLASSIFIER = "evaluate.classifier"  # central classifier in, metrics on the site's held-out data out
QUERY_AUDIT = "query.audit"  # synthetic sample in, aggregate privacy diagnostics on the site's data out
TRAIN_BNNET = "train.bnnet"  # shared GroupNorm net in, the net after local DP-SGD out (BN-statistics mode)
QUERY_BNSTATS = "query.bnstats"  # shared net in, DP class-wise norm-input statistics out (BN-statistics mode)

# ---- record keys in requests (coordinator -> site) --------------------------------------------------
REQ_CONFIG = "config"  # ConfigRecord: the request's settings (see GAN_REQUEST_KEYS)
REQ_GENERATOR = "generator"  # ArrayRecord: the global generator's state_dict

# Settings the coordinator sends with a train.gan request. The site decides its own noise; the
# coordinator only says how much work it asks for and how much epsilon the run may use at most.
GAN_REQUEST_KEYS = (
    "experiment", "server-round", "num-rounds", "local-steps", "batch-size", "max-grad-norm",
    "lr-d", "lr-g", "d-width", "ac-weight", "mode-seeking", "class-histogram", "epsilon", "delta", "seed",
    # GAN shape (must match the site's data and the generator sent)
    "channels", "image-size", "num-classes", "latent-dim", "width",
)

REQ_NET = "net"  # ArrayRecord: the shared BN-statistics net's state_dict

# Settings of both BN-statistics requests: the site fixes its whole plan (DP-SGD noise for the net and
# noise for the one statistics release) at the first of them, from these and its own budget.
BN_REQUEST_KEYS = (
    "experiment", "server-round", "net-rounds", "local-steps", "batch-size", "max-grad-norm", "lr",
    "epsilon", "stats-share", "clip", "layer-clips", "count-weight", "seed",
    "channels", "image-size", "num-classes", "width", "head-norm",
)
REQ_CLASSIFIER = "classifier"  # ArrayRecord: the central learner's state_dict
REQ_SYNTHETIC = "synthetic"  # ArrayRecord: "images" (N, C, H, W) float32 and "labels" (N,) int64 to audit
EVAL_REQUEST_KEYS = ("learner", "channels", "height", "width", "num-classes")
AUDIT_REQUEST_KEYS = ("max-records", "seed")

# ---- record keys in replies (site -> coordinator) ---------------------------------------------------
REPLY_GENERATOR = "generator"  # ArrayRecord: exactly the generator's parameters, float32, finite
REPLY_METRICS = "metrics"  # MetricRecord: only the names below

# Every number a site may send with a train.gan reply, and why it is safe to send.
GAN_REPLY_METRICS: dict[str, str] = {
    "num-examples": "site record count; public in DP-SGD analysis (it fixes the sampling rate), used as FedAvg weight",
    "epsilon": "cumulative epsilon spent on this dataset, from the site's ledger",
    "delta": "the site's delta",
    "noise-multiplier": "the DP-SGD noise multiplier the site chose",
    "sample-rate": "the Poisson sampling rate q",
    "local-steps": "DP-SGD steps taken this round",
    "d-loss": "mean discriminator loss this round (post-processing of DP training)",
    "g-loss": "mean generator loss this round (post-processing of DP training)",
    "train-seconds": "wall time of local training",
}


# query.info reply: a ConfigRecord "info" with the dataset's schema -- public by design (the run must
# agree on it), never record-level data and never class counts.
REPLY_INFO = "info"
INFO_KEYS = ("site-name", "channels", "height", "width", "classes")


# evaluate.classifier reply: a MetricRecord "metrics" with only these numbers (no per-record output)
EVAL_REPLY_METRICS: dict[str, str] = {
    "num-test": "number of the site's held-out records evaluated (FedAvg-style weight)",
    "accuracy": "accuracy of the central classifier on them",
}
# query.audit reply: a ConfigRecord "diagnostic" of aggregate numbers and fixed-bin histogram counts,
# flattened to "<section>.<name>" keys (see common.audits.site_audit_summary); never per-record values.
REPLY_DIAGNOSTIC = "diagnostic"


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str


def generator_spec(state_dict: Mapping[str, "object"]) -> dict[str, ArraySpec]:
    """The arrays a generator reply must contain: one per generator parameter, float32."""
    return {k: ArraySpec(tuple(v.shape), "float32") for k, v in state_dict.items()}


def validate_reply(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, float],
                   expected_arrays: Mapping[str, ArraySpec], allowed_metrics: Mapping[str, str]) -> list[str]:
    """Problems with a reply; empty when it is exactly what the protocol allows.

    Checks: the array names are exactly the expected ones, each shape and dtype matches, every value is
    finite, and every metric name is declared (and finite unless it is an epsilon).
    """
    problems: list[str] = []
    extra = sorted(set(arrays) - set(expected_arrays))
    missing = sorted(set(expected_arrays) - set(arrays))
    if extra:
        problems.append(f"undeclared arrays {extra}")
    if missing:
        problems.append(f"missing arrays {missing}")
    for name, spec in expected_arrays.items():
        if name not in arrays:
            continue
        arr = arrays[name]
        if tuple(arr.shape) != spec.shape:
            problems.append(f"array '{name}' has shape {tuple(arr.shape)}, expected {spec.shape}")
        elif str(arr.dtype) != spec.dtype:
            problems.append(f"array '{name}' has dtype {arr.dtype}, expected {spec.dtype}")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"array '{name}' contains NaN or inf")
    for name, value in metrics.items():
        if name not in allowed_metrics:
            problems.append(f"undeclared metric '{name}'")
        elif name not in ("epsilon",) and not math.isfinite(float(value)):
            problems.append(f"metric '{name}' is not finite")
    return problems

# train.bnnet reply: the net under REPLY_NET (float32 parameters only) + metrics (a subset of these)
REPLY_NET = "net"
BNNET_REPLY_METRICS: dict[str, str] = {k: GAN_REPLY_METRICS[k] for k in (
    "num-examples", "epsilon", "delta", "noise-multiplier", "sample-rate", "local-steps", "train-seconds")}
# query.bnstats reply: the statistics under REPLY_STATS, exactly the arrays of
# client.bnstats.expected_release_keys ("count" (K,), "sum/<layer>" and "sumsq/<layer>" (K, C_l), float32,
# all noisy), + metrics below. No exact count of any kind is sent with it.
REPLY_STATS = "stats"
BNSTATS_REPLY_METRICS: dict[str, str] = {
    "epsilon": "cumulative epsilon spent on this dataset, from the site's ledger",
    "delta": "the site's delta",
    "noise-multiplier": "noise multiplier of the statistics release",
}

# ---- refusals (error replies a site sends instead of doing work) --------------------------------------
# Flower error replies carry an int code and a reason; these codes say why a site refused, so the
# coordinator can tell "over budget" from "bad request" from a crash.
REFUSED_BUDGET = 4001  # the request would take the site past its privacy budget
REFUSED_BAD_REQUEST = 4002  # malformed, inconsistent or hostile request
REFUSED_NOT_ALLOWED = 4003  # the site's config does not allow this mode / action
SITE_FAILURE = 4004  # the site could not do the work (bad local data, internal error)

REFUSAL_NAMES = {REFUSED_BUDGET: "over budget", REFUSED_BAD_REQUEST: "bad request",
                 REFUSED_NOT_ALLOWED: "not allowed", SITE_FAILURE: "site failure"}


def flatten_diagnostic(tree: Mapping, prefix: str = "") -> dict:
    """Nested dict of scalars / lists of scalars -> flat {"a.b.c": value} a ConfigRecord can carry.

    None becomes the string "none" (ConfigRecord has no null); NaN floats stay NaN.
    """
    flat: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_diagnostic(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = [float(v) if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
                          else str(v) for v in value]
        elif value is None:
            flat[name] = "none"
        elif isinstance(value, (bool, str)):
            flat[name] = value
        else:
            flat[name] = float(value)
    return flat


def unflatten_diagnostic(flat: Mapping) -> dict:
    """Inverse of :func:`flatten_diagnostic` (numbers come back as floats, "none" as None)."""
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None if value == "none" else (list(value) if isinstance(value, (list, tuple)) else value)
    return tree


def bnstats_spec(net: "object", num_classes: int) -> dict[str, ArraySpec]:
    """The arrays a query.bnstats reply must contain for this shared net: noisy counts, sums, sums of squares."""
    from common.bnnet import norm_layer_channels  # local: keeps the protocol importable without torch models

    spec = {"count": ArraySpec((num_classes,), "float32")}
    for name, channels in norm_layer_channels(net).items():
        spec[f"sum/{name}"] = ArraySpec((num_classes, channels), "float32")
        spec[f"sumsq/{name}"] = ArraySpec((num_classes, channels), "float32")
    return spec
