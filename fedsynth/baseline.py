"""Reusing the real-data baseline of an earlier evaluation (``fedsynth evaluate --real-baseline-from``).

The baseline -- the learner trained on the real pooled training data -- is the denominator of every "ratio to
real" in a report; training it again for each run of a grid costs minutes. An earlier evaluation's baseline is
reused only if it was measured the same way: the same real training and test data, at the same image size, with
the same learner settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from common.data import DataError, ImageDataset
from common.learner import LearnerConfig

# what an earlier evaluation must record for its real-data baseline to be reused (load_real_baseline)
BASELINE_CHECKED_ON = ("test_source", "train_source", "image_shape", "learner")


def load_real_baseline(path: Path, *, test: ImageDataset, train: ImageDataset | None,
                       learner: LearnerConfig) -> dict:
    """The real-data learner result of an earlier evaluation, if it was measured the same way.

    Raises DataError unless that evaluation used the same real training and test data and the same
    learner settings: a baseline measured differently would make the ratio meaningless.
    """
    if train is None:
        raise DataError("--real-baseline-from needs --train (the baseline is the learner trained on it)")
    try:
        earlier = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read the earlier evaluation {path}: {exc}") from exc
    ev, real = earlier.get("evaluation") or {}, earlier.get("real_baseline")
    if real is None:
        raise DataError(f"{path} holds no real-data baseline; run that evaluation with --train first")
    unrecorded = [key for key in BASELINE_CHECKED_ON if key not in ev]
    if unrecorded:
        raise DataError(f"{path} does not record its baseline's {', '.join(unrecorded)} (an older fedsynth wrote it); "
                        "drop --real-baseline-from to train it again")
    mismatches = [name for name, ours, theirs in (
        ("test data", test.source, ev.get("test_source")),
        ("training data", train.source, ev.get("train_source")),
        ("image size", list(test.image_shape), ev.get("image_shape")),  # the same files resized differently
        ("learner settings", json.loads(json.dumps(asdict(learner))), ev.get("learner")),
    ) if ours != theirs]
    if mismatches:
        raise DataError(f"{path} measured its real-data baseline with other {', '.join(mismatches)}; "
                        "drop --real-baseline-from to train it again")
    return real
