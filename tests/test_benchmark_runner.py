"""The results-grid runner (tests/benchmarks/run_grid.py): one real point on digits, recipes, the table."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from common.config import RunConfig
from common.data import load_dataset

RUNNER_PATH = Path(__file__).resolve().parent / "benchmarks" / "run_grid.py"


@pytest.fixture(scope="module")
def run_grid():
    spec = importlib.util.spec_from_file_location("run_grid", RUNNER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_grid"] = module
    spec.loader.exec_module(module)
    return module


def test_one_grid_point_runs_simulate_and_evaluate_and_fills_the_table(tmp_path: Path, run_grid) -> None:
    out, results = tmp_path / "runs", tmp_path / "results"
    tiny = ["--set", "bn-rounds=2", "--set", "bn-iterations=20", "--set", "synthetic-size=200",
            "--set", "learner=mlp", "--set", "learner-epochs=4", "--set", "learner-lr=0.01"]
    code = run_grid.main(["--datasets", "digits", "--modes", "bnstats", "--epsilons", "5", "--sites", "2",
                          "--partitions", "iid", "--out", str(out), "--results", str(results), *tiny])
    assert code == 0
    rec = json.loads((results / "digits-bnstats-eps5-k2-iid.json").read_text())
    assert rec["status"] == "ok" and rec["private"] is True and rec["sites"] == 2
    # the numbers come from the two reports the CLI wrote
    sim = json.loads((out / rec["run_id"] / "sim" / "report.json").read_text())
    ev = json.loads((out / rec["run_id"] / "eval" / "report.json").read_text())
    assert rec["tstr_accuracy"] == ev["utility"]["tstr_accuracy"]
    assert rec["real_accuracy"] == ev["utility"]["real_accuracy"] and 0.5 < rec["real_accuracy"] <= 1.0
    assert math.isclose(rec["ratio"], rec["tstr_accuracy"] / rec["real_accuracy"])
    assert 0.0 <= rec["mia_auc_pixel"] <= 1.0 and rec["near_copies_pixel"] >= 0
    assert rec["epsilon_spent_max"] <= 5.0 + 1e-9
    assert rec["bytes_per_site"] == sum(s["bytes_sent"] for s in sim["sites"]) / 2 > 0
    assert rec["peak_rss_mib"] > 50 and rec["wall_seconds"] > 0 and len(rec["round_seconds"]) == 2
    assert (results / rec["sample_grid"]).is_file()
    # simulation and evaluation trained the same learner (the ratio compares like with like)
    assert "--learner mlp" in rec["commands"]["evaluate"] and "--learner-epochs 4" in rec["commands"]["evaluate"]
    assert "learner=mlp" in rec["commands"]["simulate"]

    table = (results / "table.md").read_text().splitlines()
    assert table[0].startswith("| dataset | mode | ε per site |") and len(table) == 3
    row = [c.strip() for c in table[2].strip("|").split("|")]
    assert row[:5] == ["digits", "bnstats", "5", "2", "iid"]
    assert row[5] == f"{rec['tstr_accuracy']:.3f}" and row[6] == f"{rec['tstr_mcc']:.2f}"

    # a second grid reuses the real-data learner (checked: same data and learner) and skips done points
    code = run_grid.main(["--datasets", "digits", "--modes", "bnstats", "--epsilons", "5,inf", "--sites", "2",
                          "--partitions", "iid", "--out", str(out), "--results", str(results), *tiny])
    assert code == 0
    nodp = json.loads((results / "digits-bnstats-epsinf-k2-iid.json").read_text())
    assert nodp["private"] is False and nodp["real_accuracy"] == rec["real_accuracy"]
    assert "--real-baseline-from" in nodp["commands"]["evaluate"]
    assert json.loads((results / "digits-bnstats-eps5-k2-iid.json").read_text())["date"] == rec["date"]
    assert "∞ (NOT private)" in (results / "table.md").read_text()

    # --evaluate-only: the finished simulation evaluated again, its simulate measurements kept
    sim_report = out / rec["run_id"] / "sim" / "report.json"
    sim_written = sim_report.stat().st_mtime_ns
    code = run_grid.main(["--datasets", "digits", "--modes", "bnstats", "--epsilons", "5", "--sites", "2",
                          "--partitions", "iid", "--out", str(out), "--results", str(results), "--evaluate-only",
                          *tiny])
    again = json.loads((results / "digits-bnstats-eps5-k2-iid.json").read_text())
    assert code == 0 and again["status"] == "ok" and again["simulate"] == rec["simulate"]
    assert sim_report.stat().st_mtime_ns == sim_written  # not simulated again
    assert (out / rec["run_id"] / "eval" / "report.json").stat().st_mtime_ns > sim_written  # evaluated again

    # a cached baseline written before the evaluation recorded a field it checks (here the image size) would
    # be refused by every evaluation: the runner trains the baseline again and replaces the cache
    (cache,) = out.glob("real-baseline-digits-*.json")
    stale = json.loads(cache.read_text())
    del stale["evaluation"]["image_shape"]
    cache.write_text(json.dumps(stale))
    code = run_grid.main(["--datasets", "digits", "--modes", "bnstats", "--epsilons", "5", "--sites", "2",
                          "--partitions", "iid", "--out", str(out), "--results", str(results), "--evaluate-only",
                          *tiny])
    fresh = json.loads((results / "digits-bnstats-eps5-k2-iid.json").read_text())
    assert code == 0 and fresh["status"] == "ok" and "--real-baseline-from" not in fresh["commands"]["evaluate"]
    assert "image_shape" in json.loads(cache.read_text())["evaluation"]


def test_data_nobody_described_is_found_and_runs_with_the_defaults(tmp_path: Path, run_grid) -> None:
    # a data root like ../shared/data with one dataset the runner knows, one it does not (an npz one folder
    # down, as MedMNIST ships), an IDX folder at the top, and files that are no dataset
    root = tmp_path / "data"
    (root / "medmnist").mkdir(parents=True)
    arrays = {}
    for split in ("train", "test"):  # the MedMNIST layout: uint8 (N, H, W) images, (N, 1) labels
        ds = load_dataset("digits", split)
        arrays[f"{split}_images"] = np.round(ds.images[:, 0] * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = ds.labels.reshape(-1, 1)
    np.savez(root / "medmnist" / "digitsmnist.npz", **arrays)
    (root / "medmnist" / "pneumoniamnist.npz").write_bytes(b"")  # described by DATASETS: not listed again
    (root / "medmnist" / ".cache").mkdir()  # a subfolder beside the npz files: still a folder of datasets
    (root / "fashion").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (root / "fashion" / name).write_bytes(b"")
    (root / "README.md").write_text("not data")
    (root / "notes").mkdir()
    (root / "notes" / "a.txt").write_text("not data")
    found = run_grid.undescribed_datasets(root)
    assert found == [f"fashion={root / 'fashion'}", f"digitsmnist={root / 'medmnist' / 'digitsmnist.npz'}"]

    # NAME=PATH runs like a described dataset: the product's defaults, evaluated against the file's test split
    out, results = tmp_path / "runs", tmp_path / "results"
    code = run_grid.main(["--datasets", found[1], "--data-root", str(root), "--modes", "bnstats", "--epsilons", "5",
                          "--sites", "2", "--partitions", "iid", "--out", str(out), "--results", str(results),
                          "--set", "bn-rounds=2", "--set", "bn-iterations=20", "--set", "synthetic-size=200",
                          "--set", "learner=mlp", "--set", "learner-epochs=4", "--set", "learner-lr=0.01"])
    rec = json.loads((results / "digitsmnist-bnstats-eps5-k2-iid.json").read_text())
    assert code == 0 and rec["status"] == "ok" and rec["dataset"] == "digitsmnist"
    assert f"--data {root / 'medmnist' / 'digitsmnist.npz'}" in rec["commands"]["simulate"]
    assert 0.5 < rec["real_accuracy"] <= 1.0

    with pytest.raises(SystemExit, match="NAME=PATH"):
        run_grid.main(["--datasets", "bad name=/x", "--out", str(out), "--results", str(results)])
    with pytest.raises(SystemExit, match="does not exist"):
        run_grid.main(["--datasets", f"gone={root / 'gone.npz'}", "--out", str(out), "--results", str(results)])


def test_failed_runs_are_recorded_and_shown(tmp_path: Path, run_grid) -> None:
    record = {"run_id": "x", "dataset": "mnist", "mode": "dpgan", "epsilon": 1.0, "sites": 3,
              "partition": "iid", "status": "failed", "error": "simulate exited 2:\nbad"}
    table = run_grid.format_table([record])
    assert "failed: simulate exited 2:" in table
    assert table.splitlines()[2].count("|") == table.splitlines()[0].count("|")


def test_bad_grids_are_refused_before_any_run(tmp_path: Path, run_grid) -> None:
    with pytest.raises(SystemExit, match="unknown dataset"):
        run_grid.main(["--datasets", "imagenet", "--out", str(tmp_path), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        run_grid.main(["--datasets", "mnist", "--data-root", str(tmp_path / "nowhere"),
                       "--out", str(tmp_path), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="learner-epochs"):
        run_grid.main(["--datasets", "digits", "--set", "learner-epochs=0", "--out", str(tmp_path),
                       "--results", str(tmp_path)])
    assert not list(tmp_path.glob("*.json"))


def test_every_recipe_is_a_valid_run_config(run_grid) -> None:
    for name in run_grid.DATASETS:
        for mode in ("dpgan", "bnstats"):
            for eps in (1.0, 10.0, math.inf):
                point = run_grid.GridPoint(name, mode, eps, 3, "dirichlet:0.5")
                for recipe in ("", *run_grid.RECIPES):
                    RunConfig.from_mapping(run_grid.recipe_settings(point, {}, recipe))
    # without a recipe a grid point is the product's defaults: only what describes the data is set
    defaults = run_grid.recipe_settings(run_grid.GridPoint("mnist", "dpgan", 10.0, 3, "iid"), {})
    assert set(defaults) == {"real-baseline", "progress"}


def test_the_grid_datasets_load(shared_data: Path, run_grid) -> None:
    for name, spec in run_grid.DATASETS.items():
        if spec.data == "digits":
            continue
        ds = load_dataset(spec.path(shared_data), "test", label_from=spec.label_from or None,
                          image_size=spec.image_size or None)
        assert len(ds) > 100 and len(ds.classes) >= 2, name


def test_readme_table_block_is_rewritten_between_its_markers(tmp_path: Path, run_grid) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{run_grid.README_START}\nold\n{run_grid.README_END}\nafter\n")
    run_grid.update_readme(readme, "| new |\n")
    assert readme.read_text() == f"# x\n{run_grid.README_START}\n| new |\n{run_grid.README_END}\nafter\n"
    with pytest.raises(SystemExit, match="markers"):
        run_grid.update_readme(_no_markers(tmp_path), "x")


def _no_markers(tmp_path: Path) -> Path:
    path = tmp_path / "plain.md"
    path.write_text("# nothing here\n")
    return path
