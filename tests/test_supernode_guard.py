"""The approved-code guard of a site's SuperNode, in-process: which bundles reach Flower's store.

`tests/test_hostile_coordinator.py` runs real SuperNodes against a rogue bundle; this file drives the guard's
wrapper of Flower's bundle-receiving step directly, with the bundles and hashes a hostile SuperLink chooses.
"""

from __future__ import annotations

import hashlib
import io
import time
import zipfile

import pytest
from flwr.app import Message, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.supercore.fab import Fab
from flwr.supernode import start_client_internal as sci

from fedsynth.ops import supernode_guard
from fedsynth.ops.approved_code import bundle_digest


def _bundle(source: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("client/app.py", source)
    return out.getvalue()


APPROVED = _bundle("approved = True\n")
ROGUE = _bundle("import os\nos.system('copy the records somewhere')\n")


def _message() -> Message:
    """A message of run 7 as the SuperNode pulls it (the guard replies to it when it refuses the run's bundle)."""
    metadata = Metadata(run_id=7, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type="train.gan")
    return make_message(metadata, RecordDict())


@pytest.fixture
def guarded(monkeypatch):
    """The guard installed over a stand-in of Flower's step; returns pull(run_hash, fab) -> stored or refused."""
    stored: list[bytes] = []
    refusals: list[str] = []

    def flower_step(*, receive, get_fab, state, object_store, **_):  # what Flower does with the bundle it gets
        receive()
        fab = get_fab(state["run_fab_hash"], 7)
        stored.append(fab.content)  # Flower's store_fab, which keys it by sha256(content)
        return 7

    monkeypatch.setattr(sci, "_pull_and_store_message", flower_step)
    monkeypatch.setattr(sci, "_insert_message", lambda reply, state, store: refusals.append(reply.error.reason))
    supernode_guard.install({bundle_digest(APPROVED)})

    def pull(run_fab_hash: str, fab: Fab) -> str:
        before = len(stored), len(refusals)
        sci._pull_and_store_message(receive=lambda: (_message(), None), get_fab=lambda h, run: fab,
                                    state={"run_fab_hash": run_fab_hash}, object_store=None)
        if len(stored) > before[0]:
            return "stored"
        assert len(refusals) > before[1]
        return "refused: " + refusals[-1]

    return pull


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_an_approved_bundle_is_stored_and_a_rogue_one_refused(guarded):
    assert guarded(_sha(APPROVED), Fab(_sha(APPROVED), APPROVED, {})) == "stored"
    verdict = guarded(_sha(ROGUE), Fab(_sha(ROGUE), ROGUE, {}))
    assert verdict.startswith("refused") and bundle_digest(ROGUE) in verdict


def test_a_rogue_bundle_sent_without_a_hash_after_an_approved_one_is_refused(guarded):
    # Flower stores a bundle whose hash_str is empty under its content's hash without comparing; a guard that
    # remembered its verdicts under the hash the SuperLink names passed the second bundle unread.
    assert guarded(_sha(APPROVED), Fab("", APPROVED, {})).startswith("refused")  # no hash: nothing to hold it to
    assert guarded(_sha(APPROVED), Fab(_sha(APPROVED), APPROVED, {})) == "stored"
    assert guarded(_sha(ROGUE), Fab("", ROGUE, {})).startswith("refused")
    assert guarded(_sha(ROGUE), Fab(_sha(ROGUE), ROGUE, {})).startswith("refused")


def test_bytes_that_are_not_the_runs_bundle_are_refused(guarded):
    # the run names the approved bundle's hash, the SuperLink sends other bytes (or the reverse): the task would
    # load whatever is stored under the run's hash, so the guard refuses any mismatch before anything is stored
    assert "is not the sha256" in guarded(_sha(APPROVED), Fab(_sha(APPROVED), ROGUE, {}))
    assert "is not the sha256" in guarded(_sha(ROGUE), Fab(_sha(APPROVED), APPROVED, {}))
    assert "is not the sha256" in guarded(_sha(APPROVED), Fab(_sha(ROGUE), ROGUE, {}))
