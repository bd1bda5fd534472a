"""Does filtering the synthetic set with a cross-fit classifier raise TSTR? (issue 13 probe, s56/filter)

usage: x.py NAME RUN DATA VARIANTS   e.g.  x.py cifar-g2a /work/exp/s49/.../sim /work/exp/s49/data/c.npz 0,1,2
 0: the product's default draw (mixture of each site's last 3 rounds), the run's size and class mix
 1: pool 3x, cross-fit halves A/B (learner on A scores B and vice versa), per class keep the highest p(own label)
 2: pool 1.5x, same cross-fit, drop the lowest-p third per class
 r: control, a random per-class subset of variant 1's pool (another draw of the same generators, no filter)
Writes /work/exp/s56/filter/results.json (merged, after every variant).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from common.data import ImageDataset  # noqa: E402
from common.learner import _batched, train_learner  # noqa: E402
from server.synthesis import class_sizes, sample_site_generators  # noqa: E402
from tests.benchmarks.saved_run import run_config, run_generator, score, test_and_validation  # noqa: E402

OUT = Path("/work/exp/s56/filter/results.json")
CPU = torch.device("cpu")


def save(name: str, key: str, row: dict) -> None:
    allr = json.loads(OUT.read_text()) if OUT.exists() else {}
    allr.setdefault(name, {})[key] = row
    OUT.write_text(json.dumps(allr, indent=2))


def probs(model, images: np.ndarray) -> np.ndarray:
    out = _batched(lambda m, x: torch.softmax(m(x), dim=1), model, images, CPU, 1024)
    return np.concatenate(out)


def subset(ds: ImageDataset, idx: np.ndarray) -> ImageDataset:
    return ImageDataset(images=ds.images[idx], labels=ds.labels[idx], classes=ds.classes, source="synthetic")


def crossfit_filter(pool: ImageDataset, sizes: np.ndarray, lcfg, seed: int) -> tuple[np.ndarray, dict]:
    """Indices into pool: per class the sizes[c] images with the highest cross-fit p(own label)."""
    rng = np.random.default_rng(seed + 7)
    k = len(sizes)
    half = np.zeros(len(pool), dtype=bool)  # stratified random halves
    for c in range(k):
        idx = rng.permutation(np.flatnonzero(pool.labels == c))
        half[idx[: len(idx) // 2]] = True
    p_own = np.zeros(len(pool))
    info = {}
    for name, train_mask in (("A", half), ("B", ~half)):
        t0 = time.perf_counter()
        m = train_learner(subset(pool, np.flatnonzero(train_mask)), lcfg, device=CPU, progress=False)
        other = np.flatnonzero(~train_mask)
        p = probs(m, pool.images[other])
        p_own[other] = p[np.arange(len(other)), pool.labels[other]]
        info[f"scorer_{name}_agree_on_other_half"] = round(float((p.argmax(1) == pool.labels[other]).mean()), 4)
        info[f"scorer_{name}_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  scorer {name}: {info[f'scorer_{name}_agree_on_other_half']} argmax agreement, "
              f"{info[f'scorer_{name}_seconds']} s", flush=True)
    keep = []
    thr = []
    for c in range(k):
        idx = np.flatnonzero(pool.labels == c)
        order = idx[np.argsort(-p_own[idx], kind="stable")]
        keep.append(order[: int(sizes[c])])
        thr.append(round(float(p_own[order[int(sizes[c]) - 1]]), 3) if sizes[c] > 0 else None)
    info["p_own_mean_pool"] = round(float(p_own.mean()), 4)
    keep = np.concatenate(keep)
    info["p_own_mean_kept"] = round(float(p_own[keep].mean()), 4)
    info["p_own_threshold_per_class"] = thr
    return keep, info


def main() -> None:
    name, run, data, variants = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4].split(",")
    cfg = run_config(run)
    saved = torch.load(run / "site_generators.pt", weights_only=False)
    states, comp_census = saved["generators"], np.asarray(saved["census"])
    site_census = np.asarray(saved.get("site_census", saved["census"]))
    test, val = test_and_validation(cfg, data, 5000)
    gen = run_generator(cfg, test)
    lcfg = cfg.learner_config()
    total = cfg.synthetic_size
    sizes = class_sizes(site_census, total, cfg.synthetic_class_mix)
    report = json.loads((run / "report.json").read_text())["utility"]
    save(name, "run", {"path": str(run), "data": data, "reported_test_accuracy": report["tstr_accuracy"],
                       "reported_test_mcc": round(report["mcc"], 3), "sizes": sizes.tolist(),
                       "combine": saved.get("combine"), "components": len(states)})
    for v in variants:
        t0 = time.perf_counter()
        extra = {}
        if v == "0":
            synth, _ = sample_site_generators(gen, states, comp_census, test.classes, total, seed=cfg.seed,
                                              device=CPU, progress=False, sizes=sizes)
            key = "v0_baseline"
        elif v == "r":  # control: a random per-class subset of variant 1's 3x pool (a second draw, no filter)
            psizes = np.round(sizes * 3.0).astype(np.int64)
            pool, _ = sample_site_generators(gen, states, comp_census, test.classes, int(psizes.sum()),
                                             seed=cfg.seed, device=CPU, progress=False, sizes=psizes)
            rng = np.random.default_rng(cfg.seed + 11)
            keep = np.concatenate([rng.permutation(np.flatnonzero(pool.labels == c))[:int(sizes[c])]
                                   for c in range(len(sizes))])
            synth = subset(pool, keep)
            key = "r_pool3x_random_subset"
        else:
            factor = {"1": 3.0, "2": 1.5}[v]
            psizes = np.round(sizes * factor).astype(np.int64)
            pool, _ = sample_site_generators(gen, states, comp_census, test.classes, int(psizes.sum()),
                                             seed=cfg.seed, device=CPU, progress=False, sizes=psizes)
            keep, extra = crossfit_filter(pool, sizes, lcfg, cfg.seed)
            synth = subset(pool, keep)
            key = {"1": "v1_pool3x_keep_top", "2": "v2_pool1.5x_drop_worst_third"}[v]
            extra["pool"] = int(len(pool))
        assert len(synth) == total and (np.bincount(synth.labels, minlength=len(sizes)) == sizes).all()
        t1 = time.perf_counter()
        model = train_learner(synth, lcfg, device=CPU, progress=False)
        r = {**score(model, val, test), **extra, "final_train_seconds": round(time.perf_counter() - t1, 1),
             "seconds": round(time.perf_counter() - t0, 1)}
        save(name, key, r)
        print(f"{name} {key}: val {r['val_accuracy']:.4f} (MCC {r['val_mcc']:.3f})  test {r['test_accuracy']:.4f} "
              f"(MCC {r['test_mcc']:.3f})  {r['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
