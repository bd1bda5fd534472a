"""The coordinator: a Flower ServerApp with its own round loop.

Per round: send the global generator to every site (``train.gan``), wait until the deadline, keep the
replies that follow the protocol, and average them weighted by record count once a quorum replied;
then checkpoint atomically. At the end: sample a labelled synthetic set, train the unchanged central
learner on it, evaluate it on real held-out data and write the report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import protocol as P
from common.config import RunConfig
from common.data import DataError, ImageDataset, load_dataset
from common.device import pick_device
from common.learner import evaluate_learner, train_learner
from common.models import GanShape, Generator
from server.fedavg import FedAvgTask, RunFailed, SiteRecord, run_fedavg_rounds, timed
from server.bn_mode import run_bnstats
from server.federated_eval import federated_evaluate
from server.site_audits import request_site_audits
from server.report import privacy_statement, write_report
from server.rounds import broadcast
from server.synthesis import sample_generator, save_synthetic

log = logging.getLogger("fedsynth.coordinator")
app = ServerApp()


def discover_sites(grid: Grid, cfg: RunConfig) -> tuple[dict[int, SiteRecord], tuple[int, int, int], tuple[str, ...]]:
    """Ask every connected site for its data schema; all must agree (shape, classes)."""
    nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise RunFailed("no site is connected; start the sites (fedsynth site) before the run")
    ex = broadcast(grid, {P.REQ_CONFIG: ConfigRecord({})}, P.QUERY_INFO, "info", cfg.round_timeout, nodes)
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
        "lr-d": cfg.gan_lr_d, "lr-g": cfg.gan_lr_g,
        "d-width": cfg.gan_d_width, "ac-weight": cfg.gan_ac_weight, "mode-seeking": cfg.gan_mode_seeking,
        "class-histogram": cfg.gan_class_histogram,
        "epsilon": cfg.epsilon, "delta": cfg.delta, "seed": cfg.seed,
        "channels": shape.channels, "image-size": shape.image_size, "num-classes": shape.num_classes,
        "latent-dim": shape.latent_dim, "width": shape.width,
    })


def run_dpgan(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], shape: GanShape, out_dir: Path,
              timings: dict, device: torch.device, classes: tuple[str, ...]) -> tuple[ImageDataset, list[dict], str]:
    """DP-GAN mode: federated generator rounds, then sampling of the synthetic set."""
    torch.manual_seed(cfg.seed)
    gen = Generator(shape)
    task = FedAvgTask("generator", P.TRAIN_GAN, P.REQ_GENERATOR, P.REPLY_GENERATOR, P.GAN_REPLY_METRICS,
                      lambda experiment, rnd: _gan_request(cfg, shape, experiment, rnd))
    history, experiment = run_fedavg_rounds(grid, cfg, sites, gen, task, cfg.num_rounds, out_dir, timings)
    with timed(timings, "synthesis"):
        synth = sample_generator(gen, classes, cfg.synthetic_size, seed=cfg.seed, device=device,
                                 progress=cfg.progress)
        torch.save(gen.state_dict(), out_dir / "generator.pt")
    return synth, history, experiment


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
    with timed(timings, "discover"):
        sites, (c, h, w), classes = discover_sites(grid, cfg)
    if h != w:
        raise RunFailed(f"the GAN needs square images, the sites hold {h}x{w}; set image-size")
    log.info("%d site(s): %s; images %dx%dx%d, %d classes; mode %s, epsilon %s per site",
             len(sites), ", ".join(s.name for s in sites.values()), c, h, w, len(classes), cfg.mode, cfg.epsilon)
    if cfg.mode == "dpgan":
        synth, history, experiment = run_dpgan(grid, cfg, sites, cfg.gan_shape(c, h, len(classes)), out_dir,
                                               timings, device, classes)
    else:
        synth, history, experiment = run_bnstats(grid, cfg, sites, (c, h, w), classes, out_dir, timings, device)
    synth_info = save_synthetic(synth, out_dir)
    learner_cfg = cfg.learner_config()
    utility: dict = {}
    with timed(timings, "learner_synthetic"):
        model = train_learner(synth, learner_cfg, device=device, desc="learner on synthetic", progress=cfg.progress)
        torch.save(model.state_dict(), out_dir / "classifier.pt")
    test = _load_optional(cfg.test_data, "test", cfg)
    if test is not None:
        with timed(timings, "evaluate"):
            res = evaluate_learner(model, test, device=device)
        utility.update({"tstr_accuracy": res["accuracy"], "per_class_accuracy": res["per_class_accuracy"],
                        "mcc": res["mcc"], "confusion": res["confusion"], "num_test": res["num_test"]})
        log.info("TSTR accuracy (learner trained on synthetic, tested on real): %.4f", res["accuracy"])
        if cfg.real_baseline:
            real = _load_optional(cfg.data, "train", cfg)
            with timed(timings, "learner_real"):
                real_model = train_learner(real, learner_cfg, device=device, desc="learner on real", progress=cfg.progress)
                real_res = evaluate_learner(real_model, test, device=device)
            utility.update({"real_accuracy": real_res["accuracy"], "real_per_class_accuracy": real_res["per_class_accuracy"],
                            "real_mcc": real_res["mcc"],
                            "ratio": res["accuracy"] / real_res["accuracy"] if real_res["accuracy"] else float("nan")})
            log.info("same learner on the real pooled data: %.4f (ratio %.3f)", real_res["accuracy"], utility["ratio"])
    with timed(timings, "federated_evaluation"):
        fed_eval = federated_evaluate(grid, model, learner_cfg.name, (c, h, w), len(classes),
                                      {n: s.name for n, s in sites.items()}, cfg.round_timeout)
    audits: dict = {}
    if cfg.audits:
        with timed(timings, "site_audits"):
            audits = request_site_audits(grid, synth, {n: s.name for n, s in sites.items()},
                                         max_records=cfg.audit_records, seed=cfg.seed, timeout=cfg.round_timeout)
    timings["total"] = time.perf_counter() - t_start
    site_rows = [{"name": s.name, "node_id": s.node_id, "epsilon": s.epsilon, "delta": s.delta,
                  "examples": s.examples, "bytes_sent": s.bytes_sent, "rounds_ok": s.rounds_ok,
                  "rounds_failed": {str(k): v for k, v in s.rounds_failed.items()},
                  "dropped": bool(s.rounds_failed)} for s in sorted(sites.values(), key=lambda s: s.name)]
    report = {
        "mode": cfg.mode, "private": cfg.private, "epsilon_target": cfg.epsilon, "delta": cfg.delta,
        "privacy_statement": privacy_statement(cfg.private, cfg.epsilon, site_rows, cfg.mode),
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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Grid poll otherwise
    run_coordinator(grid, context)
