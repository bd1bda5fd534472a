"""The federated-averaging round loop both modes use (generator rounds, shared-net rounds).

Each round: send the model to every connected site, collect replies until the deadline, keep those that
follow the protocol, and average them -- weighted by each site's noisy record total (its census, a DP
release) -- once a quorum replied. An atomic checkpoint after every round lets a restarted coordinator
resume after the last completed one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from common import secure_wire
from common.progress import progress
from server.checkpoint import load_checkpoint, save_checkpoint
from server.collect import broadcast, quorum_size
from server.run_state import RunState
from server.secure_agg import secure_sum
from server.sites import RunFailed, SiteRecord, record_failures

log = logging.getLogger("fedsynth.coordinator")


@dataclass
class FedAvgTask:
    """What one kind of federated round sends and expects back (train.gan or train.bnnet)."""

    label: str  # "generator" / "shared net", for logs and the report
    reply_cls: type  # protocol reply class
    model_field: str  # the reply's array field holding the model
    make_request: Callable[[int, dict[str, np.ndarray]], Any]  # (round, model arrays) -> protocol request
    check_reply: Callable[[Any], list[str]] = lambda reply: []  # problems with a reply's other fields
    keep_rounds: int = 1  # the accepted replies of this many last aggregated rounds are kept (FedAvgOutcome.recent)
    # a second array field of the replies averaged the same way (the DP-GAN's discriminators): its average over the
    # last aggregated round's replies goes to the next request as make_request(round, model arrays, average), {} at
    # first; "" = none, make_request(round, model arrays)
    companion: str = ""


def companion_average(task: FedAvgTask, replies: dict[int, Any]) -> dict[str, np.ndarray]:
    """The weighted average of ``task.companion`` over ``replies`` (node -> accepted reply) that carry one; {} if none."""
    carried = [r for r in replies.values() if getattr(r, task.companion, None)]
    if not carried:
        return {}
    return weighted_average([getattr(r, task.companion) for r in carried], [r.weight for r in carried])


@dataclass
class FedAvgOutcome:
    """What the rounds leave besides the averaged model (updated in place)."""

    history: list[dict]  # one entry per round
    recent: list[dict[int, Any]]  # node -> accepted reply, of the last ``FedAvgTask.keep_rounds`` rounds that
    #                               reached their quorum, oldest first

    @property
    def last_replies(self) -> dict[int, Any]:
        """node -> accepted reply of the last round that reached its quorum."""
        return self.recent[-1] if self.recent else {}


def weighted_average(states: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    """FedAvg: parameters averaged with weights proportional to each site's (noisy) record total."""
    if not states:
        raise ValueError("nothing to average")
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {k: sum(wi * s[k].astype(np.float64) for wi, s in zip(w, states)).astype(np.float32) for k in states[0]}


def _no_budget_left(rnd: int, failures: dict[int, str]) -> None:
    reasons = "; ".join(list(failures.values())[:3])
    raise RunFailed(f"every site refused round {rnd} for lack of privacy budget, so no later round "
                    f"can succeed either: {reasons}")


def _plain_round(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], task: FedAvgTask, request: Any, rnd: int,
                 nodes: list[int], spec: dict) -> tuple[dict | None, dict, dict[int, Any]]:
    """Every site's model in the clear, averaged here: (average or None, history entry, accepted replies)."""
    got = broadcast(grid, request, task.reply_cls, str(rnd), cfg.round_timeout, nodes,
                    check=lambda r: P.check_arrays(getattr(r, task.model_field), spec)
                    + ([] if r.weight >= 1 else ["weight must be >= 1"]) + task.check_reply(r))
    for node, reply in got.replies.items():
        site = sites.setdefault(node, SiteRecord(node, f"node-{node}"))
        site.weight = reply.weight
        site.note_release(task.label, got.bytes_received[node])
        site.rounds_ok.append(rnd)
    record_failures(sites, got.failures, rnd)
    if got.all_refused(P.REFUSED_BUDGET):
        _no_budget_left(rnd, got.failures)
    accepted = list(got.replies.values())
    entry = {"accepted": len(accepted), "errors": len(got.codes), "missing": len(got.missing)}
    if not accepted:
        return None, entry, {}
    losses = [getattr(r, "g_loss", None) for r in accepted]
    if all(v is not None for v in losses):
        entry["g-loss"] = float(np.mean(losses))
    # the DP-GAN schedule each site chose from its noisy census: D steps a round, G steps per D step
    for field, key in (("local_steps", "local-steps"), ("g_steps", "g-steps")):
        taken = {sites[n].name: int(getattr(r, field)) for n, r in got.replies.items() if getattr(r, field, 0)}
        if taken:
            entry[key] = taken
    averaged = weighted_average([getattr(r, task.model_field) for r in accepted], [r.weight for r in accepted])
    return averaged, entry, dict(got.replies)


def _secure_round(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], task: FedAvgTask, request: Any, rnd: int,
                  nodes: list[int], spec: dict) -> tuple[dict | None, dict, dict[int, Any]]:
    """The same weighted average computed with SecAgg+: the coordinator sees only sum(w x) and sum(w)."""
    got = secure_sum(grid, {n: request for n in nodes}, round_label=rnd, timeout=cfg.round_timeout,
                     threshold=cfg.secure_threshold)
    for node in got.contributors:
        site = sites.setdefault(node, SiteRecord(node, f"node-{node}"))
        site.note_release(f"{task.label} (secure sum)", got.bytes_received.get(node, 0))
        site.rounds_ok.append(rnd)
    record_failures(sites, got.failures, rnd)
    if not got.contributors and got.codes and all(c == P.REFUSED_BUDGET for c in got.codes.values()) \
            and len(got.codes) == len(nodes):
        _no_budget_left(rnd, got.failures)
    entry = {"accepted": len(got.contributors), "errors": len(got.codes),
             "missing": len(set(got.failures) - set(got.codes)), "secure": True}
    if got.total is None:
        log.warning("round %d: the secure aggregation failed: %s", rnd, got.reason)
        entry["secure-failure"] = got.reason
        return None, entry, {}
    averaged = secure_wire.from_sum(request.MESSAGE_TYPE, list(spec), got.total)
    problems = P.check_arrays(averaged, spec)
    if problems:
        raise RunFailed(f"the secure sum of round {rnd} does not have the model's shape: {problems[:3]}")
    return averaged, entry, {}


def run_fedavg_rounds(grid: Grid, cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord], model: torch.nn.Module,
                      task: FedAvgTask, num_rounds: int) -> FedAvgOutcome:
    """Federated rounds on ``model`` (updated in place); the per-round history and the last accepted replies."""
    ckpt_path = run.out_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None and ckpt.get("task") != task.label:
        raise RunFailed(f"{ckpt_path} belongs to a run of another mode; use a new out-dir or resume=false")
    history, start, recent = [], 1, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        history, start = ckpt["history"], ckpt["round"] + 1
        # (a checkpoint written before "recent" existed holds the last round's replies only)
        recent = ckpt["recent"] if "recent" in ckpt else [ckpt["last_replies"]] if ckpt.get("last_replies") else []
        for node, saved in ckpt["sites"].items():
            if node in sites:
                sites[node].__dict__.update({k: v for k, v in saved.items() if k not in ("node_id", "name")})
        log.info("resuming experiment %s from the checkpoint after round %d", run.experiment, ckpt["round"])
    spec = P.state_spec(model.state_dict())
    bar = progress(total=num_rounds, desc=f"{task.label} rounds", unit="round", enabled=cfg.progress, leave=True)
    bar.update(start - 1)
    for rnd in range(start, num_rounds + 1):
        with run.timed("rounds"):
            t0 = time.perf_counter()
            nodes = sorted(grid.get_node_ids())
            log.info("round %d/%d: sending the %s to %d site(s)%s", rnd, num_rounds, task.label, len(nodes),
                     " for a secure sum" if cfg.secure_aggregation else "")
            extra = (companion_average(task, recent[-1] if recent else {}),) if task.companion else ()
            request = task.make_request(rnd, P.state_arrays(model), *extra)
            need = quorum_size(len(nodes), cfg.quorum)
            step = _secure_round if cfg.secure_aggregation else _plain_round
            averaged, entry, replies = step(grid, cfg, sites, task, request, rnd, nodes, spec)
            entry = {"round": rnd, "contacted": len(nodes), **entry, "quorum": need}
            if averaged is not None and entry["accepted"] >= need:
                P.load_state(model, averaged)
                recent = (recent + [replies])[-max(1, task.keep_rounds):]
                entry["aggregated"] = True
            else:
                entry["aggregated"] = False
                log.warning("round %d: only %d valid repl(ies), quorum is %d; the %s is kept unchanged",
                            rnd, entry["accepted"], need, task.label)
            entry["seconds"] = time.perf_counter() - t0
            history.append(entry)
            log.info("round %d/%d: %d accepted, %d refused, %d missing (%.1f s)", rnd, num_rounds, entry["accepted"],
                     entry["errors"], entry["missing"], entry["seconds"])
            save_checkpoint(ckpt_path, {"round": rnd, "model": model.state_dict(), "history": history,
                                        "experiment": run.experiment, "task": task.label,
                                        "sites": {n: s.__dict__.copy() for n, s in sites.items()},
                                        "recent": recent})  # the last round's replies: recent[-1]
            bar.set_postfix(accepted=f"{entry['accepted']}/{len(nodes)}")
            bar.update(1)
    bar.close()
    if num_rounds and not any(h.get("aggregated") for h in history):
        raise RunFailed(f"no round reached its quorum, so the {task.label} was never trained; see the site errors "
                        "above (budget refusals, data errors or timeouts)")
    return FedAvgOutcome(history, recent)
