"""Refusals: the error replies a site sends instead of doing work, and what each one's reason may say.

Part of the message protocol (``common.protocol`` re-exports every name here): a refusal's code and reason leave the
site like a reply's fields do, so what each may carry is declared beside its code.
"""

from __future__ import annotations

# Flower error replies carry an int code and a reason. A reason says why in words the coordinator may
# read: never the site's budget, what it has spent or has left, its record count or its file names.
REFUSED_BUDGET = 4001  # the request does not fit the site's privacy budget
# Whether a budget refusal is sent is itself a release. It is decided only from the request, the site's
# published delta bound, its ledger (what it has spent) and the run's census, a DP release charged first
# (client.census.run_census). It is never decided from the record count, which would let free refusals
# measure it. The refusals before any charge that read the budget alone: a ledger's start, when the budget
# is below what the noisy size behind its default delta may cost (client.site_delta.least_budget), and a training
# plan no census could make possible (client.census.check_plan_possible, review s60: the plan at a noisy total of
# 1e15, the published delta bound, nothing spent, the site's published query policy; since review s67, at a site whose
# ledger exists, beside what the ledger holds, at its delta and Renyi order: what its own refusals read already).
REFUSED_BAD_REQUEST = 4002  # malformed, inconsistent or hostile request
# A run id refused because it differs from a kept run's only in case (client.requests.run_dir) is quoted as sent;
# the reason says that such a run exists, which re-sending an exact id shows already, and never names its folder.
# Also a bad request, each quoting only what the coordinator sent: a SecAgg+ stage whose settings would expose one
# site's vector (client.secure_site.secagg_problem: the stage's own shares, threshold, lists); a saved statistics
# release asked for with another noise split than the one it was made with (client.bn_site._check_resend: the
# split the coordinator asked for then); a run device the site cannot use (client.requests.site_device: the run's
# setting, and that no such GPU is visible, which query.info's `device` publishes already).
# Also bad, before any charge: a recipe value out of range, a changed GAN architecture (common.recipe_ranges).
# Also bad, fixed text: a DP-GAN round whose four schedule settings (D steps, long D steps, G steps, long G steps)
# are not those the run's first trained round asked for (client.site_schedule.STEPS_CHANGED, checked before the
# census; review s68 K: it named the steps the site took, which its census chose, and a secure run shows no site's
# census alone; review s68 L: compared with the steps taken, which refusal came, or whether one came, still told
# them: it is now compared with the coordinator's own first request); and a census to be drawn again, its file
# lost, for a request naming another epsilon than the run's plan (client.census._check_planned_with_census: the
# plan's words).
# Also bad, quoting only the coordinator's own message: a secure release asked for outside the SecAgg+ stages of
# type 'train' (client.secure_site.secagg_settings_mod: the message type it sent); a run's first training request
# under an id the coordinator used for evaluation or audit queries before (client.census._check_no_queries_before,
# before the census and, since review s67, before the row checks), or under an id
# whose plan its first request made without that training (client.census._check_planned_with_census), or a
# statistics release with a provided net under an id whose earlier training request drew a census
# (client.census.check_no_census_drawn, review s59: it says only that the coordinator's own request drew one).
# Also a bad request: a secure request whose release already went into a masked vector at this site (the same run,
# message type and round; client.release_marks.summed_twice_refusal). Its reason quotes the request's message type, round and
# experiment id, says ALREADY_SUMMED, why a second sum is refused and to start a new experiment. That the release went
# into a sum is what the site's answer to the coordinator's own earlier stage-3 message told (or would have told, had
# it arrived): nothing more of the records (a release refused for its value range is refused before it is marked,
# and again, the same way, when re-sent).
ALREADY_SUMMED = "already went into a secure sum at this site"  # server.secure_agg recognizes such refusals by it
# Also bad, since review s67 (client.release_marks: a release leaves one way): a request in the clear for a release
# that went into a secure sum (summed_refusal), and a secure request for one sent in the clear or saved not made for a
# sum (sent_in_clear_refusal, unmarked_refusal). Each quotes the request's message type, round and experiment id and
# says which way the release left: what the coordinator's own earlier requests did, nothing of the records.
# Also bad: a stage of one SecAgg+ setup asked for a second time, or before the setup (client.secure_site._claim_stage:
# two stages of one setup sent at once); a masked-vector stage whose shares or neighbours' keys Flower's mod would
# refuse after the work (client.secure_site._collect_problem, _public_keys_parse). Fixed text and the stage's own
# counts: what the coordinator's own stages did, nothing of the records.
# Also bad: a secure round whose model, weighted by the site's FedAvg weight (its census total, a charged release),
# would leave the secure sum's range (client.census.check_secure_room, review s60): it names the
# model's largest value, the coordinator's own, and the protocol's range, never the weight.
# Also bad, fixed text: a key-sharing stage whose public keys are not all different (review s60: Flower's mod raised).
# Also bad, fixed text: unmasking lists with fewer active sites than the setup's threshold, or naming sites that sent
# this one no share (client.secure_site.secagg_problem, review s62): the SecAgg+ stages' own state, nothing of the
# records. And a secure request whose wrapped arrays are not arrays of numbers (common.secure_wire.unwrap_request).
# Also bad, quoting only what the coordinator sent: a stage that is not one of SecAgg+'s four, or unmasking lists that
# are not lists of node ids (client.secure_site.secagg_problem; refused before any file is named after a stage, so the
# answer never depends on which files exist at the site).
REFUSED_NOT_ALLOWED = 4003  # the site's config does not allow this mode / action / more queries / this much work
# (allow_distributed_noise is such a setting of site.yaml: the refusal names it, public by declaration.) So is a
# split of the noise at a site whose delta is above DEFAULT_DELTA_BOUND (client.bn_site._setup, review s60): its
# published delta bound says so already. Bad request, fixed text: a split of the noise over layer-clips=auto.
# A work-limit refusal (client.limits) names the operator's limit and the request's own sizes (parameters,
# batch, steps, per-sample gradient memory, all computed from the request's settings alone): the limits are
# public by declaration, and nothing in such a refusal depends on the site's records. The state-folder limit's
# (max_state_disk_mb) also names what the site's other runs keep: the sizes of files it wrote, which follow from
# the requests and the DP releases it made, never from its records (review s58), each counted in whole 16 KB units
# (client.limits.FILE_UNIT_BYTES, review s68 L: in bytes, a census file's length told the digits of its counts).
# An evaluation's classifier above
# max_parameters (client.evaluation, review s59) names its count, computed from the learner and shape the request
# names. Not allowed, fixed text: new work whose files the state folder's disk has no room for (client.limits.
# check_free_disk, review s62): decided from the run's own files (sizes that follow from the requests) and the
# disk's free space in whole 64 MB units, which counts every file on that disk; docs/privacy.md, "Not covered".
# Not allowed, review s63: a network shape this machine computes with a record's rows rounded by their place
# (client.row_check.check_network_rows: names the problem and the request's own shape settings; decided on random
# weights and random images of the published shape, so by the machine and the request alone; since review s65 on
# the device the run computes on, and where that is a GPU the text adds the way out, device: cpu in site.yaml: the
# device kind the site publishes in query.info already), and an audit whose
# memory (client.evaluation.audit_memory_mb: the published shape and the request's image count) is above the
# operator's max_step_memory_mb, which it names with that count.
SITE_FAILURE = 4004  # the site could not do the work (its operator sees why in the site's log)
# Its reason is always client.requests.FAILURE_TEXT; e.g. a held-out set whose shape differs from the published
# training schema, or that holds no record of the published classes (client.evaluation: they can hinge on single
# records), is never described in it.
REFUSED_UNAPPROVED_CODE = 4005  # the run's app bundle is not one the site's operator approved
# Sent by the guarded SuperNode (fedsynth.ops.supernode_guard) before any app code runs. Its reason names the bundle's
# digest and sha256 (the SuperLink's own bytes), the run's and the bundle's app id and version, hashes the SuperLink
# claimed (quoted short), an exception's type, or which of the message's group id, id or type is not short printable
# ASCII: nothing of the records, and of the site only which bundles its operator approved (refused or not).
# Or fixed text: a message whose objects do not make one, or whose own metadata is not what it was filed under, or
# that is too large to put together (review s58) or to pull (MAX_MESSAGE_BYTES, review s63); a message whose id is
# not its content's is dropped unanswered.
# Or, from review s59: the run's record names another run than its message (the two ids, both the SuperLink's);
# fixed text with the guard's own constants: a run record larger than MAX_RUN_RECORD_BYTES, a run past
# MAX_RUNS_PER_START, a bundle with bytes its members do not account for, an archive past MAX_BUNDLE_VARIANTS of one
# approved digest. Each counts only what the SuperLink itself sent since the SuperNode started.

# Bytes of one message's objects a guarded site pulls at most; the guard refuses a larger message with
# REFUSED_UNAPPROVED_CODE. fedsynth's largest at the default work limits: two networks of max_parameters, 160 MB; an
# audit of AUDIT_MAX_IMAGES images of 3 x 128 x 128, 393 MB. The coordinator keeps its audit queries within it
# (server.site_audits.check_audit_size). Here, not in the guard, because both sides read it (and this module is light).
MAX_MESSAGE_BYTES = 2**30

REFUSAL_NAMES = {REFUSED_BUDGET: "over budget", REFUSED_BAD_REQUEST: "bad request",
                 REFUSED_NOT_ALLOWED: "not allowed", SITE_FAILURE: "site failure",
                 REFUSED_UNAPPROVED_CODE: "unapproved code"}
