"""Attacks a hostile coordinator could make on a site, each of which worked before and must fail now.

1. Run its own code at the sites (a rogue app bundle) -> a real SuperNode refuses it before it loads.
   Reach the Control API from elsewhere -> 403.
2. Rebuild a training record with adaptive audit queries -> refused by default; when allowed, each
   answer is noisy and charged, a cap per run stops repeats, and the attack rebuilds nothing.
3. Probe the held-out records through federated evaluation (class counts, membership of one record)
   -> refused by default; when allowed, noisy, charged and capped, and the probes learn (almost) nothing.
   Name a learner module for the site to import (code its operator never approved) -> refused, not imported.
4. Read a site's record count -> never sent (test_protocol checks every reply of real runs).
5. Read the discriminator's loss on real records -> no longer sent (test_protocol: no undeclared field).
6. Reset a site's budget by changing its data -> the ledger follows the declared dataset id.
7. Make a site pay twice by interrupting it -> an interrupted round reuses its charge.
8. The privacy statement lists what each site released (test_spine); refusals name no budget (here).
And the sensitivity of every released quantity, measured against the one the noise is calibrated to.
"""

from __future__ import annotations

import http.client
import json
import math
import ssl
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from client.app import app as client_app
from client.requests import FAILURE_TEXT
from common import protocol as P
from common.data import DataError, ImageDataset, load_dataset, save_npz
from fedsynth.localgrid import LocalGrid, set_task_identity
from tests.spine_helpers import charges, fast_config, nodes, run, spent

DIGITS = load_dataset("digits", "train")
DIGITS_TEST = load_dataset("digits", "test")


def deployed_site(tmp_path: Path, *, heldout: ImageDataset | None = None, name: str = "site-a",
                  train: ImageDataset | None = None, **extra) -> dict:
    """A node config as `fedsynth site` writes it, over npz files in ``tmp_path``."""
    train_path = tmp_path / f"{name}-train.npz"
    save_npz(train if train is not None else DIGITS.subset(np.arange(600)), train_path)
    node = {"site-name": name, "data-path": str(train_path), "state-dir": str(tmp_path / name), "epsilon": 10.0,
            "dataset-id": name}
    if heldout is not None:
        held_path = tmp_path / f"{name}-heldout.npz"
        save_npz(heldout, held_path)
        node.update({"heldout-path": str(held_path), "heldout-split": "train"})
    node.update(extra)
    return node


def ask(grid: LocalGrid, node_id: int, request) -> object:
    set_task_identity()
    return list(grid.send_and_receive([request.as_request(node_id, "x", ttl=60.0)]))[0]


# ================================================================================================
# 1. a rogue app bundle, and the Control API from elsewhere (real processes, TLS + auth)
# ================================================================================================

ROGUE_CLIENT = '''
import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query("info")
def steal(msg, context):
    """Answers the real schema query with the site's first private image."""
    data = np.load(context.node_config["data-path"])
    loot = data["train_images"][:1].astype("float32")
    return Message(RecordDict({"loot": ArrayRecord({"image": Array(loot)})}), reply_to=msg)
'''

ROGUE_SERVER = '''
import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.info", ttl=120.0)
            for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=90))
    rows = [{"node": r.metadata.src_node_id, "error": r.has_error(), "code": r.error.code if r.has_error() else 0,
             "reason": r.error.reason if r.has_error() else "", "records": list(r.content.keys()) if r.has_content() else []}
            for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps({"contacted": len(nodes), "replies": rows}))
'''

ROGUE_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue"
version = "1.0.0"
license = "Apache-2.0"
description = "a coordinator's own app: it asks the sites for their data"
dependencies = ["flwr>=1.41.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedsynth"

[tool.flwr.app.components]
serverapp = "rogue_server:app"
clientapp = "rogue_client:app"

[tool.flwr.app.config]
out = ""
'''


def test_a_rogue_app_bundle_is_refused_by_real_supernodes_before_it_loads(deployment):
    from fedsynth.ops.approved_code import bundle_digest

    dep = deployment
    rogue = dep.root / "rogue-app"
    rogue.mkdir(exist_ok=True)
    (rogue / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (rogue / "rogue_server.py").write_text(ROGUE_SERVER)
    (rogue / "rogue_client.py").write_text(ROGUE_CLIENT)
    before = {name: sorted(p.relative_to(dep.root) for p in (dep.root / "state" / name).rglob("*")
                           if "flwr-home" not in p.parts) for name in ("site1", "site2", "site3")}
    logs_before = {name: len(dep.sites[name].text()) for name in ("site1", "site2", "site3")}
    result = dep.root / "rogue.json"
    ran = dep.flwr("run", str(rogue), "fedsynth", "--run-config", f"out='{result}'", "--stream")
    assert result.exists(), ran.stdout[-3000:] + ran.stderr[-3000:]
    outcome = json.loads(result.read_text())
    assert outcome["contacted"] == 3 and len(outcome["replies"]) == 3
    from flwr.cli.build import build_fab_from_disk

    digest = bundle_digest(build_fab_from_disk(rogue))
    for reply in outcome["replies"]:
        assert reply["error"] and reply["code"] == P.REFUSED_UNAPPROVED_CODE, reply
        assert "approved" in reply["reason"] and digest in reply["reason"]
        assert reply["records"] == []  # no loot
    for name in ("site1", "site2", "site3"):
        log = dep.sites[name].text()[logs_before[name]:]
        assert "REFUSED run" in log and "not one of them" in log
        assert "flwr-clientapp" not in log  # no ClientApp process was started for the run
        after = sorted(p.relative_to(dep.root) for p in (dep.root / "state" / name).rglob("*")
                       if "flwr-home" not in p.parts)
        assert after == before[name]  # nothing at the site was touched


def _post(address: tuple[str, int], path: str, ca: Path, source: str) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # the certificate names 127.0.0.1; we connect from another loopback address
    conn = http.client.HTTPSConnection(*address, timeout=30, context=ctx, source_address=(source, 0))
    conn.request("POST" if path.startswith("/v1/") else "GET", path, body=b"",
                 headers={"content-type": "application/protobuf"})
    status = conn.getresponse().status
    conn.close()
    return status


def test_the_control_api_answers_only_the_operators_addresses(deployment):
    import yaml

    dep = deployment
    cfg = yaml.safe_load(dep.coord_yaml.read_text())
    address, ca = ("127.0.0.1", int(cfg["port"])), dep.root / "certs" / "ca.crt"
    nodes_before = sorted(n["node-id"] for n in dep.nodes())
    for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/control/list-runs",
                 "/v1/runtime/v1/pull-messages", "/docs", "/openapi.json"):
        assert _post(address, path, ca, "127.0.0.2") == 403, path  # another address: refused before routing
    assert _post(address, "/v1/control/list-runs", ca, "127.0.0.1") != 403  # the operator's own address
    assert _post(address, "/health", ca, "127.0.0.2") == 200  # sites still reach the SuperLink
    assert _post(address, "/v1/fleet/pull-messages", ca, "127.0.0.2") != 403
    assert sorted(n["node-id"] for n in dep.nodes()) == nodes_before  # no key was registered
    assert dep.flwr("ls", "fedsynth").returncode == 0  # the operator's CLI on the coordinator host works


# ================================================================================================
# 2. adaptive audit queries against one training record
# ================================================================================================

def _reconstruct(distance_to_nearest, base: np.ndarray, h: float = 0.02) -> np.ndarray:
    """The 65-query attack on 8x8 images: with d(q) = min_i mean((q - x_i)^2) exact, a record is rebuilt from
    d(base) and d(base + h e_j): x_j = base_j + h/2 - D (d(base + h e_j) - d(base)) / (2 h)."""
    d0 = distance_to_nearest(base)
    flat = base.reshape(-1)
    out = np.empty_like(flat)
    for j in range(flat.size):
        probe = flat.copy()
        probe[j] += h
        out[j] = flat[j] + h / 2 - flat.size * (distance_to_nearest(probe.reshape(base.shape)) - d0) / (2 * h)
    return out.reshape(base.shape)


def test_adaptive_audit_queries_do_not_rebuild_a_training_record(tmp_path):
    from common.audits import nearest_neighbors

    train = DIGITS.subset(np.arange(300))
    base = train.images.mean(axis=0)  # the attacker starts from an average digit

    def exact(q):  # what an exact audit answer (PSNR / distance to the nearest training record) gave away
        return float(nearest_neighbors(q[None], train.images, metric="mse")[0][0])

    target = train.images[int(nearest_neighbors(base[None], train.images)[1][0])]  # the record it can rebuild
    assert np.abs(_reconstruct(exact, base) - target).max() < 1e-3  # exact answers: that record, rebuilt

    # audits are off by default: refused, nothing charged
    grid = LocalGrid(client_app, [deployed_site(tmp_path / "off", heldout=DIGITS_TEST, train=train)],
                     fast_config(tmp_path).to_flwr())
    reply = ask(grid, 1000, P.AuditRequest(experiment="a", synthetic={"images": base[None]}))
    assert reply.has_error() and reply.error.code == P.REFUSED_NOT_ALLOWED
    assert charges(tmp_path / "off", "site-a") in ([], [[]])

    # allowed (budget 10, one query per run): a second query of a run is refused, the same query re-sent gets its
    # saved answer again (nothing new, nothing charged: review s63); each answer is noisy
    node = deployed_site(tmp_path, heldout=DIGITS_TEST, train=train, audits=True)
    grid = LocalGrid(client_app, [node], fast_config(tmp_path).to_flwr())
    first = ask(grid, 1000, P.AuditRequest(experiment="run-1", synthetic={"images": base[None]}))
    assert not first.has_error()
    resent = ask(grid, 1000, P.AuditRequest(experiment="run-1", synthetic={"images": base[None]}))
    assert not resent.has_error()
    for name, hist in P.AuditReply.from_message(first).histograms.items():
        assert np.array_equal(P.AuditReply.from_message(resent).histograms[name], hist)
    again = ask(grid, 1000, P.AuditRequest(experiment="run-1", synthetic={"images": base[None] * 0.5}))
    assert again.has_error() and again.error.code == P.REFUSED_NOT_ALLOWED and "per run" in again.error.reason
    assert [e["purpose"] for e in charges(tmp_path, "site-a")[0]] == ["audit"]
    # an audit whose memory (client.evaluation.audit_memory_mb) is above the site's step limit is refused before its
    # charge (review s63: it was charged, then ran out of memory, at every retry)
    small = LocalGrid(client_app, [deployed_site(tmp_path / "small", heldout=DIGITS_TEST, train=train, audits=True,
                                                 **{"max-step-memory-mb": 1})], fast_config(tmp_path).to_flwr())
    many = np.repeat(base[None], P.AUDIT_MAX_IMAGES, axis=0)  # (2000, 1, 8, 8): about 1.5 MB to hold
    refused = ask(small, 1000, P.AuditRequest(experiment="big", synthetic={"images": many}))
    assert refused.has_error() and refused.error.code == P.REFUSED_NOT_ALLOWED and "max_step_memory_mb" in \
        refused.error.reason
    assert charges(tmp_path / "small", "site-a") in ([], [[]])
    edges = np.asarray(P.AUDIT_BIN_EDGES)

    def noisy(q):  # the attacker's best reading of d(q): the lower edge of the first bin holding a record
        reply = ask(grid, 1000, P.AuditRequest(experiment=uuid.uuid4().hex, synthetic={"images": q[None]}))
        assert not reply.has_error(), reply.error.reason  # every query a new run, each one charged
        hist = P.AuditReply.from_message(reply).histograms["train"]
        first = int(np.argmax(hist >= 0.5)) if (hist >= 0.5).any() else len(hist) - 1
        return float(edges[first])

    rebuilt = np.clip(_reconstruct(noisy, base), 0, 1)
    start_error = float(np.mean((base - target) ** 2))
    # the noisy answers carry no usable signal: the attack ends about where it started (exact answers: 0)
    assert float(np.mean((rebuilt - target) ** 2)) > 0.5 * start_error
    audits = [e for e in charges(tmp_path, "site-a")[0] if e["purpose"] == "audit"]
    assert len(audits) == 1 + 65  # every answer is in the ledger
    assert all(e["events"] == [{"noise_multiplier": P.AUDIT_NOISE, "sample_rate": 1.0, "steps": 1}] for e in audits)
    assert audits[-1]["epsilon_after"] <= 10.0  # ... and within the site's budget


# ================================================================================================
# 3. probes of the held-out records through federated evaluation
# ================================================================================================

def _constant_model(cls: int) -> dict[str, np.ndarray]:
    from common.learner import build_learner

    model = build_learner("logreg", (1, 8, 8), 10)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-1.0)
        model.head.bias[cls] = 1.0
    return P.state_arrays(model)


def _detector_model(target: np.ndarray, label: int, radius: float = 0.5) -> dict[str, np.ndarray]:
    """An MLP that predicts ``label`` only for images within L1 distance ``radius`` (normalised) of ``target``."""
    from common.learner import build_learner

    model = build_learner("mlp", (1, 8, 8), 10)
    z = (torch.from_numpy(target.reshape(-1)) - 0.5) / 0.5  # the learner's input normalisation
    d = z.numel()
    with torch.no_grad():
        first, second = model.body[1], model.body[3]
        for layer in (first, second, model.head):
            layer.weight.zero_()
            layer.bias.zero_()
        first.weight[:d] = torch.eye(d)
        first.bias[:d] = -z  # relu(z_j - target_j)
        first.weight[d:2 * d] = -torch.eye(d)
        first.bias[d:2 * d] = z  # relu(target_j - z_j)
        second.weight[0, :2 * d] = 1.0  # unit 0 = L1 distance to the target
        model.head.weight[label, 0] = -1.0
        model.head.bias[label] = radius  # logit(label) = radius - L1
        model.head.bias[(label + 1) % 10] = 0.0
        model.head.bias[[c for c in range(10) if c not in (label, (label + 1) % 10)]] = -100.0
    return P.state_arrays(model)


def _evaluation(grid, node_id, arrays, learner, experiment):
    req = P.EvaluationRequest(experiment=experiment, learner=learner, channels=1, height=8, width=8, num_classes=10,
                              classifier=arrays)
    return ask(grid, node_id, req)


def test_evaluation_probes_learn_nothing_exact_about_held_out_records(tmp_path):
    from client.evaluation import correct_wrong_table
    from common.learner import build_learner, predict

    heldout = DIGITS_TEST
    target, label = heldout.images[0], int(heldout.labels[0])
    without = heldout.subset(np.arange(1, len(heldout)))
    detector = _detector_model(target, label)

    def exact_cell(data):  # what an exact evaluation reply gave away: right answers of class `label`
        model = build_learner("mlp", (1, 8, 8), 10)
        P.load_state(model, detector)
        return correct_wrong_table(data.labels, predict(model, data.images), 10)[label, 0]

    assert (exact_cell(heldout), exact_cell(without)) == (1.0, 0.0)  # exact answers: membership and label

    # evaluation is off by default: refused
    off = LocalGrid(client_app, [deployed_site(tmp_path / "off", heldout=heldout)], fast_config(tmp_path).to_flwr())
    assert _evaluation(off, 1000, _constant_model(0), "logreg", "x").error.code == P.REFUSED_NOT_ALLOWED

    # allowed, at two sites whose held-out sets differ by the target record only (unlimited budgets, so
    # that nothing but the noise stands between the probe and the record)
    member = deployed_site(tmp_path, heldout=heldout, name="member", evaluation=True, epsilon=math.inf)
    other = deployed_site(tmp_path, heldout=without, name="other", evaluation=True, epsilon=math.inf)
    grid = LocalGrid(client_app, [member, other], fast_config(tmp_path).to_flwr())
    # the class-count probe: ten constant models; the cap stops the second one within a run
    first = _evaluation(grid, 1000, _constant_model(0), "logreg", "probe")
    assert not first.has_error()
    assert _evaluation(grid, 1000, _constant_model(1), "logreg", "probe").error.code == P.REFUSED_NOT_ALLOWED
    # the same query re-sent (its reply lost): the saved answer again, no fresh noise and no charge (review s63)
    resent = P.EvaluationReply.from_message(_evaluation(grid, 1000, _constant_model(0), "logreg", "probe"))
    assert np.array_equal(resent.counts["table"], P.EvaluationReply.from_message(first).counts["table"])
    truth = np.bincount(heldout.labels, minlength=10)
    counts = [P.EvaluationReply.from_message(_evaluation(grid, 1000, _constant_model(c), "logreg", f"c{c}")).counts[
        "table"][c, 0] for c in range(10)]
    errors = np.abs(np.asarray(counts) - truth)
    # noisy (integer noise of std 10), not the class counts: an exact answer errs by 0 in all ten classes; a noisy one
    # errs by 0 in a class with probability 0.04, so in 4 or more of the 10 once in ~2,300 runs (3 or more, the
    # earlier bound, once in ~160: a fresh clone hit it on 2026-12-07)
    assert (errors > 0.5).sum() >= 7 and errors.mean() > 2.0
    # the membership probe, 60 times at each site: guess "member" when the detector's cell reads > 0.5
    guesses = {}
    for site in (1000, 1001):
        cells = [P.EvaluationReply.from_message(_evaluation(grid, site, detector, "mlp", uuid.uuid4().hex)).counts[
            "table"][label, 0] for _ in range(60)]
        guesses[site] = np.asarray(cells) > 0.5
    accuracy = (guesses[1000].sum() + (~guesses[1001]).sum()) / 120
    assert accuracy < 0.7  # about a coin toss (exact answers: 1.0)
    assert len([e for e in charges(tmp_path, "member")[0] if e["purpose"] == "evaluation"]) == 1 + 10 + 60


def test_the_held_out_sets_own_schema_never_reaches_the_coordinator(tmp_path):
    """query.info publishes the training data's schema; the held-out set's shape and classes can hinge on single
    records (one colour pixel makes a folder's images 3-channel), so a refusal must not name them. A query at a
    site whose held-out set does not match is refused with the generic failure, before anything is charged
    (``fedsynth site`` refuses to start such a site)."""
    colour = ImageDataset(np.repeat(DIGITS_TEST.images[:50], 3, axis=1), DIGITS_TEST.labels[:50], DIGITS_TEST.classes)
    site = deployed_site(tmp_path, heldout=colour, evaluation=True)
    grid = LocalGrid(client_app, [site], fast_config(tmp_path).to_flwr())
    reply = _evaluation(grid, 1000, _constant_model(0), "logreg", "schema")
    assert reply.has_error() and reply.error.code == P.SITE_FAILURE
    assert "3" not in reply.error.reason.replace("site-a", "")  # neither its channels nor anything else of it
    assert charges(tmp_path, "site-a") in ([], [[]])  # nothing charged (at most the ledger's own start)


def test_a_held_out_set_of_no_records_is_answered_with_noise_and_charged(tmp_path):
    """Whether a site's held-out set holds any record is a record count (0 against 1): until stop 66 an empty set
    got the generic failure before the charge, a free answer. Emptied in any way -- an npz of no records, an image
    folder whose files were all withdrawn, records of classes the site does not publish -- it is now a set of no
    records: both queries are charged and answered, with noise alone where the records would be. So is a split
    layout whose held-out split was withdrawn, which before read the other split as the held-out set."""
    from common.data import save_image_folder

    folder = tmp_path / "folder-heldout"
    save_image_folder(DIGITS_TEST.subset(np.arange(20)), folder)
    for f in folder.rglob("*.png"):  # every held-out file withdrawn, the class folders left
        f.unlink()
    unpublished = ImageDataset(DIGITS_TEST.images[:30], DIGITS_TEST.labels[:30] % 2, ("x", "y"))  # other classes
    # train/ and test/ with every test record withdrawn: train/ alone was taken as a wrapper folder, so the held-out
    # set became 400 training records (review s66); an archive of file entries keeps no empty folder
    save_image_folder(DIGITS.subset(np.arange(400)), tmp_path / "split" / "train")
    archive = tmp_path / "split.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for f in sorted((tmp_path / "split").rglob("*.png")):
            tar.add(f, arcname=str(f.relative_to(tmp_path / "split")))
    cases = {"npz": {"heldout": DIGITS_TEST.subset(np.arange(0))},
             "folder": {"heldout-path": str(folder), "heldout-split": "train"},
             "unpublished": {"heldout": unpublished},
             "split": {"heldout-path": str(archive), "heldout-split": "test"}}
    for name, held in cases.items():
        site = deployed_site(tmp_path / name, name=name, evaluation=True, audits=True, **held)
        grid = LocalGrid(client_app, [site], fast_config(tmp_path).to_flwr())
        evaluation = _evaluation(grid, 1000, _constant_model(0), "logreg", "empty")
        audit = ask(grid, 1000, P.AuditRequest(experiment="empty", synthetic={"images": DIGITS_TEST.images[:5]}))
        assert not evaluation.has_error() and not audit.has_error(), (name, evaluation, audit)
        table = P.EvaluationReply.from_message(evaluation).counts["table"]  # (10, 2): noise alone
        histograms = P.AuditReply.from_message(audit).histograms
        assert table.shape == (10, 2) and histograms["heldout"].shape == histograms["train"].shape
        # 41 bins of noise std 10 each: a sum's std is 64; the 600 training records are there, no held-out record is
        assert histograms["train"].sum() > 300 and abs(float(histograms["heldout"].sum())) < 300
        assert abs(float(table.sum())) < 250  # 20 cells of noise std 10: std 45, and no record
        purposes = [e["purpose"] for e in charges(tmp_path / name, name)[0]]
        assert purposes.count("evaluation") == 1 and purposes.count("audit") == 1, (name, purposes)


def test_a_held_out_set_without_its_top_class_is_answered_like_one_with_it(tmp_path):
    """Review s59: a held-out npz without class names takes its class list from its own label range, so the only
    held-out record of the top class decided the list, and without it every evaluation and audit failed before its
    charge: a free, repeatable answer to whether that record is there. The held-out set is now read in the published
    classes; a record of another class is left out."""
    def heldout_npz(path, data):  # no 'classes' key: the class list is the labels' range
        np.savez(path, train_images=np.round(data.images[:, 0] * 255).astype(np.uint8), train_labels=data.labels)

    nines = np.flatnonzero(DIGITS_TEST.labels == 9)
    with_nine = DIGITS_TEST.subset(np.concatenate([np.flatnonzero(DIGITS_TEST.labels < 9), nines[:1]]))
    without = DIGITS_TEST.subset(np.flatnonzero(DIGITS_TEST.labels < 9))
    answers = []
    for name, held in (("with", with_nine), ("without", without)):
        site = deployed_site(tmp_path / name, heldout=None, evaluation=True, audits=True)
        heldout_npz(tmp_path / name / "held.npz", held)
        site.update({"heldout-path": str(tmp_path / name / "held.npz"), "heldout-split": "train"})
        grid = LocalGrid(client_app, [site], fast_config(tmp_path).to_flwr())
        evaluation = _evaluation(grid, 1000, _constant_model(0), "logreg", "e")
        audit = ask(grid, 1000, P.AuditRequest(experiment="e", synthetic={"images": DIGITS_TEST.images[:5]}))
        answers.append([not r.has_error() for r in (evaluation, audit)])
    assert answers == [[True, True], [True, True]]


def test_an_unreadable_image_file_at_a_running_site_is_no_record_not_a_failure(tmp_path, monkeypatch):
    """Review s59: one file that does not decode (a record's copy not yet complete) made every load fail, so every
    request failed, the free query.info included: anyone could see that a record was being added. The site's
    loader leaves such a file out, with a warning in its log."""
    from client.site import SiteSettings, load_site_data
    from common.data import save_image_folder

    import io

    from PIL import Image

    save_image_folder(DIGITS.subset(np.arange(40)), tmp_path / "data")
    (tmp_path / "data" / "3" / "incomplete.png").write_bytes(b"")
    # (seventh helper: PIL picks its decoder by the content, and a damaged DDS file named .png raised
    # NotImplementedError, which the first fix did not catch)
    dds = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(dds, "DDS")
    damaged = bytearray(dds.getvalue())
    damaged[80:84] = (8192).to_bytes(4, "little")  # pixel-format flags PIL does not know
    (tmp_path / "data" / "4" / "damaged.png").write_bytes(bytes(damaged))
    # (eighth helper: an image past PIL's pixel warning was decoded on every request: 12000x12000 took 2.9 s and
    # 905 MB; here the limit is lowered so that 40x40 passes it)
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "data" / "5" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)
    site = SiteSettings(name="s", data=str(tmp_path / "data"), state_dir=tmp_path / "state", epsilon_budget=5.0)
    with pytest.warns(UserWarning, match="skipped 3 files that are not readable images"):
        assert len(load_site_data(site)) == 40
    with pytest.raises(DataError, match="cannot decode image"):  # anywhere else it is an error, as before
        load_dataset(tmp_path / "data")
    # an npz record labelled outside the npz's named classes made the whole file fail the same way
    images = np.round(DIGITS.images[:30, 0] * 255).astype(np.uint8)
    labels = np.concatenate([DIGITS.labels[:29], [10]])
    np.savez(tmp_path / "named.npz", train_images=images, train_labels=labels, classes=np.array(DIGITS.classes))
    named = SiteSettings(name="s", data=str(tmp_path / "named.npz"), state_dir=tmp_path / "state", epsilon_budget=5.0)
    with pytest.warns(UserWarning, match="skipped 1 records of split 'train' labelled outside its 10 classes"):
        assert len(load_site_data(named)) == 29
    with pytest.raises(DataError, match="outside"):
        load_dataset(tmp_path / "named.npz")


def test_a_malformed_query_is_refused_before_a_new_sites_ledger_is_started(tmp_path):
    """Opening a new site's ledger charges its noisy size (client.site_delta): a query the site refuses for its own
    content (a learner it does not build, a classifier of another shape, synthetic images of another shape) must be
    refused before that, so that it costs nothing."""
    site = deployed_site(tmp_path, heldout=DIGITS_TEST, evaluation=True, audits=True)
    grid = LocalGrid(client_app, [site], fast_config(tmp_path).to_flwr())
    bad = [_evaluation(grid, 1000, _constant_model(0), "no-such-learner", "e"),
           _evaluation(grid, 1000, _constant_model(0), "mlp", "e"),  # logreg weights sent as an mlp
           ask(grid, 1000, P.AuditRequest(experiment="e", synthetic={"images": np.zeros((2, 1, 4, 4), np.float32)}))]
    assert all(r.has_error() and r.error.code == P.REFUSED_BAD_REQUEST for r in bad), [r.error.reason for r in bad]
    assert not list((tmp_path / "site-a").rglob("*.jsonl"))  # no ledger started, nothing charged
    # the same for a training request whose epsilon cannot pay even its census (public values only)
    from tests.test_faults import gan_request

    reply = ask(grid, 1000, gan_request(fast_config(tmp_path, num_rounds=1), experiment="tiny", epsilon=0.01))
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET and "too small" in reply.error.reason
    assert not list((tmp_path / "site-a").rglob("*.jsonl"))


def test_a_classifier_above_the_sites_max_parameters_is_refused_before_it_is_built(tmp_path):
    """Review s59: the evaluation built and initialised the learner the coordinator names before any check, and the
    site's max_parameters did not apply (an mlp at 3x512x512, 201 million parameters, was built, then refused for
    its arrays, uncharged, as often as it was sent). It is now counted on the meta device and refused first."""
    from common.learner import build_learner

    site = deployed_site(tmp_path, heldout=DIGITS_TEST, evaluation=True, **{"max-parameters": 1_000})
    grid = LocalGrid(client_app, [site], fast_config(tmp_path).to_flwr())
    mlp = P.state_arrays(build_learner("mlp", (1, 8, 8), 10))
    reply = _evaluation(grid, 1000, mlp, "mlp", "wide")
    assert reply.has_error() and reply.error.code == P.REFUSED_NOT_ALLOWED, reply.error.reason
    assert "max_parameters" in reply.error.reason and "a smaller learner" in reply.error.reason
    assert not any(charges(tmp_path, "site-a"))
    reply = _evaluation(grid, 1000, _constant_model(0), "logreg", "narrow")  # 650 parameters: answered
    assert not reply.has_error(), reply.error.reason


def test_a_site_never_imports_a_learner_the_coordinator_names(tmp_path):
    import sys

    # a module that would run at import: if the site imported it, the marker would be written
    rogue = tmp_path / "rogue_learner_pkg"
    rogue.mkdir()
    marker = tmp_path / "imported"
    (rogue / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef net(s, k):\n    return None\n")
    sys.path.insert(0, str(tmp_path))
    try:
        node = deployed_site(tmp_path, heldout=DIGITS_TEST, evaluation=True)
        grid = LocalGrid(client_app, [node], fast_config(tmp_path).to_flwr())
        reply = _evaluation(grid, 1000, _constant_model(0), "rogue_learner_pkg:net", "x")
    finally:
        sys.path.remove(str(tmp_path))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "not built in" in reply.error.reason
    assert not marker.exists()  # nothing the coordinator named was imported
    assert not any(charges(tmp_path, "site-a"))  # nothing charged: not even a ledger started


def test_a_long_learner_name_comes_back_quoted_short(tmp_path):
    """Review s57: the learner a request names (up to 4,096 characters) came back whole in the refusal, where every
    refusal quotes at most 200 characters of what the coordinator sent (common.wire.quoted)."""
    grid = LocalGrid(client_app, [deployed_site(tmp_path, heldout=DIGITS_TEST, evaluation=True)],
                     fast_config(tmp_path).to_flwr())
    reply = _evaluation(grid, 1000, _constant_model(0), "L" * 4096, "x")
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "not built in" in reply.error.reason
    assert len(reply.error.reason) < 600 and "4,098 characters" in reply.error.reason


# ================================================================================================
# 6. the ledger follows the declared dataset id, not the data's content
# ================================================================================================

def test_adding_one_record_under_the_same_dataset_id_keeps_the_spent_budget(tmp_path, caplog):
    from client import site as site_module
    from tests.test_faults import gan_request

    cfg = fast_config(tmp_path, num_rounds=1)
    # a budget of two runs: with 10, the second run got only what the first left (0.03-0.11, by the census's
    # draw) and was refused now and then for the noise that takes
    node = deployed_site(tmp_path, train=DIGITS.subset(np.arange(400)), epsilon=25.0)
    grid = LocalGrid(client_app, [node], cfg.to_flwr())
    assert not ask(grid, 1000, gan_request(cfg, experiment="before")).has_error()
    ledgers = sorted((tmp_path / "site-a").rglob("ledger/*.jsonl"))
    first = _spent(ledgers[0])
    save_npz(DIGITS.subset(np.arange(401)), Path(node["data-path"]))  # one record more, same dataset id
    site_module._load_cached.cache_clear()
    with caplog.at_level("WARNING", logger="fedsynth.site"):
        assert not ask(grid, 1000, gan_request(cfg, experiment="after")).has_error()
    assert sorted((tmp_path / "site-a").rglob("ledger/*.jsonl")) == ledgers  # the same ledger, not a fresh one
    assert _spent(ledgers[0]) > first  # the old records' spending is still counted
    assert "changed since its last release" in caplog.text


def test_a_renamed_dataset_id_does_not_give_the_same_records_a_second_budget(tmp_path, caplog):
    """Review s60: with the runs folder archived (as a full state folder's refusal asks), a new dataset_id over the
    same records started a fresh ledger: the records spent 9.94 under one id and 9.91 more under the other."""
    import shutil

    from tests.test_faults import gan_request

    cfg = fast_config(tmp_path, num_rounds=1)
    node = deployed_site(tmp_path, train=DIGITS.subset(np.arange(400)))
    assert not ask(LocalGrid(client_app, [node], cfg.to_flwr()), 1000, gan_request(cfg, experiment="a")).has_error()
    shutil.move(tmp_path / "site-a" / "runs", tmp_path / "archived-runs")
    renamed = LocalGrid(client_app, [node | {"dataset-id": "site-a-v2"}], cfg.to_flwr())
    with caplog.at_level("ERROR"):
        reply = ask(renamed, 1000, gan_request(cfg, experiment="b"))
    assert reply.has_error() and "set dataset_id back to 'site-a'" in caplog.text  # the operator's log says why
    assert [p.name for p in (tmp_path / "site-a" / "ledger").glob("*.jsonl")] == ["site-a.jsonl"]


def test_a_ledgers_first_entry_ties_it_to_its_records_and_its_delta_to_the_published_bound(tmp_path):
    """Review s60 (attacking its own fix): the ledger's first entry, its default delta's noisy size, recorded no data
    fingerprint, so a second dataset id over the same records started a second ledger while the first held only
    that entry; and a ledger made with delta 1e-4, opened by a site whose delta was then unset, was planned at 1e-4
    while query.info published 1e-5 (under which an honest neighbour's split noise fell short)."""
    from client.ledger import LedgerDamaged
    from client.site import data_fingerprint, open_ledger, resolve_site
    from common.accounting import DPEvent

    node = deployed_site(tmp_path, train=DIGITS.subset(np.arange(300)))
    data = load_dataset(node["data-path"], "train")
    assert open_ledger(resolve_site(node, {}), data).summary()["releases"] == 1  # the noisy size only
    ledgers = tmp_path / "site-a" / "ledger"
    (ledgers / "site-a.backup.jsonl").write_bytes((ledgers / "site-a.jsonl").read_bytes())  # a copy of its own: fine
    assert open_ledger(resolve_site(node, {}), data).summary()["releases"] == 1
    with pytest.raises(LedgerDamaged, match="set dataset_id back to 'site-a'"):
        open_ledger(resolve_site(node | {"dataset-id": "other"}, {}), data)
    # an id switched and back: a ledger that had charged nothing of its records (its delta set, so no noisy size)
    # while another id's ledger spent on them is refused too, at every opening (review s60's eighth helper)
    fixed = deployed_site(tmp_path, train=DIGITS.subset(np.arange(300)), name="site-c", delta=1e-6)
    assert open_ledger(resolve_site(fixed, {}), data).summary()["releases"] == 0  # its header only
    other = open_ledger(resolve_site(fixed | {"dataset-id": "c2"}, {}), data)
    other.charge([DPEvent(1.0, 0.01, 10)], purpose="x", run="r", round=0, data=data_fingerprint(data))
    with pytest.raises(LedgerDamaged, match="set dataset_id back to 'c2'"):
        open_ledger(resolve_site(fixed, {}), data)
    loose = deployed_site(tmp_path, train=DIGITS.subset(np.arange(300)), name="site-b", delta=1e-4)
    open_ledger(resolve_site(loose, {}), data)
    with pytest.raises(ValueError, match="set delta: 0.0001"):
        open_ledger(resolve_site(loose | {"delta": 0.0}, {}), data)
    with pytest.raises(ValueError, match=r"Set delta back to 0.0001 in the site config\.$"):  # not "or leave it at 0"
        open_ledger(resolve_site(loose | {"delta": 1e-5}, {}), data)  # (review s61: which the check above refuses)
    # a ledger an older fedsynth named by the data's fingerprint (no dataset id in its header) is the one this id
    # takes over, not a second budget: the read-only check (fedsynth site --check) refused it (review s61)
    import json

    old = deployed_site(tmp_path / "old", train=DIGITS.subset(np.arange(300)), name="site-d", delta=1e-6)
    site = resolve_site(old, {})
    open_ledger(site, data).charge([DPEvent(1.0, 0.01, 10)], purpose="x", run="r", round=0,
                                   data=data_fingerprint(data))
    header, *rest = site.ledger_path.read_text().splitlines()
    legacy = site.ledger_path.parent / f"{data_fingerprint(data)}.jsonl"
    legacy.write_text("\n".join([json.dumps({k: v for k, v in json.loads(header).items() if k != "dataset_id"}),
                                 *rest]) + "\n")
    site.ledger_path.unlink()
    site.ledger_path.with_suffix(".started").unlink()  # (an older fedsynth wrote no mark)
    assert open_ledger(site, data, create=False).spent().epsilon > 0  # read-only: its charges, under this id
    assert open_ledger(site, data).spent().epsilon > 0 and not legacy.exists()  # taken over


def test_a_site_whose_budget_left_pays_for_no_plan_refuses_before_the_census(tmp_path):
    """Review s67: the check before a run's census planned as if nothing were spent, so once the budget left could
    pay for no plan, every new run id was charged a census and then refused by its plan: a coordinator burned the
    rest of the budget (1.98 to 2.06 of 3 in eight runs) with nothing released. The check now plans beside what
    the ledger holds. And a run used for queries before it trained is refused before the row checks' work, which a
    coordinator could otherwise have repeated for free with a new shape each time."""
    from tests.test_faults import gan_request, send

    cfg = fast_config(tmp_path, num_rounds=2)
    site = deployed_site(tmp_path / "a", epsilon=3.0, heldout=DIGITS_TEST, evaluation=True, audits=True)
    grid = LocalGrid(client_app, [site], cfg.to_flwr())  # (the queries it reserves are what no plan can pay)
    answered = [not send(grid, 1000, gan_request(cfg, experiment=f"run{i}", epsilon=2.6, num_rounds=1)).has_error()
                for i in range(6)]
    assert answered[0] and not any(answered[answered.index(False):])  # once refused, refused for good
    # every census charged belongs to a run that was answered: none was charged and then refused by its plan
    purposes = [(e["purpose"], e["run"]) for e in charges(tmp_path / "a", "site-a")[0]]
    assert purposes == [p for i in range(answered.count(True)) for p in (("dpgan-census", f"run{i}"),
                                                                        ("dpgan", f"run{i}"))]
    # a run queried before it trained: refused before the row checks, whatever shape each request names
    from client import gan_site
    grid = LocalGrid(client_app, [deployed_site(tmp_path / "b", heldout=DIGITS_TEST, evaluation=True)], cfg.to_flwr())
    assert not _evaluation(grid, 1000, _constant_model(0), "logreg", "x").has_error()
    checked, real = [], gan_site.check_network_rows
    gan_site.check_network_rows = lambda *a, **k: checked.append(a) or real(*a, **k)
    try:
        replies = [send(grid, 1000, gan_request(cfg, experiment="x", d_width=w)) for w in (24, 40)]
    finally:
        gan_site.check_network_rows = real
    assert all(r.has_error() and "before it trained" in r.error.reason for r in replies) and checked == [], \
        [r.error.reason if r.has_error() else "ok" for r in replies]
    # review s67's fifth helper, on that check: honest requests it must not refuse. A statistics release over a
    # provided net (no census, so no census file) re-sent after its run's queries: its plan is read back, never
    # made again with the run's own charges counted twice (it was refused at a budget the run had filled)
    from common.bnnet import BNNet
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    bn_cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, epsilon=3.0)
    settings = {**plan_settings(bn_cfg, Schema(1, 8, 8, tuple(map(str, range(10)))), "p"), "net_rounds": 0}
    release = P.BnStatsRequest(**settings, net=P.state_arrays(BNNet(1, 10, 8, 8)))
    site = deployed_site(tmp_path / "c", modes="bnstats", epsilon=3.0, heldout=DIGITS_TEST, evaluation=True,
                         **{"queries-per-run": 2})
    grid = LocalGrid(client_app, [site], bn_cfg.to_flwr())
    assert not ask(grid, 1000, release).has_error()
    assert not any(_evaluation(grid, 1000, _constant_model(i), "logreg", "p").has_error() for i in range(2))
    assert not ask(grid, 1000, release).has_error()  # the saved release, sent again at no charge
    # and a ledger left without its header by a crash at its creation is the writable open's to mend, as before
    site = deployed_site(tmp_path / "d")
    (tmp_path / "d" / "site-a" / "ledger").mkdir(parents=True)
    (tmp_path / "d" / "site-a" / "ledger" / "site-a.jsonl").write_bytes(b"")
    grid = LocalGrid(client_app, [site], cfg.to_flwr())
    assert not send(grid, 1000, gan_request(cfg, experiment="e", num_rounds=1)).has_error()


def test_a_plan_no_census_could_make_possible_is_refused_before_the_census(tmp_path):
    """Review s60: an epsilon that pays the census but not the census and the queries the site reserves was refused
    only by the plan, after the census's charge; no census could have saved it. Now refused before, at no cost."""
    from tests.test_faults import gan_request

    cfg = fast_config(tmp_path, num_rounds=1, epsilon=0.3)
    node = deployed_site(tmp_path, heldout=DIGITS_TEST, evaluation=True, audits=True, **{"queries-per-run": 5})
    reply = ask(LocalGrid(client_app, [node], cfg.to_flwr()), 1000, gan_request(cfg, experiment="small"))
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET
    assert not list((tmp_path / "site-a").rglob("ledger/*.jsonl"))  # nothing charged, not even a ledger started


def test_a_provided_nets_plan_the_sites_reserved_queries_leave_unpaid_is_refused_before_its_ledger(tmp_path, caplog):
    """Review s60 (left for later, done s61): a statistics release with a provided net checked its plan without the
    queries the site reserves, so an epsilon that pays the release but not the release and the queries was refused
    only by the plan, after a new ledger's noisy size was charged. Now refused first, at no cost."""
    from common.bnnet import BNNet
    from server.modes.bnstats import plan_settings
    from server.sites import Schema

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=0, bn_width=8, epsilon=0.2)
    settings = plan_settings(cfg, Schema(1, 8, 8, tuple(str(i) for i in range(10))), "provided")
    settings.update(net_rounds=0)
    request = P.BnStatsRequest(**settings, net=P.state_arrays(BNNet(1, 10, 8, 8)))
    quiet = deployed_site(tmp_path / "quiet", modes="bnstats")  # no queries reserved: the same request is paid
    assert not ask(LocalGrid(client_app, [quiet], cfg.to_flwr()), 1000, request).has_error()
    node = deployed_site(tmp_path, heldout=DIGITS_TEST, evaluation=True, audits=True, modes="bnstats",
                         **{"queries-per-run": 5})
    with caplog.at_level("INFO"):
        reply = ask(LocalGrid(client_app, [node], cfg.to_flwr()), 1000, request)
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET
    assert not list((tmp_path / "site-a").rglob("ledger/*.jsonl"))  # nothing charged, not even a ledger started
    assert "the 5 evaluation and 5 audit queries this site reserves" in caplog.text  # the site's log says why (s61)


def _spent(path: Path) -> float:
    from client.ledger import PrivacyLedger

    return PrivacyLedger(path, epsilon_budget=math.inf, create=False).spent().epsilon


# ================================================================================================
# 7. interrupt and rerun: never charged twice
# ================================================================================================

class _Interrupt(KeyboardInterrupt):
    pass


def _train_round_raising(monkeypatch, on_call: int, error: BaseException) -> None:
    """Make the sites' ``LocalGanTrainer.train_round`` raise ``error`` at its ``on_call``-th call (counted over every
    site of the process) and train as usual at every other call."""
    import client.gan_site as gan_site

    real, calls = gan_site.LocalGanTrainer.train_round, []

    def train_round(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == on_call:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gan_site.LocalGanTrainer, "train_round", train_round)


@pytest.mark.parametrize("where", ["mid-round-1", "after-round-1", "mid-round-2", "after-round-2"])
def test_interrupt_and_rerun_charges_exactly_one_run(tmp_path, monkeypatch, where):
    import server.fedavg as fedavg

    kind, rnd = where.rsplit("-", 1)[0], int(where[-1])
    if kind == "mid-round":  # the second site is interrupted after charging round `rnd`, while training
        _train_round_raising(monkeypatch, 3 * (rnd - 1) + 2, _Interrupt())
    else:  # the coordinator is interrupted right after checkpointing round `rnd`
        real_save = fedavg.save_checkpoint

        def save_then_die(path, state):
            real_save(path, state)
            if state["round"] == rnd:
                raise _Interrupt()

        monkeypatch.setattr(fedavg, "save_checkpoint", save_then_die)
    cfg = fast_config(tmp_path, num_rounds=2)  # no fixed experiment id: the coordinator keeps its own
    with pytest.raises(_Interrupt):
        run(cfg)
    monkeypatch.undo()
    run(cfg)  # the same command again
    # each site spent exactly its run's plan (its census and both rounds, once): the plan's epsilon, which the
    # site fixed at the run's first request from its own noisy census (besides the noisy size its ledger began with)
    from common.accounting import DPEvent, epsilon_for

    planned = [json.loads(p.read_text())["planned_epsilon"]
               for p in sorted((tmp_path / "sites").glob("*/runs/*/plan.json"))]
    run_spent = [epsilon_for([DPEvent.from_dict(e) for entry in entries for e in entry["events"]], entries[0]["delta"])
                 for entries in charges(tmp_path)]
    assert len(planned) == 3 and run_spent == pytest.approx(planned, rel=1e-9)
    assert all(s > r for s, r in zip(spent(tmp_path), run_spent))  # the ledger's noisy size adds a little
    for entries in charges(tmp_path):
        assert [(e["purpose"], e["round"]) for e in entries] == [("dpgan-census", 0), ("dpgan", 1), ("dpgan", 2)]


def test_an_interrupted_statistics_release_is_charged_once(tmp_path, monkeypatch):
    import client.bn_site as bn_site

    cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=1, bn_local_steps=2, bn_width=8, bn_iterations=3,
                      bn_synth_batch=50, synthetic_size=50)
    real, calls = bn_site.record_class_statistics, []

    def release_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Interrupt()
        return real(*args, **kwargs)

    monkeypatch.setattr(bn_site, "record_class_statistics", release_then_die)
    with pytest.raises(_Interrupt):
        run(cfg, k=2)
    monkeypatch.undo()
    run(cfg, k=2)
    for entries in charges(tmp_path):
        assert [e["purpose"] for e in entries] == ["bnstats-census", "bnstats-net", "bnstats-release"]


def test_a_failed_attempt_is_charged_again_when_the_round_is_re_sent(tmp_path, monkeypatch):
    """Whether work fails can depend on the records (the code cannot rule out every such failure). An interrupted
    attempt reuses its charge (the tests above); one that *failed* must not, or a coordinator re-sending the round
    gets, for free, another draw of its noise or another data-dependent yes/no for each failure. The extra charge
    counts against the run's own epsilon: the run's last round no longer fits it and is refused (a run never spends
    more than it asked, however often its work fails)."""
    from common.accounting import DPEvent, epsilon_for
    from tests.test_faults import gan_request, send

    _train_round_raising(monkeypatch, 1, RuntimeError("a failure whose cause depends on the records"))
    cfg = fast_config(tmp_path, num_rounds=2)
    # a site budget above the run's epsilon: the retry is a new release, which must fit the site's budget too
    grid = LocalGrid(client_app, [{**nodes(1)[0], "epsilon": 30.0}], cfg.to_flwr())
    first = send(grid, 1000, gan_request(cfg))
    assert first.has_error() and first.error.code == P.SITE_FAILURE
    assert "records" not in first.error.reason  # the failure's text stays in the site's log
    assert not send(grid, 1000, gan_request(cfg)).has_error()
    (entries,) = charges(tmp_path)
    assert [(e["purpose"], e["round"]) for e in entries] == [("dpgan-census", 0), ("dpgan", 1), ("dpgan", 1)]
    assert entries[-1]["details"]["after-an-unfinished-attempt"] == "failed"
    assert not send(grid, 1000, gan_request(cfg)).has_error()  # re-sent after success: its saved reply, no charge
    assert len(charges(tmp_path)[0]) == 3
    last = send(grid, 1000, gan_request(cfg, server_round=2))  # the run has paid for round 1 twice
    assert last.has_error() and last.error.code == P.REFUSED_BUDGET
    assert last.error.reason.endswith("the requested work does not fit this site's privacy budget")
    (entries,) = charges(tmp_path)
    assert len(entries) == 3
    run_events = [DPEvent.from_dict(e) for entry in entries for e in entry["events"]]
    assert epsilon_for(run_events, entries[0]["delta"]) <= cfg.epsilon


def test_an_attempt_killed_mid_work_is_charged_again_and_one_interrupted_by_its_operator_is_not(tmp_path,
                                                                                                monkeypatch):
    """Killed (out of memory: how much a DP-SGD round takes follows its Poisson batches, so the records), an attempt
    removes nothing, and its mark makes the retry pay; Ctrl-C at the site marks the attempt "interrupted" (a positive
    mark, written durably), and the retry reuses the charge (test_interrupt_and_rerun_charges_exactly_one_run)."""
    from tests.test_faults import gan_request, send

    _train_round_raising(monkeypatch, 1, _Interrupt())
    cfg = fast_config(tmp_path, num_rounds=2)
    site = deployed_site(tmp_path, epsilon=30.0)  # a deployed site (a simulated one reuses a killed attempt's charge)
    grid = LocalGrid(client_app, [site], cfg.to_flwr())
    with pytest.raises(_Interrupt):  # (the in-process site: the interruption reaches the caller, as Ctrl-C would)
        send(grid, 1000, gan_request(cfg))
    assert not send(grid, 1000, gan_request(cfg)).has_error()
    assert [(e["purpose"], e["round"]) for e in charges(tmp_path, "site-a")[0]] == [("dpgan-census", 0),
                                                                                   ("dpgan", 1)]
    # round 2 killed after its charge: the mark a killed process leaves behind ("running"), and no saved reply
    (folder,) = (tmp_path / "site-a" / "runs").iterdir()
    (folder / "attempt-dpgan-2").write_text("running")
    assert not send(grid, 1000, gan_request(cfg, server_round=2)).has_error()
    entries = charges(tmp_path, "site-a")[0]
    assert [(e["purpose"], e["round"]) for e in entries] == [("dpgan-census", 0), ("dpgan", 1), ("dpgan", 2)]
    assert entries[-1]["details"]["after-an-unfinished-attempt"] == "running"
    assert not list(folder.glob("attempt-*"))  # finished attempts leave no mark


def test_a_device_the_site_does_not_have_is_refused_before_anything_is_charged(tmp_path):
    """The run config's device is the coordinator's choice; one the site cannot use failed after the charge, so
    every retry cost budget and released nothing."""
    from tests.test_faults import gan_request, send

    cfg = fast_config(tmp_path, num_rounds=1)
    for device in ("tpu", "cuda:7"):
        grid = LocalGrid(client_app, nodes(1), {**cfg.to_flwr(), "device": device})
        reply = send(grid, 1000, gan_request(cfg))
        assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST and "device" in reply.error.reason
    assert charges(tmp_path) == []  # no ledger was even started


def test_a_killed_attempt_at_a_simulated_site_reuses_its_charge(tmp_path):
    """A simulation's sites are run by its owner, whose way to stop one is to kill it (a second Ctrl-C stops the
    site threads mid-round): the rerun reuses the charge, as "nothing is charged twice" promises."""
    from tests.test_faults import gan_request, send

    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    folder = tmp_path / "sites" / "site-1" / "runs" / "hostile"
    folder.mkdir(parents=True)
    (folder / "attempt-dpgan-1").write_text("running")  # as a killed attempt leaves it (its charge: not yet made)
    assert not send(grid, 1000, gan_request(cfg)).has_error()
    entries = charges(tmp_path)[0]
    assert [(e["purpose"], e["round"]) for e in entries] == [("dpgan-census", 0), ("dpgan", 1)]
    assert "after-an-unfinished-attempt" not in entries[-1]["details"]


def test_two_copies_of_a_request_at_once_get_one_release_for_one_charge(tmp_path, monkeypatch):
    """A coordinator can push the same request twice at once (Flower starts a ClientApp per message). Worked on
    together, both copies found no saved reply, the second reused the first's charge, and each trained with fresh
    noise: two releases for one charge. A site now works on one request at a time (client.requests), so the
    second copy gets the first one's saved reply."""
    import threading
    import time

    import client.gan_site as gan_site
    from tests.test_faults import gan_request

    real = gan_site.LocalGanTrainer.train_round

    def slow(self, *args, **kwargs):  # the first copy is still training when the second arrives
        time.sleep(1.5)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gan_site.LocalGanTrainer, "train_round", slow)
    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, nodes(1), cfg.to_flwr())
    set_task_identity()
    msg = gan_request(cfg).as_request(1000, "1", ttl=60.0)
    replies = [None, None]

    def answer(i: int) -> None:
        replies[i] = grid._answer(msg)  # the site's ClientApp, on its own copy of the message

    workers = [threading.Thread(target=answer, args=(i,)) for i in range(2)]
    workers[0].start()
    time.sleep(0.5)
    workers[1].start()
    for w in workers:
        w.join()
    assert not any(r.has_error() for r in replies)
    a, b = (P.GanTrainReply.from_message(r).generator for r in replies)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # one release, sent twice
    (entries,) = charges(tmp_path)
    assert [(e["purpose"], e["round"]) for e in entries] == [("dpgan-census", 0), ("dpgan", 1)]


def test_ctrl_c_says_what_was_spent_and_how_to_resume(tmp_path, monkeypatch, capsys):
    from fedsynth import cli

    _train_round_raising(monkeypatch, 4, KeyboardInterrupt())
    args = ["simulate", "--data", "digits", "--test", "digits", "--sites", "3", "--rounds", "2", "--quiet",
            "--out", str(tmp_path / "run"), "--set", "gan-local-steps=3", "--set", "gan-width=16",
            "--set", "learner-epochs=1", "--set", "synthetic-size=50"]
    assert cli.main(args) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "site-1 epsilon" in err and "same command" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    assert cli.main(args) == 0  # resumes


# ================================================================================================
# refusals say why without revealing the budget
# ================================================================================================

def test_refusals_name_no_budget_spending_or_noise(tmp_path):
    from tests.test_faults import gan_request, send

    cfg = fast_config(tmp_path, num_rounds=1)
    grid = LocalGrid(client_app, [{**nodes(1)[0], "epsilon": 3.7}], cfg.to_flwr())
    assert not send(grid, 1000, gan_request(cfg, experiment="spend")).has_error()
    # 3.7 spent, far more asked: 40,000 full-batch steps (q = 1) in what the budget has left
    reply = send(grid, 1000, gan_request(cfg, experiment="more", local_steps=40_000, batch_size=4096))
    assert reply.has_error() and reply.error.code == P.REFUSED_BUDGET
    reason = reply.error.reason.replace("site-1", "")
    assert not any(ch.isdigit() for ch in reason), reason  # no budget, spent or remaining epsilon, no sigma


def test_experiment_ids_that_are_not_file_names_are_refused_not_rewritten(tmp_path):
    """A site names its run folder after the experiment id. Rewriting an id into a file name ("a/b" -> "a_b",
    or cutting a long one) would let two runs the coordinator keeps apart share one folder: the second would get
    the first one's saved reply back, silently. Such ids are refused before anything is charged or written."""
    from common.config import ConfigError, RunConfig
    from common.run_id import MAX_EXPERIMENT_ID
    from tests.test_faults import gan_request, send

    cfg = fast_config(tmp_path, num_rounds=1)
    # a budget for both runs trained here, each of which fills its epsilon (client.ledger_order: no slack is left over)
    grid = LocalGrid(client_app, [{**nodes(1)[0], "epsilon": 3 * cfg.epsilon}], cfg.to_flwr())
    first = send(grid, 1000, gan_request(cfg, experiment="a_b"))
    assert not first.has_error()
    before = charges(tmp_path)[0]
    # (and, review s63, ids that Windows gives another id's folder: a trailing dot dropped, a device name)
    for bad in ("a/b", "a b", "../a_b", ".a_b", "-rf", "a\\b", "é", "x" * (MAX_EXPERIMENT_ID + 1), "a_b.", "CON",
                "nul.txt", "com1"):
        reply = send(grid, 1000, gan_request(cfg, experiment=bad))
        assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST, bad
        assert "experiment id" in reply.error.reason
    assert charges(tmp_path)[0] == before  # nothing charged for them
    # an id that differs from a kept run's only in case: one folder on a file system that ignores case
    reply = send(grid, 1000, gan_request(cfg, experiment="A_b"))
    assert reply.has_error() and reply.error.code == P.REFUSED_BAD_REQUEST
    assert "only in case" in reply.error.reason and "'A_b'" in reply.error.reason
    assert "a_b" not in reply.error.reason  # a reason names none of the site's files: not the kept run's folder
    assert charges(tmp_path)[0] == before  # nothing charged for them
    assert sorted(p.name for p in (tmp_path / "sites" / "site-1" / "runs").iterdir()) == ["a_b"]
    assert not send(grid, 1000, gan_request(cfg, experiment="x" * MAX_EXPERIMENT_ID)).has_error()
    assert not send(grid, 1000, gan_request(cfg, experiment="a_b")).has_error()  # the run itself: its saved reply
    # an evaluation query too, at a new site: refused before its ledger is started
    fresh = LocalGrid(client_app, [deployed_site(tmp_path / "q", heldout=DIGITS_TEST, evaluation=True)],
                      fast_config(tmp_path / "q").to_flwr())
    assert _evaluation(fresh, 1000, _constant_model(0), "logreg", "a/b").error.code == P.REFUSED_BAD_REQUEST
    from client.requests import LOCK_FILE  # (the one file a request writes before anything: its lock, empty)

    assert [p.name for p in (tmp_path / "q" / "site-a").iterdir()] == [LOCK_FILE]
    # the coordinator's config refuses them first, with the fix
    with pytest.raises(ConfigError, match="experiment: .*give another id"):
        RunConfig.from_mapping({"experiment": "a/b"}).validate()
    RunConfig.from_mapping({"experiment": "run-1.b_2"}).validate()


# ================================================================================================
# sensitivity: the worst change of every released quantity when one record is added or removed
# ================================================================================================

def _records_to_try(data: ImageDataset) -> list[tuple[np.ndarray, int]]:
    """A typical record, an all-white and an all-black image (extremes), each with two labels."""
    rec = []
    for image in (data.images[3], np.ones_like(data.images[0]), np.zeros_like(data.images[0])):
        for label in (int(data.labels[3]), (int(data.labels[3]) + 5) % data.num_classes):
            rec.append((image.astype(np.float32), label))
    return rec


def _with(data: ImageDataset, image: np.ndarray, label: int) -> ImageDataset:
    return ImageDataset(np.concatenate([data.images, image[None]]), np.append(data.labels, label), data.classes)


def _clipped_gradient_sum(d_model, opt, loss_fn) -> torch.Tensor:
    """The DP-SGD step's sum of per-sample clipped gradients, before noise (Opacus' own clipping)."""
    opt.zero_grad(set_to_none=True)
    loss_fn().backward()
    opt.clip_and_accumulate()
    out = torch.cat([p.summed_grad.reshape(-1) for p in opt.params])
    opt.zero_grad(set_to_none=True)
    for p in opt.params:
        p.summed_grad = None
    return out


def test_every_release_changes_by_at_most_its_sensitivity_when_one_record_changes():
    from opacus import GradSampleModule

    from client.auto_clip import norm_histograms, record_block_norms
    from client.bnstats import exact_class_sums, release_sensitivity
    from client.dpgan import discriminator_loss, gan_input
    from client.evaluation import distance_histogram, evaluation_table
    from client.nonfinite import FiniteDPOptimizer as DPOptimizer  # the sites' own optimizer
    from common.bnnet import BNNet, norm_layer_names
    from common.learner import build_learner
    from common.models import Discriminator, GanShape, Generator

    data = DIGITS.subset(np.arange(64))
    torch.manual_seed(0)
    measured: dict[str, float] = {}

    def worst(name, fn):
        measured[name] = max(measured.get(name, 0.0), fn())

    # census: exact class counts (noise CENSUS_NOISE, sensitivity 1)
    for image, label in _records_to_try(data):
        worst("census", lambda: float(np.linalg.norm(_with(data, image, label).class_counts() - data.class_counts())))
    # the discriminator's DP-SGD step: record i's row is (real_i, its own fake with label y_i), clipped to C
    shape, clip = GanShape(1, 8, 10, 8, 16), 1.0
    gen, disc = Generator(shape), Discriminator(shape)
    d_model = GradSampleModule(disc, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(disc.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=16)
    x = gan_input(data.images[:16], "cpu")  # what the site's trainer feeds D (client.dpgan)
    y = torch.from_numpy(data.labels[:16])
    z = torch.randn(17, shape.latent_dim)  # one latent per record, fixed: the coupling of the two batches
    for image, label in _records_to_try(data):
        x2 = gan_input(np.concatenate([data.images[:16], image[None]]), "cpu")
        y2 = torch.cat([y, torch.tensor([label])])
        with torch.no_grad():
            fake, fake2 = gen(z[:16], y), gen(z, y2)
        g1 = _clipped_gradient_sum(d_model, opt, lambda: discriminator_loss(d_model, x, fake, y, 0.3)[0])
        g2 = _clipped_gradient_sum(d_model, opt, lambda: discriminator_loss(d_model, x2, fake2, y2, 0.3)[0])
        worst("dpgan-step", lambda: float((g2 - g1).norm()) / clip)
    # the shared net's DP-SGD step (cross-entropy of each record), clipped to C
    net = BNNet(1, 10, 8, 8)
    n_model = GradSampleModule(net, loss_reduction="sum")
    n_opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip,
                        expected_batch_size=16)
    for image, label in _records_to_try(data):
        x2 = gan_input(np.concatenate([data.images[:16], image[None]]), "cpu")
        y2 = torch.cat([y, torch.tensor([label])])
        ce = torch.nn.functional.cross_entropy
        g1 = _clipped_gradient_sum(n_model, n_opt, lambda: ce(n_model((x + 1) / 2), y, reduction="sum"))
        g2 = _clipped_gradient_sum(n_model, n_opt, lambda: ce(n_model((x2 + 1) / 2), y2, reduction="sum"))
        worst("bnnet-step", lambda: float((g2 - g1).norm()) / clip)
    n_model._close()
    # the statistics release, scaled as the mechanism sees it (count x a, block l / (c_l sqrt L)); both clipping kinds
    net = BNNet(1, 10, 8, 8, head_norm=True).eval()
    a, layers = 0.5, norm_layer_names(net)
    for bound in (2.3, {name: c for name, c in zip(layers, (0.5, 1.0, 2.0, 40.0))}):
        def scaled(ds):
            sums = exact_class_sums(net, ds, num_classes=10, clip_bound=bound)
            parts = [sums["count"] * a]
            for name in layers:
                c = bound[name] * math.sqrt(len(layers)) if isinstance(bound, dict) else bound
                parts += [sums["sum/" + name].ravel() / c, sums["sumsq/" + name].ravel() / c]
            return np.concatenate(parts)

        base = scaled(data)
        for image, label in _records_to_try(data):
            worst("bnstats-release", lambda: float(np.linalg.norm(scaled(_with(data, image, label)) - base))
                  / release_sensitivity(a))
    # the DP choice of clip bounds: one bin per layer per record (noise z sqrt(L))
    base = np.concatenate(list(norm_histograms(record_block_norms(net, data)).values()))
    for image, label in _records_to_try(data):
        h = np.concatenate(list(norm_histograms(record_block_norms(net, _with(data, image, label))).values()))
        worst("clip-choice", lambda: float(np.linalg.norm(h - base)) / math.sqrt(len(layers)))
    # evaluation: the (K, 2) right/wrong table; audits: both distance histograms
    model = build_learner("logreg", (1, 8, 8), 10)
    synthetic = DIGITS.images[100:120]
    for image, label in _records_to_try(data):
        grown = _with(data, image, label)
        worst("evaluation", lambda: float(np.linalg.norm(  # the site's own computation (fixed padded batches)
            evaluation_table(model, grown.images, grown.labels, 10)
            - evaluation_table(model, data.images, data.labels, 10))))
        worst("audit", lambda: float(np.linalg.norm(distance_histogram(grown.images, synthetic)
                                                    - distance_histogram(data.images, synthetic))))
    # every measured change, in units of the sensitivity the noise is calibrated to, is at most 1
    assert set(measured) == {"census", "dpgan-step", "bnnet-step", "bnstats-release", "clip-choice", "evaluation",
                             "audit"}
    for name, value in measured.items():
        assert value <= 1.0 + 1e-6, (name, value)
    assert measured["dpgan-step"] > 0.5 and measured["bnstats-release"] > 0.5  # the bound is tight, not vacuous
    print(json.dumps(measured))


# ================================================================================================
# a site that declared an attribute sensitive (seed 004) works only for runs that replace it
# ================================================================================================

def test_a_site_that_declared_race_sensitive_refuses_runs_that_do_not_replace_it(tmp_path):
    from client.requests import Refusal, require_mode
    from client.site import SiteSettings
    from tests.test_faults import gan_request, send

    cfg = fast_config(tmp_path, num_rounds=1)
    node = deployed_site(tmp_path, **{"label-from": "utkface-gender+race", "sensitive-attribute": "race"})
    grid = LocalGrid(client_app, [node], cfg.to_flwr())
    for promised in ("", "gender"):  # a coordinator that says nothing, or replaces another attribute
        reply = send(grid, 1000, gan_request(cfg, experiment="ignores-it", sensitive_attribute=promised))
        assert reply.has_error() and reply.error.code == P.REFUSED_NOT_ALLOWED
        assert "declares race sensitive" in reply.error.reason and "sensitive-attribute = race" in reply.error.reason
    assert not (tmp_path / "site-a" / "ledger").exists()  # refused before the ledger was even opened
    site = SiteSettings.from_node_config(node, {})
    with pytest.raises(Refusal, match="only the DP-GAN mode"):  # the statistics mode cannot replace it
        require_mode(site, "bnstats")
    # a declaration the site's own labels cannot honour is refused when the site starts
    with pytest.raises(ValueError, match="label-from = utkface-gender\\+race"):
        SiteSettings.from_node_config({**node, "label-from": "utkface-gender"}, {})


def test_a_class_folder_emptied_at_a_running_site_does_not_fail_its_requests(tmp_path):
    """Review s58: a class folder left empty at a running site (its last record withdrawn) made the loader fail, so
    every request failed, the free query.info included: a coordinator could tell that the class held no record now.
    A site loads such a folder as a class with no records; its published classes are the folder names either way."""
    from PIL import Image

    rng = np.random.default_rng(0)
    answers = []
    for records_of_b in (1, 0):
        root = tmp_path / f"data-{records_of_b}"
        for cls, n in (("a", 20), ("b", records_of_b)):
            (root / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / cls / f"{i}.png")
        node = {"site-name": "s", "data-path": str(root), "state-dir": str(tmp_path / f"state-{records_of_b}"),
                "epsilon": 10.0}
        grid = LocalGrid(client_app, [node], fast_config(tmp_path).to_flwr())
        reply = ask(grid, 1000, P.InfoRequest())
        assert not reply.has_error(), reply.error.reason
        answers.append(P.InfoReply.from_message(reply).classes)
    assert answers[0] == answers[1] == ("a", "b")
    with pytest.raises(Exception, match="holds no images"):  # elsewhere (evaluate, simulate) it stays an error
        load_dataset(tmp_path / "data-0")


def test_a_running_site_whose_every_record_was_withdrawn_answers_with_noise_and_charges(tmp_path):
    """Whether a site holds any record at all is a record count (0 against 1). Until stop 67 a deployed site whose
    every training record was withdrawn while it ran failed every request before its charge, query.info included:
    a free, repeatable answer. It now reads no records in the shape and classes it pinned at start, and answers
    every request as any other -- checked, charged, and noise alone where the records would be."""
    from PIL import Image

    from client.site import SiteSettings
    from fedsynth.ops.site_cmd import pinned
    from server.modes.bnstats import plan_settings
    from server.sites import Schema
    from tests.test_faults import gan_request, send

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls in range(10):
        (root / str(cls)).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / str(cls) / f"{i}.png")
    settings = SiteSettings(name="s", data=str(root), state_dir=tmp_path / "state", epsilon_budget=10.0,
                            heldout=str(root), heldout_split="train", evaluation=True, audits=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "preview.png")  # no record: ignored beside the classes
    node = pinned(settings, load_dataset(root)).to_node_config()
    import shutil
    for folder in [d for d in root.iterdir() if d.is_dir()]:  # every record withdrawn with its class folder,
        shutil.rmtree(folder)  # training and held-out alike; the preview image stays (review s67: it made this fail)
    cfg = fast_config(tmp_path)
    bn_cfg = fast_config(tmp_path, mode="bnstats", bn_rounds=1, bn_width=8, bn_local_steps=3, bn_batch_size=64)
    bn = plan_settings(bn_cfg, Schema(1, 8, 8, tuple(map(str, range(10)))), "bn")
    from common.bnnet import BNNet
    net = P.state_arrays(BNNet(1, 10, 8, bn["width"], head_norm=bn["head_norm"]).eval())

    def grid(tag, run_cfg):  # a site of its own for each kind of request, so that none runs out of budget
        return LocalGrid(client_app, [dict(node, **{"state-dir": str(tmp_path / tag)})], run_cfg.to_flwr())

    info = ask(grid("info", cfg), 1000, P.InfoRequest())
    assert not info.has_error(), info.error.reason
    assert P.InfoReply.from_message(info).classes == tuple(map(str, range(10)))
    gan_grid = grid("gan", cfg)
    for rnd in (1, 2):
        reply = send(gan_grid, 1000, gan_request(cfg, server_round=rnd))
        assert not reply.has_error(), reply.error.reason
    bn_grid = grid("bn", bn_cfg)
    for request in (P.BnTrainRequest(**bn, server_round=1, net=net), P.BnStatsRequest(**bn, net=net)):
        reply = send(bn_grid, 1000, request)
        assert not reply.has_error(), reply.error.reason
    for clips in ("", "auto"):  # auto: per-layer bounds from noisy norm histograms of no record (review s67)
        provided = send(grid(f"provided{clips}", bn_cfg), 1000,
                        P.BnStatsRequest(**{**bn, "net_rounds": 0, "layer_clips": clips}, net=net))
        assert not provided.has_error(), provided.error.reason
        counts = P.BnStatsReply.from_message(provided).stats["count"]  # (10,) integer noise alone, no record
        assert counts.shape == (10,) and abs(float(counts.sum())) < 20
    query_grid = grid("query", cfg)
    evaluation = _evaluation(query_grid, 1000, _constant_model(0), "logreg", "q")
    audit = ask(query_grid, 1000, P.AuditRequest(experiment="q", synthetic={"images": DIGITS_TEST.images[:5]}))
    assert not evaluation.has_error() and not audit.has_error()
    assert abs(float(P.AuditReply.from_message(audit).histograms["train"].sum())) < 300  # noise std 64, no record
    purposes = {tag: [(e["purpose"], e["round"]) for e in charges(tmp_path, tag)[0]]
                for tag in ("gan", "bn", "provided", "providedauto", "query")}
    assert purposes == {"gan": [("dpgan-census", 0), ("dpgan", 1), ("dpgan", 2)],
                        "bn": [("bnstats-census", 0), ("bnstats-net", 1), ("bnstats-release", 0)],
                        "provided": [("bnstats-release", 0)], "providedauto": [("bnstats-release", 0)],
                        "query": [("evaluation", 1), ("audit", 1)]}
    # the data removed rather than emptied (the folder, an IDX split's two files) is every record withdrawn too
    shutil.rmtree(root)
    assert not ask(grid("removed", cfg), 1000, P.InfoRequest()).has_error()
    assert not _evaluation(grid("removed", cfg), 1000, _constant_model(0), "logreg", "r").has_error()
    idx = tmp_path / "mnist"
    idx.mkdir()
    for prefix, n in (("train", 30), ("t10k", 10)):
        with open(idx / f"{prefix}-images-idx3-ubyte", "wb") as f:
            f.write((2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 8, 8)) + bytes(n * 64))
        with open(idx / f"{prefix}-labels-idx1-ubyte", "wb") as f:
            f.write((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(i % 10 for i in range(n)))
    idx_node = pinned(SiteSettings(name="i", data=str(idx), state_dir=tmp_path / "i", epsilon_budget=10.0),
                      load_dataset(idx)).to_node_config()
    (idx / "train-images-idx3-ubyte").write_bytes(b"")  # half rewritten: its images gone, its labels not yet
    assert not ask(LocalGrid(client_app, [idx_node], cfg.to_flwr()), 1000, P.InfoRequest()).has_error()
    for f in idx.glob("train-*"):
        f.unlink()
    assert not ask(LocalGrid(client_app, [idx_node], cfg.to_flwr()), 1000, P.InfoRequest()).has_error()


def test_a_running_sites_class_list_is_the_one_it_published_at_start(tmp_path):
    """Review s66: the class list a site's data gives can hinge on one record -- a class folder removed with its last
    record; an npz without class names takes it from the label range over every split, so one HELD-OUT record of the
    top label decided the training set's list -- and query.info publishes it free. A deployed site pins the classes it
    started with (fedsynth site: site_cmd.pinned); later its data is read in them: a class whose last record went is a
    class with no records, and a record of a class added later is left out until the site restarts."""
    from client.site import SiteSettings
    from fedsynth.ops.site_cmd import pinned

    path = tmp_path / "data.npz"

    def write(test_labels):  # no 'classes' key: the class list is the label range over both splits
        images = np.round(DIGITS.images[:200, 0] * 255).astype(np.uint8)
        np.savez(path, train_images=images, train_labels=DIGITS.labels[:200] % 3,
                 test_images=images[:len(test_labels)], test_labels=np.asarray(test_labels))

    write([0, 1, 9])  # one held-out record of label 9: ten classes
    settings = SiteSettings(name="s", data=str(path), state_dir=tmp_path / "state", epsilon_budget=10.0,
                            heldout=str(path))
    node = pinned(settings, load_dataset(path, "train")).to_node_config()
    assert json.loads(node["classes"]) == [str(c) for c in range(10)]
    write([0, 1])  # that held-out record withdrawn
    published = {}
    for name, config in (("pinned", node), ("unpinned", settings.to_node_config())):
        reply = ask(LocalGrid(client_app, [config], fast_config(tmp_path).to_flwr()), 1000, P.InfoRequest())
        assert not reply.has_error(), reply.error.reason
        published[name] = len(P.InfoReply.from_message(reply).classes)
    assert published == {"pinned": 10, "unpinned": 3}  # unpinned (as before): the held-out record's absence, free
    # the folder that holds each split is pinned too: train/ and test/ beside another folder (chest_xray/, notes/)
    # read as a class layout [notes, train] once test/ lost its last record, at every request after
    from common.data import save_image_folder
    folder = tmp_path / "folder"
    save_image_folder(DIGITS.subset(np.arange(60)), folder / "train")
    save_image_folder(DIGITS_TEST.subset(np.arange(1)), folder / "test")
    save_image_folder(DIGITS.subset(np.arange(60, 70)), folder / "notes")
    settings = SiteSettings(name="f", data=str(folder), state_dir=tmp_path / "fstate", epsilon_budget=10.0,
                            heldout=str(folder), evaluation=True)
    node = pinned(settings, load_dataset(folder, "train")).to_node_config()
    assert (json.loads(node["data-root"]), json.loads(node["heldout-root"])) == (["train"], ["test"])
    import shutil
    shutil.rmtree(folder / "test")  # its one record withdrawn
    for name, config in (("pinned", node), ("unpinned", settings.to_node_config())):
        grid = LocalGrid(client_app, [config], fast_config(tmp_path).to_flwr())
        info = ask(grid, 1000, P.InfoRequest())
        evaluation = _evaluation(grid, 1000, _constant_model(0), "logreg", f"f-{name}")
        published[name] = (None if info.has_error() else len(P.InfoReply.from_message(info).classes),
                           evaluation.has_error())
    assert published["pinned"] == (10, False)  # the same classes; the held-out set of no records answered, charged
    assert published["unpinned"] != (10, False)  # read afresh (as before): a class layout, its requests failing
    for bad in ('["a", "a"]', '["a", ""]', '[1, 2]', '"a"'):
        with pytest.raises(ValueError, match="JSON list of distinct, non-empty class names"):
            SiteSettings(name="s", data=str(path), state_dir=tmp_path, epsilon_budget=1.0, classes=bad)


def test_a_record_of_another_size_or_mode_added_at_a_running_site_does_not_fail_its_requests(tmp_path):
    """Review s58: at a running site, one record added in another size made every load fail, so every request failed,
    the free query.info included, which told anyone it had come (a colour one changed the published channels). A
    deployed site pins the shape it checked when it started (fedsynth site: site_cmd.pinned); its handlers convert
    later records to it."""
    from PIL import Image

    from client.site import SiteSettings
    from fedsynth.ops.site_cmd import pinned

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(root / cls / f"{i}.png")
    settings = SiteSettings(name="s", data=str(root), state_dir=tmp_path / "state", epsilon_budget=10.0)
    node = pinned(settings, load_dataset(root)).to_node_config()
    assert (node["image-size"], node["channels"]) == (8, 1)
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(root / "b" / "late.png")  # another size, colour
    for config in (node, settings.to_node_config()):
        grid = LocalGrid(client_app, [config], fast_config(tmp_path).to_flwr())
        reply = ask(grid, 1000, P.InfoRequest())
        if config is node:  # pinned: answered, with the shape published before
            assert not reply.has_error(), reply.error.reason
            info = P.InfoReply.from_message(reply)
            assert (info.channels, info.height, info.width) == (1, 8, 8)
        else:  # unpinned (as before): the generic failure
            assert reply.has_error() and reply.error.reason.endswith(FAILURE_TEXT)
