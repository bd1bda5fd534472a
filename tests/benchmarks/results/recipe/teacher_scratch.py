"""Scratch (issue 13 probe, s65/teacher): a classifier trained by federated DP-SGD as a teacher -- how good is it?

usage: x.py --data DATA --eps E --out PREFIX [--rounds 10 --steps 60 --batch 256 --width 16 --lr 0.5]
FedAvg of 3 Dirichlet-0.5 sites (seed 0, the simulation's split), each site DP-SGD on its records with the product's
client.dpsgd.train_dpsgd_local and a noise multiplier calibrated to E (delta 1e-5); the statistics mode's BNNet.
Prints the test accuracy after every round; writes PREFIX.json and PREFIX.pt (the net). Run from /work/exp/s65.
"""

import argparse, json, sys, time, copy
sys.path.insert(0, "/work/main")
import numpy as np, torch
from common.data import load_dataset
from common.data.dataset import ImageDataset
from common.partition import partition_indices
from common.accounting import calibrate_noise_multiplier, DPEvent
from common.bnnet import BNNet
from client.dpsgd import train_dpsgd_local
from common.learner import evaluate_learner

@torch.no_grad()
def accuracy(net, test):
    net.eval(); pred = []
    for i in range(0, len(test), 1000):
        pred.append(net(torch.from_numpy(test.images[i:i+1000])).argmax(1).numpy())
    net.train(); return float((np.concatenate(pred) == test.labels).mean())

p = argparse.ArgumentParser()
p.add_argument("--data"); p.add_argument("--eps", type=float, default=5); p.add_argument("--rounds", type=int, default=10)
p.add_argument("--steps", type=int, default=60); p.add_argument("--batch", type=int, default=256)
p.add_argument("--width", type=int, default=16); p.add_argument("--lr", type=float, default=0.5)
p.add_argument("--out"); p.add_argument("--threads", type=int, default=1)
a = p.parse_args()
torch.set_num_threads(a.threads); torch.manual_seed(0)
train = load_dataset(a.data, "train"); test = load_dataset(a.data, "test")
parts = partition_indices(train.labels, 3, "dirichlet", 0.5, seed=0)
C, S = train.images.shape[1], train.images.shape[2]
net = BNNet(C, len(train.classes), S, a.width)
sites = []
for idx in parts:
    d = ImageDataset(train.images[idx], train.labels[idx], train.classes, "site")
    n = len(idx); q = min(1.0, a.batch / n); T = a.rounds * a.steps
    sigma = calibrate_noise_multiplier(a.eps, 1e-5, q, T)
    sites.append((d, n, q, sigma)); print("site", n, "q", round(q, 4), "sigma", round(sigma, 3), flush=True)
t0 = time.time(); hist = []
for r in range(a.rounds):
    states, w = [], []
    for d, n, q, sigma in sites:
        m = copy.deepcopy(net)
        train_dpsgd_local(m, d, noise_multiplier=sigma, sample_rate=q, steps=a.steps, max_grad_norm=1.0, lr=a.lr, seed=r)
        states.append(m.state_dict()); w.append(n)
    w = np.array(w) / sum(w)
    avg = {k: sum(wi * s[k].float() for wi, s in zip(w, states)) for k in states[0]}
    net.load_state_dict(avg)
    acc = accuracy(net, test); hist.append(acc)
    print(f"round {r+1} acc {acc:.4f} t {time.time()-t0:.0f}s", flush=True)
res = dict(vars(a), acc=hist, seconds=time.time() - t0, sigmas=[s[3] for s in sites])
json.dump(res, open(a.out + ".json", "w"), indent=1); torch.save(net.state_dict(), a.out + ".pt")
