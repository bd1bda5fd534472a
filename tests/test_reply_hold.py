"""A site can hold every reply to a time its operator fixes (``min_reply_seconds``), so that how long its work took
-- which grows with its record count -- does not show in when the reply leaves (client.requests.hold_reply)."""

from __future__ import annotations

import logging
import time

import pytest
from client.app import app as client_app
from client.requests import hold_reply
from client.site import SiteSettings
from common import protocol as P
from fedsynth.localgrid import LocalGrid
from tests.deployment_helpers import minimal_site_yaml
from tests.spine_helpers import fast_config, nodes
from tests.test_faults import gan_request, send

HOLD = 1.5


def _timed(grid, request) -> tuple[float, object]:
    start, wall = time.monotonic(), time.time()
    reply = send(grid, 1000, request)
    took = time.monotonic() - start
    # the reply's own stamp (Flower's created_at, wall-clock, and the ttl derived from it) must not say when the
    # work ended either: it is the time the reply left, after any hold
    assert reply.metadata.created_at - wall >= took - 0.1, (reply.metadata.created_at - wall, took)
    return took, reply


def test_every_reply_refusals_included_leaves_no_sooner_than_the_hold(tmp_path):
    cfg = fast_config(tmp_path, num_rounds=1)
    held = [{**node, "min-reply-seconds": HOLD} for node in nodes(1)]
    grid = LocalGrid(client_app, held, cfg.to_flwr())
    took, reply = _timed(grid, P.InfoRequest())  # reads the data's shape: fast
    assert not reply.has_error() and took >= HOLD
    took, reply = _timed(grid, gan_request(cfg, width=10**6))  # refused before anything is built
    assert reply.has_error() and took >= HOLD
    # without the setting the same refusal is sent at once (so the hold above is what made it wait)
    took, reply = _timed(LocalGrid(client_app, nodes(1), cfg.to_flwr()), gan_request(cfg, width=10**6))
    assert reply.has_error() and took < HOLD


def test_work_longer_than_the_hold_leaves_at_its_next_multiple_and_the_operator_is_told(caplog):
    """The coordinator chooses how much work a request asks for, so it can make work outlast any fixed hold: such a
    reply leaves at the next whole multiple of the hold, telling how many holds the work took, not its duration."""
    site = SiteSettings(name="s", data="digits", state_dir=".", epsilon_budget=1.0, min_reply_seconds=2.0)
    slept: list[float] = []
    assert hold_reply(site, "train.gan", time.monotonic() - 0.5, sleep=slept.append) == pytest.approx(1.5, abs=0.1)
    assert slept and slept[0] == pytest.approx(1.5, abs=0.1)
    with caplog.at_level(logging.WARNING, logger="fedsynth.site"):
        for took, leaves_at in ((3.0, 4.0), (3.9, 4.0), (4.2, 6.0), (9.0, 10.0)):
            waited = hold_reply(site, "train.gan", time.monotonic() - took, sleep=slept.append)
            assert took + waited == pytest.approx(leaves_at, abs=0.1)
    assert len(slept) == 5 and "raise min_reply_seconds" in caplog.text


def test_the_operator_sets_the_hold_in_site_yaml(tmp_path):
    from fedsynth.ops.fields import DeployError
    from fedsynth.ops.site_cmd import load_site_config

    def config(**extra) -> SiteSettings:
        return load_site_config(minimal_site_yaml(tmp_path, **extra)).settings

    assert config().min_reply_seconds == 0.0
    site = config(min_reply_seconds=300)
    assert SiteSettings.from_node_config(site.to_node_config(), {}).min_reply_seconds == 300.0  # what the node carries
    with pytest.raises(DeployError, match="min_reply_seconds"):
        config(min_reply_seconds=-1)


def test_a_request_that_waited_for_another_does_not_carry_its_duration(tmp_path, monkeypatch):
    """Two requests at once, both well inside the hold: the second waits for the first's lock. Its hold must count
    from when its own work starts, and the first must leave before the lock is free, so that the second's departure
    slot does not tell whether the first's (record-dependent) work took more than hold - the second's work."""
    import threading
    from types import SimpleNamespace

    from flwr.app import Context, Message, RecordDict

    import client.requests as R
    from client.refusal import Refusal
    from fedsynth.localgrid import set_task_identity

    hold = 0.5
    site = SimpleNamespace(name="s", min_reply_seconds=hold, state_dir=tmp_path)
    monkeypatch.setattr(R, "resolve_site", lambda node_config, run_config: site)
    work: dict[str, float] = {}

    def fn(msg, context, s):
        time.sleep(work[msg.metadata.group_id])
        raise Refusal(P.REFUSED_BAD_REQUEST, "no")

    handler = R.site_handler(fn)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def second_leaves_after(first_work: float) -> float:
        work.update(first=first_work, second=0.3)
        took: dict[str, float] = {}

        def go(group: str, delay: float) -> None:
            set_task_identity(1)
            time.sleep(delay)
            start = time.monotonic()
            handler(Message(RecordDict(), dst_node_id=1, message_type="query.info", group_id=group), context)
            took[group] = time.monotonic() - start

        threads = [threading.Thread(target=go, args=("first", 0.0)), threading.Thread(target=go, args=("second", 0.02))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return took["second"]

    # the first's work 0.15 s or 0.25 s: counted from its arrival, the second (0.3 s of work) left at 1 or 2 holds
    assert second_leaves_after(0.15) == pytest.approx(second_leaves_after(0.25), abs=0.1)


def test_a_reply_keeps_the_hold_even_when_describing_a_failure_fails(tmp_path, monkeypatch):
    """An exception whose text itself raises made the refusal path fail, and the outer fallback answered at once,
    skipping the hold."""
    from types import SimpleNamespace

    from flwr.app import Context, Message, RecordDict

    import client.requests as R
    from fedsynth.localgrid import set_task_identity

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    site = SimpleNamespace(name="s", min_reply_seconds=0.4, state_dir=tmp_path)
    monkeypatch.setattr(R, "resolve_site", lambda node_config, run_config: site)

    def fn(msg, context, s):
        raise Unprintable()

    set_task_identity(1)
    start = time.monotonic()
    reply = R.site_handler(fn)(Message(RecordDict(), dst_node_id=1, message_type="query.info", group_id="g"),
                               Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={}))
    assert time.monotonic() - start >= 0.4
    assert reply.has_error() and reply.error.code == P.SITE_FAILURE
