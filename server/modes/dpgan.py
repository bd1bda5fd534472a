"""DP-GAN mode at the coordinator: federated generator rounds, then sampling of the synthetic set.

Each round sends the global generator to every site (``train.gan``); a site trains its own DP
discriminator against it and returns only the generator. The averaged generator, DP by
post-processing, is sampled at the end (``server.synthesis``).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from common.data import ImageDataset
from common.models import GanShape, Generator
from server.fedavg import FedAvgTask, run_fedavg_rounds
from server.run_state import RunState
from server.sites import RunFailed, Schema, SiteRecord
from server.synthesis import sample_generator


def gan_request(cfg: RunConfig, shape: GanShape, experiment: str, rnd: int,
                generator: dict[str, np.ndarray]) -> P.GanTrainRequest:
    return P.GanTrainRequest(
        experiment=experiment, server_round=rnd, num_rounds=cfg.num_rounds, local_steps=cfg.gan_local_steps,
        batch_size=cfg.gan_batch_size, max_grad_norm=cfg.gan_max_grad_norm, lr_d=cfg.gan_lr_d, lr_g=cfg.gan_lr_g,
        d_width=cfg.gan_d_width, ac_weight=cfg.gan_ac_weight, mode_seeking=cfg.gan_mode_seeking,
        class_histogram=cfg.gan_class_histogram, epsilon=cfg.epsilon, seed=cfg.seed, channels=shape.channels,
        image_size=shape.image_size, num_classes=shape.num_classes, latent_dim=shape.latent_dim, width=shape.width,
        generator=generator)


def collect_and_synthesize(grid: Grid, cfg: RunConfig, run: RunState, sites: dict[int, SiteRecord], schema: Schema,
                           device: torch.device) -> tuple[ImageDataset, list[dict]]:
    if schema.height != schema.width:
        raise RunFailed(f"the GAN needs square images, the sites hold {schema.height}x{schema.width}; set image-size")
    shape = cfg.gan_shape(schema.channels, schema.height, len(schema.classes))
    torch.manual_seed(cfg.seed)
    gen = Generator(shape)
    task = FedAvgTask("generator", P.GanTrainReply, "generator",
                      lambda rnd, arrays: gan_request(cfg, shape, run.experiment, rnd, arrays))
    history = run_fedavg_rounds(grid, cfg, run, sites, gen, task, cfg.num_rounds)
    with run.timed("synthesis"):
        synth = sample_generator(gen, schema.classes, cfg.synthetic_size, seed=cfg.seed, device=device,
                                 progress=cfg.progress)
        torch.save(gen.state_dict(), run.out_dir / "generator.pt")
    return synth, history
