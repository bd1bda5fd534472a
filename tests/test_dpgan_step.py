"""The discriminator's DP step: each record's per-sample gradient is exactly its own (real, fake) pair's."""

from __future__ import annotations

import copy

import torch
from opacus import GradSampleModule

from client.dpgan import discriminator_loss
from common.models import Discriminator, GanShape


def test_per_sample_gradients_are_each_records_own_real_and_fake_pair() -> None:
    torch.manual_seed(0)
    shape = GanShape(channels=1, image_size=16, num_classes=3, latent_dim=8, width=8)
    disc = Discriminator(shape, width=4)
    reference = copy.deepcopy(disc)
    b = 5
    real, fake = torch.rand(b, 1, 16, 16), torch.rand(b, 1, 16, 16)  # (b, C, H, W)
    labels = torch.tensor([0, 2, 1, 2, 0])

    model = GradSampleModule(disc, loss_reduction="sum")
    loss, real_cls = discriminator_loss(model, real, fake, labels, ac_weight=0.3)
    loss.backward()
    assert real_cls.shape == (b, 3)

    for i in range(b):  # record i alone, plain autograd: its real row and its fake row
        reference.zero_grad()
        own, _ = discriminator_loss(reference, real[i:i + 1], fake[i:i + 1], labels[i:i + 1], ac_weight=0.3)
        own.backward()
        for (name, p), q in zip(disc.named_parameters(), reference.parameters()):
            assert p.grad_sample.shape == (b, *p.shape), name
            torch.testing.assert_close(p.grad_sample[i], q.grad, rtol=1e-4, atol=1e-6, msg=name)
    model._close()
