"""The site: a Flower ClientApp. Everything that touches private data runs behind these handlers.

| message type          | what the site does                                   | what it sends back            |
|-----------------------|------------------------------------------------------|-------------------------------|
| ``query.info``        | loads its data                                       | image shape, class names      |
| ``train.gan``         | DP-SGD on its discriminator, trains the generator    | generator weights + metrics   |
| ``train.bnnet``       | DP-SGD on the shared GroupNorm net                    | net weights + metrics         |
| ``query.bnstats``     | DP class-wise statistics of the net's norm inputs    | noisy counts, sums, sums of squares |
| ``evaluate.classifier`` | scores the central classifier on its held-out data | accuracy, number of records   |
| ``query.audit``       | privacy diagnostics of a synthetic sample            | aggregates, labelled diagnostic |

Every reply is built from the names in ``common.protocol``; every DP release is charged in the site's
ledger before the work, and a request that does not fit the site's own budget is refused with a reason.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.bn_site import handle_bnstats, handle_train_bnnet
from client.gan_site import handle_train_gan
from client.requests import Refusal, refuse, request_config
from client.site import load_site_data, load_site_heldout, resolve_site
from common import protocol as P
from common.data import DataError
from common.learner import build_learner, evaluate_learner

log = logging.getLogger("fedsynth.site")
app = ClientApp()


@app.train("gan")
def train_gan(msg: Message, context: Context) -> Message:
    return handle_train_gan(msg, context)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    """The site's data schema: name, image shape and class names (no records, no counts)."""
    site = resolve_site(context.node_config, context.run_config)
    try:
        data = load_site_data(site)
    except DataError as err:
        return refuse(msg, site.name, Refusal(P.SITE_FAILURE, f"cannot load the site's data: {err}"))
    c, h, w = data.image_shape
    rec = ConfigRecord({"site-name": site.name, "channels": c, "height": h, "width": w,
                        "classes": list(data.classes)})
    return Message(RecordDict({P.REPLY_INFO: rec}), reply_to=msg)


@app.evaluate("classifier")
def evaluate_classifier(msg: Message, context: Context) -> Message:
    """Score the central classifier on the site's own held-out records; reply with metrics only."""
    site = resolve_site(context.node_config, context.run_config)
    try:
        cfg = request_config(msg, P.EVAL_REQUEST_KEYS)
        try:
            heldout = load_site_heldout(site)
        except DataError as err:
            raise Refusal(P.SITE_FAILURE, f"cannot load the site's held-out data: {err}") from None
        if heldout is None or len(heldout) == 0:
            raise Refusal(P.REFUSED_NOT_ALLOWED, "this site has no held-out data configured (heldout_path)")
        shape = (int(cfg["channels"]), int(cfg["height"]), int(cfg["width"]))
        if shape != heldout.image_shape or int(cfg["num-classes"]) != heldout.num_classes:
            raise Refusal(P.REFUSED_BAD_REQUEST, f"classifier expects {shape} images in {cfg['num-classes']} "
                                                 f"classes; held-out data is {heldout.image_shape}, {heldout.num_classes}")
        model = build_learner(str(cfg["learner"]), shape, int(cfg["num-classes"]))
        try:
            model.load_state_dict(msg.content.array_records[P.REQ_CLASSIFIER].to_torch_state_dict())
        except (KeyError, RuntimeError) as err:
            raise Refusal(P.REFUSED_BAD_REQUEST, f"the classifier sent does not match '{cfg['learner']}': {err}") from None
        acc = evaluate_learner(model, heldout, device="cpu")["accuracy"]
        log.info("[%s] central classifier on %d held-out records: accuracy %.4f", site.name, len(heldout), acc)
        return Message(RecordDict({P.REPLY_METRICS: MetricRecord({"num-test": len(heldout), "accuracy": acc})}),
                       reply_to=msg)
    except Refusal as err:
        return refuse(msg, site.name, err)


@app.query("audit")
def audit(msg: Message, context: Context) -> Message:
    """Privacy diagnostics of a synthetic sample against this site's records: aggregates only.

    Switchable off in the site config (``audits: false``). The reply is labelled a diagnostic: it is
    computed on private data without DP noise, which is why it carries only means, test statistics,
    AUCs, counts and fixed-bin histograms (``common.audits.site_audit_summary``).
    """
    from common.audits import site_audit_summary

    site = resolve_site(context.node_config, context.run_config)
    try:
        if not site.audits:
            raise Refusal(P.REFUSED_NOT_ALLOWED, "privacy audits are switched off in this site's config")
        cfg = request_config(msg, P.AUDIT_REQUEST_KEYS)
        try:
            data, heldout = load_site_data(site), load_site_heldout(site)
        except DataError as err:
            raise Refusal(P.SITE_FAILURE, f"cannot load the site's data: {err}") from None
        if heldout is None or len(heldout) < 2:
            raise Refusal(P.REFUSED_NOT_ALLOWED, "this site has no held-out data configured (heldout_path)")
        rec = msg.content.array_records.get(P.REQ_SYNTHETIC)
        if rec is None or "images" not in rec:
            raise Refusal(P.REFUSED_BAD_REQUEST, "request carries no synthetic images")
        synth = rec["images"].numpy()
        if synth.ndim != 4 or synth.shape[1:] != data.image_shape or synth.dtype != "float32":
            raise Refusal(P.REFUSED_BAD_REQUEST, f"synthetic images must be float32 (N, {data.image_shape}), "
                                                 f"got {synth.dtype} {synth.shape}")
        summary = site_audit_summary(synth, data.images, heldout.images, max_records=int(cfg["max-records"]),
                                     seed=int(cfg["seed"]), device="cpu")
        log.info("[%s] audit: membership AUC %.3f, near-copies %s", site.name,
                 summary["membership_inference"]["auc"], summary["memorization"]["near_copies"]["count"])
        return Message(RecordDict({P.REPLY_DIAGNOSTIC: ConfigRecord(P.flatten_diagnostic(summary))}), reply_to=msg)
    except Refusal as err:
        return refuse(msg, site.name, err)


@app.train("bnnet")
def train_bnnet(msg: Message, context: Context) -> Message:
    return handle_train_bnnet(msg, context)


@app.query("bnstats")
def bnstats(msg: Message, context: Context) -> Message:
    return handle_bnstats(msg, context)
