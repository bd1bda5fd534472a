"""The measurement behind client.limits' step-memory factors: peak RSS growth of one step against its meta count.

One step per process (``ru_maxrss`` is a high-water mark), one CPU thread, random records:

    python -m tests.benchmarks.bench_step_memory g WIDTH D_WIDTH BATCH [SIDE]   # a G step (client.dpgan's)
    python -m tests.benchmarks.bench_step_memory d WIDTH D_WIDTH BATCH [SIDE]   # a DP-SGD step of D (Opacus)
    python -m tests.benchmarks.bench_step_memory bn WIDTH 0 BATCH               # a DP-SGD step of the shared net
    python -m tests.benchmarks.bench_step_memory s WIDTH 0 BLOCK                # a block of the statistics pass

It prints the growth, the per-sample gradients in it (each copy Opacus holds), the rest, the forward floats
client.limits counts for the step (x 4 bytes) and the rest over that count: the factor a site multiplies by. Side
28 is gray, any other side colour. The numbers quoted in client/limits.py came from these commands (2026-12-06).
Each run writes its row to ``tests/benchmarks/results/step_memory.json``.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from client.limits import forward_floats, meta_module
from common.bnnet import BNNet
from common.models import Discriminator, GanShape, Generator


RESULTS = Path(__file__).resolve().parent / "results" / "step_memory.json"


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _count(forward, rows: int) -> int:
    per_row, fixed = forward_floats(forward)
    return rows * per_row + fixed


def gan_step(kind: str, width: int, d_width: int, batch: int, side: int) -> tuple[int, int, int]:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from client.dpgan import discriminator_loss, mode_seeking_penalty

    ch = 1 if side == 28 else 3
    shape = GanShape(ch, side, 10, 64, width)
    g_meta, d_meta = meta_module(lambda: Generator(shape)), meta_module(lambda: Discriminator(shape, width=d_width))

    def judge(rows: int, fake: bool) -> None:  # as client.gan_site.check_gan_work counts it
        y = torch.zeros(rows, dtype=torch.long)
        d_meta(g_meta(torch.zeros(rows, 64), y) if fake else torch.zeros(rows, ch, side, side), y)

    counted = _count(lambda r: judge(r, True), batch) if kind == "g" else _count(lambda r: judge(r, False), 2 * batch)
    gen, disc = Generator(shape), Discriminator(shape, width=d_width)
    params = sum(p.numel() for p in disc.parameters())
    x, y = torch.rand(batch, ch, side, side) * 2 - 1, torch.randint(0, 10, (batch,))
    opt_g = torch.optim.Adam(gen.parameters())
    d_model = GradSampleModule(disc, loss_reduction="sum")
    opt_d = DPOptimizer(torch.optim.Adam(disc.parameters()), noise_multiplier=1.0, max_grad_norm=1.0,
                        expected_batch_size=batch, loss_reduction="mean")
    with torch.no_grad():
        fake = gen(torch.randn(batch, 64), y)
    base = _peak()
    if kind == "d":
        loss, _ = discriminator_loss(d_model, x, fake, y, 0.3)
        loss.backward()
        opt_d.step()
        return _peak() - base, 2 * batch * params * 4, counted
    del fake
    d_model.disable_hooks()
    for p in disc.parameters():
        p.requires_grad_(False)
    z = torch.randn(batch, 64)
    fake = gen(z, y)
    adv, cls = disc(fake, y)
    loss = (F.binary_cross_entropy_with_logits(adv, torch.ones_like(adv)) + 0.3 * F.cross_entropy(cls, y)
            + mode_seeking_penalty(z, fake))
    loss.backward()
    opt_g.step()
    return _peak() - base, 0, counted


def net_step(kind: str, width: int, rows: int) -> tuple[int, int, int]:
    from opacus import GradSampleModule

    from client.bnstats import iter_record_blocks
    from common.data import ImageDataset

    meta_net = meta_module(lambda: BNNet(1, 10, 28, width))
    counted = _count(lambda r: meta_net(torch.zeros(r, 1, 28, 28)), rows)
    net = BNNet(1, 10, 28, width)
    x, y = torch.rand(rows, 1, 28, 28), torch.randint(0, 10, (rows,))
    if kind == "bn":
        model = GradSampleModule(net, batch_first=True, loss_reduction="mean")
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        base = _peak()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return _peak() - base, rows * sum(p.numel() for p in net.parameters()) * 4, counted
    data = ImageDataset(x.numpy(), y.numpy().astype(np.int64), tuple(str(i) for i in range(10)))
    base = _peak()
    for _ in iter_record_blocks(net.eval(), data, device="cpu", batch_size=rows):
        pass
    return _peak() - base, 0, counted


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    kind, width, d_width, rows = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    side = int(argv[4]) if len(argv) > 4 else 28
    growth, gradients, counted = (gan_step(kind, width, d_width, rows, side) if kind in ("g", "d")
                                  else net_step(kind, width, rows))
    rest = growth - gradients
    print(f"{kind} width {width} d-width {d_width} rows {rows} side {side}: growth {growth / 2**20:,.0f} MB, "
          f"per-sample gradients {gradients / 2**20:,.0f} MB, rest {rest / 2**20:,.0f} MB; counted "
          f"{counted * 4 / 2**20:,.0f} MB; rest / counted {rest / (counted * 4):.2f}")
    # one step per process: each run adds (or replaces) its row of the results file
    key = {"kind": kind, "width": width, "d_width": d_width, "rows": rows, "side": side}
    rows_so_far = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows_so_far = [r for r in rows_so_far if {k: r.get(k) for k in key} != key]
    rows_so_far.append({**key, "growth_mb": round(growth / 2**20, 1), "gradients_mb": round(gradients / 2**20, 1),
                        "counted_mb": round(counted * 4 / 2**20, 1), "rest_over_counted": round(rest / (counted * 4), 3)})
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows_so_far, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
