"""The per-run census: one noisy class histogram a site draws at its first training request of a run.

Mechanism: the exact class counts (K,) plus independent discrete Gaussian noise of std ``noise`` on each
(``protocol.CENSUS_NOISE``); one record changes one count by 1 (L2 sensitivity 1 under add/remove-one
adjacency), so it is ``DPEvent(noise, 1.0, 1)``, charged on its own (:func:`run_census`) before it is
drawn and before the run's plan. It stays on the site; what is built from it is:

- the size the run's plan sets the DP-SGD sampling rate and expected batch from (its noisy total,
  ``client.budget.public_size``), so that no choice or refusal of the plan depends on the record count;
- the FedAvg weight the site sends with every reply of the run, :func:`census_weight` (its noisy total);
- in the DP-GAN mode, the class mix of the generator's labels at this site (under label skew a site
  must not teach the generator classes its discriminator has hardly seen) and the schedule it takes.

The noise comes from the operating system's CSPRNG, never from the coordinator's seed, and it is an exact integer
draw (``client.discrete_gaussian``), so the counts' floating-point bits say nothing beyond their values.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from client.budget import (PLAN_FILE, PlanRequest, census_event, census_purpose, check_plan_kept, is_private,
                           make_plan, public_size, with_query_policy)
from client.discrete_gaussian import noisy_counts
from client.ledger import BudgetExceeded, LedgerDamaged
from client.refusal import Refusal
from common import protocol as P
from common.accounting import epsilon_for
from common.config import MODES
from common.data import ImageDataset
from common.files import atomic_write_json

if TYPE_CHECKING:
    from client.ledger import PrivacyLedger
    from client.site import SiteSettings

CENSUS_FILE = "census.json"

log = logging.getLogger("fedsynth.site")


def load_census(run_dir: Path) -> list[float] | None:
    """This run's noisy class counts at the site, or None when not drawn yet."""
    path = run_dir / CENSUS_FILE
    if not path.exists():
        return None
    return [float(v) for v in json.loads(path.read_text())["noisy-counts"]]


def draw_census(data: ImageDataset, noise: float, run_dir: Path) -> list[float]:
    """Draw (K,) counts + N_Z(0, noise^2) (exact integer noise, ``client.discrete_gaussian``) from the OS CSPRNG and
    keep them on site. Charge it first."""
    noisy = noisy_counts(data.class_counts(), noise)  # (K,) whole numbers
    values = [float(v) for v in noisy]
    atomic_write_json(run_dir / CENSUS_FILE, {"noisy-counts": values, "noise": noise})
    return values


def census_weight(noisy_counts: list[float]) -> float:
    """The site's FedAvg weight: its noisy record total, at least 1 (post-processing of the census)."""
    return public_size(noisy_counts)  # the same noisy total the plan sets its sampling rate from


def secure_weight(noisy_counts: list[float], model: dict) -> float:
    """The FedAvg weight a secure round sends: :func:`census_weight`, held where the model it starts from, weighted,
    would leave the secure sum's range (at most range / its largest value). Post-processing of the census and the
    request (public): a site of some 244,000 records or more, whose honest generator times its total left the range,
    was refused after its census was paid (known and left in reviews s60-s61); it now counts as that many."""
    from common import secure_wire

    weight = census_weight(noisy_counts)
    held = min(weight, secure_wire.largest_weight(model))
    if held < weight:
        log.info("the FedAvg weight of this secure round is held at %.0f (its noisy total is larger) so that the "
                 "weighted model stays inside the secure sum's range", held)
    return held


def check_secure_room(weight: float, model: dict) -> None:
    """Refuse, before a secure round's charge, a model that weighted by ``weight`` (census_weight) would soon leave the
    secure sum's range (common.secure_wire.check_room): a bad request, decided from the request and the census."""
    from common import secure_wire

    try:
        secure_wire.check_room(weight, model)
    except secure_wire.RangeError as err:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"{err}: this site cannot add it to a secure sum") from None


# The ledger purposes of the evaluation and audit queries (client.evaluation): a run queried under them before its
# census cannot then train (run_census).
EVALUATION_PURPOSE, AUDIT_PURPOSE = "evaluation", "audit"
QUERY_PURPOSES = (EVALUATION_PURPOSE, AUDIT_PURPOSE)


def check_census_fits(run_dir: Path, epsilon: float, budget: float, delta_bound: float) -> None:
    """Refuse a run whose census is still to draw and whose epsilon cannot pay it even at the site's published delta
    bound: public values only, so the handlers call it before the ledger is opened (starting a new site's ledger
    charges its noisy size, and a request refused for its own epsilon must cost nothing)."""
    if load_census(run_dir) is None:
        _check_census_paid(epsilon, budget, delta_bound)


def _check_census_paid(epsilon: float, budget: float, delta_bound: float) -> None:
    private = is_private(epsilon, budget)
    if private and epsilon_for([census_event(private)], delta_bound) > epsilon:
        raise Refusal(P.REFUSED_BUDGET, "the run's epsilon is too small for the requested work: ask for a larger "
                                        "epsilon",
                      f"the census alone would spend more than the run's epsilon {epsilon:g}")


def check_plan_possible(run_dir: Path, req: PlanRequest, site: "SiteSettings", data: ImageDataset,
                        experiment: str) -> None:
    """Refuse, before a run's census is drawn and before a new ledger is started (its noisy size is charged), a run
    whose census its epsilon cannot pay (:func:`check_census_fits`, for a run that trains) or whose plan no census
    could make possible (review s60: a stats share of 1, or an epsilon that pays the census but not the queries the
    site reserves, was refused only after the census's charge). The plan at the most favourable values any census
    could give -- a noisy total of 1e15 records; at a site without a ledger yet, the published delta bound and
    nothing spent before -- is refused at every other. (A run with a provided net, no training
    rounds, draws no census: its plan is a function of these public values alone.)

    At a site whose ledger exists, the plan is checked beside what the ledger holds (at its delta and Renyi order,
    as :func:`client.budget.plan_for_site` will): once the budget left could pay for no plan, a run's census was
    charged and then its plan refused, run after run, until the budget was gone with nothing released (review s67,
    1.98 to 2.06 of 3 in eight runs). The ledger's spending is already what its own refusals read (a stopping rule
    over the releases, docs/privacy.md "The ledger's order"), so this refusal reveals nothing the next would not."""
    if load_census(run_dir) is not None:
        return
    if req.rounds > 0:  # (the plan's file alone: before the row checks' work, which a refused request would waste)
        _check_planned_with_census(run_dir, req.mode, experiment, req.epsilon)
    if (run_dir / PLAN_FILE).exists():
        return  # (a plan made is read back, not made again: a re-send must not count the run's own charges twice)
    if req.rounds > 0:
        _check_census_paid(req.epsilon, site.epsilon_budget, site.delta_bound)
    prior, delta, order = [], site.delta_bound, None
    from client.site import open_ledger  # (client.site reads this module's plans: imported here, not above)
    try:  # read only (a legacy ledger where it is); none, or one left without its header by a crash at its
        ledger = open_ledger(site, data, create=False)  # creation, is the writable open's to decide (review s67)
    except (OSError, LedgerDamaged):
        ledger = None
    if ledger is not None:
        if req.rounds > 0:  # the ledger's own refusal of a census, before the row checks' work (review s67: that
            # work was repeatable for free by a request the census then refused)
            _check_no_queries_before(ledger, experiment, req.mode)
        prior, delta, order = ledger.events_except(run=experiment, purpose=census_purpose(req.mode)), ledger.delta, \
            ledger.order
    make_plan(with_query_policy(site, req), num_records=1e15, delta=delta, budget=site.epsilon_budget, prior=prior,
              order=order)


def run_census(data: ImageDataset, ledger: "PrivacyLedger", run_dir: Path, *, mode: str, experiment: str,
               epsilon: float, budget: float, delta_bound: float, fingerprint: str) -> list[float]:
    """The run's census: read back, or (at the run's first training request) charged on its own and drawn.

    Refused, with nothing charged, when the census alone would take more than the run's ``epsilon`` or more than
    the site's ``budget`` has left, or, drawn again, when the run's charges with it would exceed the run's
    ``epsilon`` (a census whose file was lost after its charge is charged and drawn again, never drawn again for
    free). The first check reads the site's published ``delta_bound``, not the ledger's delta: a refusal that
    costs nothing must not depend on anything private, and the ledger's default delta is set from a noisy size
    (charged once, when the site's first request creates its ledger: ``client.site_delta``).
    (A run whose epsilon falls between the census's epsilon at the bound and at the ledger's smaller delta pays the
    census and is then refused by its plan; the site's own budget is enforced at its delta either way.) The run's
    plan comes after the census
    (``client.budget.plan_for_site``), so a plan that is then refused has cost the run its census (epsilon about
    0.2 at delta 1e-5), and nothing else.
    """
    census = load_census(run_dir)
    if census is not None:
        return census
    check_census_fits(run_dir, epsilon, budget, delta_bound)
    _check_planned_with_census(run_dir, mode, experiment, epsilon)
    private = is_private(epsilon, budget)
    event = census_event(private)
    # Charged anew whenever its file is missing, never reused: the file is written (durably) right after the draw,
    # so a run whose census charge exists but whose census.json does not may have sent that census (in a reply's
    # weight and counts) before the file was lost. A second draw under the first charge would be a free release;
    # refusing instead would strand the run at this site although a crash between the charge and the file released
    # nothing. So the redraw pays, and, held to the run's epsilon like every charge of the run, never lets the run
    # spend more than it asked.
    earlier = ledger.count(run=experiment, purpose=census_purpose(mode))
    _check_no_queries_before(ledger, experiment, mode)
    try:
        ledger.charge([event], purpose=census_purpose(mode), run=experiment, round=0, data=fingerprint,
                      details={"census-drawn-again": earlier} if earlier else None,
                      # (a first draw is held to the run's epsilon at the published delta bound, above)
                      run_epsilon=epsilon if private and earlier else None)
    except BudgetExceeded as err:
        raise Refusal(P.REFUSED_BUDGET, "the requested work does not fit this site's privacy budget",
                      str(err)) from None
    return draw_census(data, event.noise_multiplier, run_dir)


def _check_no_queries_before(ledger: "PrivacyLedger", experiment: str, mode: str) -> None:
    """Refuse a run's first census when queries were charged under its id before it.

    A run's first census comes before anything else it is charged for. Queries sent under the id before it trained
    were held to the site's budget only (a run has no epsilon before its plan); training on top of them would take
    the run past the epsilon it asks for. What the run was charged for is what the coordinator itself asked and was
    answered: the refusal says nothing else."""
    if not ledger.count(run=experiment, purpose=census_purpose(mode)) \
            and any(ledger.count(run=experiment, purpose=purpose) for purpose in QUERY_PURPOSES):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"run {experiment!r} was used for evaluation or audit queries before it "
                                             "trained at this site; a run trains first: start a new experiment")


def _check_planned_with_census(run_dir: Path, mode: str, experiment: str, epsilon: float) -> None:
    """Refuse, before any charge, a census for a run whose plan was made without one (review s56): a statistics
    release with a provided net plans no census, and a training request under its id would draw and charge one
    (past the run's epsilon, which the plan had spent) and then be refused by the plan it cannot change. Likewise a
    census drawn again (its file lost) for a request naming another epsilon than the run's plan (review s68 K): the
    redraw is held to the request's epsilon, so it would be charged under a cap the run never had, then refused by
    the plan."""
    path = run_dir / PLAN_FILE
    if not path.exists():
        return
    plan = json.loads(path.read_text())  # (client.budget.RunPlan: its census event, None where it planned none)
    if plan["request"].get("mode") != mode or plan.get("census") is None:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"run {experiment!r} was planned at this site by its first request, "
                                             f"without {mode} training; its settings are fixed: start a new "
                                             "experiment")
    check_plan_kept(plan["request"], {"epsilon": epsilon})  # the plan's own check, before the redraw's charge


def check_no_census_drawn(ledger: "PrivacyLedger", run_dir: Path, experiment: str) -> None:
    """Refuse, before its plan is made, a run without training rounds (a statistics release with a provided net,
    which plans no census) under an id that already drew a census (review s59): its plan would leave that census
    out of the run's epsilon and spend all of it, and the run's cap would then refuse every release, for ever. The
    refusal reads the site's own charges for the coordinator's requests, nothing of the records."""
    if not (run_dir / PLAN_FILE).exists() and any(ledger.count(run=experiment, purpose=census_purpose(mode))
                                                  for mode in MODES):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"run {experiment!r} drew its census at this site for training; a "
                                             "statistics release with a provided net cannot follow it: start a new "
                                             "experiment")
