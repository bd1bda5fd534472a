"""Benchmark ``fedsynth.evaluate.evaluate_synthetic`` on 10,000 synthetic images against MNIST.

Standalone (not collected by pytest)::

    .venv/bin/python tests/benchmarks/bench_evaluate.py [--synthetic RUN_DIR_OR_NPZ] [--epochs 1] [--threads 1]

Without ``--synthetic`` the stand-in synthetic set is a noisy copy (Gaussian sigma 0.15, clipped) of
the 10,000 real MNIST *test* images, labelled with their true labels: timing is what this measures,
and the audits then (correctly) find the synthetic images closer to the held-out set than to the
training set. Prints per-phase timings and writes tests/benchmarks/results/evaluate_mnist.json.
Bar: the whole evaluation <= 5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from common.data import ImageDataset, load_dataset  # noqa: E402
from common.learner import LearnerConfig  # noqa: E402
from fedsynth.evaluate import resolve_synthetic, evaluate_synthetic, format_summary  # noqa: E402

MNIST = REPO.parent / "shared" / "data" / "mnist"
RESULT = REPO / "tests" / "benchmarks" / "results" / "evaluate_mnist.json"
BAR_SECONDS = 300.0


def _stand_in(test: ImageDataset, count: int, seed: int) -> ImageDataset:
    """Noisy copy of the real test images, the synthetic set used until a run's output exists."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(test), size=count, replace=count > len(test))
    noisy = np.clip(test.images[idx] + rng.normal(0.0, 0.15, test.images[idx].shape), 0.0, 1.0)
    return ImageDataset(noisy.astype(np.float32), test.labels[idx], test.classes, source="noisy MNIST test copy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=Path, default=None, help="a run folder or synthetic .npz (optional)")
    parser.add_argument("--count", type=int, default=10_000, help="synthetic images (stand-in only)")
    parser.add_argument("--epochs", type=int, default=1, help="central learner epochs (both learners)")
    parser.add_argument("--max-audit-records", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the dev box is shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: a temporary folder)")
    args = parser.parse_args()
    if not MNIST.is_dir():
        print(f"MNIST not found at {MNIST}; this benchmark needs ../shared/data/mnist", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    train = load_dataset(MNIST, "train")
    test = load_dataset(MNIST, "test")
    if args.synthetic is not None:
        synthetic, kind = resolve_synthetic(args.synthetic)[0], f"run output {args.synthetic}"
    else:
        synthetic, kind = _stand_in(test, args.count, seed=0), "stand-in: noisy copy of MNIST test images (sigma 0.15)"
    load_s = time.perf_counter() - t0

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    t1, cpu1 = time.perf_counter(), time.process_time()
    report = evaluate_synthetic(synthetic, test, train=train, out_dir=out_dir,
                                learner=LearnerConfig(epochs=args.epochs), max_audit_records=args.max_audit_records,
                                device=args.device, progress=False)
    total_s = time.perf_counter() - t1
    cpu_s = time.process_time() - cpu1  # the dev box is shared: CPU time shows how much we actually got

    result = {
        "synthetic": kind,
        "synthetic_count": len(synthetic),
        "train_count": len(train),
        "test_count": len(test),
        "learner_epochs": args.epochs,
        "max_audit_records": args.max_audit_records,
        "torch_threads": args.threads,
        "device": args.device,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "load_seconds": round(load_s, 2),
        "evaluate_seconds": round(total_s, 2),
        "evaluate_cpu_seconds": round(cpu_s, 2),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "phases_seconds": report["timings"],
        "bar_seconds": BAR_SECONDS,
        "within_bar": total_s <= BAR_SECONDS,
        "tstr_accuracy": report["utility"]["tstr_accuracy"],
        "real_accuracy": report["utility"].get("real_accuracy"),
        "ratio": report["utility"].get("ratio"),
        "pixel_mia_auc": report["audits"]["pixel"]["membership_inference"]["auc"],
        "pixel_near_copies": report["audits"]["pixel"]["memorization"]["near_copies"]["count"],
        "report": str(out_dir / "report.html"),
    }
    print(format_summary(report))
    for phase, secs in report["timings"].items():
        print(f"  {phase:32s} {secs:8.2f} s")
    print(f"load {load_s:.1f} s, evaluate {total_s:.1f} s (bar {BAR_SECONDS:.0f} s): "
          f"{'OK' if total_s <= BAR_SECONDS else 'TOO SLOW'}")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
