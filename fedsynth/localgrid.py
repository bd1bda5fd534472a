"""An in-process Flower Grid: the real ServerApp and ClientApp objects, no Ray, no network.

Messages are real ``flwr.app.Message`` objects handed to the real ``ClientApp`` (so mods, handler
registration and error replies behave as in Flower); each virtual site keeps its own ``Context``.
Used by ``fedsynth simulate --engine inprocess`` (the default: starts in well under a second) and
by the tests. ``drop_nodes`` makes sites that never answer, ``tap`` sees every reply (the protocol
test uses it to inspect everything that leaves a site).

The sites of one round work at once, as real sites on their own machines do: each in a thread of its own
with the machine's cores shared out among them (:func:`site_workers`); replies are handed back in the
order the messages were sent, whatever order they finish in.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 0


def set_task_identity(run_id: int = 1) -> None:
    """Flower's Message() reads the run id from TaskIdentity, set by Flower's own runtimes."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVER_NODE_ID
    TaskIdentity.task_id = 1


def site_workers(messages: int, cores: int | None = None) -> tuple[int, int]:
    """(sites that work at once, torch threads each) for a round of ``messages`` requests on ``cores`` cores
    (default: torch's thread count, i.e. the cores this process may use).

    Why at once: a DP-GAN site step is many small operations, which two threads speed up far less than twice
    (``tests/benchmarks/bench_parallel_sites.py``), so on a machine with fewer cores than sites, one thread per
    site with all sites together finishes a round sooner than the sites one after another with every core each.
    Up to twice as many sites as cores work all at once (three sites on two cores share them evenly, where two
    at a time would leave one core idle while the third works alone); more sites than that take turns, one per
    core. Each site gets an equal share of the cores, at least one thread. One core, or a GPU, and the sites
    take turns: there is nothing to share out, or they would share one device.
    """
    cores = cores or torch.get_num_threads()
    if messages <= 1 or cores <= 1 or torch.cuda.is_available():
        return 1, cores
    workers = messages if messages <= 2 * cores else cores
    return workers, max(1, cores // workers)


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 *, drop_nodes: Iterable[int] = (), tap: Callable[[Message], None] | None = None,
                 run_id: int = 1, parallel: bool = True) -> None:
        set_task_identity(run_id)
        self.client_app = client_app
        self.run_config = run_config
        self.nodes = {1000 + i: Context(run_id=run_id, node_id=1000 + i, node_config=dict(nc), state=RecordDict(),
                                        run_config=dict(run_config)) for i, nc in enumerate(node_configs)}
        self.drop_nodes = set(drop_nodes)
        self.tap = tap
        self.parallel = parallel  # False: the sites of a round work one after another
        self._replies: dict[str, Message] = {}
        self._run: Any = None

    # --- Grid API -----------------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = [uuid.uuid4().hex for _ in messages]
        for mid, msg in zip(ids, messages):
            msg.metadata.__dict__["_message_id"] = mid
        workers, threads = site_workers(sum(map(self._live, messages))) if self.parallel else (1, 0)
        if workers == 1:
            # one after another, each reply tapped before the next site works (a tap that drops sites acts at once)
            for mid, msg in zip(ids, messages):
                if self._live(msg):  # else a dead site: the message is never answered
                    self._keep(mid, msg, self._answer(msg))
            return ids
        work = [(mid, msg) for mid, msg in zip(ids, messages) if self._live(msg)]
        for (mid, msg), reply in zip(work, self._answer_at_once([msg for _, msg in work], workers, threads)):
            self._keep(mid, msg, reply)
        return ids

    def _live(self, msg: Message) -> bool:
        """Whether the site ``msg`` is addressed to exists and answers (``drop_nodes``: sites that never do)."""
        return msg.metadata.dst_node_id in self.nodes and msg.metadata.dst_node_id not in self.drop_nodes

    def _keep(self, mid: str, msg: Message, reply: Message) -> None:
        reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
        reply.metadata.__dict__["_reply_to_message_id"] = mid
        if self.tap is not None:
            self.tap(reply)
        self._replies[mid] = reply

    def _answer(self, msg: Message) -> Message:
        """The reply of the site ``msg`` is addressed to."""
        try:
            # A real message crosses the network: the site gets its own copy (Flower's SecAgg+ workflow
            # sends one content object to every site, and its mod edits what it receives).
            return self.client_app(copy.deepcopy(msg), self.nodes[msg.metadata.dst_node_id])
        except Exception as err:  # the ClientApp crashed: Flower turns this into an error reply
            return Message(error=Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    def _answer_at_once(self, messages: list[Message], workers: int, threads: int) -> list[Message]:
        """The sites' replies, in the order of ``messages``, ``workers`` sites working at once with ``threads``
        torch threads each."""
        main_threads = torch.get_num_threads()
        # each worker thread first sets its own share of the cores; map hands the replies back in message order
        with ThreadPoolExecutor(workers, thread_name_prefix="site-worker", initializer=torch.set_num_threads,
                                initargs=(threads,)) as pool:
            replies = list(pool.map(self._answer, messages))
        torch.set_num_threads(main_threads)  # the coordinator's work after the round has every core again
        return replies

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_inprocess(server_main: Callable[[Grid, Context], Any], client_app: ClientApp, run_config: dict[str, Any],
                  node_configs: list[dict[str, Any]], **grid_kwargs: Any) -> Any:
    """Run ``server_main`` against in-process sites; returns what the server function returns."""
    grid = LocalGrid(client_app, node_configs, run_config, **grid_kwargs)
    ctx = Context(run_id=1, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config))
    return server_main(grid, ctx)
