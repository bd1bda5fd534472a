"""Nearest-neighbour search (chunked torch matmul, exact float64 winners) and the metric helpers.

Distances and metrics are described in the package docstring (:mod:`common.audits`).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

Metric = Literal["mse", "l2"]
_METRICS = ("mse", "l2")
# Elements of one (queries x references) distance block; 2^24 float32 = 64 MiB.
_BLOCK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------
# Nearest neighbours
# --------------------------------------------------------------------------------------------------


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    """(N, ...) array -> (N, D) float32 C-contiguous matrix, with a clear error for bad input."""
    arr = np.asarray(x)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(
            f"{name} must be a non-empty array of records shaped (N, ...) e.g. images (N, C, H, W) "
            f"or features (N, F); got shape {arr.shape}"
        )
    return np.ascontiguousarray(arr.reshape(arr.shape[0], -1), dtype=np.float32)


def _check_metric(metric: str) -> None:
    if metric not in _METRICS:
        raise ValueError(f"unknown distance metric '{metric}': use one of {_METRICS}")


def _finish_distance(sq: np.ndarray, dim: int, metric: str) -> np.ndarray:
    """Squared Euclidean distances (float64) -> the requested metric."""
    return sq / dim if metric == "mse" else np.sqrt(sq)


# Rows of one float64 block of _exact_sq: every block has this many rows, zero-padded.
_EXACT_ROWS = 256


def _exact_sq(a: np.ndarray, b: np.ndarray, b_rows: np.ndarray | None = None) -> np.ndarray:
    """Row-wise squared Euclidean distance of two (N, D) arrays in float64 (no cancellation error); with ``b_rows``
    (N,), of each row of ``a`` to the row ``b[b_rows[i]]`` (its nearest, say), gathered one block at a time.

    Computed on fixed, zero-padded blocks of _EXACT_ROWS rows, so that a row's rounding never depends on how many
    rows there are (review s59: numpy's einsum summed a lone row of more than about 8,200 values in another order
    than the same row among others, so a site's audit with one held-out record could put it in another bin than
    with two: one added record moved two cells), and memory is one block's, not the whole set's in float64 (nor,
    with ``b_rows``, a gathered copy of b as large as a: review s63, at a site's audit, as large as its records)."""
    out = np.empty(len(a), dtype=np.float64)
    block = np.empty((_EXACT_ROWS, a.shape[1]), dtype=np.float64)  # (_EXACT_ROWS, D)
    for i in range(0, len(a), _EXACT_ROWS):
        n = min(_EXACT_ROWS, len(a) - i)
        block[n:] = 0.0
        block[:n] = a[i:i + n]
        block[:n] -= b[i:i + n] if b_rows is None else b[b_rows[i:i + n]]  # float32 values, subtracted in float64
        out[i:i + n] = np.einsum("nd,nd->n", block, block)[:n]
    return out


def _sq_block(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """(qa, qb) squared Euclidean distances of two float32 blocks (a_sq, b_sq: their rows' squared norms),
    as ||a||^2 + ||b||^2 - 2ab with the tiny negatives of float32 cancellation clamped to 0."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_(min=0.0)


def _nn_search(
    a: np.ndarray, b: np.ndarray, *, both_ways: bool, device: torch.device | str | None,
    block_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Chunked nearest neighbour search on (Na, D) x (Nb, D) float32 matrices.

    Returns the index of the nearest b for every a (Na,) and, with ``both_ways``, the index of the
    nearest a for every b (Nb,); one pass over the distance matrix serves both directions.

    ``block_shape`` None: blocks sized to the inputs (fastest). ``(qa, qb)``: every distance block is computed on
    freshly allocated, zero-padded (qa, D) and (qb, D) float32 blocks whatever Na and Nb are, the padded rows and
    columns masked to +inf so that no search picks them: float32 matmul rounds a row differently when its block
    has another row count, so with input-sized blocks the nearest b of one a (near-ties) can depend on how many
    other a's there are. A site's audit uses it (``client.evaluation``)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    na, nb = a.shape[0], b.shape[0]
    if block_shape is None:
        # Square-ish blocks keep the (qa x qb) distance block near _BLOCK_ELEMENTS.
        qb = min(nb, max(256, int(math.sqrt(_BLOCK_ELEMENTS))))
        qa = min(na, max(1, _BLOCK_ELEMENTS // qb))
        ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
        a_sq = (ta * ta).sum(1)  # (Na,)
        b_sq = (tb * tb).sum(1)  # (Nb,)
    else:
        qa, qb = block_shape
        # b whole in padded blocks; a's blocks one at a time (review s63: a padded copy of every record of a site's
        # audit doubled the records' memory): each a fresh zero-padded (qa, D) buffer, as its slice of a whole
        # padded copy was, so every row's distances are the same bits
        ta, tb = None, _padded(b, qb).to(dev)
    rows_a = na if ta is not None else -(-na // qa) * qa
    best_a = torch.full((rows_a,), float("inf"), device=dev)
    arg_a = torch.zeros(rows_a, dtype=torch.long, device=dev)
    best_b = torch.full((len(tb),), float("inf"), device=dev) if both_ways else None
    arg_b = torch.zeros(len(tb), dtype=torch.long, device=dev) if both_ways else None
    with torch.no_grad():
        for i in range(0, rows_a, qa):
            blk_a = ta[i : i + qa] if ta is not None else _padded(a[i : i + qa], qa).to(dev)
            for j in range(0, len(tb), qb):
                if block_shape is None:
                    d2 = _sq_block(blk_a, a_sq[i : i + qa], tb[j : j + qb], b_sq[j : j + qb])  # (qa, qb)
                else:
                    # each block's norms on the block itself (one shape), then the padding masked out
                    blk_b = tb[j : j + qb]
                    d2 = _sq_block(blk_a, (blk_a * blk_a).sum(1), blk_b, (blk_b * blk_b).sum(1))
                    d2[max(0, na - i):, :] = float("inf")
                    d2[:, max(0, nb - j):] = float("inf")
                row_min, row_arg = d2.min(dim=1)
                better = row_min < best_a[i : i + qa]
                best_a[i : i + qa] = torch.where(better, row_min, best_a[i : i + qa])
                arg_a[i : i + qa] = torch.where(better, row_arg + j, arg_a[i : i + qa])
                if both_ways:
                    col_min, col_arg = d2.min(dim=0)
                    better_b = col_min < best_b[j : j + qb]
                    best_b[j : j + qb] = torch.where(better_b, col_min, best_b[j : j + qb])
                    arg_b[j : j + qb] = torch.where(better_b, col_arg + i, arg_b[j : j + qb])
    return arg_a[:na].cpu().numpy(), (arg_b[:nb].cpu().numpy() if both_ways else None)


def _padded(x: np.ndarray, rows: int) -> torch.Tensor:
    """A freshly allocated C-contiguous float32 copy of (N, D) ``x`` with zero rows up to a multiple of ``rows``."""
    out = torch.zeros((-(-len(x) // rows) * rows, x.shape[1]), dtype=torch.float32)
    out[: len(x)] = torch.from_numpy(x)
    return out


def distance_matrix(queries: np.ndarray, reference: np.ndarray, *, metric: Metric = "mse",
                    device: torch.device | str | None = None) -> np.ndarray:
    """(Nq, Nr) float64 distances between every query and every reference record (flattened), in float32
    arithmetic (for resampling nearest neighbours; :func:`nearest_neighbors` gives exact nearest distances)."""
    _check_metric(metric)
    q, r = _as_matrix(queries, "queries"), _as_matrix(reference, "reference")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    tq, tr = torch.from_numpy(q).to(dev), torch.from_numpy(r).to(dev)
    with torch.no_grad():
        d2 = _sq_block(tq, (tq * tq).sum(1), tr, (tr * tr).sum(1))  # (Nq, Nr)
    return _finish_distance(d2.cpu().numpy().astype(np.float64), q.shape[1], metric)


def nearest_in_matrix(queries: np.ndarray, reference: np.ndarray, matrix: np.ndarray, *,
                      metric: Metric = "mse") -> tuple[np.ndarray, np.ndarray]:
    """:func:`nearest_neighbors` read off a :func:`distance_matrix` of the same records: each query's nearest
    reference by the matrix, its distance recomputed exactly in float64. Returns (distances (Nq,), indices (Nq,))."""
    q, r = _as_matrix(queries, "queries"), _as_matrix(reference, "reference")
    idx = np.asarray(matrix).argmin(axis=1)
    return _finish_distance(_exact_sq(q, r, idx), q.shape[1], metric), idx


def nearest_neighbors(
    queries: np.ndarray,
    reference: np.ndarray,
    *,
    metric: Metric = "mse",
    device: torch.device | str | None = None,
    block_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query record to its nearest reference record, and that record's index.

    ``queries`` (Nq, ...) and ``reference`` (Nr, ...) are images (N, C, H, W) in [0, 1] or features
    (N, F); both are flattened. Returns ``(distances (Nq,) float64, indices (Nq,) int64)``.
    ``block_shape`` (queries, references per distance block): fixed, zero-padded blocks, so that a query's
    nearest reference does not depend on the other queries (a site's audit); None sizes blocks to the inputs.
    """
    _check_metric(metric)
    q, r = _as_matrix(queries, "queries"), _as_matrix(reference, "reference")
    if q.shape[1] != r.shape[1]:
        raise ValueError(
            f"queries have {q.shape[1]} values per record but the reference has {r.shape[1]}; "
            "both must be the same image shape (resize one set) or the same feature extractor"
        )
    idx, _ = _nn_search(q, r, both_ways=False, device=device, block_shape=block_shape)
    return _finish_distance(_exact_sq(q, r, idx), q.shape[1], metric), idx


def mutual_nearest_distances(
    a: np.ndarray,
    b: np.ndarray,
    *,
    metric: Metric = "mse",
    device: torch.device | str | None = None,
    block_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour distances in both directions from one pass over the a x b distance matrix.

    Returns ``(d_a (Na,), d_b (Nb,))``: d_a[i] = distance from a[i] to its nearest b; d_b[j] =
    distance from b[j] to its nearest a. ``block_shape``: as in :func:`nearest_neighbors` (padding never wins).
    """
    _check_metric(metric)
    am, bm = _as_matrix(a, "a"), _as_matrix(b, "b")
    if am.shape[1] != bm.shape[1]:
        raise ValueError(f"record sizes differ ({am.shape[1]} vs {bm.shape[1]}); use the same image shape")
    idx_a, idx_b = _nn_search(am, bm, both_ways=True, device=device, block_shape=block_shape)
    assert idx_b is not None
    dim = am.shape[1]
    return (
        _finish_distance(_exact_sq(am, bm, idx_a), dim, metric),
        _finish_distance(_exact_sq(bm, am, idx_b), dim, metric),
    )


def _subsample(n_total: int, n_keep: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted random indices of ``n_keep`` of ``n_total`` records (all of them when n_keep >= n_total)."""
    if n_keep >= n_total:
        return np.arange(n_total)
    return np.sort(rng.choice(n_total, size=n_keep, replace=False))
