"""How large the discriminator's per-sample gradients are against the clipping bound (``gan-max-grad-norm``).

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_grad_norms.py                  # about 10 min, 2 threads
    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_grad_norms.py --datasets mnist --rounds 2

DP-SGD clips each record's gradient to norm C before summing and adds Gaussian noise of std sigma * C. Whether C
matters depends on the norms: where every record's norm exceeds C, each record contributes its gradient's direction
times C and the noise is sigma * C too, so the whole noisy step scales with C; D's optimizer, Adam, divides each
update by a running root-mean-square of the steps, so its updates do not change with C at all (up to Adam's
epsilon, 1e-8). C is then not a setting to tune. Where most norms fall below C, a smaller C would keep the
signal and cut the noise.

For each dataset this trains one site of up to ``--records`` records of its training split the way a site trains
(``client.dpgan.LocalGanTrainer`` with the defaults' round settings: ``tests/benchmarks/site_steps.defaults_round``,
expected batch 256, noise multiplier 0.63, C = 1) for ``--rounds`` rounds of ``--steps`` D steps, and records the
norm of every record's per-sample gradient (all of D's parameters) just before Opacus clips it: the 10/50/90 %
quantiles per round and the share above C. Then it checks the claim above: the same first round again (at most 30
steps, same start, same secret noise seed) with C/4 and with 4C, and with C and another noise seed; each generator's
distance to C's, as a share of how far C's moved from the start. Writes ``--out`` (default ``tests/benchmarks/results/grad_norms.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import client.nonfinite as nonfinite  # noqa: E402
from client.dpgan import LocalGanTrainer  # noqa: E402
from common.data import ImageDataset, load_dataset  # noqa: E402
from common.models import GanShape, Generator  # noqa: E402
from tests.benchmarks.run_grid import DATASETS as GRID_DATASETS, DEFAULT_DATA_ROOT as DATA  # noqa: E402
from tests.benchmarks.site_steps import defaults_round  # noqa: E402
from tests.benchmarks.speed_cli import RESULTS, machine, write_result  # noqa: E402

DATASETS = {  # name: (path under ../shared/data, load_dataset keywords) -- 28x28 grayscale, the GAN the rules choose
    "mnist": (GRID_DATASETS["mnist"].data, {}),
    "pneumonia": (GRID_DATASETS["pneumonia"].data, {}),
    "cifar10gray28": (GRID_DATASETS["cifar10"].data, {"image_size": 28, "channels": 1}),
}
BATCH = 256  # the defaults' expected Poisson batch (server/defaults.py)


class NormRecorder:
    """Records the per-sample gradient norms every DP-SGD step of D is about to clip (Opacus' grad_sample): the
    trainer clips each padded chunk of a step as it comes (``FiniteDPOptimizer.accumulate_chunk``), so the chunks'
    norms are gathered until the step (``step_accumulated``). Padding rows count as zero norms."""

    def __init__(self) -> None:
        self.steps: list[np.ndarray] = []  # one array of norms per D step (its chunks' rows)
        self._pending: list[np.ndarray] = []

    def __enter__(self) -> "NormRecorder":
        cls = nonfinite.FiniteDPOptimizer
        self._originals = clip, step = cls.clip_and_accumulate, cls.step_accumulated
        recorder = self

        def recording(optimizer) -> None:
            samples = optimizer.grad_samples  # one (rows, *p.shape) tensor per parameter of D
            if samples and len(samples[0]):
                per_param = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in samples], dim=1)  # (rows, P)
                recorder._pending.append(per_param.norm(dim=1).numpy())  # (rows,) norm over all of D's parameters
            clip(optimizer)

        def stepping(optimizer) -> None:
            if recorder._pending:
                recorder.steps.append(np.concatenate(recorder._pending))
            recorder._pending = []
            step(optimizer)

        cls.clip_and_accumulate, cls.step_accumulated = recording, stepping
        return self

    def __exit__(self, *exc) -> None:
        nonfinite.FiniteDPOptimizer.clip_and_accumulate, nonfinite.FiniteDPOptimizer.step_accumulated = self._originals


def site(name: str, records: int) -> LocalGanTrainer:
    path, kwargs = DATASETS[name]
    data = load_dataset(DATA / path, "train", **kwargs)
    keep = np.random.default_rng(0).permutation(len(data))[:records]
    data = ImageDataset(data.images[keep], data.labels[keep], data.classes, source=name)
    channels, side, _ = data.image_shape
    shape = GanShape(channels=channels, image_size=side, num_classes=len(data.classes), width=24)
    return LocalGanTrainer(shape, data, torch.device("cpu"), progress=False)


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A generator's floating-point weights as one vector."""
    return torch.cat([v.flatten() for v in state.values() if v.is_floating_point()])


def measure(name: str, records: int, rounds: int, steps: int) -> dict:
    trainer = site(name, records)
    start = {k: v.clone() for k, v in Generator(trainer.shape).state_dict().items()}
    clip = 1.0
    per_round, generator, d_state = [], start, None
    with NormRecorder() as rec:
        for r in range(rounds):
            rs = defaults_round(trainer, BATCH, steps, seed=r, noise_seed=r + 1, max_grad_norm=clip)
            generator, _, d_state = trainer.train_round(generator, rs, d_state)
            norms = np.concatenate(rec.steps[-steps:])
            q10, q50, q90 = (float(v) for v in np.quantile(norms, [0.1, 0.5, 0.9]))
            per_round.append({"round": r + 1, "q10": round(q10, 2), "median": round(q50, 2), "q90": round(q90, 2),
                              "min": round(float(norms.min()), 2), "share_above_clip": round(float(np.mean(norms > clip)), 4)})
            print(f"{name} round {r + 1}: per-sample norms q10 {q10:.1f}, median {q50:.1f}, q90 {q90:.1f}, "
                  f"min {norms.min():.2f}; share above C={clip}: {np.mean(norms > clip):.3f}", flush=True)
    # The claim: with every record clipped, C/4 or 4C train the same generator (same start, same secret noise seed),
    # up to Adam's epsilon, whose tiny differences GAN training amplifies step by step. The yardstick: what another
    # noise seed (another draw of the same mechanism) changes.
    short = min(steps, 30)

    def after(c: float, noise_seed: int = 1) -> torch.Tensor:  # G's weights after `short` steps, flattened
        return flat(trainer.train_round(start, defaults_round(trainer, BATCH, short, seed=0, noise_seed=noise_seed,
                                                              max_grad_norm=c))[0])

    base = after(clip)
    moved = float((base - flat(start)).norm())
    versus = {"C/4": after(clip / 4), "4C": after(clip * 4), "another noise seed": after(clip, noise_seed=2)}
    differences = {name: round(float((base - g).norm()) / moved, 4) for name, g in versus.items()}
    print(f"{name}: G after {short} D steps, its difference to C={clip}'s as a share of how far C={clip}'s moved "
          f"from the start: " + ", ".join(f"{k} {v:.3f}" for k, v in differences.items()), flush=True)
    return {"records": len(trainer.data), "rounds": per_round,
            "same_start": {"steps": short, "difference_over_movement": differences}}


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--records", type=int, default=20_000, help="records of the site (at most the training split)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60, help="D steps per round (the defaults' shorter schedule)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS / "grad_norms.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [n for n in args.datasets.split(",") if not (DATA / DATASETS[n][0]).exists()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found under {DATA}: this benchmark reads ../shared/data")
    result = {"what": "norms of the discriminator's per-sample gradients before clipping (C = gan-max-grad-norm = 1)",
              "settings": {"expected_batch": BATCH, "noise_multiplier": 0.63, "steps_per_round": args.steps,
                           "rounds": args.rounds},
              "machine": machine(args.threads),
              "datasets": {n: measure(n, args.records, args.rounds, args.steps) for n in args.datasets.split(",")}}
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
