"""One real `flwr run` simulation (Ray, managed local SuperLink on 127.0.0.1): 2 sites, 1 round."""

from __future__ import annotations

import json
import os

from fedsynth.cli import main


def test_flwr_run_simulation_two_sites_one_round(tmp_path, capsys):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray must stay on loopback
    out = tmp_path / "flower-run"
    code = main(["simulate", "--engine", "flower", "--data", "digits", "--test", "digits", "--sites", "2",
                 "--rounds", "1", "--synthetic-size", "100", "--out", str(out), "--quiet",
                 "--set", "gan-local-steps=3", "--set", "gan-width=16", "--set", "learner-epochs=1",
                 "--set", "real-baseline=false", "--set", "progress=false"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert len(report["sites"]) == 2
    assert [h["accepted"] for h in report["rounds"]] == [2]
    assert (out / "synthetic.npz").exists()
    # the run used its own FLWR_HOME inside the output folder, never ~/.flwr
    assert (out / ".flwr").is_dir()
