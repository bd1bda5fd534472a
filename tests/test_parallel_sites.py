"""The in-process simulation's sites of one round work at once (fedsynth.localgrid), each with its share of the
cores, and the coordinator gets their replies in the order it sent its messages."""

from __future__ import annotations

import threading

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedsynth.localgrid import LocalGrid, site_workers


@pytest.mark.parametrize("messages, cores, expected", [
    (3, 2, (3, 1)),  # three sites on two cores: all at once, one thread each (two at a time would idle a core)
    (4, 2, (4, 1)),
    (5, 2, (2, 1)),  # more than twice the cores: one site per core at a time
    (100, 16, (16, 1)),
    (2, 8, (2, 4)),  # fewer sites than cores: the cores shared out
    (1, 2, (1, 2)),  # one site keeps every core
    (3, 1, (1, 1)),  # one core: the sites take turns
])
def test_how_many_sites_work_at_once(messages, cores, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert site_workers(messages, cores) == expected


def test_on_a_gpu_the_sites_take_turns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert site_workers(3, 2) == (1, 2)


def _grid(app: ClientApp, sites: int, **kwargs) -> LocalGrid:
    return LocalGrid(app, [{"partition-id": i} for i in range(sites)], {}, **kwargs)


def _queries(grid: LocalGrid) -> list[Message]:
    return [grid.create_message(RecordDict(), "query", node, group_id="1") for node in grid.get_node_ids()]


@pytest.fixture
def four_threads():
    """A process that may use 4 cores, whatever this machine has (site_workers reads torch's thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


def test_the_sites_of_a_round_work_at_once_and_reply_in_the_order_sent(four_threads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    app = ClientApp()
    together = threading.Barrier(3, timeout=60)  # passes only when all three sites are working at the same time
    order = []

    @app.query()
    def answer(msg: Message, context: Context) -> Message:
        together.wait()
        order.append(context.node_id)  # the order the sites finish in is not the order of the replies
        reply = RecordDict({"site": ConfigRecord({"node": context.node_id, "threads": torch.get_num_threads()})})
        return Message(reply, reply_to=msg)

    grid = _grid(app, 3)
    messages = _queries(grid)
    replies = list(grid.send_and_receive(messages))
    assert [r.has_error() for r in replies] == [False] * 3
    assert [r.content["site"]["node"] for r in replies] == [m.metadata.dst_node_id for m in messages]
    assert [r.content["site"]["threads"] for r in replies] == [1] * 3  # 4 cores // 3 sites
    assert torch.get_num_threads() == 4  # the coordinator has its cores back after the round
    assert sorted(order) == sorted(m.metadata.dst_node_id for m in messages)


def test_a_site_that_crashes_answers_with_an_error_and_the_others_still_reply(four_threads, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    app = ClientApp()

    @app.query()
    def answer(msg: Message, context: Context) -> Message:
        if context.node_id == 1001:
            raise RuntimeError("this site fails")
        return Message(RecordDict(), reply_to=msg)

    grid = _grid(app, 3, drop_nodes=[1002])
    replies = list(grid.send_and_receive(_queries(grid)))
    assert [(r.metadata.src_node_id, r.has_error()) for r in replies] == [(1000, False), (1001, True)]
    assert "this site fails" in replies[1].error.reason


def test_without_parallel_the_sites_take_turns(four_threads):
    app = ClientApp()
    threads = []

    @app.query()
    def answer(msg: Message, context: Context) -> Message:
        threads.append(threading.current_thread())
        return Message(RecordDict(), reply_to=msg)

    grid = _grid(app, 3, parallel=False)
    assert len(list(grid.send_and_receive(_queries(grid)))) == 3
    assert threads == [threading.main_thread()] * 3  # every site answered in the coordinator's own thread, in turn
