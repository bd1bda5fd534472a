"""The message protocol: every message a coordinator and a site exchange, as typed dataclasses.

This module is the privacy boundary written down. Every field of every *reply* (what leaves a site)
carries a declaration (:func:`declared`) saying either

- ``public``: public by declaration, with the reason (the image shape a site's operator publishes,
  a constant of this protocol); or
- ``dp``: a differentially private release, charged to the site's privacy ledger before it is
  computed, with the mechanism that makes it DP.

Nothing else leaves a site: the site builds its replies only through these classes, the coordinator
reads them only through :meth:`from_message`, which refuses anything undeclared, and
``tests/test_protocol.py`` checks every reply of real runs field by field. In particular no reply
carries the site's record count, its sampling rate, its noise multiplier, its delta or its spent
epsilon: under add/remove-one adjacency (``common.accounting``) those are functions of private data.

Requests (coordinator -> site) carry only the coordinator's own settings and models; a site treats
them as hostile input: :meth:`from_message` checks names and types, the handlers check ranges (common.recipe_ranges).

Wire format (``common.wire``): a ``ConfigRecord`` named ``"config"`` holds the scalar fields (dashed
names), and every array field is an ``ArrayRecord`` of its own name. Flower message types must be
``train|evaluate|query`` + ``.identifier``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import numpy as np

from common.refusal_codes import (  # noqa: F401 - part of the protocol: both sides use them as protocol.X
    ALREADY_SUMMED, MAX_MESSAGE_BYTES, REFUSAL_NAMES, REFUSED_BAD_REQUEST, REFUSED_BUDGET, REFUSED_NOT_ALLOWED,
    REFUSED_UNAPPROVED_CODE, SITE_FAILURE,
)
from common.wire import (  # noqa: F401 - re-exported: both sides use them as protocol.X
    CONFIG, ArraySpec, Arrays, Message, ProtocolError, array_fields, arrays, check_arrays, declared, load_state,
    reply_declarations, state_arrays, state_spec,
)

# ---- message types --------------------------------------------------------------------------------
QUERY_INFO = "query.info"  # the site's published data schema and policy
TRAIN_GAN = "train.gan"  # DP-GAN mode: global generator in, locally trained generator out
TRAIN_BNNET = "train.bnnet"  # BN-statistics mode: shared GroupNorm net in, net after local DP-SGD out
QUERY_BNSTATS = "query.bnstats"  # BN-statistics mode: shared net in, DP class-wise statistics out
EVALUATE_CLASSIFIER = "evaluate.classifier"  # central classifier in, DP per-class correct/wrong counts out
QUERY_AUDIT = "query.audit"  # synthetic sample in, DP histograms of record-to-synthetic distances out


# ---- refusals (error replies a site sends instead of doing work): the codes, and what each one's reason may
# say, are in common.refusal_codes (imported above: protocol.REFUSED_BUDGET etc.)

# ---- public constants of the DP releases that are not model training ---------------------------------
# Noise multipliers (noise std / L2 sensitivity) of the small releases a site makes, all of whole-number counts with
# exact integer noise (client/discrete_gaussian.py). Public: the coordinator may use them to judge the noise, and a
# test checks each sensitivity they are scaled by.
CENSUS_NOISE = 20.0  # per-run noisy class histogram (sensitivity 1): FedAvg weight, G's label mix, sampling mix
EVALUATION_NOISE = 10.0  # per-class correct/wrong counts of the central classifier (sensitivity 1)
AUDIT_NOISE = 10.0  # histograms of each record's distance to the nearest synthetic image (sensitivity 1)
# Distance bins of the audit histograms: pixel MSE on [0, 1] images, log-spaced, fixed in advance so
# that histograms from several sites add up and nothing about the data chooses them.
AUDIT_BIN_EDGES: tuple[float, ...] = tuple(float(x) for x in np.concatenate([[0.0], np.logspace(-5, 0, 41)]))
AUDIT_MAX_IMAGES = 2000  # synthetic images one audit query may carry


# ================================================================================================
# query.info: the published schema and policy of a site
# ================================================================================================

@dataclass(frozen=True)
class InfoRequest(Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_INFO


@dataclass(frozen=True)
class InfoReply(Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_INFO
    site_name: str = declared("public", "the name the site's operator gave it in site.yaml")
    channels: int = declared("public", "image schema the site publishes so that a run can agree on it")
    height: int = declared("public", "image schema the site publishes")
    width: int = declared("public", "image schema the site publishes")
    classes: tuple[str, ...] = declared("public", "class names the site publishes (its folder names / label "
                                                  "list, as a deployed site read them when it started and pinned: "
                                                  "client.site.pinned_classes), never how many records each holds")
    delta_bound: float = declared("public", "an upper bound of the site's delta: its configured delta, or "
                                            "DEFAULT_DELTA_BOUND when it uses the default (client.site_delta)")
    modes: tuple[str, ...] = declared("public", "the synthesis modes the site's operator allows")
    evaluation: bool = declared("public", "whether the operator allows DP federated evaluation")
    audits: bool = declared("public", "whether the operator allows DP privacy audits")
    queries_per_run: int = declared("public", "the operator's cap on evaluation and audit queries per run")
    device: str = declared("public", "the kind of device the site computes on for this run ('cpu', 'cuda', "
                                     "'mps'), so that the report can say which device ran what; nothing about "
                                     "its records")
    sensitive_attribute: str = declared("public", "the attribute the site's operator declared sensitive in site.yaml "
                                                  "('' = none): the synthetic set must draw it independently of "
                                                  "everything else (seed 004); a setting, not a fact about records")


DEFAULT_DELTA_BOUND = 1e-5  # the default delta min(1e-5, 1/(10 (noisy size + margin))) is at most this


# ================================================================================================
# DP-GAN mode
# ================================================================================================

# The most G steps a site runs after each D step (GanTrainRequest.g_steps): each costs a G and a D forward and
# backward at the site; a coordinator asking for more asks the site to burn its CPU, not to learn more (G then
# overfits a fixed D). The run config refuses more too, before any site is asked.
MAX_G_STEPS = 10
# The most D steps a site runs between two G steps (GanTrainRequest.d_steps, Bie et al.'s n_D). More only means
# fewer G steps (none at all once it exceeds a round's D steps), no more work or privacy at the site; the bound
# keeps a request in the range that paper searched (its best fixed values were 50 to 200).
MAX_D_STEPS = 200


@dataclass(frozen=True)
class GanTrainRequest(Message):
    """One federated round of the DP-GAN. The site decides its own noise; the coordinator only says how
    much work it asks for and the most epsilon the run may spend at each site."""

    MESSAGE_TYPE: ClassVar[str] = TRAIN_GAN
    experiment: str  # run id: the site keys its state and ledger entries by it (common.run_id)
    server_round: int  # 1..num_rounds
    num_rounds: int
    local_steps: int  # discriminator DP-SGD steps this round
    batch_size: int  # expected Poisson batch size
    max_grad_norm: float  # per-sample clipping bound C
    lr_d: float
    lr_g: float
    d_width: int
    ac_weight: float
    mode_seeking: float
    class_histogram: bool  # draw G's labels from the site's DP class histogram
    epsilon: float  # the most this run may spend at the site (inf = non-private, if the site allows it)
    seed: int  # G's latents and D's initialisation; never the DP noise
    channels: int
    image_size: int
    num_classes: int
    latent_dim: int
    width: int
    generator: Arrays = arrays()  # the global generator's state_dict, float32
    resolution: int = 0  # side G draws at and D judges at (GanShape.resolution; 0 = image_size)
    # the attribute the coordinator will draw independently in every synthetic image (seed 004); a site that
    # declared one refuses a request that does not name it (a coordinator that would not replace it)
    sensitive_attribute: str = ""
    g_steps: int = 1  # G steps after each d_steps D steps (G never sees a record: no privacy cost)
    d_steps: int = 1  # D steps between two G steps (n_D; the D steps, and so the privacy spent, are local_steps)
    ema: float = 0.0  # decay of the EMA of G's weights over the round, sent instead of G's last weights (0 = off)
    # D steps per round the site takes instead of local_steps where its own noisy census says it is large
    # (client.site_schedule.choose_local_steps); 0 = exactly local_steps. Fixed with the site's plan at its first round.
    long_steps: int = 0
    # G steps after each D step a site takes instead of g_steps where its own noisy census says it is large
    # (client.site_schedule.choose_g_steps: free in privacy); 0 = exactly g_steps.
    long_g_steps: int = 0
    # DiffAugment of every image the site's D judges (common.gan_augment): "" = none, or comma-separated names
    augment: str = ""
    # FedAvg of the discriminators too: the site sends D's weights after the round (GanTrainReply.discriminator)
    share_d: bool = False
    # the sites' averaged D of the last aggregated round, float32 state_dict: the site starts its round from it
    # (keeping its own optimizer state); empty = the site's own D (a new one at its first round)
    discriminator: Arrays = arrays(optional=True)


@dataclass(frozen=True)
class GanTrainReply(Message):
    MESSAGE_TYPE: ClassVar[str] = TRAIN_GAN
    generator: Arrays = arrays(kind="dp", why="G is trained only through the DP-SGD-trained discriminator: "
                                              "post-processing of this round's DP-SGD steps")
    census: Arrays = arrays(kind="dp", why="'counts' (K,): the site's per-run noisy class histogram itself "
                                           "(discrete Gaussian, z = CENSUS_NOISE, sensitivity 1, charged with the site's "
                                           "first round or on its own just before it); the coordinator takes "
                                           "each class's synthetic images from the sites in proportion to it")
    weight: float = declared("dp", "FedAvg weight: the sum of the site's per-run noisy class histogram "
                                   "(post-processing of 'census'); in a secure round at most the sum's range over "
                                   "the request's largest generator value (client.census.secure_weight: the "
                                   "request's own numbers)")
    g_loss: float = declared("dp", "mean generator loss: a function of G, of the DP discriminator and of "
                                   "labels drawn from the DP histogram (post-processing)")
    local_steps: int = declared("dp", "the D steps the site took this round: the request's local_steps or "
                                      "long_steps, chosen from the request and the site's noisy census alone "
                                      "(post-processing of 'census'), never from its record count", default=0)
    g_steps: int = declared("dp", "the G steps after each D step the site took this round: the request's g_steps "
                                  "or long_g_steps, chosen from the request and the site's noisy census alone "
                                  "(post-processing of 'census') at the run's first round and kept for the run",
                            default=0)
    discriminator: Arrays = arrays(kind="dp", why="D's weights after this round's DP-SGD steps (only when the "
                                                  "request sets share_d): the DP-SGD mechanism's own output, whose "
                                                  "every iterate the round's charge already covers; its starting "
                                                  "point is the request's average or the site's earlier DP output",
                                   optional=True)


# ================================================================================================
# BN-statistics mode
# ================================================================================================

@dataclass(frozen=True)
class BnPlanSettings:
    """Settings of both BN-statistics requests; the site fixes its whole plan from them once per run."""

    experiment: str
    net_rounds: int  # federated DP-SGD rounds of the shared net (0 = the coordinator provides the net)
    local_steps: int
    batch_size: int
    max_grad_norm: float
    lr: float
    epsilon: float
    stats_share: float  # share of epsilon for the statistics release when the net is trained
    clip: float  # flat per-record bound of the statistics
    layer_clips: str  # "" (flat), "auto" (chosen privately) or one bound per norm layer
    count_weight: float
    seed: int
    channels: int
    image_size: int
    num_classes: int
    width: int
    head_norm: bool
    resolution: int  # side the shared net works at (larger records are averaged down to it; BNNetShape.side)
    # Distributed noise (only inside a secure aggregation): the statistics release's noise is split over at
    # least this many sites, each adding 1/sqrt(noise_shares) of it, so that the sum carries all of it.
    # 1 = every site adds all of it (always so in the clear: a site refuses anything else there).
    noise_shares: int


@dataclass(frozen=True)
class BnTrainRequest(BnPlanSettings, Message):
    MESSAGE_TYPE: ClassVar[str] = TRAIN_BNNET
    server_round: int
    net: Arrays = arrays()  # the shared net's state_dict


@dataclass(frozen=True)
class BnTrainReply(Message):
    MESSAGE_TYPE: ClassVar[str] = TRAIN_BNNET
    net: Arrays = arrays(kind="dp", why="the shared net after this round's DP-SGD steps (post-processing)")
    weight: float = declared("dp", "FedAvg weight: sum of the per-run noisy class histogram (z = CENSUS_NOISE); "
                                   "in a secure round at most the sum's range over the request's largest net value "
                                   "(client.census.secure_weight)")


@dataclass(frozen=True)
class BnStatsRequest(BnPlanSettings, Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_BNSTATS
    net: Arrays = arrays()


@dataclass(frozen=True)
class BnStatsReply(Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_BNSTATS
    stats: Arrays = arrays(kind="dp", why="one Gaussian release of noisy class counts (discrete Gaussian noise: "
                                          "whole numbers, but for a share of split noise) and clipped per-class "
                                          "sums / sums of squares (client.bnstats; layout: stats_layout)")


# ---- the statistics release's layout, used by the site that records it and the coordinator that pools it
STATS_COUNT = "count"
STATS_SUM = "sum/"
STATS_SUMSQ = "sumsq/"


def stats_layout(layer_channels: Mapping[str, int], num_classes: int) -> dict[str, tuple[int, ...]]:
    """Every array of a statistics release and its shape: "count" (K,), "sum/<layer>" and
    "sumsq/<layer>" (K, C_l) for every norm layer in the shared net's order."""
    layout: dict[str, tuple[int, ...]] = {STATS_COUNT: (num_classes,)}
    for name, channels in layer_channels.items():
        layout[STATS_SUM + name] = (num_classes, channels)
        layout[STATS_SUMSQ + name] = (num_classes, channels)
    return layout


def stats_layers(release: Mapping[str, Any]) -> list[str]:
    """The norm-layer names of a release, in its order."""
    return [k[len(STATS_SUM):] for k in release if k.startswith(STATS_SUM)]


# ================================================================================================
# Federated evaluation and audits (off unless a site's operator turns them on)
# ================================================================================================

@dataclass(frozen=True)
class EvaluationRequest(Message):
    MESSAGE_TYPE: ClassVar[str] = EVALUATE_CLASSIFIER
    experiment: str
    learner: str  # a built-in learner's name: a site never imports a module the coordinator names
    channels: int
    height: int
    width: int
    num_classes: int
    classifier: Arrays = arrays()  # the central learner's state_dict


# A query re-sent in a run with the same settings and arrays (their sha256) gets the answer it had, kept with its
# charge (client.evaluation.saved_answer, review s63): the same DP release again, nothing new and nothing charged.
@dataclass(frozen=True)
class EvaluationReply(Message):
    MESSAGE_TYPE: ClassVar[str] = EVALUATE_CLASSIFIER
    counts: Arrays = arrays(kind="dp", why="'table' (K, 2): per true class, noisy numbers of held-out records "
                                           "classified right / wrong; one record is one cell (sensitivity 1), "
                                           "discrete Gaussian z = EVALUATION_NOISE, charged before it is computed")


@dataclass(frozen=True)
class AuditRequest(Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_AUDIT
    experiment: str
    synthetic: Arrays = arrays()  # "images" (N, C, H, W) float32 in [0, 1], N <= AUDIT_MAX_IMAGES


@dataclass(frozen=True)
class AuditReply(Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_AUDIT
    histograms: Arrays = arrays(kind="dp", why="'train' and 'heldout' (B,): noisy counts of the site's records "
                                               "by the pixel MSE to their nearest synthetic image, over "
                                               "AUDIT_BIN_EDGES; one record is one bin of one histogram "
                                               "(sensitivity 1), discrete Gaussian z = AUDIT_NOISE, charged first")


# ================================================================================================
# Secure aggregation (SecAgg+, Flower's secaggplus_mod; run setting secure-aggregation = true)
# ================================================================================================
# Flower 1.41's SecAgg+ runs only on message type exactly "train", in four stages, with the legacy
# FitIns/FitRes layout (``common.secure_wire`` wraps the typed requests above into it). A site then sends,
# per aggregation, only what SECURE_REPLY_DECLARATIONS lists -- in its reply to each stage, the record
# ``secaggplus_configs`` with these keys and, to the third stage, the FitRes records with nothing private
# in them. The sum the coordinator unmasks is the DP release (charged by the inner request's handler, as
# in the clear); what it never gets is any single site's vector.
SECURE_TRAIN = "train"  # the one message type Flower's SecAgg+ mod handles
SECURE_TASKS = (TRAIN_GAN, TRAIN_BNNET, QUERY_BNSTATS)  # the releases that can be summed securely
SECAGG_RECORD = "secaggplus_configs"
# Quantization (public constants of the protocol; Flower's SecAgg+ adds integers mod SECAGG_MODULUS):
# every value a site adds is clipped to +-SECAGG_CLIPPING_RANGE (a FedAvg model that outgrew it while it trained is
# clamped into it by the site first, NaN to 0: post-processing of its DP release, common.secure_wire.summand; a
# statistics value outside it is refused) and rounded to one of
# SECAGG_QUANTIZATION_LEVELS levels, i.e. to a step of 2 R / L = 0.125; the sum of k sites stays below
# the modulus while k < SECAGG_MODULUS / L (= 256 sites).
SECAGG_CLIPPING_RANGE = float(2 ** 20)
SECAGG_QUANTIZATION_LEVELS = 2 ** 24
SECAGG_MODULUS = 2 ** 32
SECAGG_MAX_SITES = SECAGG_MODULUS // SECAGG_QUANTIZATION_LEVELS - 1
# Sites one secure sum may hold: a site shares keys with at most this many (client.secure_site), the work of which
# is uncharged and grows faster than the square of the sites (0.4 s at 64, 14.5 s at 255; review s59)
SECURE_SUM_MAX_SITES = 64
SECAGG_STEP = 2 * SECAGG_CLIPPING_RANGE / SECAGG_QUANTIZATION_LEVELS  # 0.125: stochastic rounding, unbiased

SECURE_REPLY_DECLARATIONS: dict[str, dict[str, str]] = {
    # stage -> key of the site's secaggplus_configs reply -> why it may leave the site (all public)
    "setup": {
        "pk1": "a key-agreement public key drawn fresh for this aggregation (masks)",
        "pk2": "a key-agreement public key drawn fresh for this aggregation (share encryption)",
    },
    "share_keys": {
        "dsts": "the neighbours the site sends shares to (node ids the coordinator chose)",
        "ctxts": "Shamir shares of the site's mask seed and mask key, each encrypted for one neighbour with a "
                 "key the coordinator cannot derive",
    },
    "collect_masked_vectors": {
        "masked_params": "the site's quantized vector plus its own mask and pairwise masks (uniform mod 2^32 "
                         "on its own): only the sum over the sites is recoverable, and that sum is the DP release",
    },
    "unmask": {
        "nids": "which neighbours the shares below belong to (the coordinator's own lists)",
        "shares": "shares of live neighbours' mask seeds and of dropped neighbours' mask keys: together they "
                  "remove the masks from the sum, never expose one site's vector",
    },
}
# The FitRes records Flower's legacy layout adds to the third stage's reply, and what they may hold.
SECURE_FITRES_RECORDS = {
    "fitres.parameters": "emptied by the SecAgg+ mod (the vector leaves only masked)",
    "fitres.num_examples": "the constant 1: every site adds with weight 1 (weights travel inside the sum)",
    "fitres.metrics": "empty",
    "fitres.status": "code 0 and an empty message",
}


REPLY_TYPES: dict[str, type] = {c.MESSAGE_TYPE: c for c in (InfoReply, GanTrainReply, BnTrainReply, BnStatsReply,
                                                             EvaluationReply, AuditReply)}


# ================================================================================================
# Array specs of the small releases
# ================================================================================================

def evaluation_spec(num_classes: int) -> dict[str, ArraySpec]:
    return {"table": ArraySpec((num_classes, 2))}


def audit_spec() -> dict[str, ArraySpec]:
    bins = len(AUDIT_BIN_EDGES) - 1
    return {"train": ArraySpec((bins,)), "heldout": ArraySpec((bins,))}
