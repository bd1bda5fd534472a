"""Attribute-level privacy (seed 004): does the synthetic set teach an adversary a sensitive attribute?

Seed 004 measures a privatization by its *privacy loss*: the accuracy of an adversary classifier trained
on the privatized images to predict the sensitive attribute, tested on images it has not seen. Here the
adversary is trained on the synthetic set labelled with the sensitive attribute it claims, and tested on
real images with their true attribute.

The adversary is a careful one: it trains the learner on 80% of the synthetic set and keeps it only if it
beats answering the set's most frequent value on the other 20% (records it did not train on) by more than
two standard errors of that constant's held-out rate (a lucky split is not learning); otherwise
it concludes the images teach nothing and answers that value every time. Why: a classifier trained on
labels the images do not carry fits noise, and its answers, independent of the truth, score *below* the
"no leak" level -- which would make any set look leak-free. So, on real images:

- ``adversary_accuracy`` (the privacy loss) against ``majority_rate``, the real set's most frequent value:
  what an adversary who learned nothing scores (``advantage`` = the difference; <= ~0: no leak);
- ``balanced_accuracy`` (the classifier's mean accuracy over the attribute's values) against ``chance`` =
  1/K: any answers independent of the truth score exactly 1/K here, whatever their frequencies, so this
  reading needs no care about priors;
- ``classifier_accuracy`` against ``blind_rate``: the raw classifier, and what answers with the same
  frequencies but blind to the image would score (sum over values of answer share x real share).
Utility (seed 004's fixed classifiers for the other attributes) is the usual TSTR of those attributes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from common.data import DataError, ImageDataset, split_joint_labels
from common.learner import LearnerConfig, evaluate_learner, predict, train_learner

VALIDATION_SHARE = 0.2  # of the synthetic set, held out by the adversary to decide whether its classifier learned


@dataclass(frozen=True)
class AttributeLeakage:
    adversary_accuracy: float  # on the real images: the privacy loss (the classifier's, or the majority answer's)
    majority_rate: float  # the real set's most frequent value: what "no leak" scores
    chance: float  # 1 / K: what balanced accuracy scores without a leak
    advantage: float  # adversary_accuracy - majority_rate (<= ~0: no leak)
    per_value_accuracy: list[float]  # the classifier's accuracy on real images of each attribute value
    balanced_accuracy: float = float("nan")  # mean of per_value_accuracy (no leak: chance)
    classifier_accuracy: float = float("nan")  # the trained classifier on real images, kept or not
    blind_rate: float = float("nan")  # answers with the classifier's frequencies, blind to the image, would score
    used_classifier: bool = True  # whether the classifier beat the constant answer on held-out synthetic records
    validation: dict | None = None  # {"classifier", "constant", "margin", "records"} on held-out synthetic records

    def as_dict(self) -> dict:
        return asdict(self)


def attribute_leakage(synthetic: ImageDataset, real: ImageDataset, *, learner: LearnerConfig | None = None,
                      device: torch.device | str | None = None, seed: int = 0) -> AttributeLeakage:
    """Train the adversary on ``synthetic`` (labels = the sensitive attribute), test it on ``real`` (labels =
    the true sensitive attribute); both must list the same attribute values in ``classes``."""
    if tuple(synthetic.classes) != tuple(real.classes):
        raise ValueError(f"the synthetic set's attribute values {list(synthetic.classes)} differ from the real "
                         f"set's {list(real.classes)}")
    if synthetic.image_shape != real.image_shape:
        raise ValueError(f"image shapes differ: synthetic {synthetic.image_shape}, real {real.image_shape}")
    k = len(real.classes)
    order = np.random.default_rng(seed).permutation(len(synthetic))
    n_val = int(round(VALIDATION_SHARE * len(synthetic)))
    fit, val = synthetic.subset(order[n_val:]), synthetic.subset(order[:n_val])
    classifier = train_learner(fit, learner or LearnerConfig(), device=device, progress=False)
    constant = int(np.bincount(fit.labels, minlength=k).argmax())  # the set's most frequent claimed value
    val_classifier = float((predict(classifier, val.images, device=device) == val.labels).mean()) if n_val else 1.0
    val_constant = float((val.labels == constant).mean()) if n_val else 0.0
    # beating the constant by a lucky split is not learning: ask for two standard errors of the constant's rate
    margin = 2.0 * float(np.sqrt(val_constant * (1.0 - val_constant) / max(n_val, 1)))
    used = val_classifier > val_constant + margin

    result = evaluate_learner(classifier, real, device=device)
    conf = np.asarray(result["confusion"], dtype=np.float64)  # (K true, K predicted) on the real images
    truth_share, answer_share = conf.sum(axis=1) / conf.sum(), conf.sum(axis=0) / conf.sum()
    counts = np.bincount(real.labels, minlength=k)
    majority = float(counts.max() / counts.sum())
    classifier_accuracy = float(result["accuracy"])
    accuracy = classifier_accuracy if used else float(counts[constant] / counts.sum())
    per_value = [float(a) for a in result["per_class_accuracy"]]
    return AttributeLeakage(adversary_accuracy=accuracy, majority_rate=majority, chance=1.0 / k,
                            advantage=accuracy - majority, per_value_accuracy=per_value,
                            balanced_accuracy=float(np.nanmean(per_value)), classifier_accuracy=classifier_accuracy,
                            blind_rate=float(truth_share @ answer_share), used_classifier=bool(used),
                            validation={"classifier": val_classifier, "constant": val_constant, "margin": margin,
                                        "records": n_val})


def is_joint(ds: ImageDataset) -> bool:
    """Whether ``ds`` is labelled with two attributes (classes "a_b", every pair, a-major)."""
    try:
        split_joint_labels(ds)
    except DataError:
        return False
    return True


def attribute_view(synthetic: ImageDataset, test: ImageDataset, train: ImageDataset | None, learner: LearnerConfig,
                   device: torch.device) -> dict:
    """Seed 004's two measures for a set labelled with two attributes ("a_b" classes): utility = the learner
    trained on the synthetic set's first attribute, tested on the real one (and the same learner on the real
    training data when given); privacy loss = an adversary trained on the second attribute, tested on real
    images, against the real set's majority rate (:mod:`common.audits.attribute`)."""
    (s_task, s_sens), (t_task, t_sens) = split_joint_labels(synthetic), split_joint_labels(test)
    model = train_learner(s_task, learner, device=device, progress=False)
    task = {"classes": list(t_task.classes), **{k: evaluate_learner(model, t_task, device=device)[k]
                                                 for k in ("accuracy", "mcc", "per_class_accuracy")}}
    if train is not None:
        real = evaluate_learner(train_learner(split_joint_labels(train)[0], learner, device=device, progress=False),
                                t_task, device=device)
        task.update(real_accuracy=real["accuracy"], real_mcc=real["mcc"])
    leak = attribute_leakage(s_sens, t_sens, learner=learner, device=device)
    return {"task": task, "sensitive": {"classes": list(t_sens.classes), **leak.as_dict()}}
