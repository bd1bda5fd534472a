"""Everything that leaves a site is a declared field of a protocol reply, and no reply carries a record count."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from client.site import SiteSettings, load_site_data
from common import protocol as P
from common.models import GanShape, Generator
from fedsynth.localgrid import set_task_identity
from tests.spine_helpers import fast_config, nodes, run


def test_every_reply_field_is_declared_public_or_dp():
    for message_type, cls in P.REPLY_TYPES.items():
        for name, (kind, why) in P.reply_declarations(cls).items():
            assert kind in ("public", "dp") and len(why) > 20, f"{message_type}.{name} has no declaration"


def _site_record_counts(cfg, k):
    counts = {}
    for node in nodes(k):
        site = SiteSettings.from_node_config(node, cfg.to_flwr())
        counts[node["site-name"]] = (len(load_site_data(site)), np.bincount(load_site_data(site).labels, minlength=10))
    return counts


@pytest.mark.parametrize("mode", ["dpgan", "dpgan+average-d", "bnstats"])
def test_only_declared_replies_leave_a_site_and_none_reveals_its_record_count(tmp_path, mode):
    average_d = mode.endswith("+average-d")  # the discriminators leave the sites too (gan-average-d)
    mode = mode.removesuffix("+average-d")
    cfg = fast_config(tmp_path, mode=mode, num_rounds=1, bn_rounds=1, bn_local_steps=2, bn_width=8, bn_iterations=3,
                      bn_synth_batch=50, synthetic_size=50, site_evaluation=True, site_audits=True, audit_records=40,
                      gan_average_d=average_d)
    seen = []
    report = run(cfg, k=3, tap=seen.append)
    kinds = sorted({m.metadata.message_type for m in seen})
    train = P.TRAIN_GAN if mode == "dpgan" else P.TRAIN_BNNET
    expected = {P.QUERY_INFO, train, P.EVALUATE_CLASSIFIER, P.QUERY_AUDIT} | (
        {P.QUERY_BNSTATS} if mode == "bnstats" else set())
    assert set(kinds) == expected
    counts = _site_record_counts(cfg, 3)
    exact = {float(n) for n, _ in counts.values()} | {float(c) for _, per in counts.values() for c in per if c}
    whole_numbers: dict[tuple[str, str], list] = {}
    for reply in seen:
        assert not reply.has_error(), reply.error.reason
        cls = P.REPLY_TYPES[reply.metadata.message_type]
        decoded = cls.from_message(reply)  # refuses anything undeclared
        assert set(reply.content.keys()) == {f.name for f in fields(cls) if f.metadata.get("arrays")} | {P.CONFIG}
        for f in fields(cls):
            value = getattr(decoded, f.name)
            values = (np.concatenate([np.ravel(v) for v in value.values()] + [np.zeros(0)]) if f.metadata.get("arrays")
                      else np.ravel(np.asarray(value, dtype=object)))
            if f.name == "discriminator":  # sent exactly when the run averages discriminators
                assert bool(value) == (average_d and reply.metadata.message_type == P.TRAIN_GAN)
            if reply.metadata.message_type == P.QUERY_INFO:
                continue  # the published schema: no counts in it by construction
            site = f"site-{reply.metadata.src_node_id - 1000 + 1}"  # LocalGrid numbers the nodes from 1000
            if reply.metadata.message_type == P.QUERY_BNSTATS and f.name == "stats":
                count = np.ravel(value[P.STATS_COUNT])  # whole numbers (integer noise), checked as the census is
                assert np.array_equal(count, np.round(count))
                whole_numbers.setdefault((P.QUERY_BNSTATS, P.STATS_COUNT), []).append((count, counts[site][1]))
                values = np.concatenate([np.ravel(v) for k, v in value.items() if k != P.STATS_COUNT])
            numeric = [float(v) for v in values if isinstance(v, (int, float, np.integer, np.floating))
                       and not isinstance(v, bool)]
            if f.name in ("census", "weight"):
                # noisy counts with integer noise (client.discrete_gaussian): whole numbers, which can equal some
                # exact count by chance, so they are checked against the site's own exact counts, all at once
                assert all(v == round(v) for v in numeric), f"{reply.metadata.message_type}.{f.name}"
                own = counts[site][1] if f.name == "census" else [counts[site][0]]
                if numeric:
                    whole_numbers.setdefault((reply.metadata.message_type, f.name), []).append(
                        (np.asarray(numeric), np.asarray(own, dtype=float)))
                continue
            if reply.metadata.message_type in (P.EVALUATE_CLASSIFIER, P.QUERY_AUDIT):
                # the held-out table and distance histograms: integer noise too (whole numbers; their noise is
                # measured by tests/test_hostile_coordinator.py)
                assert all(v == round(v) for v in numeric), f"{reply.metadata.message_type}.{f.name}"
                continue
            assert not exact & set(numeric), f"{reply.metadata.message_type}.{f.name} carries an exact record count"
    for (kind, name), pairs in whole_numbers.items():
        noisy, own = (np.concatenate(x) for x in zip(*pairs))
        assert not np.array_equal(noisy, own), f"{kind}.{name} carries the sites' exact counts"
    assert report["sites"] and all("examples" not in s for s in report["sites"])


def test_requests_and_replies_refuse_undeclared_fields():
    set_task_identity()
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    shape = GanShape(1, 8, 10, 16, 16)
    reply = P.GanTrainReply(generator={k: v.numpy() for k, v in Generator(shape).state_dict().items()}, weight=5.0,
                            g_loss=1.0, census={"counts": np.full(10, 0.5, np.float32)})
    record = reply.to_record()
    assert P.GanTrainReply.from_record(record).weight == 5.0
    extra = reply.to_record()
    extra[P.CONFIG]["num-examples"] = 600  # an undeclared number
    with pytest.raises(P.ProtocolError, match="unknown"):
        P.GanTrainReply.from_record(extra)
    smuggled = reply.to_record()
    smuggled["images"] = ArrayRecord({})  # an undeclared record
    with pytest.raises(P.ProtocolError, match="records"):
        P.GanTrainReply.from_record(smuggled)
    wrong_type = reply.to_record()
    wrong_type[P.CONFIG]["weight"] = "600"
    with pytest.raises(P.ProtocolError, match="number"):
        P.GanTrainReply.from_record(wrong_type)
    msg = Message(RecordDict({P.CONFIG: ConfigRecord({})}), dst_node_id=1, message_type=P.QUERY_INFO, group_id="x")
    assert P.InfoRequest.from_message(msg) == P.InfoRequest()


def test_long_strings_and_undecodable_arrays_are_refused_with_short_reasons():
    """Review s56: a 20 MB layer-clips or learner string came back as a 20 MB refusal and a 20 MB site log line, and
    crafted .npy bytes failed as a site failure instead of a refusal of the request."""
    set_task_identity()
    from flwr.app import Array, ArrayRecord

    from common.wire import MAX_STRING_CHARS, quoted

    reply = P.GanTrainReply(generator={"w": np.zeros(2, np.float32)}, weight=5.0, g_loss=1.0,
                            census={"counts": np.full(10, 0.5, np.float32)})
    long = reply.to_record()
    long[P.CONFIG]["weight"] = "9" * 10**6  # a wrong type, quoted
    with pytest.raises(P.ProtocolError, match="number") as wrong:
        P.GanTrainReply.from_record(long)
    assert len(str(wrong.value)) < 500 and "1,000,002 characters" in str(wrong.value)
    evaluation = P.EvaluationRequest(experiment="e", learner="cnn", channels=1, height=8, width=8, num_classes=10,
                                     classifier={"w": np.zeros(2, np.float32)}).to_record()
    evaluation[P.CONFIG]["learner"] = "x" * 20_000
    with pytest.raises(P.ProtocolError, match="at most 4,096") as too_long:
        P.EvaluationRequest.from_record(evaluation)
    assert len(str(too_long.value)) < 200
    assert len(quoted("x" * 10**6)) < 300
    crafted = reply.to_record()
    crafted["generator"] = ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype="numpy.ndarray",
                                                   data=b"\x93NUMPY garbage")})
    with pytest.raises(P.ProtocolError, match="cannot be decoded"):
        P.GanTrainReply.from_record(crafted)
    assert MAX_STRING_CHARS == 4096  # (the limit the message above names)
    # review s58: zip bytes decode to a lazy NpzFile, not an array; an audit then failed as a site failure
    import io
    zipped = io.BytesIO()
    np.savez(zipped, a=np.zeros(3, np.float32))
    crafted["generator"] = ArrayRecord({"w": Array(dtype="float32", shape=(3,), stype="numpy.ndarray",
                                                   data=zipped.getvalue())})
    with pytest.raises(P.ProtocolError, match="NpzFile bytes, not one .npy array"):
        P.GanTrainReply.from_record(crafted)


def test_check_arrays_rejects_extra_missing_wrong_and_nan():
    spec = {"w": P.ArraySpec((2, 3))}
    good = {"w": np.zeros((2, 3), np.float32)}
    assert P.check_arrays(good, spec) == []
    assert P.check_arrays({**good, "data": np.zeros(3, np.float32)}, spec)[0].startswith("undeclared arrays")
    long_names = {**good, **{str(i) * 10**6: np.zeros(3, np.float32) for i in range(7)}}  # names the sender chose
    assert len(P.check_arrays(long_names, spec)[0]) < 1500  # (review s57: 5 MB before)
    assert P.check_arrays({}, spec)[0].startswith("missing arrays")
    assert "shape" in P.check_arrays({"w": np.zeros((3, 2), np.float32)}, spec)[0]
    assert "dtype" in P.check_arrays({"w": np.zeros((2, 3), np.float64)}, spec)[0]
    assert "NaN" in P.check_arrays({"w": np.full((2, 3), np.nan, np.float32)}, spec)[0]
