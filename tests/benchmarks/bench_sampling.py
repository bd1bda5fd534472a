"""Where the DP-GAN mode samples from: each class from the sites that hold it, or the averaged generator.

    .venv/bin/python tests/benchmarks/bench_sampling.py runs/defaults/mnist-dpgan-eps10-k3-dirichlet0.5/sim \\
        --test ../shared/data/mnist

Reads a finished DP-GAN run's output folder (``generator.pt``: the average of the last round; and
``site_generators.pt``: the sites' generators the run drew from and their noisy class counts, written by a run with
``gan-sample-from = sites``), draws the run's synthetic-set size both ways with the run's seed, trains the
run's learner on each and tests it on the real test data. Same run, same DP releases: the difference is
the sampling alone. Prints both and writes ``sampling.json`` into the run's folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from common.config import RunConfig
    from common.data import load_dataset
    from common.learner import evaluate_learner, train_learner
    from common.models import Generator
    from server.synthesis import sample_generator, sample_site_generators

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a DP-GAN run's output folder")
    p.add_argument("--test", required=True, help="the real test data")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    cfg = RunConfig.from_mapping(report["config"])
    test = load_dataset(args.test, "test", image_size=cfg.image_size or None, label_from=cfg.label_from or None)
    c, h, _ = test.image_shape
    gen = Generator(cfg.gan_shape(c, h, len(test.classes)))
    gen.load_state_dict(torch.load(run / "generator.pt"))
    sites = torch.load(run / "site_generators.pt", weights_only=False)
    print("noisy class counts per site:\n", np.round(sites["census"]).astype(int))
    out = {"run": str(run), "synthetic_size": cfg.synthetic_size}
    cpu = torch.device("cpu")
    for how in ("sites", "average"):
        t0 = time.perf_counter()
        if how == "sites":
            synth, _ = sample_site_generators(gen, sites["generators"], sites["census"], test.classes,
                                              cfg.synthetic_size, seed=cfg.seed, device=cpu, progress=False)
        else:
            synth = sample_generator(gen, test.classes, cfg.synthetic_size, seed=cfg.seed, device=cpu, progress=False)
        model = train_learner(synth, cfg.learner_config(), device=cpu, progress=False)
        res = evaluate_learner(model, test, device=cpu)
        out[how] = {"tstr_accuracy": round(res["accuracy"], 4), "tstr_mcc": round(res["mcc"], 3),
                    "per_class_accuracy": [round(a, 3) for a in res["per_class_accuracy"]],
                    "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{how:>8}: TSTR {out[how]['tstr_accuracy']:.4f}  MCC {out[how]['tstr_mcc']:.3f}  "
              f"({out[how]['seconds']} s)", flush=True)
    (run / "sampling.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {run / 'sampling.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
