"""The privacy ledger's file: JSON lines, written with one write() + fsync each, read back strictly.

Format (one JSON object per line)::

  line 1: {"type": "header", "format": "fedsynth-privacy-ledger", "version": 2, "delta": ...,
           "created": ..., "dataset_id": ...}
  then:   {"type": "charge", "time", "purpose", "run", "round", "events": [...], "details",
           "epsilon_after", "delta", "data"}
  and:    {"type": "order", "order": ..., "time", "budget"}: the Renyi order the total is composed at and the
           budget in force (``client.ledger_order``); the first is written with the header, or before the first
           charge made by a fedsynth that fixes one (a ledger made before 2026-12-07 or under an unlimited budget has
           none until then); another before the first charge under a changed budget (the order never rises)

``epsilon_after`` is the string "inf" for a non-private release (strict JSON has no infinity);
``data`` is a short fingerprint of the data the release was computed on (a changed fingerprint under
the same dataset id is reported, never a reason to start a fresh ledger).

Crash safety: only the last line can be incomplete after a crash (it was never acknowledged, so its
work never started); :func:`parse` ignores it and the writer truncates it away before the next append. An
incomplete line is one without its newline: a newline-terminated last line that does not parse was written
whole, so it is damage. Damage anywhere raises :class:`LedgerDamaged`: a privacy ledger must never be silently
reset.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.accounting import RDP_ORDERS, DPEvent
from common.files import atomic_write_json, fsync_dir, make_dirs_durably  # noqa: F401  (durable folder writes)

FORMAT = "fedsynth-privacy-ledger"
# The version a new ledger's header is written with. 2 (2026-12-07): the format has order lines. A version-1 ledger
# reads the same way (one made before order lines existed gets them appended: a fedsynth older than 2026-12-07 then
# calls it damaged); a version-2 header makes a fedsynth that predates order lines refuse it at line 1, by version.
VERSION = 2
READABLE_VERSIONS = (1, 2)


class LedgerDamaged(RuntimeError):
    """The ledger file is damaged somewhere other than an unacknowledged last line."""


class LedgerTooNew(LedgerDamaged):
    """The ledger was written by a newer fedsynth, in a format version this code cannot read (refused like damage:
    nothing is charged against a ledger this code cannot read in full)."""


@dataclass(frozen=True)
class Contents:
    """A parsed ledger file."""

    header: dict | None
    entries: list[dict]
    events: list[DPEvent]
    keep_bytes: int  # bytes of valid content; anything after it is an unacknowledged partial line
    needs_newline: bool  # the kept content ends with a complete entry that lacks its trailing newline
    size: int
    orders: tuple[tuple[float, float], ...] = ()  # (order, budget) of each "order" line, oldest first

    @property
    def order(self) -> float | None:
        """The Renyi order in force: the last order line's (None before the first)."""
        return self.orders[-1][0] if self.orders else None

    @property
    def delta_from_size(self) -> bool:
        """Whether the ledger's delta was read off its own noisy size (its header names that first charge)."""
        return bool((self.header or {}).get("first_charge"))


def started_mark(path: Path) -> Path:
    """The mark written beside a ledger when it is first written (``<id>.started``; not a ``*.jsonl`` file)."""
    path = Path(path)
    return path.with_name(path.stem + ".started")


def released_before(path: Path, history: str = "") -> str:
    """Why the dataset of the ledger at ``path`` is known to have released before ('' when nothing says so): its
    ``.started`` mark, and the caller's own evidence ``history`` (e.g. a site's saved releases)."""
    reasons = [f"the mark {started_mark(path)} says the ledger was started"] if started_mark(path).exists() else []
    return "; ".join(reasons + ([history] if history else []))


def fingerprint_named(path: Path, fingerprint: str) -> Path:
    """The ledger beside ``path`` that an older fedsynth named by its data's fingerprint (``client.site.open_ledger``
    takes it over as the dataset id's)."""
    return Path(path).parent / f"{fingerprint}.jsonl"


def reset_refused(path: Path, what: str, evidence: str) -> str:
    """The operator's message when a ledger that existed is missing or empty (never started afresh)."""
    return (f"privacy ledger {path} {what}, but this dataset has released before ({evidence}). Starting a new "
            "ledger would give every record a fresh privacy budget, so nothing is charged or computed until the "
            "ledger is back: restore the ledger file from the newest backup of the state folder, then lower epsilon "
            "in the site config by what was spent after that backup (deploy/README.md, 'Backups'). Do not delete the "
            ".started mark or the runs folder to get past this check.")


def ledgers_of_data(path: Path, fingerprint: str, dataset_id: str) -> list[str]:
    """The dataset ids other than ``dataset_id`` of the ledgers beside ``path`` with a charge computed on data of
    ``fingerprint``: the same records under another dataset id (review s60: a renamed ``dataset_id``, once the runs
    folder that would have refused it was archived, gave the records a second budget). A copy of this id's own
    ledger (a backup kept beside it) is no second budget; a ledger that does not parse is left to its own checks."""
    ids = []
    for other in sorted(Path(path).parent.glob("*.jsonl")):
        try:
            contents = parse(other.read_bytes(), other) if other != Path(path) else None
        except (OSError, LedgerDamaged):
            continue
        other_id = str((contents.header or {}).get("dataset_id") or other.stem) if contents is not None else ""
        if other_id and other_id != dataset_id and any(e.get("data") == fingerprint for e in contents.entries):
            ids.append(other_id)
    return ids


def mark_started(path: Path, dataset_id: str) -> None:
    """Write the ledger's ``.started`` mark durably, once (after its header is on disk)."""
    mark = started_mark(path)
    if not mark.exists():
        try:
            atomic_write_json(mark, {"ledger": Path(path).name, "dataset_id": dataset_id, "marked": now()})
        except OSError:  # (two processes creating the ledger at once share the mark's temporary name: review s64)
            if not mark.exists():
                raise


def has_charge(entries: list[dict], *, run: str, purpose: str, round_: int) -> bool:
    """Whether ``entries`` hold a charge of the (run, purpose, round) release."""
    return any(e["run"] == run and e["purpose"] == purpose and e["round"] == round_ for e in entries)


def last_charge(entries: list[dict], *, run: str, purpose: str, round_: int) -> dict | None:
    """The latest charge of the (run, purpose, round) release in ``entries`` (None: never charged)."""
    return next((e for e in reversed(entries) if e["run"] == run and e["purpose"] == purpose and e["round"] == round_),
                None)


# The detail a charge records when it was made anew because an interrupted attempt's charge did not match this
# attempt's release (client.ledger.PrivacyLedger.charge_once).
RETRY_DIFFERS = "retry-differs-from-the-interrupted-attempt"
# Details that say how an attempt came to be charged, not what it releases (client.site.charged_work).
_ATTEMPT_DETAILS = ("after-an-unfinished-attempt", RETRY_DIFFERS)


def same_release(entry: dict, events: list[DPEvent], details: dict) -> bool:
    """Whether a ledger ``entry`` charged the release that ``events`` and ``details`` now describe (review s59: a
    statistics release interrupted in the clear and re-sent inside a secure sum with split noise reused the plain
    charge, so the ledger kept the first attempt's details and not the noise the release was made with)."""
    def what(d: dict) -> dict:
        return {k: v for k, v in json.loads(dumps(d)).items() if k not in _ATTEMPT_DETAILS}
    return entry["events"] == [e.to_dict() for e in events] and what(entry.get("details") or {}) == what(details)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def encode_epsilon(eps: float) -> float | str:
    return "inf" if math.isinf(eps) else eps


def _decode_epsilon(value: Any) -> float:
    return math.inf if value == "inf" else float(value)


def _json_default(obj: Any) -> Any:
    """Serialise numpy scalars/arrays and paths in `details`; anything else is a caller error."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: dict) -> bytes:
    """One ledger line (strict JSON: finite numbers only)."""
    return json.dumps(obj, allow_nan=False, default=_json_default, separators=(",", ":")).encode() + b"\n"


def make_header(delta: float, dataset_id: str, first_charge: str = "") -> dict:
    """The header line; ``first_charge`` names the purpose of the charge written with it (a default delta's noisy
    size), without which the header is not yet a ledger (:func:`parse`)."""
    header = {"type": "header", "format": FORMAT, "version": VERSION, "delta": delta, "created": now(),
              "dataset_id": dataset_id}
    return header | ({"first_charge": first_charge} if first_charge else {})


def make_charge(events: list[DPEvent], *, purpose: str, run: str, round_: int, details: dict,
                epsilon_after: float, delta: float, data: str) -> dict:
    """One charge entry (the line every release writes, and the first line after a default delta's header)."""
    return {"type": "charge", "time": now(), "purpose": purpose, "run": run, "round": round_,
            "events": [e.to_dict() for e in events], "details": details,
            "epsilon_after": encode_epsilon(epsilon_after), "delta": delta, "data": data}


def make_order(order: float, budget: float) -> dict:
    """The line that records the ledger's Renyi order and the budget in force from the next charge on."""
    return {"type": "order", "order": order, "time": now(), "budget": budget}


def _check_order(obj: dict, earlier: list[tuple[float, float]]) -> tuple[float, float]:
    order, budget = obj.get("order"), obj.get("budget")
    if not (isinstance(order, (int, float)) and not isinstance(order, bool) and float(order) in RDP_ORDERS):
        raise ValueError(f"the order line's order {order!r} is not one of the accountant's Renyi orders")
    if not (isinstance(budget, (int, float)) and not isinstance(budget, bool) and 0 <= budget < math.inf):
        raise ValueError(f"the order line's budget {budget!r} is not a finite number >= 0")
    if earlier and order > earlier[-1][0]:
        raise ValueError(f"the order line raises the order from {earlier[-1][0]:g} to {order:g} (it never rises)")
    return float(order), float(budget)


class _TooNew(ValueError):
    """A header of a later format version (parse turns it into LedgerTooNew)."""


def _check_header(obj: Any) -> dict:
    if not (isinstance(obj, dict) and obj.get("type") == "header" and obj.get("format") == FORMAT):
        raise ValueError("the first line is not a fedsynth privacy-ledger header")
    version = obj.get("version")
    whole = type(version) is int  # (True == 1 and 1.0 == 1 in Python: neither is a version)
    if not (whole and version in READABLE_VERSIONS):
        newer = whole and version > max(READABLE_VERSIONS)
        raise (_TooNew if newer else ValueError)(
            f"unsupported ledger version {version!r} (this code reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})")
    delta = obj.get("delta")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"header delta {delta!r} is not in (0, 1)")
    return obj


def _check_entry(obj: Any) -> tuple[dict, list[DPEvent]]:
    if not (isinstance(obj, dict) and obj.get("type") == "charge"):
        raise ValueError("the line is not a charge entry")
    for key in ("time", "purpose", "run", "round", "events", "epsilon_after", "delta"):
        if key not in obj:
            raise ValueError(f"the charge entry lacks {key!r}")
    if not isinstance(obj["events"], list) or not obj["events"]:
        raise ValueError("the charge entry has no events")
    events = [DPEvent.from_dict(e) for e in obj["events"]]
    entry = dict(obj)
    entry["epsilon_after"] = _decode_epsilon(obj["epsilon_after"])
    return entry, events


def parse(data: bytes, path: Path) -> Contents:
    """Parse a ledger file. Only its very last line may be bad (ignored); any other bad line raises."""
    pieces = data.split(b"\n")
    # pieces[-1] is what follows the last newline: b"" for a well-terminated file.
    lines = pieces if pieces[-1] else pieces[:-1]
    terminated = not pieces[-1]
    header: dict | None = None
    entries: list[dict] = []
    events: list[DPEvent] = []
    orders: list[tuple[float, float]] = []
    offset = 0
    for index, raw in enumerate(lines):
        is_last = index == len(lines) - 1
        has_newline = not is_last or terminated
        try:
            obj = json.loads(raw.decode("utf-8"))
            if index == 0:
                header = _check_header(obj)
            elif isinstance(obj, dict) and obj.get("type") == "order":
                orders.append(_check_order(obj, orders))
            else:
                entry, entry_events = _check_entry(obj)
                entries.append(entry)
                events.extend(entry_events)
        except _TooNew as exc:
            raise LedgerTooNew(
                f"privacy ledger {path} was written by a newer fedsynth: {exc}. It is not damaged; upgrade fedsynth "
                "on this site (the version that wrote it or later) to use it, and do not delete it, since that would "
                "reset this dataset's privacy accounting."
            ) from None
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            if is_last and not has_newline:
                # A torn final write: never acknowledged, so the work it would cover never started. Every line is
                # written with its newline in one write(), so a torn one lacks it; a complete (newline-terminated)
                # line that does not parse was acknowledged and is damage like any other, never dropped.
                return _created(Contents(header, entries, events, offset, False, len(data), tuple(orders)))
            raise LedgerDamaged(
                f"privacy ledger {path} is damaged at line {index + 1} ({exc}). Only an interrupted last "
                "line is repaired automatically; damage before the end means recorded privacy spending "
                "may be lost. Inspect the file (restore it from a backup if you have one); do not delete "
                "it, since that would reset this dataset's privacy accounting."
            ) from exc
        offset += len(raw) + (1 if has_newline else 0)
    # A complete, valid final entry without its newline is kept (over-counting is the safe side);
    # the newline is added before the next append.
    return _created(Contents(header, entries, events, offset, not terminated and bool(lines), len(data),
                             tuple(orders)))


def _created(contents: Contents) -> Contents:
    """``contents``, or no header at all where the header names a first charge that is not there: the header and its
    first charge go out in one write(), so a header alone is a creation torn between them (review s60: a full disk
    left a default delta in force whose noisy-size release was never charged), and the ledger is created afresh."""
    if contents.header is not None and contents.header.get("first_charge") and not contents.entries:
        return Contents(None, [], [], 0, False, contents.size)
    return contents


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
