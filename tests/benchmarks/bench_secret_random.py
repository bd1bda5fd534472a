"""What the site's ChaCha20 secret streams cost against numpy's PCG64 (client.secret_random; review s61).

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_secret_random.py      # under a minute, 1 thread

Times (the least of ``--repeats``) the draws a site makes from its secret streams: float32 standard normals (DP-SGD's
noise, G's latents), float64 uniforms (Poisson masks) and float64 normals (the statistics release), per million;
and the noise of a whole default DP-GAN run at one site: one normal per parameter of the default 28x28
discriminator (width 16) per D step, 10 rounds x 120 steps (the longer schedule). Prints each number and writes
them to ``--out`` (default ``tests/benchmarks/results/secret_random.json``).
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

from client.secret_random import secret_generator  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.models import Discriminator  # noqa: E402
from tests.benchmarks.speed_cli import RESULTS, machine, write_result  # noqa: E402

MILLION = 1_000_000


def least_seconds(draw, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        draw()
        best = min(best, time.perf_counter() - began)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "secret_random.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    d_params = sum(p.numel() for p in Discriminator(RunConfig().gan_shape(1, 28, 10), width=16).parameters())
    run_draws = d_params * 10 * 120
    streams = {"PCG64 (before)": lambda: np.random.Generator(np.random.PCG64(secrets.randbits(128))),
               "ChaCha20 (now)": secret_generator}
    out: dict = {"machine": machine(1), "discriminator_parameters": d_params, "run_normals": run_draws, "streams": {}}
    for name, make in streams.items():
        rng = make()
        row = {"float32 normals, s per million": least_seconds(
                   lambda: rng.standard_normal(MILLION, dtype=np.float32), args.repeats),
               "float64 uniforms, s per million": least_seconds(lambda: rng.random(MILLION), args.repeats),
               "float64 normals, s per million": least_seconds(lambda: rng.normal(0.0, 1.0, MILLION), args.repeats)}
        row["a default run's D noise, s"] = row["float32 normals, s per million"] * run_draws / MILLION
        out["streams"][name] = {k: round(v, 4) for k, v in row.items()}
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    pcg, chacha = (out["streams"][k]["float32 normals, s per million"] for k in streams)
    out["chacha20_over_pcg64_float32_normals"] = round(chacha / pcg, 2)
    print(f"D has {d_params:,} parameters: {run_draws / MILLION:.0f} million normals a run; ChaCha20 / PCG64 "
          f"{out['chacha20_over_pcg64_float32_normals']}x")
    write_result(args.out, out)


if __name__ == "__main__":
    main()
