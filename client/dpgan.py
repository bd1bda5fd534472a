"""Local DP-GAN training at a site: DP-SGD on the discriminator, the generator trained through it.

Privacy argument (design.md, opacus-notes §1-2): the discriminator D is the only network that sees
real records, and it is trained with DP-SGD (Poisson sampling at rate q, per-sample clipping to C,
Gaussian noise of std sigma*C per step). The generator G only receives gradients through D's
DP-noised parameters, so G's weights, the only thing that leaves the site, are DP by
post-processing. Each D step is one subsampled Gaussian release: the caller charges
``DPEvent(sigma, q, steps)`` in the site's ledger *before* calling :meth:`LocalGanTrainer.train_round`.

Implementation notes (verified against Opacus 1.6):
- Poisson sampling is done here with an explicit Bernoulli mask so the sampling rate q is exactly the
  one accounted; Opacus' ``GradSampleModule`` + ``DPOptimizer`` do the clipping and noise.
- D step = one backward over two forward passes (real rows, fake rows with the same labels): Opacus
  sums row i of both passes, so "record i" is grad(real_i) + grad(fake_i), clipped jointly (dcgan.py's
  scheme; sensitivity stays C because fake_i carries no other record's data).
- G step: D's hooks are disabled and its parameters frozen (opacus-notes §1 gotcha 2), and fake labels
  are drawn uniformly, so G's update never touches real labels directly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from tqdm.auto import tqdm

from common.data import ImageDataset
from common.models import Discriminator, GanShape, Generator


@dataclass(frozen=True)
class RoundSettings:
    """What one train.gan round does at a site (noise chosen by the site, the rest requested)."""

    noise_multiplier: float  # sigma; 0 = non-private
    sample_rate: float  # q of Poisson sampling
    steps: int  # D steps this round
    max_grad_norm: float  # C
    lr_d: float
    lr_g: float
    seed: int


class LocalGanTrainer:
    """Holds a site's discriminator between rounds and trains the received generator against it.

    ``state_path`` is where D, both optimizers' states and the step counter are persisted, so a
    restarted site continues where it was (and D never leaves the site).
    """

    def __init__(self, shape: GanShape, data: ImageDataset, state_path: Path,
                 device: torch.device, progress: bool = True, label: str = "site") -> None:
        self.shape = shape
        self.data = data
        self.state_path = Path(state_path)
        self.device = device
        self.progress = progress
        self.label = label
        # Real records in the GAN's range [-1, 1]; kept on the device to avoid per-step copies.
        self.x = torch.from_numpy(data.images).to(device) * 2 - 1  # (N, C, H, W)
        self.y = torch.from_numpy(data.labels).to(device)  # (N,)

    # ---- persistence -----------------------------------------------------------------------------
    def _load_state(self) -> dict | None:
        if not self.state_path.exists():
            return None
        return torch.load(self.state_path, map_location=self.device, weights_only=True)

    def _save_state(self, state: dict) -> None:
        # Atomic replace: a kill during the save leaves the previous state intact.
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.state_path)

    # ---- one round -------------------------------------------------------------------------------
    def train_round(self, generator_state: dict[str, torch.Tensor], rs: RoundSettings) -> tuple[dict, dict]:
        """Train D (DP-SGD) and G for ``rs.steps`` steps; return (generator state_dict, metrics)."""
        start = time.perf_counter()
        n = len(self.data)
        expected_batch = max(1, round(rs.sample_rate * n))
        torch.manual_seed(rs.seed)
        gen = Generator(self.shape).to(self.device)
        gen.load_state_dict(generator_state)
        disc = Discriminator(self.shape).to(self.device)
        opt_g = torch.optim.Adam(gen.parameters(), lr=rs.lr_g, betas=(0.5, 0.999))
        opt_d_inner = torch.optim.Adam(disc.parameters(), lr=rs.lr_d, betas=(0.5, 0.999))
        saved = self._load_state()
        if saved is not None:
            disc.load_state_dict(saved["disc"])
            opt_d_inner.load_state_dict(saved["opt_d"])
            opt_g.load_state_dict(saved["opt_g"])
        total_steps = int(saved["steps"]) if saved is not None else 0

        private = rs.noise_multiplier > 0
        if private:
            # loss_reduction="sum": per-sample gradients are those of each record's own loss; the
            # DPOptimizer then divides the noisy sum by the *expected* batch size (not the realised
            # Poisson size, which would leak it).
            d_model = GradSampleModule(disc, loss_reduction="sum")
            opt_d = DPOptimizer(opt_d_inner, noise_multiplier=rs.noise_multiplier, max_grad_norm=rs.max_grad_norm,
                                expected_batch_size=expected_batch, loss_reduction="mean")
        else:
            d_model, opt_d = disc, opt_d_inner

        sampler = torch.Generator(device="cpu").manual_seed(rs.seed)
        d_losses, g_losses = [], []
        bar = tqdm(range(rs.steps), desc=f"{self.label} D/G steps", unit="step", disable=not self.progress,
                   leave=False)
        for _ in bar:
            # --- D step: one DP-SGD release on a Poisson batch ------------------------------------
            mask = torch.rand(n, generator=sampler) < rs.sample_rate  # (N,) Bernoulli(q)
            idx = mask.nonzero().squeeze(1).to(self.device)
            xb, yb = self.x[idx], self.y[idx]  # (b, C, H, W), (b,)
            b = len(idx)
            with torch.no_grad():
                fake = gen(gen.sample_latent(b, device=self.device), yb) if b else xb
            opt_d.zero_grad(set_to_none=True)
            if b:
                real_logits = d_model(xb, yb)
                fake_logits = d_model(fake, yb)
                loss_d = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits), reduction="sum")
                          + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits), reduction="sum"))
                loss_d.backward()
                d_losses.append(loss_d.item() / b)
            elif private:
                # An empty Poisson batch still releases pure noise; give every parameter a zero-row
                # per-sample gradient so the optimizer adds it (skipping would reveal the batch was empty).
                for p in disc.parameters():
                    p.grad_sample = torch.zeros((0, *p.shape), device=self.device)
            if b or private:
                opt_d.step()
            opt_d.zero_grad(set_to_none=True)  # also clears grad_sample before the G pass

            # --- G step: through D with hooks off and D frozen ------------------------------------
            if private:
                d_model.disable_hooks()
            for p in disc.parameters():
                p.requires_grad_(False)
            yg = torch.randint(0, self.shape.num_classes, (expected_batch,), device=self.device)
            logits = disc(gen(gen.sample_latent(expected_batch, device=self.device), yg), yg)
            loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            for p in disc.parameters():
                p.requires_grad_(True)
            if private:
                d_model.enable_hooks()
            g_losses.append(loss_g.item())
            if d_losses:
                bar.set_postfix(d=f"{d_losses[-1]:.3f}", g=f"{g_losses[-1]:.3f}")

        if private:
            d_model._close()  # remove Opacus hooks; `disc` is the plain module again
        self._save_state({"disc": disc.state_dict(), "opt_d": opt_d_inner.state_dict(),
                          "opt_g": opt_g.state_dict(), "steps": total_steps + rs.steps})
        metrics = {
            "d-loss": float(np.mean(d_losses)) if d_losses else 0.0,
            "g-loss": float(np.mean(g_losses)) if g_losses else 0.0,
            "local-steps": rs.steps,
            "train-seconds": time.perf_counter() - start,
        }
        out = {k: v.detach().cpu() for k, v in gen.state_dict().items()}
        return out, metrics
