"""The synthetic set's class mix (``synthetic-class-mix``): every class equally often, or as the census says.

    .venv/bin/python tests/benchmarks/bench_class_mix.py runs/faces/utkface-age-dpgan-eps10-k3-dirichlet0.5-r3/sim

Reads a finished DP-GAN run with ``gan-sample-from = sites`` (``site_generators.pt``: the sites' generators the
run drew its set from and the noisy class counts they released) and, for each mix in ``--mixes``, draws the run's
synthetic-set size with the product's own functions (``server.synthesis.class_sizes``,
``sample_site_generators``) and the run's seed, trains the run's learner on it and scores it on the run's
real test data: accuracy, MCC and balanced accuracy (the mean of the per-class accuracies, which a class
prior cannot buy). Same run, same DP releases: the difference is the post-processing alone. Prints the
numbers and writes them to ``--out`` (default ``tests/benchmarks/results/class_mix/<run>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from common.config import SYNTHETIC_CLASS_MIX, RunConfig
    from common.data import load_dataset
    from common.learner import evaluate_learner, train_learner
    from common.models import Generator
    from server.synthesis import class_sizes, sample_site_generators

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a DP-GAN run's output folder (with site_generators.pt)")
    p.add_argument("--mixes", default=",".join(SYNTHETIC_CLASS_MIX), help="comma-separated synthetic-class-mix values")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = json.loads((args.run / "report.json").read_text())
    cfg = RunConfig.from_mapping(report["config"])
    test = load_dataset(cfg.test_data, "test", image_size=cfg.image_size or None, label_from=cfg.label_from or None)
    c, h, _ = test.image_shape
    gen = Generator(cfg.gan_shape(c, h, len(test.classes)))
    sites = torch.load(args.run / "site_generators.pt", weights_only=False)
    census = np.asarray(sites["census"], dtype=np.float64)  # (S, K) the released noisy class counts
    pooled = np.clip(census, 0, None).sum(axis=0)
    test_share = np.bincount(test.labels, minlength=len(test.classes)) / len(test)
    print("classes' share in the census:", np.round(pooled / pooled.sum(), 3).tolist())
    print("classes' share in the test data:", np.round(test_share, 3).tolist())
    out = {"run": str(args.run), "synthetic_size": cfg.synthetic_size, "census_share": (pooled / pooled.sum()).tolist(),
           "test_share": test_share.tolist(), "mixes": {}}
    cpu = torch.device("cpu")
    name = args.run.parent.name if args.run.name == "sim" else args.run.name
    path = args.out or ROOT / "tests" / "benchmarks" / "results" / "class_mix" / f"{name}.json"
    for mix in (m.strip() for m in args.mixes.split(",") if m.strip()):
        t0 = time.perf_counter()
        sizes = class_sizes(census, cfg.synthetic_size, mix)
        synth, _ = sample_site_generators(gen, sites["generators"], census, test.classes, cfg.synthetic_size,
                                          seed=cfg.seed, device=cpu, progress=False, sizes=sizes)
        model = train_learner(synth, cfg.learner_config(), device=cpu, progress=False)
        res = evaluate_learner(model, test, device=cpu)
        out["mixes"][mix] = {"images_per_class": sizes.tolist(), "tstr_accuracy": round(res["accuracy"], 4),
                             "tstr_mcc": round(res["mcc"], 3),
                             "balanced_accuracy": round(float(np.mean(res["per_class_accuracy"])), 4),
                             "seconds": round(time.perf_counter() - t0, 1)}
        row = out["mixes"][mix]
        print(f"{mix:>9}: TSTR {row['tstr_accuracy']:.4f}  MCC {row['tstr_mcc']:.3f}  "
              f"balanced accuracy {row['balanced_accuracy']:.4f}  ({row['seconds']} s)", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2))  # after every mix: a long run's finished rows survive
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
