"""The networks scale with the image: G and D get one more stage per doubling past 32 pixels."""

from __future__ import annotations

import pytest
import torch

from common.learner import ConvNet
from common.models import Discriminator, GanShape, Generator, UpsampleConv2d


@pytest.mark.parametrize("size,stages,bottom", [(8, 2, 2), (28, 2, 7), (32, 2, 8), (48, 3, 6), (64, 3, 8),
                                                 (128, 4, 8)])
def test_the_gan_halves_the_image_until_the_map_is_at_most_8x8(size, stages, bottom):
    shape = GanShape(channels=3, image_size=size, num_classes=3, latent_dim=8, width=16)
    assert shape.stages == stages and size >> stages == bottom
    gen, disc = Generator(shape), Discriminator(shape, width=4)
    y = torch.tensor([0, 2])
    images = gen(gen.sample_latent(2), y)
    assert images.shape == (2, 3, size, size) and images.abs().max() <= 1
    adv, logits = disc(images, y)
    assert adv.shape == (2,) and logits.shape == (2, 3)
    # the linear layers see the bottom map only: their size does not grow with the image
    assert gen.project[0].out_features == (16 << (stages - 1)) * bottom * bottom
    assert disc.linear.in_features == (4 << (stages - 1)) * bottom * bottom


def test_up_to_32_pixels_the_networks_are_the_ones_every_grayscale_result_used():
    """The stage rule must not change a 28x28 or 32x32 network (saved generators stay loadable)."""
    gen = Generator(GanShape(1, 28, 10, width=24))
    shapes = {k: tuple(v.shape) for k, v in gen.state_dict().items()}
    assert shapes["project.0.weight"] == (48 * 7 * 7, 128)
    assert shapes["upsample.2.weight"] == (24, 48, 3, 3) and shapes["upsample.6.weight"] == (12, 24, 3, 3)
    assert shapes["upsample.9.weight"] == (1, 12, 3, 3) and len(gen.upsample) == 11
    disc = Discriminator(GanShape(1, 28, 10, width=24), width=16)
    assert disc.features[2].weight.shape == (32, 16, 4, 4) and disc.linear.in_features == 32 * 7 * 7


def test_the_fused_upsampling_convolution_is_nearest_upsampling_then_the_convolution():
    """UpsampleConv2d computes Upsample(2, nearest) + Conv2d(3, padding=1) with the same weights, values and
    gradients (so generators saved before it load and draw the same images), at odd and even sides."""
    torch.manual_seed(0)
    fused = UpsampleConv2d(6, 5).double()
    plain = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2, mode="nearest"),
                                torch.nn.Conv2d(6, 5, 3, padding=1)).double()
    plain[1].load_state_dict(fused.state_dict())
    assert set(fused.state_dict()) == {"weight", "bias"}  # the phase taps are not saved
    for side in (7, 8):
        x = torch.randn(3, 6, side, side, dtype=torch.float64, requires_grad=True)
        out_fused, out_plain = fused(x), plain(x)  # (3, 5, 2 side, 2 side)
        assert out_fused.shape == out_plain.shape == (3, 5, 2 * side, 2 * side)
        assert torch.allclose(out_fused, out_plain, atol=1e-12)
        g = torch.randn_like(out_plain)
        grads_fused = torch.autograd.grad(out_fused, (x, fused.weight, fused.bias), g)
        grads_plain = torch.autograd.grad(out_plain, (x, plain[1].weight, plain[1].bias), g)
        for a, b in zip(grads_fused, grads_plain):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("channels,size,resolution", [(1, 28, 0), (3, 32, 0), (3, 64, 32), (1, 8, 0)])
def test_the_generator_hands_out_images_in_the_standard_layout(channels, size, resolution):
    """G computes channels-last inside; its images must come out with standard strides (channel stride H*W even
    for one channel), the layout the discriminator's per-sample gradients are right for (client.dpsgd)."""
    gen = Generator(GanShape(channels, size, 3, latent_dim=8, width=8, resolution=resolution))
    images = gen(torch.randn(2, 8), torch.tensor([0, 2]))  # (2, C, S, S)
    assert images.stride() == (channels * size * size, size * size, size, 1)


def test_a_gan_drawing_at_a_smaller_side_makes_and_judges_full_size_images():
    """gan-resolution: G's 32-pixel drawing is resized to 64 by a fixed last layer; D averages its input to 32."""
    shape = GanShape(channels=3, image_size=64, num_classes=2, latent_dim=8, width=16, resolution=32)
    same_at_32 = GanShape(channels=3, image_size=32, num_classes=2, latent_dim=8, width=16)
    gen, disc = Generator(shape), Discriminator(shape, width=4)
    # the same parameters as the 32-pixel networks: the resizing has none
    assert ({k: v.shape for k, v in gen.state_dict().items()}
            == {k: v.shape for k, v in Generator(same_at_32).state_dict().items()})
    assert ({k: v.shape for k, v in disc.state_dict().items()}
            == {k: v.shape for k, v in Discriminator(same_at_32, width=4).state_dict().items()})
    y = torch.tensor([0, 1])
    images = gen(gen.sample_latent(2), y)
    assert images.shape == (2, 3, 64, 64) and images.abs().max() <= 1
    # D of a 64-pixel image == D of that image averaged 2x2 down to 32 pixels
    small = torch.nn.functional.avg_pool2d(images, 2)
    torch.testing.assert_close(disc(images, y)[0], disc(small, y)[0])
    with pytest.raises(ValueError, match="at most the image side 32 \\(and at least 8\\)"):
        Generator(GanShape(3, 32, 2, resolution=64))


def test_a_side_the_gan_cannot_halve_is_refused_with_a_size_to_use():
    with pytest.raises(ValueError, match=r"multiple of 16.*such as 96"):
        Generator(GanShape(3, 100, 2))


def test_the_learner_halves_64x64_faces_first_and_keeps_the_small_network_below_48_pixels():
    small, large = ConvNet(3, 2, 32), ConvNet(3, 2, 64)
    assert sum(p.numel() for p in large.parameters()) > sum(p.numel() for p in small.parameters())
    assert large.body[0].stride == (2, 2) and small.body[0].stride == (1, 1)
    large.eval()
    assert large(torch.rand(2, 3, 64, 64)).shape == (2, 2)
