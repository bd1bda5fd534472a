"""DP-GAN mode at the coordinator: federated generator rounds, then sampling of the synthetic set.

Each round sends the global generator to every site (``train.gan``); a site trains its own DP
discriminator against it and returns only the generator and its per-run noisy class histogram (and, with
``gan-average-d``, off by default, the discriminator, whose average the next round's sites start from). At the
end (``server.synthesis``) class c is drawn from each site's generators in proportion to the site's noisy
count of c (``gan-sample-from = sites``) -- by default the generators it returned in its last
``gan-sample-rounds`` rounds, each drawing an equal part of the site's share (``gan-sample-combine =
mixture``; ``average``: their weights averaged first) -- or from the averaged generator (``average``); all
of it is post-processing of DP releases.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from common.data import ImageDataset, joint_attribute_values
from common.models import Discriminator, GanShape, Generator
from server.attribute_replacement import sample_with_replaced_attribute
from server.fedavg import FedAvgTask, run_fedavg_rounds, weighted_average
from server.run_state import RunState
from server.sites import RunFailed, Schema, SiteRecord
from server.synthesis import class_mix_note, class_sizes, sample_generator, sample_site_generators


def shares_d(cfg: RunConfig) -> bool:
    """Whether the run averages the sites' discriminators (gan-average-d); never under secure aggregation, whose
    one secure sum per round carries the generator alone."""
    return cfg.gan_average_d and not cfg.secure_aggregation


def gan_request(cfg: RunConfig, shape: GanShape, experiment: str, rnd: int,
                generator: dict[str, np.ndarray], discriminator: dict[str, np.ndarray] | None = None
                ) -> P.GanTrainRequest:
    return P.GanTrainRequest(
        experiment=experiment, server_round=rnd, num_rounds=cfg.num_rounds, local_steps=cfg.gan_local_steps,
        batch_size=cfg.gan_batch_size, max_grad_norm=cfg.gan_max_grad_norm, lr_d=cfg.gan_lr_d, lr_g=cfg.gan_lr_g,
        d_width=cfg.gan_d_width, ac_weight=cfg.gan_ac_weight, mode_seeking=cfg.gan_mode_seeking,
        class_histogram=cfg.gan_class_histogram, epsilon=cfg.epsilon, seed=cfg.seed, channels=shape.channels,
        image_size=shape.image_size, num_classes=shape.num_classes, latent_dim=shape.latent_dim, width=shape.width,
        resolution=shape.resolution,
        generator=generator, sensitive_attribute=cfg.sensitive_attribute, g_steps=cfg.gan_g_steps, ema=cfg.gan_ema,
        d_steps=cfg.gan_d_steps, augment=cfg.gan_augment,
        long_steps=cfg.gan_long_local_steps, long_g_steps=cfg.gan_long_g_steps,
        share_d=shares_d(cfg), discriminator=discriminator or {})


def _reply_check(num_classes: int, d_spec: dict[str, P.ArraySpec] | None):
    """Problems of a reply's census and, when the run averages discriminators (``d_spec``), of its D."""
    def check(reply: P.GanTrainReply) -> list[str]:
        problems = P.check_arrays(reply.census, {"counts": P.ArraySpec((num_classes,), "float32")})
        if d_spec is not None:
            problems += P.check_arrays(reply.discriminator, d_spec)
        elif reply.discriminator:
            problems.append("a discriminator the request did not ask for")
        return problems
    return check


def _census(last: dict, nodes: list[int], num_classes: int) -> tuple[np.ndarray, bool]:
    """(S, K) the noisy class counts the sites sent in their last replies, and True; or (1, K) ones and False
    when the coordinator holds none (secure aggregation: it never sees a site's reply), i.e. every value
    equally often."""
    counts = [getattr(last[n], "census", None) for n in nodes]
    if not counts or any(not c for c in counts):
        return np.ones((1, num_classes)), False
    return np.stack([np.asarray(c["counts"], dtype=np.float64) for c in counts]), True


def site_generators(recent: list[dict], nodes: list[int]) -> tuple[list[dict[str, np.ndarray]], list[int]]:
    """Per node, the average (equal weights) of its generators in the ``recent`` rounds' accepted replies, and how
    many rounds that was.

    A site's generator at the end of a round is the round's global generator after its own DP-SGD steps;
    averaging its last few (Polyak averaging of checkpoints the site has already released, so no privacy
    cost) smooths out the last steps' noise. Not the default (``gan-sample-combine = average``; the default
    draws from each of them instead: ``round_mixture``): on the product's defaults runs, drawn again from their
    saved replies (tests/benchmarks/bench_sample_rounds.py, the last 3 rounds against the last), test accuracy
    MNIST epsilon 1 0.906 vs 0.901, PneumoniaMNIST 0.838 (MCC 0.66) vs 0.805 (MCC 0.60), but MNIST epsilon 10
    0.948 vs 0.953, CIFAR-10 0.247 vs 0.258 and UTKFace gender 0.587 vs 0.637 (the training-split validation
    scores move the same way).
    """
    states, used = [], []
    for n in nodes:
        mine = [replies[n].generator for replies in recent if n in replies]
        states.append(mine[0] if len(mine) == 1 else weighted_average(mine, [1.0] * len(mine)))
        used.append(len(mine))
    return states, used


def round_mixture(recent: list[dict], nodes: list[int], census: np.ndarray
                  ) -> tuple[list[dict[str, np.ndarray]], np.ndarray, list[int], list[int]]:
    """Each node's generators of the ``recent`` rounds' accepted replies as components of one mixture.

    Returns (the components' state dicts, oldest round first within a node; their (M, K) class counts: the
    node's row of ``census`` (S, K) split equally among its components, so that ``allocate_by_census`` gives
    each of a site's generators an equal part of the site's share of every class; the node index of each
    component; how many rounds each node has).

    Why a mixture: a site's generators of its last rounds differ by a round of DP-SGD steps each, and a
    learner trained on images from all of them sees more of each class's variety than one generator draws
    (averaging their weights instead blurs the images: ``site_generators``). Free in privacy and in time:
    the generators are DP releases the coordinator already holds, and the set keeps its size. Measured on the
    defaults runs' saved replies (docs/results.md: "A mixture of each site's last rounds"): CIFAR-10 gray epsilon 10
    0.284 and 0.274 vs 0.262 and 0.258 with the last round alone; MNIST level at epsilon 10 and 1;
    PneumoniaMNIST, whose runs swing by 0.05, once lower and once higher (0.825 vs 0.859, 0.869 vs 0.841).
    """
    states, rows, owners, used = [], [], [], []
    for i, n in enumerate(nodes):
        mine = [replies[n].generator for replies in recent if n in replies]
        states += mine
        rows += [np.asarray(census[i], dtype=np.float64) / len(mine)] * len(mine)
        owners += [i] * len(mine)
        used.append(len(mine))
    return states, np.stack(rows), owners, used


def sampled_generators(recent: list[dict], nodes: list[int], census: np.ndarray, combine: str
                       ) -> tuple[list[dict[str, np.ndarray]], np.ndarray, list[int], list[int]]:
    """What the synthetic set is drawn from, ``gan-sample-combine`` way: (generators; their (M, K) class counts,
    one row each; the node index of each; how many rounds each node has). ``mixture``: ``round_mixture``;
    ``average``: one averaged generator per node (``site_generators``) with the node's own ``census`` row."""
    if combine == "mixture":
        return round_mixture(recent, nodes, census)
    states, used = site_generators(recent, nodes)
    return states, np.asarray(census, dtype=np.float64), list(range(len(nodes))), used


def collect_and_synthesize(grid: Grid, cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord], schema: Schema,
                           device: torch.device) -> tuple[ImageDataset, list[dict], dict]:
    """The federated generator rounds, then the synthetic set; and how it was sampled (for the report)."""
    if schema.height != schema.width:
        raise RunFailed(f"the GAN needs square images, the sites hold {schema.height}x{schema.width}; set image-size")
    shape = cfg.gan_shape(schema.channels, schema.height, len(schema.classes))
    torch.manual_seed(cfg.seed)
    gen = Generator(shape)
    d_spec = P.state_spec(Discriminator(shape, width=cfg.gan_d_width).state_dict()) if shares_d(cfg) else None
    task = FedAvgTask("generator", P.GanTrainReply, "generator",
                      lambda rnd, arrays, d_avg=None: gan_request(cfg, shape, run.experiment, rnd, arrays, d_avg),
                      check_reply=_reply_check(len(schema.classes), d_spec), keep_rounds=cfg.gan_sample_rounds,
                      companion="discriminator" if shares_d(cfg) else "")
    outcome = run_fedavg_rounds(grid, cfg, run, sites, gen, task, cfg.num_rounds)
    with run.timed("synthesis"):
        torch.save(gen.state_dict(), run.out_dir / "generator.pt")
        last = outcome.last_replies
        from_sites = cfg.gan_sample_from == "sites" and len(last) > 1
        nodes = sorted(last)
        census, census_held = _census(last, nodes, len(schema.classes))
        sizes = class_sizes(census, cfg.synthetic_size, cfg.synthetic_class_mix)  # (K,) images per class
        if from_sites:
            names = [sites[n].name if n in sites else f"node-{n}" for n in nodes]
            mixture = cfg.gan_sample_combine == "mixture"
            # with the mixture every generator of a site's last rounds draws its part (component_census: (M, K))
            site_states, component_census, owners, rounds_used = sampled_generators(outcome.recent, nodes, census,
                                                                                    cfg.gan_sample_combine)
            # what the set was drawn from, to re-sample it: "generators" with "census" (one row each) is the
            # mixture's components; "site_census" the sites' own rows
            torch.save({"sites": names, "census": component_census, "generators": site_states,
                        "owners": [names[o] for o in owners], "site_census": census, "rounds_used": rounds_used,
                        "combine": cfg.gan_sample_combine}, run.out_dir / "site_generators.pt")
            last_only = all(r == 1 for r in rounds_used)
            how = {"from": "sites", "round": max(outcome.history[-1]["round"], 0) if outcome.history else 0,
                   "rounds-per-site": dict(zip(names, rounds_used)),
                   "combine": "last generator" if last_only else cfg.gan_sample_combine,
                   "why": "class c drawn from each site's " + (
                       "last generator" if last_only else
                       f"generators of its last {max(rounds_used)} rounds, each drawing an equal part,"
                       if mixture else f"generators of its last {max(rounds_used)} rounds, averaged,")
                          + " in proportion to the site's noisy count of c (its census, already released): "
                            "post-processing, no privacy cost"}
        else:
            why = ""
            if cfg.gan_sample_from == "sites":
                why = (" (secure aggregation: the coordinator never holds a site's generator)" if cfg.secure_aggregation
                       else " (fewer than two sites replied in it)")
            how = {"from": "average", "why": "the averaged generator of the last round" + why}
        if cfg.sensitive_attribute:
            states = site_states if from_sites else [P.state_arrays(gen)]
            pooled = component_census if from_sites else census.sum(axis=0, keepdims=True)
            synth, info = sample_with_replaced_attribute(
                gen, states, pooled, schema.classes, cfg.synthetic_size,
                values=len(joint_attribute_values(schema.classes)[1]), strength=1.0, seed=cfg.seed, device=device,
                progress=cfg.progress)
            how["attribute_replacement"] = {"sensitive": cfg.sensitive_attribute, **dataclasses.asdict(info),
                                            "declared_by": sorted(s.name for s in sites.values()
                                                                  if s.sensitive_attribute),
                                            "privacy_cost": "none: post-processing of the run's DP releases"}
        elif from_sites:
            synth, alloc = sample_site_generators(gen, site_states, component_census, schema.classes,
                                                  cfg.synthetic_size, seed=cfg.seed, device=device,
                                                  progress=cfg.progress, sizes=sizes)
            per_site = np.zeros((len(names), alloc.shape[1]), dtype=np.int64)
            np.add.at(per_site, owners, alloc)  # (S, K): the components' images summed by site
            how["images-per-site-and-class"] = {name: row.tolist() for name, row in zip(names, per_site)}
        else:
            synth = sample_generator(gen, schema.classes, cfg.synthetic_size, seed=cfg.seed, device=device,
                                     progress=cfg.progress, sizes=sizes)
        if not cfg.sensitive_attribute:
            how["class-mix"] = class_mix_note(cfg.synthetic_class_mix, sizes, census_held=census_held)
    return synth, outcome.history, how
