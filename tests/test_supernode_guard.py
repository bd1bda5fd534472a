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


PYPROJECT = '[project]\nname = "fedsynth"\nversion = "0.1.0"\n[tool.flwr.app]\npublisher = "fedsynth"\n'


def _bundle(source: str, *, pyproject: str = PYPROJECT, extra_manifest: tuple[str, ...] = (),
            comment: bytes = b"") -> bytes:
    """A bundle as Flower builds one: members, and a manifest of one ``name,sha256,bits`` line per member."""
    members = {"pyproject.toml": pyproject.encode(), "client/app.py": source.encode()}
    manifest = [f"{name},{hashlib.sha256(data).hexdigest()},{8 * len(data)}" for name, data in members.items()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        archive.writestr(".info/CONTENT", "\n".join([*manifest, *extra_manifest]))
        archive.comment = comment
    return out.getvalue()


APPROVED = _bundle("approved = True\n")
ROGUE = _bundle("import os\nos.system('copy the records somewhere')\n")


class _Run:  # what Flower's get_run returns, as far as the guard reads it
    run_id, fab_id, fab_version = 7, "fedsynth/fedsynth", "0.1.0"


def _message(group_id: str = "1", message_id: str | None = None, message_type: str = "train.gan", run_id: int = 7):
    """A message of run 7 and its object tree as the SuperNode pulls them (the guard replies to it when it refuses the
    run's bundle); its id is its content's unless ``message_id`` names another."""
    from flwr.supercore.inflatable.inflatable_object import get_object_tree

    metadata = Metadata(run_id=run_id, message_id="", src_node_id=0, dst_node_id=1, reply_to_message_id="",
                        group_id=group_id, created_at=time.time(), ttl=600.0, message_type=message_type)
    message = make_message(metadata, RecordDict())
    tree = get_object_tree(message)
    message.metadata.__dict__["_message_id"] = message.object_id if message_id is None else message_id
    return message, tree


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """The guard installed over a stand-in of Flower's step; returns pull(run_hash, fab) -> stored or refused."""
    stored: list[bytes] = []
    refusals: list[str] = []

    def flower_step(*, receive, get_run, get_fab, state, object_store, **_):  # what Flower does with a bundle
        if receive() is None:  # no message (or one the guard dropped)
            return None
        get_run(7)
        fab = get_fab(state["run_fab_hash"], 7)
        if state.get("config_fails"):  # Flower's get_fused_config_from_fab on a key the bundle does not declare
            raise ValueError(f"Key '{state['config_fails']}' is not present in the main dictionary")
        stored.append(fab.content)  # Flower's store_fab, which keys it by sha256(content)
        return 7

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))  # (the guard removes stale installs there)
    monkeypatch.setattr(sci, "_pull_and_store_message", flower_step)
    monkeypatch.setattr(sci, "_insert_message", lambda reply, state, store: refusals.append(reply.error.reason))
    supernode_guard.install({bundle_digest(APPROVED)})

    def pull(run_fab_hash: str, fab: Fab, run: object = _Run(), config_fails: str = "", **metadata: str) -> str:
        before = len(stored), len(refusals)

        def get_run(run_id: int) -> object:
            if isinstance(run, Exception):  # a GetRun answer Flower cannot decode
                raise run
            return run

        sci._pull_and_store_message(receive=lambda: _message(**metadata), get_run=get_run,
                                    get_fab=lambda h, run_id: fab, object_store=None,
                                    state={"run_fab_hash": run_fab_hash, "config_fails": config_fails})
        if len(stored) > before[0]:
            return "stored"
        return "refused: " + refusals[-1] if len(refusals) > before[1] else "dropped"

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


def _fab(content: bytes) -> Fab:
    return Fab(_sha(content), content, {})


def test_the_installed_release_passes_the_manifest_check():
    from fedsynth.ops.approved_code import installed_bundle

    assert len(bundle_digest(installed_bundle())) == 64  # Flower's own build: one manifest line per member


def test_a_manifest_naming_files_outside_the_bundle_is_refused(guarded, tmp_path):
    # Flower's installer hashes every path the manifest names (tmpdir / path: an absolute or '..' path reaches the
    # site's files) before the app runs, and sends the failure's text back: with the approved digest unchanged, an
    # extra line made an approved bundle a free oracle of which files the site holds.
    secret = tmp_path / "site-photo.jpg"
    secret.write_bytes(b"a record")
    probe = f"{secret},{_sha(b'a record')},64"
    for extra in ((probe,), (f"../../..{secret},{_sha(b'a record')},64",), ("client/app.py,00,1",)):
        crafted = _bundle("approved = True\n", extra_manifest=extra)
        verdict = guarded(_sha(crafted), _fab(crafted))
        assert verdict.startswith("refused") and "manifest" in verdict
    assert guarded(_sha(APPROVED), _fab(APPROVED)) == "stored"


def test_a_bundle_without_a_true_manifest_is_refused():
    from fedsynth.ops.approved_code import BundleError

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("pyproject.toml", PYPROJECT)
    with pytest.raises(BundleError, match="no manifest"):
        bundle_digest(out.getvalue())


def test_a_run_naming_another_app_or_version_is_refused(guarded):
    # A task loads apps/<the run's publisher.name.version>.<sha[:8]>, a folder Flower reuses when it exists.
    for fab_id, version in (("fedsynth/fedsynth", "0.0.9"), ("other/fedsynth", "0.1.0")):
        run = type("Run", (), {"run_id": 7, "fab_id": fab_id, "fab_version": version})()
        verdict = guarded(_sha(APPROVED), _fab(APPROVED), run=run)
        assert verdict.startswith("refused") and "names app" in verdict
    assert guarded(_sha(APPROVED), _fab(APPROVED)) == "stored"


def test_a_run_record_naming_another_run_is_refused(guarded):
    """Review s59: a SuperLink that answered the site's GetRun(7) with a record of run 8 (all else approved) made
    Flower store run 8 and give run 7's task no run: its ClientApp failed before reading the message, no reply ever
    came, and the SuperNode's loop waited for one for ever. It is refused, which answers the message."""
    other = type("Run", (), {"run_id": 8, "fab_id": "fedsynth/fedsynth", "fab_version": "0.1.0"})()
    verdict = guarded(_sha(APPROVED), _fab(APPROVED), run=other)
    assert verdict.startswith("refused") and "record of run 7 names run '8'" in verdict
    assert guarded(_sha(APPROVED), _fab(APPROVED)) == "stored"


def test_a_run_config_too_large_to_keep_is_refused(guarded):
    """Review s59: Flower keeps every run's config in the SuperNode's memory until it stops and hands all of it to each
    of the run's tasks; one run overriding a declared key with 32 MiB grew the SuperNode by 32 MiB, a run at a time."""
    big = type("Run", (), {"run_id": 7, "fab_id": "fedsynth/fedsynth", "fab_version": "0.1.0",
                           "override_config": {"bn-layer-clips": "1," * supernode_guard.MAX_RUN_RECORD_BYTES}})()
    verdict = guarded(_sha(APPROVED), _fab(APPROVED), run=big)
    assert verdict.startswith("refused") and "run record (config, status, ids) is larger than" in verdict
    # (review s59, seventh helper: the record's other free strings were kept as well, uncounted)
    status = type("Status", (), {})()
    status.details = "x" * supernode_guard.MAX_RUN_RECORD_BYTES
    odd = type("Run", (), {"run_id": 7, "fab_id": "fedsynth/fedsynth", "fab_version": "0.1.0", "status": status})()
    assert "is larger than" in guarded(_sha(APPROVED), _fab(APPROVED), run=odd)
    fair = type("Run", (), {"run_id": 7, "fab_id": "fedsynth/fedsynth", "fab_version": "0.1.0",
                            "override_config": {"num-rounds": 10, "device": "cpu", "bn-layer-clips": "auto"}})()
    assert guarded(_sha(APPROVED), _fab(APPROVED), run=fair) == "stored"


def test_a_supernode_keeps_a_bounded_number_of_runs(guarded, monkeypatch):
    """Review s59 (seventh helper): Flower drops no run record until the SuperNode stops; 2,000 runs of 60 KB each
    were all kept. A start keeps at most MAX_RUNS_PER_START runs; a run it keeps already goes on."""
    monkeypatch.setattr(supernode_guard, "MAX_RUNS_PER_START", 3)
    runs = [type("Run", (), {"run_id": i, "fab_id": "fedsynth/fedsynth", "fab_version": "0.1.0"})() for i in range(4)]
    for run in runs[:3]:  # runs Flower refuses after the guard's check (an undeclared config key) take no slot (R8)
        refused = guarded(_sha(APPROVED), _fab(APPROVED), run=run, run_id=run.run_id, config_fails="no-such-key")
        assert "could not accept this message" in refused
    for run in runs[:3]:
        assert guarded(_sha(APPROVED), _fab(APPROVED), run=run, run_id=run.run_id) == "stored"
    assert "keeps 3 runs" in guarded(_sha(APPROVED), _fab(APPROVED), run=runs[3], run_id=3)
    assert guarded(_sha(APPROVED), _fab(APPROVED), run=runs[0], run_id=0) == "stored"


def test_byte_variants_of_an_approved_bundle_are_bounded(guarded):
    """Review s59: the digest reads the members only, so the same approved code zipped with other bytes (a comment,
    junk before the archive, a padded member) made as many bundles as a coordinator liked, each kept in the
    SuperNode's memory and installed in a folder of its own, outside every limit. Bytes the members do not account
    for are refused, and a SuperNode start accepts at most MAX_BUNDLE_VARIANTS archives of one approved digest."""
    from fedsynth.ops.approved_code import BundleError

    padded = b"\0" * 100_000 + APPROVED  # zipfile reads an archive with data in front of it
    with pytest.raises(BundleError, match="do not account for"):
        bundle_digest(padded)
    assert "do not account for" in guarded(_sha(padded), _fab(padded))
    variants = [_bundle("approved = True\n", comment=str(i).encode()) for i in range(supernode_guard.MAX_BUNDLE_VARIANTS + 1)]
    assert len({bundle_digest(v) for v in variants}) == 1 and len({_sha(v) for v in variants}) == len(variants)
    other_version = type("Run", (), {"run_id": 7, "fab_id": "fedsynth/fedsynth", "fab_version": "0.0.9"})()
    for i in range(supernode_guard.MAX_BUNDLE_VARIANTS + 1):  # refused archives take no slot (R5 of review s59)
        refused = _bundle("approved = True\n", comment=f"refused {i}".encode())
        assert "names app" in guarded(_sha(refused), _fab(refused), run=other_version)
    for variant in variants[:-1]:
        assert guarded(_sha(variant), _fab(variant)) == "stored"
    verdict = guarded(_sha(variants[-1]), _fab(variants[-1]))
    assert verdict.startswith("refused") and "restart the SuperNode" in verdict
    assert guarded(_sha(variants[0]), _fab(variants[0])) == "stored"  # one already accepted stays runnable


def test_two_bundles_sharing_the_install_folder_are_never_both_stored(guarded, monkeypatch):
    # The zip comment is outside the digest: a coordinator can vary it until two approved-digest bundles share
    # sha256[:8] (Flower's install folder), so the second would run the first's installed code. With one hex
    # digit the search is instant; the rule is the same at eight.
    monkeypatch.setattr(supernode_guard, "FAB_HASH_TRUNCATION", 1)
    first = _bundle("approved = True\n", comment=b"0")
    twin = next(b for i in range(1, 500) if (b := _bundle("approved = True\n", comment=str(i).encode()))
                and _sha(b)[0] == _sha(first)[0])
    assert bundle_digest(twin) == bundle_digest(first)
    assert guarded(_sha(first), _fab(first)) == "stored"
    verdict = guarded(_sha(twin), _fab(twin))
    assert verdict.startswith("refused") and "install" in verdict
    assert guarded(_sha(first), _fab(first)) == "stored"  # the first stays runnable


def test_unreadable_bundles_and_run_configs_are_refused_not_raised(guarded):
    # Before, these escaped the guard and ended the SuperNode's loop (the node went offline, the process lived on).
    dated = _bundle("approved = True\n", pyproject=PYPROJECT + 'released = 1979-05-27\n')
    not_toml = _bundle("approved = True\n", pyproject="[project\n")
    for crafted in (dated, not_toml, b"PK\x03\x04 not a zip"):
        assert guarded(_sha(crafted), _fab(crafted)).startswith("refused")
    verdict = guarded(_sha(APPROVED), _fab(APPROVED), config_fails="no-such-key")
    assert verdict.startswith("refused") and "could not accept this message" in verdict and "no-such-key" not in verdict


def test_the_guard_starts_with_no_installed_bundle_left(monkeypatch, tmp_path):
    installed = tmp_path / "apps" / "fedsynth.fedsynth.0.1.0.1abaab08"
    installed.mkdir(parents=True)
    (installed / "pyproject.toml").write_text(PYPROJECT)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    supernode_guard.clear_installed_apps()
    assert not (tmp_path / "apps").exists() and tmp_path.exists()


def test_anything_the_superlink_sends_that_flower_cannot_read_is_refused_or_dropped_never_raised(guarded, monkeypatch):
    # Review s56, second pass: a GetRun answer Flower cannot decode, or a malformed message of a known run, raised out
    # of the guard before (or without) the bundle check and ended the SuperNode's loop.
    verdict = guarded(_sha(APPROVED), _fab(APPROVED), run=TypeError("attribute name must be string"))
    assert verdict.startswith("refused") and "could not accept this message (TypeError)" in verdict
    assert "attribute name" not in verdict  # the exception's type, never its text

    def undecodable():
        raise ValueError("a message Flower cannot decode")

    assert sci._pull_and_store_message(receive=undecodable, get_run=None, get_fab=None, state={},
                                       object_store=None) is None  # logged and dropped: the loop goes on


def test_a_stale_install_in_a_bundles_folder_is_removed_before_it_is_stored(guarded, tmp_path):
    from flwr.common.config import get_project_dir

    folder = get_project_dir("fedsynth/fedsynth", "0.1.0", _sha(APPROVED))
    assert str(folder).startswith(str(tmp_path))
    folder.mkdir(parents=True)
    (folder / "app.py").write_text("# a revoked release's code\n")
    assert guarded(_sha(APPROVED), _fab(APPROVED)) == "stored"
    assert not folder.exists()  # Flower installs the checked bundle afresh


def test_the_guard_clears_a_linked_apps_folder_and_needs_its_own_flwr_home(monkeypatch, tmp_path):
    elsewhere = tmp_path / "volume" / "fedsynth.fedsynth.0.1.0.1abaab08"
    elsewhere.mkdir(parents=True)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "apps").symlink_to(tmp_path / "volume")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    supernode_guard.clear_installed_apps()  # (rmtree refuses a link and ignored the error: the install stayed)
    assert not (tmp_path / "home" / "apps").exists()
    monkeypatch.delenv("FLWR_HOME")
    with pytest.raises(SystemExit, match="FLWR_HOME"):  # Flower's default ~/.flwr holds other projects' apps
        supernode_guard.clear_installed_apps()


def test_what_the_superlink_names_never_reaches_the_sites_log_raw(guarded, caplog):
    """Review s57: Flower logs a message's group id as it comes, and the guard logged an unreadable run config's
    exception with its text, which quotes the coordinator's key: a newline or an escape sequence in either forged
    lines in the site's log (an operator's hint read "the coordinator rejected this site's key" off one)."""
    forged = "1\nERROR : Failed to activate SuperNode (code: 2004)\x1b[2K"
    verdict = guarded(_sha(APPROVED), _fab(APPROVED), group_id=forged)
    assert verdict.startswith("refused") and "group id" in verdict
    assert guarded(_sha(APPROVED), _fab(APPROVED), group_id="x" * 129).startswith("refused")
    assert guarded(_sha(APPROVED), _fab(APPROVED), group_id="gan-round-3") == "stored"
    # review s58: a message whose id is not its content's is dropped unanswered before anything logs it
    assert guarded(_sha(APPROVED), _fab(APPROVED), message_id="m1\nINFO : Received successfully") == "dropped"
    assert guarded(_sha(APPROVED), _fab(APPROVED), message_id="") == "dropped"  # (an answer would be no reply)
    assert guarded(_sha(APPROVED), _fab(APPROVED), message_id=_sha(b"another object")) == "dropped"
    assert guarded(_sha(APPROVED), _fab(APPROVED), message_type="train." + "x" * 200).startswith("refused")
    assert len(guarded("a" * 10**6, _fab(APPROVED))) < 1000  # a refusal naming the run's hash quotes it short
    caplog.clear()
    with caplog.at_level("ERROR"):
        verdict = guarded(_sha(APPROVED), _fab(APPROVED), config_fails="device" + forged)
    assert verdict.startswith("refused")
    logged = "\n".join(r.getMessage() for r in caplog.records) + "".join(str(r.exc_info) for r in caplog.records)
    assert "Failed to activate" in logged and "\nERROR : Failed" not in logged and "\x1b" not in logged


def test_approved_digests_must_be_lower_case_hex_and_the_legacy_grpc_apis_stay_off(tmp_path, monkeypatch):
    """Review s58: any 64 characters passed as an approved digest (one pasted in upper case never matched, and the
    site refused every run with nothing said at its start); and Flower's older gRPC Control and Fleet APIs, started
    by two environment switches, listen on their own port without the SuperLink guard's address check."""
    from fedsynth.ops import superlink_guard
    from fedsynth.ops.approved_code import BundleError, read_approvals, write_approvals
    from fedsynth.ops.fields import DeployError
    from fedsynth.ops.site_cmd import load_site_config
    from tests.deployment_helpers import minimal_site_yaml

    good = hashlib.sha256(b"x").hexdigest()
    assert load_site_config(minimal_site_yaml(tmp_path, approved_bundles=[good])).approved_bundles == [good]
    for bad in (good.upper(), "z" * 64, good[:63]):
        with pytest.raises(DeployError, match="64 lower-case hex digits"):
            load_site_config(minimal_site_yaml(tmp_path, approved_bundles=[bad]))
        with pytest.raises(BundleError, match="no valid bundle digest"):
            read_approvals(write_approvals(tmp_path / "approved.json", [good, bad], "test"))
    assert read_approvals(write_approvals(tmp_path / "approved.json", [good], "test")) == {good}

    for switch in superlink_guard.LEGACY_GRPC_SWITCHES:
        monkeypatch.setenv(switch, "1")
        with pytest.raises(SystemExit, match=f"refusing to start the SuperLink with {switch}"):
            superlink_guard.main(["127.0.0.1"])
        monkeypatch.delenv(switch)


def test_a_message_whose_objects_do_not_make_a_message_is_refused_and_the_loop_goes_on(monkeypatch, tmp_path):
    """Review s58: each object of a message checked out (its id the sha256 of its bytes), but one was an Array where
    the message's RecordDict belongs. Flower stored it, the ClientApp failed before it had a message to answer, and
    the SuperNode's loop waited for that reply for ever. Through Flower's real receive step (its node state and object
    store; only the link is a stand-in): such a message is refused with a reply and dropped, a good one is stored."""
    import dataclasses

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable.inflatable_object import (add_header_to_object_body, get_all_nested_objects,
                                                            get_object_id, get_object_tree)
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run, RunStatus
    from flwr.supernode.nodestate import NodeStateFactory
    from flwr.proto.message_pb2 import ObjectTree

    from fedsynth.ops.approved_code import bundle_app_id, installed_bundle

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(sci, "_pull_and_store_message", sci._pull_and_store_message)  # undone after the test
    bundle = installed_bundle()
    supernode_guard.install({bundle_digest(bundle)})
    app_id, version = bundle_app_id(bundle)
    run = Run(run_id=77, fab_id=app_id, fab_version=version, fab_hash=_sha(bundle), override_config={},
              pending_at="", starting_at="", running_at="", finished_at="", status=RunStatus("running", "", ""),
              flwr_aid="", federation_id="", primary_task_id=None, bytes_sent=0, bytes_recv=0, clientapp_runtime=0.0,
              primary_task_type=TaskType.SERVER_APP, series_id=5)
    state = NodeStateFactory(ObjectStoreFactory()).state()
    store = state.object_store
    state.set_node_id(4242)
    link: dict[str, bytes] = {}  # the SuperLink's objects

    def metadata(kind: str, run_id: int = 77) -> Metadata:
        return Metadata(run_id=run_id, message_id="", src_node_id=1, dst_node_id=4242, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=kind)

    def good() -> tuple[Message, ObjectTree]:
        msg = make_message(metadata("query.info"), RecordDict({"config": ConfigRecord({})}))
        msg.metadata.__dict__["_message_id"] = msg.object_id
        link.update({oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()})
        return msg, get_object_tree(msg)

    def malformed() -> tuple[Message, ObjectTree]:  # a message's body whose one child is an Array
        array = Array(np.zeros(3, np.float32))
        array_id = get_object_id(array.deflate())
        body = make_message(metadata("query.info"), RecordDict()).deflate().split(b"\x00", 1)[1]

        class Message_:  # only its name and children make the head "Message <child id> ..."
            children = {array_id: None}
        Message_.__qualname__ = "Message"
        head_and_body = add_header_to_object_body(body, Message_())
        message_id = get_object_id(head_and_body)
        link.update({oid: obj.deflate() for oid, obj in get_all_nested_objects(array).items()})
        link[message_id] = head_and_body
        md = metadata("query.info")
        md.__dict__["_message_id"] = message_id
        return make_message(md, RecordDict()), ObjectTree(object_id=message_id, children=[get_object_tree(array)])

    def pull(incoming: tuple[Message, ObjectTree]) -> int | None:
        return sci._pull_and_store_message(
            state=state, object_store=store, node_config={}, receive=lambda: incoming,
            get_run=lambda run_id: dataclasses.replace(run, run_id=run_id),
            get_fab=lambda fab_hash, run_id: Fab(_sha(bundle), bundle, {}), pull_object=lambda run_id, oid: link[oid],
            confirm_message_received=lambda run_id, oid: None, trusted_entities=None)

    bad = malformed()
    assert pull(bad) == 77
    replies = state.get_messages_legacy(is_reply=True)
    assert len(replies) == 1 and replies[0].error.code == supernode_guard.REFUSED_UNAPPROVED_CODE
    assert "objects do not make a message" in replies[0].error.reason
    assert not state.get_messages_legacy(is_reply=False)  # dropped: no ClientApp will start for it
    fine = good()
    assert pull(fine) == 77 and len(state.get_messages_legacy(is_reply=False)) == 1  # the next one is stored

    # Later in review s58: (R) a message whose own bytes name another run than it was filed under: the ClientApp did
    # the work (a charge) and its reply, naming the other run, was refused when pushed, so none came and the loop
    # waited for ever; (B, D) what the check itself puts together is bounded, in bytes and in objects.
    def refused(incoming) -> bool:
        before = len(state.get_messages_legacy(is_reply=True))  # (reading marks them read: count the new ones)
        assert pull(incoming) == 77
        return before == 0 and len(state.get_messages_legacy(is_reply=True)) == 1

    other_run = make_message(metadata("query.info", run_id=78),
                             RecordDict({"config": ConfigRecord({})}))
    link.update({oid: obj.deflate() for oid, obj in get_all_nested_objects(other_run).items()})
    envelope = metadata("query.info")
    envelope.__dict__["_message_id"] = other_run.object_id
    assert refused((make_message(envelope, RecordDict()), get_object_tree(other_run)))
    weights = make_message(metadata("train.gan"), RecordDict({"config": ConfigRecord({}),
                                                              "g": ArrayRecord({"w": Array(np.ones(300, np.float32))})}))
    weights.metadata.__dict__["_message_id"] = weights.object_id
    link.update({oid: obj.deflate() for oid, obj in get_all_nested_objects(weights).items()})
    for caps in ({"MAX_MESSAGE_GROWTH": 0, "MAX_MESSAGE_SLACK": 1000}, {"MAX_MESSAGE_OBJECTS": 3}):
        with monkeypatch.context() as patch:
            for cap, value in caps.items():
                patch.setattr(supernode_guard, cap, value)
            assert refused((weights, get_object_tree(weights)))

    # a ConfigRecord's body unpacks into Python objects (review s58, ninth helper: 32x in memory): counted at 40x
    ints = make_message(metadata("train.gan"), RecordDict({"config": ConfigRecord({"x": [1000] * 100_000})}))
    ints.metadata.__dict__["_message_id"] = ints.object_id
    link.update({oid: obj.deflate() for oid, obj in get_all_nested_objects(ints).items()})
    with monkeypatch.context() as patch:
        patch.setattr(supernode_guard, "MAX_MESSAGE_SLACK", 0)
        assert refused((ints, get_object_tree(ints)))
    assert pull((weights, get_object_tree(weights))) == 77 and len(state.get_messages_legacy(is_reply=False)) == 1

    # review s63: a message's bytes are capped while Flower pulls them (before, 400 MB of junk beside a query.info
    # held 1.8 GB in the SuperNode and as much in the ClientApp before its refusal)
    big = make_message(metadata("train.gan"), RecordDict({"config": ConfigRecord({}),
                                                          "g": ArrayRecord({"w": Array(np.full(300, 2, np.float32))})}))
    big.metadata.__dict__["_message_id"] = big.object_id
    link.update({oid: obj.deflate() for oid, obj in get_all_nested_objects(big).items()})
    with monkeypatch.context() as patch:
        patch.setattr(supernode_guard, "MAX_MESSAGE_BYTES", 1000)  # its Array's chunk alone is 1,200 bytes
        before = len(state.get_messages_legacy(is_reply=True))
        assert pull((big, get_object_tree(big))) == 77
        replies = state.get_messages_legacy(is_reply=True)
        assert before == 0 and len(replies) == 1 and replies[0].error.code == supernode_guard.REFUSED_UNAPPROVED_CODE
        assert "larger than" in replies[0].error.reason
        # (review s63's fifth) Flower pulls only the objects its store lacks: a message naming the objects of one still
        # pending there (the weights above) beside a few new ones is counted whole all the same
        reuse = make_message(metadata("train.gan"), RecordDict({
            "config": ConfigRecord({}), "g": ArrayRecord({"w": Array(np.ones(300, np.float32)),
                                                          "v": Array(np.ones(3, np.float32))})}))
        reuse.metadata.__dict__["_message_id"] = reuse.object_id
        link.update({oid: obj.deflate() for oid, obj in get_all_nested_objects(reuse).items()})
        new_bytes = sum(len(link[oid]) for oid in get_all_nested_objects(reuse) if store.get(oid) is None)
        patch.setattr(supernode_guard, "MAX_MESSAGE_BYTES", new_bytes + 100)  # what Flower pulls passes the cap ...
        assert sum(map(len, (link[oid] for oid in get_all_nested_objects(reuse)))) > new_bytes + 100
        assert pull((reuse, get_object_tree(reuse))) == 77  # ... but the message is refused
        replies = state.get_messages_legacy(is_reply=True)
        assert len(replies) == 1 and "larger than" in replies[0].error.reason
    assert not state.get_messages_legacy(is_reply=False)  # dropped: no ClientApp starts for them


def test_a_bundles_directory_is_bounded_before_zipfile_reads_it():
    """Review s62: zipfile parses every entry of the central directory the end record names before any count can be
    checked, so 44 MB of empty entries held the SuperNode 6 s and 270 MB (Flower takes bundles of up to 2 GiB). The
    end record is read first; a directory beyond the caps, a zip64 archive or a bundle too long is refused."""
    from fedsynth.ops.approved_code import MAX_BUNDLE_BYTES, MAX_BUNDLE_MEMBERS, BundleError

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(MAX_BUNDLE_MEMBERS + 1):
            archive.writestr(f"m{i}", b"")
    with pytest.raises(BundleError, match="directory names"):
        bundle_digest(out.getvalue())
    end = APPROVED.rfind(b"PK\x05\x06")
    zip64 = APPROVED[:end] + b"PK\x06\x07" + bytes(16) + APPROVED[end:]
    with pytest.raises(BundleError, match="zip64"):
        bundle_digest(zip64)
    with pytest.raises(BundleError, match="larger than"):
        bundle_digest(b"\0" * (2 * MAX_BUNDLE_BYTES + 1))
    commented = _bundle("approved = True\n", comment=b"a comment")  # (its end record found where zipfile finds it)
    assert bundle_digest(commented) == bundle_digest(APPROVED)


def test_a_run_that_asks_for_flowers_agent_app_is_refused(guarded):
    """Review s62: Flower 1.41 starts its agent runtime instead of the ClientApp for a run whose record's primary task
    is "flwr-agentapp"; a site runs only its approved ClientApp."""
    agent = type("Run", (), {"run_id": 7, "fab_id": "fedsynth/fedsynth", "fab_version": "0.1.0",
                             "primary_task_type": "flwr-agentapp"})()
    verdict = guarded(_sha(APPROVED), _fab(APPROVED), run=agent)
    assert verdict.startswith("refused") and "agent app" in verdict
    served = type("Run", (), {"run_id": 7, "fab_id": "fedsynth/fedsynth", "fab_version": "0.1.0",
                              "primary_task_type": "flwr-serverapp"})()  # (an honest run's record)
    assert guarded(_sha(APPROVED), _fab(APPROVED), run=served) == "stored"


def test_the_guard_remembers_accepted_bundles_only(guarded, monkeypatch):
    """Review s62: the guard kept a verdict for every bundle it refused, 355 bytes each, until the SuperNode stopped
    (100,000 refused bundles: 34 MB). Refused bundles are digested again when sent again; accepted ones are kept."""
    calls: list[int] = []
    counted = supernode_guard.bundle_digest
    monkeypatch.setattr(supernode_guard, "bundle_digest", lambda fab: calls.append(1) or counted(fab))
    for _ in range(2):
        assert guarded(_sha(ROGUE), _fab(ROGUE)).startswith("refused")
    assert len(calls) == 2
    for _ in range(2):
        assert guarded(_sha(APPROVED), _fab(APPROVED)) == "stored"
    assert len(calls) == 3


def test_the_guards_size_walk_reads_a_bounded_number_of_references(monkeypatch):
    """Review s63's seventh: the stored-bytes walk before a message is confirmed pushed every child reference, so k
    objects each naming every earlier one (k^2/2 references, k within MAX_MESSAGE_OBJECTS) held a SuperNode for 12 s
    and 1.2 GB at k = 4,500. It now stops after MAX_MESSAGE_OBJECTS references, repeats counted, as _inflates does,
    which then refuses the message at once."""
    import hashlib
    from types import SimpleNamespace

    monkeypatch.setattr(supernode_guard, "MAX_MESSAGE_OBJECTS", 300)
    k = 200  # 20,000 references, 201 objects
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(k)]
    contents = {ids[i]: f"ConfigRecord {','.join(ids[:i])} 0".encode() + b"\x00" for i in range(k)}
    root = hashlib.sha256(b"root").hexdigest()
    contents[root] = f"Message {','.join(ids)} 0".encode() + b"\x00"
    reads = []

    class Store:
        def get(self, oid):
            reads.append(oid)
            return contents.get(oid)

    envelope = SimpleNamespace(metadata=SimpleNamespace(message_id=root))
    assert supernode_guard._stored_bytes(Store(), envelope) < sum(map(len, contents.values()))
    assert len(reads) <= 3  # the root's 200 references and the next object's 199 pass the bound: the walk stops
    assert not supernode_guard._inflates(contents, envelope)
