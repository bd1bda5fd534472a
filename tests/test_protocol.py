"""Everything that leaves a site in a full round is a declared generator parameter or a declared metric."""

from __future__ import annotations

import numpy as np
import torch

from common import protocol as P
from common.models import GanShape, Generator
from tests.spine_helpers import fast_config, run


def test_only_generator_parameters_and_declared_metrics_leave_a_site(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    seen = []
    run(cfg, k=3, tap=seen.append)
    shape = GanShape(channels=1, image_size=8, num_classes=10, latent_dim=cfg.gan_latent_dim, width=cfg.gan_width)
    expected = {k: (tuple(v.shape), torch.float32) for k, v in Generator(shape).state_dict().items()}
    gan_replies = [m for m in seen if m.metadata.message_type == P.TRAIN_GAN]
    info_replies = [m for m in seen if m.metadata.message_type == P.QUERY_INFO]
    assert len(gan_replies) == 3 and len(info_replies) == 3
    # nothing else was sent: one reply per site to each of the four message types
    types = sorted(m.metadata.message_type for m in seen)
    assert types == sorted([P.TRAIN_GAN, P.QUERY_INFO, P.EVALUATE_CLASSIFIER, P.QUERY_AUDIT] * 3)
    for reply in seen:
        if reply.metadata.message_type == P.EVALUATE_CLASSIFIER:
            assert set(reply.content.keys()) == {P.REPLY_METRICS}
            assert set(reply.content.metric_records[P.REPLY_METRICS].keys()) == set(P.EVAL_REPLY_METRICS)
        if reply.metadata.message_type == P.QUERY_AUDIT:
            assert set(reply.content.keys()) == {P.REPLY_DIAGNOSTIC}
            assert not reply.content.array_records  # aggregates only, no arrays of records
            assert reply.content.config_records[P.REPLY_DIAGNOSTIC]["kind"] == "diagnostic"
    for reply in gan_replies:
        assert not reply.has_error()
        content = reply.content
        assert set(content.keys()) == {P.REPLY_GENERATOR, P.REPLY_METRICS}
        arrays = content.array_records[P.REPLY_GENERATOR]
        assert set(arrays.keys()) == set(expected)
        for name, arr in arrays.items():
            value = arr.numpy()
            assert value.shape == expected[name][0], name
            assert value.dtype == np.float32, name
            assert np.isfinite(value).all()
        assert set(content.metric_records[P.REPLY_METRICS].keys()) <= set(P.GAN_REPLY_METRICS)
        assert not content.config_records  # no free-form strings
    for reply in info_replies:
        content = reply.content
        assert set(content.keys()) == {P.REPLY_INFO}
        assert set(content.config_records[P.REPLY_INFO].keys()) == set(P.INFO_KEYS)
        assert not content.array_records and not content.metric_records


def test_validate_reply_rejects_extra_missing_wrong_and_nan():
    spec = {"w": P.ArraySpec((2, 3), "float32")}
    good = {"w": np.zeros((2, 3), np.float32)}
    assert P.validate_reply(good, {"epsilon": 1.0}, spec, P.GAN_REPLY_METRICS) == []
    assert P.validate_reply({**good, "data": np.zeros(3, np.float32)}, {}, spec, {})[0].startswith("undeclared arrays")
    assert P.validate_reply({}, {}, spec, {})[0].startswith("missing arrays")
    assert "shape" in P.validate_reply({"w": np.zeros((3, 2), np.float32)}, {}, spec, {})[0]
    assert "dtype" in P.validate_reply({"w": np.zeros((2, 3), np.float64)}, {}, spec, {})[0]
    assert "NaN" in P.validate_reply({"w": np.full((2, 3), np.nan, np.float32)}, {}, spec, {})[0]
    assert "undeclared metric" in P.validate_reply(good, {"labels-histogram": 3.0}, spec, P.GAN_REPLY_METRICS)[0]
