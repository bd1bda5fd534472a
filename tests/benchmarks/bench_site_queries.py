"""What two of the site's defences against a hostile coordinator cost on CPU (the 2026-12-06 security review).

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_site_queries.py            # about 1 min, 1 thread

1. The exact discrete Gaussian of every counting release (``client.discrete_gaussian``): the time of one draw by
   noise std (median, 99.9th percentile, largest over ``--draws`` draws), which sets the per-count deadline a
   site's draws end at (``DRAW_SECONDS``), and the time of a whole release at that deadline.
2. The fixed, zero-padded shapes of the site's evaluation and audit queries (``client.evaluation``:
   ``EVALUATION_BATCH``, ``AUDIT_BLOCK``) against the input-sized batches and blocks the coordinator keeps: CPU
   time (``time.process_time``, the least of ``--repeats`` interleaved runs, since wall time on a shared machine
   varies more than the difference), 28x28 images, the ``cnn`` learner.

Prints each number and writes them to ``--out`` (default ``tests/benchmarks/results/timing/site_queries.json``).
"""

from __future__ import annotations

import argparse
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from client.discrete_gaussian import DRAW_SECONDS, _one_discrete_gaussian, discrete_gaussian, exact_variance  # noqa: E402
from client.evaluation import AUDIT_BLOCK, EVALUATION_BATCH, distance_histogram  # noqa: E402
from common.audits import nearest_neighbors  # noqa: E402
from common.learner import build_learner, predict  # noqa: E402
from tests.benchmarks.speed_cli import RESULTS, machine, write_result  # noqa: E402


def draw_times(stds: list[float], draws: int) -> dict:
    """Per std: median, 99.9th percentile and largest time of one draw (microseconds)."""
    out = {}
    for std in stds:
        var, times = exact_variance(std), []
        for _ in range(draws):
            began = time.perf_counter()
            _one_discrete_gaussian(var, secrets.randbelow)
            times.append(time.perf_counter() - began)
        us = np.asarray(times) * 1e6
        out[f"std {std:g}"] = {"median_us": round(float(np.median(us)), 1),
                               "p99.9_us": round(float(np.percentile(us, 99.9)), 1), "max_us": round(float(us.max()), 1)}
        print(f"one draw, std {std:>5g}: median {out[f'std {std:g}']['median_us']} us, 99.9th percentile "
              f"{out[f'std {std:g}']['p99.9_us']} us, largest {out[f'std {std:g}']['max_us']} us ({draws} draws)")
    return out


def release_times() -> dict:
    """Wall time of a whole counting release at its deadline: the census (10), an evaluation table (20), an audit's
    two histograms (82)."""
    out = {}
    for name, count, std in (("census", 10, 20.0), ("evaluation table", 20, 10.0), ("audit histograms", 82, 10.0)):
        began = time.monotonic()
        discrete_gaussian(std, (count,))
        took = time.monotonic() - began
        out[name] = {"counts": count, "seconds": round(took, 4), "deadline": count * DRAW_SECONDS}
        print(f"{name}: {count} counts in {took * 1e3:.1f} ms (deadline {count * DRAW_SECONDS * 1e3:.0f} ms)")
    return out


def _least_pair(old, new, repeats: int) -> tuple[float, float]:
    t_old, t_new = [], []
    for _ in range(repeats):
        began = time.process_time()
        old()
        t_old.append(time.process_time() - began)
        began = time.process_time()
        new()
        t_new.append(time.process_time() - began)
    return min(t_old), min(t_new)


def padding_costs(repeats: int) -> dict:
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    cnn = build_learner("cnn", (1, 28, 28), 10, allow_import=False).eval()
    images = rng.random((10_000, 1, 28, 28), dtype=np.float32)
    synthetic = rng.random((2_000, 1, 28, 28), dtype=np.float32)
    cases = {f"predict cnn, {n} images": (lambda x=images[:n]: predict(cnn, x, device="cpu"),
                                          lambda x=images[:n]: predict(cnn, x, device="cpu", batch_size=EVALUATION_BATCH,
                                                                       fixed_rows=True))
             for n in (10_000, 1_100, 10)}
    for ns in (2_000, 10):
        cases[f"audit histogram, 10000 records vs {ns} synthetic"] = (
            lambda s=synthetic[:ns]: nearest_neighbors(images, s), lambda s=synthetic[:ns]: distance_histogram(images, s))
    out = {}
    for name, (old, new) in cases.items():
        t_old, t_new = _least_pair(old, new, repeats)
        out[name] = {"input_sized_s": round(t_old, 3), "fixed_padded_s": round(t_new, 3)}
        print(f"{name}: input-sized {t_old:.3f} s, fixed and padded (site) {t_new:.3f} s CPU")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--draws", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS / "timing" / "site_queries.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine(args.threads), "draw_seconds_deadline": DRAW_SECONDS,
              "discrete_gaussian_draw": draw_times([3.35, 10.0, 20.0, 200.0], args.draws),
              "counting_release_at_deadline": release_times(),
              "evaluation_batch": EVALUATION_BATCH, "audit_block": list(AUDIT_BLOCK),
              "fixed_shapes_cpu_seconds": padding_costs(args.repeats)}
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
