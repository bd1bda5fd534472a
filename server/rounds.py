"""One exchange with the sites: push requests, collect replies until a deadline, sort the outcome.

Flower's ``Grid.send_and_receive`` of a real ServerApp polls every 3 s (flower-notes §2.4); pushing and
pulling ourselves lets us poll fast and stop exactly at the deadline. A site that does not answer in
time is simply missing from ``ok`` and ``errors`` and listed in ``missing`` (dead nodes look online
for up to a minute, so the deadline is what protects the run).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from common import protocol as P

log = logging.getLogger("fedsynth.coordinator")


@dataclass
class Exchange:
    ok: list[Message] = field(default_factory=list)  # replies with content
    errors: list[Message] = field(default_factory=list)  # error replies (refusals, site crashes)
    missing: list[int] = field(default_factory=list)  # node ids that did not answer before the deadline


def send_collect(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.2) -> Exchange:
    """Push ``messages`` and pull their replies until all arrived or ``timeout`` seconds passed."""
    ids = list(grid.push_messages(messages))
    dst = {mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)}
    pending = set(mid for mid in ids if mid)
    out = Exchange()
    deadline = time.monotonic() + timeout
    while pending:
        for reply in grid.pull_messages(list(pending)):
            request_id = reply.metadata.reply_to_message_id
            pending.discard(request_id)
            if request_id in dst:
                # Attribute every reply to the site the request went to: when a site is unreachable the
                # SuperLink answers in its place, with its own id as the sender.
                reply.metadata.__dict__["_src_node_id"] = dst[request_id]
            (out.errors if reply.has_error() else out.ok).append(reply)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    out.missing = [dst[mid] for mid in pending]
    for reply in out.errors:
        code = reply.error.code
        log.warning("site %s answered with an error (%s): %s", reply.metadata.src_node_id,
                    P.REFUSAL_NAMES.get(code, f"code {code}"), (reply.error.reason or "").strip()[:500])
    for node in out.missing:
        log.warning("site %s did not answer within %.0f s", node, timeout)
    return out


def broadcast(grid: Grid, records: dict, message_type: str, group_id: str, timeout: float,
              nodes: list[int] | None = None) -> Exchange:
    """Send the same records to every site (or to ``nodes``) and collect the replies until ``timeout``."""
    targets = sorted(grid.get_node_ids()) if nodes is None else nodes
    msgs = [Message(RecordDict(dict(records)), dst_node_id=n, message_type=message_type, group_id=group_id,
                    ttl=timeout + 60) for n in targets]
    return send_collect(grid, msgs, timeout)


def site_name(names: dict[int, str], node: int) -> str:
    """The site's name for a node id, or a stand-in for a node that never said its name."""
    return names.get(node, f"node-{node}")


def quorum_size(num_contacted: int, quorum: float) -> int:
    """Smallest number of valid replies that makes a round count (at least one)."""
    import math

    return max(1, math.ceil(quorum * num_contacted - 1e-9))


def failures_by_site(ex: Exchange, names: dict[int, str]) -> dict[str, str]:
    """Why each site gave no usable reply (its error reason, or a missed deadline), keyed by site name."""
    failed = {site_name(names, r.metadata.src_node_id): (r.error.reason or "")[:300] for r in ex.errors}
    failed.update({site_name(names, node): "no reply before the deadline" for node in ex.missing})
    return failed
