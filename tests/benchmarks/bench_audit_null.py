"""The feature-space memorization audit's null case on UTKFace 64x64: held-out faces in place of a synthetic set.

    .venv/bin/python tests/benchmarks/bench_audit_null.py

`fedsynth evaluate` audits a synthetic set in the feature space of the learner trained on it: distances of the
synthetic records to their nearest training vs held-out faces (equal-size references). Here the "synthetic set"
is half of the held-out faces (never seen by any generator), the learner is trained on it the same way, and the
other half is the held-out reference: whatever gap the audit reports is the method's own, not memorization.
Writes tests/benchmarks/results/audit_null.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

ARCHIVE = ROOT.parent / "shared" / "data" / "utkface" / "UTKFace-aligned-subset-every6th.tar.gz"


def main() -> int:
    import numpy as np
    import torch

    from common.audits import site_audit_summary
    from common.data import load_dataset
    from common.learner import LearnerConfig, extract_features, train_learner

    torch.set_num_threads(1)
    train = load_dataset(ARCHIVE, "train", label_from="utkface-gender", image_size=64, channels=3)
    test = load_dataset(ARCHIVE, "test", label_from="utkface-gender", image_size=64, channels=3)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(test))
    half = len(test) // 2
    stand_in, heldout = test.subset(order[:half]), test.subset(order[half:])  # (395,), (396,) faces
    model = train_learner(stand_in, LearnerConfig(), device="cpu", progress=False)
    reference = train.subset(rng.choice(len(train), 2000, replace=False))  # as evaluate subsamples training data
    feats = [extract_features(model, d.images, device="cpu") for d in (stand_in, reference, heldout)]
    audit = site_audit_summary(*feats, space="feature", metric="l2", max_records=2000, similarity=False, seed=0,
                               device="cpu")
    mem = audit["memorization"]
    out = {"stand_in": len(stand_in), "heldout": len(heldout), "train_mean": mem["train"]["mean"],
           "heldout_mean": mem["heldout"]["mean"], "flags": mem.get("flags", []),
           "membership_auc": audit["membership_inference"]["auc"]}
    print(f"held-out faces as the 'synthetic' set: mean nearest L2 to training {out['train_mean']:.3f} vs held-out "
          f"{out['heldout_mean']:.3f}; flags {out['flags']}; membership AUC {out['membership_auc']:.3f}")
    path = ROOT / "tests" / "benchmarks" / "results" / "audit_null.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
