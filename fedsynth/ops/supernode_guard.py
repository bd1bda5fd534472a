"""A Flower SuperNode that runs only approved app bundles: ``python -m fedsynth.ops.supernode_guard FILE ARGS``.

``fedsynth site`` starts this instead of ``flower-supernode`` (ARGS are flower-supernode's); FILE lists
the approved digests (``approved_code.write_approvals``), or is the word ``installed`` to approve just
the bundle of the fedsynth installed in this environment (the Docker image's entry point). It wraps
the SuperNode's step that receives a new run's bundle (``_pull_and_store_message`` in Flower 1.41's
``flwr.supernode.start_client_internal``): the bundle is digested (``approved_code.bundle_digest``)
before the SuperNode stores it, and a bundle whose digest is not in FILE is never stored, so no
ClientApp of that run is ever started. The SuperNode answers the run's message with an error reply
instead -- the same path Flower uses for its own bundle verification -- and every later message of the
run is refused the same way. Nothing of the site's data is read.

More holes around that step, each closed here (tests/test_supernode_guard.py):
- Flower installs a bundle into ``$FLWR_HOME/apps/<publisher>.<name>.<version>.<sha256[:8]>`` and reuses such a
  folder when it exists; a task then loads the folder named by the *run's* app id and version, which the
  SuperLink states. So the run must name its bundle's own app id and version, two bundles whose sha256 share
  their first 8 hex digits are never both stored, and the SuperNode starts with no installed app left from
  an earlier start (when a release now revoked may have been approved): ``main`` removes that folder.
- Anything else in the run's bundle or config that makes Flower's step raise (a run-config key the bundle
  does not declare, say) is refused like an unapproved bundle, where before it ended the SuperNode's loop.
- A message whose objects are each well formed (their ids the sha256 of their bytes) but do not make a message
  together (an Array where its RecordDict belongs) was stored; its ClientApp then failed before it had a message to
  answer, so no reply came, and Flower's loop waited for one for ever: one message stopped the site until its
  operator restarted it (review s58). Each message is now put together, as its ClientApp will, before Flower
  confirms it received it; one that does not go together, or whose own metadata is not what it was filed under, is
  dropped by Flower's own path for a failed pull and answered with a refusal; putting it together is bounded
  (MAX_MESSAGE_OBJECTS, MAX_MESSAGE_GROWTH), and so are the bytes Flower pulls for it (MAX_MESSAGE_BYTES, review s63);
  a message whose id is not its content's, or that is a reply, is dropped unanswered (an answer to it would be no
  reply either).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION  # install folders: apps/<id>.<version>.<sha[:8]>
from flwr.supercore.constant import TaskType  # (the run record's primary task: an agent app is refused)

from common.refusal_codes import MAX_MESSAGE_BYTES as PROTOCOL_MAX_MESSAGE_BYTES
from common.refusal_codes import REFUSED_UNAPPROVED_CODE  # (import-light: no torch, no Flower app)
from common.wire import quoted
from fedsynth.ops.approved_code import (BundleError, bundle_app_id, bundle_digest, installed_bundle_digest,
                                        is_digest, read_approvals)
from fedsynth.ops.node_folder import clear_stage_claims, hold_node_lock, lock_node_folder  # noqa: F401 (re-exported)

log = logging.getLogger("fedsynth.site")
MAX_LOGGED_ID = 128  # characters of a message's group id, id and type (round labels, sha256 hex, "train.gan")


class _Unapproved(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _record_bytes(run: object) -> int:
    """The bytes of a run's record as JSON: every field Flower keeps (its config's values are scalars; anything else
    counts by its text)."""
    try:
        fields = {k: getattr(run, k) for k in dir(run) if not k.startswith("_") and not callable(getattr(run, k))}
        return len(json.dumps(fields, default=lambda v: vars(v) if hasattr(v, "__dict__") else str(v)))
    except (TypeError, ValueError, RecursionError):
        return MAX_RUN_RECORD_BYTES + 1


def install(approved: set[str]) -> None:
    """Wrap Flower's bundle-receiving step so that only bundles in ``approved`` are ever stored."""
    from flwr.app import Error, Message
    from flwr.supernode import start_client_internal as sci

    from flwr.common.config import get_project_dir

    original = sci._pull_and_store_message
    # sha256 of a bundle's bytes, computed here -> "" (approved) or why not. Never keyed by the hash the SuperLink
    # names: a SuperLink can send a bundle with an empty hash_str, which Flower stores under its content's hash
    # without comparing, so a verdict remembered under "" would pass every later bundle sent the same way.
    accepted: dict[str, str] = {}  # -> its digest, for the bundles accepted since this start (review s62: refused
    # ones were remembered too, 355 bytes each, without bound; they are digested again, within approved_code's caps)
    stored_prefixes: dict[str, str] = {}  # sha256[:8] (Flower's install folder) -> the one bundle stored under it
    digest_variants: dict[str, set[str]] = {}  # approved digest -> sha256 of the archives of it accepted
    runs_kept: set[int] = set()  # the run ids whose records Flower stored since this start

    def check(fab, requested_hash: str, run_info) -> None:
        content_hash = hashlib.sha256(fab.content).hexdigest()
        # The run's tasks load the bundle stored under the run's fab_hash (the hash get_fab was asked for), so the
        # bundle checked must be that one: a SuperLink that answers with other bytes, or names another hash, is
        # refused (Flower's own store_fab would store it under its content's hash, not the run's).
        for name, claimed in (("the run's", requested_hash), ("the bundle's own", fab.hash_str)):
            if claimed != content_hash:
                raise _Unapproved(f"this site refuses the run's bundle: {name} hash {quoted(claimed)} is not the sha256 "
                                  f"of the bundle sent ({content_hash})")
        digest = accepted.get(content_hash)
        if digest is None:
            try:
                digest = bundle_digest(fab.content)
            except BundleError as err:
                raise _Unapproved(f"this site refuses the run's bundle: {err}") from None
            if digest not in approved:
                raise _Unapproved(f"this site runs only the fedsynth app bundles its operator approved; this run's "
                                  f"bundle has digest {digest}, which is not one of them")
        # Flower keeps every bundle it receives in memory until the SuperNode stops, and installs each in a folder of
        # its own: byte variants of an approved bundle (another zip comment, a re-zip) would pile up without bound
        # (review s59). A rebuild of the same files by Flower is byte for byte the same (fixed dates), so a few
        # variants per approved digest and start cover an honest coordinator's rebuilds.
        variants = digest_variants.setdefault(digest, set())
        if content_hash not in variants and len(variants) >= MAX_BUNDLE_VARIANTS:
            raise _Unapproved(f"this site refuses the run's bundle: it stored {MAX_BUNDLE_VARIANTS} other archives of "
                              "the same approved code since the SuperNode started (the same files zipped again with "
                              "other bytes); its operator may restart the SuperNode to accept a new one")
        try:
            app_id = bundle_app_id(fab.content)
        except BundleError as err:
            raise _Unapproved(f"this site refuses the run's bundle: {err}") from None
        if run_info is None or (run_info.fab_id, run_info.fab_version) != app_id:
            named = (run_info.fab_id, run_info.fab_version) if run_info is not None else ("?", "?")
            raise _Unapproved(f"this site refuses the run: it names app {quoted(named[0])} version {quoted(named[1])}, "
                              f"but its bundle is {app_id[0]!r} version {app_id[1]!r}")
        prefix = content_hash[:FAB_HASH_TRUNCATION]
        if prefix not in stored_prefixes:  # its install folder, if one exists, is not of this start: remove it
            try:
                _remove(get_project_dir(app_id[0], app_id[1], content_hash))
            except OSError as err:
                raise _Unapproved("this site cannot install the run's bundle: an earlier install is in its place "
                                  f"and cannot be removed ({type(err).__name__})") from None
        if stored_prefixes.setdefault(prefix, content_hash) != content_hash:
            raise _Unapproved(f"this site refuses the run's bundle: another bundle this site stored shares the first "
                              f"{FAB_HASH_TRUNCATION} hex digits of its sha256 ({prefix}), which name Flower's install "
                              f"folder")
        variants.add(content_hash)  # counted once every check passed: a refused archive takes no slot
        accepted[content_hash] = digest

    def guarded(*args, **kwargs):
        received = {}
        receive, get_fab, get_run = kwargs["receive"], kwargs["get_fab"], kwargs.get("get_run")

        def remember(*a, **k):
            got = receive(*a, **k)
            if got is not None:
                meta = got[0].metadata
                # A request to a site has the id of its object tree's root and is no reply: with another id Flower
                # deletes the wrong object when it drops the message (its tree stayed in memory), and a refusal
                # of a message without an id is no reply either, which the SuperNode's loop waits for for ever
                # (review s58). Such a message is dropped unanswered, as if never received.
                if not (is_digest(meta.message_id) and got[1] is not None  # (a sha256 in hex, like a bundle's)
                        and got[1].object_id == meta.message_id and meta.reply_to_message_id == ""):
                    sci.log(logging.ERROR, "dropped a message whose id is not its content's or that is a reply")
                    return None
                received["message"] = got[0]
                # Flower writes these into the SuperNode's log as they come, right after this returns: a newline or
                # an escape sequence in them forged log lines, and their length made the line's (review s57)
                for what, value in (("group id", meta.group_id), ("message id", meta.message_id),
                                    ("message type", meta.message_type)):
                    if not (len(value) <= MAX_LOGGED_ID and value.isascii() and (not value or value.isprintable())):
                        raise _Unapproved(f"this site refuses a message whose {what} is not at most {MAX_LOGGED_ID} "
                                          "printable ASCII characters")
            return got

        def remember_run(*a, **k):  # Flower calls get_run(run_id) just before get_fab
            received["run"] = get_run(*a, **k)
            return received["run"]

        def checked_fab(fab_hash, *a, **k):  # Flower calls get_fab(run_info.fab_hash, run_id)
            fab = get_fab(fab_hash, *a, **k)
            run, message = received.get("run"), received.get("message")
            if run is not None and message is not None and run.run_id != message.metadata.run_id:
                # Flower would store the run under the id it names and give the message's task none: its ClientApp
                # then fails before it reads the message, no reply ever comes, and the SuperNode's loop waits for one
                # for ever (review s59)
                raise _Unapproved(f"this site refuses the run: the SuperLink's record of run {message.metadata.run_id} "
                                  f"names run {quoted(str(run.run_id))}")
            if run is not None and _record_bytes(run) > MAX_RUN_RECORD_BYTES:
                # Flower keeps every run's record (its config, status, ids, times) in the SuperNode's memory until it
                # stops, and hands the config to each of the run's tasks: one GetRun answer may carry 2 GiB (review s59)
                raise _Unapproved(f"this site refuses the run: its run record (config, status, ids) is larger than "
                                  f"{MAX_RUN_RECORD_BYTES:,} bytes")
            if run is not None and run.run_id not in runs_kept and len(runs_kept) >= MAX_RUNS_PER_START:
                raise _Unapproved(f"this site refuses the run: its SuperNode keeps {MAX_RUNS_PER_START:,} runs since it "
                                  "started; its operator may restart it to take new ones")
            if run is not None and getattr(run, "primary_task_type", "") == TaskType.AGENT_APP:
                # Flower would start its agent runtime for the run instead of the approved ClientApp (review s62)
                raise _Unapproved("this site refuses the run: it asks for Flower's agent app, and this site runs only "
                                  "its approved ClientApp")
            check(fab, str(fab_hash), run)
            if run is not None:
                received["new run"] = run.run_id  # kept once Flower's step stored it (below): a refused run takes no slot
            received["checked"] = True  # what raises from here on is Flower reading the run's own config
            return fab

        pull_object = kwargs.get("pull_object")
        pulled_lock = threading.Lock()  # (Flower pulls a message's objects in several threads)

        def counted_pull(run_id, object_id):  # Flower calls it for each object of the message, before confirming it
            content = pull_object(run_id, object_id)
            with pulled_lock:
                received["bytes"] = received.get("bytes", 0) + len(content)
                if received["bytes"] > MAX_MESSAGE_BYTES:  # (review s63: nothing capped a message's size, and the
                    # SuperNode and the ClientApp each held about 4x its bytes before the refusal: 400 MB of junk
                    # beside a query.info took 1.8 GB in each; a few GB would have run a site out of memory)
                    received["too large"] = True
                    raise _Unapproved("too large")  # Flower's failed pull drops the message; refused below
            return content

        confirm, store = kwargs.get("confirm_message_received"), kwargs.get("object_store")

        def checked_confirm(run_id, message_id):  # Flower calls it once every object of the message is stored
            if _stored_bytes(store, received["message"]) > MAX_MESSAGE_BYTES:  # (review s63's fifth: the pulls
                # count only objects the store lacked, so a message naming a pending message's objects carried more)
                received["too large"] = True
                raise _Unapproved("too large")
            if not _inflates(store, received["message"]):
                received["unreadable"] = True
                raise _Unapproved("its objects do not make a message")  # Flower drops it and ends its task
            return confirm(run_id, message_id)

        kwargs.update(receive=remember, get_fab=checked_fab)
        if get_run is not None:
            kwargs.update(get_run=remember_run)
        if confirm is not None and store is not None:
            kwargs.update(confirm_message_received=checked_confirm)
        if pull_object is not None:
            kwargs.update(pull_object=counted_pull)
        try:
            pulled = original(*args, **kwargs)
            if "new run" in received:
                runs_kept.add(received["new run"])
            if pulled is None and received.pop("too large", False):
                raise _Unapproved(f"this site refuses a message larger than {MAX_MESSAGE_BYTES // 2**20:,} MiB (no "
                                  "request it can answer is: send fewer audit images or smaller networks): nothing "
                                  "was read or computed")
            if pulled is None and received.pop("unreadable", False):
                raise _Unapproved("this site could not read this message (its objects do not make a message): "
                                  "nothing was read or computed")
            return pulled
        except Exception as err:  # noqa: BLE001 - the SuperLink's bytes: refuse them, never stop the SuperNode's loop
            message = received.get("message")
            if message is None:  # (a message Flower could not even decode, or the link itself: try again later)
                sci.log(logging.ERROR, "could not receive a message from the SuperLink: %s", type(err).__name__)
                return None
            if isinstance(err, _Unapproved):
                why = err.why
            else:  # a run config Flower cannot fuse, a malformed object tree, ...: the type only, never the text
                # (its text may quote the SuperLink's bytes, a run-config key for one: quoted, never raw in the log)
                sci.log(logging.ERROR, "message of run %s could not be handled: %s: %s", message.metadata.run_id,
                        type(err).__name__, quoted(str(err)))
                why = f"this site could not accept this message ({type(err).__name__}): nothing was read or computed"
            sci.log(logging.ERROR, "REFUSED run %s: %s", message.metadata.run_id, why)
            try:
                reply = Message(Error(code=REFUSED_UNAPPROVED_CODE, reason=why), reply_to=message)
                sci._insert_message(reply, kwargs["state"], kwargs["object_store"])
            except Exception as failed:  # noqa: BLE001 - a message too malformed to answer: drop it
                sci.log(logging.ERROR, "could not answer it either: %s", type(failed).__name__)
                return None
            return message.metadata.run_id

    sci._pull_and_store_message = guarded


MAX_RUN_RECORD_BYTES = 64 * 1024  # a run's record as JSON (fedsynth's whole [tool.flwr.app.config]: about 3 KB)
MAX_RUNS_PER_START = 1_000  # run records a SuperNode keeps (Flower drops none until it stops)
MAX_BUNDLE_VARIANTS = 4  # archives of one approved digest (distinct sha256) a SuperNode accepts per start
# Bytes of one message's objects, pulled before anything checks them (common.refusal_codes: the coordinator reads it too)
MAX_MESSAGE_BYTES = PROTOCOL_MAX_MESSAGE_BYTES
MAX_MESSAGE_OBJECTS = 100_000  # objects in one message's tree, a child named twice counted twice (fedsynth's: ~100s)
# Bytes its arrays make once put together, beyond what the message carries: an honest array names each chunk once
# (an all-zero one repeats its chunk), a hostile one may name one chunk thousands of times. Bounded as a share of
# what was sent, so a large honest message (an audit of 1,000 images of 200 x 200 colour carries 458 MiB) passes.
MAX_MESSAGE_GROWTH = 4  # x the bytes the message's objects take
MAX_MESSAGE_SLACK = 2**28  # + bytes (all-zero arrays)
RECORD_GROWTH = 40  # bytes a ConfigRecord's or MetricRecord's body byte may become (a list of 20 million ints: 32x)
# (peak memory while putting it together is about twice the bound: Array.inflate copies its buffer once)
# What the message's own bytes say of it must be what the SuperNode stored it as: the ClientApp reads the first, the
# SuperNode files its reply by the second, and a reply naming another run is refused when pushed (so never sent).
_SAME_METADATA = ("message_id", "run_id", "message_type", "group_id", "reply_to_message_id", "dst_node_id")


def _stored_bytes(store, envelope) -> int:
    """Bytes of the distinct objects the message ``envelope`` names, as stored, read until MAX_MESSAGE_OBJECTS
    references (more is :func:`_inflates`'s to refuse, at once; an object missing counts 0, as it refuses that too)."""
    from flwr.supercore.inflatable.inflatable_object import get_object_head_values_from_object_content

    sizes: dict[str, int] = {}
    todo, named = [envelope.metadata.message_id], 1
    while todo and named <= MAX_MESSAGE_OBJECTS:  # (every reference counted, repeats too, as _inflates counts them:
        oid = todo.pop()  # review s63's seventh, objects naming every earlier one, k^2/2 references, took 12 s)
        if oid in sizes:
            continue
        content = store.get(oid) or b""
        sizes[oid] = len(content)
        if content:
            try:
                children = get_object_head_values_from_object_content(content)[1]
                named += len(children)
                todo.extend(children[:MAX_MESSAGE_OBJECTS])
            except Exception:  # noqa: BLE001 - the SuperLink's bytes: _inflates refuses what does not parse
                pass
    return sum(sizes.values())


def _inflates(store, envelope) -> bool:
    """Whether the objects Flower stored for the message ``envelope`` names make that message, put together as its
    ClientApp will: within MAX_MESSAGE_OBJECTS and MAX_MESSAGE_GROWTH (an Array may name one chunk many times, and a
    tree may name a child twice at every level: unchecked, a 1 MiB message became 538 MiB here and a tree of 43
    objects took seconds to walk, review s58), a Message, with the metadata it was stored under."""
    from flwr.app import Array, Message
    from flwr.supercore.inflatable.inflatable_object import get_object_body, get_object_head_values_from_object_content
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    try:
        contents: dict[str, bytes] = {}
        heads: dict[str, tuple[str, list[str]]] = {}
        below: dict[str, int] = {}

        def objects_under(oid: str) -> int:  # the tree's nodes from ``oid`` down, repeats counted; each id read once
            if oid not in below:
                content = store.get(oid)
                if not content:
                    raise ValueError("an object of the message is missing")
                kind, children, _ = get_object_head_values_from_object_content(content)
                contents[oid], heads[oid] = content, (kind, children)
                below[oid] = 1 + sum(objects_under(child) for child in children)
                if below[oid] > MAX_MESSAGE_OBJECTS:
                    raise ValueError("too many objects")
            return below[oid]

        objects_under(envelope.metadata.message_id)
        total = 0
        for oid, (kind, children) in heads.items():
            if kind == "Array":  # its body lists, by index into its children, the chunk behind each slice
                chunks = json.loads(get_object_body(contents[oid], Array))["arraychunk_ids"]
                total += sum(len(contents[children[i]]) for i in chunks)
            elif kind != "ArrayChunk":  # a record's body unpacks into Python objects: up to ~40 bytes a body byte
                total += RECORD_GROWTH * len(contents[oid])
        if total > MAX_MESSAGE_GROWTH * sum(map(len, contents.values())) + MAX_MESSAGE_SLACK:
            return False
        message = inflate_object_from_contents(envelope.metadata.message_id, contents, keep_object_contents=True)
        if not isinstance(message, Message):
            return False
        message.metadata.__dict__["_message_id"] = envelope.metadata.message_id  # (as the ClientApp sets it)
        return all(getattr(message.metadata, key) == getattr(envelope.metadata, key) for key in _SAME_METADATA)
    except Exception:  # noqa: BLE001 - the SuperLink's bytes: whatever fails here, the ClientApp would fail too
        return False


def _remove(path: Path) -> None:
    """Remove a file, a link or a folder tree at ``path`` (nothing there: nothing to do); OSError if it stays."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
    if path.exists() or path.is_symlink():
        raise OSError(f"{path} is still there")


def clear_installed_apps() -> None:
    """Remove the bundles Flower installed under $FLWR_HOME before this start: they were approved then, not
    necessarily now, and Flower would load such a folder again for a run that names it (module docstring).
    FLWR_HOME must be set (``fedsynth site`` and the compose file set one per site): unset, Flower's default
    ~/.flwr would hold other projects' apps too. A folder that cannot be removed stops the start."""
    import os

    from flwr.common.config import get_flwr_home

    if not os.environ.get("FLWR_HOME"):
        sys.exit("fedsynth: set FLWR_HOME to this site's own folder (fedsynth site sets <state_dir>/flwr-home): the "
                 "guard removes the app bundles installed there by an earlier start")
    try:
        _remove(get_flwr_home() / APP_DIR)
    except OSError as err:
        sys.exit(f"fedsynth: cannot remove the app bundles an earlier start installed ({err}); remove "
                 f"{get_flwr_home() / APP_DIR} by hand, then start again")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit("usage: python -m fedsynth.ops.supernode_guard APPROVED_FILE [flower-supernode arguments]")
    approved = {installed_bundle_digest()} if argv[0] == "installed" else read_approvals(argv[0])
    install(approved)
    hold_node_lock(argv[1:])
    clear_installed_apps()
    clear_stage_claims(argv[1:])
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[1:]]
    print(f"fedsynth: this SuperNode runs only approved app bundles ({len(approved)} approved)", flush=True)
    flower_supernode()


if __name__ == "__main__":
    main()
