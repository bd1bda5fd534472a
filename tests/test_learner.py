"""The central learner: built in or the user's own (``learner = "package.module:factory"``), one for both data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.config import ConfigError, RunConfig
from common.data import load_dataset
from common.learner import LearnerConfig, build_learner, check_learner, extract_features, learner_factory, train_learner
from fedsynth.cli import main
from tests.spine_helpers import FAST_CLI as FAST

USER = "tests.user_learner:tiny_cnn"


@pytest.mark.parametrize("name, says", [
    ("resnet", "choose one of cnn, mlp, logreg, or name your own as 'package.module:factory'"),
    ("no_such_package.models:net", "cannot import 'no_such_package.models' (ModuleNotFoundError"),
    ("tests.user_learner:missing", "'tests.user_learner' has no function 'missing'"),
    ("tests.user_learner:NOT_A_FACTORY", "has no function 'NOT_A_FACTORY'"),
])
def test_a_bad_learner_name_is_refused_with_the_reason(name, says):
    with pytest.raises(ValueError, match="learner") as err:
        learner_factory(name)
    assert says in str(err.value)
    with pytest.raises(ConfigError, match="learner"):
        RunConfig(learner=name).validate()


def test_a_learner_that_does_not_fit_the_images_is_refused_before_any_site_spends(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"returns outputs of shape \(11,\) per image for 10 classes"):
        check_learner("tests.user_learner:wrong_output", (1, 8, 8), 10)
    out = tmp_path / "o"
    code = main(["simulate", "--data", "digits", "--sites", "2", "--rounds", "1", "--out", str(out), *FAST,
                 "--set", "learner=tests.user_learner:wrong_output"])
    err = capsys.readouterr().err
    assert code != 0 and "must return (batch, 10) logits" in err and "Traceback" not in err
    spent = [json.loads(line) for p in (out / "sites").rglob("ledger/*.jsonl") for line in p.read_text().splitlines()]
    assert not [e for e in spent if e.get("events")], "a site was charged for a run whose learner could not work"


def test_site_evaluation_needs_a_built_in_learner():
    with pytest.raises(ConfigError, match="a site never imports code the coordinator names"):
        RunConfig(learner=USER, site_evaluation=True).validate()
    with pytest.raises(ValueError, match="not built in"):
        build_learner(USER, (1, 8, 8), 10, allow_import=False)


def test_a_users_learner_trains_embeds_and_runs_end_to_end(tmp_path, capsys):
    digits = load_dataset("digits", "train")
    model = train_learner(digits, LearnerConfig(name=USER, epochs=2), device="cpu", progress=False)
    feats = extract_features(model, digits.images[:5], device="cpu")  # no features(): the last layer's input
    assert feats.shape == (5, 16) and np.isfinite(feats).all()
    out = tmp_path / "run"
    assert main(["simulate", "--data", "digits", "--test", "digits", "--sites", "2", "--rounds", "1",
                 "--out", str(out), *FAST, "--set", f"learner={USER}"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["learner"] == USER and 0 <= report["utility"]["tstr_accuracy"] <= 1
    # fedsynth evaluate: the same learner for the synthetic set and the real-data reference
    capsys.readouterr()
    assert main(["evaluate", "--synthetic", str(out), "--test", "digits", "--train", "digits", "--out",
                 str(tmp_path / "eval"), "--quiet", "--learner", USER, "--learner-epochs", "1",
                 "--max-audit-records", "200"]) == 0
    ev = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert ev["evaluation"]["learner"]["name"] == USER and ev["utility"]["real_accuracy"] is not None
    assert main(["evaluate", "--synthetic", str(out), "--test", "digits", "--out", str(tmp_path / "bad"),
                 "--quiet", "--learner", "nope"]) == 2
    assert "choose one of cnn, mlp, logreg" in capsys.readouterr().err


def test_the_cnn_trains_channels_last_and_comes_back_in_the_standard_layout():
    """Channels-last is a speed detail of training: the model handed back has standard strides everywhere
    and it learned (digits, 3 epochs)."""
    from common.learner import evaluate_learner

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model = train_learner(train, LearnerConfig(epochs=3), device="cpu", progress=False)
    for name, param in model.named_parameters():
        standard = param.detach().clone(memory_format=torch.contiguous_format).stride()
        assert param.stride() == standard, f"{name} has strides {param.stride()}, not the standard {standard}"
    assert evaluate_learner(model, test, device="cpu")["accuracy"] > 0.85
