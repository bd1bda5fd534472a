"""Site side of the DP-GAN mode: one ``train.gan`` round -- plan, charge, train, reply with G only.

Per round, in this order (each step before the next):
1. the request is decoded and checked (mode allowed, schema, generator architecture, recipe ranges);
2. a round the site already answered is answered again from its saved reply (no new spending; into a secure
   sum only once, ever: ``client.secure_site``);
3. the run's plan (``client.budget``) is read back, or made at the run's first request;
4. the round's DP-SGD steps -- and, at the site's first round of the run, the census -- are charged
   in the ledger (an interrupted attempt of the same round reuses its charge);
5. D trains from its state after the previous round (its weights replaced by the sites' average when the
   request carries one); the reply and D's new state are saved together;
6. the reply carries the generator, the census (noisy class histogram) and its sum as the FedAvg weight,
   G's mean loss and, when the request asks for it (``share_d``), D's weights: nothing else.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from flwr.app import Context, Message

from client.budget import (
    ARCHITECTURE,
    PLAN_FILE,
    PlanRequest,
    RunPlan,
    check_plan_kept,
    expected_batch,
    plan_for_site,
    planned_steps,
    validate_plan_request,
)
from client.census import census_weight, check_plan_possible, check_secure_room, run_census, secure_weight
from client.charged_work import charged_work
from client.dpgan import LocalGanTrainer, RoundSettings
from client.dpsgd import DPSGD_CHUNK
from client.limits import (Step, WorkLimits, check_free_disk, check_work, meta_module, other_runs_mb, parameter_count,
                           saved_file_bytes)
from client.release_marks import answer_in_clear
from client.requests import (
    Refusal,
    require_plain_allowed,
    check_recipe,
    check_schema,
    load_saved,
    require_mode,
    require_replacement,
    run_dir,
    save_reply,
    site_data,
    site_device,
    site_handler,
)
from client.row_check import check_network_rows, discriminator_problems, generator_problems
from client.site import SiteSettings, data_fingerprint, open_ledger
from client.site_schedule import (STEPS_CHANGED, check_schedule_asked, choose_g_steps, choose_local_steps,
                                  keep_schedule_asked)
from common import protocol as P
from common.gan_augment import parse_augment
from common.recipe_ranges import MIN_G_WIDTH
from common.models import Discriminator, GanShape, Generator

log = logging.getLogger("fedsynth.site")


def round_file(folder, rnd: int):
    """Where the site saves its reply of DP-GAN round ``rnd`` (with D's state after it) in the run's ``folder``."""
    return folder / f"gan-round-{rnd}.pt"


def _float32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A network's state as a reply carries it (float32 tensors; saved with the reply, then sent)."""
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def _previous_round(folder, rnd: int) -> dict | None:
    """What the site saved at the latest round before ``rnd`` it trained: its reply and D's state after it (None:
    no earlier round, so D is new and the run's G steps are still to choose)."""
    for earlier in range(rnd - 1, 0, -1):
        saved = load_saved(round_file(folder, earlier))
        if saved is not None:
            return saved
    return None


def round_file_bytes(generator: torch.nn.Module, disc: torch.nn.Module) -> int:
    """At most the bytes of one round's saved file (``save_reply``): its reply (G, and D when shared) and D's state (D,
    Adam's two moments and step of D and of G), 4 bytes a value plus torch.save's records (client.limits)."""
    return saved_file_bytes(3 * parameter_count(generator) + 4 * parameter_count(disc),
                            4 * len(list(generator.parameters())) + 5 * len(list(disc.parameters())))


def gan_kept_mb(req: P.GanTrainRequest, generator: torch.nn.Module, disc: torch.nn.Module) -> float:
    """MB a run of ``req`` keeps in the site's state folder over its rounds (client.limits.check_work)."""
    return req.num_rounds * round_file_bytes(generator, disc) / 2**20


def check_gan_work(req: P.GanTrainRequest, site: WorkLimits, shape: GanShape) -> Generator:
    """Refuse a round beyond the site's work limits (client.limits); G on the meta device (shapes only: the limits
    come before any allocation)."""
    generator = meta_module(lambda: Generator(shape))
    disc = meta_module(lambda: Discriminator(shape, width=req.d_width))

    def judge(rows: int, fake: bool) -> None:  # D on ``rows`` images (G's when ``fake``), as client.dpgan steps
        labels = torch.zeros(rows, dtype=torch.long)
        disc(generator(torch.zeros(rows, req.latent_dim), labels) if fake else
             torch.zeros(rows, req.channels, req.image_size, req.image_size), labels)

    # A D step: its Poisson batch in padded chunks of DPSGD_CHUNK rows, each chunk's real and fake pass and their
    # per-sample gradients (summed), clipped into the step's sum before the next chunk (client.dpgan: a step holds
    # one chunk's, whatever the batch; review s58); a G step: the batch's fakes (its mode-seeking pairs are rows of
    # it, client.dpgan.paired_labels) through G and D, back into G (DiffAugment's copies of D's inputs, a few images
    # per row, are far below D's activations: left to the factors)
    g, d = parameter_count(generator), parameter_count(disc)
    check_work(site, networks={"generator": g, "discriminator": d}, kept_mb=gan_kept_mb(req, generator, disc),
               others_mb=other_runs_mb(site, req.experiment),
               batch_size=req.batch_size, steps_per_run=req.num_rounds * max(req.local_steps, req.long_steps),
               steps=(Step("one DP-SGD step of the discriminator", 2 * DPSGD_CHUNK, lambda r: judge(r, False),
                           backward="dpsgd", gradient_rows=DPSGD_CHUNK, dpsgd_network="discriminator",
                           gradient_copies=2, ask="a narrower discriminator (d-width)"),
                      Step("one generator step", req.batch_size, lambda r: judge(r, True),
                           ask="a smaller batch or a narrower generator (width)")))
    return generator


def _check_request(req: P.GanTrainRequest, site: SiteSettings) -> GanShape:
    shape = GanShape(channels=req.channels, image_size=req.image_size, num_classes=req.num_classes,
                     latent_dim=req.latent_dim, width=req.width, resolution=req.resolution)
    try:
        shape.validate()
    except ValueError as err:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"invalid GAN shape: {err}") from None
    # G halves its channels at each stage: below width 4 a stage has none and the round would fail after its charge
    # (the run config refuses it too); rounds, steps and batch: the plan refuses
    if req.width < MIN_G_WIDTH or req.latent_dim < 1 or req.d_width < 0:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"width must be >= {MIN_G_WIDTH}, latent dim positive and d-width >= 0; "
                                             f"got width {req.width}, latent dim {req.latent_dim}, d-width {req.d_width}")
    try:
        generator = check_gan_work(req, site, shape)
    except (ValueError, RuntimeError, TypeError, OverflowError) as err:  # (a Refusal passes) widths torch cannot build
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the GAN's networks cannot be built with width {req.width}, d-width "
                                             f"{req.d_width} and latent dim {req.latent_dim} "
                                             f"({type(err).__name__})") from None
    problems = P.check_arrays(req.generator, P.state_spec(generator.state_dict()))
    if problems:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the generator sent does not match the run's GAN shape: {problems[:3]}")
    if req.discriminator:  # the sites' averaged D to start from: any finite weights of D's shape (DP-SGD's
        #                    guarantee holds from any starting point; the check keeps the round from crashing)
        d_spec = P.state_spec(meta_module(lambda: Discriminator(shape, width=req.d_width)).state_dict())
        problems = P.check_arrays(req.discriminator, d_spec)
        if problems:
            raise Refusal(P.REFUSED_BAD_REQUEST, f"the discriminator sent does not match the run's GAN shape: "
                                                 f"{problems[:3]}")
    if not 1 <= req.server_round <= req.num_rounds:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"round {req.server_round} is outside the run's 1..{req.num_rounds}")
    check_recipe(req)  # seed, learning rates, clip bound, loss weights: each in the protocol's range
    try:
        parse_augment(req.augment)
    except ValueError as err:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"augment: {err}") from None
    if not 0 <= req.ema < 1:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"ema must be a decay in [0, 1), got {req.ema}")
    if not 1 <= req.g_steps <= P.MAX_G_STEPS:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"g-steps must be in 1..{P.MAX_G_STEPS}, got {req.g_steps}")
    if req.long_g_steps and not req.g_steps <= req.long_g_steps <= P.MAX_G_STEPS:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"long-g-steps must be 0 or in g-steps..{P.MAX_G_STEPS} "
                                             f"({req.g_steps}..{P.MAX_G_STEPS}), got {req.long_g_steps}")
    if not 1 <= req.d_steps <= P.MAX_D_STEPS:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"d-steps must be in 1..{P.MAX_D_STEPS}, got {req.d_steps}")
    if req.long_steps < 0 or 0 < req.long_steps < req.local_steps:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"long-steps must be 0 or at least local-steps ({req.local_steps}), "
                                             f"got {req.long_steps}")
    return shape


# The request's settings that fix the shapes of what a site saves between rounds (PlanRequest.architecture)
ARCHITECTURE_SETTINGS = ("channels", "image_size", "num_classes", "latent_dim", "width", "d_width", "resolution")


def _plan_request(req: P.GanTrainRequest, steps: int) -> PlanRequest:
    return PlanRequest(mode="dpgan", epsilon=req.epsilon, rounds=req.num_rounds, steps=steps,
                       batch_size=req.batch_size, census=True,
                       architecture=tuple((k, getattr(req, k)) for k in ARCHITECTURE_SETTINGS))


def _check_architecture_kept(folder: Path, req: P.GanTrainRequest) -> None:
    """Refuse a request whose architecture differs from the one its run's plan fixed (the plan's own refusal, made
    before the row check; nothing when the run has no plan yet)."""
    plan_file = folder / PLAN_FILE
    if not plan_file.exists():
        return
    recorded = RunPlan.from_json(json.loads(plan_file.read_text())).request
    asked = {k: v for k, v in _plan_request(req, req.local_steps).fixed_by().items() if k.startswith(ARCHITECTURE)}
    check_plan_kept(recorded, asked)


def _shapes(state: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _moment_shapes(optimizer_state: dict) -> list[tuple[int, ...] | None]:
    """The shape of every parameter's Adam moment in a saved optimizer state (None: no moment yet), in order."""
    params = [i for group in optimizer_state["param_groups"] for i in group["params"]]
    moments = optimizer_state["state"]
    return [tuple(moments[i]["exp_avg"].shape) if i in moments and "exp_avg" in moments[i] else None for i in params]


def _check_saved_state(previous: dict | None, shape: GanShape, d_width: int) -> None:
    """Refuse a round whose networks differ in shape from the state the site saved at the run's earlier rounds (D
    and both optimizers' moments), which the round would fail to load after its charge. The run's plan refuses a
    changed architecture setting already (ARCHITECTURE_SETTINGS); this covers a run whose plan was
    recorded before it named them."""
    saved = None if previous is None else previous.get("d_state")
    if not saved:
        return
    disc = meta_module(lambda: Discriminator(shape, width=d_width))
    gen = meta_module(lambda: Generator(shape))

    def fits(module, moments: list) -> bool:
        want = [tuple(p.shape) for p in module.parameters()]
        return len(moments) == len(want) and all(m is None or m == w for m, w in zip(moments, want))

    if (_shapes(saved["disc"]) != _shapes(disc.state_dict()) or not fits(disc, _moment_shapes(saved["opt_d"]))
            or not fits(gen, _moment_shapes(saved["opt_g"]))):
        raise Refusal(P.REFUSED_BAD_REQUEST, "the request's generator or discriminator differs in shape from those of "
                                             "the run's earlier rounds (channels, image size, classes, latent dim, "
                                             "width, d-width and resolution are fixed at the run's first round): "
                                             "start a new experiment instead")


def _schedule(req: P.GanTrainRequest, site: SiteSettings, ledger, folder, census: list[float]) -> int:
    """D steps per round for this run, chosen from the run's census (already charged and drawn).

    Without a longer schedule to choose (``long_steps`` 0) the request's steps are taken. With one, the schedule
    follows from the census alone (``client.site_schedule.choose_local_steps``); a longer plan that does not fit the
    site's budget gives the shorter one (a decision on the census and the ledger, like every plan's). Once the
    plan is fixed its steps are the run's; a request naming other steps is refused.
    """
    if req.long_steps <= req.local_steps:
        return req.local_steps
    fixed = planned_steps(folder)
    if fixed is not None:
        if fixed not in (req.local_steps, req.long_steps):
            # the refusal names neither the plan's steps nor which one the site took: the choice is read off its
            # census, which a secure run never shows the coordinator one site at a time (review s68 K)
            log.warning("[%s] refuses a round of %s naming %d or %d D steps: the run's plan fixed %d", site.name,
                        req.experiment, req.local_steps, req.long_steps, fixed)
            raise Refusal(P.REFUSED_BAD_REQUEST, STEPS_CHANGED)
        return fixed
    steps, why = choose_local_steps(req.local_steps, req.long_steps, epsilon=min(req.epsilon, site.epsilon_budget),
                                    noisy_counts=census)
    if steps != req.local_steps:
        try:  # the longer plan, fixed here if it fits the site's budget (the caller reads it back); else the shorter
            plan_for_site(site, ledger, folder, _plan_request(req, steps), req.experiment, census=census)
        except Refusal:
            steps, why = req.local_steps, "the longer schedule's plan does not fit its budget"
    log.info("[%s] takes %d D steps per round in %s (%s)", site.name, steps, req.experiment, why)
    return steps


def _g_steps(req: P.GanTrainRequest, site: SiteSettings, previous: dict | None, census: list[float]) -> int:
    """G steps per D step for this run: chosen at its first trained round, then the run's.

    The choice (``client.site_schedule.choose_g_steps``) reads the request and the census, both fixed for a run, so it
    only changes within a run when the rule itself did: a run begun by an older fedsynth and resumed by a newer
    one keeps the G steps its earlier rounds took (``previous``: the saved reply of its latest one,
    ``_previous_round``), as it keeps their D steps. A request whose settings cannot give those steps is refused,
    like one naming other D steps (``_schedule``); a reply saved by a fedsynth whose replies did not say leaves the
    choice to the rule.
    """
    chosen = choose_g_steps(req.g_steps, req.long_g_steps, noisy_counts=census)
    earlier = None if previous is None else previous["reply"].get("g_steps")
    if earlier is None:
        if chosen != req.g_steps:
            log.info("[%s] takes %d G steps per D step in %s (its noisy census says it is large; G steps cost no "
                     "privacy)", site.name, chosen, req.experiment)
        return chosen
    earlier = int(earlier)
    if earlier not in (req.g_steps, req.long_g_steps):
        log.warning("[%s] refuses a round of %s naming %d or %d G steps per D step: its earlier rounds took %d",
                    site.name, req.experiment, req.g_steps, req.long_g_steps, earlier)
        raise Refusal(P.REFUSED_BAD_REQUEST, STEPS_CHANGED)  # naming no step count, as _schedule's
    if earlier != chosen:
        log.warning("[%s] keeps the %d G steps per D step its earlier rounds of %s took (this fedsynth's rule "
                    "chooses %d for a run begun now)", site.name, earlier, req.experiment, chosen)
    return earlier


@site_handler
def handle_train_gan(msg: Message, context: Context, site: SiteSettings) -> Message:
    """The train.gan handler (in the clear: refused where the operator requires secure aggregation)."""
    require_plain_allowed(site)
    req = P.GanTrainRequest.from_message(msg)
    release = round_file(run_dir(site, req.experiment), req.server_round)
    return answer_in_clear(release, req, lambda: train_gan(req, context, site)).as_reply(msg)


def train_gan(req: P.GanTrainRequest, context: Context, site: SiteSettings, *,
              secure: bool = False) -> P.GanTrainReply:
    """One DP-GAN round at the site; the typed reply (sent as it is, or, ``secure``, into a SecAgg+ sum)."""
    require_mode(site, "dpgan")
    require_replacement(site, req.sensitive_attribute)
    shape = _check_request(req, site)
    device = site_device(context)
    data = site_data(site)
    check_schema(data, req.channels, req.image_size, req.image_size, req.num_classes)
    folder, rnd = run_dir(site, req.experiment), req.server_round
    saved = load_saved(round_file(folder, rnd))
    if saved is not None:
        # Re-sent round (the coordinator resumed): the reply already released, sent again at no cost.
        log.info("[%s] round %d of %s already trained; sending its saved reply", site.name, rnd, req.experiment)
        return P.GanTrainReply(**saved["reply"])
    # new work, to be charged: the disk must have room for the run's files (a re-send above writes nothing)
    networks = torch.nn.ModuleDict({  # shapes only, as built (D's width follows G's at d-width 0)
        "generator": meta_module(lambda: Generator(shape)),
        "discriminator": meta_module(lambda: Discriminator(shape, width=req.d_width))})
    check_free_disk(site, folder, gan_kept_mb(req, networks["generator"], networks["discriminator"]))
    shorter = _plan_request(req, req.local_steps)
    validate_plan_request(shorter)  # a malformed request costs nothing, not even a census
    if secure:  # a model no census could bring inside the sum's range: refused before the census (review s61)
        check_secure_room(1.0, req.generator)
    check_plan_possible(folder, shorter, site, data, req.experiment)  # before a new ledger is started (its noisy size is charged)
    # D's shape must compute each record's rows alone on this machine (review s63), checked for the run's own
    # shape only (the seventh: a re-sent round naming another d-width had the site check and remember each one,
    # uncharged, before the plan refused the change)
    _check_architecture_kept(folder, req)
    check_schedule_asked(req, folder)  # the coordinator's own first settings, never the census's choice (review s68 L)
    previous = _previous_round(folder, rnd)
    _check_saved_state(previous, shape, req.d_width)  # (a plan recorded before it fixed the architecture: the eighth)
    check_network_rows(site.state_dir, "GAN", {"channels": req.channels, "side": req.image_size,
                                               "classes": req.num_classes, "d-width": req.d_width, "width": req.width,
                                               "latent-dim": req.latent_dim, "resolution": req.resolution},
                       networks,
                       lambda on: (discriminator_problems(Discriminator(shape, width=req.d_width), data.image_shape,
                                                          req.num_classes, device=on)
                                   + generator_problems(Generator(shape), req.latent_dim, req.num_classes, device=on)),
                       device)
    ledger = open_ledger(site, data)
    census = run_census(data, ledger, folder, mode="dpgan", experiment=req.experiment, epsilon=req.epsilon,
                        budget=site.epsilon_budget, delta_bound=site.delta_bound,
                        fingerprint=data_fingerprint(data))
    steps = _schedule(req, site, ledger, folder, census)
    g_steps = _g_steps(req, site, previous, census)
    plan = plan_for_site(site, ledger, folder, _plan_request(req, steps), req.experiment, census=census)
    keep_schedule_asked(req, folder)
    weight = secure_weight(census, req.generator) if secure else census_weight(census)
    train = plan.train_round(steps)
    with charged_work(ledger, [train], data, site, purpose="dpgan", run=req.experiment, rnd=rnd, folder=folder,
                      run_epsilon=req.epsilon,
                      details={"batch-size": req.batch_size, "max-grad-norm": req.max_grad_norm}) as spent:
        log.info("[%s] round %d: DP-GAN on its records (sigma=%.3f, q=%.4f, %d steps); epsilon spent now %.3f",
                 site.name, rnd, train.noise_multiplier, train.sample_rate, train.steps, spent.epsilon)
        trainer = LocalGanTrainer(shape, data, device,
                                  progress=bool(context.run_config.get("progress", True)), label=site.name)
        rs = RoundSettings(noise_multiplier=train.noise_multiplier, sample_rate=train.sample_rate, steps=train.steps,
                           max_grad_norm=req.max_grad_norm, lr_d=req.lr_d, lr_g=req.lr_g, seed=req.seed * 1000 + rnd,
                           d_width=req.d_width, ac_weight=req.ac_weight, mode_seeking=req.mode_seeking,
                           label_weights=tuple(census) if req.class_histogram else (), g_steps_per_d=g_steps,
                           d_steps_per_g=req.d_steps,
                           ema=req.ema, expected_batch=expected_batch(plan, census), augment=parse_augment(req.augment))
        generator = {k: torch.from_numpy(v) for k, v in req.generator.items()}
        d_before = None if previous is None else previous["d_state"]  # None: a new D
        new_state, metrics, d_state = trainer.train_round(generator, rs, d_before,
                                                          req.discriminator)  # the sites' averaged D, or {}
        log.info("[%s] round %d trained in %.1f s (D loss %.3f, G loss %.3f)", site.name, rnd, metrics["train-seconds"],
                 metrics["d-loss"], metrics["g-loss"])
        reply = {"generator": _float32(new_state),
                 "census": {"counts": torch.tensor(census, dtype=torch.float32)},  # (K,)
                 "weight": weight, "g_loss": float(metrics["g-loss"]), "local_steps": steps,
                 "g_steps": g_steps}
        if req.share_d:  # D after this round's DP-SGD steps, for the coordinator's average (P.GanTrainReply)
            reply["discriminator"] = _float32(d_state["disc"])
        save_reply(round_file(folder, rnd), {"reply": reply, "d_state": d_state})
    return P.GanTrainReply(**reply)
