"""How the typed protocol rides on Flower's SecAgg+ (legacy FitIns / FitRes on message type "train").

Flower 1.41 runs SecAgg+ only through its legacy stack: the coordinator's workflow sends a ``FitIns``
(parameters: a list of arrays; config: scalars) with the third stage, the site's ``secaggplus_mod`` takes
the handler's ``FitRes`` parameters, masks them and adds them up. Here:

- :func:`wrap_request` / :func:`unwrap_request`: a typed request of ``common.protocol`` (``train.gan``,
  ``train.bnnet`` or ``query.bnstats``) <-> a ``FitIns`` carrying the same settings and its one array field
  (names in order in the config), so the site decodes exactly the request it would get in the clear;
- :func:`summand` / :func:`from_sum`: a typed reply -> the list of arrays the site adds (weight 1), and the
  coordinator's unmasked sum -> what the plain protocol would have given it after pooling:
    * FedAvg releases (generator, shared net): ``[w * x for each array] + [w]`` with w the site's noisy
      record total, so that sum(w x) / sum(w) is the same weighted average as in the clear. The same w goes into
      every round of a run, so a coordinator that sums one round over all sites and another without one site reads
      that site's w from the difference: w is the census total, a charged DP release on its own (README, Privacy);
    * the statistics release: its arrays as they are (the coordinator pools releases by adding them).

Where precision is lost: every value is clipped to +-``SECAGG_CLIPPING_RANGE`` and rounded stochastically
to a step of ``SECAGG_STEP`` (0.125) by Flower's quantizer. :func:`summand` checks the range so that
nothing is clipped silently (a release that outgrew it, a FedAvg model while it trained or a statistics release by
its sums, is clamped into it, with a warning in the site's log; :func:`check_room` and :func:`check_stats_room`
refuse, before the charge, a model that starts too close to it and statistics whose noise leaves no room); the
error of a sum of k sites has std <= sqrt(k) * step / 2 per value, on w * x, i.e. <= sqrt(k) * 0.0625 / sum(w) on an
averaged parameter (below 1e-4 for a few hundred records).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from common import protocol as P
from common.wire import quoted

INNER_TYPE = "fedsynth.message-type"  # config keys the wrapper adds to the request's own settings
INNER_FIELD = "fedsynth.array-field"
INNER_NAMES = "fedsynth.array-names"

log = logging.getLogger("fedsynth.site")

# Flower's SecAgg+ workflow and mod log every stage of every site at DEBUG; our own log says what matters.
if logging.getLogger("flwr").getEffectiveLevel() < logging.INFO:
    logging.getLogger("flwr").setLevel(logging.INFO)

_REQUESTS = {P.TRAIN_GAN: P.GanTrainRequest, P.TRAIN_BNNET: P.BnTrainRequest, P.QUERY_BNSTATS: P.BnStatsRequest}
_MODEL_FIELD = {P.TRAIN_GAN: "generator", P.TRAIN_BNNET: "net", P.QUERY_BNSTATS: "stats"}


class RangeError(ValueError):
    """A value the site would add lies outside the secure aggregation's range."""


ROOM = 1.0  # a secure round starts only where its weighted model is inside the range (one that outgrows it: summand)


def _largest_value(model: dict[str, Any]) -> float:
    """The largest absolute value of any array of ``model`` (0 for none; NaN or inf where one is not finite)."""
    return max((float(np.max(np.abs(a))) for a in model.values() if np.size(a)), default=0.0)


def check_room(weight: float, model: dict[str, Any]) -> None:
    """Raise RangeError where the model a FedAvg round starts from, weighted by the site's noisy total ``weight``
    (times ROOM), or the weight itself, leaves the range: called before the round's charge (review s60: a
    generator of large, finite weights passed every check, was charged and trained, and then failed at
    :func:`summand`, on every re-send; a site of some 280,000 records would do so with an honest generator)."""
    worst = _largest_value(model)
    if not np.isfinite(worst) or max(ROOM * weight * worst, weight) > P.SECAGG_CLIPPING_RANGE:  # (weight: the [w] entry)
        raise RangeError(f"the model sent (largest value {worst:.3g}), weighted by this site's FedAvg weight, would "
                         f"leave the secure aggregation's range +-{P.SECAGG_CLIPPING_RANGE:,.0f}")


def largest_weight(model: dict[str, Any]) -> float:
    """The largest FedAvg weight (a whole number, at most the range) :func:`check_room` accepts for ``model``."""
    worst = _largest_value(model)
    limit = P.SECAGG_CLIPPING_RANGE
    return float(limit if worst * ROOM <= 1.0 else np.floor(limit / (ROOM * worst)))


STATS_NOISE_ROOM = 8.0  # noise stds a secure statistics release must have room for: P(|N(0, 1)| > 8) ~ 1e-15


def check_stats_room(noise_stds: dict[str, float], record_bound: float) -> None:
    """Raise RangeError where a statistics release's noise (``noise_stds``, per key: public, from the plan, the clip
    bounds and the count weight) or one record's contribution (``record_bound``, its largest clip bound) would put
    its values outside the range whatever the records: called before the release's charge (review s61: a clip of
    1e6 or a count weight of 1e-6, both inside the recipe's ranges, gave noise of std 3e6, and the charged release
    then failed at every re-send). Its exact sums still grow with the record count: a noisy release outside the range
    because of them is clamped into it by :func:`summand` (post-processing)."""
    worst = STATS_NOISE_ROOM * max(noise_stds.values(), default=0.0) + record_bound
    if not np.isfinite(worst) or worst > P.SECAGG_CLIPPING_RANGE:
        raise RangeError(f"the statistics' noise (std up to {max(noise_stds.values()):.3g}) and one record's clip "
                         f"bound ({record_bound:.3g}) leave no room inside the secure aggregation's range "
                         f"+-{P.SECAGG_CLIPPING_RANGE:,.0f}: use smaller clip bounds or a larger count weight")


def wrap_request(request: P.Message) -> Any:
    """A typed request (one of ``P.SECURE_TASKS``) as the legacy ``FitIns`` SecAgg+ sends."""
    from flwr.common import FitIns, ndarrays_to_parameters

    if request.MESSAGE_TYPE not in _REQUESTS:
        raise ValueError(f"{request.MESSAGE_TYPE} cannot be aggregated securely; only {', '.join(_REQUESTS)}")
    record = request.to_record()
    carried = [name for name, arr in record.array_records.items() if len(arr)]
    if len(carried) != 1:  # the model alone travels (e.g. never a train.gan request's averaged discriminator)
        raise ValueError(f"a secure {request.MESSAGE_TYPE} request carries one model, this one carries {carried}")
    field = carried[0]
    arrays = record.array_records[field]
    names = list(arrays.keys())
    config = dict(record.config_records[P.CONFIG])
    config.update({INNER_TYPE: request.MESSAGE_TYPE, INNER_FIELD: field, INNER_NAMES: "\n".join(names)})
    return FitIns(parameters=ndarrays_to_parameters([arrays[n].numpy() for n in names]), config=config)


def unwrap_request(fitins: Any) -> P.Message:
    """The typed request inside a ``FitIns``; :class:`P.ProtocolError` unless it is exactly one."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
    from flwr.common import parameters_to_ndarrays

    config = dict(fitins.config)
    kind, field, names = config.pop(INNER_TYPE, None), config.pop(INNER_FIELD, None), config.pop(INNER_NAMES, None)
    if kind not in _REQUESTS or not isinstance(field, str) or not isinstance(names, str):
        raise P.ProtocolError(f"a secure aggregation must wrap one of {', '.join(_REQUESTS)}, got {quoted(kind)}")
    try:
        arrays = parameters_to_ndarrays(fitins.parameters)
    except Exception as err:  # noqa: BLE001 - hostile bytes: refuse, never crash
        raise P.ProtocolError(f"the wrapped arrays cannot be decoded: {type(err).__name__}") from None
    if any(not isinstance(a, np.ndarray) or a.dtype.kind not in "biuf" or a.dtype.itemsize == 0 for a in arrays):
        # (before anything handles them: numpy writes an array of a zero-size type, e.g. |V0, declared with 1e18
        # elements and carrying no bytes, in a Python loop over the declared count, which held the site for hours
        # when it was re-wrapped below: review s62)
        raise P.ProtocolError("the wrapped arrays are not all arrays of numbers")
    names_list = names.split("\n") if names else []
    if len(set(names_list)) != len(names_list):
        raise P.ProtocolError("the wrapped request names an array twice")
    if len(names_list) != len(arrays):
        raise P.ProtocolError(f"the wrapped request names {len(names_list)} arrays and carries {len(arrays)}")
    records = {P.CONFIG: ConfigRecord(config),
               field: ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in zip(names_list, arrays)})}
    for other in P.array_fields(_REQUESTS[kind]):  # the request's other array fields travel empty
        records.setdefault(other, ArrayRecord({}))
    return _REQUESTS[kind].from_record(RecordDict(records))


def summand(kind: str, reply: P.Message) -> list[np.ndarray]:
    """What a site adds to the secure sum for its typed ``reply`` to a ``kind`` request (see the module doc)."""
    field = getattr(reply, _MODEL_FIELD[kind])
    names = sorted(field) if kind == P.QUERY_BNSTATS else list(field)
    # A release that outgrew the range is brought into it: post-processing of its DP release, where failing here
    # would leave the charged release with no reply, at every re-send. A FedAvg model can outgrow it while it trains
    # (check_room saw it fit before the round's charge; a large learning rate can grow it: review s60); a statistics
    # release by its exact sums, which grow with the records (a class of n records at clip bound c reaches n c; a
    # hostile net can put every record at its bound: review s61), decided here on the noisy release alone.
    w, limit = float(getattr(reply, "weight", 1.0)), P.SECAGG_CLIPPING_RANGE
    if kind == P.QUERY_BNSTATS:
        out = [np.asarray(field[n], dtype=np.float64) for n in names]
    else:
        out = [w * np.asarray(field[n], dtype=np.float64) for n in names]
    if clamped := sum(int(np.count_nonzero(~(np.abs(a) <= limit))) for a in out):  # (NaN and inf included)
        log.warning("%d %svalues of the %s release are not finite or lie outside the secure sum's range: "
                    "brought into it (NaN to 0; the pooled result will be off where they are)", clamped,
                    "" if kind == P.QUERY_BNSTATS else "weighted ", kind)
        out = [np.clip(np.nan_to_num(a, nan=0.0, posinf=limit, neginf=-limit), -limit, limit) for a in out]
    if kind != P.QUERY_BNSTATS:
        out.append(np.array([w]))
    worst = max(float(np.max(np.abs(a))) if a.size else 0.0 for a in out)
    if not np.isfinite(worst) or worst > P.SECAGG_CLIPPING_RANGE:
        raise RangeError(f"a value of {worst:.3g} is outside the secure aggregation's range "
                         f"+-{P.SECAGG_CLIPPING_RANGE:g}")
    return out


def from_sum(kind: str, names: list[str], total: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The coordinator's view after unmasking ``total`` (the sum over the live sites of their summands):
    the weighted average model (FedAvg releases) or the pooled statistics (``query.bnstats``), by name.
    ``names`` are the model's state-dict names / the statistics layout's names, in the request's order."""
    if kind == P.QUERY_BNSTATS:
        return {n: np.asarray(a, dtype=np.float64) for n, a in zip(sorted(names), total)}
    *weighted, weight = total
    w = float(np.asarray(weight).ravel()[0])
    if not w > 0:
        raise ValueError(f"the sum of the sites' weights is {w:g}; no average can be formed")
    return {n: (np.asarray(a, dtype=np.float64) / w).astype(np.float32) for n, a in zip(names, weighted)}
