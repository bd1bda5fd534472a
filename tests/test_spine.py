"""The whole DP-GAN round loop in-process: 3 sites on digits, real Flower apps, no Ray."""

from __future__ import annotations

import json
import math

import numpy as np

from client.ledger import PrivacyLedger
from common.data import load_dataset
from tests.spine_helpers import fast_config, run


def test_three_site_dpgan_run_produces_outputs_and_accounts_privacy(tmp_path):
    cfg = fast_config(tmp_path, epsilon=10.0)
    report = run(cfg)
    out = tmp_path / "out"
    # every round reached its quorum with all three sites
    assert [h["accepted"] for h in report["rounds"]] == [3, 3]
    assert all(h["aggregated"] for h in report["rounds"])
    # outputs a person and the learner can use
    synth = load_dataset(out / "synthetic.npz", "train")
    assert len(synth) == 100 and synth.image_shape == (1, 8, 8)
    assert np.bincount(synth.labels).tolist() == [10] * 10
    assert (out / "synthetic").is_dir() and len(list((out / "synthetic").rglob("*.png"))) == 100
    assert (out / "grids" / "grid_all.png").exists()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["mode"] == "dpgan" and on_disk["private"] is True
    assert 0.0 <= on_disk["utility"]["tstr_accuracy"] <= 1.0
    assert len(on_disk["utility"]["per_class_accuracy"]) == 10
    assert set(on_disk["timings"]) >= {"rounds", "synthesis", "learner_synthetic", "total"}
    # per-site privacy: spent epsilon within the request, and equal to what each site's ledger says
    for site in report["sites"]:
        assert 0 < site["epsilon"] <= 10.0 + 1e-9
        assert site["examples"] > 400 and site["bytes_sent"] > 0
    ledgers = sorted((tmp_path / "sites").rglob("ledger/*.jsonl"))
    assert len(ledgers) == 3
    spent = sorted(PrivacyLedger(p, epsilon_budget=10.0, delta=report["sites"][0]["delta"]).spent().epsilon
                   for p in ledgers)
    assert np.allclose(spent, sorted(s["epsilon"] for s in report["sites"]))
    # the planned rounds end at the target epsilon (calibrated, never above)
    assert max(spent) > 9.0
    # each site drew its DP class histogram once, charged with its first round, and kept it on site
    for path in ledgers:
        entries = PrivacyLedger(path, epsilon_budget=10.0, delta=report["sites"][0]["delta"]).entries()
        gan = [e for e in entries if e.get("purpose") == "dpgan"]
        assert [len(e["events"]) for e in gan] == [2, 1]
        assert gan[0]["events"][0]["sample_rate"] == 1.0 and gan[0]["events"][0]["noise_multiplier"] >= 20.0
    histograms = sorted((tmp_path / "sites").rglob("class-histogram.json"))
    assert len(histograms) == 3 and len(json.loads(histograms[0].read_text())["noisy-counts"]) == 10


def test_non_private_run_is_marked_not_private(tmp_path):
    report = run(fast_config(tmp_path, epsilon=math.inf, num_rounds=1), k=2)
    assert report["private"] is False
    assert "NOT differentially private" in report["privacy_statement"]
    assert all(math.isinf(s["epsilon"]) for s in report["sites"])
    assert json.loads((tmp_path / "out" / "report.json").read_text())["sites"][0]["epsilon"] == "inf"


def test_real_baseline_and_ratio(tmp_path):
    report = run(fast_config(tmp_path, num_rounds=1, real_baseline=True, learner_epochs=3), k=2)
    u = report["utility"]
    assert u["real_accuracy"] > 0.8  # a CNN on real digits, even briefly trained
    assert math.isclose(u["ratio"], u["tstr_accuracy"] / u["real_accuracy"])


def test_federated_evaluation_returns_only_metrics_from_site_heldout_data(tmp_path):
    from common import protocol as P

    seen = []
    report = run(fast_config(tmp_path, num_rounds=1), k=3, tap=seen.append)
    fed = report["federated_evaluation"]
    assert [r["name"] for r in fed["sites"]] == ["site-1", "site-2", "site-3"]
    assert fed["num_test"] == 359  # the digits test split, partitioned over the sites
    assert abs(fed["accuracy"] - report["utility"]["tstr_accuracy"]) < 1e-9  # same classifier, same records
    evals = [m for m in seen if m.metadata.message_type == P.EVALUATE_CLASSIFIER]
    assert len(evals) == 3
    for reply in evals:
        assert set(reply.content.keys()) == {P.REPLY_METRICS}
        assert set(reply.content.metric_records[P.REPLY_METRICS].keys()) == set(P.EVAL_REPLY_METRICS)


def test_site_audits_return_labelled_aggregates_and_can_be_switched_off(tmp_path):
    from common import protocol as P
    from tests.spine_helpers import nodes
    from fedsynth.localgrid import run_inprocess
    from client.app import app as client_app
    from server.app import run_coordinator

    seen = []
    cfg = fast_config(tmp_path, num_rounds=1, audit_records=60)
    site_nodes = nodes(2)
    site_nodes[1]["audits"] = False  # this site's operator switched diagnostics off
    report = run_inprocess(run_coordinator, client_app, cfg.to_flwr(), site_nodes, tap=seen.append)
    audits = report["audits"]
    assert [s["name"] for s in audits["sites"]] == ["site-1"]
    assert "switched off" in audits["failed"]["site-2"]
    site = audits["sites"][0]
    assert site["kind"] == "diagnostic"
    assert 0.0 <= site["membership_inference"]["auc"] <= 1.0
    assert site["records"]["synthetic"] == 60
    # no per-record values: every list in the reply is a fixed-size histogram or a CI/edges vector
    reply = next(m for m in seen if m.metadata.message_type == P.QUERY_AUDIT and not m.has_error())
    for key, value in reply.content.config_records[P.REPLY_DIAGNOSTIC].items():
        if isinstance(value, list):
            assert len(value) <= 41, key
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Privacy audits" in html
