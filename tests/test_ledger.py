"""Tests for client.ledger: budget enforcement, persistence, crash safety and concurrent writers."""

from __future__ import annotations

import fcntl
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from client.ledger import BudgetExceeded, LedgerDamaged, PrivacyLedger, Spent
from client.ledger_file import RETRY_DIFFERS, LedgerTooNew
from client.ledger_refusals import share
from common.accounting import DPEvent, epsilon_for, rdp_to_epsilon

DELTA = 1e-5
EVENT = DPEvent(1.0, 0.01, 100)  # one "round" of DP-SGD
# Forked children inherit the parent's imports (torch/opacus take seconds to import on a fresh interpreter).
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "ledger" / "0123456789abcdef.jsonl"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _charges(path: Path) -> list[dict]:
    return [line for line in _lines(path) if line["type"] == "charge"]


def _ledger_at_order(path: Path, events_that_fill_it: list[DPEvent]) -> tuple[PrivacyLedger, float]:
    """A ledger whose budget the events fill, to the last 1e-3, at its order (fixed when it was made with budget 10:
    a budget read off the events' own best order would fix another order, at which they cost far more)."""
    order = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA).order
    budget = epsilon_for(events_that_fill_it, DELTA, order) + 1e-3
    return PrivacyLedger(path, epsilon_budget=budget, delta=DELTA), budget


def test_new_ledger_has_header_and_nothing_spent(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA)
    assert path.is_file()
    assert ledger.spent() == Spent(0.0, DELTA, 0)
    assert ledger.spent().used == 0.0 and ledger.summary()["budget_used"] == 0.0
    assert ledger.entries() == []
    header = _lines(path)[0]
    assert header["type"] == "header" and header["delta"] == DELTA


def test_refusal_happens_before_anything_is_written(path: Path):
    ledger, budget = _ledger_at_order(path, [EVENT] * 2)  # room for exactly two rounds
    order = ledger.order
    ledger.charge([EVENT], purpose="dpgan-round", run="r1", round=1)
    spent = ledger.charge([EVENT], purpose="dpgan-round", run="r1", round=2)
    # what the two rounds cost (their best order), and the share of the budget they use (at the ledger's order)
    assert spent.releases == 2 and spent.epsilon == pytest.approx(epsilon_for([EVENT] * 2, DELTA))
    assert 0.95 < spent.used <= 1.0 and spent.epsilon < budget  # (the budget leaves 1e-3 of epsilon)
    before = path.read_bytes()
    with pytest.raises(BudgetExceeded) as info:
        ledger.charge([EVENT], purpose="dpgan-round", run="r1", round=3)
    assert path.read_bytes() == before
    error = info.value
    assert share(spent.used) in str(error) and f"Renyi order {order:g}" in str(error)
    assert "dpgan-round" in str(error) and "epsilon_budget" in str(error)
    assert error.spent_epsilon == pytest.approx(spent.epsilon)
    assert error.budget_epsilon == budget
    assert error.requested_epsilon == pytest.approx(epsilon_for([EVENT], DELTA))
    assert error.epsilon_after == pytest.approx(epsilon_for([EVENT] * 3, DELTA))
    assert error.used[0] == pytest.approx(spent.used) and error.used[1] > 1.4  # the rule: at the ledger's order
    assert epsilon_for([EVENT] * 3, DELTA, order) > budget


def test_spending_persists_across_ledger_objects(path: Path):
    first = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    first.charge([EVENT], purpose="bn-stats", run="a", round=0, details={"classes": 10})
    second = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    assert second.spent() == first.spent()
    assert second.entries() == first.entries()
    assert second.entries()[0]["details"] == {"classes": 10}
    # The budget is the site's own setting and may differ between openings; spending does not reset.
    third = PrivacyLedger(path, epsilon_budget=1e-6, delta=DELTA)
    assert third.spent().used >= 1.0
    with pytest.raises(BudgetExceeded):
        third.charge([EVENT], purpose="bn-stats")


def test_composition_across_runs_and_purposes(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=50.0, delta=DELTA)
    releases = [
        ([DPEvent(0.8, 0.0128, 79)], "dpgan-round", "run-a", 1),
        ([DPEvent(0.8, 0.0128, 79)], "dpgan-round", "run-a", 2),
        ([DPEvent(20.0, 1.0, 1)], "class-counts", "run-b", 0),
        ([DPEvent(3.0, 1.0, 1), DPEvent(3.0, 1.0, 1)], "bn-stats", "run-b", 0),
    ]
    for events, purpose, run, rnd in releases:
        ledger.charge(events, purpose=purpose, run=run, round=rnd)
    all_events = [e for events, *_ in releases for e in events]
    expected = epsilon_for(all_events, DELTA)  # what they cost: their best order
    at_order = epsilon_for(all_events, DELTA, ledger.order)  # the total the ledger holds to its budget
    assert at_order > expected  # (the ledger's order is not these releases' best one)
    used = (at_order - rdp_to_epsilon(0, ledger.order, DELTA)) / (50.0 - rdp_to_epsilon(0, ledger.order, DELTA))
    assert ledger.spent() == Spent(pytest.approx(expected), DELTA, 4, pytest.approx(used))
    assert [e["epsilon_after"] for e in ledger.entries()][-1] == pytest.approx(expected)
    summary = ledger.summary()
    assert summary["per_purpose_releases"] == {"dpgan-round": 2, "class-counts": 1, "bn-stats": 1}
    assert summary["per_purpose_epsilon"]["dpgan-round"] == pytest.approx(
        epsilon_for([DPEvent(0.8, 0.0128, 158)], DELTA)
    )
    assert summary["spent_epsilon"] == pytest.approx(expected)
    assert summary["budget_used"] == pytest.approx(used)
    assert summary["releases"] == 4 and summary["delta"] == DELTA
    assert summary["order"] == ledger.order and summary["order_recorded"]


def test_partial_last_line_is_ignored_then_repaired(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    ledger.charge([EVENT], purpose="dpgan-round", round=1)
    spent = ledger.spent()
    with path.open("ab") as f:  # what a crash in the middle of a write leaves behind
        f.write(b'{"type":"charge","time":"2025-01-01T00:00:00","purpose":"dpgan-ro')
    reopened = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    assert reopened.spent() == spent
    assert len(reopened.entries()) == 1
    reopened.charge([EVENT], purpose="dpgan-round", round=2)
    lines = _lines(path)  # valid JSONL again: the torn line was truncated away
    assert [line.get("round") for line in lines if line["type"] == "charge"] == [1, 2]


def test_complete_last_entry_missing_its_newline_is_kept(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    ledger.charge([EVENT], purpose="dpgan-round", round=1)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    # Over-counting is the safe side: a complete entry is counted even without its newline.
    assert ledger.spent().releases == 1
    ledger.charge([EVENT], purpose="dpgan-round", round=2)
    assert [line.get("round") for line in _charges(path)] == [1, 2]


def test_a_complete_but_invalid_last_entry_is_damage_not_a_torn_write(path: Path):
    """Every line is written with its newline in one write(), so only a line without it can be torn. The reader
    used to drop any bad last line, and the next charge overwrote an acknowledged entry that had been damaged."""
    ledger = PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA)
    for r in (1, 2):
        ledger.charge([EVENT], purpose="dpgan-round", run="e1", round=r)
    lines = path.read_bytes().split(b"\n")
    lines[-2] = lines[-2].replace(b'"charge"', b'"chargE"')  # the last, newline-terminated entry
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(LedgerDamaged, match="line 4"):  # header, order, two charges
        ledger.spent()
    with pytest.raises(LedgerDamaged):
        ledger.charge([EVENT], purpose="audit", run="e2", round=1)
    assert b"chargE" in path.read_bytes()  # kept for the operator to inspect, never overwritten
    path.write_bytes(b"\n".join(lines[:-2]) + b"\n" + lines[-2][:-5])  # the same line, torn (no newline)
    assert ledger.spent().releases == 1  # ignored, as an unacknowledged write


def test_a_ledger_of_either_readable_version_is_read_and_a_newer_one_is_refused_by_version(path: Path):
    """A new ledger's header says version 2 (the format with order lines), so a fedsynth that predates them refuses
    it at line 1 by its version instead of calling line 2 damaged; version 1 (made before order lines, or by the
    fedsynth that first wrote them) still reads; a version above 2 is refused as too new, not as damage."""
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    ledger.charge([EVENT], purpose="dpgan-round", run="r1", round=1)
    assert _lines(path)[0]["version"] == 2
    spent = ledger.spent()
    lines = path.read_bytes().split(b"\n")
    for version, readable in ((1, True), (3, False), ("2", False), (True, False)):
        header = json.loads(lines[0]) | {"version": version}
        path.write_bytes(b"\n".join([json.dumps(header).encode(), *lines[1:]]))
        if readable:
            assert PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA).spent() == spent
            continue
        with pytest.raises(LedgerDamaged) as info:
            ledger.charge([EVENT], purpose="dpgan-round", run="r1", round=2)
        assert isinstance(info.value, LedgerTooNew) == (version == 3), version
        assert ("written by a newer fedsynth" in str(info.value)) == (version == 3)
        assert "do not delete it" in str(info.value)
    assert len(_charges(path)) == 1  # nothing charged against a ledger this code cannot read


def test_interrupted_header_is_rewritten(path: Path):
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"type":"header","form')
    ledger = PrivacyLedger(path, epsilon_budget=1.0, delta=DELTA)
    assert ledger.spent().releases == 0
    assert _lines(path)[0]["delta"] == DELTA


def test_a_creation_torn_between_its_header_and_its_first_charge_is_created_again(path: Path, monkeypatch):
    """The header and a default delta's first charge (its noisy size) go out in one write(); a full disk that lets
    the header line through and tears the charge must not leave that delta in force uncharged (review s60)."""
    from client.site_delta import PURPOSE as DELTA_PURPOSE, size_event

    real_write, calls = os.write, []

    def header_then_full_disk(fd, data):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real_write(fd, bytes(data)[: bytes(data).index(b"\n") + 20])  # the header whole, the charge torn

    monkeypatch.setattr(os, "write", header_then_full_disk)
    with pytest.raises(OSError):
        PrivacyLedger(path, epsilon_budget=10.0, new_delta=3e-6, first_charge=([size_event()], DELTA_PURPOSE, "f"))
    monkeypatch.setattr(os, "write", real_write)
    assert json.loads(path.read_bytes().split(b"\n")[0])["type"] == "header" and path.read_bytes().count(b"\n") == 1
    again = PrivacyLedger(path, epsilon_budget=10.0, new_delta=7e-6, first_charge=([size_event()], DELTA_PURPOSE, "f"))
    assert again.delta == 7e-6  # created afresh: the torn header's delta was never charged
    assert again.summary()["per_purpose_releases"] == {DELTA_PURPOSE: 1}
    assert PrivacyLedger(path, epsilon_budget=10.0, create=False).spent().releases == 1


def test_corrupt_middle_line_raises(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    for rnd in range(3):
        ledger.charge([EVENT], purpose="dpgan-round", round=rnd)
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:20] + b"#garbage#" + lines[2][20:]  # line 3 of the file: the second charge
    path.write_bytes(b"\n".join(lines))
    for call in (ledger.spent, lambda: ledger.charge([EVENT], purpose="x"),
                 lambda: PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)):
        with pytest.raises(LedgerDamaged, match="line 3") as info:
            call()
        assert str(path) in str(info.value) and "damaged" in str(info.value)


def test_delta_mismatch_raises(path: Path):
    PrivacyLedger(path, epsilon_budget=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(path, epsilon_budget=1.0, delta=1e-6)


def test_delta_is_kept_by_the_ledger_when_the_site_uses_the_default(path: Path):
    PrivacyLedger(path, epsilon_budget=1.0, new_delta=1e-6)  # created with the default for its size
    # the data grew: the default would now be smaller, but the ledger keeps the delta it was created with
    again = PrivacyLedger(path, epsilon_budget=1.0, new_delta=5e-7)
    assert again.delta == 1e-6
    with pytest.raises(ValueError, match="created with delta=1e-06"):
        PrivacyLedger(path, epsilon_budget=1.0, delta=1e-5)  # an explicit, different delta is an error


def test_charge_once_reuses_the_charge_of_an_interrupted_attempt(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    first, reused = ledger.charge_once([EVENT], purpose="dpgan", run="r", round=1)
    assert not reused and first.releases == 1
    again, reused = ledger.charge_once([EVENT], purpose="dpgan", run="r", round=1)
    assert reused and again == first and len(ledger.entries()) == 1
    _, reused = ledger.charge_once([EVENT], purpose="dpgan", run="r", round=2)
    assert not reused and ledger.count(run="r", purpose="dpgan") == 2
    with pytest.raises(ValueError, match="run id"):
        ledger.charge_once([EVENT], purpose="dpgan", run="", round=3)


def test_an_interrupted_attempts_charge_is_reused_only_for_the_same_release(path: Path):
    """Review s59: a statistics release interrupted in the clear and re-sent inside a secure sum with its noise split
    over the sites reused the plain charge, so the ledger never said which noise the release was made with. A retry
    whose events or details differ from the interrupted attempt's is charged anew, saying so; what says how an
    attempt came to be charged (client.site.charged_work) is not part of what it releases."""
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    plain = {"clip": 5.0, "count-weight": 0.5}
    ledger.charge([EVENT], purpose="bnstats-release", run="r", round=0,
                  details={**plain, "after-an-unfinished-attempt": "failed"})
    _, reused = ledger.charge_once([EVENT], purpose="bnstats-release", run="r", round=0, details=dict(plain))
    assert reused and len(ledger.entries()) == 1
    split = {**plain, "distributed-noise-shares": 8, "own-noise-multiplier": 0.41}
    _, reused = ledger.charge_once([EVENT], purpose="bnstats-release", run="r", round=0, details=split)
    assert not reused and ledger.entries()[-1]["details"] == {**split, RETRY_DIFFERS: True}
    _, reused = ledger.charge_once([EVENT], purpose="bnstats-release", run="r", round=0, details=dict(split))
    assert reused and len(ledger.entries()) == 2  # the latest charge is the one a retry matches
    _, reused = ledger.charge_once([EVENT, EVENT], purpose="bnstats-release", run="r", round=0, details=dict(split))
    assert not reused and len(ledger.entries()) == 3


def test_reading_a_ledger_never_creates_one(path: Path):
    with pytest.raises(FileNotFoundError):
        PrivacyLedger(path, epsilon_budget=1.0, create=False)
    assert not path.exists() and not path.parent.exists()
    PrivacyLedger(path, epsilon_budget=5.0, delta=DELTA, dataset_id="hospital-a").charge([EVENT], purpose="x")
    before = path.read_bytes()
    read = PrivacyLedger(path, epsilon_budget=1.0, create=False)
    assert read.delta == DELTA and read.summary()["dataset_id"] == "hospital-a" and path.read_bytes() == before


def test_non_private_release_needs_unlimited_budget(path: Path):
    free = DPEvent(0.0, 1.0, 1)
    limited = PrivacyLedger(path, epsilon_budget=100.0, delta=DELTA)
    with pytest.raises(BudgetExceeded, match="unlimited budget"):
        limited.charge([free], purpose="nodp-baseline")
    unlimited = PrivacyLedger(path, epsilon_budget=math.inf, delta=DELTA)
    spent = unlimited.charge([free], purpose="nodp-baseline")
    assert spent.epsilon == math.inf and unlimited.spent().used == 0.0  # an unlimited budget is never used up
    assert _charges(path)[0]["epsilon_after"] == "inf"  # strict JSON: no Infinity literal
    assert unlimited.entries()[0]["epsilon_after"] == math.inf


def test_bad_arguments_write_nothing(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="non-empty list"):
        ledger.charge([], purpose="x")
    with pytest.raises(ValueError, match="purpose"):
        ledger.charge([EVENT], purpose="")
    with pytest.raises(ValueError, match="JSON"):
        ledger.charge([EVENT], purpose="x", details={"bad": float("nan")})
    assert path.read_bytes() == before


# ---------------------------------------------------------------------------- crash and concurrency


def _charge_forever(path: Path, ack_fd: int) -> None:
    """Child: charge one round after another, acknowledging each on a pipe once charge() returned."""
    ledger = PrivacyLedger(path, epsilon_budget=1e6, delta=DELTA)
    rnd = len(ledger.entries())
    while True:
        ledger.charge([EVENT], purpose="kill-test", round=rnd)
        os.write(ack_fd, f"{rnd}\n".encode())
        rnd += 1


def test_sigkill_during_charges_never_loses_acknowledged_spending(path: Path):
    PrivacyLedger(path, epsilon_budget=1e6, delta=DELTA)
    rng = random.Random(1234)
    acked: list[int] = []
    last_epsilon = 0.0
    for kill in range(6):
        read_fd, write_fd = os.pipe()
        child = FORK.Process(target=_charge_forever, args=(path, write_fd), daemon=True)
        child.start()
        os.close(write_fd)
        time.sleep(rng.uniform(0.05, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        with os.fdopen(read_fd, "rb") as acks:
            acked += [int(x) for x in acks.read().split()]

        ledger = PrivacyLedger(path, epsilon_budget=1e6, delta=DELTA)
        rounds = [entry["round"] for entry in ledger.entries()]
        assert rounds == list(range(len(rounds))), "complete lines must be intact and in order"
        assert set(acked) <= set(rounds), "an acknowledged charge was lost"
        # Each kill may leave at most the one charge it interrupted recorded but unacknowledged.
        assert len(set(rounds) - set(acked)) <= kill + 1
        epsilons = [entry["epsilon_after"] for entry in ledger.entries()]
        assert epsilons == sorted(epsilons)
        spent = ledger.spent().epsilon
        assert spent >= last_epsilon
        last_epsilon = spent
        if kill % 2 == 1:  # also leave a torn line, as if killed mid-write; the next child repairs it
            with path.open("ab") as f:
                f.write(b'{"type":"charge","ti')
    assert len(acked) >= 3, "the children should have charged several times"
    ledger.charge([EVENT], purpose="kill-test", round=len(ledger.entries()))
    _lines(path)  # the whole file is valid JSONL


def _race_for_budget(path: Path, budget: float, start) -> None:
    ledger = PrivacyLedger(path, epsilon_budget=budget, delta=DELTA)
    start.wait()
    try:
        ledger.charge([EVENT], purpose="race", run=str(os.getpid()))
    except BudgetExceeded:
        sys.exit(3)
    sys.exit(0)


def test_two_processes_racing_for_the_last_budget(path: Path):
    for attempt in range(3):
        attempt_path = path.with_name(f"race{attempt}.jsonl")
        ledger, budget = _ledger_at_order(attempt_path, [EVENT] * 3)  # after two charges, room for one more
        ledger.charge([EVENT], purpose="setup")
        ledger.charge([EVENT], purpose="setup")
        start = FORK.Event()
        children = [
            FORK.Process(target=_race_for_budget, args=(attempt_path, budget, start), daemon=True)
            for _ in range(2)
        ]
        for child in children:
            child.start()
        time.sleep(0.05)
        start.set()
        for child in children:
            child.join(timeout=30)
        assert sorted(child.exitcode for child in children) == [0, 3]
        assert ledger.spent().releases == 3
        assert ledger.spent().epsilon <= budget + 1e-9


def test_charge_waits_for_the_exclusive_lock(path: Path):
    ledger = PrivacyLedger(path, epsilon_budget=10.0, delta=DELTA)
    # A second open file description stands for another process mid read-check-append. (A thread is
    # used for the waiting writer: a forked child would inherit, and so share, the held lock.)
    holder = os.open(path, os.O_RDONLY)
    writer = threading.Thread(target=ledger.charge, args=([EVENT],), kwargs={"purpose": "blocked"})
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        writer.start()
        writer.join(timeout=0.5)
        assert writer.is_alive(), "charge() must wait while another process holds the ledger lock"
        assert _charges(path) == [], "nothing may be appended while the lock is held elsewhere"
    finally:
        os.close(holder)  # releases the lock
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert ledger.spent().releases == 1


def test_a_ledger_being_created_reads_as_none_yet_not_as_damaged(tmp_path):
    """Review s67: the file of a new ledger exists (O_EXCL) a moment before its header is written; a read-only open
    in that window (fedsynth ledger, --check, a second SuperNode's start) called it damaged. With no sign that the
    site released before, it is no ledger yet; the writable open completes it."""
    from client.ledger import PrivacyLedger

    path = tmp_path / "ledger" / "d.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="yet"):
        PrivacyLedger(path, epsilon_budget=1.0, create=False)
    ledger = PrivacyLedger(path, epsilon_budget=1.0, delta=1e-5)  # the writable open writes the header
    assert PrivacyLedger(path, epsilon_budget=1.0, create=False).delta == ledger.delta == 1e-5
