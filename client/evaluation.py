"""Site side of federated evaluation and audits: DP answers about the site's records, off by default.

Both are questions a coordinator asks about private records, so both are DP releases like any other:
allowed only when the site's operator turns them on (``evaluation`` / ``audits`` in site.yaml), at most
``queries_per_run`` of each per run, charged in the ledger before they are computed, and answered with
Gaussian-noised counts -- never an exact accuracy, distance, PSNR, threshold or record count, because a
few adaptive queries can rebuild a record from exact answers.

evaluate.classifier
    Every held-out record falls into one cell of a (K, 2) table: its true class, classified right or
    wrong. One record changes one cell by 1 (L2 sensitivity 1, add/remove-one), so the table plus
    N(0, z^2) per cell, z = ``protocol.EVALUATION_NOISE``, is ``DPEvent(z, 1.0, 1)``.

query.audit
    Every record -- training (members) and held-out (non-members) -- falls into one bin of one of two
    histograms over the fixed grid ``protocol.AUDIT_BIN_EDGES`` of its pixel MSE to the nearest image of
    the coordinator's synthetic sample. One record changes one bin by 1 whatever images the coordinator
    sends (sensitivity 1), so both histograms plus N(0, z^2) per bin, z = ``protocol.AUDIT_NOISE``, are
    ``DPEvent(z, 1.0, 1)``. The coordinator turns them into a membership-inference AUC and a near-copy
    rate (``server.site_audits``).

Both rest on one record changing only its own cell or bin, so no record's result may depend on which other
records are present: on CPU, float32 kernels round a row differently when its batch grows by one row, and a
coordinator can send a classifier (or synthetic images) with near-ties that such rounding decides. The site
therefore runs every forward pass on a batch of exactly ``evaluation_batch(shape)`` rows and every distance block at
exactly ``audit_block(shape)`` (records x synthetic images), zero-padded in a fresh standard-layout buffer, the padding
masked out: constants, independent of the record count and of anything the coordinator sends.

A held-out set of no records (an emptied folder or split, or records of classes the site does not publish) is
answered like any other, charged, its counts noise alone: failing instead, before the charge, told the coordinator for
free that it held no record (until stop 66).

Held-out records share the ledger of the site's dataset id: the unit of privacy is one record, training
or held-out (conservative: a held-out record is charged for training releases it never entered).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
from flwr.app import Context, Message

from client.budget import PLAN_FILE, RunPlan
from client.census import AUDIT_PURPOSE, EVALUATION_PURPOSE
from client.discrete_gaussian import noisy_counts
from client.ledger import BudgetExceeded, PrivacyLedger
from client.limits import check_work, meta_module, parameter_count
from client.requests import FAILURE_TEXT, Refusal, check_schema, require_plain_allowed, run_dir, site_data, site_handler
from client.site import SiteSettings, data_fingerprint, load_site_heldout, open_ledger
from common import protocol as P
from common.accounting import DPEvent, epsilon_for
from common.audits import nearest_neighbors
from common.data import ImageDataset, NoRecords
from common.files import atomic_write_json
from common.learner import build_learner, predict
from common.wire import quoted

log = logging.getLogger("fedsynth.site")

# The fixed shapes of the site's computations (see the module docstring): rows per forward pass of an evaluation,
# and (records, synthetic images) per distance block of an audit (>= AUDIT_MAX_IMAGES: one block per 1024 records).
EVALUATION_BATCH = 1024
AUDIT_BLOCK = (1024, 2048)


def evaluation_batch(image_shape: tuple[int, ...]) -> int:
    """Rows of every forward pass of an evaluation: EVALUATION_BATCH up to 32x32 colour, halved for larger images
    until a batch holds no more pixels than that (at least 16 rows). A function of the published image shape alone,
    so a record's prediction still depends on that record alone; without it, 1,024 rows of 3x512x512 through the
    cnn would have outgrown a site's memory after the query's charge (review s59)."""
    rows, values = EVALUATION_BATCH, math.prod(image_shape)
    while rows > 16 and rows * values > EVALUATION_BATCH * 3 * 32 * 32:
        rows //= 2
    return rows


def audit_block(image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(records, synthetic images) of every distance block of an audit: AUDIT_BLOCK up to 32x32 colour, each halved
    for larger images until it holds no more values than that (at least one row). A function of the published image
    shape alone, as :func:`evaluation_batch`; at a fixed AUDIT_BLOCK an audit of one image took 3.8 GB more memory at
    3 x 256 x 256, after its charge (review s63)."""
    rows, cols = AUDIT_BLOCK
    values, most = math.prod(image_shape), 3 * 32 * 32
    while rows > 1 and rows * values > AUDIT_BLOCK[0] * most:
        rows //= 2
    while cols > 1 and cols * values > AUDIT_BLOCK[1] * most:
        cols //= 2
    return rows, cols


def audit_memory_mb(image_shape: tuple[int, ...], images: int) -> float:
    """MB an audit of ``images`` synthetic images of ``image_shape`` holds beyond the site's records and the request
    (common.audits.neighbors, block_shape): the images clipped, and padded to whole blocks, one block of records with
    its squares, the (records x images) distances, and the float64 rows of the exact distances (_EXACT_ROWS at a
    time)."""
    rows, cols = audit_block(image_shape)
    values = math.prod(image_shape)
    floats = (images * values + -(-images // cols) * cols * values + 2 * rows * values + 2 * cols * values
              + 3 * rows * cols + 2 * 2 * 256 * values)  # (the images clipped into [0, 1]; float64: 2 floats each)
    return 4 * floats / 2**20


def _run_plan(experiment_dir: Path) -> RunPlan | None:
    """The plan of the run the query names (None: no run of this id has trained at this site)."""
    plan_file = experiment_dir / PLAN_FILE
    return RunPlan.from_json(json.loads(plan_file.read_text())) if plan_file.exists() else None


def _noise(site: SiteSettings, plan: RunPlan | None, constant: float) -> float:
    """The query's noise multiplier: the protocol's constant, or 0 in a run the site agreed to make non-private."""
    if math.isinf(site.epsilon_budget) and plan is not None and math.isinf(plan.planned_epsilon):
        return 0.0
    return constant


def _open_query(site: SiteSettings, allowed: bool, what: str, experiment: str
                ) -> tuple[ImageDataset, ImageDataset, Path]:
    """Checks both queries share before the ledger; returns (training data, held-out data, the run's folder)."""
    if not allowed:
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"this site does not answer {what} queries (its operator can allow "
                                             f"them in site.yaml)")
    folder = run_dir(site, experiment)
    if not site.heldout:  # no held-out data configured: public (site.yaml), query.info says so too
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"this site has no held-out data for {what} queries")
    data = site_data(site)
    try:
        heldout = load_site_heldout(site)
    except NoRecords:  # emptied (a folder, a split, an npz of other classes): no records, answered as any other set
        heldout = data.subset(np.arange(0))
    if heldout.image_shape != data.image_shape:
        # The held-out set's own shape is not published (query.info describes the training data), and it can hinge
        # on single records (a colour pixel): the reason does not name it. `fedsynth site` refuses to start so.
        raise Refusal(P.SITE_FAILURE, FAILURE_TEXT, f"the held-out data {heldout.image_shape} does not match the "
                                                    f"training data {data.image_shape}")
    # (none left is a set of no records: its answers are noise alone, charged like any other; until stop 66 an empty
    # set got the generic failure before the charge, a free answer to whether it held any record)
    return data, in_published_classes(heldout, data.classes), folder


def in_published_classes(heldout: ImageDataset, classes: tuple[str, ...]) -> ImageDataset:
    """The held-out records labelled by the training data's published ``classes`` (by name), records of another
    class left out. Its own class list is not published and can hinge on one record: an npz without class names
    (or IDX files) takes it from its label range, so withdrawing the only held-out record of the top class changed
    it, and every query then failed before its charge, telling the coordinator so for free (review s59)."""
    return heldout.in_classes(classes)


def _query_ledger(site: SiteSettings, data: ImageDataset, purpose: str, experiment: str
                  ) -> tuple[PrivacyLedger, int]:
    """The ledger and this query's number in its run, once the request itself has passed every check: opening the
    ledger at a new site starts it, which charges its noisy size, so a malformed request must be refused first."""
    ledger = open_ledger(site, data)
    asked = ledger.count(run=experiment, purpose=purpose)
    if asked >= site.queries_per_run:
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"this run has used the {site.queries_per_run} {purpose} "
                                             f"quer{'y' if site.queries_per_run == 1 else 'ies'} the site allows per run")
    return ledger, asked + 1


def _charge(ledger: PrivacyLedger, z: float, data: ImageDataset, *, purpose: str, run: str, index: int,
            plan: RunPlan | None, folder: Path) -> dict:
    """Charge one query. A query of a run that trained here is held to the run's epsilon too: the plan reserves
    its allowed queries, but retries charged again after failures can use that room up (None: no plan, so only the
    site's budget bounds it, and such an id cannot train afterwards: client.census.run_census). Then the run's
    ``folder`` gets a mark of the query with its epsilon alone (:func:`answered_mark`), for an operator restoring the
    ledger from a backup (deploy/README.md, Backups); returns the mark (:func:`_save_answer` adds the answer)."""
    event = DPEvent(z, 1.0, 1)
    try:
        ledger.charge([event], purpose=purpose, run=run, round=index, data=data_fingerprint(data),
                      run_epsilon=None if plan is None else float(plan.request["epsilon"]))
    except BudgetExceeded as err:
        raise Refusal(P.REFUSED_BUDGET, "the query does not fit this site's privacy budget", str(err)) from None
    mark = {"purpose": purpose, "query": index, "epsilon-alone": epsilon_for([event], ledger.delta),
            "delta": ledger.delta}
    try:  # (after the charge, as every file of a run: its folder is bounded by the budget; best effort, the ledger
        # holds the charge: review s62, a restored backup's runbook could not see queries, which left no file)
        atomic_write_json(answered_mark(folder, purpose, index), mark)  # (whole or absent: review s62)
    except OSError as err:
        log.warning("could not mark %s query %d of %s in %s (%s); the ledger holds its charge", purpose, index, run,
                    folder, type(err).__name__)
    return mark


def answered_mark(folder: Path, purpose: str, index: int) -> Path:
    """The file that says query ``index`` of ``purpose`` (evaluation, audit) was charged in the run's ``folder``."""
    return folder / f"{purpose}-{index}.answered"


def request_digest(purpose: str, fields: dict[str, object], arrays: dict[str, np.ndarray]) -> str:
    """sha256 of everything a query's answer is computed from: its purpose, settings and arrays (name, dtype, shape,
    bytes). Two requests with one digest ask the same question of the same records."""
    digest = hashlib.sha256(json.dumps([purpose, fields], sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def saved_answer(site: SiteSettings, folder: Path, purpose: str, digest: str) -> dict[str, np.ndarray] | None:
    """The noisy answer this run already got for the same query (``digest``), read from its answered mark, or None.
    Sending it again releases nothing new and is not charged, as a re-sent training round gets its saved reply:
    before, an identical query re-sent after its reply was lost (an expired ttl, a dropped link) was charged as a
    new one, and at the default of one query per run then refused, its charge paid for nothing (review s63)."""
    for index in range(1, site.queries_per_run + 1):  # at most the queries a run may ask: a few small files
        mark = answered_mark(folder, purpose, index)
        try:
            kept = json.loads(mark.read_text()) if mark.is_file() else {}
            if kept.get("digest") == digest:
                answer = {name: np.asarray(values, dtype=np.float32) for name, values in kept["answer"].items()}
                log.info("%s query %d of %s re-sent: its saved answer is sent again, nothing is charged", purpose,
                         index, folder.name)
                return answer
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:  # (atomic writes: not expected)
            log.warning("could not read %s (%s); a new query is charged", mark, type(err).__name__)
    return None


def _save_answer(folder: Path, mark: dict, digest: str, answer: dict[str, np.ndarray]) -> None:
    """Add the query's digest and noisy answer to its answered mark (atomically, before the answer is sent), for a
    re-send of the same query. Best effort: the answer leaves once under its charge either way; unsaved, a re-send
    is charged as a new query."""
    try:
        atomic_write_json(answered_mark(folder, mark["purpose"], mark["query"]),
                          {**mark, "digest": digest,
                           "answer": {name: value.tolist() for name, value in answer.items()}})
    except OSError as err:
        log.warning("could not save the answer of %s query %d of %s (%s); a re-send will be charged anew",
                    mark["purpose"], mark["query"], folder.name, type(err).__name__)


def _gaussian(exact: np.ndarray, z: float) -> np.ndarray:
    """Exact counts + N_Z(0, z^2) from the OS CSPRNG (integer noise: ``client.discrete_gaussian``), as float32 whole
    numbers (exact below 2^24)."""
    return noisy_counts(exact, z).astype(np.float32)


def evaluation_table(model, images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """The exact (K, 2) table of ``model`` on records (images, labels), each record's prediction computed in
    fixed-size padded batches, so that it depends on that record alone (sensitivity 1)."""
    predicted = predict(model, images, device="cpu", batch_size=evaluation_batch(images.shape[1:]), fixed_rows=True)
    return correct_wrong_table(labels, predicted, num_classes)


def correct_wrong_table(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, 2) exact counts: per true class, records classified right (column 0) and wrong (column 1)."""
    table = np.zeros((num_classes, 2), dtype=np.float64)
    np.add.at(table, (labels, (predicted != labels).astype(np.int64)), 1.0)
    return table


@site_handler
def handle_evaluation(msg: Message, context: Context, site: SiteSettings) -> Message:
    require_plain_allowed(site)
    req = P.EvaluationRequest.from_message(msg)
    data, heldout, folder = _open_query(site, site.evaluation, "evaluation", req.experiment)
    check_schema(data, req.channels, req.height, req.width, req.num_classes)  # the published schema (= held-out's)
    shape = (req.channels, req.height, req.width)
    try:  # on the meta device first: a learner above the site's max_parameters is refused before any allocation
        # (review s59: an mlp at 3x512x512, 201 million parameters, was built and initialised, then refused)
        meta = meta_module(lambda: build_learner(req.learner, shape, req.num_classes,
                                                 allow_import=False))  # never import code the coordinator names
    except ValueError as err:
        raise Refusal(P.REFUSED_BAD_REQUEST, str(err)) from None
    check_work(site, networks={"classifier": parameter_count(meta)}, batch_size=1, steps_per_run=0,
               smaller="a smaller learner (logreg or cnn)")
    model = build_learner(req.learner, shape, req.num_classes, allow_import=False)
    problems = P.check_arrays(req.classifier, P.state_spec(model.state_dict()))
    if problems:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the classifier sent does not match {quoted(req.learner)}: {problems[:3]}")
    P.load_state(model, req.classifier)
    digest = request_digest(EVALUATION_PURPOSE, {"learner": req.learner, "shape": list(shape),
                                                 "num_classes": req.num_classes}, dict(req.classifier))
    saved = saved_answer(site, folder, EVALUATION_PURPOSE, digest)
    if saved is not None:
        return P.EvaluationReply(counts=saved).as_reply(msg)
    ledger, index = _query_ledger(site, data, EVALUATION_PURPOSE, req.experiment)
    plan = _run_plan(folder)
    z = _noise(site, plan, P.EVALUATION_NOISE)
    mark = _charge(ledger, z, data, purpose=EVALUATION_PURPOSE, run=req.experiment, index=index, plan=plan,
                   folder=folder)
    exact = evaluation_table(model, heldout.images, heldout.labels, req.num_classes)
    counts = {"table": _gaussian(exact, z)}
    _save_answer(folder, mark, digest, counts)
    log.info("[%s] evaluation query %d of %s answered with noise z=%g", site.name, index, req.experiment, z)
    return P.EvaluationReply(counts=counts).as_reply(msg)


def distance_histogram(records: np.ndarray, synthetic: np.ndarray) -> np.ndarray:
    """Exact counts of ``records`` by pixel MSE to their nearest synthetic image over ``AUDIT_BIN_EDGES``; the
    search runs on fixed :func:`audit_block` distance blocks, so that a record's nearest image (near-ties) and thus
    its bin depend on that record alone (sensitivity 1)."""
    edges = np.asarray(P.AUDIT_BIN_EDGES)
    if not len(records):  # a held-out set of no records: every bin 0 (the noise is the whole answer)
        return np.zeros(len(edges) - 1)
    distances, _ = nearest_neighbors(records, synthetic, metric="mse", device="cpu",
                                     block_shape=audit_block(records.shape[1:]))
    bins = np.clip(np.searchsorted(edges, distances, side="right") - 1, 0, len(edges) - 2)
    return np.bincount(bins, minlength=len(edges) - 1).astype(np.float64)


@site_handler
def handle_audit(msg: Message, context: Context, site: SiteSettings) -> Message:
    require_plain_allowed(site)
    req = P.AuditRequest.from_message(msg)
    data, heldout, folder = _open_query(site, site.audits, "audit", req.experiment)
    images = req.synthetic.get("images")
    if set(req.synthetic) != {"images"} or images is None:
        raise Refusal(P.REFUSED_BAD_REQUEST, "an audit query carries exactly one array, 'images'")
    if (images.ndim != 4 or tuple(images.shape[1:]) != data.image_shape or images.dtype != np.float32
            or not 1 <= len(images) <= P.AUDIT_MAX_IMAGES or not np.all(np.isfinite(images))):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"synthetic images must be float32 (N, {data.image_shape}) with "
                                             f"1 <= N <= {P.AUDIT_MAX_IMAGES}, finite; got {images.dtype} {images.shape}")
    need_mb = audit_memory_mb(data.image_shape, len(images))
    if need_mb > site.max_step_memory_mb:  # before the charge: an audit that cannot finish must cost nothing
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"an audit of {len(images):,} images of {data.image_shape} takes about "
                                             f"{need_mb:,.0f} MB; this site allows {site.max_step_memory_mb:,} MB a "
                                             "step (its operator's max_step_memory_mb): send fewer images")
    digest = request_digest(AUDIT_PURPOSE, {}, {"images": images})
    saved = saved_answer(site, folder, AUDIT_PURPOSE, digest)
    if saved is not None:
        return P.AuditReply(histograms=saved).as_reply(msg)
    ledger, index = _query_ledger(site, data, AUDIT_PURPOSE, req.experiment)
    plan = _run_plan(folder)
    z = _noise(site, plan, P.AUDIT_NOISE)
    mark = _charge(ledger, z, data, purpose=AUDIT_PURPOSE, run=req.experiment, index=index, plan=plan, folder=folder)
    synthetic = np.clip(images, 0.0, 1.0)
    histograms = {"train": _gaussian(distance_histogram(data.images, synthetic), z),
                  "heldout": _gaussian(distance_histogram(heldout.images, synthetic), z)}
    _save_answer(folder, mark, digest, histograms)
    log.info("[%s] audit query %d of %s answered with noise z=%g", site.name, index, req.experiment, z)
    return P.AuditReply(histograms=histograms).as_reply(msg)
