"""What channels-last saves the central learner's training on CPU: one training step, both layouts.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_learner_speed.py            # 2 threads, about 2 min
    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_learner_speed.py --threads 1

``common.learner.train_learner`` trains the built-in CNN with its convolution weights and every batch in the
channels-last layout and hands the model back in the standard one. This times the loop's step as
``train_learner`` runs it (normalise, forward, cross-entropy, backward, AdamW, one-cycle schedule) at the
learner's batch (128) for the shapes the product meets: 28x28 grayscale (MNIST, PneumoniaMNIST, CIFAR-10 gray),
32x32 colour (CIFAR-10) and 64x64 colour (faces, through the strided stem), in the standard layout and
channels-last, on random images (speed does not depend on pixel values). The layouts alternate within each
repeat, so background load hits both alike; medians are printed and written to ``--out`` (default
``tests/benchmarks/results/learner_speed.json``). The learner's 10 epochs on 60,000 MNIST images are 4,690
such steps, on a 10,000-image synthetic set 790.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common.learner import LearnerConfig, _normalize, build_learner  # noqa: E402
from tests.benchmarks.speed_cli import machine, speed_args, write_result  # noqa: E402

SHAPES = {"gray28": (1, 28), "colour32": (3, 32), "colour64": (3, 64)}  # name: (channels, side)


def step_ms(shape: tuple[int, int], layout: torch.memory_format, batch: int, steps: int) -> float:
    """Median ms per training step of a fresh CNN in ``layout`` over ``steps`` steps (after one warm-up step)."""
    channels, side = shape
    cfg = LearnerConfig()
    torch.manual_seed(0)
    model = build_learner("cnn", (channels, side, side), 10).to(memory_format=layout).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps + 1)
    x = torch.rand(batch, channels, side, side)  # (B, C, S, S) in [0, 1]
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        xb = _normalize(x).contiguous(memory_format=layout)
        loss = loss_fn(model(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> dict:
    args = speed_args(__doc__, argv, batch=128, repeats=5, steps_help="timed steps per repeat and layout",
                      shapes=list(SHAPES), out_name="learner_speed.json")
    result = {"machine": machine(args.threads),
              "batch": args.batch, "repeats": args.repeats, "steps": args.steps, "shapes": {}}
    layouts = {"standard": torch.contiguous_format, "channels_last": torch.channels_last}
    for name in args.shapes.split(","):
        medians: dict[str, list[float]] = {k: [] for k in layouts}
        for _ in range(args.repeats):
            for k, layout in layouts.items():
                medians[k].append(step_ms(SHAPES[name], layout, args.batch, args.steps))
        row = {k: round(statistics.median(v), 1) for k, v in medians.items()}
        row["speedup"] = round(row["standard"] / row["channels_last"], 2)
        result["shapes"][name] = row
        print(f"{name}: {row['channels_last']:.1f} ms per step channels-last, {row['standard']:.1f} standard "
              f"({row['speedup']:.2f}x)", flush=True)
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
