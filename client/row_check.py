"""The premise of the evaluation's and the audit's sensitivity 1, checked on the site's own machine.

A site answers an evaluation query with a table of counts (per class, its held-out records classified right and
wrong) and an audit with histograms of counts (records by the distance to their nearest synthetic image), each
noised for one record moving one count. That holds only if a record's prediction or distance depends on that
record alone: float32 kernels round a row differently with another row count, so the site runs every forward pass
on fixed, zero-padded batches (``common.learner._batched(fixed_rows=True)``, ``client.evaluation.AUDIT_BLOCK``).
At one shape and layout a row's result then depends on that row alone -- on the CPUs the tests ran on. Another CPU
(other vector instructions, more threads splitting a batch) could round a row by its position or its batch-mates,
and one added record could then move other records' cells: a release past its sensitivity (review s59, which
found such a case in numpy's float64 sum of one row against two, ``common.audits.neighbors._exact_sq``).

So ``fedsynth site`` checks it before a site that answers such queries starts (:func:`batch_mate_problems`), on
random images of the site's own shape: each built-in learner's logits, and the audit's distance blocks, for the
same rows permuted, among other rows, and in a short padded batch, bitwise.
"""

from __future__ import annotations

import numpy as np
import torch

from client.evaluation import AUDIT_BLOCK, evaluation_batch
from common.audits.neighbors import _exact_sq, _sq_block
from common.learner import LEARNERS, _batched, build_learner


def _same_rows(rows_of, n: int, rng: np.random.Generator) -> bool:
    """Whether ``rows_of(idx)`` (one result row per index, in a fixed batch of ``n``) gives each row the same bits
    permuted, beside other rows, and in a short padded batch. Indices < 2n are valid."""
    base_idx = np.arange(n)
    base = rows_of(base_idx)
    perm = rng.permutation(n)
    mates = np.concatenate([np.arange(n, n + n // 2), base_idx[n // 2:]])  # half the rows replaced by others
    return (np.array_equal(rows_of(base_idx[perm]), base[perm])
            and np.array_equal(rows_of(mates)[n // 2:], base[n // 2:])
            and np.array_equal(rows_of(base_idx[: n - 7]), base[: n - 7]))


def batch_mate_problems(image_shape: tuple[int, int, int], num_classes: int, *, evaluation: bool,
                        audits: bool) -> list[str]:
    """What on this machine makes a record's answer depend on the other records (empty: nothing), for a site
    with images of ``image_shape`` (C, H, W) answering evaluation queries and/or audits."""
    rng = np.random.default_rng(0)
    problems = []
    if evaluation:
        n = evaluation_batch(image_shape)
        images = rng.random((2 * n, *image_shape), dtype=np.float32)  # (2n, C, H, W)
        for name in LEARNERS:
            torch.manual_seed(0)
            model = build_learner(name, image_shape, num_classes, allow_import=False)

            def logits(idx: np.ndarray) -> np.ndarray:  # (len(idx), K), each row in the site's fixed batches
                return np.concatenate(_batched(lambda m, t: m(t), model, images[idx], "cpu", n, True))

            if not _same_rows(logits, n, rng):
                problems.append(f"the {name} classifier's logits of an image change with the other images in its "
                                "batch")
    if audits:
        rows, cols = AUDIT_BLOCK
        values = int(np.prod(image_shape))
        records = torch.from_numpy(rng.random((2 * rows, values), dtype=np.float32))  # (2 rows, D)
        synthetic = torch.zeros(cols, values)  # (cols, D): a few images, the rest padding, as an audit's block
        synthetic[:16] = torch.rand(16, values, generator=torch.Generator().manual_seed(0))
        synthetic_sq = (synthetic * synthetic).sum(1)

        def distances(idx: np.ndarray) -> np.ndarray:  # (len(idx), cols) from one fixed, padded block of records
            block = torch.zeros(rows, values)
            block[: len(idx)] = records[idx]
            return _sq_block(block, (block * block).sum(1), synthetic, synthetic_sq)[: len(idx)].numpy()

        def exact(idx: np.ndarray) -> np.ndarray:  # (len(idx),) float64 distances to the first synthetic image
            mine = records[idx].numpy()
            return _exact_sq(mine, np.broadcast_to(synthetic[0].numpy(), mine.shape))

        if not _same_rows(distances, rows, rng) or not _same_rows(exact, rows, rng):
            problems.append("an image's distance to the synthetic images changes with the other images in its block")
    return problems
