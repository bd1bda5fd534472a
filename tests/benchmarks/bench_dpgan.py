"""Benchmark of the DP-GAN mode end to end through the real apps (in process, no Ray): TSTR on MNIST.

Runs the coordinator (server.app) and ``--sites`` virtual sites (client.app) with
``fedsynth.localgrid.run_inprocess``: each site trains its DP-SGD discriminator and the received
generator (client.dpgan), the coordinator FedAvg-averages the generators, samples a labelled synthetic
set and trains the unchanged central CNN on it; TSTR = its accuracy on the real test split, next to the
same learner trained on the real pooled data.

Default configuration (the product's acceptance bar: TSTR >= 0.80, whole run <= 30 min on 2 cores):
MNIST, 3 sites, partition dirichlet:0.5, epsilon 10 and delta 1e-5 per site.

Writes tests/benchmarks/results/dpgan_mnist.json (or ``--out``) and prints a summary.

  .venv/bin/python tests/benchmarks/bench_dpgan.py
  .venv/bin/python tests/benchmarks/bench_dpgan.py --epsilon inf --rounds 2
  .venv/bin/python tests/benchmarks/bench_dpgan.py --data digits --test-data digits --partition iid \\
      --delta 0 --rounds 3 --local-steps 100 --batch-size 64 --width 64 --out /tmp/dpgan_digits.json
  # extra run settings (dashed keys of common/config.py) and local-recipe fields of client.dpgan.RoundSettings:
  .venv/bin/python tests/benchmarks/bench_dpgan.py --set learner-epochs=15 --recipe d_steps_per_g=2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import client.app as client_app_module  # noqa: E402
import client.gan_site as gan_site_module  # noqa: E402
from client.dpgan import RoundSettings  # noqa: E402
from common.config import RunConfig  # noqa: E402
from fedsynth.localgrid import run_inprocess  # noqa: E402
from server.app import run_coordinator  # noqa: E402

MNIST = "/work/shared/data/mnist"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=MNIST)
    p.add_argument("--test-data", default=None, help="default: same as --data")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--epsilon", type=float, default=10.0, help="per-site epsilon; inf = non-private")
    p.add_argument("--delta", type=float, default=1e-5, help="per-site delta; 0 = min(1e-5, 1/(10 n))")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=250, help="D (DP-SGD) steps per site per round")
    p.add_argument("--batch-size", type=int, default=256, help="expected Poisson batch size of real records")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--lr-d", type=float, default=1e-3)
    p.add_argument("--lr-g", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=32, help="generator base width (D: width // 4 unless --set gan-d-width=N)")
    p.add_argument("--latent-dim", type=int, default=64)
    p.add_argument("--synthetic-size", type=int, default=10000)
    p.add_argument("--learner-epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the target box has 2 cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other run setting of common/config.py (dashed key); repeatable")
    p.add_argument("--recipe", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a training-recipe default of client.dpgan.RoundSettings "
                        "(d_steps_per_g, g_steps_per_d, g_batch_size, ema); repeatable")
    p.add_argument("--out-dir", default="/tmp/bench_dpgan_run", help="run directory (coordinator outputs, site state)")
    p.add_argument("--out", default=str(ROOT / "tests" / "benchmarks" / "results" / "dpgan_mnist.json"))
    return p.parse_args(argv)


def _recipe(items: list[str]) -> dict:
    fields = {f.name: f for f in dataclasses.fields(RoundSettings)}
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in fields or key in ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "lr_d", "lr_g", "seed"):
            raise SystemExit(f"--recipe {item}: not a recipe field of RoundSettings")
        default = fields[key].default
        out[key] = tuple(float(v) for v in value.split(",")) if isinstance(default, tuple) else type(default)(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    settings = {
        "data": args.data, "test-data": args.test_data or args.data, "partition": args.partition,
        "epsilon": args.epsilon, "delta": args.delta, "num-rounds": args.rounds,
        "gan-local-steps": args.local_steps, "gan-batch-size": args.batch_size,
        "gan-max-grad-norm": args.max_grad_norm, "gan-lr-d": args.lr_d, "gan-lr-g": args.lr_g,
        "gan-width": args.width, "gan-latent-dim": args.latent_dim, "synthetic-size": args.synthetic_size,
        "learner-epochs": args.learner_epochs, "seed": args.seed, "mode": "dpgan",
    }
    for item in args.set:
        key, _, value = item.partition("=")
        settings[key] = value
    recipe = _recipe(args.recipe)
    if recipe:  # benchmark-only hook: the site builds RoundSettings with these recipe values
        gan_site_module.RoundSettings = functools.partial(RoundSettings, **recipe)
    cfg = RunConfig.from_mapping({"out-dir": args.out_dir, "resume": False, **settings})
    nodes = [{"partition-id": i, "num-partitions": args.sites} for i in range(args.sites)]
    start = time.perf_counter()
    report = run_inprocess(run_coordinator, client_app_module.app, cfg.to_flwr(), nodes)
    wall = time.perf_counter() - start
    util = report.get("utility", {})
    tstr, real = util.get("tstr_accuracy"), util.get("real_accuracy")
    result = {
        "benchmark": "dpgan",
        "tstr_accuracy": tstr,
        "real_accuracy": real,
        "ratio": (tstr / real) if tstr is not None and real else None,
        "epsilon_per_site": [s.get("epsilon") for s in report.get("sites", [])],
        "delta_per_site": [s.get("delta") for s in report.get("sites", [])],
        "examples_per_site": [s.get("examples") for s in report.get("sites", [])],
        "wall_seconds": round(wall, 1),
        "settings": settings,
        "recipe": {**{f.name: f.default for f in dataclasses.fields(RoundSettings)
                      if f.default is not dataclasses.MISSING}, **recipe},
        "threads": args.threads,
        "timings": report.get("timings"),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"TSTR {tstr}  real {real}  eps per site {[round(e, 3) for e in result['epsilon_per_site'] if e is not None]}"
          f"  wall {wall:.0f} s  -> {out}")
    return result


if __name__ == "__main__":
    main()
