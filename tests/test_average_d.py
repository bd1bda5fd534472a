"""gan-average-d: the sites' discriminators are averaged like the generator, and each round starts from the average.

Each site's D is the output of its own DP-SGD steps (every iterate is covered by the round's charge), so sending it
costs no privacy; the coordinator's average reaches the next round's sites, which refuse one that is not a finite D
of the run's shape, before anything is charged.
"""

from __future__ import annotations

import numpy as np
import pytest

from client.app import app as client_app
from common import protocol as P
from common.models import Discriminator, GanShape
from fedsynth.localgrid import LocalGrid
from server.fedavg import weighted_average
from tests.spine_helpers import fast_config, nodes, run, spent
from tests.test_faults import gan_request, send


def _d_spec(req: P.GanTrainRequest) -> dict[str, P.ArraySpec]:
    shape = GanShape(req.channels, req.image_size, req.num_classes, req.latent_dim, req.width)
    return P.state_spec(Discriminator(shape, width=req.d_width).state_dict())


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in sorted(arrays)])


def test_a_site_sends_its_discriminator_only_when_asked_and_starts_from_the_average_it_is_sent(tmp_path):
    cfg = fast_config(tmp_path, epsilon=10.0, num_rounds=2)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    quiet = send(grid, 1000, gan_request(cfg, experiment="own-d", num_rounds=2))
    assert not quiet.has_error()
    assert P.GanTrainReply.from_message(quiet).discriminator == {}  # not asked: D stays at the site

    first = gan_request(cfg, experiment="shared-d", num_rounds=2, share_d=True)
    reply = P.GanTrainReply.from_message(send(grid, 1000, first))
    assert P.check_arrays(reply.discriminator, _d_spec(first)) == []
    own = reply.discriminator

    # round 2 from a D far from the site's own: the few small Adam steps leave D next to where it started
    start = {k: np.full_like(v, 0.05) for k, v in own.items()}
    second = gan_request(cfg, experiment="shared-d", num_rounds=2, server_round=2, share_d=True, discriminator=start)
    after = P.GanTrainReply.from_message(send(grid, 1000, second)).discriminator
    assert np.linalg.norm(_flat(after) - _flat(start)) < 0.1 * np.linalg.norm(_flat(after) - _flat(own))


@pytest.mark.parametrize("spoil", ["nan", "shape", "undeclared"])
def test_a_hostile_discriminator_is_refused_before_anything_is_spent(tmp_path, spoil):
    cfg = fast_config(tmp_path, epsilon=10.0, num_rounds=2)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    probe = gan_request(cfg, experiment="probe", share_d=True)
    d = {k: np.zeros(s.shape, np.float32) for k, s in _d_spec(probe).items()}
    name = sorted(d)[0]
    if spoil == "nan":
        d[name][...] = np.nan
    elif spoil == "shape":
        d[name] = np.zeros((3, 3), np.float32)
    else:
        d["backdoor"] = np.zeros(4, np.float32)
    reply = send(grid, 1000, gan_request(cfg, experiment="hostile-d", discriminator=d))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    assert "discriminator" in reply.error.reason
    assert all(e == 0.0 for e in spent(tmp_path))  # nothing charged, not even the census


def test_each_round_starts_from_the_weighted_average_of_the_last_rounds_discriminators(tmp_path, monkeypatch):
    import server.modes.dpgan as mode

    cfg = fast_config(tmp_path, num_rounds=2, experiment="exp-avg-d", gan_average_d=True)
    sent: dict[int, list[dict]] = {}
    real_request = mode.gan_request

    def recording(cfg_, shape, experiment, rnd, generator, discriminator=None):
        req = real_request(cfg_, shape, experiment, rnd, generator, discriminator)
        sent.setdefault(rnd, []).append(req.discriminator)
        return req

    monkeypatch.setattr(mode, "gan_request", recording)
    replies = []
    run(cfg, tap=replies.append)
    first = [P.GanTrainReply.from_message(m) for m in replies
             if m.metadata.message_type == P.TRAIN_GAN and m.metadata.group_id == "1" and not m.has_error()]
    assert len(first) == 3 and all(r.discriminator for r in first)
    assert sent[1] == [{}]  # round 1: every site's own new D
    expected = weighted_average([r.discriminator for r in first], [r.weight for r in first])
    (got,) = sent[2]
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7)


def test_secure_aggregation_keeps_each_discriminator_at_its_site(tmp_path):
    from common import secure_wire
    from server.modes.dpgan import shares_d

    assert not shares_d(fast_config(tmp_path, gan_average_d=True, secure_aggregation=True))
    cfg = fast_config(tmp_path)
    d = {k: np.zeros(s.shape, np.float32) for k, s in _d_spec(gan_request(cfg)).items()}
    with pytest.raises(ValueError, match="one model"):  # a D average never rides inside a secure request
        secure_wire.wrap_request(gan_request(cfg, discriminator=d))
    inner = secure_wire.unwrap_request(secure_wire.wrap_request(gan_request(cfg)))
    assert inner.discriminator == {} and not inner.share_d


def test_by_default_no_discriminator_leaves_a_site(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=2, experiment="exp-own-d")
    assert not cfg.gan_average_d  # design.md: the discriminator stays on site unless the run asks otherwise
    replies = []
    run(cfg, tap=replies.append)
    gan = [P.GanTrainReply.from_message(m) for m in replies if m.metadata.message_type == P.TRAIN_GAN
           and not m.has_error()]
    assert len(gan) == 6 and all(r.discriminator == {} for r in gan)
