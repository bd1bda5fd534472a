"""The site's budget planner: one plan per run, for both synthesis modes, fixed at the run's first request.

A plan lists every DP release the run may make at this site (with the mechanism of each) and chooses
the noise of the tunable ones, so that

  (a) everything the run may release stays within the epsilon the run asks for, and
  (b) everything this dataset has ever released plus the run stays within the site's own budget, read at the
      ledger's one Renyi order (``client.ledger_order``; (a) is read at the best order: a run's plan is fixed).

The coordinator never sets a noise level: it only asks for an amount of work and an epsilon (for the DP-GAN,
optionally a longer schedule and extra generator steps, free in privacy, that a site takes only where its own noisy
census says it is large: ``client.site_schedule``). A plan is persisted in the run's folder and enforced: a later
request that changes what fixed it is refused.

Releases of a run (``RunPlan``):

==============  ===============================================  ======================================
component       mechanism                                        when
==============  ===============================================  ======================================
census          Gaussian class histogram, sensitivity 1,         first training request of the run, on
                z = CENSUS_NOISE (FedAvg weight, G's labels,     its own, before the plan: the plan's
                the DP-GAN's schedule, the plan's sampling rate) sampling rate is set from its total
train           DP-SGD: Poisson rate q, clip C, noise sigma*C,   every training round (steps each)
                rounds x steps compositions                      -- sigma tuned
clip_choice     Gaussian histogram of block norms, sens. sqrt L  BN release with layer-clips = auto
stats           Gaussian release of counts and clipped sums      query.bnstats -- sigma tuned
evaluation      Gaussian (K, 2) correct/wrong table, sens. 1     each evaluation query (reserved x cap)
audit           Gaussian distance histograms, sensitivity 1      each audit query (reserved x cap)
==============  ===============================================  ======================================

Evaluation and audit queries are reserved only when the site's operator allows them; the reserve is
part of (a), so a run that uses them still ends within its epsilon.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.auto_clip import AUTO_CLIP_NOISE_MULTIPLIER as AUTO_CLIP_NOISE
from client.refusal import Refusal
from common import protocol as P
from common.accounting import BudgetTooSmall, DPEvent, calibrate_noise_multiplier, epsilon_for
from common.config import MODES
from common.files import atomic_write_json

if TYPE_CHECKING:
    from client.ledger import PrivacyLedger
    from client.site import SiteSettings

# Above this noise multiplier DP-SGD updates or statistics are pure noise: a plan that needs more is a
# budget too small for the requested work, refused instead of silently training on noise.
MAX_USEFUL_NOISE = 50.0

# A run's plan, in the site's folder of the run
PLAN_FILE = "plan.json"


def census_purpose(mode: str) -> str:
    """The ledger purpose of a run's census, charged on its own before the run's plan (client.census.run_census)."""
    return f"{mode}-census"


@dataclass(frozen=True)
class PlanRequest:
    """What a run asks of a site (from its first request), plus the site's own query policy."""

    mode: str  # "dpgan" | "bnstats"
    epsilon: float  # the most the run may spend here (inf = non-private, only with an unlimited budget)
    rounds: int  # training rounds (0: the BN net is provided, no DP-SGD)
    steps: int  # DP-SGD steps per round
    batch_size: int  # expected Poisson batch
    census: bool = True  # draw the per-run noisy class histogram (FedAvg weight, G's labels)
    stats_share: float = 0.0  # bnstats: share of epsilon for the statistics release (when the net is trained)
    auto_clip: bool = False  # bnstats: clip bounds chosen privately
    evaluation_queries: int = 0  # reserved evaluation queries (the site's cap, if it allows evaluation)
    audit_queries: int = 0  # reserved audit queries
    # dpgan: (name, value) of the settings that fix the shapes of the state a site keeps between rounds (D, the Adam
    # moments of D and G: client.gan_site), so that a round changing one is refused before its charge
    architecture: tuple[tuple[str, Any], ...] = ()

    def fixed_by(self) -> dict[str, Any]:
        """The settings that fix a plan; a later request that changes one of them is refused (``plan_changes``)."""
        skip = ("evaluation_queries", "audit_queries", "architecture")
        return {**{k: v for k, v in asdict(self).items() if k not in skip},
                **{ARCHITECTURE + k: v for k, v in self.architecture}}


ARCHITECTURE = "architecture."  # prefix of a plan's architecture settings (none in a plan made before 2026-12-06)


@dataclass(frozen=True)
class RunPlan:
    request: dict
    delta: float
    sample_rate: float
    census: DPEvent | None
    train_sigma: float  # DP-SGD noise multiplier of every training step
    clip_choice: DPEvent | None
    stats: DPEvent | None
    evaluation: DPEvent | None  # one evaluation query
    audit: DPEvent | None  # one audit query
    evaluation_queries: int
    audit_queries: int
    planned_epsilon: float  # epsilon of the whole plan on its own (<= the run's epsilon)
    budget_limited: bool = False  # the site's budget (at its ledger's order), not the run's epsilon, set the noise
    extra: dict = field(default_factory=dict)
    order: float | None = None  # the ledger's Renyi order the site's total was read at (None: a plan before it)

    def train_round(self, steps: int) -> DPEvent:
        """The DP-SGD event of one training round of ``steps`` steps."""
        return DPEvent(self.train_sigma, self.sample_rate, steps)

    def training_events(self, rounds: int, steps: int) -> list[DPEvent]:
        """Every release of the run but its evaluation and audit queries: census, clip choice, statistics, rounds."""
        events = [e for e in (self.census, self.clip_choice, self.stats) if e is not None]
        if rounds:
            events.append(self.train_round(rounds * steps))
        return events

    def all_events(self, rounds: int, steps: int) -> list[DPEvent]:
        events = self.training_events(rounds, steps)
        events += [self.evaluation] * self.evaluation_queries if self.evaluation else []
        events += [self.audit] * self.audit_queries if self.audit else []
        return events

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("census", "clip_choice", "stats", "evaluation", "audit"):
            value = getattr(self, key)
            out[key] = value.to_dict() if value is not None else None
        return out

    @classmethod
    def from_json(cls, d: dict) -> "RunPlan":
        d = dict(d)
        for key in ("census", "clip_choice", "stats", "evaluation", "audit"):
            d[key] = DPEvent.from_dict(d[key]) if d.get(key) is not None else None
        return cls(**d)


def is_private(epsilon: float, budget: float) -> bool:
    """A run is private unless it asks for no privacy (epsilon inf) at a site whose budget is unlimited."""
    return math.isfinite(epsilon) or math.isfinite(budget)


def census_event(private: bool) -> DPEvent:
    """The run's census: one Gaussian class histogram, sensitivity 1, z = CENSUS_NOISE (no noise in a non-private
    run). What ``client.census.run_census`` charges, and what the plan counts in the run's epsilon."""
    return DPEvent(P.CENSUS_NOISE if private else 0.0, 1.0, 1)


def _fixed_events(req: PlanRequest, private: bool) -> dict[str, DPEvent | None]:
    """The releases whose noise is a protocol constant (or zero in a non-private run)."""
    z = (lambda noise: noise if private else 0.0)
    return {
        "census": census_event(private) if req.census and req.rounds else None,
        "clip_choice": DPEvent(z(AUTO_CLIP_NOISE), 1.0, 1) if req.mode == "bnstats" and req.auto_clip and private else None,
        "evaluation": DPEvent(z(P.EVALUATION_NOISE), 1.0, 1) if req.evaluation_queries else None,
        "audit": DPEvent(z(P.AUDIT_NOISE), 1.0, 1) if req.audit_queries else None,
    }


def _reserve(fixed: dict[str, DPEvent | None], req: PlanRequest) -> list[DPEvent]:
    out = [e for k, e in fixed.items() if e is not None and k in ("census", "clip_choice")]
    if fixed["evaluation"] is not None:
        out += [fixed["evaluation"]] * req.evaluation_queries
    if fixed["audit"] is not None:
        out += [fixed["audit"]] * req.audit_queries
    return out


def _tuned(req: PlanRequest, target: float, delta: float, q: float, reserve: list[DPEvent],
           clip_choice: DPEvent | None) -> tuple[float, DPEvent | None]:
    """(DP-SGD sigma, statistics event) that keep reserve + the plan within ``target`` (raises BudgetTooSmall)."""
    total_steps = req.rounds * req.steps
    if req.mode == "dpgan":
        return calibrate_noise_multiplier(target, delta, q, total_steps, prior=reserve), None
    # bnstats: the statistics get stats_share of the target (all of it when the net is provided), DP-SGD the rest
    # (with the net trained, the statistics' share is of the target with only the clip-bound choice before
    # it; without training, the statistics take whatever the reserved releases leave of the target)
    if total_steps:
        stats_target = req.stats_share * target
        stats_prior = [clip_choice] if clip_choice is not None else []
    else:
        stats_target, stats_prior = target, reserve
    sigma_stats = calibrate_noise_multiplier(stats_target, delta, 1.0, 1, prior=stats_prior)
    stats = DPEvent(sigma_stats, 1.0, 1)
    if not total_steps:
        return 0.0, stats
    return calibrate_noise_multiplier(target, delta, q, total_steps, prior=[*reserve, stats]), stats


def validate_plan_request(req: PlanRequest) -> None:
    """Refuse a request no plan can serve, from its settings alone (before anything is charged)."""
    if req.mode not in MODES:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"unknown mode {req.mode!r}")
    if req.rounds < 0 or (req.mode == "dpgan" and req.rounds < 1) or (req.rounds and (req.steps < 1 or
                                                                          req.batch_size < 1)):
        raise Refusal(P.REFUSED_BAD_REQUEST, "rounds, local steps and batch size must be positive")
    if req.mode == "bnstats" and req.rounds and not 0 < req.stats_share <= 1:
        raise Refusal(P.REFUSED_BAD_REQUEST, "stats-share must be in (0, 1]")
    if not req.epsilon > 0:
        raise Refusal(P.REFUSED_BAD_REQUEST, "the run's epsilon must be > 0")


_SITE_TOL = 0.002  # the site fit's bisection: a noise at most 0.2 % above the least that fits (one order: cheap)


def _fit_to_site(req: PlanRequest, q: float, delta: float, budget: float, order: float | None, prior: list[DPEvent],
                 reserve: list[DPEvent], sigma: float, stats: DPEvent | None) -> tuple[float, DPEvent | None] | None:
    """(sigma, stats) with the tuned release's noise raised until prior + the plan fit ``budget`` at ``order`` (the
    run's own plan already fits the run's epsilon: more noise keeps it so); None where no noise can (the caller then
    shrinks the whole plan, statistics included)."""
    try:
        if req.rounds:
            fixed = [*prior, *reserve, *([stats] if stats else [])]
            return max(sigma, calibrate_noise_multiplier(budget, delta, q, req.rounds * req.steps, prior=fixed,
                                                         tol=_SITE_TOL, order=order)), stats
        least = calibrate_noise_multiplier(budget, delta, 1.0, 1, prior=[*prior, *reserve], tol=_SITE_TOL, order=order)
        return sigma, DPEvent(max(stats.noise_multiplier, least), 1.0, 1)
    except BudgetTooSmall:
        return None


def make_plan(req: PlanRequest, *, num_records: float, delta: float, budget: float, prior: list[DPEvent],
              order: float | None = None) -> RunPlan:
    """The run's plan at this site (module docstring); raises :class:`Refusal` with a public reason.

    ``num_records``: the size the sampling rate is set from. At a site it is the noisy total of the run's census
    (``client.census.run_census``), never the record count: every choice and refusal here is then a function of
    DP releases and public settings only (see ``plan_for_site``). ``order``: the ledger's Renyi order, at which
    prior + the plan must fit ``budget`` (None: the best order, for a caller without a ledger)."""
    validate_plan_request(req)
    q = min(1.0, req.batch_size / max(1.0, float(num_records)))
    private = is_private(req.epsilon, budget)
    fixed = _fixed_events(req, private)
    reserve = _reserve(fixed, req)
    if not private:  # the run asks for no privacy and the site's budget is unlimited: the operator allows it
        stats = DPEvent(0.0, 1.0, 1) if req.mode == "bnstats" else None
        return RunPlan(request=req.fixed_by(), delta=delta, sample_rate=q, census=fixed["census"], train_sigma=0.0,
                       clip_choice=None, stats=stats, evaluation=fixed["evaluation"], audit=fixed["audit"],
                       evaluation_queries=req.evaluation_queries, audit_queries=req.audit_queries,
                       planned_epsilon=math.inf)

    def events_of(sigma: float, stats: DPEvent | None) -> list[DPEvent]:
        return [*reserve, *([stats] if stats else []), *([DPEvent(sigma, q, req.rounds * req.steps)] if req.rounds
                                                          else [])]

    def events_for(target: float) -> tuple[float, DPEvent | None, list[DPEvent]]:
        sigma, stats = _tuned(req, target, delta, q, reserve, fixed["clip_choice"])
        return sigma, stats, events_of(sigma, stats)

    spent = epsilon_for(prior, delta)  # (for the refusal's words: what the releases before cost)
    upper = min(req.epsilon, budget)  # a non-private request against a finite budget gets what is left
    try:
        sigma, stats, events = events_for(upper)
    except BudgetTooSmall as err:
        reserved = (f" (before it: the {req.evaluation_queries} evaluation and {req.audit_queries} audit queries this "
                    "site reserves: a larger epsilon pays for them)" if req.evaluation_queries or req.audit_queries else "")
        raise Refusal(P.REFUSED_BUDGET, "the requested work does not fit this site's privacy budget",
                      f"the run's epsilon {upper:g} cannot pay for this plan: {err}{reserved}") from None
    limited = False
    if epsilon_for([*prior, *events], delta, order) > budget + 1e-9 \
            and (fitted := _fit_to_site(req, q, delta, budget, order, prior, reserve, sigma, stats)) is not None:
        limited = True
        sigma, stats = fitted
        events = events_of(sigma, stats)
    if epsilon_for([*prior, *events], delta, order) > budget + 1e-9:
        # Shrink the run's share until prior + plan fits the site's budget (epsilon is monotone in it).
        limited = True
        lo, hi = 0.0, upper
        best = None
        for _ in range(14):
            mid = 0.5 * (lo + hi)
            try:
                candidate = events_for(mid)
            except BudgetTooSmall:
                lo = mid
                continue
            if epsilon_for([*prior, *candidate[2]], delta, order) <= budget + 1e-9:
                best, lo = candidate, mid
            else:
                hi = mid
        if best is None:
            raise Refusal(P.REFUSED_BUDGET, "the requested work does not fit this site's privacy budget",
                              f"this dataset has spent epsilon {spent:.4g} of its budget {budget:g}; no noise "
                              f"level leaves room for the run's plan")
        sigma, stats, events = best
    for value, what in ((sigma, "DP-SGD steps"), (stats.noise_multiplier if stats else 0.0, "statistics release")):
        if value > MAX_USEFUL_NOISE:
            raise Refusal(P.REFUSED_BUDGET, f"the privacy budget is too small for the requested {what}: ask "
                                                "for fewer rounds or steps or a larger epsilon",
                              f"the {what} would need noise multiplier {value:.3g} (> {MAX_USEFUL_NOISE:g}, where "
                              "nothing is learned)")
    return RunPlan(request=req.fixed_by(), delta=delta, sample_rate=q, census=fixed["census"], train_sigma=sigma,
                   clip_choice=fixed["clip_choice"], stats=stats, evaluation=fixed["evaluation"],
                   audit=fixed["audit"], evaluation_queries=req.evaluation_queries, audit_queries=req.audit_queries,
                   planned_epsilon=epsilon_for(events, delta), budget_limited=limited, order=order)


def load_or_make_plan(path: Path, req: PlanRequest, *, num_records: int, delta: float, budget: float,
                      prior: list[DPEvent], order: float | None = None) -> tuple[RunPlan, bool]:
    """(the run's plan, whether it was made just now): read back if the run fixed one, else made and saved; a
    request that changes what fixed the plan is refused (:func:`check_plan_kept`)."""
    if path.exists():
        plan = RunPlan.from_json(json.loads(path.read_text()))
        check_plan_kept(plan.request, req.fixed_by())
        return plan, False
    plan = make_plan(req, num_records=num_records, delta=delta, budget=budget, prior=prior, order=order)
    atomic_write_json(path, plan.to_json())
    return plan, True


def plan_changes(recorded: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """The settings ``asked`` changes from those a run's plan ``recorded`` (empty: none). An architecture setting is
    named with its value at the first request and now (both the coordinator's); one a plan lacks (made before they
    were recorded) is "not recorded", not a change (client.gan_site compares the saved state instead)."""
    return [f"{k}: {recorded[k]!r} at the first request, {v!r} now" if k.startswith(ARCHITECTURE) else k
            for k, v in sorted(asked.items())
            if (k in recorded or not k.startswith(ARCHITECTURE)) and recorded.get(k) != v]


def check_plan_kept(recorded: dict[str, Any], asked: dict[str, Any]) -> None:
    """Refuse (bad request) a request whose settings ``asked`` change those its run's plan ``recorded`` at the run's
    first request (:func:`plan_changes`), naming them: the coordinator's own settings, never a value of the plan."""
    if changed := plan_changes(recorded, asked):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the request changes settings fixed at the run's first request "
                                             f"({', '.join(changed)}); start a new experiment instead")


def public_size(census: list[float] | None) -> float:
    """The size a run's sampling rate and expected batch are set from: the noisy total of its census (at least 1;
    1 for a run without a census, which takes no DP-SGD step)."""
    return max(1.0, float(sum(census))) if census else 1.0


def expected_batch(plan: RunPlan, census: list[float] | None) -> int:
    """The expected Poisson batch DP-SGD divides its noisy sum by: sampling rate x the census's noisy total.
    Public (post-processing of the census); the realised batch, or rate x the record count, would not be."""
    return max(1, round(plan.sample_rate * public_size(census)))


def planned_steps(run_dir: Path) -> int | None:
    """The DP-SGD steps per round the run's plan fixed, or None before the run's plan is made."""
    path = run_dir / PLAN_FILE
    return int(json.loads(path.read_text())["request"]["steps"]) if path.exists() else None


def with_query_policy(site: "SiteSettings", req: PlanRequest) -> PlanRequest:
    """``req`` with the evaluation and audit queries the site allows reserved (its published query policy)."""
    queries = site.queries_per_run if site.heldout else 0
    return replace(req, evaluation_queries=queries if site.evaluation else 0, audit_queries=queries if site.audits else 0)


def _check_older_plan_fits(plan: RunPlan, ledger: "PrivacyLedger", run: str, budget: float) -> None:
    """Refuse, before its next charge, a run planned without the ledger's order (by a fedsynth before 2026-12-07, or
    under an unlimited budget: its plan records none) whose whole training plan -- census, clip choice, statistics,
    every round; not the evaluation and audit queries it reserved, each charged and refused on its own -- does not
    fit the budget at the ledger's order beside everything else the dataset released: the ledger would refuse one of
    its later rounds, after charging the ones before (review s64)."""
    training = plan.training_events(int(plan.request["rounds"]), int(plan.request["steps"]))
    if epsilon_for([*ledger.events_except(run=run), *training], ledger.delta, ledger.order) > budget + 1e-9:
        raise Refusal(P.REFUSED_BUDGET, "the requested work does not fit this site's privacy budget",
                      f"the run was planned without the ledger's Renyi order (by a fedsynth before 2026-12-07, or "
                      f"under an unlimited budget); at the ledger's order {ledger.order:g} its whole plan no longer "
                      f"fits the budget {budget:g}, so it is refused before its next charge; start a new run")


def plan_for_site(site: "SiteSettings", ledger: "PrivacyLedger", run_dir: Path, req: PlanRequest, experiment: str,
                  *, census: list[float] | None) -> RunPlan:
    """The run's plan at ``site``, with its query policy reserved (made at the first request, then read back).

    ``census``: the run's noisy class counts, charged and drawn before the plan (``client.census.run_census``);
    None for a run without training rounds (no DP-SGD, so no sampling rate to set). Why the plan reads the census
    and not the record count: the noise a plan needs, and so whether it refuses (noise above MAX_USEFUL_NOISE, a
    budget that cannot pay), depends on the sampling rate batch / n; set from the exact n, a coordinator could vary
    the batch and steps of requests that cost nothing when refused and read n off where the refusals begin. Set
    from the census's noisy total (DP-SGD's accounting holds for any rate fixed before the steps), every decision
    here is post-processing of a charged release."""
    import logging

    req = with_query_policy(site, req)
    # the plan covers the whole run, its census included (charged before the plan, it is in it, not before it)
    prior = ledger.events_except(run=experiment, purpose=census_purpose(req.mode))
    plan, made = load_or_make_plan(run_dir / PLAN_FILE, req, num_records=public_size(census), delta=ledger.delta,
                                   budget=site.epsilon_budget, prior=prior, order=ledger.order)
    if not made and plan.order is None and ledger.order is not None:
        _check_older_plan_fits(plan, ledger, experiment, site.epsilon_budget)
    if made:
        logging.getLogger("fedsynth.site").info(
            "[%s] planned the run: %s mode, DP-SGD sigma %.4f at q %.4f, %s; whole run epsilon %.3f (delta %.2g)%s",
            site.name, req.mode, plan.train_sigma, plan.sample_rate,
            f"statistics sigma {plan.stats.noise_multiplier:.3f}" if plan.stats else "no statistics release",
            plan.planned_epsilon, plan.delta,
            f" -- set by the site's budget (at its ledger's Renyi order {plan.order})" if plan.budget_limited else "")
    return plan
