"""Site side of the DP-GAN mode: plan the run's noise, charge the ledger, train, reply with G only."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from client.dpgan import LocalGanTrainer, RoundSettings
from client.ledger import BudgetExceeded, PrivacyLedger
from client.requests import (
    Refusal, atomic_write_json, check_useful_noise, load_cached_reply, load_fixed_plan, open_request, refuse,
    safe_name, save_cached_reply,
)
from client.site import SiteSettings, ledger_path, resolve_site, site_delta
from common import protocol as P
from common.accounting import BudgetTooSmall, DPEvent, calibrate_noise_multiplier, epsilon_for
from common.data import ImageDataset
from common.device import pick_device
from common.models import GanShape, Generator

log = logging.getLogger("fedsynth.site")

# Noise multiplier of the site's one class-histogram release (sensitivity 1: a record adds 1 to one
# count). z = 20 is a count error of +-20 records, negligible next to MNIST-sized classes, and costs
# almost nothing next to the DP-SGD steps (at MNIST's q and 600 steps the DP-SGD sigma for epsilon 10
# does not change at all; alone it would be epsilon 0.18 at delta 1e-5).
CLASS_HISTOGRAM_NOISE = 20.0


def _gan_plan(site: SiteSettings, data: ImageDataset, ledger: PrivacyLedger, cfg: dict, run_dir: Path) -> dict:
    """This run's DP-SGD plan at this site: fixed at the run's first round, persisted, then enforced.

    sigma is the smallest noise such that (a) the planned rounds alone stay within the epsilon the run
    asks for and (b) everything this dataset has ever released plus the planned rounds stays within the
    site's own budget. The coordinator never sets the noise. With ``class-histogram`` the plan also holds
    one Gaussian class-histogram release (:data:`CLASS_HISTOGRAM_NOISE`), counted in (a) and (b).
    """
    path = run_dir / "gan-plan.json"
    asked = {k: cfg[k] for k in ("num-rounds", "local-steps", "batch-size", "max-grad-norm", "class-histogram")}
    plan = load_fixed_plan(path, asked)
    if plan is not None:
        return plan
    n = len(data)
    rounds, steps, batch = int(cfg["num-rounds"]), int(cfg["local-steps"]), int(cfg["batch-size"])
    if rounds < 1 or steps < 1 or batch < 1 or not float(cfg["max-grad-norm"]) > 0:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"rounds, steps, batch size and clipping bound must be positive: {asked}")
    q = min(1.0, batch / n)
    delta = site_delta(site, n)
    asked_eps = float(cfg["epsilon"])
    prior = [DPEvent.from_dict(e) for entry in ledger.entries() for e in entry["events"]]
    histogram = [DPEvent(CLASS_HISTOGRAM_NOISE, 1.0, 1)] if bool(cfg["class-histogram"]) else []
    try:
        sigma_run = calibrate_noise_multiplier(asked_eps, delta, q, rounds * steps, prior=histogram)
        sigma_budget = calibrate_noise_multiplier(site.epsilon_budget, delta, q, rounds * steps, prior=prior + histogram)
    except BudgetTooSmall as err:
        raise Refusal(P.REFUSED_BUDGET, f"{rounds} rounds x {steps} steps do not fit the site's budget "
                                        f"(spent {ledger.spent().epsilon:.3g} of {site.epsilon_budget:g}): {err}") from None
    sigma = max(sigma_run, sigma_budget)
    check_useful_noise(sigma, f"{rounds} rounds x {steps} DP-SGD steps")
    plan = {"asked": asked, "noise_multiplier": sigma, "sample_rate": q, "delta": delta,
            "histogram_noise": CLASS_HISTOGRAM_NOISE if histogram else 0.0,
            "planned_epsilon_run": epsilon_for(histogram + [DPEvent(sigma, q, rounds * steps)], delta),
            "epsilon_budget": site.epsilon_budget}
    atomic_write_json(path, plan)
    log.info("[%s] planned DP-SGD for run: sigma=%.4f q=%.4f steps=%d -> run epsilon %.3f (delta %.2g)",
             site.name, sigma, q, rounds * steps, plan["planned_epsilon_run"], delta)
    return plan


def _check_shape(cfg: dict, data: ImageDataset, generator_state: dict) -> GanShape:
    c, h, w = data.image_shape
    shape = GanShape(channels=int(cfg["channels"]), image_size=int(cfg["image-size"]),
                     num_classes=int(cfg["num-classes"]), latent_dim=int(cfg["latent-dim"]), width=int(cfg["width"]))
    if (shape.channels, shape.image_size, shape.image_size, shape.num_classes) != (c, h, w, data.num_classes):
        raise Refusal(P.REFUSED_BAD_REQUEST,
                      f"the run expects {shape.channels}x{shape.image_size}x{shape.image_size} images in "
                      f"{shape.num_classes} classes but this site holds {c}x{h}x{w} in {data.num_classes} classes")
    expected = P.generator_spec(Generator(shape).state_dict())
    got = {k: v for k, v in generator_state.items()}
    problems = P.validate_reply({k: v.numpy() for k, v in got.items()}, {}, expected, {})
    if problems:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the generator sent does not match the run's GAN shape: {problems[:3]}")
    return shape


HISTOGRAM_FILE = "class-histogram.json"


def _class_histogram(plan: dict, data: ImageDataset, run_dir: Path) -> tuple[list[float] | None, bool]:
    """(this run's noisy class counts at the site, whether they were drawn just now).

    Read back if already drawn, else drawn now from OS entropy: (K,) counts + N(0, z^2) each; (None,
    False) when the run asked for no histogram. The histogram never leaves the site as such: it only
    decides which labels G's steps draw here. A fresh draw must be charged (once) by the caller together
    with the round's DP-SGD steps, before anything trained with it is sent, then saved.
    """
    z = float(plan.get("histogram_noise", 0.0))
    if z <= 0:
        return None, False
    path = run_dir / HISTOGRAM_FILE
    if path.exists():
        return [float(v) for v in json.loads(path.read_text())["noisy-counts"]], False
    counts = np.bincount(data.labels, minlength=data.num_classes).astype(np.float64)  # (K,)
    noisy = counts + np.random.default_rng().normal(0.0, z, size=counts.shape)  # fresh OS entropy
    return [float(v) for v in noisy], True


def _check_recipe(cfg: dict) -> None:
    """Refuse training-recipe values that would only waste the round (they cannot touch privacy: the noise
    and the number of DP steps are the site's plan, whatever the recipe)."""
    for key in ("lr-d", "lr-g", "ac-weight", "mode-seeking"):
        value = float(cfg[key])
        if not math.isfinite(value) or value < 0 or (key.startswith("lr") and value == 0):
            raise Refusal(P.REFUSED_BAD_REQUEST, f"{key} must be a finite number >= 0 (learning rates > 0), got {cfg[key]!r}")


def handle_train_gan(msg: Message, context: Context) -> Message:
    """Body of the train.gan handler (also called directly by tests)."""
    site = resolve_site(context.node_config, context.run_config)
    try:
        cfg, data = open_request(msg, site, "dpgan", P.GAN_REQUEST_KEYS, P.REQ_GENERATOR, "generator")
        gen_state = msg.content.array_records[P.REQ_GENERATOR].to_torch_state_dict()
        shape = _check_shape(cfg, data, gen_state)
        _check_recipe(cfg)
        ledger = PrivacyLedger(ledger_path(site, data), epsilon_budget=site.epsilon_budget,
                               delta=site_delta(site, len(data)))
        experiment = safe_name(str(cfg["experiment"]))
        run_dir = site.state_dir / "runs" / experiment
        rnd = int(cfg["server-round"])
        if not 1 <= rnd <= int(cfg["num-rounds"]):
            raise Refusal(P.REFUSED_BAD_REQUEST, f"round {rnd} is outside the run's 1..{cfg['num-rounds']}")
        cached = run_dir / f"reply-round-{rnd}.pt"
        saved = load_cached_reply(cached)
        if saved is not None:
            # Re-sent round (the coordinator resumed): return the reply already released -- sending the
            # same output again costs no privacy -- instead of training (and spending) twice.
            log.info("[%s] round %d already trained for %s; re-sending it", site.name, rnd, experiment)
            return _gan_reply(msg, saved["generator"], saved["metrics"])
        plan = _gan_plan(site, data, ledger, cfg, run_dir)
        done = sum(1 for e in ledger.entries() if e.get("run") == experiment and e.get("purpose") == "dpgan")
        if done >= int(cfg["num-rounds"]):
            raise Refusal(P.REFUSED_BUDGET, f"this run already spent its {cfg['num-rounds']} planned rounds here")
        steps = int(cfg["local-steps"])
        event = DPEvent(plan["noise_multiplier"], plan["sample_rate"], steps)
        histogram, drawn_now = _class_histogram(plan, data, run_dir)
        events = [event]
        details = {"batch-size": int(cfg["batch-size"]), "max-grad-norm": float(cfg["max-grad-norm"])}
        if drawn_now:  # charged with this round, in the same ledger entry
            events = [DPEvent(plan["histogram_noise"], 1.0, 1), event]
            details["class-histogram-noise"] = plan["histogram_noise"]
        try:
            spent = ledger.charge(events, purpose="dpgan", run=experiment, round=rnd, details=details)
        except BudgetExceeded as err:
            raise Refusal(P.REFUSED_BUDGET, str(err)) from None
        if drawn_now:
            atomic_write_json(run_dir / HISTOGRAM_FILE, {"noisy-counts": histogram})
            log.info("[%s] drew its DP class histogram (z=%g) for the generator's labels", site.name,
                     plan["histogram_noise"])
        log.info("[%s] round %d: training DP-GAN on %d records (sigma=%.3f, q=%.4f, %d steps); epsilon now %.3f",
                 site.name, rnd, len(data), event.noise_multiplier, event.sample_rate, steps, spent.epsilon)
        device = pick_device(str(context.run_config.get("device", "auto")))
        trainer = LocalGanTrainer(shape, data, run_dir / "discriminator.pt", device,
                                  progress=bool(context.run_config.get("progress", True)), label=site.name)
        rs = RoundSettings(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=steps,
                           max_grad_norm=float(cfg["max-grad-norm"]), lr_d=float(cfg["lr-d"]),
                           lr_g=float(cfg["lr-g"]), seed=int(cfg["seed"]) * 1000 + rnd,
                           d_width=int(cfg["d-width"]), ac_weight=float(cfg["ac-weight"]),
                           mode_seeking=float(cfg["mode-seeking"]), label_weights=tuple(histogram or ()))
        new_state, train_metrics = trainer.train_round(gen_state, rs)
        metrics = {"num-examples": len(data), "epsilon": spent.epsilon, "delta": spent.delta,
                   "noise-multiplier": event.noise_multiplier, "sample-rate": event.sample_rate, **train_metrics}
        save_cached_reply(cached, {"generator": new_state, "metrics": metrics})
        return _gan_reply(msg, new_state, metrics)
    except Refusal as err:
        return refuse(msg, site.name, err)


def _gan_reply(msg: Message, generator_state: dict, metrics: dict) -> Message:
    # Only what protocol.GAN_REPLY_METRICS declares; float32 generator parameters only.
    clean = {k: float(v) for k, v in metrics.items() if k in P.GAN_REPLY_METRICS}
    arrays = ArrayRecord({k: v.detach().to(torch.float32).cpu() for k, v in generator_state.items()})
    return Message(RecordDict({P.REPLY_GENERATOR: arrays, P.REPLY_METRICS: MetricRecord(clean)}), reply_to=msg)


