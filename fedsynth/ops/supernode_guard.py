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
"""

from __future__ import annotations

import logging
import sys

from fedsynth.ops.approved_code import BundleError, bundle_digest, installed_bundle_digest, read_approvals

log = logging.getLogger("fedsynth.site")
REFUSED_UNAPPROVED_CODE = 4005  # common.protocol.REFUSED_UNAPPROVED_CODE (kept import-light here)


class _Unapproved(Exception):
    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def install(approved: set[str]) -> None:
    """Wrap Flower's bundle-receiving step so that only bundles in ``approved`` are ever stored."""
    from flwr.app import Error, Message
    from flwr.supernode import start_client_internal as sci

    original = sci._pull_and_store_message
    verdicts: dict[str, str] = {}  # fab hash -> "" (approved) or why not

    def check(fab) -> None:
        if fab.hash_str not in verdicts:
            try:
                digest = bundle_digest(fab.content)
                verdicts[fab.hash_str] = "" if digest in approved else (
                    f"this site runs only the fedsynth app bundles its operator approved; this run's bundle has "
                    f"digest {digest}, which is not one of them")
            except BundleError as err:
                verdicts[fab.hash_str] = f"this site refuses the run's bundle: {err}"
        if verdicts[fab.hash_str]:
            raise _Unapproved(verdicts[fab.hash_str])

    def guarded(*args, **kwargs):
        received = {}
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def remember(*a, **k):
            got = receive(*a, **k)
            if got is not None:
                received["message"] = got[0]
            return got

        def checked_fab(*a, **k):
            fab = get_fab(*a, **k)
            check(fab)
            return fab

        kwargs.update(receive=remember, get_fab=checked_fab)
        try:
            return original(*args, **kwargs)
        except _Unapproved as err:
            message = received["message"]
            sci.log(logging.ERROR, "REFUSED run %s: %s", message.metadata.run_id, err.why)
            reply = Message(Error(code=REFUSED_UNAPPROVED_CODE, reason=err.why), reply_to=message)
            sci._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return message.metadata.run_id

    sci._pull_and_store_message = guarded


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit("usage: python -m fedsynth.ops.supernode_guard APPROVED_FILE [flower-supernode arguments]")
    approved = {installed_bundle_digest()} if argv[0] == "installed" else read_approvals(argv[0])
    install(approved)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *argv[1:]]
    print(f"fedsynth: this SuperNode runs only approved app bundles ({len(approved)} approved)", flush=True)
    flower_supernode()


if __name__ == "__main__":
    main()
