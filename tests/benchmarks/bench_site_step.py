"""What a DP-GAN site step costs on CPU, by its generator-side parts: G steps per D step, the mode-seeking term.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_site_step.py                 # 2 threads, about 5 min
    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_site_step.py --threads 1 --shapes gray28

One site step is what ``LocalGanTrainer.train_round`` does per accounted D step with the defaults' round settings
at expected batch ``--batch`` (256 as the defaults; ``tests/benchmarks/site_steps.py``), for 1 and 2 G steps per D
step (``gan-g-steps`` / ``gan-long-g-steps``; and 2 each drawing half the fakes, a rule tried for large sites on the
longer D schedule and left out: docs/results.md, ``results/recipe/half_g.json``), each with the mode-seeking term

- as the product computes it: from the pairs of rows inside the G batch (``client.dpgan.mode_seeking_penalty``);
- as it was computed before (the paper's form): a second image for every row from a fresh latent, i.e. a second
  generator forward and backward per G step (rebuilt here around the trainer's own generator);
- off (``gan-mode-seeking = 0``: the floor).

The round's fixed cost is subtracted and the settings alternate within each repeat (``site_steps.per_step_ms``).
Medians are printed and written to ``--out`` (default
``tests/benchmarks/results/site_step.json``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import client.dpgan as dpgan  # noqa: E402
from common.models import GanShape, Generator  # noqa: E402
from tests.benchmarks.site_steps import SHAPES, defaults_round, per_step_ms, random_site, time_round  # noqa: E402
from tests.benchmarks.speed_cli import machine, speed_args, write_result  # noqa: E402

PAIRS_PENALTY = dpgan.mode_seeking_penalty
SETTINGS = {  # name: (G steps per D step, mode-seeking form, share of the D batch each G step draws as fakes)
    "1 G, mode-seeking from pairs": (1, "pairs", 1.0),
    "1 G, mode-seeking from a second latent (before)": (1, "second-latent", 1.0),
    "1 G, no mode-seeking": (1, "off", 1.0),
    "2 G, mode-seeking from pairs": (2, "pairs", 1.0),
    "2 G on half the fakes each, mode-seeking from pairs": (2, "pairs", 0.5),
    "2 G, mode-seeking from a second latent (before)": (2, "second-latent", 1.0),
    "2 G, no mode-seeking": (2, "off", 1.0),
}


class _RecordingGenerator(Generator):
    """The trainer's generator, remembering itself and its last labels for ``_second_latent_penalty``."""

    latest: "_RecordingGenerator | None" = None

    def __init__(self, shape: GanShape) -> None:
        super().__init__(shape)
        _RecordingGenerator.latest = self
        self.last_labels: torch.Tensor | None = None

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.last_labels = y
        return super().forward(z, y)


def _second_latent_penalty(z: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The mode-seeking term as computed before the pairs: each row against a second image of its label from a
    fresh latent (a second forward of G, whose backward the G step then also pays)."""
    gen = _RecordingGenerator.latest
    z2 = torch.randn_like(z)  # (g, latent)
    fake2 = gen(z2, gen.last_labels)  # (g, C, H, W)
    image_gap = (fake - fake2).abs().flatten(1).mean(dim=1)
    latent_gap = (z - z2).abs().mean(dim=1)
    return 1.0 / ((image_gap / latent_gap).mean() + 1e-5)


def step_ms(shape: GanShape, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Median ms per site step of each of SETTINGS."""
    trainer = random_site(shape)
    state = Generator(shape).state_dict()

    def round_ms(g_steps: int, form: str, share: float) -> Callable[[int], float]:
        def timed(k: int) -> float:
            rs = defaults_round(trainer, batch, k, g_steps_per_d=g_steps, mode_seeking=0.0 if form == "off" else 1.0,
                                g_batch_size=round(share * batch))
            if form == "second-latent":  # the trainer looks both names up at call time
                dpgan.Generator, dpgan.mode_seeking_penalty = _RecordingGenerator, _second_latent_penalty
            try:
                return time_round(trainer, state, rs)
            finally:
                dpgan.Generator, dpgan.mode_seeking_penalty = Generator, PAIRS_PENALTY
        return timed

    return per_step_ms({name: round_ms(*setting) for name, setting in SETTINGS.items()}, steps, repeats)


def main(argv: list[str] | None = None) -> dict:
    args = speed_args(__doc__, argv, batch=256, repeats=3, steps_help="site steps per timed round",
                      shapes=["gray28", "colour32"], out_name="site_step.json")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    result = {"commit": commit, "machine": machine(args.threads), "batch": args.batch,
              "steps_per_round": args.steps, "repeats": args.repeats, "site_step_ms": {}}
    for name in args.shapes.split(","):
        channels, side, width, resolution = SHAPES[name]
        shape = GanShape(channels, side, 10, latent_dim=64, width=width, resolution=resolution)
        row = step_ms(shape, args.batch, args.steps, args.repeats)
        result["site_step_ms"][name] = row
        print(f"{name}: " + "; ".join(f"{k} {v:.0f} ms" for k, v in row.items()), flush=True)
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
