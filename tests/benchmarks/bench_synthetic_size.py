"""How many synthetic images the central learner is trained on (``synthetic-size``), on a finished DP-GAN run.

    .venv/bin/python tests/benchmarks/bench_synthetic_size.py runs/defaults/mnist-dpgan-eps10-k3-dirichlet0.5/sim \\
        --sizes 10000,30000,60000

Reads a finished DP-GAN run with ``gan-sample-from = sites`` (``site_generators.pt``: the sites' generators the
run drew its set from and the noisy class counts they released). For each size in ``--sizes`` it draws that many images
with the product's own functions (``server.synthesis.class_sizes``, ``sample_site_generators``; the run's class
mix and seed), trains the run's learner on them (same epochs: a larger set is also more learner steps) and
scores it on a validation subset of the real *training* split (what a choice of default may look at) and on
the test split (what is reported). Same DP releases for every size: the difference is post-processing alone,
free in privacy; it costs the coordinator time, which is printed. Writes ``--out`` (default
``tests/benchmarks/results/synthetic_size/<run>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from common.learner import train_learner
    from server.synthesis import class_sizes, sample_site_generators
    from tests.benchmarks.saved_run import (
        add_scoring_arguments,
        run_config,
        run_generator,
        score,
        test_and_validation,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a DP-GAN run's output folder (with report.json and site_generators.pt)")
    p.add_argument("--sizes", default="10000,30000,60000", help="comma-separated synthetic-set sizes")
    p.add_argument("--data", default="", help="the run's dataset, if not where its report says")
    add_scoring_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = run_config(args.run)
    test, val = test_and_validation(cfg, args.data or cfg.test_data, args.val)
    gen = run_generator(cfg, test)
    sites = torch.load(args.run / "site_generators.pt", weights_only=False)
    census = np.asarray(sites["census"], dtype=np.float64)  # (S, K) the released noisy class counts
    cpu = torch.device("cpu")
    name = args.run.parent.name if args.run.name == "sim" else args.run.name
    path = args.out or ROOT / "tests" / "benchmarks" / "results" / "synthetic_size" / f"{name}.json"
    out = {"run": str(args.run), "run_synthetic_size": cfg.synthetic_size, "class_mix": cfg.synthetic_class_mix,
           "learner": asdict(cfg.learner_config()),
           "validation": f"{len(val)} images of the training split", "sizes": {}}
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        t0 = time.perf_counter()
        synth, _ = sample_site_generators(gen, sites["generators"], census, test.classes, size, seed=cfg.seed,
                                          device=cpu, progress=False,
                                          sizes=class_sizes(census, size, cfg.synthetic_class_mix))
        t_draw = time.perf_counter() - t0
        model = train_learner(synth, cfg.learner_config(), device=cpu, progress=False)
        t_learn = time.perf_counter() - t0 - t_draw
        out["sizes"][str(size)] = {**score(model, val, test), "draw_seconds": round(t_draw, 1),
                                   "learner_seconds": round(t_learn, 1)}
        r = out["sizes"][str(size)]
        print(f"{size:>6} images: val {r['val_accuracy']:.4f} (MCC {r['val_mcc']:.3f})  test {r['test_accuracy']:.4f} "
              f"(MCC {r['test_mcc']:.3f})  draw {r['draw_seconds']} s, learner {r['learner_seconds']} s", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))  # after every size: a long run's finished rows survive
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
