"""RunConfig is the one definition of the run settings; pyproject.toml must list exactly the same."""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict

import pytest

from common.config import ConfigError, RunConfig
from tests.conftest import REPO_ROOT


def test_pyproject_run_config_matches_runconfig_defaults():
    app_cfg = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert app_cfg == RunConfig().to_flwr()
    assert RunConfig.from_mapping(app_cfg) == RunConfig()


@pytest.mark.parametrize("raw, needle", [
    ({"nmu-rounds": 3}, "unknown run setting 'nmu-rounds'"),
    ({"num-rounds": -1}, "num-rounds must be >= 1"),
    ({"num-rounds": 2.5}, "must be an integer"),
    ({"epsilon": -1}, "epsilon must be > 0"),
    ({"epsilon": "lots"}, "must be a number"),
    ({"mode": "vae"}, "mode must be one of"),
    ({"partition": "dirichlet"}, "partition"),
    ({"quorum": 0}, "quorum"),
    ({"learner": "resnet"}, "learner: unknown learner .resnet.: choose one of"),
    ({"resume": "maybe"}, "true or false"),
    ({"gan-g-steps": 11}, "gan-g-steps must be in 1..10"),
    ({"gan-d-steps": 0}, "gan-d-steps must be in 1..200"),
    ({"gan-ema": 1.0}, "gan-ema is a decay in"),
])
def test_bad_settings_are_refused_with_the_setting_named(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        RunConfig.from_mapping(raw)


def test_epsilon_inf_means_not_private_and_types_are_coerced():
    cfg = RunConfig.from_mapping({"epsilon": "inf", "num-rounds": "4", "resume": "false"})
    assert math.isinf(cfg.epsilon) and not cfg.private
    assert cfg.num_rounds == 4 and cfg.resume is False
    assert asdict(RunConfig.from_mapping(cfg.to_flwr())) == asdict(cfg)


def test_a_device_setting_is_one_of_the_known_forms_and_quoted_short():
    """Review s57: the run config's device reached a site's refusal and log as sent (a newline forged a log line, a
    1 MB value gave a 1 MB refusal), and 'cuda:abc' failed inside torch instead of being refused."""
    from common.device import pick_device

    assert pick_device(" CPU ").type == "cpu"
    for bad in ("cuda\n12/06 INFO operator: budget reset", "x" * 10**6, "cuda:abc", "cuda:-1", "gpu",
                "cuda:\u0661", "cuda:\uff11"):  # (Arabic-Indic and full-width digits: torch cannot read them)
        with pytest.raises(ValueError, match="unknown device") as err:
            pick_device(bad)
        assert len(str(err.value)) < 400 and "\n" not in str(err.value)
