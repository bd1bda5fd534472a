"""The product's defaults: run settings chosen from what a run may know without spending privacy.

A run setting left at 0 ("auto") is chosen here, at the coordinator, once the sites have published
their schema: from the image shape, the number of classes and the number of sites -- never from a
record, a record count or a result on test data. Two choices are left to each site, since a site's size,
which the coordinator does not know, decides them: where the run offers a longer DP-GAN schedule
(``gan-long-local-steps``), a site takes it only if its own noisy census counts 10,000 records or more
(``client.site_schedule.choose_local_steps``), and a site that large takes the run's extra generator steps
(``gan-long-g-steps``, ``client.site_schedule.choose_g_steps``), free in privacy, on either D schedule. Each rule says
why beside it, the report lists every value chosen this way with its reason (``report["settings_chosen"]``),
and ``--set KEY=VALUE`` (or the run config) overrides any of them. The rules are fixed in advance: one recipe per
mode and image size, the way DPImageBench runs one recipe per method on every dataset, not one per dataset.

Where a number came from a measurement, the reason names it; the measurements are on MNIST and
PneumoniaMNIST (``tests/benchmarks/results/grid``), i.e. on ``../shared/data``, and they are
benchmark numbers, not test-set tuning of these rules on the data they are judged on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from common.config import RunConfig
from server.sites import Schema

AUTO = 0  # an int setting left at 0 is chosen by these rules
# Every setting a rule below may choose (a run records the values chosen: server.run_state).
CHOSEN_SETTINGS = ("num-rounds", "gan-local-steps", "gan-long-local-steps", "gan-long-g-steps", "gan-batch-size", "gan-width", "gan-d-width", "gan-resolution",
                   "bn-rounds", "bn-local-steps", "bn-batch-size", "bn-resolution", "synthetic-size")

# A rule added after runs were recorded with fedsynth's choices: the run setting whose value a run recorded
# before the rule existed behaved as (a resumed run that lacks the rule's value matches when the rule now
# chooses that value: server.run_state).
ADDED_SINCE = {"gan-long-g-steps": "gan-g-steps"}


@dataclass(frozen=True)
class Choice:
    setting: str  # dashed run-setting name
    value: int
    reason: str


def _small(schema: Schema) -> bool:
    """Tiny images (8x8 digits): the light settings the demo was measured with."""
    return max(schema.height, schema.width) <= 16


# The largest side the DP-GAN draws at by default; larger images are drawn at this side and resized.
GAN_MAX_RESOLUTION = 32


def gan_resolution_rule(schema: Schema) -> Choice:
    side = max(schema.height, schema.width)
    drawable = side - side % 4  # up to 32 pixels G doubles its map twice, so it draws at a multiple of 4
    if side <= GAN_MAX_RESOLUTION and (drawable == side or drawable < 8):
        return Choice("gan-resolution", side, "the GAN draws at the images' own side (at most 32 pixels)")
    if side <= GAN_MAX_RESOLUTION:
        return Choice("gan-resolution", drawable,
                      f"G draws at {drawable} pixels, the largest side its two doublings reach, and its images are "
                      f"resized to {side} (D judges every image averaged down to {drawable}): the same mechanism as "
                      "for images larger than 32 pixels, so data of any side from 8 up runs without image-size")
    return Choice("gan-resolution", GAN_MAX_RESOLUTION,
                  f"G draws at {GAN_MAX_RESOLUTION} pixels and its images are resized to {side} (D judges every image "
                  f"averaged down to {GAN_MAX_RESOLUTION}): a DP generator this small learns coarse structure, not "
                  "fine detail, and every pixel more costs a site's time and D parameters DP-SGD must noise (UTKFace "
                  "gender at 64x64, 3 sites, epsilon 10: TSTR 0.627 against 0.516 with G and D at 64 pixels, 201 s "
                  "per round against 741; tests/benchmarks/results/defaults)")


def gan_rules(schema: Schema, num_sites: int, resolution: int) -> list[Choice]:
    """The DP-GAN's rules; ``resolution``: the side the GAN draws at (the user's gan-resolution or the rule's)."""
    small = _small(schema)
    colour_or_large = schema.channels == 3 or resolution > 32
    large = resolution >= 48  # G and D get a third stage (common.models.GanShape.stages)
    return [
        Choice("num-rounds", 3 if small else 10,
               "tiny images: 3 rounds, what the digits demo measured" if small else
               "10 rounds of 60 discriminator steps: averaging the sites' generators every 60 steps keeps them from "
               "drifting apart under label skew (MNIST, 3 Dirichlet-0.5 sites: 3 x 200 steps 0.455, 10 x 60 steps "
               "0.503, before the mode-seeking term took it to 0.94). Re-measured with today's other defaults at "
               "epsilon 10 (docs/results.md: 'Fewer or more rounds'): the same D steps in 5 rounds gave CIFAR-10 28x28 "
               "gray 0.317, MNIST 0.957, PneumoniaMNIST 0.832; in 20 rounds CIFAR-10 gray 0.291; 10 rounds "
               "gave 0.269-0.331, 0.956-0.964 and 0.870, 0.867: level within one run's spread, so 10 stay"),
        Choice("gan-local-steps", 100 if small else 60,
               "discriminator DP-SGD steps per site and round (600 in all for 28x28 and larger images)"),
        Choice("gan-long-local-steps", 100 if small else 2 * 60,
               "tiny images: never more than gan-local-steps, the demo's" if small else
               "twice the D steps at a site whose own noisy census counts 10,000 records or more "
               "(client.site_schedule.choose_local_steps). Natural images are short of training, not of privacy: "
               "CIFAR-10 as 28x28 grayscale, 3 Dirichlet-0.5 sites of ~16,700 records, epsilon 10: 0.251 at 600 steps, "
               "0.315 at 1,200 (noise multiplier 0.60 to 0.66), 0.325 at 600 steps without DP; MNIST 0.953 to 0.957. "
               "At epsilon 1 too, though the steps cost large sites x1.2-1.4 the noise per step: MNIST 0.920, 0.921, "
               "0.919, 0.922 against 0.927, 0.895, 0.896, 0.915 (seeds 0-3), CIFAR-10 gray 0.223, 0.203 against 0.213, "
               "0.184 (seeds 0-1; docs/results.md: 'The longer schedule at epsilon 1'). Small sites lose: "
               "PneumoniaMNIST's (283 to 2,300 records, noise multiplier x1.34) 0.841 to 0.797 "
               "at epsilon 10, 0.739 to 0.627 at epsilon 1"),
        Choice("gan-long-g-steps", 1 if small else 2,
               "tiny images: one generator step per D step, the demo's" if small else
               "two generator steps per D step at a site whose noisy census counts 10,000 records or more, on either D "
               "schedule (client.site_schedule.choose_g_steps): a G step never touches a record, so it is free in "
               "privacy, and natural images are short of training. CIFAR-10 as 28x28 gray, epsilon 10, 3 Dirichlet-0.5 "
               "sites on the longer D schedule: 0.300, 0.299, 0.309 against 0.276, 0.230, 0.287 with one; MNIST level "
               "(0.964, 0.956 against 0.961, 0.964). On the shorter D schedule (MNIST, epsilon 1, seeds 0-2): 0.935, "
               "0.900, 0.896 against 0.902, 0.901, 0.878. With today's other defaults, on either schedule: CIFAR-10 "
               "gray epsilon 10 0.311, 0.331 and 0.269 against 0.265 and 0.276, MNIST epsilon 1 0.934 against 0.926 "
               "and 0.927 (docs/results.md: 'Two G steps at every large site'). They cost time: MNIST at epsilon 10, "
               "alone on 2 cores, 66 s a round against 47 with one, and against 52 with one and the sites one after "
               "another, as they ran before the in-process simulation's sites worked at once; the classifier ready "
               "after 12.0 min (tests/benchmarks/results/timing/mnist_eps10_alone_parallel.json). Small sites keep "
               "one: "
               "PneumoniaMNIST's (283-2,429 records) 0.800 and 0.825 with two against 0.808-0.849"),
        Choice("gan-batch-size", 64 if small else 256,
               "expected Poisson batch: DP-SGD's noise is divided by the batch, so a large batch keeps the "
               "update's signal above the noise (DPImageBench and Bie et al. use 512-4096 on single large "
               "datasets; 256 suits sites of a few hundred to tens of thousands of records)"),
        Choice("gan-width", 16 if large else 32 if colour_or_large else 24,
               "a small generator: DPImageBench measured a 3.8M-parameter DP-GAN generator beating 6.6-19.4M ones "
               "on CIFAR-10 (35.2% against 23-28%); a little wider for colour"
               + (" at 32 pixels; narrower again from 48 pixels up, where G's full-resolution layers dominate a "
                  "site's time (64x64 RGB, one core: 1.8 s per discriminator step at width 16 against 5.8 s at "
                  "width 24)" if large else "")),
        Choice("gan-d-width", 16,
               "a small discriminator: DP-SGD adds noise to every one of its parameters"),
    ]


# The largest side the statistics mode's net works at and its synthesis draws at by default.
BN_MAX_RESOLUTION = 32


def bn_resolution_rule(side: int) -> Choice:
    """The statistics net's side for images of side ``side`` (also what ``fedsynth pretrain-net`` builds)."""
    if side <= BN_MAX_RESOLUTION:
        return Choice("bn-resolution", side, "the statistics net works at the images' own side (at most 32 pixels)")
    return Choice("bn-resolution", BN_MAX_RESOLUTION,
                  f"the shared net averages each image down to {BN_MAX_RESOLUTION} pixels and the synthesis draws at "
                  f"{BN_MAX_RESOLUTION} and resizes to {side}: the synthesis optimises every pixel of every image for "
                  f"hundreds of steps, 4x the work at 64 pixels (UTKFace 64x64, one core: ~1 s per step of a "
                  f"200-image batch, ~2.8 h for 10,000 faces), and a net this small, trained with DP-SGD, keeps "
                  "coarse structure only (the same rule as gan-resolution)")


def bn_rules(schema: Schema, num_sites: int) -> list[Choice]:
    small = _small(schema)
    return [
        Choice("bn-rounds", 20 if small else 10,
               "federated DP-SGD rounds of the shared net (20 x 3 steps on tiny images, the demo's; 10 x 30 "
               "otherwise, the MNIST statistics-mode recipe)"),
        Choice("bn-local-steps", 3 if small else 30, "DP-SGD steps per site and round"),
        Choice("bn-batch-size", 128 if small else 256, "expected Poisson batch of the shared net's DP-SGD"),
    ]


def synthetic_rule(schema: Schema) -> Choice:
    if _small(schema):
        return Choice("synthetic-size", max(2000, 200 * len(schema.classes)),
                      "tiny images: 2,000 synthetic images (200 per class for more than 10 classes), the demo's")
    return Choice("synthetic-size", min(20000, max(10000, 1000 * len(schema.classes))),
                  "10,000 synthetic images (1,000 per class beyond 10 classes, at most 20,000): the central learner "
                  "trains a fixed number of epochs, so fewer images mean fewer updates (the MNIST and "
                  "PneumoniaMNIST results used 10,000); sampling costs no privacy, only time")


def resolve(cfg: RunConfig, schema: Schema, num_sites: int) -> tuple[RunConfig, list[Choice]]:
    """``cfg`` with every setting left at 0 chosen by the rules above; and the choices made."""
    if cfg.mode == "dpgan":
        resolution = gan_resolution_rule(schema)
        rules = [resolution] + gan_rules(schema, num_sites, cfg.gan_resolution or resolution.value)
    else:
        rules = [bn_resolution_rule(max(schema.height, schema.width))] + bn_rules(schema, num_sites)
    rules.append(synthetic_rule(schema))
    chosen = [rule for rule in rules if getattr(cfg, rule.setting.replace("-", "_")) == AUTO]
    # D steps (or G steps) the user set are taken exactly by every site, unless the long ones are set too
    for setting, long_setting, unset in (("gan-local-steps", "gan-long-local-steps", AUTO),
                                         ("gan-g-steps", "gan-long-g-steps", 1)):
        value = getattr(cfg, setting.replace("-", "_"))
        if value != unset:
            chosen = [Choice(long_setting, value, f"the {setting} set for this run: a site takes exactly those")
                      if c.setting == long_setting else c for c in chosen]
    if cfg.mode == "bnstats" and cfg.bn_net:  # a provided net: no DP-SGD rounds to choose
        chosen = [rule for rule in chosen if not rule.setting.startswith(("bn-rounds", "bn-local", "bn-batch"))]
    resolved = dataclasses.replace(cfg, **{rule.setting.replace("-", "_"): rule.value for rule in chosen})
    return resolved, chosen
