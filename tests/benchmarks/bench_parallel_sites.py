"""A federated round's site work in the in-process simulation: the sites one after another, or all at once.

    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_parallel_sites.py            # about 3 min on 2 cores
    PYTHONPATH=. .venv/bin/python tests/benchmarks/bench_parallel_sites.py --sites 3 --steps 40 --repeats 2

Each of ``--sites`` sites trains one DP-GAN round (``--steps`` D steps with the defaults' round settings at expected
batch ``--batch``, ``tests/benchmarks/site_steps.py``; gray 28x28, 20,000 random records each) behind a ClientApp
handler, sent through ``fedsynth.localgrid.LocalGrid`` as the simulation sends its requests:

- ``one after another``: ``LocalGrid(parallel=False)``, every site with all of torch's threads (``--threads``);
- ``at once``: ``LocalGrid(parallel=True)``, the product's default, which shares the threads out among the
  sites (``fedsynth.localgrid.site_workers``);
- ``one after another, one thread``: the floor for comparison (what one core does alone).

Seconds per round (the median of ``--repeats``) are printed and written to ``--out``
(default ``tests/benchmarks/results/parallel_sites.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from common.models import GanShape, Generator  # noqa: E402
from fedsynth.localgrid import LocalGrid, site_workers  # noqa: E402
from tests.benchmarks.site_steps import SHAPES, defaults_round, random_site  # noqa: E402
from tests.benchmarks.speed_cli import machine, speed_args, write_result  # noqa: E402


def round_seconds(sites: int, shape: GanShape, batch: int, steps: int, parallel: bool, threads: int) -> float:
    """Wall seconds of one round in which ``sites`` sites each train ``steps`` D steps, sent through a LocalGrid."""
    trainers = {1000 + i: random_site(shape) for i in range(sites)}  # node id -> its site's trainer
    state = Generator(shape).state_dict()
    app = ClientApp()

    @app.query()
    def train(msg: Message, context: Context) -> Message:
        trainer = trainers[context.node_id]
        trainer.train_round(state, defaults_round(trainer, batch, steps))
        return Message(RecordDict(), reply_to=msg)

    grid = LocalGrid(app, [{"partition-id": i} for i in range(sites)], {}, parallel=parallel)
    messages = [grid.create_message(RecordDict(), "query", node, group_id="1") for node in grid.get_node_ids()]
    torch.set_num_threads(threads)
    start = time.perf_counter()
    replies = list(grid.send_and_receive(messages))
    took = time.perf_counter() - start
    assert not any(r.has_error() for r in replies), [r.error.reason for r in replies if r.has_error()]
    return took


def main(argv: list[str] | None = None) -> dict:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--sites", type=int, default=3)
    mine, rest = own.parse_known_args(argv)
    args = speed_args(__doc__, rest, batch=256, repeats=2, steps_help="D steps per site and round",
                      shapes=["gray28"], out_name="parallel_sites.json")
    sites, threads = mine.sites, args.threads
    channels, side, width, resolution = SHAPES[args.shapes.split(",")[0]]
    shape = GanShape(channels, side, 10, latent_dim=64, width=width, resolution=resolution)
    round_seconds(1, shape, args.batch, 2, parallel=False, threads=threads)  # warm-up: allocator, kernels
    settings = {
        "one after another": (False, threads),
        "at once": (True, threads),
        "one after another, one thread": (False, 1),
    }
    samples: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats):  # alternate the settings within each repeat: drifts in the machine hit all
        for name, (parallel, t) in settings.items():
            samples[name].append(round_seconds(sites, shape, args.batch, args.steps, parallel, t))
            print(f"{name}: {samples[name][-1]:.1f} s", flush=True)
    torch.set_num_threads(threads)
    workers, each = site_workers(sites, threads)
    seconds = {name: round(statistics.median(v), 2) for name, v in samples.items()}
    print(f"{sites} sites x {args.steps} D steps, {threads} threads: " +
          ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items()) +
          f" ({workers} sites at once, {each} thread(s) each)")
    return write_result(args.out, {
        "benchmark": "bench_parallel_sites", "machine": machine(threads), "sites": sites, "steps": args.steps,
        "batch": args.batch, "shape": args.shapes.split(",")[0], "at_once": {"sites": workers, "threads_each": each},
        "seconds_per_round": seconds, "samples": samples,
    })


if __name__ == "__main__":
    main()
