"""BN-statistics mode at the coordinator.

1. The shared GroupNorm net: trained across the sites with federated DP-SGD (``train.bnnet`` rounds,
   each site's steps in its ledger), or loaded from a file the coordinator provides (``bn-net``), in
   which case no site spends budget on it.
2. Every site releases DP class-wise statistics of the net's normalisation-layer inputs
   (``query.bnstats``); the coordinator pools them exactly (sums add) into class-wise means/variances.
3. Images are synthesized by optimising noise so each class batch matches the pooled statistics layer
   by layer, plus the net's class loss and image priors (``server.bnsynth.synthesize``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.serverapp import Grid

from common import protocol as P
from common import secure_wire
from common.bnnet import BNNet, BNNetShape, load_net_file, net_file_payload, norm_layer_channels
from common.config import RunConfig
from common.data import ImageDataset
from server.bnsynth import pool_statistics, synthesize
from server.collect import broadcast, quorum_size
from server.fedavg import FedAvgTask, run_fedavg_rounds
from server.run_state import RunState
from server.secure_agg import default_threshold, secure_sum
from server.sites import RunFailed, Schema, SiteRecord, record_failures
from server.synthesis import class_mix_note, class_sizes

log = logging.getLogger("fedsynth.coordinator")


def noise_shares(cfg: RunConfig, num_sites: int) -> int:
    """Sites that are always inside the secure sum: SecAgg+ fails below its reconstruction threshold."""
    return cfg.secure_threshold or default_threshold(num_sites)


def plan_settings(cfg: RunConfig, schema: Schema, experiment: str, num_sites: int = 1) -> dict:
    """The settings both BN requests carry (``protocol.BnPlanSettings``)."""
    return dict(experiment=experiment, net_rounds=0 if cfg.bn_net else cfg.bn_rounds, local_steps=cfg.bn_local_steps,
                batch_size=cfg.bn_batch_size, max_grad_norm=cfg.bn_max_grad_norm, lr=cfg.bn_lr, epsilon=cfg.epsilon,
                stats_share=cfg.bn_stats_share, clip=cfg.bn_clip, layer_clips=cfg.bn_layer_clips,
                count_weight=cfg.bn_count_weight, seed=cfg.seed, channels=schema.channels, image_size=schema.height,
                num_classes=len(schema.classes), width=cfg.bn_width, head_norm=cfg.bn_head_norm,
                resolution=cfg.bn_resolution,
                noise_shares=noise_shares(cfg, num_sites) if cfg.distributed_noise else 1)


def collect_statistics(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], net: BNNet,
                       settings: dict) -> list[dict[str, np.ndarray]]:
    """One query.bnstats to every site; the releases that follow the protocol (quorum enforced)."""
    layout = P.stats_layout(norm_layer_channels(net), settings["num_classes"])
    spec = {k: P.ArraySpec(shape) for k, shape in layout.items()}
    nodes = sorted(grid.get_node_ids())
    arrays = P.state_arrays(net)
    if cfg.secure_aggregation:
        return [_secure_statistics(grid, cfg, sites, P.BnStatsRequest(**settings, net=arrays), nodes, spec)]
    got = broadcast(grid, P.BnStatsRequest(**settings, net=arrays), P.BnStatsReply, "stats", cfg.round_timeout,
                    nodes, check=lambda r: P.check_arrays(r.stats, spec))
    for node, reply in got.replies.items():
        sites.setdefault(node, SiteRecord(node, f"node-{node}")).note_release("class statistics",
                                                                               got.bytes_received[node])
    record_failures(sites, got.failures, "stats")
    need = quorum_size(len(nodes), cfg.quorum)
    if len(got.replies) < need:
        raise RunFailed(f"only {len(got.replies)} site(s) released statistics, the quorum is {need}; see the site "
                        "errors above (budget refusals, data errors or timeouts)")
    return [got.replies[n].stats for n in sorted(got.replies)]


def _secure_statistics(grid: Grid, cfg: RunConfig, sites: dict[int, SiteRecord], request: P.BnStatsRequest,
                       nodes: list[int], spec: dict) -> dict[str, np.ndarray]:
    """The sites' statistics releases added up with SecAgg+: the coordinator sees only the pooled sums."""
    got = secure_sum(grid, {n: request for n in nodes}, round_label=0, timeout=cfg.round_timeout,
                     threshold=cfg.secure_threshold)
    for node in got.contributors:
        sites.setdefault(node, SiteRecord(node, f"node-{node}")).note_release(
            "class statistics (secure sum)", got.bytes_received.get(node, 0))
    record_failures(sites, got.failures, "stats")
    need = quorum_size(len(nodes), cfg.quorum)
    if got.total is None or len(got.contributors) < need:
        raise RunFailed(f"the secure sum of the statistics did not reach the quorum of {need} site(s): "
                        f"{got.reason or f'{len(got.contributors)} took part'}; see the site errors above")
    pooled = secure_wire.from_sum(P.QUERY_BNSTATS, list(spec), got.total)
    problems = P.check_arrays({k: v.astype(np.float32) for k, v in pooled.items()}, spec)
    if problems:
        raise RunFailed(f"the secure sum of the statistics does not have the release's layout: {problems[:3]}")
    log.info("pooled the statistics of %d site(s) with secure aggregation (quantization step %g per value)",
             len(got.contributors), P.SECAGG_STEP)
    return pooled


def _shared_net(grid: Grid, cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord], schema: Schema,
                settings: dict) -> tuple[BNNet, list[dict]]:
    shape = BNNetShape(schema.channels, len(schema.classes), schema.height, cfg.bn_width, cfg.bn_head_norm,
                       cfg.bn_resolution)
    shape.validate()
    if cfg.bn_net:
        try:
            net, side = load_net_file(cfg.bn_net, shape)
        except ValueError as err:
            raise RunFailed(f"cannot use bn-net: {err}") from None
        if side is None:
            log.warning("the net file %s records no side (written before net files did): it is taken to work at "
                        "this run's %d pixels; if it was trained at another, set bn-resolution to that side",
                        cfg.bn_net, net.shape.side)
        log.info("using the coordinator's net %s: no site spends budget on it", cfg.bn_net)
        return net, []
    torch.manual_seed(cfg.seed)
    net = shape.build()
    task = FedAvgTask("shared net", P.BnTrainReply, "net",
                      lambda rnd, arrays: P.BnTrainRequest(**settings, server_round=rnd, net=arrays))
    return net, run_fedavg_rounds(grid, cfg, run, sites, net, task, cfg.bn_rounds).history


def collect_and_synthesize(grid: Grid, cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord], schema: Schema,
                           device: torch.device) -> tuple[ImageDataset, list[dict], dict]:
    """The shared net's rounds, the statistics release, then the synthetic set; and how it was made."""
    if schema.height != schema.width:
        raise RunFailed(f"the shared net needs square images, the sites hold {schema.height}x{schema.width}; "
                        "set image-size")
    settings = plan_settings(cfg, schema, run.experiment, len(sites))
    net, history = _shared_net(grid, cfg, run, sites, schema, settings)
    torch.save(net_file_payload(net), run.out_dir / "bn_net.pt")  # a net file: usable as bn-net
    net.eval()
    with run.timed("statistics"):
        pooled = pool_statistics(collect_statistics(grid, cfg, sites, net, settings))
    log.info("pooled statistics of %d site(s); synthesizing %d images", pooled.num_sites, cfg.synthetic_size)
    with run.timed("synthesis"):
        sizes = class_sizes(pooled.counts[None, :], cfg.synthetic_size, cfg.synthetic_class_mix)  # (K,)
        per_class = sizes.tolist()
        synth = synthesize(net.to(device), pooled, per_class, iterations=cfg.bn_iterations,
                           batch_size=cfg.bn_synth_batch, lr=cfg.bn_synth_lr, w_stats=cfg.bn_w_stats,
                           w_ce=cfg.bn_w_ce, w_tv=cfg.bn_w_tv, w_l2=cfg.bn_w_l2, seed=cfg.seed, device=device,
                           progress=cfg.progress, classes=schema.classes)
    return synth, history, {"from": "statistics", "why": "images optimised to match the pooled DP class-wise "
                                                         "statistics of the shared net",
                            "class-mix": class_mix_note(cfg.synthetic_class_mix, sizes, census_held=True)}
