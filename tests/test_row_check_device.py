"""The row checks compute on the device the site trains on (client.row_check), checked without a GPU.

The "meta" device stands in for a GPU: its tensors hold no values, and torch refuses to mix them with CPU tensors, so
a check that left a tensor on the CPU, or computed on the CPU whatever device it was given, shows here. Only the
device plumbing is exercised (a meta tensor's values are stood in for by zeros, so the bitwise comparisons are
vacuous); whether a real GPU passes the check is for a machine that has one."""

from __future__ import annotations

import pytest
import torch

from client import row_check
from common.bnnet import BNNet
from common.models import Discriminator, GanShape, Generator


@pytest.fixture
def meta_reads(monkeypatch):
    """Tensor.cpu() of a meta tensor gives zeros of its shape (there are no values to copy); counts such reads."""
    reads = []
    real = torch.Tensor.cpu

    def cpu(self, *args, **kw):
        if self.device.type == "meta":
            reads.append(tuple(self.shape))
            return torch.zeros(self.shape, dtype=self.dtype)
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    return reads


@pytest.mark.parametrize("name", ["discriminator", "generator", "bnnet features", "bnnet gradients", "start-up"])
def test_each_check_computes_on_the_device_it_is_given(meta_reads, name):
    shape = GanShape(1, 16, 10)
    check = {
        "discriminator": lambda: row_check.discriminator_problems(Discriminator(shape, width=16), (1, 16, 16), 10,
                                                                  device="meta"),
        "generator": lambda: row_check.generator_problems(Generator(shape), shape.latent_dim, 10, device="meta"),
        "bnnet features": lambda: row_check.bnnet_problems(BNNet(1, 10, 16, 8), (1, 16, 16), 10, gradients=False,
                                                           device="meta"),
        "bnnet gradients": lambda: row_check.bnnet_problems(BNNet(1, 10, 16, 8), (1, 16, 16), 10,
                                                            device=torch.device("meta")),
        "start-up": lambda: row_check.training_problems((1, 16, 16), 10, ("dpgan", "bnstats"), device="meta"),
    }[name]
    assert check() == []  # (vacuous on meta: every row reads as zeros)
    assert meta_reads, f"the {name} check computed nothing on the device it was given"


def test_a_site_checks_the_gpu_a_run_may_train_on_before_it_starts(tmp_path, capsys, monkeypatch):
    """``fedsynth site`` checks the default widths on the CPU and, where a run may train on a GPU (site.yaml names
    one, or names no device and torch sees one), on that GPU too; a GPU that fails stops the site with the way out."""
    from fedsynth.cli import main
    from tests.deployment_helpers import minimal_site_yaml

    seen = []

    def problems(shape, classes, modes, device="cpu"):
        seen.append(torch.device(device).type)
        return ["a record's per-sample gradient of the discriminator changes"] if seen[-1] == "cuda" else []

    monkeypatch.setattr(row_check, "training_problems", problems)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "H100")
    for device, gpu_visible, checked in (("", False, ["cpu"]), ("cpu", True, ["cpu"]), ("", True, ["cpu", "cuda"]),
                                         ("cuda", True, ["cpu", "cuda"])):
        seen.clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda v=gpu_visible: v)
        monkeypatch.setattr(torch.cuda, "device_count", lambda v=gpu_visible: int(v))
        cfg = minimal_site_yaml(tmp_path, **({"device": device} if device else {}))
        code = main(["site", "--config", str(cfg), "--check", "--insecure"])
        err = capsys.readouterr().err
        assert seen == checked, (device, gpu_visible)
        assert code == (2 if "cuda" in checked else 0), err
        if code:
            assert "on cuda" in err and "device: cpu in site.yaml" in err
    # a GPU index the machine lacks is refused with the config, not a raw error from torch at the check
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code = main(["site", "--config", str(minimal_site_yaml(tmp_path, device="cuda:3")), "--check", "--insecure"])
    assert code == 2 and "names a GPU this machine does not have" in capsys.readouterr().err
