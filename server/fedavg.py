"""The federated-averaging round loop both modes use (generator rounds, shared-net rounds)."""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from server.aggregate import accept_reply, weighted_average
from server.checkpoint import load_checkpoint, save_checkpoint
from server.rounds import broadcast, quorum_size

log = logging.getLogger("fedsynth.coordinator")


class RunFailed(RuntimeError):
    """The run cannot continue; the message says why and what to do."""


@dataclass
class SiteRecord:
    node_id: int
    name: str
    examples: int = 0
    epsilon: float = 0.0
    delta: float = 0.0
    bytes_sent: int = 0
    rounds_ok: list[int] = field(default_factory=list)
    rounds_failed: dict[int, str] = field(default_factory=dict)  # round -> why (error, timeout, rejected)


def timed(timings: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t
    return _T()


@dataclass
class FedAvgTask:
    """What one kind of federated round sends and expects back (train.gan or train.bnnet)."""

    label: str  # "generator" / "shared net", for logs
    message_type: str
    request_key: str
    reply_key: str
    allowed_metrics: dict[str, str]
    make_config: Callable[[str, int], ConfigRecord]  # (experiment, round) -> request settings


def run_fedavg_rounds(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], model: torch.nn.Module,
                      task: FedAvgTask, num_rounds: int, out_dir: Path, timings: dict) -> tuple[list[dict], str]:
    """Federated rounds on ``model`` (updated in place); returns the per-round history and the experiment id.

    Each round: send the model to every connected site, collect replies until the deadline, keep those
    that follow the protocol, and average them (weighted by record count) once a quorum replied. An
    atomic checkpoint after every round lets a restarted coordinator resume after the last one.
    """
    ckpt_path = out_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    if ckpt is not None and ckpt.get("message_type") != task.message_type:
        raise RunFailed(f"{ckpt_path} belongs to a run of another mode; use a new out-dir or resume=false")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        history, experiment, start = ckpt["history"], ckpt["experiment"], ckpt["round"] + 1
        for node, saved in ckpt["sites"].items():
            if node in sites:
                sites[node].__dict__.update({k: v for k, v in saved.items() if k not in ("node_id", "name")})
        log.info("resuming experiment %s from checkpoint after round %d", experiment, ckpt["round"])
    else:
        history, experiment, start = [], cfg.experiment or uuid.uuid4().hex[:12], 1
    spec = {k: P.ArraySpec(tuple(v.shape), "float32") for k, v in model.state_dict().items()}
    for rnd in range(start, num_rounds + 1):
        with timed(timings, "rounds"):
            t0 = time.perf_counter()
            nodes = sorted(grid.get_node_ids())
            log.info("round %d/%d: sending the %s to %d site(s)", rnd, num_rounds, task.label, len(nodes))
            ex = broadcast(grid, {task.request_key: ArrayRecord(model.state_dict()),
                                  P.REQ_CONFIG: task.make_config(experiment, rnd)},
                           task.message_type, str(rnd), cfg.round_timeout, nodes)
            accepted = []
            for reply in ex.ok:
                update, why = accept_reply(reply, task.reply_key, spec, task.allowed_metrics)
                node = reply.metadata.src_node_id
                site = sites.setdefault(node, SiteRecord(node, f"node-{node}"))
                if update is None:
                    log.warning("round %d: rejected the reply of %s: %s", rnd, site.name, why)
                    site.rounds_failed[rnd] = f"rejected: {why}"
                    continue
                accepted.append(update)
                site.examples = int(update.metrics["num-examples"])
                site.epsilon = update.metrics["epsilon"]
                site.delta = update.metrics["delta"]
                site.bytes_sent += update.bytes_received
                site.rounds_ok.append(rnd)
            for reply in ex.errors:
                node = reply.metadata.src_node_id
                sites.setdefault(node, SiteRecord(node, f"node-{node}")).rounds_failed[rnd] = (reply.error.reason or "")[:300]
            for node in ex.missing:
                sites.setdefault(node, SiteRecord(node, f"node-{node}")).rounds_failed[rnd] = "no reply before the deadline"
            if not accepted and ex.errors and not ex.missing and all(
                    r.error.code == P.REFUSED_BUDGET for r in ex.errors):
                reasons = "; ".join((r.error.reason or "")[:200] for r in ex.errors[:3])
                raise RunFailed(f"every site refused round {rnd} for lack of privacy budget, so no later round "
                                f"can succeed either: {reasons}")
            need = quorum_size(len(nodes), cfg.quorum)
            entry = {"round": rnd, "contacted": len(nodes), "accepted": len(accepted), "errors": len(ex.errors),
                     "missing": len(ex.missing), "quorum": need}
            if len(accepted) >= need:
                model.load_state_dict({k: torch.from_numpy(v) for k, v in weighted_average(accepted).items()})
                entry["aggregated"] = True
                for key in ("d-loss", "g-loss"):
                    if all(key in u.metrics for u in accepted):
                        entry[key] = float(np.mean([u.metrics[key] for u in accepted]))
            else:
                entry["aggregated"] = False
                log.warning("round %d: only %d valid repl(ies), quorum is %d; the %s is kept unchanged",
                            rnd, len(accepted), need, task.label)
            entry["seconds"] = time.perf_counter() - t0
            history.append(entry)
            log.info("round %d: %d accepted, %d errors, %d missing (%.1f s)", rnd, len(accepted), len(ex.errors),
                     len(ex.missing), entry["seconds"])
            save_checkpoint(ckpt_path, {"round": rnd, "model": model.state_dict(), "history": history,
                                        "experiment": experiment, "message_type": task.message_type,
                                        "sites": {n: s.__dict__.copy() for n, s in sites.items()}})
    if num_rounds and not any(h.get("aggregated") for h in history):
        raise RunFailed(f"no round reached its quorum, so the {task.label} was never trained; see the site errors "
                        "above (budget refusals, data errors or timeouts)")
    return history, experiment


