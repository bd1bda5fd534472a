"""The command line: clear errors before any work, and a full simulate run on digits."""

from __future__ import annotations

import json


from fedsynth.cli import main


def test_missing_data_path_is_a_clear_error(tmp_path, capsys):
    code = main(["simulate", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_image_folder_is_reported_before_training(tmp_path, capsys):
    root = tmp_path / "imgs"
    (root / "cat").mkdir(parents=True)
    (root / "cat" / "a.png").write_bytes(b"not a png at all")
    (root / "dog").mkdir()
    from PIL import Image

    Image.new("L", (8, 8)).save(root / "dog" / "b.png")
    code = main(["simulate", "--data", str(root), "--sites", "2", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "a.png" in err  # names the broken file
    assert not (tmp_path / "o" / "synthetic.npz").exists()


def test_bad_run_setting_is_refused(tmp_path, capsys):
    code = main(["simulate", "--data", "digits", "--set", "gan-local-steps=-3", "--out", str(tmp_path / "o")])
    assert code == 2 and "gan-local-steps" in capsys.readouterr().err


def test_simulate_on_digits_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["simulate", "--data", "digits", "--test", "digits", "--sites", "2", "--partition", "dirichlet:1.0",
                 "--epsilon", "10", "--rounds", "1", "--synthetic-size", "100", "--out", str(out), "--quiet",
                 "--set", "gan-local-steps=3", "--set", "gan-width=16", "--set", "learner-epochs=1",
                 "--set", "real-baseline=false"])
    assert code == 0
    text = capsys.readouterr().out
    assert "TSTR accuracy" in text and "site-1" in text
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["partition"] == "dirichlet:1.0" and len(report["sites"]) == 2
