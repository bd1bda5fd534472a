"""Faces (UTKFace at 64x64): seed 000's Tables 1 and 2 and seed 004's replacement of a sensitive attribute.

    # the three DP-GAN runs it reads (3 sites, Dirichlet 0.5, epsilon 10 per site), all with the product's
    # defaults (10 rounds at 64x64; on 2 cores about 1 h 20 min each) ...
    .venv/bin/python tests/benchmarks/bench_defaults.py --datasets utkface,utkface-gender+race,utkface-age
    .venv/bin/python tests/benchmarks/bench_faces.py
    # ... or, as the README's numbers, the gender run with the defaults and the other two shorter
    .venv/bin/python tests/benchmarks/run_grid.py --datasets utkface-gender+race --modes dpgan --epsilons 10 \
        --sites 3 --partitions dirichlet:0.5 --results tests/benchmarks/results/faces/grid --out runs/faces \
        --set num-rounds=5 --tag r5          # (utkface-age: --set num-rounds=3 --tag r3)
    .venv/bin/python tests/benchmarks/bench_faces.py --other-runs runs/faces \
        --other-grid tests/benchmarks/results/faces/grid --joint-tag r5 --age-tag r3

Inputs (``--runs``, default runs/defaults): the run labelled with gender (``utkface-...``), the one whose
generator is conditioned on gender and race together (``utkface-gender+race-...``) and the age-group one
(``utkface-age-...``), each with its ``sim/`` output and its grid record in
tests/benchmarks/results/defaults/.

* Table 1 (seed 000: the same classifier trained on original vs synthetic images, per attribute): the
  product's learner trained on the real training faces, or on a run's synthetic faces, tested on the real
  test faces. Gender and age from their own runs (the grid's evaluation, same learner and test data);
  gender and race also from a synthetic set of the joint generator (the replacement curve's strength 0,
  ``--curve-size`` faces), each attribute read off the joint label.
  (The gender run is optional: without it the gender row has the joint generator's column only.)
* Table 2 (seed 000: distances of synthetic faces to training vs test faces): for ``--queries`` synthetic
  faces of each category (the joint run's by gender, the age run's by age group), the mean of the 10
  smallest distances to the training faces (in disjoint chunks of the test set's size, so both sides have as
  many candidates; averaged over the chunks) and to the test faces, in pixel space (MSE) and in feature space
  (squared L2 per dimension between penultimate features of the learner trained on the real gender labels).
  Equal distances = no memorization. A picture of nearest pairs: nearest_pairs.png.
* Seed 004: from the joint run's generators, synthetic sets whose race is replaced for a share
  ``strength`` of the records (server/attribute_replacement.py); privacy loss = accuracy of an adversary
  (the same learner) trained on the set's race labels, tested on real faces, against the real test set's
  majority rate (the adversary keeps its classifier only if it beats the constant answer on synthetic records it
  held out: common/audits/attribute.py), and the classifier's balanced accuracy against chance 1/K; utility =
  the gender learner trained on the same set, tested on real faces.

Writes tests/benchmarks/results/faces/faces.json, tables.md, privacy_utility.png and nearest_pairs.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.learner import LearnerConfig  # noqa: E402

RESULTS = ROOT / "tests" / "benchmarks" / "results" / "faces"
ARCHIVE = ROOT.parent / "shared" / "data" / "utkface" / "UTKFace-aligned-subset-every6th.tar.gz"
RUN = "{}-dpgan-eps10-k3-dirichlet0.5"


def _top_k_mean(queries, reference, k: int = 10):
    """(Nq,) mean of each query's k smallest squared-error distances (per value) to ``reference``."""
    import torch
    q = torch.from_numpy(queries.reshape(len(queries), -1)).double()
    r = torch.from_numpy(reference.reshape(len(reference), -1)).double()
    out = []
    for start in range(0, len(q), 256):
        d = torch.cdist(q[start:start + 256], r).pow(2) / q.shape[1]  # (b, Nr) MSE per value
        out.append(d.topk(k, dim=1, largest=False).values.mean(dim=1))
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from common.config import RunConfig
    from common.data import load_dataset, split_joint_labels
    from common.learner import evaluate_learner, extract_features, train_learner
    from common.models import Generator
    from common.audits.attribute import attribute_leakage
    from server.attribute_replacement import sample_with_replaced_attribute
    from server.report_plots import save_nearest_pairs

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "defaults", help="where the gender run is")
    p.add_argument("--other-runs", type=Path, default=None,
                   help="where the gender+race and age runs are (default: --runs)")
    p.add_argument("--joint-tag", default="", help="the gender+race run id's suffix (e.g. r5 for a grid run with "
                                                    "--set num-rounds=5 --tag r5)")
    p.add_argument("--age-tag", default="", help="the age run id's suffix")
    p.add_argument("--other-grid", type=Path, default=None, help="their grid records (default: --grid)")
    p.add_argument("--data", type=Path, default=ARCHIVE)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--strengths", default="0,0.5,1")
    p.add_argument("--curve-size", type=int, default=4000, help="synthetic records per replacement strength")
    p.add_argument("--queries", type=int, default=500, help="synthetic faces per category in Table 2")
    p.add_argument("--grid", type=Path, default=ROOT / "tests" / "benchmarks" / "results" / "defaults",
                   help="the runs' grid records (Table 1's own-run columns)")
    p.add_argument("--learner-epochs", type=int, default=LearnerConfig().epochs, help="(a quick dry run: 1)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    args.results.mkdir(parents=True, exist_ok=True)
    grid = args.grid
    other_runs, other_grid = args.other_runs or args.runs, args.other_grid or args.grid
    tags = {"utkface": "", "utkface-gender+race": args.joint_tag, "utkface-age": args.age_tag}

    def run_id(name: str) -> str:
        return RUN.format(name) + (f"-{tags[name]}" if tags[name] else "")

    def run_dir(name: str) -> Path:  # a run's sim/ folder
        return (args.runs if name == "utkface" else other_runs) / run_id(name) / "sim"

    def grid_record(name: str) -> dict | None:  # None: the run's evaluation is not there (yet)
        path = (grid if name == "utkface" else other_grid) / f"{run_id(name)}.json"
        rec = json.loads(path.read_text()) if path.is_file() else None
        return rec if rec and rec.get("status") == "ok" and rec.get("run_id") == run_id(name) else None
    learner = LearnerConfig(epochs=args.learner_epochs)
    out: dict = {"learner": dataclasses.asdict(learner), "data": str(args.data), "image_size": 64, "epsilon_per_site": 10}
    t_start = time.perf_counter()

    def load_npz(path: Path):
        return load_dataset(path, "train", whole=True)  # a synthetic set is one split, stored as 'train'

    def load(label_from: str, split: str):
        return load_dataset(args.data, split, label_from=label_from, image_size=64, channels=3)

    joint_train, joint_test = load("utkface-gender+race", "train"), load("utkface-gender+race", "test")
    (g_train, r_train), (g_test, r_test) = split_joint_labels(joint_train), split_joint_labels(joint_test)
    a_train, a_test = load("utkface-age", "train"), load("utkface-age", "test")
    print(f"UTKFace 64x64: {len(joint_train)} training and {len(joint_test)} test faces", flush=True)

    def accuracy(train_set, test_set, what: str) -> tuple[float, float, torch.nn.Module]:
        t0 = time.perf_counter()
        model = train_learner(train_set, learner, device=cpu, progress=False)
        res = evaluate_learner(model, test_set, device=cpu)
        print(f"  {what}: accuracy {res['accuracy']:.4f}  MCC {res['mcc']:.3f}  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        return float(res["accuracy"]), float(res["mcc"]), model

    # ---- Table 1 -------------------------------------------------------------------------------------
    print("Table 1: original vs synthetic, per attribute", flush=True)
    table1: list[dict] = []
    real_models = {}
    for attr, tr, te in (("gender", g_train, g_test), ("race", r_train, r_test), ("age group", a_train, a_test)):
        acc, mcc, real_models[attr] = accuracy(tr, te, f"{attr}, original")
        counts = np.bincount(te.labels, minlength=len(te.classes))
        table1.append({"attribute": attr, "original": acc, "original_mcc": mcc,
                       "majority_rate": float(counts.max() / counts.sum())})
    records = {name: grid_record(name) for name in ("utkface", "utkface-gender+race", "utkface-age")}
    for name in ("utkface-gender+race", "utkface-age"):  # their synthetic sets are needed (the gender run's not)
        if not (run_dir(name) / "synthetic.npz").is_file():
            raise SystemExit(f"no finished run {run_id(name)} ({run_dir(name)}/synthetic.npz): run it first (see above)")
    for name, attr in (("utkface", "gender"), ("utkface-age", "age group")):
        if (rec := records[name]) is not None:
            next(r for r in table1 if r["attribute"] == attr).update(
                synthetic_own_run=rec["tstr_accuracy"], synthetic_own_run_mcc=rec["tstr_mcc"])
    out["runs"] = {name: {"run_id": rec["run_id"],
                          "rounds": (rec.get("settings") or {}).get("num-rounds", "the product's choice (10)"),
                          "seconds_per_round": rec.get("seconds_per_round"), "peak_rss_mib": rec.get("peak_rss_mib"),
                          "wall_seconds": rec.get("wall_seconds"), "resumed": bool(rec.get("resumed")),
                          "tstr_accuracy": rec.get("tstr_accuracy"),
                          "real_accuracy": rec.get("real_accuracy")}
                   for name, rec in records.items() if rec is not None}
    joint_dir = run_dir("utkface-gender+race")
    sg, _ = split_joint_labels(load_npz(joint_dir / "synthetic.npz"))  # the run's own set, for Table 2
    out["table1"] = table1  # its joint-generator column is the replacement curve's strength 0 (below)

    # ---- Table 2 -------------------------------------------------------------------------------------
    print("Table 2: distances of synthetic faces to training vs test faces", flush=True)
    rng = np.random.default_rng(0)
    # the training faces in disjoint chunks of the test set's size (4 for UTKFace's 80/20 split): every chunk is
    # compared like the test set, and the spread over chunks shows how much one reference draw moves the number
    order = rng.permutation(len(g_train))
    chunks = [order[i * len(g_test):(i + 1) * len(g_test)] for i in range(len(g_train) // len(g_test))]
    feature_model = real_models["gender"]
    f_all = extract_features(feature_model, g_train.images, device=cpu)
    f_test = extract_features(feature_model, g_test.images, device=cpu)
    table2: list[dict] = []
    for name in ("utkface-gender+race", "utkface-age"):
        # the joint run's faces by gender (seed 000's categories), the age run's by age group
        synth = sg if name == "utkface-gender+race" else load_npz(run_dir(name) / "synthetic.npz")
        for c, cls in enumerate(synth.classes):
            idx = np.flatnonzero(synth.labels == c)
            idx = rng.choice(idx, size=min(args.queries, len(idx)), replace=False)
            q = synth.images[idx]
            f_q = extract_features(feature_model, q, device=cpu)
            row = {"run": name, "category": cls, "queries": len(idx)}
            for space, (qq, tr, te) in (("pixel", (q, g_train.images, g_test.images)),
                                        ("feature", (f_q, f_all, f_test))):
                per_chunk = np.stack([_top_k_mean(qq, tr[c]) for c in chunks])  # (chunks, queries)
                d_tr, d_te = per_chunk.mean(axis=0), _top_k_mean(qq, te)
                row[space] = {"train_mean": float(d_tr.mean()), "train_std": float(d_tr.std()),
                              "test_mean": float(d_te.mean()), "test_std": float(d_te.std()),
                              "train_chunk_means": [float(m) for m in per_chunk.mean(axis=1)],
                              "closer_to_train": float((d_tr < d_te).mean())}
            table2.append(row)
            print(f"  {name} {cls}: pixel train {row['pixel']['train_mean']:.4f} vs test {row['pixel']['test_mean']:.4f}"
                  f"; feature train {row['feature']['train_mean']:.4f} vs test {row['feature']['test_mean']:.4f}",
                  flush=True)
    out["table2"] = table2
    # nearest pairs (seed 000's picture, as every evaluation draws it): of 2,000 synthetic faces of the joint run,
    # the 8 closest to a training face, above that face and the nearest test face
    some = sg.subset(np.random.default_rng(1).choice(len(sg), size=min(2000, len(sg)), replace=False))
    out["nearest_pairs"] = save_nearest_pairs(some, g_train, g_test, args.results / "nearest_pairs.png")

    # ---- seed 004: replacing race --------------------------------------------------------------------
    print("Seed 004: race replaced in the joint generator's synthetic set", flush=True)
    report = json.loads((joint_dir / "report.json").read_text())
    cfg = RunConfig.from_mapping(report["config"])
    gen = Generator(cfg.gan_shape(3, 64, len(joint_train.classes)))
    gen.load_state_dict(torch.load(joint_dir / "generator.pt"))
    sites = torch.load(joint_dir / "site_generators.pt", weights_only=False)
    curve: list[dict] = []
    for strength in (float(s) for s in args.strengths.split(",")):
        synth, info = sample_with_replaced_attribute(gen, sites["generators"], sites["census"], joint_train.classes,
                                                     args.curve_size, values=5, strength=strength, seed=cfg.seed,
                                                     device=cpu, progress=False)
        sg, sr = split_joint_labels(synth)
        gender_acc, gender_mcc, _ = accuracy(sg, g_test, f"strength {strength:g}: gender (utility)")
        leak = attribute_leakage(sr, r_test, learner=learner, device=cpu)
        print(f"  strength {strength:g}: race adversary {leak.adversary_accuracy:.4f} (majority "
              f"{leak.majority_rate:.4f}; classifier kept: {leak.used_classifier}); classifier's balanced accuracy "
              f"{leak.balanced_accuracy:.4f} (chance {leak.chance:.2f})", flush=True)
        curve.append({"strength": strength, "replaced": info.replaced, "agreement": info.agreement,
                      "marginal": info.marginal, "gender_accuracy": gender_acc, "gender_mcc": gender_mcc,
                      **{f"race_{k}": v for k, v in leak.as_dict().items()}})
    out["replacement"] = {"synthetic_size": args.curve_size, "sensitive": "race", "task": "gender", "curve": curve}
    if (none := next((c for c in curve if c["strength"] == 0.0), None)) is not None:
        # Table 1's joint-generator column: the set without replacement (gender learner; race "adversary" =
        # the race classifier trained on synthetic faces)
        next(r for r in table1 if r["attribute"] == "gender").update(synthetic_joint_run=none["gender_accuracy"],
                                                                     synthetic_joint_run_mcc=none["gender_mcc"])
        next(r for r in table1 if r["attribute"] == "race").update(synthetic_joint_run=none["race_classifier_accuracy"])
    _plot(curve, args.results / "privacy_utility.png")
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    (args.results / "faces.json").write_text(json.dumps(out, indent=2))
    (args.results / "tables.md").write_text(_markdown(out))
    print(_markdown(out))
    print(f"wrote {args.results}")
    return 0


def _plot(curve: list[dict], path: Path) -> None:
    """The product's privacy-utility plot (the one `fedsynth evaluate --replacement-curve` draws)."""
    from server.report_plots import attribute_curve_plot

    points = [{"strength": c["strength"], "task_accuracy": c["gender_accuracy"],
               **{k: c[f"race_{k}"] for k in ("adversary_accuracy", "balanced_accuracy", "majority_rate", "chance")}}
              for c in curve]
    path.write_bytes(attribute_curve_plot(points))


def _markdown(out: dict) -> str:
    f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["Table 1 (seed 000 on UTKFace 64x64, ε = 10 per site, 3 sites, Dirichlet 0.5): accuracy on real test "
             "faces of the same learner trained on the real training faces (original) or on synthetic faces (its own "
             "run's set; or a set of the gender+race generator's, "
             f"{out['replacement']['synthetic_size']} faces, the replacement curve's strength 0)", "",
             "| attribute | original | synthetic (its own run) | synthetic (gender+race generator) | majority rate |",
             "|---|---|---|---|---|"]
    for r in out["table1"]:
        lines.append(f"| {r['attribute']} | {f(r['original'])} | {f(r.get('synthetic_own_run'))} | "
                     f"{f(r.get('synthetic_joint_run'))} | {f(r['majority_rate'])} |")
    lines += ["", "Runs: " + "; ".join(f"{name}: `{r['run_id']}`, rounds {r['rounds']}, {r['seconds_per_round']:.0f} s "
                                     f"per 3-site round (shared cores), peak {r['peak_rss_mib']:.0f} MiB"
                                     f"{' (of the resumed part)' if r.get('resumed') else ''}" for name, r in out["runs"].items())]
    lines += ["", "Table 2 (seed 000): mean ± std over synthetic faces of the mean of the 10 smallest distances "
              "to training vs test faces (training faces in disjoint chunks of the test set's size, averaged; "
              "in brackets the range of the chunks' means: how much one reference draw moves the number)", "",
              "| run | category | pixel MSE: to train [chunks] | to test | feature L2²/dim: to train [chunks] | to test |",
              "|---|---|---|---|---|---|"]
    for r in out["table2"]:
        px, ft = r["pixel"], r["feature"]
        span = lambda d: f"[{min(d['train_chunk_means']):.4f}, {max(d['train_chunk_means']):.4f}]"  # noqa: E731
        lines.append(f"| {r['run']} | {r['category']} | {px['train_mean']:.4f} ± {px['train_std']:.4f} {span(px)} | "
                     f"{px['test_mean']:.4f} ± {px['test_std']:.4f} | {ft['train_mean']:.4f} ± {ft['train_std']:.4f} "
                     f"{span(ft)} | {ft['test_mean']:.4f} ± {ft['test_std']:.4f} |")
    rep = out["replacement"]
    lines += ["", f"Seed 004: race replaced for a share of the records ({rep['synthetic_size']} synthetic faces per "
              "strength, joint gender+race generator)", "",
              "| strength | race on held-out synthetic faces: classifier / constant answer | race adversary on real "
              "faces (privacy loss) | its classifier kept? | majority rate (no leak) | classifier's balanced accuracy "
              "| chance (no leak) | gender accuracy (utility) | gender MCC |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in rep["curve"]:
        kept = "yes" if c.get("race_used_classifier", True) else "no: answers the majority value"
        val = c.get("race_validation") or {}
        lines.append(f"| {c['strength']:g} | {f(val.get('classifier'))} / {f(val.get('constant'))} "
                     f"| {f(c['race_adversary_accuracy'])} | {kept} | {f(c['race_majority_rate'])} | "
                     f"{f(c.get('race_balanced_accuracy'))} | {f(c['race_chance'])} | "
                     f"{f(c['gender_accuracy'])} | {f(c['gender_mcc'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
