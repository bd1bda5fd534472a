"""How long `fedsynth demo` takes (the README's first command), and what it reaches.

    .venv/bin/python tests/benchmarks/bench_demo.py            # the default demo, as `make demo` runs it
    .venv/bin/python tests/benchmarks/bench_demo.py --mode dpgan

Runs the demo as a child process exactly as a user would (``python -m fedsynth.cli demo``), measures its
wall time and CPU time (CPU time shows how much of the machine it got when the box is shared), reads
the demo's summary, prints one line and writes ``tests/benchmarks/results/demo.json`` (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default=None, help="demo mode (default: the demo's own)")
    p.add_argument("--json", type=Path, default=ROOT / "tests" / "benchmarks" / "results" / "demo.json")
    args = p.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="bench_demo_"))
    cmd = [sys.executable, "-m", "fedsynth.cli", "demo", "--out", str(out), "--quiet"]
    if args.mode:
        cmd += ["--mode", args.mode]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONPATH": str(ROOT)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
        return proc.returncode
    summary = json.loads((out / "demo_summary.json").read_text())
    record = {
        "command": " ".join(cmd), "wall_seconds": wall,
        "cpu_seconds": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "cpus": os.cpu_count(), "load_average_before": os.getloadavg(), "machine": platform.platform(),
        "mode": summary["mode"], "tstr_private": summary["tstr_private"], "tstr_not_private": summary["tstr_not_private"],
        "real_accuracy": summary["real_accuracy"], "epsilon": summary["epsilon"],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=2))
    print(f"demo ({record['mode']}): {wall:.1f} s wall, {record['cpu_seconds']:.1f} s CPU on {os.cpu_count()} cores; "
          f"TSTR {record['tstr_private']:.3f} at epsilon {record['epsilon']:g}, {record['tstr_not_private']:.3f} "
          f"without DP, real {record['real_accuracy']:.3f} -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
