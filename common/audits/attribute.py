"""Attribute-level privacy (seed 004): does the synthetic set teach an adversary a sensitive attribute?

Seed 004 measures a privatization by its *privacy loss*: the accuracy of an adversary classifier trained
on the privatized images to predict the sensitive attribute, tested on images it has not seen. Here the
adversary is trained on the synthetic set labelled with the sensitive attribute it claims, and tested on
real images with their true attribute: if the synthetic images carry the attribute, the adversary learns
it; if the attribute was replaced (drawn independently of everything else), it learns nothing and does
no better than always answering the real set's most frequent value (``majority_rate``), which is the
"no leak" level (``chance`` = 1/K is shown too; under imbalance it is lower than the majority rate).
Utility (seed 004's fixed classifiers for the other attributes) is the usual TSTR of those attributes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from common.data import DataError, ImageDataset, split_joint_labels
from common.learner import LearnerConfig, evaluate_learner, train_learner


@dataclass(frozen=True)
class AttributeLeakage:
    adversary_accuracy: float  # on the real images: the privacy loss
    majority_rate: float  # the real set's most frequent value: what "no leak" scores
    chance: float  # 1 / K
    advantage: float  # adversary_accuracy - majority_rate (<= ~0: no leak)
    per_value_accuracy: list[float]  # the adversary's accuracy on real images of each attribute value

    def as_dict(self) -> dict:
        return asdict(self)


def attribute_leakage(synthetic: ImageDataset, real: ImageDataset, *, learner: LearnerConfig | None = None,
                      device: torch.device | str | None = None) -> AttributeLeakage:
    """Train the adversary on ``synthetic`` (labels = the sensitive attribute), test it on ``real`` (labels =
    the true sensitive attribute); both must list the same attribute values in ``classes``."""
    if tuple(synthetic.classes) != tuple(real.classes):
        raise ValueError(f"the synthetic set's attribute values {list(synthetic.classes)} differ from the real "
                         f"set's {list(real.classes)}")
    if synthetic.image_shape != real.image_shape:
        raise ValueError(f"image shapes differ: synthetic {synthetic.image_shape}, real {real.image_shape}")
    adversary = train_learner(synthetic, learner or LearnerConfig(), device=device, progress=False)
    result = evaluate_learner(adversary, real, device=device)
    counts = np.bincount(real.labels, minlength=len(real.classes))
    majority = float(counts.max() / counts.sum())
    accuracy = float(result["accuracy"])
    return AttributeLeakage(adversary_accuracy=accuracy, majority_rate=majority, chance=1.0 / len(real.classes),
                            advantage=accuracy - majority,
                            per_value_accuracy=[float(a) for a in result["per_class_accuracy"]])


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
