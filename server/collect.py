"""One exchange with the sites: send typed requests, collect typed replies until a deadline, sort them.

Flower's ``Grid.send_and_receive`` of a real ServerApp polls every 3 s; pushing and pulling ourselves
lets us poll fast and stop exactly at the deadline. Every reply is decoded through ``common.protocol``
(anything undeclared is rejected, never read) and attributed to the site the request went to. A site
that does not answer in time is listed as missing (a dead node looks online for up to a minute, so the
deadline is what protects the run).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from flwr.app import Message
from flwr.serverapp import Grid

from common import protocol as P

log = logging.getLogger("fedsynth.coordinator")


@dataclass
class Collected:
    """The outcome of one exchange: typed replies by node, and why each other node gave none."""

    replies: dict[int, Any] = field(default_factory=dict)  # node -> decoded reply (a protocol class)
    failures: dict[int, str] = field(default_factory=dict)  # node -> refusal text, rejection or timeout
    codes: dict[int, int] = field(default_factory=dict)  # node -> refusal code of an error reply
    missing: list[int] = field(default_factory=list)  # nodes that did not answer before the deadline
    bytes_received: dict[int, int] = field(default_factory=dict)

    def all_refused(self, code: int) -> bool:
        """True when nobody answered usefully and every node refused with ``code`` (nobody timed out)."""
        return not self.replies and not self.missing and bool(self.codes) and all(
            c == code for c in self.codes.values())


def _push_pull(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.2
               ) -> tuple[list[Message], list[int]]:
    """Push ``messages``; pull replies until all arrived or ``timeout`` passed -> (replies, missing nodes)."""
    ids = list(grid.push_messages(messages))
    dst = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    pending = set(mid for mid in ids if mid)
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            request_id = reply.metadata.reply_to_message_id
            pending.discard(request_id)
            if request_id in dst:
                # Attribute every reply to the site the request went to: when a site is unreachable the
                # SuperLink answers in its place, with its own id as the sender.
                reply.metadata.__dict__["_src_node_id"] = dst[request_id]
            replies.append(reply)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    return replies, [dst[mid] for mid in pending]


def exchange(grid: Grid, requests: dict[int, Any], reply_cls: type, group_id: str, timeout: float,
             check: Callable[[Any], list[str]] | None = None) -> Collected:
    """Send ``requests`` (node -> protocol request), decode and ``check`` each reply (problems -> rejected)."""
    messages = [req.as_request(node, group_id, ttl=timeout + 60) for node, req in requests.items()]
    raw, missing = _push_pull(grid, messages, timeout)
    out = Collected(missing=missing)
    for reply in raw:
        node = reply.metadata.src_node_id
        if reply.has_error():
            code = reply.error.code
            out.codes[node] = code
            out.failures[node] = (reply.error.reason or "").strip()[:500]
            log.warning("site %s refused (%s): %s", node, P.REFUSAL_NAMES.get(code, f"code {code}"), out.failures[node])
            continue
        try:
            decoded = reply_cls.from_message(reply)
        except P.ProtocolError as err:
            out.failures[node] = f"rejected: {err}"
            log.warning("rejected the reply of site %s: %s", node, err)
            continue
        problems = check(decoded) if check else []
        if problems:
            out.failures[node] = "rejected: " + "; ".join(problems[:5])
            log.warning("rejected the reply of site %s: %s", node, out.failures[node])
            continue
        out.replies[node] = decoded
        out.bytes_received[node] = decoded.num_bytes()
    for node in missing:
        out.failures[node] = "no reply before the deadline"
        log.warning("site %s did not answer within %.0f s", node, timeout)
    return out


def broadcast(grid: Grid, request: Any, reply_cls: type, group_id: str, timeout: float, nodes: list[int] | None = None,
              check: Callable[[Any], list[str]] | None = None) -> Collected:
    """The same request to every site (or to ``nodes``)."""
    targets = sorted(grid.get_node_ids()) if nodes is None else nodes
    return exchange(grid, {n: request for n in targets}, reply_cls, group_id, timeout, check)


def quorum_size(num_contacted: int, quorum: float) -> int:
    """Smallest number of valid replies that makes a round count (at least one)."""
    return max(1, math.ceil(quorum * num_contacted - 1e-9))
