"""Tests of fedsynth.evaluate (utility + audits on digits) and server.report_html (HTML rendering)."""

from __future__ import annotations

import argparse
import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from common.audits import site_audit_summary
from server.site_audits import summarize
from common.data import DataError, ImageDataset, load_dataset, save_npz
from common.learner import LearnerConfig
from fedsynth import evaluate
from server.report_html import render_report
from server.report_plots import save_class_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class _ReportParser(HTMLParser):
    """Collects <img> (src, alt), table ids with their cell texts, and all visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[tuple[str, str]] = []
        self.tables: dict[str, list[str]] = {}
        self.text: list[str] = []
        self._table: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append((a.get("src", ""), a.get("alt", "")))
        elif tag == "table":
            self._table = a.get("id") or f"anon{len(self.tables)}"
            self.tables[self._table] = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._table is not None and data.strip():
            self.tables[self._table].append(data.strip())


def _parse(path: Path) -> _ReportParser:
    parser = _ReportParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _png_from_data_uri(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    return base64.b64decode(src[len(prefix):])


@pytest.fixture(scope="module")
def digits() -> tuple[ImageDataset, ImageDataset]:
    torch.set_num_threads(1)
    return load_dataset("digits", "train"), load_dataset("digits", "test")


# --------------------------------------------------------------------------------------------------
# report_html
# --------------------------------------------------------------------------------------------------


def test_render_report_embeds_grid_histograms_and_tables(tmp_path: Path, digits) -> None:
    train, test = digits
    save_class_grid(train.images[:200], train.labels[:200], train.classes, tmp_path / "grids" / "samples.png")
    audit = site_audit_summary(train.images[:50], train.images[50:250], test.images[:200], n_bootstrap=50)
    report = {
        "mode": "dpgan", "private": False, "epsilon_target": 8.0, "delta": 1e-5,
        "sites": [{"name": "site-a", "epsilon": 7.9, "delta": 1e-5, "examples": 700, "bytes_sent": 123456}],
        "utility": {"tstr_accuracy": 0.8123, "real_accuracy": 0.95, "ratio": 0.855, "mcc": 0.79,
                    "per_class_accuracy": [0.5] * 10, "confusion": np.eye(10, dtype=int).tolist()},
        "synthetic": {"count": 1000, "npz": "synthetic.npz", "grids": ["grids/samples.png", "grids/missing.png"]},
        "audits": {"pixel": audit, "who": "the test"},
        "site_audits": {"noise_std_per_bin": 10.0, "near_copy_mse": 1e-3,
                        "sites": [{"name": "site-a", **summarize(np.arange(41.0), np.arange(41.0)[::-1])}],
                        "pooled": summarize(np.arange(41.0), np.arange(41.0)[::-1])},
        "sweep": [{"epsilon": 1.0, "tstr_accuracy": 0.5}, {"epsilon": 8.0, "tstr_accuracy": 0.8}],
        "notes": ["a <note> with markup"],
    }
    path = render_report(report, tmp_path)
    assert path == tmp_path / "report.html"
    page = _parse(path)
    alts = [alt for _, alt in page.images]
    for src, _ in page.images:
        assert _png_from_data_uri(src).startswith(PNG_SIGNATURE)
    grid_src = next(src for src, alt in page.images if alt == "sample grid grids/samples.png")
    assert _png_from_data_uri(grid_src) == (tmp_path / "grids" / "samples.png").read_bytes()
    assert "distance histogram Pixel space" in alts
    assert "site audit histograms" in alts and "site-a" in page.tables["site-audits"]
    assert "privacy-utility curve" in alts and "confusion matrix" in alts
    assert "0.8123" in page.tables["accuracy"] and "0.855" in page.tables["accuracy"]
    assert "site-a" in page.tables["sites"] and "123,456" in page.tables["sites"]
    assert "AUC" in page.tables["pixel-mia"]
    text = " ".join(page.text)
    assert "NOT differentially private" in text
    assert "a <note> with markup" in text  # escaped in the source, so it parses back as text
    assert "grids/missing.png not found" in text


def test_render_report_skips_missing_sections(tmp_path: Path) -> None:
    page = _parse(render_report({"mode": "bnstats", "private": True, "epsilon_target": 4.0}, tmp_path))
    assert page.images == []
    text = " ".join(page.text)
    assert "Differentially private" in text and "NOT differentially private" not in text


# --------------------------------------------------------------------------------------------------
# evaluate_synthetic
# --------------------------------------------------------------------------------------------------


def test_evaluate_synthetic_flags_a_copied_training_set(tmp_path: Path, digits) -> None:
    train, test = digits
    # "Synthetic" set = 300 verbatim training images: utility is fine, the audits must flag it.
    synthetic = train.subset(np.arange(300))
    report = evaluate.evaluate_synthetic(synthetic, test, train=train, out_dir=tmp_path,
                                         learner=LearnerConfig(epochs=2), max_audit_records=300, device="cpu")
    on_disk = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert on_disk == report
    u = report["utility"]
    assert 0.0 <= u["tstr_accuracy"] <= 1.0 and 0.0 < u["real_accuracy"] <= 1.0
    assert u["ratio"] == pytest.approx(u["tstr_accuracy"] / u["real_accuracy"])
    assert len(u["per_class_accuracy"]) == 10 and len(u["confusion"]) == 10
    assert sum(map(sum, u["confusion"])) == len(test)
    pixel, feature = report["audits"]["pixel"], report["audits"]["feature"]
    assert pixel["kind"] == feature["kind"] == "diagnostic"
    assert pixel["memorization"]["near_copies"]["count"] == 300
    assert pixel["memorization"]["flagged"]
    assert pixel["similarity"]["identical"] == 300
    assert pixel["membership_inference"]["auc"] > 0.55
    assert feature["space"] == "feature" and "similarity" not in feature
    assert report["private"] is None and report["mode"] == "evaluate"
    assert set(report["timings"]) >= {"train_learner_synthetic", "train_learner_real", "audit_pixel"}
    page = _parse(tmp_path / "report.html")
    assert any(alt == "sample grid synthetic_grid.png" for _, alt in page.images)
    # seed 000's picture: copies sit at distance 0 from their training image, never from a held-out one
    pairs = report["audits"]["nearest_pairs"]
    assert pairs["distance_to_train"] == [0.0] * 8 and min(pairs["distance_to_heldout"]) > 0
    assert (tmp_path / "nearest_pairs.png").is_file() and any(alt == "nearest pairs" for _, alt in page.images)


def test_evaluate_without_train_skips_baseline_and_audits(tmp_path: Path, digits) -> None:
    train, test = digits
    synthetic = train.subset(np.arange(200))
    report = evaluate.evaluate_synthetic(synthetic, test, out_dir=tmp_path / "a",
                                         learner=LearnerConfig(epochs=1), device="cpu")
    assert "audits" not in report and "real_accuracy" not in report["utility"]
    assert any("--train" in n for n in report["notes"])
    # A real baseline from an earlier evaluation is reused instead of retrained.
    baseline = {"accuracy": 0.5, "per_class_accuracy": [0.5] * 10, "mcc": 0.4, "confusion": [], "num_test": 1}
    reused = evaluate.evaluate_synthetic(synthetic, test, out_dir=tmp_path / "b", learner=LearnerConfig(epochs=1),
                                         device="cpu", real_result=baseline)
    assert reused["utility"]["real_accuracy"] == 0.5
    assert reused["utility"]["ratio"] == pytest.approx(reused["utility"]["tstr_accuracy"] / 0.5)
    assert "train_learner_real" not in reused["timings"] and reused["real_baseline"] == baseline


def test_evaluate_rejects_mismatched_shapes(tmp_path: Path, digits) -> None:
    train, test = digits
    small = ImageDataset(train.images[:20, :, :6, :6].copy(), train.labels[:20], train.classes)
    with pytest.raises(DataError, match="same image size"):
        evaluate.evaluate_synthetic(small, test, out_dir=tmp_path, learner=LearnerConfig(epochs=1))


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_reads_a_run_folder_and_carries_its_privacy_status(tmp_path: Path, digits, capsys) -> None:
    train, _ = digits
    run = tmp_path / "run"
    save_npz(train.subset(np.arange(150, 450)), run / "synthetic.npz")
    statement = "Everything each site released in this run is together (8, 1.4e-05)-differentially private ..."
    (run / "report.json").write_text(json.dumps({"mode": "dpgan", "private": False, "sites": [], "delta_bound": 1.4e-5,
                                                 "privacy_statement": statement, "privacy": {"sites": []}}))
    out = tmp_path / "eval"
    code = evaluate.main(_cli(["--synthetic", str(run), "--test", "digits", "--train", "digits",
                               "--out", str(out), "--learner-epochs", "1", "--max-audit-records", "200",
                               "--device", "cpu", "--quiet"]))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "dpgan" and report["private"] is False
    # the run's privacy statement and delta carry over (review s67: they were dropped)
    assert (report["delta_bound"], report["privacy_statement"], report["privacy"]) == (1.4e-5, statement, {"sites": []})
    assert "NOT differentially private" in (out / "report.html").read_text()
    assert "TSTR accuracy" in capsys.readouterr().out


def test_cli_reports_bad_input_with_exit_code_2(tmp_path: Path, capsys) -> None:
    code = evaluate.main(_cli(["--synthetic", str(tmp_path / "nope"), "--test", "digits", "--out", str(tmp_path)]))
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_reuses_a_real_baseline_only_when_measured_the_same_way(tmp_path: Path, digits, capsys) -> None:
    train, _ = digits
    run = tmp_path / "run"
    save_npz(train.subset(np.arange(0, 300)), run / "synthetic.npz")
    common = ["--synthetic", str(run), "--test", "digits", "--train", "digits", "--no-audits",
              "--device", "cpu", "--quiet", "--learner", "logreg"]
    assert evaluate.main(_cli(common + ["--out", str(tmp_path / "first"), "--learner-epochs", "2"])) == 0
    first = json.loads((tmp_path / "first" / "report.json").read_text())

    earlier = str(tmp_path / "first" / "report.json")
    assert evaluate.main(_cli(common + ["--out", str(tmp_path / "again"), "--learner-epochs", "2",
                                        "--real-baseline-from", earlier])) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["utility"]["real_accuracy"] == first["utility"]["real_accuracy"]
    assert "train_learner_real" not in again["timings"]
    assert any("reused" in note for note in again["notes"])

    # a different learner setting would make the ratio meaningless: refused, nothing written
    capsys.readouterr()
    code = evaluate.main(_cli(common + ["--out", str(tmp_path / "other"), "--learner-epochs", "3",
                                        "--real-baseline-from", earlier]))
    assert code == 2
    assert "learner settings" in capsys.readouterr().err
    assert not (tmp_path / "other" / "report.json").exists()
    # the same files at another size (a 32x32 baseline for 64x64 faces): refused as well
    first["evaluation"]["image_shape"] = [1, 16, 16]
    (tmp_path / "resized.json").write_text(json.dumps(first))
    code = evaluate.main(_cli(common + ["--out", str(tmp_path / "other"), "--learner-epochs", "2",
                                        "--real-baseline-from", str(tmp_path / "resized.json")]))
    assert code == 2 and "image size" in capsys.readouterr().err
    # an evaluation written before the image size was recorded: refused, saying so
    del first["evaluation"]["image_shape"]
    (tmp_path / "older.json").write_text(json.dumps(first))
    code = evaluate.main(_cli(common + ["--out", str(tmp_path / "other"), "--learner-epochs", "2",
                                        "--real-baseline-from", str(tmp_path / "older.json")]))
    assert code == 2 and "does not record its baseline's image_shape (an older fedsynth" in capsys.readouterr().err


def test_a_privacy_bound_is_shown_rounded_up_never_down(tmp_path: Path) -> None:
    """Review s67: the statement and the banner printed delta with one significant digit, so a site's 1.4e-05
    read as 1e-05 (and the tables rounded epsilon to nearest). A bound is now shown rounded up."""
    from server.html_parts import bound_text
    from server.report import privacy_statement

    assert [bound_text(x) for x in (1e-5, 1.4e-5, 4.9996, 0.123449, 0.3, 10.0)] == [
        "1e-05", "1.4e-05", "5", "0.124", "0.3", "10"]
    statement = privacy_statement(True, 4.9996, [{"name": "s", "released": [], "delta_bound": 1.4e-5}])
    assert "(5, 1.4e-05)-differentially private" in statement
    render_report({"mode": "dpgan", "private": True, "epsilon_target": 4.9996, "delta_bound": 1.4e-5}, tmp_path)
    text = " ".join(_parse(tmp_path / "report.html").text)
    assert "ε ≤ 5 per site, δ ≤ 1.4e-05" in text, text[:300]
