"""``fedsynth replace-attribute``: a DP-GAN run's synthetic set with a sensitive attribute replaced (seed 004).

    # one generator for both attributes: the faces' label is the joint (gender, race)
    fedsynth simulate --data FACES --test FACES --set label-from=utkface-gender+race --set image-size=64 --out runs/faces
    # the synthetic set again, race drawn independently of everything else (the second attribute is the sensitive one)
    fedsynth replace-attribute runs/faces --out runs/faces-race-replaced
    # seed 004's measures: gender utility, and the privacy loss of race (an adversary trained on the set)
    fedsynth evaluate --synthetic runs/faces-race-replaced --test FACES --train FACES \\
        --label-from utkface-gender+race --resize

It reads what the run already released (the sites' generators of their last rounds and noisy class counts, saved as
``site_generators.pt`` by a DP-GAN run with ``gan-sample-from = sites``), so it costs no privacy: it is
post-processing, and the run's privacy statement carries over unchanged. The algorithm and its reasons are
in :mod:`server.attribute_replacement`; ``--strength`` below 1 replaces only that share of the records
(seed 004's privacy-utility trade-off).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from common.config import ConfigError, RunConfig
from common.data import LABEL_FROM_CLASSES, DataError, ImageDataset
from common.device import pick_device
from common.models import Generator
from server.attribute_replacement import sample_with_replaced_attribute
from server.synthesis import save_synthetic

# what a replaced set's report carries over from the run (its privacy and provenance)
_CARRIED = ("mode", "private", "epsilon_target", "delta_bound", "privacy_statement", "privacy", "experiment",
            "sites", "config")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a finished DP-GAN run's output folder (its --out)")
    p.add_argument("--out", required=True, type=Path, help="folder for the new synthetic set and its report.json")
    p.add_argument("--strength", type=float, default=1.0,
                   help="share of the records whose sensitive attribute is replaced (0 = the run's own sampling)")
    p.add_argument("--size", type=int, default=0, help="synthetic records (default: the run's synthetic-size)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the run's seed)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_inputs(run: Path) -> tuple[dict, RunConfig, tuple[str, ...], dict]:
    """The run's report, config, joint classes and saved site generators; a clear error for anything else."""
    report_path, sites_path = run / "report.json", run / "site_generators.pt"
    if not report_path.is_file():
        raise DataError(f"{run} holds no report.json: pass the --out folder of a finished fedsynth run")
    report = json.loads(report_path.read_text(encoding="utf-8"))
    cfg = RunConfig.from_mapping(report.get("config") or {})
    if cfg.mode != "dpgan":
        raise ConfigError(f"{run} is a {cfg.mode} run; replacing an attribute needs the DP-GAN mode's generators")
    classes = LABEL_FROM_CLASSES.get(cfg.label_from, ())
    if "+" not in cfg.label_from:
        raise ConfigError(f"{run} was labelled with {cfg.label_from or 'one label'!r}: its generator never learned "
                          "a second attribute to replace. Run it with a joint label whose second attribute is the "
                          "sensitive one, e.g. --set label-from=utkface-gender+race")
    if not sites_path.is_file():
        raise DataError(f"{run} holds no site_generators.pt (the sites' generators): run the DP-GAN mode with "
                        "gan-sample-from=sites (the default) and without secure aggregation")
    sites = torch.load(sites_path, weights_only=False)
    return report, cfg, classes, sites


def replaced_set(run: Path, strength: float, *, size: int = 0, seed: int | None = None,
                 device: torch.device | None = None, progress: bool = False) -> tuple[ImageDataset, dict, dict]:
    """The synthetic set of the DP-GAN run in ``run`` drawn again with its second attribute replaced for a
    ``strength`` share of the records (``size`` records, default the run's; ``seed`` default the run's): the
    set, what was done (for the report) and the run's report."""
    if not 0.0 <= strength <= 1.0:
        raise ConfigError(f"the replacement strength is the share of records replaced, in [0, 1]; got {strength}")
    report, cfg, classes, sites = _run_inputs(Path(run))
    second = cfg.label_from.split("+", 1)[1]
    values = len(LABEL_FROM_CLASSES[f"utkface-{second}"])
    # the image channels are the output channels of the generator's last convolution (the report has no
    # channel count); the side is the run's image-size
    channels = int(next(w for w in reversed(sites["generators"][0].values()) if w.ndim == 4).shape[0])
    if not cfg.image_size:
        raise ConfigError(f"{run}: the run's image-size is not recorded; replace-attribute needs a run with "
                          "image-size set (every UTKFace run sets it)")
    gen = Generator(cfg.gan_shape(channels, cfg.image_size, len(classes)))
    synth, info = sample_with_replaced_attribute(
        gen, sites["generators"], sites["census"], classes, size or cfg.synthetic_size, values=values,
        strength=strength, seed=cfg.seed if seed is None else seed, device=device or pick_device(),
        progress=progress)
    done = {"run": str(Path(run).resolve()), "sensitive": second, **asdict(info),
            "privacy_cost": "none: post-processing of the run's DP releases"}
    return synth, done, report


def main(args: argparse.Namespace) -> int:
    device = pick_device() if args.device == "auto" else torch.device(args.device)
    synth, done, report = replaced_set(Path(args.run), args.strength, size=args.size, seed=args.seed, device=device,
                                       progress=not args.quiet)
    out = Path(args.out)
    new = {k: report[k] for k in _CARRIED if k in report}
    new["synthetic"] = save_synthetic(synth, out)
    new["attribute_replacement"] = done
    (out / "report.json").write_text(json.dumps(new, indent=2), encoding="utf-8")
    print(f"{len(synth)} synthetic records in {out}: {done['sensitive']} replaced for {done['replaced']} of them "
          f"(strength {args.strength:g}; drawn from {done['marginal']}); the run's privacy statement carries over")
    return 0

