"""Scratch (issue 13, s68): the sites' discriminators' class heads (DP-SGD outputs, free to send) as a teacher.
Scores each site's D head and their combinations on the test split, then filters / relabels the run's synthetic set
with the combination and trains the run's learner on it.

usage: dhead.py RUN --data DATA --out OUT.json [--variants drawn,filter2,relabel]
"""
import argparse, json, sys, time
from pathlib import Path
sys.path.insert(0, "/work/main")
import numpy as np, torch
from common.learner import train_learner
from common.data.dataset import ImageDataset
from common.models import Discriminator
from server.synthesis import class_sizes, sample_site_generators
from tests.benchmarks.saved_run import run_config, run_generator, score, test_and_validation

p = argparse.ArgumentParser()
p.add_argument("run", type=Path); p.add_argument("--data", default=""); p.add_argument("--out")
p.add_argument("--threads", type=int, default=1); p.add_argument("--variants", default="drawn,filter2,relabel")
p.add_argument("--combine", default="logprior")
a = p.parse_args()
torch.set_num_threads(a.threads)
cfg = run_config(a.run)
test, val = test_and_validation(cfg, a.data or cfg.test_data, 5000)
K = len(test.classes); C, S = test.images.shape[1], test.images.shape[2]
shape = cfg.gan_shape(C, S, K)
files = {}
for f in sorted((a.run / "sites").rglob("gan-round-*.pt")):
    rnd = int(f.stem.split("-")[-1])
    if f.parent not in files or rnd > files[f.parent][0]:
        files[f.parent] = (rnd, f)
heads = []
for folder, (rnd, f) in sorted(files.items()):
    saved = torch.load(f, weights_only=True)
    d = Discriminator(shape, width=cfg.gan_d_width)
    state = saved["d_state"]["disc"]
    state = {k.replace("_module.", ""): v for k, v in state.items()}
    d.load_state_dict(state); d.eval(); heads.append(d)
    print("site", folder, "round", rnd, flush=True)

@torch.no_grad()
def adv_score(images, labels):  # mean over sites of D's realness logit for (x, y), z-scored per site
    out = []
    for d in heads:
        a_ = []
        for i in range(0, len(images), 1000):
            x = torch.from_numpy(images[i:i + 1000]) * 2 - 1; y = torch.from_numpy(labels[i:i + 1000]).long()
            a_.append(d(x, y)[0].reshape(-1).numpy())
        a_ = np.concatenate(a_); out.append((a_ - a_.mean()) / (a_.std() + 1e-9))
    return np.mean(out, 0)

@torch.no_grad()
def head_logp(d, images):  # (N, K) log-softmax of D's class head
    out = []
    for i in range(0, len(images), 1000):
        x = torch.from_numpy(images[i:i + 1000]) * 2 - 1
        _, cls = d(x, torch.zeros(len(x), dtype=torch.long))
        out.append(torch.log_softmax(cls, 1).numpy())
    return np.concatenate(out)

sites = torch.load(a.run / "site_generators.pt", weights_only=False)
census = np.asarray(sites["census"], dtype=np.float64)  # (components, K) noisy counts, for drawing
names = list(sites["sites"])
site_census = np.asarray(sites["site_census"], dtype=np.float64)
order = [next(i for i, n in enumerate(names) if n in str(folder)) for folder in files]
site_census = site_census[order]  # rows in the order of the heads
print("names", names, "order", order, "census", site_census.round(), flush=True)
# which census row is which D: match by head prior (argmax agreement of mean prob with census share)
def combine(images, how):
    lps = [head_logp(d, images) for d in heads]
    if how == "mean":
        return np.log(np.mean([np.exp(lp) for lp in lps], 0) + 1e-12)
    # logprior: each head's log p_s(c|x) - log pi_s(c), weighted per class by the site's share of class c
    pri = np.clip(site_census, 1, None); pri = pri / pri.sum(1, keepdims=True)
    w = np.clip(site_census, 0, None); w = w / np.clip(w.sum(0, keepdims=True), 1, None)  # (sites, K)
    return sum(w[s] * (lps[s] - np.log(pri[s])) for s in range(len(lps)))

res = {"sites": [str(k) for k in files]}
for s, d in enumerate(heads):
    acc = float((head_logp(d, test.images).argmax(1) == test.labels).mean()); res[f"site{s}_test"] = acc
    print("site", s, "head test acc", acc, flush=True)
for how in ("mean", "logprior"):
    acc = float((combine(test.images, how).argmax(1) == test.labels).mean()); res[f"{how}_test"] = acc
    print(how, "combined head test acc", acc, flush=True)
json.dump(res, open(a.out, "w"), indent=1)
gen = run_generator(cfg, test)
size = cfg.synthetic_size
sizes = class_sizes(census, size, cfg.synthetic_class_mix)
def draw(n, seed):
    return sample_site_generators(gen, sites["generators"], census, test.classes, int(sizes.sum() * n), seed=seed,
                                  device=torch.device("cpu"), progress=False, sizes=np.round(sizes * n).astype(int))[0]
base = draw(1, cfg.seed)
pr = combine(base.images, a.combine)
res["agree_with_G"] = float((pr.argmax(1) == base.labels).mean()); print("agree", res["agree_with_G"], flush=True)
relabelled = ImageDataset(base.images, pr.argmax(1).astype(np.int64), base.classes, "relabel")
for v in a.variants.split(","):
    t0 = time.time()
    if v in ("drawn", "relabel"):  # (the set as drawn, or with the heads' labels)
        ds = base if v == "drawn" else relabelled
    elif v.startswith("agree"):  # per class: pool images the heads label as G did, in draw order; then the likeliest
        m = float(v[5:]); pool = draw(m, cfg.seed + 1); pp = combine(pool.images, a.combine)
        keep = []
        for c in range(K):
            idx = np.flatnonzero(pool.labels == c)
            ok = idx[pp[idx].argmax(1) == c]; rest = idx[pp[idx].argmax(1) != c]
            rest = rest[np.argsort(-pp[rest, c])]
            keep.append(np.concatenate([ok, rest])[:int(sizes[c])])
            print("class", c, "agreeing", len(ok), "of", len(idx), "needed", int(sizes[c]))
        keep = np.concatenate(keep)
        ds = ImageDataset(pool.images[keep], pool.labels[keep], pool.classes, "agree")
    elif v.startswith("drs"):
        m = float(v[3:]); pool = draw(m, cfg.seed + 1); sc = adv_score(pool.images, pool.labels)
        keep = np.concatenate([np.flatnonzero(pool.labels == c)[np.argsort(-sc[pool.labels == c])][:int(sizes[c])]
                               for c in range(K)])
        ds = ImageDataset(pool.images[keep], pool.labels[keep], pool.classes, "drs")
    elif v.startswith("filter"):
        m = float(v[6:]); pool = draw(m, cfg.seed + 1); pp = combine(pool.images, a.combine)
        keep = np.concatenate([np.flatnonzero(pool.labels == c)[np.argsort(-pp[pool.labels == c, c])][:int(sizes[c])]
                               for c in range(K)])
        ds = ImageDataset(pool.images[keep], pool.labels[keep], pool.classes, "filter")
    model = train_learner(ds, cfg.learner_config(), device=torch.device("cpu"), progress=False)
    res[v] = score(model, val, test); res[v]["seconds"] = round(time.time() - t0)
    print(v, res[v], flush=True)
    json.dump(res, open(a.out, "w"), indent=1)
