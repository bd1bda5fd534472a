"""An in-process Flower Grid: the real ServerApp and ClientApp objects, no Ray, no network.

Messages are real ``flwr.app.Message`` objects handed to the real ``ClientApp`` (so mods, handler
registration and error replies behave as in Flower); each virtual site keeps its own ``Context``.
Used by ``fedsynth simulate --engine inprocess`` (the default: starts in well under a second) and
by the tests. ``drop_nodes`` makes sites that never answer, ``tap`` sees every reply (the protocol
test uses it to inspect everything that leaves a site).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable
from typing import Any

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


class LocalGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: list[dict[str, Any]], run_config: dict[str, Any],
                 *, drop_nodes: Iterable[int] = (), tap: Callable[[Message], None] | None = None,
                 run_id: int = 1) -> None:
        set_task_identity(run_id)
        self.client_app = client_app
        self.run_config = run_config
        self.nodes = {1000 + i: Context(run_id=run_id, node_id=1000 + i, node_config=dict(nc), state=RecordDict(),
                                        run_config=dict(run_config)) for i, nc in enumerate(node_configs)}
        self.drop_nodes = set(drop_nodes)
        self.tap = tap
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
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node in self.drop_nodes or node not in self.nodes:
                continue  # a dead site: the message is never answered
            try:
                # A real message crosses the network: the site gets its own copy (Flower's SecAgg+ workflow
                # sends one content object to every site, and its mod edits what it receives).
                reply = self.client_app(copy.deepcopy(msg), self.nodes[node])
            except Exception as err:  # the ClientApp crashed: Flower turns this into an error reply
                reply = Message(error=Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            if self.tap is not None:
                self.tap(reply)
            self._replies[mid] = reply
        return ids

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
