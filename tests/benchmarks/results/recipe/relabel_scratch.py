"""Scratch (issue 13 probe, s65/teacher): a DP-GAN run's synthetic set as drawn, relabelled by a DP teacher
(teacher_scratch.py), or filtered by it (pool 2x, per class keep the images the teacher finds most likely to be of
their own label); the run's learner on each, scored on the test split and 5,000 training images.

usage: x.py RUN --teacher PREFIX.pt --data DATA --out OUT.json [--variants drawn,relabel,filter2]
"""

import argparse, json, sys, time
from pathlib import Path
sys.path.insert(0, "/work/main")
import numpy as np, torch
from common.learner import train_learner
from common.bnnet import BNNet
from common.data.dataset import ImageDataset
from server.synthesis import class_sizes, sample_site_generators
from tests.benchmarks.saved_run import run_config, run_generator, score, test_and_validation

p = argparse.ArgumentParser()
p.add_argument("run", type=Path); p.add_argument("--teacher"); p.add_argument("--width", type=int, default=16)
p.add_argument("--data", default=""); p.add_argument("--out"); p.add_argument("--threads", type=int, default=1)
p.add_argument("--variants", default="drawn,relabel,filter2")
a = p.parse_args()
torch.set_num_threads(a.threads)
cfg = run_config(a.run)
test, val = test_and_validation(cfg, a.data or cfg.test_data, 5000)
gen = run_generator(cfg, test)
sites = torch.load(a.run / "site_generators.pt", weights_only=False)
census = np.asarray(sites["census"], dtype=np.float64)
K = len(test.classes); C, S = test.images.shape[1], test.images.shape[2]
net = BNNet(C, K, S, a.width); net.load_state_dict(torch.load(a.teacher)); net.eval()

@torch.no_grad()
def teacher_probs(images):
    out = []
    for i in range(0, len(images), 1000):
        out.append(torch.softmax(net(torch.from_numpy(images[i:i+1000])), 1).numpy())
    return np.concatenate(out)

print("teacher on test", float((teacher_probs(test.images).argmax(1) == test.labels).mean()), flush=True)
size = cfg.synthetic_size
sizes = class_sizes(census, size, cfg.synthetic_class_mix)
res = {}
def draw(n, seed):
    return sample_site_generators(gen, sites["generators"], census, test.classes, int(sizes.sum() * n), seed=seed,
                                  device=torch.device("cpu"), progress=False, sizes=np.round(sizes * n).astype(int))[0]
base = draw(1, cfg.seed)
pr = teacher_probs(base.images)
print("teacher agrees with G's label on", float((pr.argmax(1) == base.labels).mean()), flush=True)
for v in a.variants.split(","):
    t0 = time.time()
    if v == "drawn":
        ds = base
    elif v == "relabel":
        ds = ImageDataset(base.images, pr.argmax(1).astype(np.int64), base.classes, "relabel")
    elif v.startswith("filter"):
        m = float(v[6:])
        pool = draw(m, cfg.seed + 1)
        pp = teacher_probs(pool.images)
        keep = []
        for c in range(K):
            idx = np.flatnonzero(pool.labels == c)
            order = idx[np.argsort(-pp[idx, c])]
            keep.append(order[:int(sizes[c])])
        keep = np.concatenate(keep)
        ds = ImageDataset(pool.images[keep], pool.labels[keep], pool.classes, "filter")
    elif v == "both":
        ds = ImageDataset(base.images, pr.argmax(1).astype(np.int64), base.classes, "relabel")
    model = train_learner(ds, cfg.learner_config(), device=torch.device("cpu"), progress=False)
    res[v] = score(model, val, test); res[v]["seconds"] = time.time() - t0
    print(v, res[v], flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
