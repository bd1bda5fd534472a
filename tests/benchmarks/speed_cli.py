"""The command line and the machine record the layout/form speed benchmarks share (bench_*_speed.py)."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def speed_args(doc: str, argv: list[str] | None, *, batch: int, repeats: int, steps_help: str, shapes: list[str],
               out_name: str) -> argparse.Namespace:
    """Parse --threads --batch --repeats --steps --shapes --out, and set torch's thread count from --threads."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--steps", type=int, default=20, help=steps_help)
    p.add_argument("--shapes", default=",".join(shapes))
    p.add_argument("--out", type=Path, default=RESULTS / out_name)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def machine(threads: int) -> dict:
    """What the numbers were measured on."""
    return {"cpu": platform.processor() or platform.machine(), "threads": threads, "torch": torch.__version__}


def write_result(path: Path, result: dict) -> dict:
    """Write the benchmark's JSON to ``path`` and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result
