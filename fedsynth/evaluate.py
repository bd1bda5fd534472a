"""``fedsynth evaluate``: utility and privacy audits of a synthetic dataset, written as a report.

Utility (accuracy and Matthews correlation of a classifier trained on synthetic data): the unchanged
central learner (``common.learner``) is trained
on the synthetic set and tested on real held-out data (TSTR); with real training data, the same
learner trained on it gives the reference accuracy and the ratio TSTR / real.

Audits (only with real training data; ``test`` plays the held-out / non-member role):
``common.audits.site_audit_summary`` in pixel space (MSE on [0, 1] images, plus SSIM/PSNR) and in
feature space. Feature space = penultimate features of the learner trained on the *synthetic* set:
that model has seen neither the real training records nor the held-out ones, so it embeds both
alike. A learner trained on the real data would embed its own training records differently (it fits
them), which would make synthetic images look closer to training records with no memorization.

Output in ``out_dir``: ``report.json`` (layout in ``server.report_html``; audits as documented in
``common.audits``; plus ``evaluation`` = what was evaluated and ``real_baseline`` = the real-data
learner's full ``evaluate_learner`` result, reusable via ``real_result``), ``report.html`` and
``synthetic_grid.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from common.audits import site_audit_summary
from common.audits.attribute import attribute_view, is_joint
from common.data import LABEL_FROM_CLASSES, DataError, ImageDataset, load_dataset
from common.device import pick_device
from common.learner import (
    LEARNERS,
    LearnerConfig,
    check_learner,
    evaluate_learner,
    extract_features,
    train_learner,
)
from server.report_html import render_report
from server.report_plots import save_class_grid, save_nearest_pairs
from fedsynth.baseline import load_real_baseline
from fedsynth.curves import requested_curves, sweep_point

# Keys of a run's report.json that describe the run (not this evaluation) and are carried over.
_PROVENANCE_KEYS = ("mode", "private", "epsilon_target", "delta_bound", "privacy_statement", "privacy", "sites", "sweep",
                    "attribute_replacement")  # (the run's privacy statement carries over: evaluating is post-processing)


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[phase] = round(time.perf_counter() - start, 3)


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python; NaN/inf to None so report.json stays strict JSON."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_compatible(synthetic: ImageDataset, other: ImageDataset, role: str, notes: list[str]) -> None:
    if synthetic.image_shape != other.image_shape:
        raise DataError(
            f"the synthetic images are {synthetic.image_shape} (C, H, W) but the {role} images are "
            f"{other.image_shape}; load the {role} data with the same image size and channels"
        )
    if synthetic.num_classes != other.num_classes:
        raise DataError(
            f"the synthetic set has {synthetic.num_classes} classes {synthetic.classes} but the {role} data has "
            f"{other.num_classes} {other.classes}; evaluate against data with the same label set"
        )
    if synthetic.classes != other.classes:
        notes.append(f"class names differ between synthetic {synthetic.classes} and {role} {other.classes}; "
                     "labels were matched by index")


def _subsample(ds: ImageDataset, cap: int, seed: int) -> ImageDataset:
    if len(ds) <= cap:
        return ds
    return ds.subset(np.sort(np.random.default_rng(seed).choice(len(ds), size=cap, replace=False)))


def evaluate_synthetic(
    synthetic: ImageDataset,
    test: ImageDataset,
    *,
    train: ImageDataset | None = None,
    out_dir: Path,
    learner: LearnerConfig,
    audits: bool = True,
    max_audit_records: int = 2000,
    device: torch.device | str | None = None,
    progress: bool = False,
    run_report: dict | None = None,
    real_result: dict | None = None,
    seed: int = 0,
    attribute_curve: list[dict] | None = None,
    sweep: list[dict] | None = None,
) -> dict:
    """Train the central learner on ``synthetic``, test it on real ``test``, audit, and write the report.

    Args:
        synthetic: the labelled synthetic set.
        test: real held-out data (accuracy; the non-members of the audits).
        train: real training data: enables the real-data baseline, the ratio and the audits.
        out_dir: where report.json, report.html and synthetic_grid.png go (created).
        learner: the central learner's config, the same for synthetic and real data.
        audits: run the privacy audits (needs ``train``).
        max_audit_records: cap on synthetic records audited and on each real reference set
            (pixel-space near-copies are still searched in the whole ``train``).
        device: torch device for training and distance search (default: GPU if present).
        progress: show training progress bars.
        run_report: the synthesis run's report.json, whose mode / privacy / sites are carried over.
        real_result: ``evaluate_learner`` output of the same learner already trained on this ``train``
            and tested on this ``test`` (e.g. ``report["real_baseline"]`` of an earlier evaluation):
            skips retraining the real baseline, which dominates the cost on big data (sweeps).
        seed: seed of the subsampling and bootstraps of the audits.
        attribute_curve: seed 004's privacy-utility points over the replacement's strength
            (:func:`fedsynth.replace_attribute.replacement_curve`), shown with the attributes.
        sweep: :func:`sweep_point` of other runs of the same data: with this set's point, the report's
            privacy-utility curve over epsilon.

    Returns:
        The report dict that was written to ``out_dir/report.json``.
    """
    notes: list[str] = []
    _check_compatible(synthetic, test, "test", notes)
    if train is not None:
        _check_compatible(synthetic, train, "training", notes)
    dev = torch.device(device) if device is not None else pick_device()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    with _timed(timings, "train_learner_synthetic"):
        tstr_model = train_learner(synthetic, learner, device=dev, progress=progress, desc="learner on synthetic")
    with _timed(timings, "evaluate_synthetic_learner"):
        tstr = evaluate_learner(tstr_model, test, device=dev)
    utility: dict[str, Any] = {
        "tstr_accuracy": tstr["accuracy"], "per_class_accuracy": tstr["per_class_accuracy"], "mcc": tstr["mcc"],
        "confusion": tstr["confusion"], "num_test": tstr["num_test"], "classes": list(test.classes),
    }
    real: dict | None = None
    if real_result is not None:
        real = real_result
        notes.append("real-data baseline reused from an earlier evaluation, not retrained")
    elif train is not None:
        with _timed(timings, "train_learner_real"):
            real_model = train_learner(train, learner, device=dev, progress=progress, desc="learner on real")
        with _timed(timings, "evaluate_real_learner"):
            real = evaluate_learner(real_model, test, device=dev)
    if real is not None:
        utility.update({
            "real_accuracy": real["accuracy"], "real_per_class_accuracy": real["per_class_accuracy"],
            "real_mcc": real["mcc"],
            "ratio": tstr["accuracy"] / real["accuracy"] if real["accuracy"] > 0 else None,
        })

    attributes = None
    if is_joint(synthetic) and tuple(test.classes) == tuple(synthetic.classes):
        with _timed(timings, "attributes"):
            attributes = attribute_view(synthetic, test, train, learner, dev)

    audit_out: dict[str, Any] | None = None
    if audits and train is None:
        notes.append("privacy audits skipped: they need the real training data (--train)")
    elif audits:
        audit_out = {"kind": "diagnostic"}
        s_sub = _subsample(synthetic, max_audit_records, seed)  # the nearest pairs' and feature audit's records
        with _timed(timings, "audit_pixel"):
            audit_out["pixel"] = site_audit_summary(
                synthetic.images, train.images, test.images, space="pixel", max_records=max_audit_records,
                include_extremes=True, seed=seed, device=dev)
        with _timed(timings, "nearest_pairs"):
            audit_out["nearest_pairs"] = save_nearest_pairs(s_sub, train, test, out_dir / "nearest_pairs.png",
                                                            device=dev)
        with _timed(timings, "audit_feature"):
            # Feature space: subsample first, features are costly; near-copies searched in the subsample.
            t_sub, h_sub = _subsample(train, max_audit_records, seed + 1), _subsample(test, max_audit_records, seed + 2)
            feats = [extract_features(tstr_model, d.images, device=dev) for d in (s_sub, t_sub, h_sub)]
            audit_out["feature"] = site_audit_summary(
                *feats, space="feature", metric="l2", max_records=max_audit_records, similarity=False, seed=seed,
                device=dev)
            audit_out["feature"]["feature_source"] = "penultimate layer of the learner trained on the synthetic set"

    with _timed(timings, "sample_grid"):
        save_class_grid(synthetic.images, synthetic.labels, synthetic.classes, out_dir / "synthetic_grid.png")

    base = {k: run_report[k] for k in _PROVENANCE_KEYS if run_report and k in run_report}
    report: dict[str, Any] = {
        "mode": base.pop("mode", "evaluate"),
        "private": base.pop("private", None),  # unknown without the run's report
        **base,
        "utility": utility,
        "synthetic": {"count": len(synthetic), "source": synthetic.source, "grids": ["synthetic_grid.png"]},
        "evaluation": {"test_source": test.source, "train_source": train.source if train is not None else None,
                       "image_shape": list(test.image_shape),
                       "learner": asdict(learner), "device": str(dev), "max_audit_records": max_audit_records},
        "timings": timings,
        "notes": notes,
    }
    if real is not None:
        report["real_baseline"] = real  # pass back as real_result to skip retraining next time
    if audit_out is not None:
        report["audits"] = audit_out
    if attributes is not None:
        report["attributes"] = attributes
    if attribute_curve:
        report["attribute_curve"] = attribute_curve
    if sweep:
        ours = sweep_point(synthetic, run_report, test, learner, dev, tstr_accuracy=tstr["accuracy"],
                           attributes=attributes)
        real_acc = real["accuracy"] if real is not None else None
        report["sweep"] = [{**p, "real_accuracy": real_acc} for p in [ours, *sweep]]
    report = _jsonable(report)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
    render_report(report, out_dir)
    return report


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``fedsynth evaluate``."""
    parser.add_argument("--synthetic", required=True, type=Path,
                        help="a run's output folder (holding synthetic.npz) or a synthetic .npz file")
    parser.add_argument("--test", required=True,
                        help="real held-out data: 'digits', an MNIST IDX folder, .npz, image folder or .tar.gz")
    parser.add_argument("--test-split", default="test", help="split of --test to use (default: test)")
    parser.add_argument("--train", default=None,
                        help="real training data (enables the real-data baseline and the privacy audits)")
    parser.add_argument("--train-split", default="train", help="split of --train to use (default: train)")
    parser.add_argument("--label-from", default=None, choices=sorted(LABEL_FROM_CLASSES),
                        help="label flat UTKFace JPEGs of --test/--train from their file names")
    parser.add_argument("--real-baseline-from", default=None, type=Path,
                        help="report.json of an earlier evaluation with the same --train, --test and learner: "
                             "reuse its real-data learner instead of training it again (sweeps)")
    parser.add_argument("--out", required=True, type=Path, help="output folder for report.json and report.html")
    defaults = LearnerConfig()
    parser.add_argument("--learner", default=defaults.name,
                        help=f"central learner, the same for synthetic and real data: {', '.join(LEARNERS)} or your own "
                             f"as package.module:factory (default: {defaults.name})")
    parser.add_argument("--learner-epochs", type=int, default=defaults.epochs,
                        help=f"training epochs of the learner (default: {defaults.epochs})")
    parser.add_argument("--learner-lr", type=float, default=defaults.lr,
                        help=f"learning rate (default: {defaults.lr:g})")
    parser.add_argument("--learner-batch-size", type=int, default=defaults.batch_size,
                        help=f"batch size (default: {defaults.batch_size})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the learner and the audits")
    parser.add_argument("--no-audits", action="store_true", help="skip the privacy audits")
    parser.add_argument("--max-audit-records", type=int, default=2000,
                        help="cap on synthetic and real records per side in the audits (default: 2000)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--resize", action="store_true",
                        help="resize the real data to the synthetic images' size when they differ (else refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--replacement-curve", default="", metavar="STRENGTHS",
                        help="with --synthetic a DP-GAN run labelled with two attributes: seed 004's privacy-utility "
                             "curve, its set drawn again with the second attribute replaced for each share of the "
                             "records given (e.g. 0,0.5,1; post-processing, no privacy cost)")
    parser.add_argument("--sweep", default="", metavar="RUNS",
                        help="other runs of the same data at other epsilons (their --out folders, comma-separated): "
                             "the report's privacy-utility curve over epsilon (TSTR; with two attributes also the "
                             "task accuracy and the sensitive attribute's adversary)")


def resolve_synthetic(arg: Path) -> tuple[ImageDataset, dict | None]:
    """Load --synthetic: a run's output folder (its synthetic.npz and report.json), a .npz, or an image
    folder / archive ``root/<class>/*.png`` that another tool wrote; plus the run's report if there is one."""
    run_report = None
    if arg.is_dir() and (arg / "synthetic.npz").is_file():
        source: Path = arg / "synthetic.npz"
        report_path = arg / "report.json"
        if report_path.is_file():
            try:
                run_report = json.loads(report_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                run_report = None  # the run's report is optional provenance; the evaluation does not need it
    elif arg.exists():
        source = arg
    else:
        raise DataError(f"--synthetic {arg} does not exist; pass a run's output folder, a synthetic .npz, or an "
                        "image folder root/<class>/*.png")
    # a synthetic set is one split: save_npz stores it as 'train', an image folder is taken whole
    return load_dataset(source, "train", whole=True), run_report


def main(args: argparse.Namespace) -> int:
    """Run ``fedsynth evaluate``; returns the process exit code (0 ok, 2 bad input)."""
    try:
        synthetic, run_report = resolve_synthetic(Path(args.synthetic))
        channels, height, width = synthetic.image_shape
        if height != width:
            raise DataError(f"synthetic images are {height}x{width}; only square images are supported")
        label_from = args.label_from or None
        resize = height if args.resize else None
        # a folder given as --test (--train) IS the test (training) data, split into train/test or not
        test = load_dataset(args.test, args.test_split, image_size=resize, channels=channels, label_from=label_from,
                            whole=True)
        train = (load_dataset(args.train, args.train_split, image_size=resize, channels=channels,
                              label_from=label_from, whole=True)
                 if args.train else None)
        for role, real in (("test", test), ("training", train)):
            if real is not None and real.image_shape[1:] != synthetic.image_shape[1:]:
                raise DataError(f"the synthetic images are {height}x{width} but the {role} data is "
                                f"{real.image_shape[1]}x{real.image_shape[2]}; pass --resize to resize the real data "
                                f"to {height}x{width} (the learner works at the synthetic set's size)")
        learner = LearnerConfig(name=args.learner, epochs=args.learner_epochs, lr=args.learner_lr,
                                batch_size=args.learner_batch_size, seed=args.seed)
        learner.validate()
        check_learner(learner.name, test.image_shape, test.num_classes)
        real_result = (load_real_baseline(args.real_baseline_from, test=test, train=train, learner=learner)
                       if args.real_baseline_from else None)
        device = pick_device(args.device)
        curve, sweep = requested_curves(args.replacement_curve, args.sweep, Path(args.synthetic), synthetic, test,
                                        learner, device, resolve=resolve_synthetic, progress=not args.quiet)
    except (DataError, ValueError) as exc:
        print(f"fedsynth evaluate: {exc}", file=sys.stderr)
        return 2
    report = evaluate_synthetic(synthetic, test, train=train, out_dir=Path(args.out), learner=learner,
                                audits=not args.no_audits, max_audit_records=args.max_audit_records,
                                device=device, progress=not args.quiet, run_report=run_report, seed=args.seed,
                                real_result=real_result, attribute_curve=curve, sweep=sweep)
    print(format_summary(report))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def format_summary(report: dict) -> str:
    """A few lines for the terminal: accuracies, ratio, audit verdicts."""
    u = report.get("utility", {})
    lines = [f"TSTR accuracy {u.get('tstr_accuracy', float('nan')):.4f}  MCC {u.get('mcc', float('nan')):.4f}"]
    if u.get("real_accuracy") is not None:
        lines.append(f"real accuracy {u['real_accuracy']:.4f}  ratio {u.get('ratio') or float('nan'):.3f}")
    for space in ("pixel", "feature"):
        a = (report.get("audits") or {}).get(space)
        if a:
            mem, mia = a["memorization"], a["membership_inference"]
            lo, hi = mia["auc_ci95"]
            lines.append(f"{space} audit: near-copies {mem['near_copies']['count']} "
                         f"(chance {mem['near_copies']['expected_by_chance']:.1f}), "
                         f"memorization {'FLAGGED ' + ','.join(mem['flags']) if mem['flagged'] else 'not flagged'}, "
                         f"MIA AUC {mia['auc']:.3f} [{lo:.3f}, {hi:.3f}]")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m fedsynth.evaluate ...
    _parser = argparse.ArgumentParser(prog="fedsynth evaluate", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
