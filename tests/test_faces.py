"""Colour faces end to end (real UTKFace from ../shared/data, at 16x16 to stay fast): both modes, seed 004's
replacement of a sensitive attribute. The 64x64 networks are tested in test_models.py, their settings below."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from common.data import load_dataset
from fedsynth import cli

FACES = "utkface/UTKFace-aligned-subset-every6th.tar.gz"
TINY = ["--quiet", "--sites", "3", "--partition", "dirichlet:0.5", "--epsilon", "10",
        "--set", "num-rounds=1", "--set", "gan-local-steps=2", "--set", "bn-rounds=1", "--set", "bn-local-steps=2",
        "--set", "bn-iterations=5", "--set", "learner-epochs=1", "--set", "real-baseline=false"]


@pytest.fixture(scope="module")
def faces(shared_data: Path, tmp_path_factory) -> str:
    """A folder of 900 real UTKFace JPEGs (every 4th file of the archive): the same names and pixels, a
    quarter of the decoding per run, so the tests stay fast."""
    out = tmp_path_factory.mktemp("utkface")
    with tarfile.open(shared_data / FACES) as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        for member in members[::4][:900]:
            (out / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    return str(out)


@pytest.fixture(autouse=True)
def _flower_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def test_the_statistics_mode_runs_on_real_colour_faces(faces: str, tmp_path: Path) -> None:
    """(The DP-GAN mode runs on colour faces in the replacement test below.) The net works at 8 pixels
    (bn-resolution, as the product's rule has a 64x64 run's net work at 32) and the faces come out at 16."""
    mode, out = "bnstats", tmp_path / "bnstats"
    assert cli.main(["simulate", "--data", faces, "--test", faces, "--mode", mode, "--out", str(out), *TINY,
                     "--set", "label-from=utkface-gender", "--set", "image-size=16", "--set", "bn-resolution=8",
                     "--set", "synthetic-size=60"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["bn-resolution"] == 8
    synth = load_dataset(out / "synthetic.npz", "train", whole=True)
    assert synth.image_shape == (3, 16, 16) and synth.classes == ("male", "female") and len(synth) == 60
    assert report["private"] and 0.0 <= report["utility"]["tstr_accuracy"] <= 1.0
    assert np.ptp(synth.images.mean(axis=(2, 3)), axis=1).max() > 0  # the channels differ: colour, not grey


def test_faces_with_race_replaced_are_measured_the_way_seed_004_does(faces: str, tmp_path: Path, capsys) -> None:
    run, replaced, evaluated = tmp_path / "run", tmp_path / "replaced", tmp_path / "eval"
    # every virtual site declares race sensitive: the run's own set has race replaced
    assert cli.main(["simulate", "--data", faces, "--test", faces, "--mode", "dpgan", "--out", str(run), *TINY,
                     "--set", "label-from=utkface-gender+race", "--set", "image-size=16",
                     "--set", "synthetic-size=100", "--set", "sensitive-attribute=race"]) == 0
    report = json.loads((run / "report.json").read_text())
    colour = load_dataset(run / "synthetic.npz", "train", whole=True)
    assert colour.image_shape == (3, 16, 16) and np.ptp(colour.images.mean(axis=(2, 3)), axis=1).max() > 0
    made = report["synthetic"]["made"]["attribute_replacement"]
    assert made["sensitive"] == "race" and made["strength"] == 1.0 and made["replaced"] == 100
    assert made["declared_by"] == ["site-1", "site-2", "site-3"]
    assert [s["sensitive_attribute"] for s in report["sites"]] == ["race"] * 3  # what each site published
    assert "race replaced (seed 004)" in (run / "report.html").read_text()
    # the same set as replace-attribute at strength 1 draws from the run's saved generators (same seed)
    assert cli.main(["replace-attribute", str(run), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = load_dataset(tmp_path / "again" / "synthetic.npz", "train", whole=True)
    np.testing.assert_array_equal(again.labels, colour.labels)
    np.testing.assert_allclose(again.images, colour.images, atol=1 / 255)  # both went through 8-bit PNGs
    assert cli.main(["replace-attribute", str(run), "--out", str(replaced), "--size", "200", "--quiet"]) == 0
    assert "race replaced for 200" in capsys.readouterr().out
    new = json.loads((replaced / "report.json").read_text())
    assert new["privacy_statement"] == report["privacy_statement"]  # post-processing: the same guarantee
    assert new["attribute_replacement"]["sensitive"] == "race" and new["synthetic"]["count"] == 200
    assert cli.main(["evaluate", "--synthetic", str(replaced), "--test", faces, "--label-from", "utkface-gender+race",
                     "--resize", "--out", str(evaluated), "--learner-epochs", "1", "--no-audits", "--quiet"]) == 0
    ev = json.loads((evaluated / "report.json").read_text())
    att = ev["attributes"]
    assert att["task"]["classes"] == ["male", "female"] and 0.0 <= att["task"]["accuracy"] <= 1.0
    sens = att["sensitive"]
    assert sens["classes"] == ["white", "black", "asian", "indian", "other"]
    assert 0.3 < sens["majority_rate"] < 0.6 and sens["advantage"] == pytest.approx(
        sens["adversary_accuracy"] - sens["majority_rate"])
    assert ev["attribute_replacement"]["strength"] == 1.0
    assert "Attributes (seed 004)" in (evaluated / "report.html").read_text()
    # seed 004's privacy-utility curve over the strength, from the run's own generators, in its HTML report
    curved = tmp_path / "curve"
    common = ["--test", faces, "--label-from", "utkface-gender+race", "--resize", "--learner-epochs", "1",
              "--no-audits", "--quiet"]
    # ... and over epsilon: the same faces at epsilon 1, evaluated together
    low = tmp_path / "eps1"
    assert cli.main(["simulate", "--data", faces, "--test", faces, "--mode", "dpgan", "--out", str(low), *TINY,
                     "--epsilon", "1", "--set", "label-from=utkface-gender+race", "--set", "image-size=16",
                     "--set", "synthetic-size=100", "--set", "sensitive-attribute=race"]) == 0
    assert cli.main(["evaluate", "--synthetic", str(run), *common, "--out", str(curved),
                     "--replacement-curve", "1,0", "--sweep", str(low)]) == 0
    curved_report = json.loads((curved / "report.json").read_text())
    curve = curved_report["attribute_curve"]
    assert [p["strength"] for p in curve] == [0.0, 1.0] and [p["replaced"] for p in curve] == [0, 100]
    assert all(0 <= p["adversary_accuracy"] <= 1 and p["chance"] == 0.2 for p in curve)
    sweep = curved_report["sweep"]
    assert [p["epsilon"] for p in sweep] == [10.0, 1.0]
    assert sweep[0]["tstr_accuracy"] == curved_report["utility"]["tstr_accuracy"]
    assert all(0 <= p["adversary_accuracy"] <= 1 and 0 <= p["task_accuracy"] <= 1 for p in sweep)
    html = (curved / "report.html").read_text()
    assert "over the replacement" in html and "Privacy vs utility" in html and "adversary accuracy" in html
    capsys.readouterr()
    assert cli.main(["evaluate", "--synthetic", str(run), *common, "--out", str(curved),
                     "--replacement-curve", "0,2"]) == 2
    assert "strengths in [0, 1]" in capsys.readouterr().err


def test_replacing_needs_a_generator_that_learned_the_second_attribute(faces: str, tmp_path: Path,
                                                                      capsys) -> None:
    run = tmp_path / "run"
    assert cli.main(["simulate", "--data", faces, "--mode", "dpgan", "--out", str(run), *TINY,
                     "--set", "label-from=utkface-gender", "--set", "image-size=16",
                     "--set", "synthetic-size=20"]) == 0
    capsys.readouterr()
    assert cli.main(["replace-attribute", str(run), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "never learned a second attribute" in err and "label-from=utkface-gender+race" in err
    assert cli.main(["replace-attribute", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no report.json" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_the_product_sizes_a_64x64_colour_run_from_the_shape() -> None:
    from common.config import RunConfig
    from server.defaults import resolve
    from server.sites import Schema

    schema = Schema(channels=3, height=64, width=64, classes=("male", "female"))
    cfg, chosen = resolve(RunConfig(), schema, num_sites=3)
    # the GAN draws 64x64 faces at 32 pixels, with the 32-pixel colour networks
    assert cfg.gan_resolution == 32 and cfg.gan_width == 32 and cfg.gan_shape(3, 64, 2).stages == 2
    assert any(c.setting == "gan-resolution" and "resized to 64" in c.reason for c in chosen)
    small, _ = resolve(RunConfig(), Schema(channels=3, height=32, width=32, classes=("a", "b")), num_sites=3)
    assert small.gan_resolution == 32 and small.gan_width == 32 and small.gan_shape(3, 32, 2).stages == 2
    # a user who asks for the full side gets the 64-pixel networks the rules size for it
    full, chosen = resolve(RunConfig(gan_resolution=64), schema, num_sites=3)
    assert full.gan_width == 16 and full.gan_shape(3, 64, 2).stages == 3  # narrower G, a third stage
    assert any(c.setting == "gan-width" and "64x64" in c.reason for c in chosen)
    # the statistics mode: its net works at 32 pixels and its synthesis draws at 32 (resized to 64)
    bn, chosen = resolve(RunConfig(mode="bnstats"), schema, num_sites=3)
    assert bn.bn_resolution == 32 and any(c.setting == "bn-resolution" and "resizes to 64" in c.reason for c in chosen)
    assert resolve(RunConfig(mode="bnstats"), Schema(3, 32, 32, ("a", "b")), num_sites=3)[0].bn_resolution == 32
    assert resolve(RunConfig(mode="bnstats", bn_resolution=64), schema, num_sites=3)[0].bn_resolution == 64
