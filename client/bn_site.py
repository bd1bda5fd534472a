"""Site side of the BN-statistics mode: federated DP-SGD of the shared net, then one DP statistics release.

The site fixes its whole plan at the run's first request (``train.bnnet`` round 1, or ``query.bnstats``
when the coordinator provides the net and no site trains it):
- the statistics release alone (with ``layer-clips = auto``: together with the DP choice of its clip
  bounds, ``client.auto_clip``) is calibrated to ``stats-share x epsilon`` (to the whole epsilon when
  the coordinator provides the net);
- the DP-SGD noise of the planned ``net-rounds x local-steps`` steps is then the smallest that keeps
  both together within the run's epsilon (RDP composition);
- and everything the dataset has ever released plus this plan must fit the site's own budget.
The coordinator never sets the noise. Re-sent requests get the reply already released (no new spend).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from client.auto_clip import AUTO_CLIP_NOISE_MULTIPLIER, choose_layer_clips
from client.bnstats import record_class_statistics
from client.dpsgd import train_dpsgd_local
from client.ledger import BudgetExceeded, PrivacyLedger
from client.requests import (
    Refusal, atomic_write_json, check_useful_noise, load_cached_reply, load_fixed_plan, open_request, refuse,
    safe_name, save_cached_reply,
)
from client.site import SiteSettings, ledger_path, resolve_site, site_delta
from common import protocol as P
from common.accounting import BudgetTooSmall, DPEvent, calibrate_noise_multiplier, epsilon_for
from common.bnnet import BNNet, norm_layer_names
from common.data import ImageDataset
from common.device import pick_device

log = logging.getLogger("fedsynth.site")
PLAN_KEYS = ("net-rounds", "local-steps", "batch-size", "max-grad-norm", "epsilon", "stats-share", "layer-clips")
AUTO = "auto"


def _auto_clip(cfg: dict) -> bool:
    return str(cfg["layer-clips"]).strip() == AUTO


def _plan(site: SiteSettings, data: ImageDataset, ledger: PrivacyLedger, cfg: dict, run_dir: Path) -> dict:
    path = run_dir / "bn-plan.json"
    asked = {k: cfg[k] for k in PLAN_KEYS}
    plan = load_fixed_plan(path, asked)
    if plan is not None:
        return plan
    rounds, steps, batch = int(cfg["net-rounds"]), int(cfg["local-steps"]), int(cfg["batch-size"])
    share = float(cfg["stats-share"])
    if rounds < 0 or steps < 1 or batch < 1 or not 0 < share <= 1 or not float(cfg["max-grad-norm"]) > 0:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"invalid BN-statistics plan {asked}")
    n = len(data)
    q, delta, total_steps = min(1.0, batch / n), site_delta(site, n), rounds * steps
    prior = [DPEvent.from_dict(e) for entry in ledger.entries() for e in entry["events"]]
    spent = ledger.spent().epsilon
    asked_eps = float(cfg["epsilon"])
    target = asked_eps if math.isfinite(asked_eps) else max(site.epsilon_budget - spent, 0.0)
    private = math.isfinite(target)
    clip_events = [DPEvent(AUTO_CLIP_NOISE_MULTIPLIER, 1.0, 1)] if private and _auto_clip(cfg) else []
    if not private:
        sigma_stats = sigma_train = 0.0  # non-private: only possible when the site's budget is inf
    else:
        try:
            # with a coordinator-provided net (no DP-SGD rounds) the statistics get the whole epsilon
            stats_target = share * target if total_steps else target
            sigma_stats = calibrate_noise_multiplier(stats_target, delta, 1.0, 1, prior=clip_events)
            sigma_train = (calibrate_noise_multiplier(target, delta, q, total_steps,
                                                      prior=[*clip_events, DPEvent(sigma_stats, 1.0, 1)])
                           if total_steps else 0.0)
        except BudgetTooSmall as err:
            raise Refusal(P.REFUSED_BUDGET, f"epsilon {target:g} cannot pay for this plan: {err}") from None
    check_useful_noise(sigma_stats, "statistics release")
    check_useful_noise(sigma_train, f"{rounds} rounds x {steps} DP-SGD steps of the shared net")
    events = ([*clip_events, DPEvent(sigma_stats, 1.0, 1)]
              + ([DPEvent(sigma_train, q, total_steps)] if total_steps else []))
    after = epsilon_for(prior + events, delta)
    if after > site.epsilon_budget + 1e-9:
        raise Refusal(P.REFUSED_BUDGET, f"this run would take the site to epsilon {after:.3g}; it has spent "
                                        f"{spent:.3g} of its budget {site.epsilon_budget:g} (remaining "
                                        f"{max(site.epsilon_budget - spent, 0):.3g}); ask for less epsilon or fewer rounds")
    plan = {"asked": asked, "sigma_stats": sigma_stats, "sigma_train": sigma_train, "sample_rate": q, "delta": delta,
            "sigma_clip_choice": clip_events[0].noise_multiplier if clip_events else None,
            "planned_epsilon_run": epsilon_for(events, delta), "epsilon_budget": site.epsilon_budget}
    atomic_write_json(path, plan)
    log.info("[%s] planned BN-statistics run: sigma_train=%.3f (q=%.4f, %d steps), sigma_stats=%.3f -> run epsilon %.3f",
             site.name, sigma_train, q, total_steps, sigma_stats, plan["planned_epsilon_run"])
    return plan


def _setup(msg: Message, context: Context):
    """Common checks of both requests; returns (site, cfg, data, ledger, run_dir, net)."""
    site = resolve_site(context.node_config, context.run_config)
    cfg, data = open_request(msg, site, "bnstats", P.BN_REQUEST_KEYS, P.REQ_NET, "shared net")
    c, h, w = data.image_shape
    if (int(cfg["channels"]), int(cfg["image-size"]), int(cfg["num-classes"])) != (c, h, data.num_classes) or h != w:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the run expects {cfg['channels']}x{cfg['image-size']}^2 images in "
                                             f"{cfg['num-classes']} classes; this site holds {c}x{h}x{w}, {data.num_classes}")
    net = BNNet(c, data.num_classes, h, int(cfg["width"]), head_norm=bool(cfg["head-norm"]))
    try:
        net.load_state_dict(msg.content.array_records[P.REQ_NET].to_torch_state_dict())
    except (RuntimeError, KeyError) as err:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the net sent does not match the run's shape: {str(err)[:300]}") from None
    ledger = PrivacyLedger(ledger_path(site, data), epsilon_budget=site.epsilon_budget, delta=site_delta(site, len(data)))
    run_dir = site.state_dir / "runs" / safe_name(str(cfg["experiment"]))
    return site, cfg, data, ledger, run_dir, net


def _clip_bounds(cfg: dict, net: BNNet) -> float | dict[str, float] | None:
    """One flat bound, one per norm layer (in the net's layer order) when ``layer-clips`` lists them, or
    None for ``auto`` (chosen privately from the data just before the release)."""
    raw = str(cfg["layer-clips"]).strip()
    if not raw:
        return float(cfg["clip"])
    if raw == AUTO:
        return None
    layers = norm_layer_names(net)
    try:
        bounds = [float(b) for b in raw.split(",")]
    except ValueError:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"layer-clips must be numbers, got {raw!r}") from None
    if len(bounds) != len(layers) or not all(b > 0 for b in bounds):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"layer-clips needs {len(layers)} positive bounds for the layers "
                                             f"{layers}, got {raw!r}")
    return dict(zip(layers, bounds))


def handle_train_bnnet(msg: Message, context: Context) -> Message:
    site_name = "site"
    try:
        site, cfg, data, ledger, run_dir, net = _setup(msg, context)
        site_name = site.name
        rnd, rounds = int(cfg["server-round"]), int(cfg["net-rounds"])
        if not 1 <= rnd <= rounds:
            raise Refusal(P.REFUSED_BAD_REQUEST, f"round {rnd} is outside the run's 1..{rounds}")
        cached = run_dir / f"net-reply-round-{rnd}.pt"
        saved = load_cached_reply(cached)
        if saved is None:
            plan = _plan(site, data, ledger, cfg, run_dir)
            event = DPEvent(plan["sigma_train"], plan["sample_rate"], int(cfg["local-steps"]))
            try:
                spent = ledger.charge([event], purpose="bnstats-net", run=str(cfg["experiment"]), round=rnd)
            except BudgetExceeded as err:
                raise Refusal(P.REFUSED_BUDGET, str(err)) from None
            log.info("[%s] net round %d: DP-SGD on %d records (sigma=%.3f); epsilon now %.3f", site.name, rnd,
                     len(data), event.noise_multiplier, spent.epsilon)
            m = train_dpsgd_local(net, data, noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate,
                                  steps=event.steps, max_grad_norm=float(cfg["max-grad-norm"]), lr=float(cfg["lr"]),
                                  device=pick_device(str(context.run_config.get("device", "auto"))))
            metrics = {"num-examples": len(data), "epsilon": spent.epsilon, "delta": spent.delta,
                       "noise-multiplier": event.noise_multiplier, "sample-rate": event.sample_rate,
                       "local-steps": event.steps, "train-seconds": float(m.get("seconds", 0.0))}
            saved = {"net": {k: v.detach().cpu().float() for k, v in net.state_dict().items()}, "metrics": metrics}
            save_cached_reply(cached, saved)
        return Message(RecordDict({P.REPLY_NET: ArrayRecord(saved["net"]),
                                   P.REPLY_METRICS: MetricRecord({k: float(v) for k, v in saved["metrics"].items()
                                                                  if k in P.BNNET_REPLY_METRICS})}), reply_to=msg)
    except Refusal as err:
        return refuse(msg, site_name, err)


def handle_bnstats(msg: Message, context: Context) -> Message:
    site_name = "site"
    try:
        site, cfg, data, ledger, run_dir, net = _setup(msg, context)
        site_name = site.name
        cached = run_dir / "stats-reply.pt"
        saved = load_cached_reply(cached)
        if saved is None:
            clips = _clip_bounds(cfg, net)  # a malformed request is refused before anything is charged
            plan = _plan(site, data, ledger, cfg, run_dir)
            sigma, sigma_clip = plan["sigma_stats"], plan.get("sigma_clip_choice")
            events = ([DPEvent(sigma_clip, 1.0, 1)] if sigma_clip else []) + [DPEvent(sigma, 1.0, 1)]
            try:  # the clip-bound choice and the release: one ledger entry, charged before either runs
                spent = ledger.charge(events, purpose="bnstats-release", run=str(cfg["experiment"]),
                                      details={"clip": str(cfg["layer-clips"]).strip() or float(cfg["clip"]),
                                               "count-weight": float(cfg["count-weight"])})
            except BudgetExceeded as err:
                raise Refusal(P.REFUSED_BUDGET, str(err)) from None
            device = pick_device(str(context.run_config.get("device", "auto")))
            if clips is None and sigma > 0:
                clips = choose_layer_clips(net, data, noise_multiplier=sigma_clip, device=device)
                log.info("[%s] chose per-layer clip bounds privately (z=%.1f): %s", site.name, sigma_clip,
                         ", ".join(f"{k}={v:.3g}" for k, v in clips.items()))
            clip = clips if sigma > 0 else math.inf
            stats = record_class_statistics(net, data, clip_bound=clip, noise_multiplier=sigma,
                                            count_weight=float(cfg["count-weight"]), device=device)
            log.info("[%s] released DP class statistics (sigma=%.3f); epsilon now %.3f", site.name, sigma, spent.epsilon)
            saved = {"stats": {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in stats.items()},
                     "metrics": {"epsilon": spent.epsilon, "delta": spent.delta, "noise-multiplier": sigma}}
            save_cached_reply(cached, saved)
        arrays = ArrayRecord({k: Array(v.numpy()) for k, v in saved["stats"].items()})
        return Message(RecordDict({P.REPLY_STATS: arrays,
                                   P.REPLY_METRICS: MetricRecord({k: float(v) for k, v in saved["metrics"].items()})}),
                       reply_to=msg)
    except Refusal as err:
        return refuse(msg, site_name, err)
