"""How each site's generators of its last rounds make the DP-GAN's synthetic set (``gan-sample-rounds``,
``gan-sample-combine``).

    .venv/bin/python tests/benchmarks/bench_sample_rounds.py runs/defaults/mnist-dpgan-eps1-k3-dirichlet0.5/sim \\
        --data ../shared/data/mnist --rounds 1,3 --combine mixture,average

Reads a finished *simulated* DP-GAN run (``gan-sample-from = sites``): the sites' saved replies of every
round (``sites/<site>/runs/<experiment>/gan-round-<r>.pt``, which only a simulation's owner holds) and
their noisy class counts (``site_generators.pt``). For each k in ``--rounds`` and each way in ``--combine`` it
takes each site's generators of the last k rounds with the product's own functions -- as a mixture, each
drawing an equal part of the site's share (``server.modes.dpgan.round_mixture``), or averaged
(``server.modes.dpgan.site_generators``) --, draws the run's synthetic-set size and class mix with the run's
seed, trains the run's learner and scores it on a validation subset of the real *training* split (what a
choice may look at) and on the test split (what is reported). Same run, same DP releases: the difference is
the post-processing alone. Prints the numbers and writes them to ``--out`` (default
``tests/benchmarks/results/sample_rounds/<run>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    from common.learner import train_learner
    from server.modes.dpgan import sampled_generators
    from server.synthesis import class_sizes, sample_site_generators
    from tests.benchmarks.saved_run import (
        add_scoring_arguments,
        run_config,
        run_generator,
        score,
        test_and_validation,
    )

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a simulated DP-GAN run's output folder (holding report.json and sites/)")
    p.add_argument("--data", required=True, help="the run's dataset (its training split gives the validation subset)")
    p.add_argument("--rounds", default="1,3", help="comma-separated k: each site's last k rounds")
    p.add_argument("--combine", default="mixture,average", help="comma-separated: mixture, average (k > 1 only)")
    add_scoring_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = run_config(run)
    experiment = json.loads((run / "run.json").read_text())["experiment"]
    saved = torch.load(run / "site_generators.pt", weights_only=False)
    # the sites' own noisy class counts ("census" holds one row per mixture component in runs since the mixture)
    names, census = saved["sites"], np.asarray(saved.get("site_census", saved["census"]))

    def replies(rnd: int) -> dict[int, SimpleNamespace]:  # node index -> the site's reply of round rnd
        out = {}
        for i, name in enumerate(names):
            path = run / "sites" / name / "runs" / experiment / f"gan-round-{rnd}.pt"
            out[i] = SimpleNamespace(generator={k: np.asarray(v) for k, v in
                                                torch.load(path, weights_only=False)["reply"]["generator"].items()})
        return out

    test, val = test_and_validation(cfg, args.data, args.val)
    gen = run_generator(cfg, test)
    cpu = torch.device("cpu")
    result = {"run": str(run), "synthetic_size": cfg.synthetic_size, "rounds": cfg.num_rounds,
              "validation": f"{len(val)} images of the training split"}
    out = args.out or ROOT / "tests" / "benchmarks" / "results" / "sample_rounds" / f"{run.parent.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sizes = class_sizes(census, cfg.synthetic_size, cfg.synthetic_class_mix)  # (K,) the run's mix
    for k in [int(x) for x in args.rounds.split(",")]:
        recent = [replies(r) for r in range(cfg.num_rounds - k + 1, cfg.num_rounds + 1)]
        nodes = list(range(len(names)))
        for combine in (["last"] if k == 1 else args.combine.split(",")):
            t0 = time.perf_counter()
            # k = 1: one generator per site either way
            states, rows, _, used = sampled_generators(recent, nodes, census, "average" if k == 1 else combine)
            synth, _ = sample_site_generators(gen, states, rows, test.classes, cfg.synthetic_size, seed=cfg.seed,
                                              device=cpu, progress=False, sizes=sizes)
            model = train_learner(synth, cfg.learner_config(), device=cpu, progress=False)
            key = "last-1" if k == 1 else f"last-{k}" if combine == "average" else f"last-{k}-{combine}"
            result[key] = r = {**score(model, val, test), "rounds_used": used,
                               "seconds": round(time.perf_counter() - t0, 1)}
            print(f"last {k} round(s), {combine}: val {r['val_accuracy']:.4f} (MCC {r['val_mcc']:.3f})  test "
                  f"{r['test_accuracy']:.4f} (MCC {r['test_mcc']:.3f})  {r['seconds']} s", flush=True)
            out.write_text(json.dumps(result, indent=2))  # after every row: a long run's finished rows survive
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
