"""Site side of the BN-statistics mode: federated DP-SGD of the shared net, then one DP statistics release.

The site fixes its whole plan at the run's first request (``train.bnnet`` round 1, or ``query.bnstats``
when the coordinator provides the net and no site trains it) with the one planner, ``client.budget``:
the statistics release (with ``layer-clips = auto`` together with the DP choice of its clip bounds,
``client.auto_clip``) gets ``stats-share`` of the run's epsilon (all of it with a provided net), the
DP-SGD steps the rest, and everything must also fit the site's own budget. Re-sent requests get the
reply already released; an interrupted release reuses its charge.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import torch
from flwr.app import Context, Message

from client.auto_clip import choose_layer_clips
from client.bnstats import expected_release_keys, record_class_statistics, release_noise_std, release_num_bytes
from client.budget import (MAX_USEFUL_NOISE, PlanRequest, RunPlan, expected_batch, is_private, plan_for_site,
                           validate_plan_request)
from client.census import (census_weight, check_no_census_drawn, check_plan_possible,
                           check_secure_room, run_census, secure_weight)
from client.charged_work import charged_work
from client.dpsgd import DPSGD_CHUNK, train_dpsgd_local
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
    run_dir,
    save_reply,
    site_data,
    site_device,
    site_handler,
)
from client.row_check import bnnet_problems, check_network_rows
from client.site import SiteSettings, data_fingerprint, open_ledger
from common import protocol as P
from common.accounting import calibrate_noise_multiplier
from common.bnnet import RECORD_BLOCK_ROWS, BNNet, norm_layer_names
from common.data import ImageDataset
from common.wire import quoted

log = logging.getLogger("fedsynth.site")
AUTO = "auto"


def net_round_file(folder, rnd: int):
    """Where the site saves its reply of the shared net's round ``rnd`` in the run's ``folder``."""
    return folder / f"net-round-{rnd}.pt"


def stats_file(folder):
    """Where the site saves the run's one statistics release in the run's ``folder``."""
    return folder / "stats-release.pt"


def check_net_work(req: P.BnPlanSettings, site: WorkLimits, build) -> float:
    """Refuse a run beyond the site's work limits (client.limits): the shared net's DP-SGD steps, when the site trains
    it, and the release's pass over the records in fixed blocks (so a run whose release would not fit is refused
    before its training rounds are charged). ``build`` makes the net; here on the meta device (shapes only). Returns
    the MB the run keeps in the site's state folder."""
    meta_net = meta_module(build)
    trains = req.net_rounds > 0  # else the coordinator provides the net: no DP-SGD step at this site

    def forward(rows: int) -> None:
        meta_net(torch.zeros(rows, req.channels, req.image_size, req.image_size))

    # a net a round, and the release (2 K sum C_l + K values: twice the head at many classes, review s62)
    release = expected_release_keys(meta_net, req.num_classes)
    kept_mb = (req.net_rounds * saved_file_bytes(parameter_count(meta_net), len(list(meta_net.parameters())))
               + saved_file_bytes(release_num_bytes(meta_net, req.num_classes) // 4, len(release))) / 2**20
    check_work(site, networks={"shared net": parameter_count(meta_net)}, kept_mb=kept_mb,
               others_mb=other_runs_mb(site, req.experiment),
               batch_size=req.batch_size if trains else 0, steps_per_run=req.net_rounds * req.local_steps,
               steps=((Step("one DP-SGD step of the shared net", DPSGD_CHUNK, forward, backward="dpsgd",
                            gradient_rows=DPSGD_CHUNK, dpsgd_network="shared net", gradient_copies=2,
                            ask="a narrower net (bn-width)"),) if trains else ())
               + (Step(f"one {RECORD_BLOCK_ROWS}-record block of the statistics release", RECORD_BLOCK_ROWS, forward,
                       backward="", ask="a narrower net (bn-width) or a lower bn-resolution"),))
    return kept_mb


def _setup(req: P.BnPlanSettings, net_state: dict, site: SiteSettings, saved_file: Callable[[Path], Path],
           device: torch.device, *, secure: bool = False, secure_round: bool = False):
    """Checks both requests share; returns (data, net, ledger, run folder, plan, census or None). ``saved_file``: where
    the run's folder keeps this request's saved reply (a re-send, answered from it, needs no room on the disk);
    ``secure``: the run's statistics go into a SecAgg+ sum; ``secure_round``: the net is this site's model of a
    secure FedAvg round (train.bnnet in a SecAgg+ sum)."""
    require_mode(site, "bnstats")
    if not 1 <= req.noise_shares <= P.SECURE_SUM_MAX_SITES:  # (review s61: a train.bnnet's was never checked)
        raise Refusal(P.REFUSED_BAD_REQUEST, f"noise-shares must be 1 (no split) to {P.SECURE_SUM_MAX_SITES}, got "
                                             f"{req.noise_shares}")
    if req.noise_shares != 1 and not site.allow_distributed_noise:  # before the census: a run this site will
        #                                                            refuse at its release must cost it nothing
        raise Refusal(P.REFUSED_NOT_ALLOWED, "this site adds all of its statistics' noise itself: its operator has "
                                             "not allowed distributed noise (allow_distributed_noise in site.yaml); "
                                             "run with distributed-noise = false")
    if req.noise_shares != 1 and str(req.layer_clips).strip() == AUTO:  # (review s60: noise_share)
        raise Refusal(P.REFUSED_BAD_REQUEST, "distributed noise needs clip bounds every site shares: layer-clips=auto "
                                             "lets each site choose its own; set bn-layer-clips to bounds, or run "
                                             "with distributed-noise = false")
    if req.noise_shares != 1 and site.delta_bound > P.DEFAULT_DELTA_BOUND:  # (its published bound: nothing new)
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"distributed noise needs every site's delta at most "
                                             f"{P.DEFAULT_DELTA_BOUND:g}; this site's operator set a larger one: "
                                             "run with distributed-noise = false")
    data = site_data(site)
    check_schema(data, req.channels, req.image_size, req.image_size, req.num_classes)
    check_recipe(req)  # seed, learning rate, clip bounds, count weight: each in the protocol's range
    if req.width < 1:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"width must be >= 1, got {req.width}")

    def build() -> BNNet:
        return BNNet(req.channels, req.num_classes, req.image_size, req.width, head_norm=req.head_norm,
                     resolution=req.resolution)

    try:
        trains = req.net_rounds > 0  # else the coordinator provides the net: no DP-SGD step at this site
        kept_mb = check_net_work(req, site, build)
        net = build()
    except (ValueError, RuntimeError, TypeError, OverflowError) as err:  # (a Refusal passes) from the request alone
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the shared net's shape cannot be built: {quoted(str(err))}") from None
    problems = P.check_arrays(net_state, P.state_spec(net.state_dict()))
    if problems:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the net sent does not match the run's shape: {problems[:3]}")
    P.load_state(net, net_state)
    clips = _clip_bounds(req, net)  # layer-clips that do not fit the net's layers: refused before the census, too
    if secure_round:  # a net no census could bring inside the sum's range: refused before the census (review s61)
        check_secure_room(1.0, net_state)
    if secure:  # statistics whose noise may leave the sum's range: refused before the census too (review s61)
        _check_stats_room(_largest_noise(req, site), clips, req.count_weight)
    folder = run_dir(site, req.experiment)
    if not saved_file(folder).exists():  # new work, to be charged: the disk must have room for the run's files
        check_free_disk(site, folder, kept_mb)
    preq = PlanRequest(mode="bnstats", epsilon=req.epsilon, rounds=req.net_rounds, steps=req.local_steps,
                       batch_size=req.batch_size, census=True, stats_share=req.stats_share,
                       auto_clip=str(req.layer_clips).strip() == AUTO)
    validate_plan_request(preq)  # a malformed request costs nothing, not even the census
    check_plan_possible(folder, preq, site, data, req.experiment)  # before a new ledger is started (its noisy size is charged)
    if not saved_file(folder).exists():  # new work: the shape must compute each record's rows alone (review s63;
        # a re-send of a saved reply computes nothing, and a check not remembered must not refuse it: the sixth)
        check_network_rows(site.state_dir, "shared net", {"channels": req.channels, "side": req.image_size,
                                                          "classes": req.num_classes, "width": req.width,
                                                          "head-norm": req.head_norm, "resolution": req.resolution,
                                                          "gradients": trains}, net,
                           lambda on: bnnet_problems(build(), data.image_shape, req.num_classes, gradients=trains,
                                                     device=on), device)
    ledger = open_ledger(site, data)
    if not trains:
        check_no_census_drawn(ledger, folder, req.experiment)
    # a run that trains the net draws its census first: the plan's sampling rate is set from its noisy total
    census = run_census(data, ledger, folder, mode="bnstats", experiment=req.experiment, epsilon=req.epsilon,
                        budget=site.epsilon_budget, delta_bound=site.delta_bound,
                        fingerprint=data_fingerprint(data)) if trains else None
    plan = plan_for_site(site, ledger, folder, preq, req.experiment, census=census)
    return data, net, ledger, folder, plan, census


@site_handler
def handle_train_bnnet(msg: Message, context: Context, site: SiteSettings) -> Message:
    """The train.bnnet handler (in the clear: refused where the operator requires secure aggregation)."""
    require_plain_allowed(site)
    req = P.BnTrainRequest.from_message(msg)
    release = net_round_file(run_dir(site, req.experiment), req.server_round)
    return answer_in_clear(release, req, lambda: train_bnnet(req, context, site)).as_reply(msg)


def train_bnnet(req: P.BnTrainRequest, context: Context, site: SiteSettings, *,
                secure: bool = False) -> P.BnTrainReply:
    """One federated DP-SGD round of the shared net at the site; the typed reply (``secure``: into a SecAgg+ sum)."""
    if not 1 <= req.server_round <= req.net_rounds:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"round {req.server_round} is outside the run's 1..{req.net_rounds}")
    device = site_device(context)
    data, net, ledger, folder, plan, census = _setup(req, req.net, site, lambda f: net_round_file(f, req.server_round),
                                                     device, secure=secure, secure_round=secure)
    path = net_round_file(folder, req.server_round)
    saved = load_saved(path)
    if saved is None:
        weight = secure_weight(census, req.net) if secure else census_weight(census)
        train = plan.train_round(req.local_steps)
        with charged_work(ledger, [train], data, site, purpose="bnstats-net", run=req.experiment,
                          rnd=req.server_round, folder=folder, run_epsilon=req.epsilon) as spent:
            log.info("[%s] net round %d: DP-SGD on its records (sigma=%.3f); epsilon spent now %.3f", site.name,
                     req.server_round, train.noise_multiplier, spent.epsilon)
            train_dpsgd_local(net, data, noise_multiplier=train.noise_multiplier, sample_rate=train.sample_rate,
                              steps=train.steps, max_grad_norm=req.max_grad_norm, lr=req.lr,
                              device=device,
                              expected_batch=expected_batch(plan, census))
            saved = {"reply": {"net": {k: torch.from_numpy(v) for k, v in P.state_arrays(net).items()},
                               "weight": weight}}
            save_reply(path, saved)
    return P.BnTrainReply(**saved["reply"])


def _clip_detail(req: P.BnPlanSettings) -> float | str | list[float]:
    """The clip bounds as the ledger records them: parsed (the coordinator's string is never copied: review s56
    found a 10 MB one), 'auto', or the single bound."""
    raw = str(req.layer_clips).strip()
    return req.clip if not raw else raw if raw == AUTO else [float(b) for b in raw.split(",")]


def _clip_bounds(req: P.BnPlanSettings, net: BNNet) -> float | dict[str, float] | None:
    """One flat bound, one per norm layer (in the net's layer order) when ``layer-clips`` lists them, or
    None for ``auto`` (chosen privately from the data just before the release)."""
    raw = str(req.layer_clips).strip()
    if not raw:
        return float(req.clip)
    if raw == AUTO:
        return None
    layers = norm_layer_names(net)
    try:
        bounds = [float(b) for b in raw.split(",")]
    except ValueError:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"layer-clips must be numbers, got {quoted(raw)}") from None
    if len(bounds) != len(layers) or not all(b > 0 and math.isfinite(b) for b in bounds):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"layer-clips needs {len(layers)} positive bounds for the layers "
                                             f"{layers}, got {quoted(raw)}")
    return dict(zip(layers, bounds))


def noise_share(sigma: float, req: P.BnStatsRequest) -> float:
    """The noise multiplier this site adds to its statistics release when ``req`` splits the noise over t =
    ``noise_shares`` sites of a secure sum, so that every sum of t honest sites' releases carries at least
    ``sigma``, its plan's (what its ledger charges), whatever the other sites' plans.

    Each site's sigma is its own (its delta, its budget, its reserved queries), so t shares of sigma / sqrt(t) each
    carried less than the largest sigma among them (review s60: 0.80 of it, epsilon 2.43 where 1.92 was charged).
    But every honest site's statistics fit the run's epsilon, or its stats-share of it when the net is trained, at
    a delta of at most DEFAULT_DELTA_BOUND (checked in _setup), so each sigma is at least the public ``floor``
    calibrated there, and each site adds at least floor^2 / t in variance; this site then adds what the other t - 1
    may fall short of: sigma^2 - (t - 1) floor^2 / t (sigma^2 / t when every plan is the floor's)."""
    t = req.noise_shares
    if t == 1 or sigma == 0:
        return sigma
    target = req.epsilon * (req.stats_share if req.net_rounds > 0 else 1.0)
    tol = 1e-4
    # (calibrate returns the least feasible multiplier to within tol, above it: the floor errs low)
    floor = calibrate_noise_multiplier(target, P.DEFAULT_DELTA_BOUND, 1.0, 1, tol=tol) * (1 - 2 * tol)
    return math.sqrt(max(sigma ** 2 - (t - 1) * floor ** 2 / t, sigma ** 2 / t))


def _release(plan: RunPlan, net: BNNet, data: ImageDataset, clips, req: P.BnStatsRequest, device, site,
             sigma: float, secure: bool) -> dict:
    # The ledger charges plan.stats (the guarantee of the sum, which carries all the noise); with distributed
    # noise this site adds only its share of it, ``sigma`` (noise_share; its own release alone has that much less).
    if clips is None and sigma > 0:
        clips = choose_layer_clips(net, data, noise_multiplier=plan.clip_choice.noise_multiplier, device=device)
        if secure:  # bounds the sum's range has room for: post-processing of their DP choice (review s61)
            clips = _within_room(clips, sigma, req.count_weight)
        log.info("[%s] chose per-layer clip bounds privately (z=%.1f): %s", site.name,
                 plan.clip_choice.noise_multiplier, ", ".join(f"{k}={v:.3g}" for k, v in clips.items()))
    clip = clips if sigma > 0 else math.inf
    # the counts' integer noise is exact only whole: a share of the noise for a secure sum stays continuous
    return record_class_statistics(net, data, clip_bound=clip, noise_multiplier=sigma, count_weight=req.count_weight,
                                   device=device, integer_counts=req.noise_shares == 1)


@site_handler
def handle_bnstats(msg: Message, context: Context, site: SiteSettings) -> Message:
    """The query.bnstats handler (in the clear: refused where the operator requires secure aggregation)."""
    require_plain_allowed(site)
    req = P.BnStatsRequest.from_message(msg)
    release = stats_file(run_dir(site, req.experiment))
    return answer_in_clear(release, req, lambda: release_bnstats(req, context, site)).as_reply(msg)


def release_bnstats(req: P.BnStatsRequest, context: Context, site: SiteSettings, *,
                    secure: bool = False) -> P.BnStatsReply:
    """The site's one DP statistics release of the run; the typed reply. ``secure``: it goes into a SecAgg+
    sum (only then may the request split the noise over several sites)."""
    if req.noise_shares != 1 and not (secure and 2 <= req.noise_shares <= P.SECURE_SUM_MAX_SITES):
        raise Refusal(P.REFUSED_BAD_REQUEST, "distributed noise (noise-shares > 1) is only for releases inside a "
                                             "secure aggregation; in the clear a site adds all of the noise")
    device = site_device(context)
    data, net, ledger, folder, plan, _ = _setup(req, req.net, site, stats_file, device, secure=secure)
    path = stats_file(folder)
    saved = load_saved(path)
    if saved is not None:
        _check_resend(saved, req)
    if saved is None:
        clips = _clip_bounds(req, net)  # a malformed request is refused before anything is charged
        events = ([plan.clip_choice] if plan.clip_choice else []) + [plan.stats]
        own = noise_share(plan.stats.noise_multiplier, req)
        if secure:  # (auto clips, chosen inside the release from a DP histogram: the counts' noise here, the
            _check_stats_room(own, clips, req.count_weight)  # bounds capped there: _release)
        details = {"clip": _clip_detail(req), "count-weight": req.count_weight,
                   **({"distributed-noise-shares": req.noise_shares, "own-noise-multiplier": own}
                      if req.noise_shares > 1 else {})}
        with charged_work(ledger, events, data, site, purpose="bnstats-release", run=req.experiment, rnd=0,
                          folder=folder, details=details, run_epsilon=req.epsilon) as spent:
            stats = _release(plan, net.eval(), data, clips, req, device, site, own, secure)
            log.info("[%s] released DP class statistics (sigma=%.3f); epsilon spent now %.3f", site.name,
                     plan.stats.noise_multiplier, spent.epsilon)
            saved = {"reply": {"stats": {k: torch.from_numpy(v) for k, v in stats.items()}},
                     "noise_shares": req.noise_shares}
            save_reply(path, saved)
    return P.BnStatsReply(**saved["reply"])


def _largest_noise(req: P.BnPlanSettings, site: SiteSettings) -> float:
    """The largest noise multiplier this site may add to the run's statistics: its share (``noise_share``) of the
    most any plan uses (MAX_USEFUL_NOISE; a plan that needs more is refused); 0 for a run that is not private (an
    epsilon of inf at a site whose budget is finite is private, planned within the budget: review s61's eleventh).
    Checked before the census, the room then holds for whatever plan the census, the budget and the ledger give
    (review s61: checked at the least noise, a run whose small budget planned more paid its census, or with a
    plan limited by the budget its training rounds too, before its statistics were refused)."""
    if not is_private(req.epsilon, site.epsilon_budget):
        return 0.0
    try:
        return noise_share(MAX_USEFUL_NOISE, req)
    except ValueError:  # (an epsilon too small for the floor: the plan check refuses it; a share is at most sigma)
        return MAX_USEFUL_NOISE


def _within_room(clips: dict[str, float], sigma: float, count_weight: float) -> dict[str, float]:
    """Per-layer bounds capped so that 8 noise stds plus one record's bound fit the secure sum's range (each
    layer's noise std is sigma * Delta * c_l * sqrt(L): linear in its own bound)."""
    from common import secure_wire

    per_unit = secure_wire.STATS_NOISE_ROOM * release_noise_std(sigma, {n: 1.0 for n in clips}, count_weight)["sum"]
    cap = 0.99 * P.SECAGG_CLIPPING_RANGE / (per_unit + 1.0)
    return {n: min(c, cap) for n, c in clips.items()}


def _check_stats_room(own: float, clips: float | dict[str, float] | None, count_weight: float) -> None:
    """Refuse a secure release whose public noise or clip bounds leave no room in the sum's range (with auto clips,
    ``clips`` None, its counts' noise alone). Before its charge."""
    from common import secure_wire

    stds = release_noise_std(own, 1.0 if clips is None else clips, count_weight)
    if clips is None:
        stds = {"count": stds["count"]}
    try:
        secure_wire.check_stats_room(stds, 1.0 if clips is None else
                                     max(clips.values()) if isinstance(clips, dict) else clips)
    except secure_wire.RangeError as err:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"{err}: this site cannot add its statistics to a secure sum") from None


def _check_resend(saved: dict, req: P.BnStatsRequest) -> None:
    """Refuse to send a saved release again in another way than it was made.

    A release made with its noise split over t sites (inside a secure aggregation, t = noise_shares) carries
    1/sqrt(t) of the noise its charge assumes; sent again in the clear, or into a sum of fewer releases, it would
    be seen with that little noise. So it goes out again only with the same noise_shares, and a request for t > 1
    is refused in the clear before this point (``release_bnstats``). A release saved by a fedsynth that did not keep
    the split with it (before 2026-12-06) is not sent again: its charge's details cannot always tell (an interrupted
    plain attempt's charge was reused by a split one)."""
    if "noise_shares" not in saved:
        raise Refusal(P.REFUSED_BAD_REQUEST, "this run's statistics were released by an older fedsynth, which did not "
                                             "record how their noise was split; they are not sent again: start a new "
                                             "experiment")
    made = int(saved["noise_shares"])
    if made != req.noise_shares:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"this run's statistics were released with their noise split over "
                                             f"{made} site(s); they are sent again only the same way "
                                             f"(noise-shares {made}), not with {req.noise_shares}")
