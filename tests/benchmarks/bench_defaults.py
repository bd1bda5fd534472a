"""The product's defaults on every dataset of ../shared/data: what a user gets without any --set.

    .venv/bin/python tests/benchmarks/bench_defaults.py                       # every dataset, epsilon 10
    .venv/bin/python tests/benchmarks/bench_defaults.py --datasets mnist --epsilons 1,10
    .venv/bin/python tests/benchmarks/bench_defaults.py --datasets fashion=/data/fashion-mnist   # any other data

Each point is `fedsynth simulate` (3 sites, Dirichlet 0.5, the default mode, no --set: every setting
left at 0 is chosen by server/defaults.py from the data's shape) followed by `fedsynth evaluate`
against the real test data, through the results-grid runner (tests/benchmarks/run_grid.py). The only
per-dataset values are what the data is (UTKFace's labels are in its file names, its faces are brought
to 64x64). Data in ../shared/data that the runner does not describe (a folder of MNIST IDX files, an npz,
an image-folder tree or its tar.gz, at the top or one folder down) is found and run the same way, named
after its file or folder (``run_grid.undescribed_datasets``): a dataset nobody tuned for needs no code.
Results: one JSON per run and ``table.md`` in tests/benchmarks/results/defaults/ (TSTR, MCC,
the same learner on real data, their ratio, wall time, ...); the table is printed at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_grid  # noqa: E402

RESULTS = run_grid.ROOT / "tests" / "benchmarks" / "results" / "defaults"
EVERY_DATASET = ("mnist", "pneumonia", "cifar10", "utkface")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="",
                   help=f"comma-separated names of run_grid.DATASETS or NAME=PATH entries (default: "
                        f"{', '.join(EVERY_DATASET)} and every dataset in --data-root that they do not describe)")
    p.add_argument("--data-root", type=Path, default=run_grid.DEFAULT_DATA_ROOT)
    p.add_argument("--epsilons", default="10")
    p.add_argument("--force", action="store_true", help="run again points whose JSON exists")
    p.add_argument("--resume", action="store_true", help="continue interrupted runs instead of starting them over")
    args = p.parse_args(argv)
    datasets = args.datasets or ",".join([*EVERY_DATASET, *run_grid.undescribed_datasets(args.data_root)])
    print(f"datasets: {datasets}", flush=True)
    code = run_grid.main(["--datasets", datasets, "--data-root", str(args.data_root), "--modes", "dpgan",
                          "--epsilons", args.epsilons, "--sites", "3", "--partitions", "dirichlet:0.5",
                          "--results", str(RESULTS),
                          "--out", str(run_grid.ROOT / "runs" / "defaults")] + (["--force"] if args.force else [])
                         + (["--resume"] if args.resume else []))
    print((RESULTS / "table.md").read_text())
    return code


if __name__ == "__main__":
    sys.exit(main())
