"""Coordinator side of secure aggregation: one SecAgg+ sum of the sites' releases, through Flower 1.41.

Flower ships SecAgg+ only as a legacy workflow (``SecAggPlusWorkflow``) that reads its fit instructions
from a legacy ``Strategy`` inside a ``LegacyContext``. :func:`secure_sum` hides that: it takes one typed
request per site (``common.protocol``), wraps each into the legacy ``FitIns`` (``common.secure_wire``),
runs the four stages (setup, share keys, collect masked vectors, unmask) and returns only the unmasked
sum over the sites that took part -- the coordinator never holds any single site's release.

Dropouts: a site that stops answering during the aggregation is left out and its masks are removed with
its neighbours' shares while at least ``threshold`` of them answer; below that the aggregation fails,
nothing is summed, and the round counts as failed (the sites' charges for it stand, nothing is charged
again). A site's release goes into at most one masked vector, ever (``client.secure_site``): a site that sent
its vector (or got as far as marking it) refuses a second secure sum of the same release, since the difference
of two sums over different sites is one site's release alone. So a failed aggregation is not repeated with the
sites that sent vectors in it; sites that never reached that stage may still add theirs, and when too few
remain the reason says to start a new experiment (:func:`_already_summed_reason`).

Trust: the coordinator is honest-but-curious (it follows the protocol). Repeated aggregations of the same
round are refused by the sites (above); a coordinator that fakes sites can still unmask one site's vector.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from common import protocol as P
from common import secure_wire

log = logging.getLogger("fedsynth.coordinator")


@dataclass
class SecureSum:
    """The outcome of one secure aggregation."""

    total: list[np.ndarray] | None  # sum over the contributors of their summands; None when it failed
    contributors: list[int]  # nodes whose release is inside the total
    failures: dict[int, str] = field(default_factory=dict)  # node -> refusal text or "no reply"
    codes: dict[int, int] = field(default_factory=dict)  # node -> refusal code
    bytes_received: dict[int, int] = field(default_factory=dict)  # node -> bytes over the four stages
    reason: str = ""  # why it failed


def default_threshold(num_sites: int) -> int:
    """Shares needed to remove a dropped site's masks: two thirds of the sites (at least 2, below all)."""
    return max(2, min(num_sites - 1, math.ceil(2 * num_sites / 3)))


class _Proxy:
    """The one thing the workflow reads of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


def _strategy(fitins: dict[int, Any]):
    from flwr.server.strategy import Strategy

    class OneAggregation(Strategy):
        """The legacy Strategy the workflow asks for: our per-site instructions in, the sum out."""

        def __init__(self) -> None:
            self.results: list = []

        def initialize_parameters(self, client_manager):  # noqa: D102 - unused by the workflow
            return None

        def configure_fit(self, server_round, parameters, client_manager):  # noqa: D102
            return [(_Proxy(node), ins) for node, ins in fitins.items()]

        def aggregate_fit(self, server_round, results, failures):  # noqa: D102
            self.results = list(results)
            return (results[0][1].parameters if results else None), {}

        def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: D102
            return []

        def aggregate_evaluate(self, server_round, results, failures):  # noqa: D102
            return None, {}

        def evaluate(self, server_round, parameters):  # noqa: D102
            return None

    return OneAggregation()


def message_bytes(msg: Any) -> int:
    """Payload bytes of a Flower message: array data, bytes and lists of bytes, 8 per other value."""
    if not msg.has_content():
        return 0
    total = sum(len(a.data) for rec in msg.content.array_records.values() for a in rec.values())
    for rec in list(msg.content.config_records.values()) + list(msg.content.metric_records.values()):
        for v in rec.values():
            if isinstance(v, bytes):
                total += len(v)
            elif isinstance(v, list):
                total += sum(len(b) if isinstance(b, bytes) else 8 for b in v)
            else:
                total += 8
    return total


class _Recorder:
    """The Grid the workflow talks to: the real one, noting each site's refusals and bytes."""

    def __init__(self, grid: Grid, outcome: SecureSum) -> None:
        self.grid, self.outcome = grid, outcome

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self.outcome.failures[node] = reply.error.reason
                self.outcome.codes[node] = reply.error.code
            else:
                self.outcome.bytes_received[node] = self.outcome.bytes_received.get(node, 0) + message_bytes(reply)
        answered = {r.metadata.src_node_id for r in replies}
        for m in messages:
            if m.metadata.dst_node_id not in answered:
                self.outcome.failures.setdefault(m.metadata.dst_node_id, "no reply before the deadline")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def _already_summed_reason(outcome: SecureSum, request: P.Message) -> str:
    """What to say when sites refused because their release already went into a secure sum, or ""."""
    refused = sorted(n for n, why in outcome.failures.items() if P.ALREADY_SUMMED in why)
    if not refused:
        return ""
    what = request.MESSAGE_TYPE + (f" round {request.server_round}" if hasattr(request, "server_round") else "")
    return (f"{len(refused)} site(s) (node(s) {', '.join(map(str, refused))}) refused because their release for "
            f"{what} of experiment {request.experiment!r} already went into a secure sum (an earlier attempt of "
            "this aggregation reached them); "
            "a site never adds a release to a second sum, which would let the coordinator subtract the two and see "
            "one site's release alone. Retrying cannot bring them back: start a new experiment (a new run id) to "
            "repeat this release with them")


def _workflow_class():
    """Flower's SecAgg+ workflow class with the fix below, built at each call from the class Flower's module holds then
    (its server side imports on use; tests put a hostile coordinator's workflow there)."""
    from flwr.server.workflow import SecAggPlusWorkflow

    class Workflow(SecAggPlusWorkflow):
        """Flower's SecAgg+ workflow, with sites that left at the key-sharing stage no longer sampled."""

        def share_keys_stage(self, grid, context, state) -> bool:
            ok = super().share_keys_stage(grid, context, state)
            # Flower 1.41 keeps a site that dropped out here among the sampled ones, and so lists it as dropped at
            # unmask, where no site holds shares of its secrets: every site refused (or, before, failed), and the
            # sum was lost after every site's charge (review s62). Its masks are in no vector (a site masks only with
            # the neighbours whose shares reached it), so it leaves the aggregation as if never sampled.
            state.sampled_node_ids = set(state.active_node_ids)
            return ok

    return Workflow


def secure_sum(grid: Grid, requests: dict[int, P.Message], *, round_label: int, timeout: float,
               threshold: int = 0) -> SecureSum:
    """Sum the sites' releases for ``requests`` (node -> typed request of ``P.SECURE_TASKS``) with SecAgg+."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerConfig

    nodes = sorted(requests)
    outcome = SecureSum(total=None, contributors=[])
    if len(nodes) < 3:
        outcome.reason = f"secure aggregation needs at least 3 sites, {len(nodes)} are connected"
        return outcome
    threshold = threshold or default_threshold(len(nodes))
    if 2 * threshold <= len(nodes):  # the sites refuse it (client.secure_site.secagg_problem): say why here
        outcome.reason = (f"the reconstruction threshold {threshold} must be more than half of the {len(nodes)} sites: "
                          "with half, a coordinator could reconstruct both secrets of one site; raise secure-threshold")
        return outcome
    strategy = _strategy({n: secure_wire.wrap_request(requests[n]) for n in nodes})
    base = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    ctx = LegacyContext(context=base, config=ServerConfig(num_rounds=1), strategy=strategy)
    ctx.state.config_records["config"] = ConfigRecord({"current_round": int(round_label)})
    ctx.state.array_records["parameters"] = ArrayRecord()
    workflow = _workflow_class()(num_shares=len(nodes), reconstruction_threshold=threshold, max_weight=1.0,
                                 clipping_range=P.SECAGG_CLIPPING_RANGE,
                                 quantization_range=P.SECAGG_QUANTIZATION_LEVELS, modulus_range=P.SECAGG_MODULUS,
                                 timeout=timeout)
    workflow(_Recorder(grid, outcome), ctx)
    summed = _already_summed_reason(outcome, requests[nodes[0]])
    if summed:
        log.warning("%s", summed)
    if not strategy.results:
        outcome.reason = (f"fewer than {threshold} sites (the reconstruction threshold) stayed in the secure "
                          f"aggregation of {len(nodes)}" + (f"; {summed}" if summed else ""))
        return outcome
    outcome.contributors = sorted(proxy.node_id for proxy, _ in strategy.results)
    mean = parameters_to_ndarrays(strategy.results[0][1].parameters)  # the workflow returns the mean
    outcome.total = [np.asarray(a, dtype=np.float64) * len(outcome.contributors) for a in mean]
    for node in outcome.contributors:
        outcome.failures.pop(node, None)
    return outcome
