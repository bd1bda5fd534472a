"""Benchmark of the BN-statistics mode end to end, in one process (no Flower): TSTR accuracy vs epsilon.

Pipeline (what the Flower apps do, minus transport):
  1. split the training data over ``--sites`` sites (Dirichlet label skew, common.partition);
  2. per-site budget (epsilon, delta = default_delta(n_site)) split in two (see ``plan_budget``):
     the statistics release is calibrated alone to ``--stats-share * epsilon``; the federated DP-SGD
     noise is then calibrated so that the RDP composition of both is exactly within ``epsilon``;
  3. federated DP-SGD of the shared net: ``--rounds`` rounds of ``--local-steps`` Poisson steps per
     site, FedAvg weighted by site size;
  4. every site releases DP class-wise norm-input statistics; the coordinator pools them and
     synthesizes ``--num-per-class`` images per class;
  5. the unchanged central learner (common.learner) trains on the synthetic set; TSTR accuracy on the
     real test split, next to the same learner trained on the real pooled data (``--real-baseline``).

Writes tests/benchmarks/results/bnstats_<dataset>[_<tag>].json and prints a summary.

  .venv/bin/python tests/benchmarks/bench_bnstats.py                       # digits, eps=10
  .venv/bin/python tests/benchmarks/bench_bnstats.py --epsilon inf
  .venv/bin/python tests/benchmarks/bench_bnstats.py --data /work/shared/data/mnist --num-per-class 500
  # MNIST, recommended (head-norm net, per-layer clip bounds; see the report in the results JSON):
  .venv/bin/python tests/benchmarks/bench_bnstats.py --data /work/shared/data/mnist --head-norm 1 \
      --epsilon 10 --stats-share 0.3 --rounds 10 --local-steps 30 --batch-size 256 --dp-lr 0.5 \
      --layer-clips 0.9,3.6,5.2,85 --num-per-class 1000 --iterations 200 --syn-batch 250 --learner-epochs 20
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from client.bnstats import record_class_statistics, release_noise_std, release_num_bytes  # noqa: E402
from client.dpsgd import train_dpsgd_local  # noqa: E402
from common.accounting import DPEvent, calibrate_noise_multiplier, default_delta, epsilon_for  # noqa: E402
from common.bnnet import BNNet, load_net_file, net_file_payload, norm_layer_names  # noqa: E402
from common.data import ImageDataset, load_dataset  # noqa: E402
from common.learner import LearnerConfig, evaluate_learner, train_learner  # noqa: E402
from common.partition import partition_indices  # noqa: E402
from server.bnsynth import pool_statistics, release_center, synthesize  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="'digits' or a dataset path (e.g. /work/shared/data/mnist)")
    p.add_argument("--epsilon", type=float, default=10.0, help="per-site epsilon; 'inf' = non-private")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration")
    p.add_argument("--stats-share", type=float, default=0.3,
                   help="fraction of epsilon the statistics release is calibrated to on its own")
    p.add_argument("--center-frac", type=float, default=0.0,
                   help="share of the statistics budget (in 1/sigma^2) spent on a first, uncentred release "
                        "whose pooled class means centre the second release (0 = one release)")
    p.add_argument("--layer-clips", default="",
                   help="per-layer clip bounds 'c1,c2,...' in norm-layer order (per-layer clipping); "
                        "empty = flat clipping with --clip")
    p.add_argument("--center-clips", default="",
                   help="per-layer clip bounds of the centred second release (empty = --layer-clips / --clip)")
    p.add_argument("--layer-weights", default="", help="synthesis weight per norm layer 'w1,w2,...' (empty = all 1)")
    p.add_argument("--lr-schedule", default="constant")
    p.add_argument("--init-bias", type=float, default=0.0)
    p.add_argument("--width", type=int, default=16, help="BNNet width")
    p.add_argument("--head-norm", type=int, default=0,
                   help="1 = BNNet with a norm layer on the head input (recommended for MNIST)")
    p.add_argument("--train-only", action="store_true", help="stop after the federated training (with --save-net)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=3, help="DP-SGD steps per site per round")
    p.add_argument("--batch-size", type=int, default=128, help="expected Poisson batch size per site")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--dp-lr", type=float, default=0.5)
    p.add_argument("--clip", type=float, default=2.3, help="statistics clip bound C (total L2 per record)")
    p.add_argument("--count-weight", type=float, default=0.5)
    p.add_argument("--num-per-class", type=int, default=100)
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--syn-batch", type=int, default=200, help="images per synthesis batch (all classes)")
    p.add_argument("--syn-lr", type=float, default=0.1)
    p.add_argument("--w-stats", type=float, default=1.0)
    p.add_argument("--w-ce", type=float, default=1.0)
    p.add_argument("--w-tv", type=float, default=1.0)
    p.add_argument("--w-l2", type=float, default=0.0)
    p.add_argument("--jitter", type=int, default=0)
    p.add_argument("--learner-epochs", type=int, default=10)
    p.add_argument("--real-baseline", action="store_true", help="also train the learner on the real pooled data")
    p.add_argument("--train-limit", type=int, default=0, help="use only the first N training records (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tag", default="", help="suffix of the result file name")
    p.add_argument("--progress", action="store_true", help="show the synthesis progress bar")
    p.add_argument("--save-net", default="", help="save the federated shared net here (for tuning)")
    p.add_argument("--load-net", default="", help="skip federated training: load this net (its budget plan "
                   "must match the run's flags; for tuning synthesis only)")
    return p.parse_args(argv)


def plan_budget(eps: float, delta: float, sample_rate: float, steps: int, stats_share: float,
                center_frac: float = 0.0) -> dict:
    """Noise multipliers for one site: statistics first (share of eps alone), DP-SGD gets the rest.

    RDP composition is not additive in epsilon, so 'share' means: the statistics release(s) alone
    would cost stats_share * eps; the DP-SGD noise is then the smallest that keeps all together <= eps.
    With ``center_frac`` = f > 0 the statistics are two Gaussian releases (a centre, then the centred
    statistics) with sigma_center = sigma / sqrt(f) and sigma_stats = sigma / sqrt(1 - f): their RDP
    composition equals that of one release with sigma, so the split costs nothing extra.
    """
    if math.isinf(eps):
        return {"sigma_stats": 0.0, "sigma_center": 0.0, "sigma_train": 0.0, "epsilon_spent": math.inf}
    sigma = calibrate_noise_multiplier(stats_share * eps, delta, 1.0, 1)
    if center_frac > 0:
        sigma_center, sigma_stats = sigma / math.sqrt(center_frac), sigma / math.sqrt(1.0 - center_frac)
        stats_events = [DPEvent(sigma_center, 1.0, 1), DPEvent(sigma_stats, 1.0, 1)]
    else:
        sigma_center, sigma_stats = 0.0, sigma
        stats_events = [DPEvent(sigma_stats, 1.0, 1)]
    sigma_train = calibrate_noise_multiplier(eps, delta, sample_rate, steps, prior=tuple(stats_events))
    spent = epsilon_for([*stats_events, DPEvent(sigma_train, sample_rate, steps)], delta)
    return {"sigma_stats": sigma_stats, "sigma_center": sigma_center, "sigma_train": sigma_train,
            "epsilon_spent": spent, "epsilon_stats_alone": epsilon_for(stats_events, delta),
            "epsilon_train_alone": epsilon_for([DPEvent(sigma_train, sample_rate, steps)], delta)}


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state_dicts (weights = site sizes)."""
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    return {k: sum(wi * s[k].double() for wi, s in zip(w, states)).to(states[0][k].dtype) for k in states[0]}


def net_accuracy(net: torch.nn.Module, ds: ImageDataset) -> float:
    with torch.no_grad():
        pred = torch.cat([net(torch.as_tensor(ds.images[i:i + 1024])).argmax(1) for i in range(0, len(ds), 1024)])
    return float((pred.numpy() == ds.labels).mean())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    train = load_dataset(args.data, "train")
    test = load_dataset(args.data, "test")
    if args.train_limit:
        train = train.subset(np.arange(min(args.train_limit, len(train))))
    name = "digits" if args.data == "digits" else Path(args.data).name
    c, s, _ = train.image_shape
    k = train.num_classes
    shards = partition_indices(train.labels, args.sites, scheme="dirichlet", alpha=args.alpha, seed=args.seed)
    sites = [train.subset(idx) for idx in shards]
    steps_total = args.rounds * args.local_steps

    plans = []
    for ds in sites:
        q = min(1.0, args.batch_size / len(ds))
        delta = default_delta(len(ds))
        plans.append({"n": len(ds), "sample_rate": q, "delta": delta,
                      "class_counts": ds.class_counts().tolist(),
                      **plan_budget(args.epsilon, delta, q, steps_total, args.stats_share, args.center_frac)})

    # 3. federated DP-SGD of the shared net
    torch.manual_seed(args.seed)
    net = BNNet(c, k, s, args.width, head_norm=bool(args.head_norm)).to(dev)
    t0 = time.perf_counter()
    if args.load_net:
        net = load_net_file(args.load_net, net.shape)[0].to(dev)
    for rnd in range(0 if args.load_net else args.rounds):
        states, losses = [], []
        for i, (ds, plan) in enumerate(zip(sites, plans)):
            local = copy.deepcopy(net)
            m = train_dpsgd_local(local, ds, noise_multiplier=plan["sigma_train"], sample_rate=plan["sample_rate"],
                                  steps=args.local_steps, max_grad_norm=args.max_grad_norm, lr=args.dp_lr,
                                  device=dev, seed=args.seed * 1000 + rnd * 10 + i)
            states.append(local.state_dict())
            losses.append(m["loss_last"])
        net.load_state_dict(fedavg(states, [p["n"] for p in plans]))
        print(f"round {rnd + 1}/{args.rounds}: site losses {np.round(losses, 3).tolist()}, "
              f"shared-net test acc {net_accuracy(net, test):.4f}", flush=True)
    train_seconds = time.perf_counter() - t0
    net.eval()
    if args.save_net:
        torch.save(net_file_payload(net), args.save_net)
    if args.train_only:
        print(f"shared-net test acc {net_accuracy(net, test):.4f}; trained in {train_seconds:.0f} s; saved")
        return {}

    # 4. statistics release(s) and synthesis
    layers = norm_layer_names(net)

    def bounds(spec: str, default):
        if not spec:
            return default
        vals = [float(v) for v in spec.split(",")]
        if len(vals) != len(layers):
            raise SystemExit(f"need {len(layers)} per-layer values for {layers}, got {spec}")
        return dict(zip(layers, vals))

    clip = bounds(args.layer_clips, args.clip)
    center_clip = bounds(args.center_clips, clip)
    if math.isinf(args.epsilon):
        clip = center_clip = math.inf
    t0 = time.perf_counter()
    center = None
    if args.center_frac > 0 and not math.isinf(args.epsilon):
        first = [record_class_statistics(net, ds, clip_bound=clip, noise_multiplier=p["sigma_center"],
                                         seed=args.seed + 200 + i, device=dev, count_weight=args.count_weight)
                 for i, (ds, p) in enumerate(zip(sites, plans))]
        center = release_center(pool_statistics(first))
    releases = [record_class_statistics(net, ds, clip_bound=center_clip if center else clip,
                                        noise_multiplier=p["sigma_stats"], seed=args.seed + 100 + i, device=dev,
                                        count_weight=args.count_weight, center=center)
                for i, (ds, p) in enumerate(zip(sites, plans))]
    stats_seconds = time.perf_counter() - t0
    pooled = pool_statistics(releases)
    t0 = time.perf_counter()
    lw = bounds(args.layer_weights, None)
    syn = synthesize(net, pooled, args.num_per_class, iterations=args.iterations, batch_size=args.syn_batch,
                     lr=args.syn_lr, w_stats=args.w_stats, w_ce=args.w_ce, w_tv=args.w_tv, w_l2=args.w_l2,
                     seed=args.seed, device=dev, jitter=args.jitter, classes=train.classes,
                     progress=args.progress, layer_weights=lw, lr_schedule=args.lr_schedule,
                     init_bias=args.init_bias, threads=args.threads)
    synth_seconds = time.perf_counter() - t0

    # 5. the central learner on synthetic (and optionally real) data
    cfg = LearnerConfig(epochs=args.learner_epochs, seed=args.seed)
    t0 = time.perf_counter()
    learner = train_learner(syn, cfg, device=dev, progress=False)
    tstr = evaluate_learner(learner, test, device=dev)
    learner_seconds = time.perf_counter() - t0
    real = None
    if args.real_baseline:
        real = evaluate_learner(train_learner(train, cfg, device=dev, progress=False), test, device=dev)

    result = {
        "dataset": name, "epsilon": args.epsilon, "args": vars(args),
        "sites": [{k2: v for k2, v in p.items()} for p in plans],
        "budget_split": "stats release calibrated alone to stats_share*eps; DP-SGD calibrated so RDP(stats+SGD) <= eps",
        "release_noise_std": [release_noise_std(p["sigma_stats"], center_clip if center else clip,
                                                args.count_weight) for p in plans],
        "center_release_noise_std": [release_noise_std(p["sigma_center"], clip, args.count_weight)
                                     for p in plans] if center else None,
        "bytes_per_site_stats": release_num_bytes(net, k),
        "bytes_per_site_weights_per_round": int(sum(t.numel() * 4 for t in net.state_dict().values())),
        "shared_net_params": int(sum(p.numel() for p in net.parameters())),
        "shared_net_test_accuracy": net_accuracy(net, test),
        "shared_net_accuracy_on_synthetic": net_accuracy(net, syn),
        "num_synthetic": len(syn),
        "pooled_counts": pooled.counts.round(1).tolist(),
        "tstr_accuracy": tstr["accuracy"], "tstr_mcc": tstr["mcc"],
        "tstr_per_class_accuracy": tstr["per_class_accuracy"],
        "real_accuracy": real["accuracy"] if real else None,
        "seconds": {"federated_dpsgd": train_seconds, "stats_release": stats_seconds,
                    "synthesis": synth_seconds, "learner": learner_seconds},
        "synthesis_seconds_per_1000_images": 1000 * synth_seconds / len(syn),
    }
    out_dir = ROOT / "tests" / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    eps_tag = "inf" if math.isinf(args.epsilon) else f"{args.epsilon:g}"
    out = out_dir / f"bnstats_{name}_eps{eps_tag}{('_' + args.tag) if args.tag else ''}.json"
    out.write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k2: result[k2] for k2 in (
        "dataset", "epsilon", "tstr_accuracy", "real_accuracy", "shared_net_test_accuracy",
        "shared_net_accuracy_on_synthetic", "bytes_per_site_stats", "num_synthetic",
        "synthesis_seconds_per_1000_images", "seconds")}, indent=1, default=float))
    print("sigmas (stats, train) per site:", [(round(p["sigma_stats"], 3), round(p["sigma_train"], 3)) for p in plans])
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
