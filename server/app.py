"""The coordinator: a Flower ServerApp with its own round loop.

Per round: send the global generator to every site (``train.gan``), wait until the deadline, keep the
replies that follow the protocol, and average them weighted by record count once a quorum replied;
then checkpoint atomically. At the end: sample a labelled synthetic set, train the unchanged central
learner on it, evaluate it on real held-out data and write the report.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from common import protocol as P
from common.config import RunConfig
from common.data import DataError, ImageDataset, load_dataset
from common.device import pick_device
from common.learner import evaluate_learner, train_learner
from common.models import GanShape, Generator
from server.aggregate import accept_gan_reply, weighted_average
from server.federated_eval import federated_evaluate
from server.site_audits import request_site_audits
from server.checkpoint import load_checkpoint, save_checkpoint
from server.report import privacy_statement, write_report
from server.rounds import quorum_size, send_collect
from server.synthesis import sample_generator, save_synthetic

log = logging.getLogger("fedsynth.coordinator")
app = ServerApp()


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


def _timed(timings: dict, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t
    return _T()


def discover_sites(grid: Grid, cfg: RunConfig) -> tuple[dict[int, SiteRecord], tuple[int, int, int], tuple[str, ...]]:
    """Ask every connected site for its data schema; all must agree (shape, classes)."""
    nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise RunFailed("no site is connected; start the sites (fedsynth site) before the run")
    msgs = [Message(RecordDict({P.REQ_CONFIG: ConfigRecord({})}), dst_node_id=n, message_type=P.QUERY_INFO,
                    group_id="info", ttl=cfg.round_timeout + 60) for n in nodes]
    ex = send_collect(grid, msgs, cfg.round_timeout)
    if not ex.ok:
        reasons = "; ".join((r.error.reason or "").strip()[:300] for r in ex.errors[:3])
        raise RunFailed("no site answered the schema query; check the sites' logs (data path, config)"
                        + (f". Sites said: {reasons}" if reasons else ""))
    schemas = {}
    sites: dict[int, SiteRecord] = {}
    for reply in ex.ok:
        info = reply.content.config_records[P.REPLY_INFO]
        shape = (int(info["channels"]), int(info["height"]), int(info["width"]))
        schemas[reply.metadata.src_node_id] = (shape, tuple(str(c) for c in info["classes"]))
        sites[reply.metadata.src_node_id] = SiteRecord(reply.metadata.src_node_id, str(info["site-name"]))
    distinct = set(schemas.values())
    if len(distinct) > 1:
        detail = "; ".join(f"{sites[n].name}: {s[0]} {len(s[1])} classes" for n, s in schemas.items())
        raise RunFailed(f"sites disagree on the data schema ({detail}); every site must hold images of the same "
                        "shape and class list (set image-size / channels in the site configs)")
    shape, classes = distinct.pop()
    return sites, shape, classes


def _gan_request(cfg: RunConfig, shape: GanShape, experiment: str, rnd: int) -> ConfigRecord:
    return ConfigRecord({
        "experiment": experiment, "server-round": rnd, "num-rounds": cfg.num_rounds,
        "local-steps": cfg.gan_local_steps, "batch-size": cfg.gan_batch_size, "max-grad-norm": cfg.gan_max_grad_norm,
        "lr-d": cfg.gan_lr_d, "lr-g": cfg.gan_lr_g, "epsilon": cfg.epsilon, "delta": cfg.delta, "seed": cfg.seed,
        "channels": shape.channels, "image-size": shape.image_size, "num-classes": shape.num_classes,
        "latent-dim": shape.latent_dim, "width": shape.width,
    })


def run_dpgan_rounds(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], shape: GanShape,
                     out_dir: Path, timings: dict) -> tuple[Generator, list[dict], str]:
    """The federated rounds; returns the final generator, the per-round history and the experiment id."""
    ckpt_path = out_dir / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    gen = Generator(shape)
    if ckpt is not None:
        gen.load_state_dict(ckpt["generator"])
        history, experiment, start = ckpt["history"], ckpt["experiment"], ckpt["round"] + 1
        for node, saved in ckpt["sites"].items():
            if node in sites:
                sites[node].__dict__.update({k: v for k, v in saved.items() if k not in ("node_id", "name")})
        log.info("resuming experiment %s from checkpoint after round %d", experiment, ckpt["round"])
    else:
        history, experiment, start = [], cfg.experiment or uuid.uuid4().hex[:12], 1
    spec = P.generator_spec(gen.state_dict())
    for rnd in range(start, cfg.num_rounds + 1):
        with _timed(timings, "rounds"):
            t0 = time.perf_counter()
            nodes = sorted(grid.get_node_ids())
            arrays = ArrayRecord(gen.state_dict())
            msgs = [Message(RecordDict({P.REQ_GENERATOR: arrays, P.REQ_CONFIG: _gan_request(cfg, shape, experiment, rnd)}),
                            dst_node_id=n, message_type=P.TRAIN_GAN, group_id=str(rnd), ttl=cfg.round_timeout + 60)
                    for n in nodes]
            log.info("round %d/%d: sending the generator to %d site(s)", rnd, cfg.num_rounds, len(nodes))
            ex = send_collect(grid, msgs, cfg.round_timeout)
            accepted = []
            for reply in ex.ok:
                update, why = accept_gan_reply(reply, spec)
                site = sites.setdefault(reply.metadata.src_node_id, SiteRecord(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}"))
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
            need = quorum_size(len(nodes), cfg.quorum)
            entry = {"round": rnd, "contacted": len(nodes), "accepted": len(accepted), "errors": len(ex.errors),
                     "missing": len(ex.missing), "quorum": need}
            if len(accepted) >= need:
                gen.load_state_dict({k: torch.from_numpy(v) for k, v in weighted_average(accepted).items()})
                entry["aggregated"] = True
                entry["d-loss"] = float(np.mean([u.metrics.get("d-loss", 0.0) for u in accepted]))
                entry["g-loss"] = float(np.mean([u.metrics.get("g-loss", 0.0) for u in accepted]))
            else:
                entry["aggregated"] = False
                log.warning("round %d: only %d valid repl(ies), quorum is %d; the generator is kept unchanged",
                            rnd, len(accepted), need)
            entry["seconds"] = time.perf_counter() - t0
            history.append(entry)
            log.info("round %d: %d accepted, %d errors, %d missing (%.1f s)", rnd, len(accepted), len(ex.errors),
                     len(ex.missing), entry["seconds"])
            save_checkpoint(ckpt_path, {"round": rnd, "generator": gen.state_dict(), "history": history,
                                        "experiment": experiment,
                                        "sites": {n: s.__dict__.copy() for n, s in sites.items()}})
    if not any(h.get("aggregated") for h in history):
        raise RunFailed("no round reached its quorum, so the generator was never trained; see the site errors "
                        "above (budget refusals, data errors or timeouts)")
    return gen, history, experiment


def _load_optional(source: str, split: str, cfg: RunConfig) -> ImageDataset | None:
    if not source:
        return None
    try:
        return load_dataset(source, split, image_size=cfg.image_size or None, label_from=cfg.label_from or None)
    except DataError as err:
        raise RunFailed(f"cannot load {split} data '{source}' named in the run config: {err}") from None


def run_coordinator(grid: Grid, context: Context) -> dict:
    """Everything the coordinator does in one run; returns the report (also written to out-dir)."""
    cfg = RunConfig.from_mapping(context.run_config)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    if cfg.mode != "dpgan":
        raise RunFailed(f"mode '{cfg.mode}' is not available in this coordinator build")
    with _timed(timings, "discover"):
        sites, (c, h, w), classes = discover_sites(grid, cfg)
    if h != w:
        raise RunFailed(f"the GAN needs square images, the sites hold {h}x{w}; set image-size")
    shape = cfg.gan_shape(c, h, len(classes))
    log.info("%d site(s): %s; images %dx%dx%d, %d classes; mode %s, epsilon %s per site",
             len(sites), ", ".join(s.name for s in sites.values()), c, h, w, len(classes), cfg.mode, cfg.epsilon)
    gen, history, experiment = run_dpgan_rounds(grid, cfg, sites, shape, out_dir, timings)

    with _timed(timings, "synthesis"):
        synth = sample_generator(gen, classes, cfg.synthetic_size, seed=cfg.seed, device=device)
        synth_info = save_synthetic(synth, out_dir)
        torch.save(gen.state_dict(), out_dir / "generator.pt")
    learner_cfg = cfg.learner_config()
    utility: dict = {}
    with _timed(timings, "learner_synthetic"):
        model = train_learner(synth, learner_cfg, device=device, desc="learner on synthetic")
        torch.save(model.state_dict(), out_dir / "classifier.pt")
    test = _load_optional(cfg.test_data, "test", cfg)
    if test is not None:
        with _timed(timings, "evaluate"):
            res = evaluate_learner(model, test, device=device)
        utility.update({"tstr_accuracy": res["accuracy"], "per_class_accuracy": res["per_class_accuracy"],
                        "mcc": res["mcc"], "confusion": res["confusion"], "num_test": res["num_test"]})
        log.info("TSTR accuracy (learner trained on synthetic, tested on real): %.4f", res["accuracy"])
        if cfg.real_baseline:
            real = _load_optional(cfg.data, "train", cfg)
            with _timed(timings, "learner_real"):
                real_model = train_learner(real, learner_cfg, device=device, desc="learner on real")
                real_res = evaluate_learner(real_model, test, device=device)
            utility.update({"real_accuracy": real_res["accuracy"], "real_per_class_accuracy": real_res["per_class_accuracy"],
                            "real_mcc": real_res["mcc"],
                            "ratio": res["accuracy"] / real_res["accuracy"] if real_res["accuracy"] else float("nan")})
            log.info("same learner on the real pooled data: %.4f (ratio %.3f)", real_res["accuracy"], utility["ratio"])
    with _timed(timings, "federated_evaluation"):
        fed_eval = federated_evaluate(grid, model, learner_cfg.name, (c, h, w), len(classes),
                                      {n: s.name for n, s in sites.items()}, cfg.round_timeout)
    audits: dict = {}
    if cfg.audits:
        with _timed(timings, "site_audits"):
            audits = request_site_audits(grid, synth, {n: s.name for n, s in sites.items()},
                                         max_records=cfg.audit_records, seed=cfg.seed, timeout=cfg.round_timeout)
    timings["total"] = time.perf_counter() - t_start
    site_rows = [{"name": s.name, "node_id": s.node_id, "epsilon": s.epsilon, "delta": s.delta,
                  "examples": s.examples, "bytes_sent": s.bytes_sent, "rounds_ok": s.rounds_ok,
                  "rounds_failed": {str(k): v for k, v in s.rounds_failed.items()},
                  "dropped": bool(s.rounds_failed)} for s in sorted(sites.values(), key=lambda s: s.name)]
    report = {
        "mode": cfg.mode, "private": cfg.private, "epsilon_target": cfg.epsilon, "delta": cfg.delta,
        "privacy_statement": privacy_statement(cfg.private, cfg.epsilon, site_rows),
        "experiment": experiment, "num_rounds": cfg.num_rounds, "rounds": history, "sites": site_rows,
        "utility": utility, "federated_evaluation": fed_eval, "audits": audits,
        "synthetic": synth_info, "timings": timings, "config": cfg.to_flwr(),
        "device": str(device),
    }
    write_report(report, out_dir)
    log.info("wrote %s", out_dir / "report.json")
    return report


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_coordinator(grid, context)
