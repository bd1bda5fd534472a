"""Render a run's ``report.json`` dict as one self-contained ``report.html``.

Every picture is embedded as a base64 PNG data URI (plots drawn with matplotlib's Agg backend, sample
grids read from the PNG files the report lists), so the file can be mailed or archived on its own.
Sections appear only when their data is in the report; nothing is required except a dict.

Report keys read (all optional)::

    mode, private (bool), epsilon_target, delta_bound, privacy_statement, notes [str]
    privacy: {"sites": [{name, released [str], epsilon_bound, delta_bound}]}
    utility: {tstr_accuracy, real_accuracy, ratio, mcc, real_mcc, per_class_accuracy [K],
              real_per_class_accuracy [K], classes [K], confusion [[K x K]], num_test}
    sites: [{name, weight, bytes_sent, rounds_ok, rounds_failed, and in a simulation the owner's
             view of the site's ledger: epsilon, delta, examples, releases}]
    synthetic: {count, npz, folder, grids: [PNG paths relative to out_dir]}
    audits: {"pixel": <summary>, "feature": <summary>, "who"}: exact audits by whoever holds the real
            data (``fedsynth evaluate``, a simulation's owner); <summary> is the layout of
            ``common.audits.site_audit_summary``
    site_audits: the sites' DP audit answers (``server.site_audits``)
    site_evaluation: the sites' DP evaluation answers (``server.federated_eval``)
    attributes: {task: {classes, accuracy, mcc, real_accuracy?}, sensitive: {classes, adversary_accuracy,
                 majority_rate, advantage}} for a set labelled with two attributes (``fedsynth evaluate``);
    attribute_replacement: what ``fedsynth replace-attribute`` did (server.attribute_replacement.Replacement)
    sweep: [{epsilon, tstr_accuracy, real_accuracy?, ...}]
    timings: {phase: seconds}
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display at the coordinator; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.files import atomic_write_text  # noqa: E402
from server.html_parts import Raw as _Raw, bound_text, esc as _esc, fmt as _fmt  # noqa: E402
from server.html_parts import img as _img, table as _table  # noqa: E402
from server.report_html_audits import attributes_section, audits_section, site_audits_section  # noqa: E402
from server.report_plots import confusion_plot, fig_png, per_class_plot  # noqa: E402

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
.banner{padding:.8em 1em;font-weight:bold;font-size:1.2em;border-radius:4px;margin:1em 0}
.notdp{background:#c62828;color:#fff} .dp{background:#2e7d32;color:#fff} .unknown{background:#777;color:#fff}
.flag{color:#c62828;font-weight:bold} .ok{color:#2e7d32} img{max-width:100%} .muted{color:#666}
"""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


def _banner(report: dict) -> str:
    private = report.get("private")
    eps, delta = report.get("epsilon_target"), report.get("delta_bound", report.get("delta"))
    if private is False:
        return ('<div class="banner notdp">NOT differentially private: this run asked the sites for no privacy '
                "(epsilon = inf), so it states no DP guarantee (a site with a budget of its own still added noise "
                "within it); do not share its outputs as if they protected the sites' records.</div>")
    if private is True:
        shown_delta = bound_text(float(delta)) if isinstance(delta, (int, float)) else _fmt(delta)
        shown_eps = bound_text(float(eps)) if isinstance(eps, (int, float)) else _fmt(eps)
        budget = f" (&epsilon; &le; {shown_eps} per site, &delta; &le; {shown_delta})" if eps is not None else ""
        return f'<div class="banner dp">Differentially private{budget}</div>'
    return '<div class="banner unknown">Privacy status unknown: the report does not say whether the run was DP.</div>'


def _privacy_section(report: dict) -> str:
    """What epsilon and delta mean, and what each site released under them."""
    out = ["<h2>Privacy</h2>"]
    for para in str(report.get("privacy_statement", "")).split("\n"):
        if para.strip():
            out.append(f"<p>{_esc(para)}</p>")
    rows = [(s.get("name"), _Raw("<br>".join(_esc(r) for r in s.get("released", [])) or "nothing"),
             *(bound_text(s[k]) if isinstance(s.get(k), (int, float)) else s.get(k)
               for k in ("epsilon_bound", "delta_bound"))) for s in (report.get("privacy") or {}).get("sites", [])]
    if rows:
        out.append(_table(("site", "released in this run", "epsilon (at most)", "delta (at most)"), rows,
                          table_id="privacy"))
    secure = report.get("secure_aggregation") or {}
    if secure:
        out.append("<h3>Secure aggregation</h3>")
        out.append(_table(("item", "value"), [
            ("sites whose shares remove a dropped site's masks (threshold)", secure.get("threshold")),
            ("noise split over (distributed noise; 1 = off)", secure.get("noise_shares")),
            ("values clipped to +-", secure.get("clipping_range")), ("precision", secure.get("precision"))],
            table_id="secure-aggregation"))
    return "\n".join(out)


def _class_names(utility: dict, k: int) -> list[str]:
    names = utility.get("classes")
    return [str(n) for n in names] if names and len(names) == k else [str(i) for i in range(k)]


def _utility_section(utility: dict) -> str:
    rows = [
        ("TSTR accuracy (train on synthetic, test on real)", utility.get("tstr_accuracy")),
        ("Real-data accuracy (same learner, real training data)", utility.get("real_accuracy")),
        ("Ratio TSTR / real", utility.get("ratio")),
        ("Matthews correlation (TSTR)", utility.get("mcc")),
        ("Matthews correlation (real)", utility.get("real_mcc")),
        ("Test records", utility.get("num_test")),
    ]
    rows = [r for r in rows if r[1] is not None]
    out = ["<h2>Utility</h2>", _table(("metric", "value"), rows, table_id="accuracy")]
    per_class = utility.get("per_class_accuracy")
    if per_class:
        names = _class_names(utility, len(per_class))
        real = utility.get("real_per_class_accuracy")
        has_real = bool(real) and len(real) == len(per_class)
        headers = ("class", "TSTR accuracy") + (("real accuracy",) if has_real else ())
        rows = [(n, a) + ((real[i],) if has_real else ()) for i, (n, a) in enumerate(zip(names, per_class))]
        out += ["<h3>Per-class accuracy</h3>", _table(headers, rows, table_id="per-class")]
        out.append(_img(per_class_plot(names, per_class, real if has_real else None), "per-class accuracy"))
    conf = utility.get("confusion")
    if conf:
        out += ["<h3>Confusion matrix (TSTR; rows = true class)</h3>",
                _img(confusion_plot(np.asarray(conf), _class_names(utility, len(conf))), "confusion matrix")]
    return "\n".join(out)


def _sites_section(sites: list[dict]) -> str:
    owner = any("epsilon" in s for s in sites)
    headers = ("site", "device", "rounds answered", "failures", "noisy record total", "bytes sent")
    if owner:
        headers += ("records (owner)", "epsilon spent (its ledger)", "delta")
    rows = []
    for s in sites:
        failures = "; ".join(f"{k}: {v}" for k, v in (s.get("rounds_failed") or {}).items()) or "none"
        row = (s.get("name"), s.get("device") or "?", len(s.get("rounds_ok") or []), failures, s.get("weight"),
               s.get("bytes_sent"))
        if owner:
            row += (s.get("examples"), s.get("epsilon"), s.get("delta"))
        rows.append(row)
    note = ('<p class="muted">The last three columns are the simulation owner\'s view of each site (its '
            "ledger); a coordinator never sees them.</p>") if owner else ""
    return "<h2>Sites</h2>" + _table(headers, rows, table_id="sites") + note


def _device_line(report: dict) -> str:
    return (f'<p class="muted">The coordinator computed on {_esc(report["device"])}; each site\'s device is in '
            "the Sites table (a site uses its GPU when it has one).</p>") if report.get("device") else ""


def _site_evaluation_section(ev: dict) -> str:
    out = ["<h2>Evaluation by the sites (DP)</h2>",
           f'<p class="muted">Each site that allows it scored the classifier on its own held-out records and '
           f"sent noisy right/wrong counts per class (Gaussian noise, std {_fmt(ev.get('noise_std_per_cell'))} "
           "per count), charged to its ledger. Accuracies are read off the noisy counts.</p>"]
    rows = [(s.get("name"), s.get("accuracy"), s.get("records_noisy")) for s in ev.get("sites", [])]
    if ev.get("sites"):
        rows.append(("all answering sites", ev.get("accuracy"), sum(s.get("records_noisy", 0) for s in ev["sites"])))
    out.append(_table(("site", "accuracy (noisy)", "records (noisy)"), rows, table_id="site-evaluation"))
    for name, why in (ev.get("failed") or {}).items():
        out.append(f'<p class="muted">{_esc(name)}: {_esc(why)}</p>')
    if ev.get("not_allowed"):
        out.append(f'<p class="muted">Not allowed by: {_esc(", ".join(ev["not_allowed"]))}</p>')
    if ev.get("not_trained"):
        out.append(f'<p class="muted">Not asked, as they released nothing in this run: '
                   f'{_esc(", ".join(ev["not_trained"]))}</p>')
    return "\n".join(out)


def _synthetic_section(synthetic: dict, out_dir: Path) -> str:
    out = ["<h2>Synthetic data</h2>"]
    facts = [(k, synthetic[k]) for k in ("count", "npz", "folder") if synthetic.get(k) is not None]
    made = synthetic.get("made") or {}
    if made:
        facts.append(("made from", f"{made.get('from', '')}: {made.get('why', '')}"))
    mix = made.get("class-mix") or {}
    if mix:
        facts.append(("images per class", f"{', '.join(str(n) for n in mix.get('images-per-class', []))}: "
                                          f"{mix.get('why', '')}"))
    replaced = made.get("attribute_replacement") or {}
    if replaced:  # seed 004: the sensitive attribute drawn independently of everything else
        facts.append((f"{replaced.get('sensitive')} replaced (seed 004)",
                      f"every image shows a {replaced.get('sensitive')} drawn from {replaced.get('marginal')} "
                      f"independently of its labels and latents ({replaced.get('replaced')} records, "
                      f"{_fmt(replaced.get('agreement'))} show their claimed value by chance); declared by "
                      f"{', '.join(replaced.get('declared_by') or []) or 'the run settings'}; privacy cost: "
                      f"{replaced.get('privacy_cost')}"))
    if facts:
        out.append(_table(("item", "value"), facts, table_id="synthetic"))
    per_site = made.get("images-per-site-and-class") or {}
    if per_site:  # drawn from each site's generator, per class, by the sites' noisy class counts
        out.append(_table(("site", "images drawn from its generators, per class"), [
            (name, ", ".join(str(v) for v in row)) for name, row in per_site.items()], table_id="per-site"))
    for rel in synthetic.get("grids") or []:
        path = (out_dir / rel) if not Path(rel).is_absolute() else Path(rel)
        if path.is_file():
            out.append(f"<h3>{_esc(Path(rel).name)}</h3>" + _img(path.read_bytes(), f"sample grid {rel}"))
        else:
            out.append(f'<p class="muted">sample grid {_esc(rel)} not found next to the report</p>')
    return "\n".join(out)


def _sweep_section(sweep: list[dict]) -> str:
    pts = sorted((p for p in sweep if p.get("epsilon") is not None), key=lambda p: float(p["epsilon"]))
    out = ["<h2>Privacy vs utility</h2>"]
    rows = [(p.get("epsilon"), p.get("tstr_accuracy"), p.get("real_accuracy"), p.get("mia_auc")) for p in pts]
    headers = ("epsilon", "TSTR accuracy", "real accuracy", "MIA AUC")
    attributes = any(p.get("adversary_accuracy") is not None for p in pts)
    if attributes:  # a set labelled with two attributes (seed 004): task utility and the sensitive one's leak
        rows = [r + (p.get("task_accuracy"), p.get("adversary_accuracy"), p.get("majority_rate"))
                for r, p in zip(rows, pts)]
        headers += ("task accuracy", "sensitive attribute: adversary accuracy", "majority rate (no leak)")
    out.append(_table(headers, rows, table_id="sweep"))
    finite = [p for p in pts if np.isfinite(float(p["epsilon"]))]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        eps = [float(p["epsilon"]) for p in finite]
        ax.plot(eps, [p.get("tstr_accuracy", float("nan")) for p in finite], "o-", label="TSTR accuracy")
        for p in pts:
            if not np.isfinite(float(p["epsilon"])):  # no DP: a reference line, not a point on the axis
                ax.axhline(float(p.get("tstr_accuracy", float("nan"))), color="tab:red", linestyle=":",
                           label="TSTR without DP (NOT private)")
        if attributes:
            ax.plot(eps, [p.get("task_accuracy", float("nan")) for p in finite], "s-", label="task accuracy")
            ax.plot(eps, [p.get("adversary_accuracy", float("nan")) for p in finite], "^--",
                    label="sensitive attribute: adversary (privacy loss)")
        real = [p["real_accuracy"] for p in pts if p.get("real_accuracy") is not None]
        if real:
            ax.axhline(float(np.mean(real)), color="gray", linestyle="--", label="real-data accuracy")
        if len(eps) > 1 and min(eps) > 0 and max(eps) / min(eps) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("epsilon")
        ax.set_ylabel("accuracy on real test data")
        ax.set_ylim(0, 1)
        ax.legend()
        out.append(_img(fig_png(fig), "privacy-utility curve"))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def render_report(report: dict, out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` for ``report`` (layout in the module docstring); return its path.

    Missing sections are skipped; grid PNGs are read from paths relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = report.get("mode", "unknown")
    parts = [f"<h1>fedsynth report: {_esc(mode)}</h1>", _banner(report)]
    if report.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in report["notes"]) + "</ul>")
    if report.get("privacy_statement"):
        parts.append(_privacy_section(report))
    if isinstance(report.get("utility"), dict):
        parts.append(_utility_section(report["utility"]))
    if report.get("sites"):
        parts.append(_sites_section(report["sites"]) + _device_line(report))
    if report.get("site_evaluation"):
        parts.append(_site_evaluation_section(report["site_evaluation"]))
    if isinstance(report.get("synthetic"), dict):
        parts.append(_synthetic_section(report["synthetic"], out_dir))
    if isinstance(report.get("audits"), dict) and report["audits"]:
        parts.append(audits_section(report["audits"], out_dir))
    if report.get("site_audits"):
        parts.append(site_audits_section(report["site_audits"]))
    if isinstance(report.get("attributes"), dict):
        parts.append(attributes_section(report["attributes"], report.get("attribute_replacement"),
                                        report.get("attribute_curve")))
    if report.get("sweep"):
        parts.append(_sweep_section(report["sweep"]))
    if report.get("settings_chosen"):
        rows = [(c["setting"], c["value"], c["reason"]) for c in report["settings_chosen"]]
        parts.append("<h2>Settings the product chose</h2>"
                     '<p class="muted">Left at 0 (auto), these were chosen from the image shape, the classes and the '
                     "number of sites only (server/defaults.py); set them with --set to override.</p>"
                     + _table(("setting", "value", "why"), rows, table_id="settings-chosen"))
    rounds = report.get("rounds") or []
    taken = {site: steps for entry in rounds for site, steps in entry.get("local-steps", {}).items()}
    g_taken = {site: steps for entry in rounds for site, steps in entry.get("g-steps", {}).items()}
    if taken:  # the DP-GAN schedule each site chose from its own noisy census (client.site_schedule.choose_*_steps)
        parts.append("<h2>Steps each site took per round</h2>"
                     '<p class="muted">A site takes gan-long-local-steps instead of gan-local-steps where its own '
                     "noisy census counts 10,000 records or more (unless its budget cannot fit the longer plan), and "
                     "such a site takes gan-long-g-steps generator steps per D step instead of gan-g-steps, on "
                     "either schedule (free in privacy).</p>"
                     + _table(("site", "D steps per round", "G steps per D step"),
                              [(site, steps, g_taken.get(site, "")) for site, steps in sorted(taken.items())],
                              table_id="site-steps"))
    if isinstance(report.get("timings"), dict) and report["timings"]:
        parts.append("<h2>Timings</h2>" + _table(("phase", "seconds"), sorted(report["timings"].items()),
                                                 table_id="timings"))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>fedsynth report: {_esc(mode)}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(parts) + "\n</body></html>\n")
    return atomic_write_text(out_dir / "report.html", doc)


