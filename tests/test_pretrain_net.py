"""Pre-training the BN-statistics net on public data (``fedsynth pretrain-net``, run setting ``bn-net``)."""

from __future__ import annotations

import json

import pytest
import torch

from common.bnnet import BNNet, BNNetShape, load_net_file, net_file_payload
from common.config import RunConfig
from common.data import load_dataset
from fedsynth.cli import main
from fedsynth.pretrain import Augment, accuracy, augment_batch, check_net_fits, load_pretrained, pretrain_bnnet

torch.set_num_threads(1)  # tiny nets: one thread is fastest, and the suite shares 2 cores


@pytest.fixture(scope="module")
def digits8():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="module")
def trained(digits8, tmp_path_factory):
    train, test = digits8
    out = tmp_path_factory.mktemp("net") / "digits_net.pt"
    summary = pretrain_bnnet(train, out, width=8, head_norm=True, epochs=8, augment=None, test=test,
                             threads=1, progress=False)
    return out, summary


def test_file_loads_into_the_run_shape_and_the_run_config_validates(trained, digits8):
    out, summary = trained
    assert out.is_file() and summary["out"] == str(out)
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]  # atomic write left nothing behind
    net = BNNet(1, 10, 8, width=8, head_norm=True)
    net.load_state_dict(torch.load(out, map_location="cpu", weights_only=True)["state_dict"])  # strict: all keys, shapes
    cfg = RunConfig.from_mapping({"mode": "bnstats", "data": "digits", "bn-net": str(out), "bn-rounds": 0,
                                  "bn-layer-clips": summary["public_layer_clips"],
                                  **{k: v for k, v in summary["run_settings"].items() if k != "bn-net"}})
    assert cfg.bn_net == str(out) and cfg.bn_width == 8 and cfg.bn_head_norm is True
    assert len(cfg.bn_layer_clips.split(",")) == 4  # one public bound per norm layer (3 blocks + head norm)
    assert accuracy(net, digits8[1]) == pytest.approx(summary["test_accuracy"])


def test_accuracy_on_digits_test_is_well_above_chance(trained):
    _, summary = trained
    assert summary["test_accuracy"] > 0.7  # chance is 0.1
    assert summary["epochs"] == 8 and summary["seconds"] > 0 and summary["augment"] is None


def test_shape_mismatch_is_a_clear_error(trained, digits8):
    out, _ = trained
    with pytest.raises(ValueError, match="(?s)does not fit .* Set bn-width"):
        load_pretrained(out, BNNetShape(1, 10, 8, width=16, head_norm=True))  # run's bn-width differs
    with pytest.raises(ValueError, match="expects 1x16x16"):
        check_net_fits(BNNet(1, 10, 16, width=8), digits8[1])  # data not resized to the net's size
    with pytest.raises(ValueError, match="image_size=8"):
        pretrain_bnnet(digits8[0], out.parent / "x.pt", width=8, epochs=1,
                       test=load_dataset("digits", "test", image_size=12), progress=False)
    assert not (out.parent / "x.pt").exists()  # refused before any training


def test_augmentation_keeps_shape_and_range_and_is_reproducible(digits8):
    x = torch.as_tensor(load_dataset("digits", "test", image_size=28).images[:16])  # (16, 1, 28, 28)
    a = augment_batch(x, Augment(), torch.Generator().manual_seed(3))
    b = augment_batch(x, Augment(), torch.Generator().manual_seed(3))
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    assert torch.equal(a, b) and not torch.equal(a, x)
    with pytest.raises(ValueError, match="zoom"):
        Augment(zoom=(0.0, 1.0)).validate()


def test_cli_pretrain_net_end_to_end(tmp_path, capsys):
    out = tmp_path / "nets" / "net.pt"
    code = main(["pretrain-net", "--data", "digits", "--image-size", "8", "--width", "8", "--epochs", "3",
                 "--out", str(out), "--eval-data", "digits", "--augment", "light", "--threads", "1", "--quiet"])
    text = capsys.readouterr().out
    assert code == 0 and out.is_file()
    summary = json.loads(text[: text.index("\npretrained ")])
    assert summary["shape"] == {"in_channels": 1, "num_classes": 10, "image_size": 8, "width": 8, "head_norm": False,
                                "resolution": 8}
    assert 0 <= summary["test_accuracy"] <= 1 and summary["eval_accuracy"] is not None
    assert f"--set bn-net={out}" in text and "--set bn-resolution=8" in text and "benchmark only" in text
    load_pretrained(out, BNNetShape(1, 10, 8, width=8))


def test_cli_refuses_a_bad_image_size(tmp_path, capsys):
    code = main(["pretrain-net", "--data", "digits", "--image-size", "4", "--width", "8", "--epochs", "1",
                 "--out", str(tmp_path / "n.pt"), "--quiet"])
    assert code == 2 and "--image-size" in capsys.readouterr().err
    assert not (tmp_path / "n.pt").exists()


def test_a_net_file_says_the_side_it_was_trained_at_and_a_run_at_another_side_refuses_it(tmp_path):
    # a 64x64 run's net at 32 pixels and one at the full 64 have the very same parameter shapes (both end at
    # an 8x8 head map), so only the side the file records tells them apart
    at32, at64 = BNNetShape(3, 2, 64, width=4, resolution=32), BNNetShape(3, 2, 64, width=4)
    assert {k: v.shape for k, v in at32.build().state_dict().items()} == \
           {k: v.shape for k, v in at64.build().state_dict().items()}
    path = tmp_path / "net32.pt"
    torch.save(net_file_payload(at32.build()), path)
    assert load_net_file(str(path), at32)[1] == 32
    with pytest.raises(ValueError, match="trained at 32 pixels .* works at 64: set bn-resolution=32"):
        load_net_file(str(path), at64)
    with pytest.raises(ValueError, match="set bn-resolution=32"):
        load_pretrained(path, at64)
    # a bare state dict (written before files recorded their side) still loads, its side unknown
    bare = tmp_path / "bare.pt"
    torch.save(at64.build().state_dict(), bare)
    assert load_net_file(str(bare), at64)[1] is None
    with pytest.raises(ValueError, match="cannot read"):
        load_net_file(str(tmp_path / "missing.pt"), at64)


def test_a_net_file_without_its_side_is_refused_with_the_fix(tmp_path):
    shape = BNNetShape(1, 10, 8, width=4)
    path = tmp_path / "broken.pt"
    payload = net_file_payload(shape.build())
    del payload["side"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="lacks its side or weights; write it again with fedsynth pretrain-net"):
        load_net_file(str(path), shape)
