"""The report's audit sections: exact audits (pixel and feature space, nearest pairs), the sites' DP audits,
and the attribute-level view of a set labelled with two attributes (seed 004). Layouts as in
``server.report_html``'s docstring."""

from __future__ import annotations

from pathlib import Path

from server.html_parts import Raw as _Raw, esc as _esc, fmt as _fmt, img as _img, table as _table
from server.report_plots import attribute_curve_plot, histogram_plot


def site_audits_section(audits: dict) -> str:
    out = ["<h2>Privacy audits by the sites (DP)</h2>",
           f'<p class="muted">Each site that allows it histogrammed the distance (pixel MSE) from each of its '
           "training records and each of its held-out records to the nearest synthetic image, with Gaussian noise "
           f"of std {_fmt(audits.get('noise_std_per_bin'))} per bin, charged to its ledger. Membership AUC: how "
           "well \"close to the synthetic set\" tells training records from held-out ones; 0.5 = no signal, "
           f"1 = every training record is given away. Near-copy share: records with a synthetic image closer than "
           f"MSE {_fmt(audits.get('near_copy_mse'))}; no memorization means about the same share for both.</p>"]
    rows = [(s.get("name"), s.get("membership_auc"), s.get("near_copy_share_members"),
             s.get("near_copy_share_nonmembers")) for s in audits.get("sites", [])]
    pooled = audits.get("pooled")
    if pooled:
        rows.append(("all answering sites", pooled.get("membership_auc"), pooled.get("near_copy_share_members"),
                     pooled.get("near_copy_share_nonmembers")))
    out.append(_table(("site", "membership AUC", "near-copy share (training)", "near-copy share (held-out)"), rows,
                      table_id="site-audits"))
    if pooled:
        hist = pooled["histograms"]
        out.append(_img(histogram_plot(hist, "pixel MSE", "records' distance to the nearest synthetic image "
                                        "(noisy counts, all answering sites)", ylabel="records (noisy)"),
                        "site audit histograms"))
    for name, why in (audits.get("failed") or {}).items():
        out.append(f'<p class="muted">{_esc(name)}: {_esc(why)}</p>')
    if audits.get("not_trained"):
        out.append(f'<p class="muted">Not asked, as they released nothing in this run: '
                   f'{_esc(", ".join(audits["not_trained"]))}</p>')
    return "\n".join(out)


def _audit_block(summary: dict, title: str, key: str) -> str:
    """One audit summary (layout of common.audits.site_audit_summary); ``key`` prefixes table ids."""
    out = [f"<h3>{_esc(title)}</h3>"]
    rec = summary.get("records") or {}
    metric = summary.get("metric", "")
    if rec:
        out.append(f'<p class="muted">{_fmt(rec.get("synthetic"))} synthetic records vs '
                   f'{_fmt(rec.get("reference_per_side"))} training and held-out records each '
                   f'(near-copies searched in {_fmt(rec.get("train"))} training records); metric {_esc(metric)}.</p>')
    mem = summary.get("memorization")
    if mem:
        alpha = mem.get("alpha")
        mw = (mem.get("mann_whitney") or {}).get("p_value")
        fisher = (mem.get("near_copies") or {}).get("fisher_p_value")
        boot = mem.get("reference_bootstrap") or {}
        ci, distinct = boot.get("ci95") or [None, None], boot.get("distinct_nearest") or {}
        rule = (f"it is flagged when synthetic images are closer to training than to held-out records (one-sided "
                f"Mann-Whitney p = {_fmt(mw)}, and a mean gap held-out minus training of {_fmt(boot.get('gap'))} "
                f"whose 95% interval over resampled reference records, [{_fmt(ci[0])}, {_fmt(ci[1])}], stays above "
                f"0; nearest to some synthetic record: {_fmt(distinct.get('train'))} training and "
                f"{_fmt(distinct.get('heldout'))} held-out records) or hold more near-copies than chance (Fisher "
                f"p = {_fmt(fisher)}), each at p &lt; {_fmt(alpha)}; the other tests are shown for reference and do "
                "not flag")
        verdict = (f'<span class="flag">flagged: {_esc(", ".join(mem.get("flags", [])))}</span>'
                   if mem.get("flagged") else '<span class="ok">not flagged</span>')
        out.append(f"<p>Memorization test: {verdict}. No memorization looks like equal distances to training "
                   f"and held-out records; {rule}.</p>")
        tr, ho = mem.get("train", {}), mem.get("heldout", {})
        rows = [("to nearest training record", tr.get("mean"), tr.get("std"), tr.get("median")),
                ("to nearest held-out record", ho.get("mean"), ho.get("std"), ho.get("median"))]
        out.append(_table(("distance of synthetic records", "mean", "std", "median"), rows, table_id=f"{key}-memorization"))
        tests = [(name, mem[key].get("statistic"), mem[key].get("p_value"))
                 for key, name in (("mann_whitney", "Mann-Whitney U (train smaller, one-sided)"),
                                   ("ks", "Kolmogorov-Smirnov (two-sided)"),
                                   ("wilcoxon_paired", "Wilcoxon signed-rank, paired (train smaller)"))
                 if key in mem]
        tests.append(("fraction of synthetic records closer to train", mem.get("closer_to_train_fraction"), None))
        out.append(_table(("test", "statistic", "p-value"), tests))
        nc = mem.get("near_copies")
        if nc:
            out.append(_table(("near-copies", "value"), [
                ("count", nc.get("count")), ("expected by chance", nc.get("expected_by_chance")),
                ("Fisher p-value", nc.get("fisher_p_value")), ("threshold", nc.get("threshold")),
                ("rule", nc.get("rule"))]))
        if mem.get("histogram"):
            out.append(_img(histogram_plot(mem["histogram"], metric, title), f"distance histogram {title}"))
    mia = summary.get("membership_inference")
    if mia:
        ci = mia.get("auc_ci95") or [None, None]
        out.append('<p class="muted">Membership inference: an attacker calls a record a member when it lies close '
                   "to the synthetic set. AUC 0.5 = no signal (a coin toss), 1.0 = every member found.</p>")
        out.append(_table(("membership inference (score = -distance to nearest synthetic)", "value"), [
            ("AUC", mia.get("auc")),
            ("AUC 95% bootstrap CI", _Raw(f"[{_fmt(ci[0])}, {_fmt(ci[1])}]")),
            (f"TPR at {_fmt(mia.get('fpr'))} FPR", mia.get("tpr_at_fpr")),
            ("members / non-members", _Raw(f"{_fmt(mia.get('members'))} / {_fmt(mia.get('nonmembers'))}")),
        ], table_id=f"{key}-mia"))
    sim = summary.get("similarity")
    if sim:
        rows = [(name.upper(), sim[name].get("mean"), sim[name].get("std"), sim[name].get("max"))
                for name in ("ssim", "psnr") if name in sim]
        out.append(_table(("similarity to nearest private image", "mean", "std", "max"), rows, table_id=f"{key}-similarity"))
        out.append(f'<p class="muted">PSNR in dB, capped at {_fmt(sim.get("psnr_cap"))} dB; '
                   f'{_fmt(sim.get("identical"))} synthetic images are identical to a private image.</p>')
    return "\n".join(out)


def _nearest_pairs(pairs: dict, out_dir: Path) -> str:
    path = out_dir / str(pairs.get("image", ""))
    if not path.is_file():
        return ""
    d_tr, d_ho = pairs.get("distance_to_train") or [], pairs.get("distance_to_heldout") or []
    return ("<h3>Nearest pairs</h3><p class=\"muted\">Top row: the synthetic images closest to a training image "
            "(pixel MSE); middle: that training image; bottom: the nearest held-out image. Copies would show as a "
            "middle row that repeats the top one while the bottom one does not. MSE to training "
            f"{', '.join(_fmt(d) for d in d_tr)}; to held-out {', '.join(_fmt(d) for d in d_ho)}.</p>"
            + _img(path.read_bytes(), "nearest pairs"))


def audits_section(audits: dict, out_dir: Path) -> str:
    who = audits.get("who") or "whoever holds the real data"
    out = ["<h2>Privacy audits (exact)</h2>",
           f'<p class="muted">Computed by {_esc(who)}: they compare the synthetic set with the real training and '
           "held-out records directly. They are diagnostics for the data's owner; a site never releases such "
           "exact numbers (see the sites' DP audits).</p>"]
    for key, title in (("pixel", "Pixel space"), ("feature", "Feature space")):
        if isinstance(audits.get(key), dict):
            out.append(_audit_block(audits[key], title, key))
        if key == "pixel" and isinstance(audits.get("nearest_pairs"), dict):
            out.append(_nearest_pairs(audits["nearest_pairs"], out_dir))
    return "\n".join(out)


def attributes_section(attributes: dict, replacement: dict | None, curve: list[dict] | None = None) -> str:
    """Seed 004: utility of the first attribute, privacy loss of the second (an adversary trained on the set)."""
    task, sens = attributes.get("task") or {}, attributes.get("sensitive") or {}
    out = ["<h2>Attributes (seed 004)</h2>",
           '<p class="muted">The synthetic set is labelled with two attributes. Utility: the learner trained on the '
           "first one, tested on real images. Privacy loss of the second: an adversary (the same learner) trained on "
           "the set to predict it, tested on real images. The adversary keeps its classifier only if it beats "
           "answering the set's most frequent value on synthetic records it held out; otherwise it answers that "
           "value every time and scores the real majority rate, which is what no leak looks like. Balanced accuracy "
           "(the mean over the attribute's values) is at chance, 1/K, for any answers blind to the image.</p>"]
    if replacement:
        out.append(f'<p>The second attribute ({_esc(replacement.get("sensitive"))}) was replaced for '
                   f'{_fmt(replacement.get("replaced"))} records (strength {_fmt(replacement.get("strength"))}), drawn '
                   f'from {_esc(replacement.get("marginal"))} independently of everything else; privacy cost: '
                   f'{_esc(replacement.get("privacy_cost"))}.</p>')
    val = sens.get("validation") or {}
    out.append(_table(("measure", "value"), [
        (f"utility: accuracy on {', '.join(task.get('classes', []))}", task.get("accuracy")),
        ("utility: MCC", task.get("mcc")),
        ("the same learner on real data", task.get("real_accuracy")),
        (f"privacy loss: adversary accuracy on {', '.join(sens.get('classes', []))}", sens.get("adversary_accuracy")),
        ("majority rate (no leak)", sens.get("majority_rate")),
        ("adversary advantage over the majority rate", sens.get("advantage")),
        ("adversary's classifier kept (it beat the constant answer on held-out synthetic records)",
         "yes" if sens.get("used_classifier", True) else
         f"no ({_fmt(val.get('classifier'))} vs {_fmt(val.get('constant'))} + {_fmt(val.get('margin'))})"),
        ("classifier's balanced accuracy on real images", sens.get("balanced_accuracy")),
        ("chance (no leak, balanced)", sens.get("chance")),
        ("classifier's accuracy / what its answers would score blind to the image",
         f"{_fmt(sens.get('classifier_accuracy'))} / {_fmt(sens.get('blind_rate'))}"),
    ], table_id="attributes"))
    if curve:
        out.append("<h3>Privacy vs utility over the replacement's strength</h3>"
                   '<p class="muted">The run\'s set drawn again with the sensitive attribute replaced for each share of '
                   "the records (post-processing of the run's DP releases: no privacy cost).</p>")
        out.append(_img(attribute_curve_plot(curve), "privacy-utility curve over the replacement strength"))
        out.append(_table(("strength", "records replaced", "task accuracy", "task MCC", "adversary accuracy",
                           "majority rate", "balanced accuracy", "chance"),
                          [(p.get("strength"), p.get("replaced"), p.get("task_accuracy"), p.get("task_mcc"),
                            p.get("adversary_accuracy"), p.get("majority_rate"), p.get("balanced_accuracy"),
                            p.get("chance")) for p in curve], table_id="attribute-curve"))
    return "\n".join(out)
