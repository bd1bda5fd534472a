"""Site side of secure aggregation: the ``train`` handler behind Flower's SecAgg+ mod.

With ``secure-aggregation = true`` the coordinator sends every summable release (``P.SECURE_TASKS``)
as Flower's four SecAgg+ stages on message type ``train``. Flower's ``secaggplus_mod`` answers the key
stages itself; at the third it calls :func:`handle_secure_train`, which

1. unwraps the typed request from the legacy ``FitIns`` (``common.secure_wire``) -- the same request,
   checked the same way, as in the clear;
2. runs the same site code as the plain handler (plan, charge, train or record, save the reply), so the
   ledger charges exactly what a plain run charges (a re-sent round whose reply is saved but never went into a
   masked vector, e.g. after a crash before the mark, reuses its saved reply);
3. marks the release as summed in the run's folder (``client.release_marks.mark_summed``: created once,
   fsync'ed) and only then returns the reply's summand (``secure_wire.summand``) with weight 1; the mod masks it, so the
   coordinator never sees it alone -- only the sum over the sites.

A release goes into at most one masked vector, ever. The site answers a re-sent request from its saved reply at
no charge, so without the mark a coordinator could put one saved release into two secure sums over different
sets of sites (all four, then three of them; or the same four with one site's "collect masked vectors" message
held back the first time, which looks like a dropout) and subtract the two totals: that site's release alone,
with only 1/sqrt(t) of its charged noise where the noise was split (distributed noise). Binding a release to its
neighbours would not stop the second trick. So a secure request whose release (same run, message type, round)
already went into a masked vector is refused (``client.release_marks``), and the mark is written before the vector
leaves, so a crash between the two still counts as sent. An aggregation that fails after sites sent their vectors
cannot be repeated with them: the run starts a new experiment (``server.secure_agg`` says so).

A refusal (budget, mode, bad request) must reach the coordinator as the same safe error reply as in the
clear, not as the mod's failure to parse it: :func:`refusals_mod`, outside the SecAgg+ mod, returns it.

Flower's mod checks only the *types* of the settings each stage carries; their values are the coordinator's.
:func:`secagg_settings_mod`, between the two, refuses the values with which a coordinator that follows the
four stages could still see one site's vector alone (a modulus of 2 makes every mask 0; a threshold of 1 or a
site as its own only neighbour makes its own seed share the seed; a node listed both active and dropped, or
dropped to half its neighbours and active to the others under a threshold of half, gets both of its secrets
reconstructed). What it cannot stop is a coordinator that invents neighbours (it holds their keys);
docs/privacy.md ("Secure aggregation") says so.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from flwr.app import Context, Message

from client.bn_site import net_round_file, release_bnstats, stats_file, train_bnnet
from client.gan_site import round_file, train_gan
from client.refusal import Refusal
from client.release_marks import SUMMED_SUFFIX  # noqa: F401 (read here by tests and tools)
from client.release_marks import (clear_mark, for_sum_mark, mark_summed, sent_in_clear_refusal, summed_mark,
                                  summed_twice_refusal, unmarked_refusal)
from client.requests import FAILURE_TEXT, refuse, run_dir, site_handler
from client.site import SiteSettings, resolve_site
from common import protocol as P
from common import secure_wire
from common.files import create_once
from common.state_layout import setups_folder
from common.wire import quoted

log = logging.getLogger("fedsynth.site")
_INNER = {P.TRAIN_GAN: train_gan, P.TRAIN_BNNET: train_bnnet, P.QUERY_BNSTATS: release_bnstats}


class _Refused(Exception):
    """Carries the safe error reply of the inner handler past Flower's SecAgg+ mod."""

    def __init__(self, reply: Message) -> None:
        super().__init__("refused")
        self.reply = reply


MIN_NEIGHBOURS = 3  # sites in one secure sum, this one included (server.secure_agg asks for at least 3)
MAX_SECURE_SUM_SITES = P.SECURE_SUM_MAX_SITES  # (below P.SECAGG_MAX_SITES, where the sum would overflow its modulus)


def secagg_problem(configs: dict, state: dict, node_id: int) -> str:
    """Why the SecAgg+ stage in ``configs`` must be refused, or "" (``state``: Flower's SecAgg+ state of this site
    so far, ``RECORD_KEY_STATE``; ``node_id``: this site's).

    setup: the protocol's public constants (``common.protocol``: clipping range, quantization levels, modulus),
    weight 1 (``secure_wire.summand`` sends weight 1), at least ``MIN_NEIGHBOURS`` shares and a reconstruction
    threshold above half of them and at most all. share keys: at most that many neighbours, this site among them
    (Flower's mod refuses fewer than the threshold). unmask: active and dropped nodes are neighbours, listed once,
    in one list only, at least the threshold of them active, each one that sent this site its shares, and this site,
    which sent its vector, among the active ones. ``node_id`` is the SuperNode's
    own id (``Context.node_id``), never a message's destination field.
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    stage = configs.get(Key.STAGE)
    if _known_stage(stage) is None:
        # (before anything else: the claim of a stage names a file after it, review s57)
        return f"{quoted(stage)} is not a stage of a secure sum (setup, share_keys, collect_masked_vectors, unmask)"
    if stage == Stage.SETUP:
        expected = {Key.CLIPPING_RANGE: P.SECAGG_CLIPPING_RANGE, Key.TARGET_RANGE: P.SECAGG_QUANTIZATION_LEVELS,
                    Key.MOD_RANGE: P.SECAGG_MODULUS, Key.MAX_WEIGHT: 1.0}
        wrong = [f"{key} {quoted(configs.get(key))} (the protocol's is {value!r})" for key, value in expected.items()
                 if configs.get(key) != value]
        if wrong:
            return "the secure aggregation's settings are not the protocol's: " + ", ".join(wrong)
        shares, threshold = configs.get(Key.SHARE_NUMBER), configs.get(Key.THRESHOLD)
        # More than half: each neighbour returns, for a site, either a share of its mask seed (listed active) or
        # of its pairwise key (listed dropped), never both; a coordinator that tells half the neighbours one thing
        # and half the other gets both secrets of a site, and its vector alone, when 2 x threshold <= shares.
        # At most MAX_SECURE_SUM_SITES: the key sharing's work, uncharged and repeatable with each new setup, grows
        # faster than the square of the sites (review s59: 1,024 took 388 s of the site's CPU, 255 took 14.5 s).
        if not (isinstance(shares, int) and isinstance(threshold, int) and MIN_NEIGHBOURS <= shares
                <= MAX_SECURE_SUM_SITES and 2 * threshold > shares and threshold <= shares):
            return (f"a secure sum needs {MIN_NEIGHBOURS} to {MAX_SECURE_SUM_SITES} sites and a reconstruction "
                    f"threshold above half their number; got {quoted(shares)} shares and threshold {quoted(threshold)}")
    elif stage == Stage.SHARE_KEYS:
        # (fewer than announced where a site dropped out at setup; Flower checks that the threshold still holds)
        neighbours = {k for k in configs if k != Key.STAGE}
        if str(node_id) not in neighbours or len(neighbours) > int(state.get("share_num", 0)):
            return (f"the secure sum's neighbours must be at most the {quoted(state.get('share_num'))} sites announced "
                    f"at its setup, this one among them; got {len(neighbours)}")
        if not all(_public_keys_parse(configs[k]) for k in neighbours):
            # Flower parses a neighbour's first key only after the handler's work (for the pairwise masks): a bad
            # one made a charged release fail there, marked summed and never sent (review s56)
            return "a neighbour's public keys in the secure sum's key-sharing stage are not two public keys"
        keys = [bytes(k) for n in neighbours for k in configs[n]]
        if len(set(keys)) != len(keys):  # (Flower's mod raises on it; a clear refusal instead: review s60)
            return "the public keys in the secure sum's key-sharing stage are not all different"
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        # Flower's mod calls the handler first and checks the shares after; a stage it would refuse must not be
        # worked on and charged first (review s56: it left a charged round marked as summed, never sendable)
        return _collect_problem(configs, state, node_id)
    elif stage == Stage.UNMASK:
        active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST, []), configs.get(Key.DEAD_NODE_ID_LIST, [])
        if not all(isinstance(ids, list) and all(type(i) is int for i in ids) for ids in (active, dead)):
            return "the secure sum's unmasking lists are not lists of node ids"
        neighbours = set(state.get("public_keys_dict:K", []))
        if len(set(active)) != len(active) or len(set(dead)) != len(dead) or set(active) & set(dead):
            return "a node is listed twice, or as both active and dropped, in the secure sum's unmasking"
        if not set(active) | set(dead) <= neighbours or node_id not in active:
            return "the secure sum's unmasking names nodes that are not its sites, or this site as dropped"
        # (Flower's mod raises on these, the generic failure; a clear refusal instead: known and left in s60-s61)
        if len(active) < int(state.get("threshold", 0)):
            return (f"the secure sum's unmasking lists {len(active)} active sites, fewer than its reconstruction "
                    f"threshold {quoted(state.get('threshold'))}")
        if not (set(active) <= set(state.get("rd_seed_share_dict:K", []))
                and set(dead) <= set(state.get("sk1_share_dict:K", []))):
            return "the secure sum's unmasking names sites that sent this site no share of their secrets"
    return ""


def _known_stage(stage) -> str | None:
    """The protocol's own name of the SecAgg+ stage a message names (Flower's constant, never the message's string),
    or None when it names none of the four: a string the coordinator sent must never become part of a file name."""
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    if not isinstance(stage, str):
        return None
    return next((name for name in (Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK)
                 if stage == name), None)


def _collect_problem(configs: dict, state: dict, node_id: int) -> str:
    """What Flower's mod checks of the "collect masked vectors" stage only after the handler's work: one share from
    each source, at least threshold - 1 distinct neighbours other than this site, each decrypting (with the key
    this site shares with its source) to a share from that source for this site. Quotes only the stage's counts."""
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
    from flwr.common.secure_aggregation.secaggplus_constants import Key
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

    ciphertexts, sources = configs.get(Key.CIPHERTEXT_LIST), configs.get(Key.SOURCE_LIST)
    if not isinstance(ciphertexts, list) or not isinstance(sources, list):
        return "the secure sum's masked-vector stage carries no list of shares and their sources"
    ours = SecAggPlusState(**state)
    if len(ciphertexts) != len(sources) or len(set(sources)) != len(sources) or len(sources) + 1 < ours.threshold:
        return (f"the secure sum's masked-vector stage carries {len(ciphertexts)} shares from {len(sources)} sources "
                f"({len(set(sources))} distinct); it needs one from each of at least {ours.threshold - 1} neighbours")
    for source, ciphertext in zip(sources, ciphertexts):
        key = ours.ss2_dict.get(source) if source != node_id else None
        try:
            sent_by, sent_to, _, _ = share_keys_plaintext_separate(decrypt(key, ciphertext))
        except Exception:  # noqa: BLE001 - the coordinator's bytes; no key: not a neighbour
            return "a share in the secure sum's masked-vector stage is not from one of this site's neighbours"
        if sent_by != source or sent_to != node_id:
            return "a share in the secure sum's masked-vector stage is from or for another node than it says"
        try:  # what Flower's mod derives after the work, for the pairwise masks
            generate_shared_key(bytes_to_private_key(ours.sk1), bytes_to_public_key(ours.public_keys_dict[source][0]))
        except Exception:  # noqa: BLE001 - the coordinator's keys
            return "a neighbour's key in the secure sum cannot make a pairwise mask"
    return ""


def _public_keys_parse(keys) -> bool:
    """A neighbour's entry of the key-sharing stage: two public keys (pk1, pk2) that parse."""
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key

    try:
        return len(keys) == 2 and all(bytes_to_public_key(k) is not None for k in keys)
    except Exception:  # noqa: BLE001 - the coordinator's bytes
        return False


def secagg_settings_mod(msg: Message, context: Context, call_next) -> Message:
    """Between ``refusals_mod`` and Flower's SecAgg+ mod: refuse a stage whose values would expose this site's
    vector alone (``secagg_problem``), before the mod acts on it."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE

    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if msg.metadata.message_type != P.SECURE_TRAIN or configs is None:
        # Flower routes "train.default" (and "train" without SecAgg+ settings) to this same handler, but its SecAgg+
        # mod masks only type "train" and passes anything else straight to the handler: answered, the summand
        # (the release, or w * x and w) would leave unmasked, even at a site that requires secure aggregation
        raise _outside_the_stages(msg, context, "" if configs is not None else " without the stage's settings")
    state = context.state.config_records.get(RECORD_KEY_STATE)
    problem = secagg_problem(dict(configs), dict(state) if state is not None else {}, context.node_id)
    if not problem and msg.metadata.dst_node_id != context.node_id:
        # Flower's mod takes the site's id from the setup message's destination; one naming another node
        # would make the site check its neighbours and unmasking lists against an id that is not its own
        problem = "the secure aggregation's message is addressed to another node"
    if problem:
        raise _Refused(refuse(msg, _site_name(context), P.REFUSED_BAD_REQUEST, problem))
    _claim_stage(msg, context, configs, state)
    return call_next(msg, context)


def _site_name(context: Context) -> str:
    return str(context.node_config.get("site-name", "site"))


def _outside_the_stages(msg: Message, context: Context, detail: str = "") -> "_Refused":
    """The refusal of a secure request that is not inside the SecAgg+ stages (it quotes the message type sent)."""
    return _Refused(refuse(msg, _site_name(context), P.REFUSED_BAD_REQUEST,
                           f"a secure release is answered only inside the SecAgg+ stages of message type "
                           f"{P.SECURE_TRAIN!r}; got {quoted(msg.metadata.message_type)}{detail}"))


def refusals_mod(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod of the ``train`` handler: an inner refusal goes back as the handler's error reply."""
    try:
        return call_next(msg, context)
    except _Refused as refused:
        return refused.reply
    except Exception as err:  # noqa: BLE001 - the SecAgg+ mod's own failures: never their text
        log.warning("secure aggregation step failed at this site: %s: %s", type(err).__name__, quoted(str(err)))
        return refuse(msg, _site_name(context), P.SITE_FAILURE, FAILURE_TEXT,
                      f"secure aggregation: {type(err).__name__}: {quoted(str(err))}")


@site_handler
def _answer(msg: Message, context: Context, site: SiteSettings) -> Message:
    """The inner request's work (through ``site_handler``: every failure becomes a safe refusal)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    try:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    except (KeyError, TypeError, ValueError) as err:
        raise P.ProtocolError(f"the secure aggregation's request is not a FitIns: {type(err).__name__}") from None
    request = secure_wire.unwrap_request(fitins)
    if isinstance(request, P.BnStatsRequest) and request.noise_shares > 1:
        _check_noise_shares(request.noise_shares, context)
    release = release_file(request, site)
    if summed_mark(release).exists():  # before any work: the saved release will not be sent into a second sum
        raise summed_twice_refusal(request)
    if clear_mark(release).exists():  # nor into a sum at all once it went in the clear (client.release_marks)
        raise sent_in_clear_refusal(request)
    if release.exists() and not for_sum_mark(release).exists():  # saved, but not made for a sum: it may have left
        raise unmarked_refusal(request)  # in the clear before marks existed
    had_folder = release.parent.exists()
    made = create_once(for_sum_mark(release), b"")
    inner = _INNER[request.MESSAGE_TYPE]
    try:
        reply = inner(request, context, site, secure=True)
    except BaseException:
        if made and not release.exists():  # refused or failed before a release was saved: leave no mark (nor a
            for_sum_mark(release).unlink(missing_ok=True)  # run folder) for a request that made nothing (review s67)
            if not had_folder and not any(release.parent.iterdir()):
                release.parent.rmdir()
        raise
    try:
        summand = secure_wire.summand(request.MESSAGE_TYPE, reply)
    except secure_wire.RangeError as err:
        raise Refusal(P.SITE_FAILURE, FAILURE_TEXT, f"{err}: nothing is sent") from None
    mark_summed(release, request)  # durable before the vector leaves (the mod masks it after this returns)
    if clear_mark(release).exists():  # a clear request raced this one (each way marks, then looks for the other)
        raise sent_in_clear_refusal(request)
    log.info("[%s] %s: adding its release to the secure sum (masked; the coordinator sees only the total)",
             site.name, request.MESSAGE_TYPE)
    res = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(summand), num_examples=1, metrics={})
    return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)


def release_file(request: P.Message, site: SiteSettings) -> Path:
    """Where the release ``request`` asks for is saved in the run's folder (one per run, message type and round);
    its marks lie beside it (:mod:`client.release_marks`)."""
    folder = run_dir(site, request.experiment)
    if request.MESSAGE_TYPE == P.TRAIN_GAN:
        return round_file(folder, request.server_round)
    if request.MESSAGE_TYPE == P.TRAIN_BNNET:
        return net_round_file(folder, request.server_round)
    return stats_file(folder)


def _claim_stage(msg: Message, context: Context, configs, state) -> None:
    """Each stage after a SecAgg+ setup runs once per setup at this site, ever (before Flower's mod acts on it).

    Flower's mod reads its state from the context when a stage starts and writes it back when it ends, and a
    SuperNode runs each message as its own task on the context as it was when the task started. So a stage sent
    twice at once ran twice on one state (review s56): two "collect masked vectors" stages gave two vectors under
    the same masks (their difference: two releases of this site in the clear); two "unmask" stages, one listing
    this site's neighbour active and one dropped, gave both of that neighbour's secrets (its vector alone); two
    "share keys" stages, two self-mask seeds under one pairwise key. A setup is named by the first private key it
    made (``sk1``, which only this site holds), and each stage of it is claimed durably before the mod runs it."""
    from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

    stage = _known_stage(configs.get(Key.STAGE))
    if stage == Stage.SETUP:
        return  # a setup makes fresh keys: nothing to claim
    if stage is None:  # (secagg_problem refused it already; never a file named after the coordinator's string)
        raise _Refused(refuse(msg, _site_name(context), P.REFUSED_BAD_REQUEST, "not a stage of a secure sum"))
    secret = state.get("sk1") if state is not None else None
    if not isinstance(secret, bytes) or not secret:
        raise _Refused(refuse(msg, _site_name(context), P.REFUSED_BAD_REQUEST,
                              "a secure sum's stage came before its setup at this site"))
    try:
        site = resolve_site(context.node_config, context.run_config)
        folder = setups_folder(site.state_dir) / site.name  # (two SuperNodes may share a state folder: review s60)
        # the name is hex digits and the protocol's own stage name: it stays inside the folder
        claimed = create_once(folder / f"{hashlib.sha256(secret).hexdigest()}-{stage}", b"")
    except Exception as err:  # noqa: BLE001 - the site's own settings or disk: its generic failure
        raise _Refused(refuse(msg, _site_name(context), P.SITE_FAILURE, FAILURE_TEXT,
                              f"secure aggregation: cannot record the stage: {type(err).__name__}: {err}")) from None
    if not claimed:
        raise _Refused(refuse(msg, _site_name(context), P.REFUSED_BAD_REQUEST,
                              f"this secure aggregation's setup already ran its {quoted(stage)} stage at this site; a "
                              "stage run twice on one setup would expose this site's masks, so a second one needs a "
                              "new secure aggregation"))


def _check_noise_shares(shares: int, context: Context) -> None:
    """Split noise only as far as this aggregation guarantees: every sum the coordinator can unmask holds at
    least the reconstruction threshold's number of releases (the threshold Flower's mod got at setup)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE

    state = context.state.config_records.get(RECORD_KEY_STATE)
    threshold = int(state.get("threshold", 0)) if state is not None else 0
    if not 2 <= shares <= threshold:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"distributed noise over {shares} sites needs a secure aggregation whose "
                                             f"reconstruction threshold is at least {shares}; this one has "
                                             f"{threshold or 'none'}")


def handle_secure_train(msg: Message, context: Context) -> Message:
    """Called by the SecAgg+ mod at its third stage; a refusal is raised past the mod (``refusals_mod``)."""
    if msg.metadata.message_type != P.SECURE_TRAIN:  # (secagg_settings_mod refuses it first; never answer in the clear)
        raise _outside_the_stages(msg, context)
    answer = _answer(msg, context)
    if answer.has_error():
        raise _Refused(answer)
    return answer
