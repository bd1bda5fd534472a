"""What the generator's form costs a DP-GAN step on CPU: the fused upsampling convolution against the plain one.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_generator_speed.py            # 2 threads, about 3 min
    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_generator_speed.py --threads 1

``common.models.Generator`` computes each stage's nearest 2x upsampling and 3x3 convolution as one sub-pixel
convolution at the lower side (``UpsampleConv2d``) and runs its convolutions channels-last. The reference here is
the same generator, same weights, built the way it was before: ``nn.Upsample`` then ``nn.Conv2d`` at the upsampled
side, standard layout. For the three shapes the product's rules give (28x28 grayscale with width 24, 32x32 colour
and 64x64 colour drawn at 32 with width 32), it times

1. the generator alone at batch 256: a forward without gradients (what the D step and the coordinator's sampling
   do) and a forward plus backward (what the G step does), and checks both forms give the same images;
2. a whole site step as the product runs it: ``LocalGanTrainer.train_round`` with the defaults' round settings
   (DP-SGD on D at expected batch 256, noise multiplier 0.63, one G step with the mode-seeking term, the EMA),
   with the trainer's generator swapped for the reference one, on 20,000 random records (speed does not depend
   on pixel values). The round's fixed cost (a 2-step round) is subtracted.

The forms alternate within each repeat, so background load hits both alike; medians are printed and written to
``--out`` (default ``tests/benchmarks/results/generator_speed.json``).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import client.dpgan as dpgan  # noqa: E402
from common.models import GanShape, Generator, UpsampleConv2d, resize_to_side  # noqa: E402
from tests.benchmarks.site_steps import SHAPES, defaults_round, per_step_ms, random_site, time_round  # noqa: E402
from tests.benchmarks.speed_cli import machine, speed_args, write_result  # noqa: E402


class PlainGenerator(Generator):
    """The generator as built before the fused form: Upsample then Conv2d at the upsampled side, standard layout.
    Its state_dict keys and shapes are the product generator's, so the same weights load into both."""

    def __init__(self, shape: GanShape) -> None:
        super().__init__(shape)
        for i, layer in enumerate(self.upsample):
            if isinstance(layer, UpsampleConv2d):
                conv = nn.Conv2d(layer.in_channels, layer.out_channels, 3, padding=1)
                self.upsample[i - 1], self.upsample[i] = nn.Upsample(scale_factor=2, mode="nearest"), conv

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = self.shape.side >> self.shape.stages
        h = self.project(torch.cat([z, self.label_embedding(y)], dim=1))  # (B, c*s*s)
        return resize_to_side(self.upsample(h.view(z.shape[0], self.base_channels, s, s)), self.shape.image_size)


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def generator_rows(shape: GanShape, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    fused = Generator(shape)
    plain = PlainGenerator(shape)
    plain.load_state_dict(fused.state_dict())
    z, y = torch.randn(batch, shape.latent_dim), torch.randint(0, shape.num_classes, (batch,))
    with torch.no_grad():
        gap = float((fused(z, y) - plain(z, y)).abs().max())

    def forward(g: nn.Module) -> Callable[[], object]:
        return lambda: g(z, y).detach() if not torch.is_grad_enabled() else None

    def train(g: nn.Module) -> Callable[[], object]:
        def step() -> None:
            g.zero_grad(set_to_none=True)
            g(z, y).square().mean().backward()
        return step

    rows: dict[str, dict[str, list[float]]] = {"fused": {"forward": [], "forward+backward": []},
                                               "plain": {"forward": [], "forward+backward": []}}
    for g in (fused, plain):  # warm-up
        train(g)()
    for _ in range(repeats):
        for name, g in (("fused", fused), ("plain", plain)):
            with torch.no_grad():
                rows[name]["forward"].append(median_ms(lambda: g(z, y), 3))
            rows[name]["forward+backward"].append(median_ms(train(g), 3))
    out = {name: {k: round(statistics.median(v), 2) for k, v in r.items()} for name, r in rows.items()}
    out["max |fused - plain| over the batch's pixels"] = gap
    return out


def step_rows(shape: GanShape, steps: int, repeats: int) -> dict[str, float]:
    """ms per site step (D DP-SGD step + G step + EMA) of train_round, with each generator form."""
    trainer = random_site(shape)
    state = Generator(shape).state_dict()

    def round_ms(form: type[Generator]) -> Callable[[int], float]:
        def timed(k: int) -> float:
            dpgan.Generator = form  # the trainer builds its generator from this name
            try:
                return time_round(trainer, state, defaults_round(trainer, 256, k))
            finally:
                dpgan.Generator = Generator
        return timed

    return per_step_ms({"fused": round_ms(Generator), "plain": round_ms(PlainGenerator)}, steps, repeats)


def main(argv: list[str] | None = None) -> dict:
    args = speed_args(__doc__, argv, batch=256, repeats=3, steps_help="site steps per timed round", shapes=list(SHAPES),
                      out_name="generator_speed.json")
    result = {"machine": machine(args.threads),
              "batch": args.batch, "repeats": args.repeats, "steps_per_round": args.steps, "shapes": {}}
    for name in args.shapes.split(","):
        channels, side, width, resolution = SHAPES[name]
        shape = GanShape(channels, side, 10, latent_dim=64, width=width, resolution=resolution)
        gen = generator_rows(shape, args.batch, args.repeats)
        step = step_rows(shape, args.steps, args.repeats)
        result["shapes"][name] = {"generator_ms": gen, "site_step_ms": step,
                                  "site_step_speedup": round(step["plain"] / step["fused"], 2)}
        print(f"{name}: G forward {gen['fused']['forward']:.1f} ms (plain {gen['plain']['forward']:.1f}), "
              f"forward+backward {gen['fused']['forward+backward']:.1f} ms "
              f"(plain {gen['plain']['forward+backward']:.1f}); site step {step['fused']:.0f} ms "
              f"(plain {step['plain']:.0f}, {step['plain'] / step['fused']:.2f}x); "
              f"max image gap {gen['max |fused - plain| over the batch' + chr(39) + 's pixels']:.1e}", flush=True)
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
