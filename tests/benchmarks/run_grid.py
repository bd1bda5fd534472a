"""The results grid: run ``fedsynth simulate`` then ``fedsynth evaluate`` for every point of a grid.

For each (dataset, mode, epsilon, sites, partition) the runner
  1. runs ``fedsynth simulate`` as its own process with the product's defaults (or a named ablation,
     ``--recipe``, see ``RECIPES``), timing it and reading its peak memory (max RSS) from the kernel;
  2. runs ``fedsynth evaluate`` on the run's synthetic set against the real test data, with the real
     training data (the learner on real pooled data, the ratio, memorization and membership-inference
     audits). The real-data learner is trained once per dataset and learner setting and reused by the
     later evaluations (``--real-baseline-from``: same data and learner, checked);
  3. writes one JSON per run to ``--results`` and regenerates ``table.md`` from every JSON there, so
     grids run at different times add up to one table. Each run's sample grid is copied next to it.

Columns: TSTR accuracy and MCC (an MCC near 0 means the learner predicts one class, whatever the
accuracy), the same learner on real pooled data, their ratio, MIA AUC (pixel space; the
JSON also has feature space), near-copies, epsilon spent (worst site), wall time of the simulation,
bytes sent per site, peak memory, seconds per federated round.

  # the MNIST DP-GAN row of the README (the product's defaults, 3 sites, Dirichlet 0.5, epsilon 10):
  .venv/bin/python tests/benchmarks/run_grid.py --datasets mnist --modes dpgan --epsilons 10
  # the statistics mode with per-layer clip bounds read off MNIST (a labelled, tuned ablation):
  .venv/bin/python tests/benchmarks/run_grid.py --datasets mnist --modes bnstats --recipe bn28-tuned-mnist-clips
  # the whole grid of issue 6 (many hours on 2 cores):
  .venv/bin/python tests/benchmarks/run_grid.py --datasets mnist,pneumonia,cifar10,utkface \\
      --modes dpgan,bnstats --epsilons 1,10,inf --sites 3,10 --partitions iid,dirichlet:0.5
  # the scale run: 100 simulated sites, statistics mode (memory and time per round)
  .venv/bin/python tests/benchmarks/run_grid.py --datasets mnist --modes bnstats --epsilons 10 \\
      --sites 100 --partitions iid --set bn-rounds=2 --set bn-local-steps=5 --tag scale

Runs whose JSON already exists are skipped unless ``--force``; a failed run is recorded with its
error and the grid goes on. ``--update-readme`` rewrites README.md's results table from the JSONs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import re
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.config import ConfigError, RunConfig  # noqa: E402
from common.data import ARCHIVE_SUFFIXES, looks_like_dataset  # noqa: E402
from fedsynth.baseline import BASELINE_CHECKED_ON  # noqa: E402

DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"
DEFAULT_RESULTS = ROOT / "tests" / "benchmarks" / "results" / "grid"


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives (relative to the data root) and how to read it."""

    data: str  # path relative to --data-root, or "digits"
    label_from: str = ""  # utkface-gender for UTKFace's file-name labels
    image_size: int = 0  # 0 = keep the files' size
    settings: dict[str, Any] = field(default_factory=dict)  # run settings for every mode

    def path(self, data_root: Path) -> str:
        return self.data if self.data == "digits" else str(data_root / self.data)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("digits"),
    "mnist": DatasetSpec("mnist"),
    "pneumonia": DatasetSpec("medmnist/pneumoniamnist.npz"),
    "cifar10": DatasetSpec("cifar10/cifar10-jpg.tar.gz"),
    # what the data is, not a tuned setting: UTKFace's labels are in its file names, and its 200x200
    # faces are brought to a size the sites' 2-core machines can train on
    "utkface": DatasetSpec("utkface/UTKFace-aligned-subset-every6th.tar.gz", label_from="utkface-gender",
                           image_size=64),
    # the same faces with seed 000's other attributes as the label (its Table 1 on faces)
    "utkface-race": DatasetSpec("utkface/UTKFace-aligned-subset-every6th.tar.gz", label_from="utkface-race",
                                image_size=64),
    # gender and race as one joint label: one generator for both attributes (seed 000's Table 1 columns and
    # seed 004's replacement of race, tests/benchmarks/bench_faces.py)
    "utkface-gender+race": DatasetSpec("utkface/UTKFace-aligned-subset-every6th.tar.gz",
                                       label_from="utkface-gender+race", image_size=64),
    "utkface-age": DatasetSpec("utkface/UTKFace-aligned-subset-every6th.tar.gz", label_from="utkface-age",
                               image_size=64),
    # the faces at 32x32 (the earlier UTKFace rows)
    "utkface32": DatasetSpec("utkface/UTKFace-aligned-subset-every6th.tar.gz", label_from="utkface-gender",
                             image_size=32),
}

# A grid point without --recipe runs the PRODUCT'S DEFAULTS (pyproject.toml, with every setting left at 0
# chosen by server/defaults.py from the data's shape): that is what a user gets. A recipe is a named,
# labelled ablation; its name becomes the run's tag, so its rows never pass for the defaults. Recipes
# whose values were read off a dataset's own data or test accuracy say "tuned" in their name.
RECIPES: dict[str, dict[str, Any]] = {
    # the statistics mode on 28x28 with a head-norm net and per-layer clip bounds each site picks privately
    "bn28": {"bn-head-norm": True, "bn-layer-clips": "auto", "bn-synth-batch": 250},
    # ... with per-layer bounds read off MNIST's own block norms (median..99% quantiles of a DP-trained net):
    # tuned on the benchmark's data, the usual caveat of published numbers
    "bn28-tuned-mnist-clips": {"bn-head-norm": True, "bn-layer-clips": "0.9,3.6,5.2,85", "bn-synth-batch": 250},
    # ... at epsilon 1: half the budget for the statistics, a smaller DP-SGD step (tuned on MNIST's test accuracy)
    "bn28-tuned-mnist-eps1": {"bn-head-norm": True, "bn-layer-clips": "0.9,5.0,7.3,90", "bn-synth-batch": 250,
                              "bn-stats-share": 0.5, "bn-lr": 0.25},
}


def dataset_spec(entry: str) -> tuple[str, DatasetSpec]:
    """(name, spec) of one ``--datasets`` entry: a name of ``DATASETS``, or ``NAME=PATH`` for data nobody
    described here (PATH absolute or under ``--data-root``; read in its own format -- MNIST IDX folder,
    MedMNIST-style npz, image-folder tree or its tar.gz -- with the labels the loader finds, and no setting
    chosen for it: the product's defaults, as a user would run it)."""
    name, sep, path = (part.strip() for part in entry.partition("="))
    if not sep:
        if name not in DATASETS:
            raise SystemExit(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}, or give NAME=PATH for "
                             "any other data (an MNIST IDX folder, an npz, an image-folder tree or its tar.gz)")
        return name, DATASETS[name]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or not path:
        raise SystemExit(f"--datasets entry {entry!r}: expected NAME=PATH with a NAME of letters, digits, '.', '_' "
                         "or '-' (it names the runs and their files)")
    return name, DatasetSpec(path)


def undescribed_datasets(data_root: Path) -> list[str]:
    """``NAME=PATH`` entries for every dataset under ``data_root`` that ``DATASETS`` does not describe: a
    top-level data folder, or each npz / tar.gz one level down (``medmnist/bloodmnist.npz`` -> ``bloodmnist``).
    So data added to ../shared/data runs with the product's defaults without anyone writing a line for it."""
    known = {(data_root / spec.data).resolve() for spec in DATASETS.values() if spec.data != "digits"}
    found: list[Path] = []
    for entry in sorted(data_root.iterdir()) if data_root.is_dir() else []:
        files = sorted(f for f in entry.iterdir() if f.is_file() and looks_like_dataset(f)) if entry.is_dir() else []
        # a folder of datasets (medmnist/*.npz): no dataset itself, or npz / archive files beside its subfolders
        # (a cache, a docs folder) -- an image tree holds images, an IDX folder its IDX files, never an npz
        if entry.is_dir() and (files or not looks_like_dataset(entry)):
            found += files
        elif looks_like_dataset(entry):
            found.append(entry)
    out = []
    for path in found:
        if path.resolve() in known:
            continue
        stem = path.name
        for suffix in (".npz", *ARCHIVE_SUFFIXES):
            stem = stem[: -len(suffix)] if stem.lower().endswith(suffix) else stem
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "data"
        out.append(f"{name}={path}")
    return out


@dataclass(frozen=True)
class GridPoint:
    dataset: str
    mode: str
    epsilon: float
    sites: int
    partition: str
    spec: DatasetSpec | None = field(default=None, compare=False)  # None: DATASETS[dataset]

    @property
    def data_spec(self) -> DatasetSpec:
        return self.spec if self.spec is not None else DATASETS[self.dataset]

    @property
    def run_id(self) -> str:
        eps = "inf" if math.isinf(self.epsilon) else f"{self.epsilon:g}"
        part = self.partition.replace(":", "")
        return f"{self.dataset}-{self.mode}-eps{eps}-k{self.sites}-{part}"


def recipe_settings(point: GridPoint, extra: dict[str, str], recipe: str = "") -> dict[str, Any]:
    """Run settings of one grid point: the dataset's description, the named recipe (if any), then --set."""
    spec = point.data_spec
    settings: dict[str, Any] = dict(spec.settings)
    if recipe:
        if recipe not in RECIPES:
            raise SystemExit(f"unknown recipe {recipe!r}; choose from {sorted(RECIPES)}")
        settings.update(RECIPES[recipe])
    if spec.label_from:
        settings["label-from"] = spec.label_from
    if spec.image_size:
        settings["image-size"] = spec.image_size
    settings.update(extra)
    settings["real-baseline"] = False  # the evaluation measures it once per dataset (see module doc)
    settings["progress"] = False
    return settings


def _setting_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def run_measured(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` as a child process; its exit code, wall seconds and peak RSS (MiB, from wait4)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"exit_code": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024.0, 1), "log": str(log)}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _baseline_checkable(path: Path) -> bool:
    """Whether a cached real-data baseline records everything the evaluation checks it on (BASELINE_CHECKED_ON).
    A cache written before a check was added would be refused by every evaluation (and fail its grid point)."""
    try:
        evaluation = json.loads(path.read_text(encoding="utf-8")).get("evaluation") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return all(key in evaluation for key in BASELINE_CHECKED_ON)


def _run_stage(stage: str, cmd: list[str], run_dir: Path, report_path: Path, env: dict[str, str],
               record: dict[str, Any]) -> dict[str, Any] | None:
    """Run one CLI stage (its measurements go to ``record[stage]``); its report, or None after
    marking ``record`` failed with the exit code and the log's tail."""
    print(f"[{record['run_id']}] {stage} ...", flush=True)
    log = run_dir / f"{stage}.log"
    record[stage] = measured = run_measured(cmd, log, env)
    if measured["exit_code"] != 0 or not report_path.is_file():
        record.update(status="failed", error=f"{stage} exited {measured['exit_code']}:\n{_tail(log)}")
        return None
    return json.loads(report_path.read_text(encoding="utf-8"))


def run_point(point: GridPoint, *, out_root: Path, results: Path, data_root: Path, extra: dict[str, str],
              python: str, tag: str = "", recipe: str = "", resume: bool = False,
              evaluate_only: bool = False) -> dict[str, Any]:
    """Simulate + evaluate one grid point; returns (and writes) its result record. ``resume``: continue the
    point's interrupted simulation in its run dir (its sites' ledgers and the coordinator's checkpoint).
    ``evaluate_only``: the simulation finished (its report and its record's measurements exist); evaluate it."""
    spec = point.data_spec
    data = spec.path(data_root)
    settings = recipe_settings(point, extra, recipe)
    cfg = RunConfig.from_mapping(settings)  # refuse a bad recipe before running
    run_id = point.run_id + (f"-{tag}" if tag else "")
    run_dir = out_root / run_id
    resumed = resume and (run_dir / "sim" / "run.json").is_file()
    earlier = results / f"{run_id}.json"
    if evaluate_only and not ((run_dir / "sim" / "report.json").is_file() and earlier.is_file()):
        raise SystemExit(f"{run_id}: --evaluate-only needs a finished simulation ({run_dir / 'sim' / 'report.json'}) "
                         f"and its record ({earlier})")
    if run_dir.exists() and not resumed and not evaluate_only:
        shutil.rmtree(run_dir)  # a new run: the sites' ledgers of an earlier one would refuse the budget
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "FLWR_HOME": str(run_dir / "flwr_home"), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    sim_cmd = [python, "-m", "fedsynth.cli", "simulate", "--data", data, "--test", data,
               "--sites", str(point.sites), "--partition", point.partition, "--mode", point.mode,
               "--epsilon", "inf" if math.isinf(point.epsilon) else f"{point.epsilon:g}",
               "--out", str(run_dir / "sim"), "--quiet", "-v"]
    for key, value in settings.items():
        sim_cmd += ["--set", f"{key}={_setting_text(value)}"]
    record: dict[str, Any] = {
        "run_id": run_id, "tag": tag, "dataset": point.dataset, "mode": point.mode,
        "epsilon": None if math.isinf(point.epsilon) else point.epsilon, "private": math.isfinite(point.epsilon),
        "sites": point.sites, "partition": point.partition, "settings": settings, "recipe": recipe or "defaults",
        "resumed": resumed,  # True: the simulate stage's time and memory are those of the resumed part only
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "commands": {"simulate": " ".join(sim_cmd)},
    }
    if evaluate_only:  # the simulation's own measurements, from its record
        before = json.loads(earlier.read_text(encoding="utf-8"))
        record.update(simulate=before["simulate"], resumed=before.get("resumed", False))
        sim_report = json.loads((run_dir / "sim" / "report.json").read_text(encoding="utf-8"))
    else:
        sim_report = _run_stage("simulate", sim_cmd, run_dir, run_dir / "sim" / "report.json", env, record)
    if sim_report is None:
        return _write(record, results)

    learner = cfg.learner_config()
    baseline_cache = out_root / f"real-baseline-{point.dataset}-{learner.name}-e{learner.epochs}" \
                                f"-lr{learner.lr:g}-b{learner.batch_size}-s{learner.seed}.json"
    eval_cmd = [python, "-m", "fedsynth.cli", "evaluate", "--synthetic", str(run_dir / "sim"),
                "--test", data, "--train", data, "--out", str(run_dir / "eval"), "--quiet",
                "--learner", learner.name, "--learner-epochs", str(learner.epochs),
                "--learner-lr", f"{learner.lr:g}", "--learner-batch-size", str(learner.batch_size),
                "--seed", str(learner.seed), "--max-audit-records", "2000"]
    if spec.label_from:
        eval_cmd += ["--label-from", spec.label_from]
    if spec.image_size:  # the sites resized their images; the real data is resized the same way
        eval_cmd += ["--resize"]
    use_cache = baseline_cache.is_file() and _baseline_checkable(baseline_cache)
    if use_cache:
        eval_cmd += ["--real-baseline-from", str(baseline_cache)]
    elif baseline_cache.is_file():
        print(f"[{run_id}] {baseline_cache.name} does not record everything a baseline is checked on "
              "(written by an older fedsynth): the evaluation trains the baseline again and replaces it", flush=True)
    record["commands"]["evaluate"] = " ".join(eval_cmd)
    eval_report_path = run_dir / "eval" / "report.json"
    eval_report = _run_stage("evaluate", eval_cmd, run_dir, eval_report_path, env, record)
    if eval_report is None:
        return _write(record, results)
    if not use_cache and eval_report.get("real_baseline") is not None:
        shutil.copyfile(eval_report_path, baseline_cache)

    record.update(status="ok", **summarize(sim_report, eval_report))
    record["peak_rss_mib"] = max(record["simulate"]["peak_rss_mib"], record["evaluate"]["peak_rss_mib"])
    record["wall_seconds"] = record["simulate"]["seconds"]
    grid_png = run_dir / "sim" / "grids" / "grid_all.png"
    if grid_png.is_file():
        (results / "grids").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid_png, results / "grids" / f"{run_id}.png")
        record["sample_grid"] = f"grids/{run_id}.png"
    record["outputs"] = {"simulate": str(run_dir / "sim"), "evaluate": str(run_dir / "eval")}
    return _write(record, results)


def summarize(sim: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers from a simulation report and its evaluation report."""
    u = ev.get("utility", {})
    audits = ev.get("audits") or {}
    pixel, feature = audits.get("pixel") or {}, audits.get("feature") or {}
    sites = sim.get("sites", [])
    eps = [s["epsilon"] for s in sites if s.get("epsilon") is not None]
    round_seconds = [r["seconds"] for r in sim.get("rounds", []) if r.get("seconds") is not None]
    return {
        "tstr_accuracy": u.get("tstr_accuracy"),
        "tstr_mcc": u.get("mcc"),
        "real_accuracy": u.get("real_accuracy"),
        "ratio": u.get("ratio"),
        "per_class_accuracy": u.get("per_class_accuracy"),
        "mia_auc_pixel": (pixel.get("membership_inference") or {}).get("auc"),
        "mia_auc_pixel_ci95": (pixel.get("membership_inference") or {}).get("auc_ci95"),
        "mia_auc_feature": (feature.get("membership_inference") or {}).get("auc"),
        "near_copies_pixel": ((pixel.get("memorization") or {}).get("near_copies") or {}).get("count"),
        "near_copies_feature": ((feature.get("memorization") or {}).get("near_copies") or {}).get("count"),
        "memorization_flagged": bool((pixel.get("memorization") or {}).get("flagged"))
        or bool((feature.get("memorization") or {}).get("flagged")),
        "epsilon_spent_max": max(eps) if eps else None,
        "delta_max": max((s["delta"] for s in sites if s.get("delta") is not None), default=None),
        "bytes_per_site": (sum(s.get("bytes_sent", 0) for s in sites) / len(sites)) if sites else None,
        "sites_dropped": sum(1 for s in sites if s.get("dropped")),
        "round_seconds": round_seconds,
        "seconds_per_round": (sum(round_seconds) / len(round_seconds)) if round_seconds else None,
        "synthetic_count": (sim.get("synthetic") or {}).get("count"),
        "timings": sim.get("timings"),
        "federated_accuracy": (sim.get("site_evaluation") or {}).get("accuracy"),
    }


def _write(record: dict[str, Any], results: Path) -> dict[str, Any]:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{record['run_id']}.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    write_table(results)
    return record


# --------------------------------------------------------------------------------------------------
# the markdown table
# --------------------------------------------------------------------------------------------------

_MODE_ORDER = {"bnstats": 0, "dpgan": 1}


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "–"
    return "∞" if value in ("inf", math.inf) else format(value, spec)


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def load_records(results: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(results.glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "run_id" in rec:
            records.append(rec)
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """One markdown row per run, ordered by dataset, mode, epsilon (private first), sites, partition."""
    def key(r: dict[str, Any]) -> tuple:
        eps = r.get("epsilon")
        return (r["dataset"], _MODE_ORDER.get(r["mode"], 9), math.inf if eps is None else -eps,
                r["sites"], r["partition"], r["run_id"])

    head = ("| dataset | mode | ε per site | sites | partition | TSTR | TSTR MCC | real data | ratio | MIA AUC (pixel) "
            "| near-copies | ε spent | wall | bytes sent / site | peak memory | s / round |")
    columns = head.count("|") - 1
    lines = [head, "|" + "---|" * columns]
    for r in sorted(records, key=key):
        eps = "∞ (NOT private)" if r.get("epsilon") is None else f"{r['epsilon']:g}"
        dataset = r["dataset"] + (f" [{r['tag']}]" if r.get("tag") else "")
        if r.get("status") != "ok":
            first = (r.get("error") or "failed").splitlines()[0]
            lines.append(f"| {dataset} | {r['mode']} | {eps} | {r['sites']} | {r['partition']} "
                         f"| failed: {first} |" + " |" * (columns - 6))
            continue
        lines.append(
            f"| {dataset} | {r['mode']} | {eps} | {r['sites']} | {r['partition']} "
            f"| {_fmt(r.get('tstr_accuracy'))} | {_fmt(r.get('tstr_mcc'), '.2f')} | {_fmt(r.get('real_accuracy'))} "
            f"| {_fmt(r.get('ratio'), '.2f')} "
            f"| {_fmt(r.get('mia_auc_pixel'))} | {_fmt(r.get('near_copies_pixel'), 'd')} "
            f"| {_fmt(r.get('epsilon_spent_max'), '.2f')} | {_fmt(r.get('wall_seconds'), '.0f')} s"
            f"{' (resumed part)' if r.get('resumed') else ''} "
            f"| {_bytes(r.get('bytes_per_site'))} | {_fmt(r.get('peak_rss_mib'), '.0f')} MiB "
            f"| {_fmt(r.get('seconds_per_round'), '.1f')} |")
    return "\n".join(lines) + "\n"


def write_table(results: Path) -> Path:
    path = results / "table.md"
    path.write_text(format_table(load_records(results)), encoding="utf-8")
    return path


README_START = "<!-- results-table: tests/benchmarks/results/grid/table.md -->"
README_END = "<!-- end results-table -->"


def update_readme(readme: Path, table: str) -> None:
    """Replace the block between the README's results-table markers with ``table``."""
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no results-table markers ({README_START} ... {README_END})")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{table}{README_END}{tail}", encoding="utf-8")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [math.inf if t.strip().lower() in ("inf", "none") else float(t) for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="mnist",
                   help=f"comma-separated, from {sorted(DATASETS)}, or NAME=PATH for any other data")
    p.add_argument("--modes", default="bnstats,dpgan", help="comma-separated: dpgan, bnstats")
    p.add_argument("--epsilons", default="10", help="comma-separated per-site epsilons; inf = no DP")
    p.add_argument("--sites", default="3", help="comma-separated site counts")
    p.add_argument("--partitions", default="dirichlet:0.5", help="comma-separated: iid, dirichlet:ALPHA")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra run setting for every run (wins over the recipes)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder holding the datasets")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "grid", help="run outputs (large)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="per-run JSON, table.md, grids")
    p.add_argument("--recipe", default="", help=f"a named ablation from RECIPES {sorted(RECIPES)} (default: the "
                                                "product's defaults); it is also the runs' tag")
    p.add_argument("--tag", default="", help="suffix of the run ids (e.g. scale); default: the recipe's name")
    p.add_argument("--force", action="store_true", help="run again points whose JSON exists")
    p.add_argument("--resume", action="store_true", help="continue interrupted simulations in their run dirs "
                                                         "instead of starting them over")
    p.add_argument("--evaluate-only", action="store_true",
                   help="evaluate finished simulations again (e.g. after a failed evaluate stage); keeps their "
                        "simulate measurements")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs fedsynth")
    p.add_argument("--update-readme", action="store_true",
                   help="only rewrite README.md's results table from the JSONs in --results, run nothing")
    return p.parse_args(argv)


def grid_points(args: argparse.Namespace) -> list[GridPoint]:
    datasets = [dataset_spec(d) for d in args.datasets.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sites = [int(k) for k in args.sites.split(",") if k.strip()]
    partitions = [p.strip() for p in args.partitions.split(",") if p.strip()]
    return [GridPoint(name, *combo, spec=spec) for (name, spec), *combo
            in itertools.product(datasets, modes, _floats(args.epsilons), sites, partitions)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.update_readme:
        update_readme(ROOT / "README.md", format_table(load_records(args.results)))
        print(f"README.md results table rewritten from {args.results}")
        return 0
    extra: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        extra[key.strip()] = value.strip()
    points = grid_points(args)
    args.tag = args.tag or args.recipe
    for point in points:  # refuse a bad grid before hours of running
        spec = point.data_spec
        if spec.data != "digits" and not Path(spec.path(args.data_root)).exists():
            raise SystemExit(f"{point.dataset}: {spec.path(args.data_root)} does not exist; pass --data-root")
        try:
            RunConfig.from_mapping(recipe_settings(point, extra, args.recipe))
        except ConfigError as exc:
            raise SystemExit(f"{point.run_id}: {exc}") from exc
    failed = 0
    for i, point in enumerate(points, 1):
        run_id = point.run_id + (f"-{args.tag}" if args.tag else "")
        if (args.results / f"{run_id}.json").is_file() and not (args.force or args.evaluate_only):
            print(f"[{i}/{len(points)}] {run_id}: result exists, skipped (--force to rerun)")
            continue
        print(f"[{i}/{len(points)}] {run_id}", flush=True)
        rec = run_point(point, out_root=args.out, results=args.results, data_root=args.data_root, extra=extra,
                        python=args.python, tag=args.tag, recipe=args.recipe, resume=args.resume,
                        evaluate_only=args.evaluate_only)
        if rec["status"] == "ok":
            print(f"  TSTR {_fmt(rec['tstr_accuracy'])}  real {_fmt(rec['real_accuracy'])}  "
                  f"ratio {_fmt(rec['ratio'], '.2f')}  MIA AUC {_fmt(rec['mia_auc_pixel'])}  "
                  f"wall {rec['wall_seconds']:.0f} s  peak {rec['peak_rss_mib']:.0f} MiB", flush=True)
        else:
            failed += 1
            print(f"  FAILED: {rec['error']}", flush=True)
    print(f"table: {write_table(args.results)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
