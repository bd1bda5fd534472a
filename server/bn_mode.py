"""Coordinator side of the BN-statistics mode (seed 002 and its DP successor).

1. The shared GroupNorm net: trained across the sites with federated DP-SGD (``train.bnnet`` rounds,
   each site's steps in its ledger), or loaded from a file the coordinator provides (``bn-net``),
   in which case no site spends budget on it.
2. Every site releases DP class-wise statistics of the net's normalisation-layer inputs
   (``query.bnstats``); the coordinator pools them exactly (sums add) into class-wise means/variances.
3. Images are synthesized by optimising noise so each class batch matches the pooled statistics layer
   by layer, plus the net's class loss and image priors (``server.bnsynth.synthesize``).
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import protocol as P
from common.bnnet import BNNet
from common.config import RunConfig
from common.data import ImageDataset
from server.aggregate import accept_reply
from server.bnsynth import pool_statistics, synthesize
from server.fedavg import FedAvgTask, RunFailed, SiteRecord, run_fedavg_rounds, timed
from server.rounds import broadcast, quorum_size

log = logging.getLogger("fedsynth.coordinator")


def bn_request(cfg: RunConfig, image_shape: tuple[int, int, int], num_classes: int, experiment: str,
               rnd: int) -> ConfigRecord:
    c, h, _ = image_shape
    return ConfigRecord({
        "experiment": experiment, "server-round": rnd, "net-rounds": 0 if cfg.bn_net else cfg.bn_rounds,
        "local-steps": cfg.bn_local_steps, "batch-size": cfg.bn_batch_size, "max-grad-norm": cfg.bn_max_grad_norm,
        "lr": cfg.bn_lr, "epsilon": cfg.epsilon, "stats-share": cfg.bn_stats_share, "clip": cfg.bn_clip,
        "count-weight": cfg.bn_count_weight, "seed": cfg.seed, "channels": c, "image-size": h,
        "num-classes": num_classes, "width": cfg.bn_width, "head-norm": cfg.bn_head_norm,
        "layer-clips": cfg.bn_layer_clips,
    })


def collect_statistics(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], net: BNNet, num_classes: int,
                       make_config, experiment: str) -> list[dict[str, np.ndarray]]:
    """One query.bnstats to every site; the releases that follow the protocol (quorum enforced)."""
    spec = P.bnstats_spec(net, num_classes)
    nodes = sorted(grid.get_node_ids())
    ex = broadcast(grid, {P.REQ_NET: ArrayRecord(net.state_dict()), P.REQ_CONFIG: make_config(experiment, 0)},
                   P.QUERY_BNSTATS, "stats", cfg.round_timeout, nodes)
    releases = []
    for reply in ex.ok:
        node = reply.metadata.src_node_id
        site = sites.setdefault(node, SiteRecord(node, f"node-{node}"))
        update, why = accept_reply(reply, P.REPLY_STATS, spec, P.BNSTATS_REPLY_METRICS, weighted=False)
        if update is None:
            log.warning("rejected the statistics of %s: %s", site.name, why)
            site.rounds_failed["stats"] = f"rejected: {why}"
            continue
        releases.append(update.arrays)
        site.epsilon, site.delta = update.metrics["epsilon"], update.metrics["delta"]
        site.bytes_sent += update.bytes_received
    for reply in ex.errors:
        node = reply.metadata.src_node_id
        sites.setdefault(node, SiteRecord(node, f"node-{node}")).rounds_failed["stats"] = (reply.error.reason or "")[:300]
    for node in ex.missing:
        sites.setdefault(node, SiteRecord(node, f"node-{node}")).rounds_failed["stats"] = "no reply before the deadline"
    need = quorum_size(len(nodes), cfg.quorum)
    if len(releases) < need:
        raise RunFailed(f"only {len(releases)} site(s) released statistics, the quorum is {need}; see the site "
                        "errors above (budget refusals, data errors or timeouts)")
    return releases


def run_bnstats(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], image_shape: tuple[int, int, int],
                classes: tuple[str, ...], out_dir: Path, timings: dict,
                device: torch.device) -> tuple[ImageDataset, list[dict], str]:
    """BN-statistics mode end to end; returns (synthetic set, per-round history, experiment id)."""
    c, h, w = image_shape
    if h != w:
        raise RunFailed(f"the shared net needs square images, the sites hold {h}x{w}; set image-size")
    torch.manual_seed(cfg.seed)
    net = BNNet(c, len(classes), h, cfg.bn_width, head_norm=cfg.bn_head_norm)

    def make_config(experiment: str, rnd: int) -> ConfigRecord:
        return bn_request(cfg, image_shape, len(classes), experiment, rnd)

    if cfg.bn_net:
        try:
            net.load_state_dict(torch.load(cfg.bn_net, map_location="cpu", weights_only=True))
        except (OSError, RuntimeError) as err:
            raise RunFailed(f"cannot use the net file '{cfg.bn_net}' (bn-net): {err}. It must be the state_dict "
                            f"of BNNet({c}, {len(classes)}, {h}, width={cfg.bn_width}, head_norm={cfg.bn_head_norm})") from None
        history, experiment = [], cfg.experiment or uuid.uuid4().hex[:12]
        log.info("using the coordinator's net %s: no site spends budget on it", cfg.bn_net)
    else:
        task = FedAvgTask("shared net", P.TRAIN_BNNET, P.REQ_NET, P.REPLY_NET, P.BNNET_REPLY_METRICS, make_config)
        history, experiment = run_fedavg_rounds(grid, cfg, sites, net, task, cfg.bn_rounds, out_dir, timings)
    torch.save(net.state_dict(), out_dir / "bn_net.pt")
    net.eval()
    with timed(timings, "statistics"):
        releases = collect_statistics(grid, cfg, sites, net, len(classes), make_config, experiment)
        pooled = pool_statistics(releases)
    log.info("pooled statistics of %d site(s); synthesizing %d images", len(releases), cfg.synthetic_size)
    with timed(timings, "synthesis"):
        k = len(classes)
        per_class = [cfg.synthetic_size // k + (1 if i < cfg.synthetic_size % k else 0) for i in range(k)]
        synth = synthesize(net.to(device), pooled, per_class, iterations=cfg.bn_iterations,
                           batch_size=cfg.bn_synth_batch, lr=cfg.bn_synth_lr, w_stats=cfg.bn_w_stats,
                           w_ce=cfg.bn_w_ce, w_tv=cfg.bn_w_tv, w_l2=cfg.bn_w_l2, seed=cfg.seed, device=device,
                           progress=cfg.progress, classes=classes)
    return synth, history, experiment
