"""A user's own central learner, as a package would ship it: ``learner = "tests.user_learner:tiny_cnn"``.

Used by tests of the pluggable learner (common.learner.learner_factory)."""

from torch import nn


def tiny_cnn(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """One conv layer, global pooling and a linear head: (B, C, H, W) -> (B, num_classes); no features()."""
    c, _, _ = image_shape
    return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, num_classes))


def wrong_output(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Returns one logit too many: refused before any run."""
    c, h, w = image_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, num_classes + 1))


NOT_A_FACTORY = 3
