"""Run configuration: every setting of a synthesis run, validated in one place.

The Flower app reads these from ``[tool.flwr.app.config]`` in ``pyproject.toml`` (keys with dashes);
``fedsynth simulate`` builds the same mapping from its command line. :class:`RunConfig` is the single
definition: its field names are the keys with ``-`` replaced by ``_``, its defaults are the defaults
(a test keeps pyproject.toml in step), and :meth:`RunConfig.from_mapping` is the only parser.

The privacy settings here are the *coordinator's request*. A site never takes its budget from the
coordinator in a deployment; it checks each request against its own configured budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from common.data import LABEL_FROM_CLASSES, SENSITIVE_ATTRIBUTES, sensitive_attribute_problem
from common.gan_augment import parse_augment
from common.learner import LEARNERS, LearnerConfig, learner_factory
from common.models import GanShape
from common.protocol import AUDIT_MAX_IMAGES, DEFAULT_DELTA_BOUND, MAX_D_STEPS, MAX_G_STEPS
from common.recipe_ranges import (
    BOUND_RANGE, COUNT_WEIGHT_RANGE, MAX_LEARNING_RATE, MAX_LOSS_WEIGHT, MAX_SEED, MIN_G_WIDTH, layer_clips_problem,
    range_problem,
)
from common.run_id import experiment_id_problem

MODES = ("dpgan", "bnstats")
SYNTHETIC_CLASS_MIX = ("census", "balanced")  # how many synthetic images each class gets (server.synthesis)
GAN_SAMPLE_FROM = ("sites", "average")  # where the DP-GAN mode samples the synthetic set from (server.synthesis)
GAN_SAMPLE_COMBINE = ("mixture", "average")  # how a site's generators of its last rounds make its share (server.modes.dpgan)


class ConfigError(ValueError):
    """A setting is missing, of the wrong type or out of range; the message names it and says what to do."""


@dataclass
class RunConfig:
    # --- what to do -------------------------------------------------------------------------------
    mode: str = "dpgan"  # dpgan: sites train DP-GANs; bnstats: sites send DP class-wise BN statistics
    num_rounds: int = 0  # generator averaging rounds in dpgan mode (0 = chosen by the product, server/defaults.py)
    seed: int = 0  # seeds partitioning, initialisation, sampling and the learner
    device: str = "auto"  # auto | cpu | cuda[:N]
    experiment: str = ""  # id shared by all rounds of a run (sites key local state by it); "" = new id
    progress: bool = True  # progress bars for local training, synthesis and the learner
    parallel_sites: bool = True  # in-process simulation: the sites of a round work at once, the cores shared out (fedsynth.localgrid); false = one after another (less memory)
    # --- data (simulation: every virtual site loads its partition of `data`) ------------------------
    data: str = "digits"  # dataset source: digits | MNIST IDX dir | .npz | image folder | .tar.gz
    test_data: str = "digits"  # real held-out data for TSTR accuracy; "" = none (deployment)
    image_size: int = 0  # resize images to this side (0 = keep)
    label_from: str = ""  # "" | utkface-gender | utkface-race | utkface-age (labels from file names)
    partition: str = "iid"  # iid | dirichlet:ALPHA (simulation only)
    sensitive_attribute: str = ""  # "" | gender | race | age: an attribute the synthetic set must not teach (seed 004): every image shows a value of it drawn independently of everything else. Simulation: every virtual site declares it; deployment: a site declares it in its site.yaml, and the run follows
    # --- privacy request (per site, for this run) ---------------------------------------------------
    epsilon: float = 10.0  # epsilon this run may spend at each site (inf = no DP, marked NOT private)
    delta: float = 0.0  # 0 = each site uses min(1e-5, 1/(10 n~)), n~ >= n a noisy size (client.site_delta)
    # --- coordinator loop -----------------------------------------------------------------------------
    round_timeout: float = 600.0  # seconds to wait for replies in a round
    quorum: float = 0.5  # fraction of contacted sites that must reply for a round to count
    out_dir: str = "runs/latest"  # where the coordinator writes outputs and its checkpoint
    state_dir: str = ""  # simulation: root of the virtual sites' private state ("" = <out-dir>/sites)
    resume: bool = True  # continue from <out-dir>/checkpoint.pt when it exists
    # --- secure aggregation (SecAgg+): the coordinator sees only sums over the sites ----------------
    secure_aggregation: bool = False  # average the generator / shared net and pool the statistics with SecAgg+ (>= 3 sites)
    secure_threshold: int = 0  # live sites needed to remove a dropped site's masks (0 = two thirds of the sites)
    distributed_noise: bool = False  # statistics mode with secure aggregation: each of >= t sites adds part (>= 1/sqrt(t)) of the noise
    # --- DP-GAN (site-side local training) -----------------------------------------------------------
    gan_local_steps: int = 0  # discriminator DP-SGD steps per site per round (0 = chosen by the product)
    gan_long_local_steps: int = 0  # D steps per round a site takes instead where its noisy census counts 10,000 records or more (0 = chosen by the product; = gan-local-steps: never)
    gan_batch_size: int = 0  # expected Poisson batch size of real records (0 = chosen by the product)
    gan_max_grad_norm: float = 1.0  # per-sample clipping bound of the discriminator's gradient
    gan_lr_d: float = 1e-3  # > 0: Adam learning rate of the discriminator
    gan_lr_g: float = 1e-3  # > 0: Adam learning rate of the generator
    gan_latent_dim: int = 64  # >= 1: size of the generator's latent vector
    gan_width: int = 0  # generator base width (0 = chosen by the product from the image shape)
    gan_d_width: int = 0  # discriminator base width (0 = chosen by the product: a small D keeps the DP noise small)
    gan_resolution: int = 0  # side G draws at and D judges at, resized to the images' (0 = chosen by the product)
    gan_ac_weight: float = 0.3  # weight of the discriminator's auxiliary class loss (AC-GAN); 0 = projection only
    gan_mode_seeking: float = 1.0  # weight of G's mode-seeking term; 0 = off (then every image of a class looks alike)
    gan_g_steps: int = 1  # >= 1: generator steps after each gan-d-steps discriminator steps (free in privacy: G never sees a record)
    gan_long_g_steps: int = 0  # G steps after each D step a site of >= 10,000 records (noisy census) takes, on either D schedule (0 = chosen by the product; = gan-g-steps: never)
    gan_d_steps: int = 1  # >= 1: discriminator steps between two generator steps (Bie et al.'s n_D; the privacy spent is set by gan-local-steps alone)
    gan_augment: str = ""  # DiffAugment of every image a site's D judges: "" = none, or comma-separated from translation, cutout (common/gan_augment.py; docs/results.md: measured, opt-in)
    # Free in privacy (G never sees a record) and in time. 0.99 measured against 0 on three datasets, epsilon 10,
    # 3 Dirichlet-0.5 sites: MNIST 0.963 vs 0.952 (seed 1), CIFAR-10 gray 0.276 vs 0.265 (seed 0) and 0.283 vs 0.239
    # (seed 1), PneumoniaMNIST 0.827 vs 0.843 (seed 0) (docs/results.md, "the generator's EMA").
    gan_average_d: bool = False  # FedAvg of the sites' discriminators too (each D is DP-SGD output, so sending it is free): every site starts its round from their average; off = each D stays at its site (design.md); never under secure aggregation
    gan_ema: float = 0.99  # in [0, 1): decay of the EMA of G's weights over a site's round (warmed up over its first steps), sent instead of G's last weights; 0 = off
    gan_class_histogram: bool = True  # each site draws G's labels from its own DP class histogram (label skew)
    # Free in privacy and time (post-processing of generators the sites already released). A mixture of the last 3
    # rounds against the last round alone, drawn again from the defaults runs' saved replies: CIFAR-10 gray epsilon 10
    # 0.284 vs 0.262 and 0.274 vs 0.258, MNIST 0.959 vs 0.960 (epsilon 10) and 0.926 vs 0.927 (epsilon 1),
    # PneumoniaMNIST 0.825 vs 0.859 and 0.869 vs 0.841 (two seeds) (docs/results.md: "A mixture of each site's last
    # rounds").
    gan_sample_rounds: int = 3  # >= 1: with gan-sample-from = sites, each site's generators of this many last rounds make its share (gan-sample-combine); 1 = its last
    gan_sample_combine: str = "mixture"  # mixture: each of those generators draws an equal part of the site's share | average: their weights averaged first
    gan_sample_from: str = "sites"  # sites: class c from each site's last generator in proportion to its noisy count of c; average: from the averaged generator
    # --- BN statistics (shared GroupNorm net, federated DP-SGD, one DP statistics release per site) ----
    bn_net: str = ""  # "" = train the shared net across the sites with DP-SGD; else a net file (torch state_dict)
    bn_width: int = 16  # channels of the shared net's first block
    bn_resolution: int = 0  # side the shared net works at and the synthesis draws at, resized to the images' (0 = chosen by the product)
    bn_head_norm: bool = False  # also record the head input's per-position statistics (class layout; MNIST)
    bn_rounds: int = 0  # federated DP-SGD rounds of the shared net (0 = chosen by the product; none with bn-net)
    bn_local_steps: int = 0  # DP-SGD steps per site per round (0 = chosen by the product)
    bn_batch_size: int = 0  # expected Poisson batch size (0 = chosen by the product)
    bn_lr: float = 0.5  # > 0: SGD learning rate of the shared net's DP-SGD
    bn_max_grad_norm: float = 1.0  # > 0: per-sample clipping bound of the shared net's DP-SGD
    bn_stats_share: float = 0.3  # the statistics release alone costs this share of epsilon; DP-SGD the rest (all with bn-net)
    bn_clip: float = 2.3  # per-record L2 bound of the recorded statistics (all layers together)
    bn_layer_clips: str = ""  # "" = one flat bound (bn-clip); "auto" = each site picks per-layer bounds privately; or one per layer
    bn_count_weight: float = 0.5  # weight of the class count in the release (sensitivity sqrt(w^2 + 1))
    bn_iterations: int = 200  # synthesis optimisation steps per batch
    bn_synth_batch: int = 200  # images optimised together (all classes)
    bn_synth_lr: float = 0.1  # > 0: Adam learning rate of the synthesis
    bn_w_stats: float = 1.0  # weight of the statistics-matching loss
    bn_w_ce: float = 1.0  # weight of the net's cross-entropy for the target class
    bn_w_tv: float = 1.0  # total-variation image prior
    bn_w_l2: float = 0.0  # L2 image prior
    # --- synthesis and the central learner -----------------------------------------------------------
    synthetic_size: int = 0  # labelled images made at the end (0 = chosen by the product)
    synthetic_class_mix: str = "census"  # census: classes in the proportions of the sites' noisy class counts (the data's prior); balanced: equal
    learner: str = LearnerConfig.name  # cnn | mlp | logreg, or your own as package.module:factory (common.learner)
    learner_epochs: int = LearnerConfig.epochs  # >= 1: passes of the learner over the synthetic set
    learner_lr: float = LearnerConfig.lr  # > 0: the learner's peak learning rate (AdamW, one-cycle)
    learner_batch_size: int = LearnerConfig.batch_size  # >= 1: the learner's batch size
    real_baseline: bool = True  # simulation only: its owner also trains the learner on the real pooled data and audits the synthetic set against it
    # --- questions to the sites about their private data (each a DP release the site charges; a site
    # answers only if its operator allows it, at most queries-per-run times per run) -----------------
    site_evaluation: bool = False  # sites score the central classifier on their held-out data (noisy counts)
    site_audits: bool = False  # sites histogram their records' distances to the synthetic set (noisy counts)
    audit_records: int = 1000  # synthetic images sent with an audit query (and audited by a simulation's owner)

    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> "RunConfig":
        """Parse a Flower run config (dashed keys) or a dict of field names; unknown keys are an error."""
        by_name = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in by_name:
                known = ", ".join(sorted(n.replace("_", "-") for n in by_name))
                raise ConfigError(f"unknown run setting '{key}'. Known settings: {known}")
            values[name] = _coerce(key, value, type(getattr(cls(), name)))
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def to_flwr(self) -> dict[str, Any]:
        """The dashed-key mapping Flower's run config uses."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)

    def learner_config(self) -> LearnerConfig:
        return LearnerConfig(name=self.learner, epochs=self.learner_epochs, lr=self.learner_lr,
                             batch_size=self.learner_batch_size, seed=self.seed)

    def gan_shape(self, channels: int, image_size: int, num_classes: int) -> GanShape:
        return GanShape(channels=channels, image_size=image_size, num_classes=num_classes,
                        latent_dim=self.gan_latent_dim, width=self.gan_width, resolution=self.gan_resolution)

    def validate(self) -> None:
        """Check every range; raise :class:`ConfigError` naming the setting and the fix."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        need(self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")
        id_problem = experiment_id_problem(self.experiment) if self.experiment else None
        need(id_problem is None, f"experiment: {id_problem}; give another id, or none for a new one")
        need(self.num_rounds >= 0, f"num-rounds must be >= 1 (or 0: chosen by the product), got {self.num_rounds}")
        need(self.epsilon > 0, f"epsilon must be > 0 (or inf for a non-private run), got {self.epsilon}")
        need(0 <= self.delta < 1, f"delta must be in [0, 1), got {self.delta} (0 = per-site default)")
        need(self.round_timeout > 0, f"round-timeout must be > 0 seconds, got {self.round_timeout}")
        need(0 < self.quorum <= 1, f"quorum is a fraction of sites in (0, 1], got {self.quorum}")
        need(self.gan_local_steps >= 0, f"gan-local-steps must be >= 1 (or 0: auto), got {self.gan_local_steps}")
        need(self.gan_batch_size >= 0, f"gan-batch-size must be >= 1 (or 0: auto), got {self.gan_batch_size}")
        need(self.gan_max_grad_norm > 0, f"gan-max-grad-norm must be > 0, got {self.gan_max_grad_norm}")
        need(self.gan_lr_d > 0 and self.gan_lr_g > 0, "gan-lr-d and gan-lr-g must be > 0")
        need(self.gan_latent_dim >= 1 and (self.gan_width >= MIN_G_WIDTH or self.gan_width == 0),
             f"gan-latent-dim >= 1 and gan-width >= {MIN_G_WIDTH} (or 0: chosen by the product)")
        need(self.gan_d_width >= 0 and self.gan_ac_weight >= 0 and self.gan_mode_seeking >= 0,
             "gan-d-width, gan-ac-weight and gan-mode-seeking must be >= 0")
        need(self.gan_long_local_steps >= 0 and (not self.gan_long_local_steps or not self.gan_local_steps
                                                  or self.gan_long_local_steps >= self.gan_local_steps),
             f"gan-long-local-steps must be 0 (auto) or at least gan-local-steps ({self.gan_local_steps}), "
             f"got {self.gan_long_local_steps}")
        need(1 <= self.gan_g_steps <= MAX_G_STEPS, f"gan-g-steps must be in 1..{MAX_G_STEPS}, got {self.gan_g_steps}")
        need(self.gan_long_g_steps == 0 or self.gan_g_steps <= self.gan_long_g_steps <= MAX_G_STEPS,
             f"gan-long-g-steps must be 0 (auto) or in gan-g-steps..{MAX_G_STEPS} ({self.gan_g_steps}..{MAX_G_STEPS}), "
             f"got {self.gan_long_g_steps}")
        need(1 <= self.gan_d_steps <= MAX_D_STEPS, f"gan-d-steps must be in 1..{MAX_D_STEPS}, got {self.gan_d_steps}")
        try:
            parse_augment(self.gan_augment)
        except ValueError as err:
            raise ConfigError(f"gan-augment: {err}") from None
        need(0 <= self.gan_ema < 1, f"gan-ema is a decay in [0, 1) (0 = off), got {self.gan_ema}")
        for name, side, what in (("gan-resolution", self.gan_resolution, "the GAN draws at"),
                                 ("bn-resolution", self.bn_resolution, "the statistics net works at")):
            need(side == 0 or 8 <= side <= (self.image_size or side),
                 f"{name} is the side {what}: at least 8 and at most the image side "
                 f"(image-size {self.image_size or 'as the data'}), or 0 for the product's choice; got {side}")
        need(self.secure_threshold >= 0 and self.secure_threshold != 1,
             f"secure-threshold must be >= 2 (or 0: two thirds of the sites), got {self.secure_threshold}")
        need(self.secure_aggregation or not self.distributed_noise,
             "distributed-noise needs secure-aggregation = true: each site adds only part of the noise, so its "
             "release must never be seen alone")
        need(not (self.distributed_noise and self.bn_layer_clips.strip() == "auto"),
             "distributed-noise needs clip bounds every site shares: bn-layer-clips=auto lets each site choose its "
             "own, so one site's share of the noise would be scaled to other bounds than its release's; set "
             "bn-layer-clips to bounds, or leave it empty (one flat bound, bn-clip)")
        need(not (self.distributed_noise and self.delta > DEFAULT_DELTA_BOUND),  # (every site refused it: review s61)
             f"distributed-noise needs every site's delta at most {DEFAULT_DELTA_BOUND:g} (the floor of each share "
             f"of the noise is set there); got delta {self.delta:g}: set delta <= {DEFAULT_DELTA_BOUND:g} (or 0), or "
             "distributed-noise = false")
        need(self.gan_sample_rounds >= 1, f"gan-sample-rounds must be >= 1 (1 = each site's last generator only), "
                                          f"got {self.gan_sample_rounds}")
        need(self.synthetic_class_mix in SYNTHETIC_CLASS_MIX,
             f"synthetic-class-mix must be one of {', '.join(SYNTHETIC_CLASS_MIX)}, got '{self.synthetic_class_mix}'")
        need(self.gan_sample_combine in GAN_SAMPLE_COMBINE,
             f"gan-sample-combine must be one of {', '.join(GAN_SAMPLE_COMBINE)}, got '{self.gan_sample_combine}'")
        need(self.gan_sample_from in GAN_SAMPLE_FROM,
             f"gan-sample-from must be one of {', '.join(GAN_SAMPLE_FROM)}, got '{self.gan_sample_from}'")
        need(self.bn_width >= 1 and self.bn_rounds >= 0 and self.bn_local_steps >= 0 and self.bn_batch_size >= 0,
             "bn-width must be >= 1; bn-rounds, bn-local-steps and bn-batch-size >= 1 (or 0: chosen by the product)")
        try:
            clips = ([float(c) for c in self.bn_layer_clips.split(",")]
                     if self.bn_layer_clips and self.bn_layer_clips.strip() != "auto" else [])
        except ValueError:
            raise ConfigError(f"bn-layer-clips must be 'auto' or comma-separated numbers, got '{self.bn_layer_clips}'") from None
        need(all(c > 0 for c in clips), "bn-layer-clips must all be > 0")
        need(0 < self.bn_stats_share <= 1, f"bn-stats-share must be in (0, 1], got {self.bn_stats_share}")
        need(self.bn_clip > 0 and self.bn_count_weight > 0 and self.bn_lr > 0 and self.bn_max_grad_norm > 0,
             "bn-clip, bn-count-weight, bn-lr and bn-max-grad-norm must be > 0")
        # the ranges a site accepts (common.recipe_ranges): refused here before any site is asked
        need(0 <= self.seed < MAX_SEED, f"seed must be an integer in [0, {MAX_SEED}), got {self.seed}")
        for problem in (range_problem("gan-lr-d", self.gan_lr_d, 0.0, MAX_LEARNING_RATE, low_open=True),
                        range_problem("gan-lr-g", self.gan_lr_g, 0.0, MAX_LEARNING_RATE, low_open=True),
                        range_problem("gan-max-grad-norm", self.gan_max_grad_norm, *BOUND_RANGE),
                        range_problem("gan-ac-weight", self.gan_ac_weight, 0.0, MAX_LOSS_WEIGHT),
                        range_problem("gan-mode-seeking", self.gan_mode_seeking, 0.0, MAX_LOSS_WEIGHT),
                        range_problem("bn-lr", self.bn_lr, 0.0, MAX_LEARNING_RATE, low_open=True),
                        range_problem("bn-max-grad-norm", self.bn_max_grad_norm, *BOUND_RANGE),
                        range_problem("bn-clip", self.bn_clip, *BOUND_RANGE),
                        range_problem("bn-count-weight", self.bn_count_weight, *COUNT_WEIGHT_RANGE),
                        layer_clips_problem(self.bn_layer_clips, "bn-layer-clips")):
            need(problem is None, str(problem))
        need(self.bn_iterations >= 1 and self.bn_synth_batch >= 1 and self.bn_synth_lr > 0,
             "bn-iterations, bn-synth-batch and bn-synth-lr must be positive")
        need(2 <= self.audit_records <= AUDIT_MAX_IMAGES,
             f"audit-records must be in 2..{AUDIT_MAX_IMAGES}, got {self.audit_records}")
        need(self.synthetic_size >= 0, f"synthetic-size must be >= 1 (or 0: auto), got {self.synthetic_size}")
        need(self.image_size == 0 or self.image_size >= 8, f"image-size must be 0 or >= 8, got {self.image_size}")
        need(self.label_from in ("", *LABEL_FROM_CLASSES),
             f"label-from must be '' or one of {sorted(LABEL_FROM_CLASSES)}, got '{self.label_from}'")
        if self.sensitive_attribute:  # seed 004's replacement (server/attribute_replacement.py)
            need(self.sensitive_attribute in SENSITIVE_ATTRIBUTES,
                 f"sensitive-attribute must be '' or one of {', '.join(SENSITIVE_ATTRIBUTES)}, "
                 f"got '{self.sensitive_attribute}'")
            # the coordinator of a deployment does not know the sites' labels (label-from ''): discovery checks them
            why = sensitive_attribute_problem(self.label_from, self.sensitive_attribute) if self.label_from else ""
            need(not why, why)
            need(self.mode == "dpgan", "sensitive-attribute needs mode = dpgan: replacing an attribute draws each "
                                       "image from a generator conditioned on another value of it, and the statistics "
                                       "mode has no such generator")
        try:
            learner_factory(self.learner)
        except ValueError as err:
            raise ConfigError(f"learner: {err}") from None
        need(not (self.site_evaluation and self.learner not in LEARNERS),
             f"site-evaluation needs a built-in learner ({', '.join(LEARNERS)}): a site never imports code the "
             f"coordinator names, so it cannot build '{self.learner}'; turn site-evaluation off or use a built-in one")
        need(self.learner_epochs >= 1, f"learner-epochs must be >= 1, got {self.learner_epochs}")
        need(self.learner_batch_size >= 1, f"learner-batch-size must be >= 1, got {self.learner_batch_size}")
        need(self.learner_lr > 0, f"learner-lr must be > 0, got {self.learner_lr}")
        from common.partition import parse_partition  # local import: keeps config importable alone

        try:
            parse_partition(self.partition)
        except ValueError as err:
            raise ConfigError(f"partition: {err}") from None


def describe_settings() -> list[tuple[str, Any, str]]:
    """(setting, default, meaning) of every run setting, read off this class's definition (its comments)."""
    import inspect
    import re

    meanings = {}
    for line in inspect.getsource(RunConfig).splitlines():
        found = re.match(r"\s{4}(\w+): [^=]+=.*?#\s*(.*)$", line)
        if found:
            meanings[found.group(1)] = found.group(2).strip()
    defaults = RunConfig()
    return [(f.name.replace("_", "-"), getattr(defaults, f.name), meanings.get(f.name, "")) for f in fields(RunConfig)]


def _coerce(key: str, value: Any, want: type) -> Any:
    """Convert a run-config value to the field's type, refusing lossy or nonsensical conversions."""
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"setting '{key}' must be true or false, got {value!r}")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"setting '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"setting '{key}' must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"setting '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if want is float:
        if isinstance(value, bool):
            raise ConfigError(f"setting '{key}' must be a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"setting '{key}' must be a number (or inf), got {value!r}") from None
        if math.isnan(out):
            raise ConfigError(f"setting '{key}' must not be NaN")
        return out
    if not isinstance(value, str):
        raise ConfigError(f"setting '{key}' must be a string, got {value!r}")
    return value
