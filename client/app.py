"""The site: a Flower ClientApp. Everything that touches private data runs behind these handlers.

``train.gan``: load the site's data, check the request against the site's own budget (refuse before
any work if it does not fit), charge the ledger, train the discriminator with DP-SGD and the received
generator against it, and reply with the generator weights and the numbers declared in
``common.protocol`` -- nothing else.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.dpgan import LocalGanTrainer, RoundSettings
from client.ledger import BudgetExceeded, PrivacyLedger
from client.site import SiteSettings, ledger_path, load_site_data, load_site_heldout, resolve_site, site_delta
from common import protocol as P
from common.accounting import BudgetTooSmall, DPEvent, calibrate_noise_multiplier, epsilon_for
from common.data import DataError, ImageDataset
from common.device import pick_device
from common.learner import build_learner, evaluate_learner
from common.models import GanShape

log = logging.getLogger("fedsynth.site")
app = ClientApp()


class Refusal(Exception):
    """The site declines a request; becomes an error reply with a protocol refusal code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _refuse(msg: Message, site_name: str, err: Refusal) -> Message:
    log.warning("[%s] refused %s: %s", site_name, msg.metadata.message_type, err.reason)
    return Message(error=Error(code=err.code, reason=f"{site_name}: {err.reason}"), reply_to=msg)


def _request_config(msg: Message, required: tuple[str, ...]) -> dict[str, Any]:
    if P.REQ_CONFIG not in msg.content.config_records:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"request has no '{P.REQ_CONFIG}' record")
    cfg = dict(msg.content.config_records[P.REQ_CONFIG])
    unknown = sorted(set(cfg) - set(required))
    missing = sorted(set(required) - set(cfg))
    if unknown or missing:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"request settings do not follow the protocol "
                                             f"(unknown: {unknown}, missing: {missing})")
    return cfg


def _atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _safe_name(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
    if not cleaned or cleaned.startswith("."):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"invalid experiment id {text!r}")
    return cleaned


# ---- train.gan ------------------------------------------------------------------------------------
def _gan_plan(site: SiteSettings, data: ImageDataset, ledger: PrivacyLedger, cfg: dict, run_dir: Path) -> dict:
    """This run's DP-SGD plan at this site: fixed at the run's first round, persisted, then enforced.

    sigma is the smallest noise such that (a) the planned rounds alone stay within the epsilon the run
    asks for and (b) everything this dataset has ever released plus the planned rounds stays within the
    site's own budget. The coordinator never sets the noise.
    """
    path = run_dir / "gan-plan.json"
    asked = {k: cfg[k] for k in ("num-rounds", "local-steps", "batch-size", "max-grad-norm")}
    if path.exists():
        plan = json.loads(path.read_text())
        changed = {k: (plan["asked"][k], v) for k, v in asked.items() if plan["asked"][k] != v}
        if changed:
            raise Refusal(P.REFUSED_BAD_REQUEST, f"request changes settings fixed at the run's first round: "
                                                 f"{changed} (start a new experiment instead)")
        return plan
    n = len(data)
    rounds, steps, batch = int(cfg["num-rounds"]), int(cfg["local-steps"]), int(cfg["batch-size"])
    if rounds < 1 or steps < 1 or batch < 1 or not float(cfg["max-grad-norm"]) > 0:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"rounds, steps, batch size and clipping bound must be positive: {asked}")
    q = min(1.0, batch / n)
    delta = site_delta(site, n)
    asked_eps = float(cfg["epsilon"])
    prior = [DPEvent.from_dict(e) for entry in ledger.entries() for e in entry["events"]]
    try:
        sigma_run = calibrate_noise_multiplier(asked_eps, delta, q, rounds * steps)
        sigma_budget = calibrate_noise_multiplier(site.epsilon_budget, delta, q, rounds * steps, prior=prior)
    except BudgetTooSmall as err:
        raise Refusal(P.REFUSED_BUDGET, f"{rounds} rounds x {steps} steps do not fit the site's budget "
                                        f"(spent {ledger.spent().epsilon:.3g} of {site.epsilon_budget:g}): {err}") from None
    sigma = max(sigma_run, sigma_budget)
    plan = {"asked": asked, "noise_multiplier": sigma, "sample_rate": q, "delta": delta,
            "planned_epsilon_run": epsilon_for([DPEvent(sigma, q, rounds * steps)], delta),
            "epsilon_budget": site.epsilon_budget}
    _atomic_write_json(path, plan)
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
    from common.models import Generator

    expected = P.generator_spec(Generator(shape).state_dict())
    got = {k: v for k, v in generator_state.items()}
    problems = P.validate_reply({k: v.numpy() for k, v in got.items()}, {}, expected, {})
    if problems:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the generator sent does not match the run's GAN shape: {problems[:3]}")
    return shape


def handle_train_gan(msg: Message, context: Context) -> Message:
    """Body of the train.gan handler (also called directly by tests)."""
    site = resolve_site(context.node_config, context.run_config)
    try:
        cfg = _request_config(msg, P.GAN_REQUEST_KEYS)
        if P.REQ_GENERATOR not in msg.content.array_records:
            raise Refusal(P.REFUSED_BAD_REQUEST, "request carries no generator")
        try:
            data = load_site_data(site)
        except DataError as err:
            raise Refusal(P.SITE_FAILURE, f"cannot load the site's data: {err}") from None
        gen_state = msg.content.array_records[P.REQ_GENERATOR].to_torch_state_dict()
        shape = _check_shape(cfg, data, gen_state)
        ledger = PrivacyLedger(ledger_path(site, data), epsilon_budget=site.epsilon_budget,
                               delta=site_delta(site, len(data)))
        experiment = _safe_name(str(cfg["experiment"]))
        run_dir = site.state_dir / "runs" / experiment
        rnd = int(cfg["server-round"])
        if not 1 <= rnd <= int(cfg["num-rounds"]):
            raise Refusal(P.REFUSED_BAD_REQUEST, f"round {rnd} is outside the run's 1..{cfg['num-rounds']}")
        cached = run_dir / f"reply-round-{rnd}.pt"
        if cached.exists():
            # Re-sent round (the coordinator resumed): return the reply already released -- sending the
            # same output again costs no privacy -- instead of training (and spending) twice.
            saved = torch.load(cached, weights_only=True)
            log.info("[%s] round %d already trained for %s; re-sending it", site.name, rnd, experiment)
            return _gan_reply(msg, saved["generator"], saved["metrics"])
        plan = _gan_plan(site, data, ledger, cfg, run_dir)
        done = sum(1 for e in ledger.entries() if e.get("run") == experiment and e.get("purpose") == "dpgan")
        if done >= int(cfg["num-rounds"]):
            raise Refusal(P.REFUSED_BUDGET, f"this run already spent its {cfg['num-rounds']} planned rounds here")
        steps = int(cfg["local-steps"])
        event = DPEvent(plan["noise_multiplier"], plan["sample_rate"], steps)
        try:
            spent = ledger.charge([event], purpose="dpgan", run=experiment, round=rnd,
                                  details={"batch-size": int(cfg["batch-size"]), "max-grad-norm": float(cfg["max-grad-norm"])})
        except BudgetExceeded as err:
            raise Refusal(P.REFUSED_BUDGET, str(err)) from None
        log.info("[%s] round %d: training DP-GAN on %d records (sigma=%.3f, q=%.4f, %d steps); epsilon now %.3f",
                 site.name, rnd, len(data), event.noise_multiplier, event.sample_rate, steps, spent.epsilon)
        device = pick_device(str(context.run_config.get("device", "auto")))
        trainer = LocalGanTrainer(shape, data, run_dir / "discriminator.pt", device,
                                  progress=bool(context.run_config.get("progress", True)), label=site.name)
        rs = RoundSettings(noise_multiplier=event.noise_multiplier, sample_rate=event.sample_rate, steps=steps,
                           max_grad_norm=float(cfg["max-grad-norm"]), lr_d=float(cfg["lr-d"]),
                           lr_g=float(cfg["lr-g"]), seed=int(cfg["seed"]) * 1000 + rnd)
        new_state, train_metrics = trainer.train_round(gen_state, rs)
        metrics = {"num-examples": len(data), "epsilon": spent.epsilon, "delta": spent.delta,
                   "noise-multiplier": event.noise_multiplier, "sample-rate": event.sample_rate, **train_metrics}
        tmp = cached.with_suffix(".tmp")
        torch.save({"generator": new_state, "metrics": metrics}, tmp)
        os.replace(tmp, cached)
        return _gan_reply(msg, new_state, metrics)
    except Refusal as err:
        return _refuse(msg, site.name, err)


def _gan_reply(msg: Message, generator_state: dict, metrics: dict) -> Message:
    # Only what protocol.GAN_REPLY_METRICS declares; float32 generator parameters only.
    clean = {k: float(v) for k, v in metrics.items() if k in P.GAN_REPLY_METRICS}
    arrays = ArrayRecord({k: v.detach().to(torch.float32).cpu() for k, v in generator_state.items()})
    return Message(RecordDict({P.REPLY_GENERATOR: arrays, P.REPLY_METRICS: MetricRecord(clean)}), reply_to=msg)


@app.train("gan")
def train_gan(msg: Message, context: Context) -> Message:
    return handle_train_gan(msg, context)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """The site's data schema: name, image shape and class names (no records, no counts)."""
    site = resolve_site(context.node_config, context.run_config)
    try:
        data = load_site_data(site)
    except DataError as err:
        return _refuse(msg, site.name, Refusal(P.SITE_FAILURE, f"cannot load the site's data: {err}"))
    c, h, w = data.image_shape
    rec = ConfigRecord({"site-name": site.name, "channels": c, "height": h, "width": w,
                        "classes": list(data.classes)})
    return Message(RecordDict({P.REPLY_INFO: rec}), reply_to=msg)


@app.evaluate("classifier")
def evaluate_classifier(msg: Message, context: Context) -> Message:
    """Score the central classifier on the site's own held-out records; reply with metrics only."""
    site = resolve_site(context.node_config, context.run_config)
    try:
        cfg = _request_config(msg, P.EVAL_REQUEST_KEYS)
        try:
            heldout = load_site_heldout(site)
        except DataError as err:
            raise Refusal(P.SITE_FAILURE, f"cannot load the site's held-out data: {err}") from None
        if heldout is None or len(heldout) == 0:
            raise Refusal(P.REFUSED_NOT_ALLOWED, "this site has no held-out data configured (heldout_path)")
        shape = (int(cfg["channels"]), int(cfg["height"]), int(cfg["width"]))
        if shape != heldout.image_shape or int(cfg["num-classes"]) != heldout.num_classes:
            raise Refusal(P.REFUSED_BAD_REQUEST, f"classifier expects {shape} images in {cfg['num-classes']} "
                                                 f"classes; held-out data is {heldout.image_shape}, {heldout.num_classes}")
        model = build_learner(str(cfg["learner"]), shape, int(cfg["num-classes"]))
        try:
            model.load_state_dict(msg.content.array_records[P.REQ_CLASSIFIER].to_torch_state_dict())
        except (KeyError, RuntimeError) as err:
            raise Refusal(P.REFUSED_BAD_REQUEST, f"the classifier sent does not match '{cfg['learner']}': {err}") from None
        acc = evaluate_learner(model, heldout, device="cpu")["accuracy"]
        log.info("[%s] central classifier on %d held-out records: accuracy %.4f", site.name, len(heldout), acc)
        return Message(RecordDict({P.REPLY_METRICS: MetricRecord({"num-test": len(heldout), "accuracy": acc})}),
                       reply_to=msg)
    except Refusal as err:
        return _refuse(msg, site.name, err)


@app.query("audit")
def audit(msg: Message, context: Context) -> Message:
    """Privacy diagnostics of a synthetic sample against this site's records: aggregates only.

    Switchable off in the site config (``audits: false``). The reply is labelled a diagnostic: it is
    computed on private data without DP noise, which is why it carries only means, test statistics,
    AUCs, counts and fixed-bin histograms (``common.audits.site_audit_summary``).
    """
    from common.audits import site_audit_summary

    site = resolve_site(context.node_config, context.run_config)
    try:
        if not site.audits:
            raise Refusal(P.REFUSED_NOT_ALLOWED, "privacy audits are switched off in this site's config")
        cfg = _request_config(msg, P.AUDIT_REQUEST_KEYS)
        try:
            data, heldout = load_site_data(site), load_site_heldout(site)
        except DataError as err:
            raise Refusal(P.SITE_FAILURE, f"cannot load the site's data: {err}") from None
        if heldout is None or len(heldout) < 2:
            raise Refusal(P.REFUSED_NOT_ALLOWED, "this site has no held-out data configured (heldout_path)")
        rec = msg.content.array_records.get(P.REQ_SYNTHETIC)
        if rec is None or "images" not in rec:
            raise Refusal(P.REFUSED_BAD_REQUEST, "request carries no synthetic images")
        synth = rec["images"].numpy()
        if synth.ndim != 4 or synth.shape[1:] != data.image_shape or synth.dtype != "float32":
            raise Refusal(P.REFUSED_BAD_REQUEST, f"synthetic images must be float32 (N, {data.image_shape}), "
                                                 f"got {synth.dtype} {synth.shape}")
        summary = site_audit_summary(synth, data.images, heldout.images, max_records=int(cfg["max-records"]),
                                     seed=int(cfg["seed"]), device="cpu")
        log.info("[%s] audit: membership AUC %.3f, near-copies %s", site.name,
                 summary["membership_inference"]["auc"], summary["memorization"]["near_copies"]["count"])
        return Message(RecordDict({P.REPLY_DIAGNOSTIC: ConfigRecord(P.flatten_diagnostic(summary))}), reply_to=msg)
    except Refusal as err:
        return _refuse(msg, site.name, err)
