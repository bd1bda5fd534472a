"""The central learner at the coordinator: trained on the synthetic set only, tested on real data it holds.

The learner is the unchanged one of ``common.learner``. Its test data is the coordinator's own
(``test-data``; none in a deployment, where the sites' DP evaluation stands in). The same learner on
the real pooled training data -- the reference a simulation reports -- needs the sites' data, so the
simulation's owner computes it (``fedsynth.simulate``), never the coordinator.
"""

from __future__ import annotations

import logging

import torch

from common.config import RunConfig
from common.data import DataError, ImageDataset, load_dataset
from common.learner import evaluate_learner, train_learner
from server.run_state import RunState
from server.sites import RunFailed, Schema

log = logging.getLogger("fedsynth.coordinator")


def load_test_data(cfg: RunConfig, schema: "Schema | None" = None) -> ImageDataset | None:
    """The coordinator's own real test data (``test-data``), checked against the sites' schema; None if none."""
    if not cfg.test_data:
        return None
    try:
        test = load_dataset(cfg.test_data, "test", image_size=cfg.image_size or None, label_from=cfg.label_from or None,
                            whole=True)  # a folder given as test data is the test data, split or not
    except DataError as err:
        raise RunFailed(f"cannot load the test data '{cfg.test_data}' named in the run config: {err}") from None
    if schema is not None and (test.image_shape != schema.image_shape or test.classes != schema.classes):
        raise RunFailed(f"the test data {cfg.test_data} ({test.image_shape}, classes {list(test.classes)}) does not match "
                        f"the sites' schema ({schema.image_shape}, classes {list(schema.classes)}); fix test-data or "
                        "image-size before anything is spent")
    return test


def learn_and_test(cfg: RunConfig, run: RunState, synth: ImageDataset, test: ImageDataset | None,
                   device: torch.device) -> tuple[torch.nn.Module, dict]:
    """(the learner trained on ``synth``, utility on the coordinator's test data: {} when it has none)."""
    with run.timed("learner_synthetic"):
        model = train_learner(synth, cfg.learner_config(), device=device, desc="learner on synthetic",
                              progress=cfg.progress)
        torch.save(model.state_dict(), run.out_dir / "classifier.pt")
    if test is None:
        return model, {}
    with run.timed("evaluate"):
        res = evaluate_learner(model, test, device=device)
    log.info("TSTR accuracy (learner trained on synthetic, tested on real): %.4f", res["accuracy"])
    return model, {"tstr_accuracy": res["accuracy"], "per_class_accuracy": res["per_class_accuracy"],
                   "mcc": res["mcc"], "confusion": res["confusion"], "num_test": res["num_test"],
                   "classes": list(test.classes)}
