"""`fedsynth demo` end to end with tiny settings: both runs, the summary and one HTML page with the curve."""

from __future__ import annotations

import json

from fedsynth.cli import main


def test_demo_runs_private_and_non_private_and_writes_one_report(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--quiet", "--rounds", "1", "--synthetic-size", "100",
                 "--set", "gan-local-steps=3", "--set", "gan-width=16", "--set", "learner-epochs=1",
                 "--set", "audit-records=50"])
    assert code == 0
    text = capsys.readouterr().out
    assert "synthetic, epsilon=10 per site" in text and "NO DP (not private)" in text and "real pooled data" in text
    summary = json.loads((out / "demo_summary.json").read_text())
    private_report = json.loads((out / "eps_10" / "report.json").read_text())
    assert summary["epsilon"] == 10.0
    assert summary["real_accuracy"] == private_report["utility"]["real_accuracy"]
    assert summary["tstr_private"] == private_report["utility"]["tstr_accuracy"]
    assert all(e <= 10.0 for e in summary["epsilon_spent_per_site"])
    html = (out / "report.html").read_text()
    assert "Privacy vs utility" in html and "data:image/png;base64" in html
    assert json.loads((out / "eps_inf" / "report.json").read_text())["private"] is False
