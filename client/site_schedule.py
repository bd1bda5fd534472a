"""How long a DP-GAN site trains each round: the D schedule and the G steps per D step it takes, from its noisy census.

Both choices read the run's public settings and the site's noisy census only (post-processing of a release
already charged), so they say nothing more about the site's records than the census did. The budget planner
(``client.budget``) then fits the noise to whichever schedule was chosen.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from client.budget import public_size
from client.refusal import Refusal
from common import files
from common import protocol as P

# A site whose noisy census counts at least this many records is "large": it takes the run's longer D schedule
# (GanTrainRequest.long_steps, ``choose_local_steps``) unless its budget cannot fit that plan, and the run's extra
# generator steps on either schedule (GanTrainRequest.long_g_steps, ``choose_g_steps``). ../shared/data's sites
# (3 Dirichlet-0.5 sites) fall far to either side: MNIST's ~17,000-24,000 and CIFAR-10's ~11,000-28,000 records
# gained or kept accuracy with twice the D steps at epsilon 10 and at epsilon 1 (docs/results.md: "The longer
# schedule at epsilon 1"), though at epsilon 1 the steps cost them x1.2-1.4 the noise per step; PneumoniaMNIST's
# 283-2,429 lost at epsilon 10 (x1.34-1.42). At the product's 10 rounds x 120 steps of 256 a large site passes over
# its records at most ~31 times, a PneumoniaMNIST site 126-1,086 times. (An earlier rule took the longer schedule
# where it cost at most x1.15 the noise: the same choice at epsilon 10, but none at epsilon 1.)
LARGE_SITE_RECORDS = 10_000

def choose_local_steps(steps: int, long_steps: int, *, epsilon: float,
                       noisy_counts: list[float]) -> tuple[int, str]:
    """The D steps per round a DP-GAN site takes -- ``long_steps`` at a large site (noisy census total at least
    LARGE_SITE_RECORDS), else ``steps`` -- and why, for the site's log.

    Why by size, not by the noise the longer schedule adds: what twice the D steps cost a site in noise per step
    told MNIST's sites at epsilon 1 (x1.30, and they gained) from PneumoniaMNIST's at epsilon 10 (x1.34, and they
    lost) by a hair, where the sites' sizes differ eightfold (LARGE_SITE_RECORDS). Judged from the site's noisy
    census alone (its total stands in for the record count), so the choice -- which the reply shows -- is
    post-processing of a release already charged and says nothing more about the site's records. The caller
    falls back to ``steps`` where the longer plan does not fit the site's budget (``client.gan_site``). A
    non-private run takes the longer schedule at any size: it costs no noise.
    """
    if long_steps <= steps:
        return steps, "the run offers no longer schedule"
    if not math.isfinite(epsilon):
        return long_steps, "a run without noise takes the longer schedule"
    if public_size(noisy_counts) >= LARGE_SITE_RECORDS:
        return long_steps, "its noisy census says it is large"
    return steps, "its noisy census says it is small"


def choose_g_steps(g_steps: int, long_g_steps: int, *, noisy_counts: list[float]) -> int:
    """The G steps after each D step a DP-GAN site takes: ``long_g_steps`` at a large site (noisy census total at
    least LARGE_SITE_RECORDS), on either D schedule, else ``g_steps``.

    Why: a G step never touches a record, so it costs no privacy, only time, and natural images are short of
    training (the longer D schedule's reason). Two G steps per D step at large sites on the longer D schedule,
    CIFAR-10 as 28x28 gray, epsilon 10, 3 Dirichlet-0.5 sites: 0.300, 0.299, 0.309 against 0.276, 0.230, 0.287 with
    one; MNIST level (0.964, 0.956 against 0.961, 0.964). At a large site on the shorter D schedule (its budget
    cannot fit the longer plan): MNIST, epsilon 1, seeds 0, 1, 2: 0.935, 0.900, 0.896 against 0.902, 0.901, 0.878.
    They cost time (MNIST at epsilon 10, alone on 2 cores: 66 s a round against 47 with one), which the in-process
    simulation's sites working at once (fedsynth.localgrid: 47 s against 52 one after another) partly pay back.
    A small site keeps one: PneumoniaMNIST's sites (283-2,429 records) got 0.800 and 0.825 with two against
    0.808-0.849 with one. Like the D schedule, the choice reads the noisy census and public settings only
    (post-processing of a release already charged).
    """
    if long_g_steps > g_steps and public_size(noisy_counts) >= LARGE_SITE_RECORDS:
        return long_g_steps
    return g_steps


# The refusal of a round whose schedule settings differ from those the run's first trained round asked for. Which
# schedule a site took follows from its noisy census, so neither this text nor whether it is sent may depend on it.
STEPS_CHANGED = ("the request's D steps or G steps per D step (short and long) differ from those the run's first "
                 "round asked for: send the run's first settings again, or start a new experiment")
SCHEDULE_ASKED_FILE = "schedule-asked.json"


def _asked(req: P.GanTrainRequest) -> dict[str, int]:
    return {k: int(getattr(req, k)) for k in ("local_steps", "long_steps", "g_steps", "long_g_steps")}


def check_schedule_asked(req: P.GanTrainRequest, run_dir: Path) -> None:
    """Refuse, before the census and anything charged, a round whose four schedule settings are not exactly those
    the run's first trained round asked for (:func:`keep_schedule_asked`).

    Review s68 L: comparing a request with the steps the site *took* (its census's choice) let the coordinator tell
    a large site from a small one by which refusal came, or whether one came, in a secure run too. Compared with the
    coordinator's own earlier request, the answer depends on nothing the site holds. (A run planned by a fedsynth
    that kept no such file is compared as before, by the steps its plan fixed, until its next round keeps one.)"""
    path = run_dir / SCHEDULE_ASKED_FILE
    if path.exists() and json.loads(path.read_text()) != _asked(req):
        raise Refusal(P.REFUSED_BAD_REQUEST, STEPS_CHANGED)


def keep_schedule_asked(req: P.GanTrainRequest, run_dir: Path) -> None:
    """Keep what the run's first trained round asked for (written once, after its plan, before its charge)."""
    path = run_dir / SCHEDULE_ASKED_FILE
    if not path.exists():
        files.atomic_write_json(path, _asked(req))
