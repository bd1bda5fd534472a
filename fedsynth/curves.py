"""The privacy-utility curves of ``fedsynth evaluate``: over the replacement's strength (seed 004) and over epsilon.

- ``--replacement-curve 0,0.5,1``: a DP-GAN run's set drawn again with its second attribute replaced for each
  share of the records (:func:`fedsynth.replace_attribute.replaced_set`; post-processing, no privacy cost),
  each point its utility (the learner on the first attribute) and privacy loss (the adversary on the second).
- ``--sweep RUN,RUN``: other runs of the same data at other epsilons, each point the learner's accuracy on
  real data (and, for two attributes, the task accuracy and the sensitive attribute's adversary).
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.audits.attribute import attribute_view, is_joint
from common.config import ConfigError
from common.data import DataError, ImageDataset
from common.learner import LearnerConfig, evaluate_learner, train_learner
from common.progress import progress as progress_bar
from fedsynth.replace_attribute import replaced_set


def parse_strengths(text: str) -> list[float]:
    """"0,0.5,1" -> [0.0, 0.5, 1.0]; a clear error for anything else."""
    refusal = ConfigError(f"--replacement-curve takes strengths in [0, 1] separated by commas (e.g. 0,0.5,1), got "
                          f"{text!r}")
    try:
        strengths = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise refusal from None
    if not strengths or any(not 0.0 <= s <= 1.0 for s in strengths):
        raise refusal
    return sorted(set(strengths))


def replacement_curve(run: Path, strengths: list[float], test: ImageDataset, learner: LearnerConfig, *, size: int,
                      device: torch.device, progress: bool = False) -> list[dict]:
    """Seed 004's privacy-utility curve over the replacement's strength: for each strength, the run's set drawn
    again (``size`` records, :func:`replaced_set`), its utility (the learner on the first attribute, tested on
    the real ``test``) and its privacy loss (the adversary on the second, :mod:`common.audits.attribute`)."""
    points = []
    for strength in progress_bar(strengths, desc="replacement curve", unit="strength", enabled=progress):
        synth, done, _ = replaced_set(run, strength, size=size, device=device)
        view = attribute_view(synth, test, None, learner, device)
        task, sens = view["task"], view["sensitive"]
        points.append({"strength": strength, "replaced": done["replaced"], "agreement": done["agreement"],
                       "task_accuracy": task["accuracy"], "task_mcc": task["mcc"],
                       **{k: sens[k] for k in ("adversary_accuracy", "majority_rate", "balanced_accuracy", "chance",
                                               "classifier_accuracy", "blind_rate", "used_classifier")}})
    return points


def sweep_point(synthetic: ImageDataset, run_report: dict | None, test: ImageDataset, learner: LearnerConfig,
                device: torch.device, *, tstr_accuracy: float | None = None, attributes: dict | None = None) -> dict:
    """One point of the privacy-utility curve over epsilon: the run's epsilon, the learner trained on its set and
    tested on ``test`` (``tstr_accuracy`` when already measured) and, for two attributes, the task accuracy and
    the sensitive attribute's adversary (``attributes`` when already measured, :func:`attribute_view`)."""
    epsilon = (run_report or {}).get("epsilon_target")
    if tstr_accuracy is None:
        model = train_learner(synthetic, learner, device=device, progress=False)
        tstr_accuracy = evaluate_learner(model, test, device=device)["accuracy"]
    point = {"epsilon": epsilon, "tstr_accuracy": tstr_accuracy, "source": synthetic.source}
    if attributes is None and is_joint(synthetic) and tuple(test.classes) == tuple(synthetic.classes):
        attributes = attribute_view(synthetic, test, None, learner, device)
    if attributes is not None:
        point.update(task_accuracy=attributes["task"]["accuracy"],
                     adversary_accuracy=attributes["sensitive"]["adversary_accuracy"],
                     majority_rate=attributes["sensitive"]["majority_rate"])
    return point


def requested_curves(strengths_text: str, sweep_text: str, run: Path, synthetic: ImageDataset, test: ImageDataset,
                     learner: LearnerConfig, device: torch.device, *, resolve, progress: bool = False
                     ) -> tuple[list[dict] | None, list[dict]]:
    """The curves ``fedsynth evaluate`` was asked for (``--replacement-curve``, ``--sweep``), or a DataError /
    ConfigError saying why they cannot be drawn; ``resolve`` loads a run's set and report."""
    strengths = parse_strengths(strengths_text) if strengths_text else []
    if strengths and not (is_joint(synthetic) and tuple(test.classes) == tuple(synthetic.classes)):
        raise DataError("--replacement-curve needs a set labelled with two attributes and real data labelled the "
                        "same way: pass --label-from utkface-A+B (the run's label-from)")
    curve = replacement_curve(run, strengths, test, learner, size=len(synthetic), device=device,
                              progress=progress) if strengths else None
    sweep = []
    for other in (Path(part.strip()) for part in sweep_text.split(",") if part.strip()):
        other_set, other_report = resolve(other)
        if other_set.image_shape != synthetic.image_shape or other_set.classes != synthetic.classes:
            raise DataError(f"--sweep: {other} holds {other_set.image_shape} images of classes "
                            f"{list(other_set.classes)}, not the evaluated set's {synthetic.image_shape} and "
                            f"{list(synthetic.classes)}: a curve compares runs of the same data")
        sweep.append(sweep_point(other_set, other_report, test, learner, device))
    return curve, sweep
