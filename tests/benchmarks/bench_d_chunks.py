"""What the discriminator's padded chunks cost a DP-GAN site step on CPU, by chunk size.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_d_chunks.py --threads 1          # about 3 min
    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_d_chunks.py --shapes gray28 --chunks 64

D's DP-SGD step runs each Poisson batch in fresh, zero-padded chunks of exactly ``DPSGD_CHUNK`` rows, the fakes too
(``client.dpgan.discriminator_backward``; why: docs/privacy.md, "One record, one cell"). This times a site step (what
``LocalGanTrainer.train_round`` does per accounted D step, the defaults' round settings at expected batch ``--batch``,
one G step) with each chunk size of ``--chunks`` against the step as it ran before the chunks: one real and one fake
pass on the b sampled rows (``as sampled``, rebuilt here; not private against a coordinator that chooses D's and G's
weights, only the price's reference). Medians, the round's fixed cost subtracted, written to ``--out`` (default
``tests/benchmarks/results/d_chunks.json``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import client.dpgan as dpgan  # noqa: E402
import client.dpsgd as dpsgd  # noqa: E402
from common.models import GanShape, Generator  # noqa: E402
from tests.benchmarks.site_steps import SHAPES, defaults_round, per_step_ms, random_site, time_round  # noqa: E402
from tests.benchmarks.speed_cli import RESULTS, machine, write_result  # noqa: E402

CHUNKED = dpgan.discriminator_backward


def _as_sampled(d_model, gen, x_all, y_all, idx, latent, seen_by_d, ac_weight, after_chunk=None) -> tuple[float, int]:
    """D's backward the way it ran before the chunks: the b sampled rows in one real and one fake pass (clipped into
    the step's sum once, ``after_chunk``, as the trainer now does after each chunk)."""
    xb, yb = x_all[idx], y_all[idx]  # (b, C, H, W), (b,)
    if not len(idx):  # an empty batch: a zero-row per-sample gradient for the noise-only step
        for p in d_model.parameters():
            p.grad_sample = torch.zeros((0, *p.shape), device=xb.device)
        if after_chunk is not None:
            after_chunk()
        return 0.0, 0
    gen.eval()
    with torch.no_grad():
        fake = gen(latent(len(idx)), yb)
    gen.train()
    loss, real_cls = dpgan.discriminator_loss(d_model, seen_by_d(xb), seen_by_d(fake), yb, ac_weight)
    loss.backward()
    if after_chunk is not None:
        after_chunk()
    return float(loss.detach()), int((real_cls.argmax(1) == yb).sum())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="site steps per timed round")
    p.add_argument("--shapes", default="gray28,colour32")
    p.add_argument("--chunks", default="32,64,128", help="chunk sizes to time (the product's: %d)" % dpsgd.DPSGD_CHUNK)
    p.add_argument("--out", type=Path, default=RESULTS / "d_chunks.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "machine": machine(args.threads), "batch": args.batch, "steps_per_round": args.steps,
              "repeats": args.repeats, "product_chunk": dpsgd.DPSGD_CHUNK, "site_step_ms": {}}
    product_chunk = dpsgd.DPSGD_CHUNK
    for name in args.shapes.split(","):
        channels, side, width, resolution = SHAPES[name]
        shape = GanShape(channels, side, 10, latent_dim=64, width=width, resolution=resolution)
        trainer, state = random_site(shape), Generator(shape).state_dict()

        def timed(chunk: int | None):
            def round_ms(k: int) -> float:
                dpgan.discriminator_backward = CHUNKED if chunk else _as_sampled
                dpsgd.DPSGD_CHUNK = dpgan.DPSGD_CHUNK = chunk or product_chunk  # padded_chunks reads dpsgd's
                try:
                    return time_round(trainer, state, defaults_round(trainer, args.batch, k))
                finally:
                    dpgan.discriminator_backward = CHUNKED
                    dpsgd.DPSGD_CHUNK = dpgan.DPSGD_CHUNK = product_chunk
            return round_ms

        settings = {"as sampled (before)": timed(None)}
        settings.update({f"chunks of {c}": timed(c) for c in map(int, args.chunks.split(","))})
        row = per_step_ms(settings, args.steps, args.repeats)
        result["site_step_ms"][name] = row
        print(f"{name}: " + "; ".join(f"{k} {v:.0f} ms" for k, v in row.items()), flush=True)
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
