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
them as hostile input: :meth:`from_message` checks names and types, the handlers check ranges.

Wire format: a ``ConfigRecord`` named ``"config"`` holds the scalar fields (dashed names), and every
array field is an ``ArrayRecord`` of its own name. Flower message types must be
``train|evaluate|query`` + ``.identifier``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping

import numpy as np

# ---- message types --------------------------------------------------------------------------------
QUERY_INFO = "query.info"  # the site's published data schema and policy
TRAIN_GAN = "train.gan"  # DP-GAN mode: global generator in, locally trained generator out
TRAIN_BNNET = "train.bnnet"  # BN-statistics mode: shared GroupNorm net in, net after local DP-SGD out
QUERY_BNSTATS = "query.bnstats"  # BN-statistics mode: shared net in, DP class-wise statistics out
EVALUATE_CLASSIFIER = "evaluate.classifier"  # central classifier in, DP per-class correct/wrong counts out
QUERY_AUDIT = "query.audit"  # synthetic sample in, DP histograms of record-to-synthetic distances out

CONFIG = "config"  # name of the ConfigRecord holding a message's scalar fields

# ---- refusals (error replies a site sends instead of doing work) ------------------------------------
# Flower error replies carry an int code and a reason. A reason says why in words the coordinator may
# read: never the site's budget, what it has spent or has left, its record count or its file names.
REFUSED_BUDGET = 4001  # the request does not fit the site's privacy budget
REFUSED_BAD_REQUEST = 4002  # malformed, inconsistent or hostile request
REFUSED_NOT_ALLOWED = 4003  # the site's config does not allow this mode / action / more queries
SITE_FAILURE = 4004  # the site could not do the work (its operator sees why in the site's log)
REFUSED_UNAPPROVED_CODE = 4005  # the run's app bundle is not one the site's operator approved

REFUSAL_NAMES = {REFUSED_BUDGET: "over budget", REFUSED_BAD_REQUEST: "bad request",
                 REFUSED_NOT_ALLOWED: "not allowed", SITE_FAILURE: "site failure",
                 REFUSED_UNAPPROVED_CODE: "unapproved code"}

# ---- public constants of the DP releases that are not model training ---------------------------------
# Noise multipliers (noise std / L2 sensitivity) of the small releases a site makes. Public: the
# coordinator may use them to judge the noise, and a test checks each sensitivity they are scaled by.
CENSUS_NOISE = 20.0  # per-run noisy class histogram (sensitivity 1): FedAvg weight and G's label mix
EVALUATION_NOISE = 10.0  # per-class correct/wrong counts of the central classifier (sensitivity 1)
AUDIT_NOISE = 10.0  # histograms of each record's distance to the nearest synthetic image (sensitivity 1)
# Distance bins of the audit histograms: pixel MSE on [0, 1] images, log-spaced, fixed in advance so
# that histograms from several sites add up and nothing about the data chooses them.
AUDIT_BIN_EDGES: tuple[float, ...] = tuple(float(x) for x in np.concatenate([[0.0], np.logspace(-5, 0, 41)]))
AUDIT_MAX_IMAGES = 2000  # synthetic images one audit query may carry


class ProtocolError(ValueError):
    """A message does not follow the protocol; the text says what is wrong."""


def declared(kind: str, why: str, **extra: Any) -> Any:
    """A reply field with its privacy declaration: ``kind`` is "public" or "dp", ``why`` the reason."""
    if kind not in ("public", "dp"):
        raise ValueError(f"a reply field is 'public' or 'dp', got {kind!r}")
    return field(metadata={"kind": kind, "why": why, **extra})


def arrays(why: str = "", kind: str = "") -> Any:
    """An array field (its own ArrayRecord). Replies must give ``kind`` and ``why``."""
    meta = {"arrays": True}
    if kind:
        meta.update(kind=kind, why=why)
    return field(metadata=meta)


Arrays = dict  # {name: np.ndarray}: one ArrayRecord on the wire


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _is_arrays(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("arrays"))


_SCALARS = (bool, int, float, str)


def _check_scalar(cls_name: str, f: dataclasses.Field, value: Any) -> Any:
    """Type-check one decoded value against the field's annotation (a string under __future__)."""
    want = str(f.type)
    key = _dashed(f.name)
    if want == "bool":
        if not isinstance(value, bool):
            raise ProtocolError(f"{cls_name}: '{key}' must be true/false, got {value!r}")
        return value
    if want == "int":
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ProtocolError(f"{cls_name}: '{key}' must be an integer, got {value!r}")
        return int(value)
    if want == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ProtocolError(f"{cls_name}: '{key}' must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value):
            raise ProtocolError(f"{cls_name}: '{key}' must not be NaN")
        return value
    if want == "str":
        if not isinstance(value, str):
            raise ProtocolError(f"{cls_name}: '{key}' must be a string, got {value!r}")
        return value
    if want in ("tuple[str, ...]", "list[str]"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ProtocolError(f"{cls_name}: '{key}' must be a list of strings, got {value!r}")
        return tuple(value)
    raise TypeError(f"{cls_name}.{f.name}: unsupported protocol field type {want}")


class _Message:
    """Shared encoding of the typed messages (a mixin for the dataclasses below)."""

    MESSAGE_TYPE: ClassVar[str]

    def to_record(self) -> Any:
        """The Flower ``RecordDict`` of this message."""
        from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

        config, records = {}, {}
        for f in fields(self):
            value = getattr(self, f.name)
            if _is_arrays(f):
                records[f.name] = ArrayRecord({k: Array(np.ascontiguousarray(np.asarray(v))) for k, v in value.items()})
            elif isinstance(value, tuple):
                config[_dashed(f.name)] = list(value)
            else:
                config[_dashed(f.name)] = value
        records[CONFIG] = ConfigRecord(config)
        return RecordDict(records)

    def as_reply(self, request: Any) -> Any:
        """This reply as the Flower ``Message`` answering ``request``."""
        from flwr.app import Message

        return Message(self.to_record(), reply_to=request)

    def as_request(self, dst_node_id: int, group_id: str, ttl: float) -> Any:
        """This request as a Flower ``Message`` to ``dst_node_id``."""
        from flwr.app import Message

        return Message(self.to_record(), dst_node_id=dst_node_id, message_type=self.MESSAGE_TYPE, group_id=group_id,
                       ttl=ttl)

    @classmethod
    def from_record(cls, content: Any) -> "_Message":
        """Decode a Flower ``RecordDict``; raises :class:`ProtocolError` unless it is exactly this message."""
        array_fields = [f for f in fields(cls) if _is_arrays(f)]
        scalar_fields = [f for f in fields(cls) if not _is_arrays(f)]
        want_records = {CONFIG} | {f.name for f in array_fields}
        got_records = set(content.keys())
        if got_records != want_records:
            raise ProtocolError(f"{cls.__name__}: records {sorted(got_records)} are not exactly {sorted(want_records)}")
        if CONFIG not in content.config_records:
            raise ProtocolError(f"{cls.__name__}: '{CONFIG}' is not a ConfigRecord")
        config = dict(content.config_records[CONFIG])
        want_keys = {_dashed(f.name) for f in scalar_fields}
        unknown, missing = sorted(set(config) - want_keys), sorted(want_keys - set(config))
        if unknown or missing:
            raise ProtocolError(f"{cls.__name__}: settings do not follow the protocol (unknown: {unknown}, "
                                f"missing: {missing})")
        values: dict[str, Any] = {f.name: _check_scalar(cls.__name__, f, config[_dashed(f.name)])
                                  for f in scalar_fields}
        for f in array_fields:
            if f.name not in content.array_records:
                raise ProtocolError(f"{cls.__name__}: '{f.name}' is not an ArrayRecord")
            values[f.name] = {k: v.numpy() for k, v in content.array_records[f.name].items()}
        return cls(**values)

    @classmethod
    def from_message(cls, msg: Any) -> "_Message":
        if msg.metadata.message_type != cls.MESSAGE_TYPE:
            raise ProtocolError(f"expected a {cls.MESSAGE_TYPE} message, got {msg.metadata.message_type}")
        return cls.from_record(msg.content)

    def num_bytes(self) -> int:
        """Bytes of array payload plus 8 per scalar (what the report counts as sent)."""
        total = 0
        for f in fields(self):
            value = getattr(self, f.name)
            total += sum(np.asarray(v).nbytes for v in value.values()) if _is_arrays(f) else 8
        return total


def reply_declarations(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (kind, why)} of a reply class; every field of every reply must have one."""
    return {f.name: (f.metadata.get("kind", ""), f.metadata.get("why", "")) for f in fields(cls)}


# ================================================================================================
# query.info: the published schema and policy of a site
# ================================================================================================

@dataclass(frozen=True)
class InfoRequest(_Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_INFO


@dataclass(frozen=True)
class InfoReply(_Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_INFO
    site_name: str = declared("public", "the name the site's operator gave it in site.yaml")
    channels: int = declared("public", "image schema the site publishes so that a run can agree on it")
    height: int = declared("public", "image schema the site publishes")
    width: int = declared("public", "image schema the site publishes")
    classes: tuple[str, ...] = declared("public", "class names the site publishes (its folder names / label "
                                                  "list), never how many records each holds")
    delta_bound: float = declared("public", "an upper bound of the site's delta: its configured delta, or "
                                            "DEFAULT_DELTA_BOUND when it uses the default min(1e-5, 1/(10 n))")
    modes: tuple[str, ...] = declared("public", "the synthesis modes the site's operator allows")
    evaluation: bool = declared("public", "whether the operator allows DP federated evaluation")
    audits: bool = declared("public", "whether the operator allows DP privacy audits")
    queries_per_run: int = declared("public", "the operator's cap on evaluation and audit queries per run")


DEFAULT_DELTA_BOUND = 1e-5  # the default delta min(1e-5, 1/(10 n)) is at most this


# ================================================================================================
# DP-GAN mode
# ================================================================================================

@dataclass(frozen=True)
class GanTrainRequest(_Message):
    """One federated round of the DP-GAN. The site decides its own noise; the coordinator only says how
    much work it asks for and the most epsilon the run may spend at each site."""

    MESSAGE_TYPE: ClassVar[str] = TRAIN_GAN
    experiment: str  # run id: the site keys its state and ledger entries by it
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


@dataclass(frozen=True)
class GanTrainReply(_Message):
    MESSAGE_TYPE: ClassVar[str] = TRAIN_GAN
    generator: Arrays = arrays(kind="dp", why="G is trained only through the DP-SGD-trained discriminator: "
                                              "post-processing of this round's DP-SGD steps")
    weight: float = declared("dp", "FedAvg weight: the sum of the site's per-run noisy class histogram "
                                   "(Gaussian, z = CENSUS_NOISE, charged with the site's first round)")
    g_loss: float = declared("dp", "mean generator loss: a function of G, of the DP discriminator and of "
                                   "labels drawn from the DP histogram (post-processing)")


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


@dataclass(frozen=True)
class BnTrainRequest(BnPlanSettings, _Message):
    MESSAGE_TYPE: ClassVar[str] = TRAIN_BNNET
    server_round: int
    net: Arrays = arrays()  # the shared net's state_dict


@dataclass(frozen=True)
class BnTrainReply(_Message):
    MESSAGE_TYPE: ClassVar[str] = TRAIN_BNNET
    net: Arrays = arrays(kind="dp", why="the shared net after this round's DP-SGD steps (post-processing)")
    weight: float = declared("dp", "FedAvg weight: sum of the per-run noisy class histogram (z = CENSUS_NOISE)")


@dataclass(frozen=True)
class BnStatsRequest(BnPlanSettings, _Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_BNSTATS
    net: Arrays = arrays()


@dataclass(frozen=True)
class BnStatsReply(_Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_BNSTATS
    stats: Arrays = arrays(kind="dp", why="one Gaussian release of noisy class counts and clipped per-class "
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
class EvaluationRequest(_Message):
    MESSAGE_TYPE: ClassVar[str] = EVALUATE_CLASSIFIER
    experiment: str
    learner: str
    channels: int
    height: int
    width: int
    num_classes: int
    classifier: Arrays = arrays()  # the central learner's state_dict


@dataclass(frozen=True)
class EvaluationReply(_Message):
    MESSAGE_TYPE: ClassVar[str] = EVALUATE_CLASSIFIER
    counts: Arrays = arrays(kind="dp", why="'table' (K, 2): per true class, noisy numbers of held-out records "
                                           "classified right / wrong; one record is one cell (sensitivity 1), "
                                           "Gaussian z = EVALUATION_NOISE, charged before it is computed")


@dataclass(frozen=True)
class AuditRequest(_Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_AUDIT
    experiment: str
    synthetic: Arrays = arrays()  # "images" (N, C, H, W) float32 in [0, 1], N <= AUDIT_MAX_IMAGES


@dataclass(frozen=True)
class AuditReply(_Message):
    MESSAGE_TYPE: ClassVar[str] = QUERY_AUDIT
    histograms: Arrays = arrays(kind="dp", why="'train' and 'heldout' (B,): noisy counts of the site's records "
                                               "by the pixel MSE to their nearest synthetic image, over "
                                               "AUDIT_BIN_EDGES; one record is one bin of one histogram "
                                               "(sensitivity 1), Gaussian z = AUDIT_NOISE, charged first")


REPLY_TYPES: dict[str, type] = {c.MESSAGE_TYPE: c for c in (InfoReply, GanTrainReply, BnTrainReply, BnStatsReply,
                                                             EvaluationReply, AuditReply)}


# ================================================================================================
# Array specs: what the arrays of a message must look like
# ================================================================================================

@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str = "float32"


def _wire_shape(shape: Any) -> tuple[int, ...]:
    return tuple(shape) or (1,)  # Flower's arrays carry a 0-d tensor (a BatchNorm step counter) as (1,)


def state_spec(state_dict: Mapping[str, Any]) -> dict[str, ArraySpec]:
    """One float32 array per entry of a model's state_dict, of the same shape (0-d entries as (1,))."""
    return {k: ArraySpec(_wire_shape(v.shape)) for k, v in state_dict.items()}


def state_arrays(module: Any) -> dict[str, np.ndarray]:
    """A torch module's state_dict as the float32 arrays a message carries."""
    return {k: v.detach().cpu().float().numpy().reshape(_wire_shape(v.shape)) for k, v in module.state_dict().items()}


def load_state(module: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Load arrays checked against :func:`state_spec` into ``module`` (shapes and dtypes restored)."""
    import torch

    ref = module.state_dict()
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(arrays[k])).reshape(v.shape).to(v.dtype)
                            for k, v in ref.items()})


def check_arrays(named: Mapping[str, np.ndarray], spec: Mapping[str, ArraySpec]) -> list[str]:
    """Problems of an array record against its spec; empty when it is exactly what the protocol allows.

    Checks the names are exactly the expected ones, every shape and dtype, and that every value is finite.
    """
    problems: list[str] = []
    extra, missing = sorted(set(named) - set(spec)), sorted(set(spec) - set(named))
    if extra:
        problems.append(f"undeclared arrays {extra[:5]}")
    if missing:
        problems.append(f"missing arrays {missing[:5]}")
    for name, want in spec.items():
        if name not in named:
            continue
        arr = np.asarray(named[name])
        if tuple(arr.shape) != want.shape:
            problems.append(f"array '{name}' has shape {tuple(arr.shape)}, expected {want.shape}")
        elif str(arr.dtype) != want.dtype:
            problems.append(f"array '{name}' has dtype {arr.dtype}, expected {want.dtype}")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"array '{name}' contains NaN or inf")
    return problems


def evaluation_spec(num_classes: int) -> dict[str, ArraySpec]:
    return {"table": ArraySpec((num_classes, 2))}


def audit_spec() -> dict[str, ArraySpec]:
    bins = len(AUDIT_BIN_EDGES) - 1
    return {"train": ArraySpec((bins,)), "heldout": ArraySpec((bins,))}
