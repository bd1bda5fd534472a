"""The ranges of the coordinator's recipe values a site accepts: public constants of the protocol (common.protocol).

A site refuses a request whose value is outside its range before anything is charged (:func:`recipe_problems`,
called by client.gan_site and client.bn_site as they check a request); the run config refuses it too
(common.config), before any site is asked. Inside these ranges the work cannot fail on the value itself: a value
the types allow but the arithmetic does not (a seed that overflows torch's 64-bit seeds, a learning rate Adam cannot
hold, a count weight whose square overflows) would fail only after the charge, and a failed attempt is charged anew
on every re-send (client.site.charged_work). Each bound is far beyond any value that trains (the product's defaults:
learning rates 1e-3 and 0.5, clip bounds around 1, count weight 0.5). A refusal names the setting, its range and the
value the coordinator sent: nothing of the site's.

The other values that must not change the state a site keeps between rounds, the DP-GAN's architecture (its
networks' shapes), are fixed with the run's plan at its first request (client.budget.PlanRequest.architecture).
"""

from __future__ import annotations

import math
from typing import Any

from common import protocol as P
from common.wire import quoted

MAX_SEED = 2 ** 32  # seed in [0, MAX_SEED): a site derives seed * 1000 + round (+ 1), far inside torch's 64 bits
MAX_LEARNING_RATE = 1e3  # lr-d, lr-g, lr: finite, in (0, MAX_LEARNING_RATE]
MAX_LOSS_WEIGHT = 1e3  # ac-weight, mode-seeking: finite, in [0, MAX_LOSS_WEIGHT]
BOUND_RANGE = (1e-6, 1e6)  # max-grad-norm, the statistics' clip and each of layer-clips: finite, in this range
MIN_G_WIDTH = 4  # the generator's smallest base width: G halves its channels at each stage, and below 4 one has none
COUNT_WEIGHT_RANGE = (1e-6, 1e6)  # count-weight: the release's sensitivity sqrt(w^2 + 1) and its count noise / w
MAX_LAYER_CLIPS_CHARS = 1000  # layer-clips: a bound per normalised layer (the product's nets have 4 to a dozen)


def range_problem(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> str | None:
    """Why ``value`` (the coordinator's own, quoted as sent) is outside [low, high] ((low, high] with ``low_open``),
    or None when it is inside. NaN and infinities are outside every range."""
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if low_open else value >= low) \
        and value <= high
    if ok:
        return None
    return f"{name} must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}], got {quoted(value)}"


def layer_clips_problem(raw: str, name: str = "layer-clips") -> str | None:
    """A listed layer-clips bound outside BOUND_RANGE ('' and 'auto' list none; their count is checked against the
    net by the site, which knows its layers)."""
    raw = str(raw).strip()
    if not raw or raw == "auto":
        return None
    if len(raw) > MAX_LAYER_CLIPS_CHARS:  # (a site records the parsed bounds in its ledger, never this string)
        return f"{name} must be at most {MAX_LAYER_CLIPS_CHARS} characters, got {len(raw):,}"
    try:
        bounds = [float(b) for b in raw.split(",")]
    except ValueError:
        return f"{name} must be 'auto' or comma-separated numbers, got {quoted(raw)}"
    bad = [b for b in bounds if range_problem("x", b, *BOUND_RANGE)]
    if bad:
        return f"{name} must be finite numbers in [{BOUND_RANGE[0]:g}, {BOUND_RANGE[1]:g}], got {quoted(raw)}"
    return None


def recipe_problems(req: P.Message) -> list[str]:
    """Why the recipe values of a training or statistics request are outside the protocol's ranges (empty: none).

    Each problem names the setting, the accepted range and the value the coordinator sent (only its own values)."""
    checks: list[str | None] = []
    if not (isinstance(req.seed, int) and 0 <= req.seed < MAX_SEED):
        checks.append(f"seed must be an integer in [0, {MAX_SEED}), got {quoted(req.seed)}")
    if isinstance(req, P.GanTrainRequest):
        checks += [range_problem("lr-d", req.lr_d, 0.0, MAX_LEARNING_RATE, low_open=True),
                   range_problem("lr-g", req.lr_g, 0.0, MAX_LEARNING_RATE, low_open=True),
                   range_problem("max-grad-norm", req.max_grad_norm, *BOUND_RANGE),
                   range_problem("ac-weight", req.ac_weight, 0.0, MAX_LOSS_WEIGHT),
                   range_problem("mode-seeking", req.mode_seeking, 0.0, MAX_LOSS_WEIGHT)]
    elif isinstance(req, P.BnPlanSettings):
        checks += [range_problem("lr", req.lr, 0.0, MAX_LEARNING_RATE, low_open=True),
                   range_problem("max-grad-norm", req.max_grad_norm, *BOUND_RANGE),
                   range_problem("clip", req.clip, *BOUND_RANGE),
                   range_problem("count-weight", req.count_weight, *COUNT_WEIGHT_RANGE),
                   layer_clips_problem(req.layer_clips)]
    else:
        raise TypeError(f"no recipe ranges for {type(req).__name__}")
    return [c for c in checks if c]
