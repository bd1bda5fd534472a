"""The site's privacy ledger: an append-only, crash-safe JSONL file per dataset.

Every release a site makes is charged here BEFORE the private work starts (write-ahead): a request
that would push the dataset past the site's own epsilon budget is refused with nothing written and
nothing computed. Epsilon is composed over all recorded releases (all runs, rounds and modes) with
RDP accounting (:mod:`common.accounting`) at the ledger's fixed delta.

File format (one JSON object per line):
  line 1: {"type": "header", "format": "fedsynth-privacy-ledger", "version": 1, "delta": ..., "created": ...}
  then:   {"type": "charge", "time", "purpose", "run", "round", "events": [...], "details", "epsilon_after", "delta"}
``epsilon_after`` is the string "inf" for a non-private release (strict JSON has no infinity).

Crash safety: each line is written with one write() and fsync'ed before charge() returns. Only the
last line can be incomplete after a crash (it was never acknowledged, so its work never started); it
is ignored on load and truncated away before the next append. Damage anywhere else is reported, never
silently repaired: a privacy ledger must not be reset. Processes on the same site serialise their
read-check-append with an exclusive flock on the ledger file.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.accounting import DPEvent, epsilon_for

__all__ = ["BudgetExceeded", "LedgerDamaged", "PrivacyLedger", "Spent"]

_FORMAT = "fedsynth-privacy-ledger"
_VERSION = 1
# Slack for float noise when comparing composed epsilon with the budget.
_BUDGET_SLACK = 1e-9


class BudgetExceeded(Exception):
    """A release was refused because it would push the dataset's epsilon past the site's budget."""

    def __init__(
        self,
        message: str,
        *,
        requested_epsilon: float,
        spent_epsilon: float,
        budget_epsilon: float,
        epsilon_after: float,
    ) -> None:
        super().__init__(message)
        self.requested_epsilon = requested_epsilon  # epsilon of the refused release on its own
        self.spent_epsilon = spent_epsilon  # epsilon already spent before the request
        self.budget_epsilon = budget_epsilon
        self.epsilon_after = epsilon_after  # epsilon the dataset would have reached


class LedgerDamaged(RuntimeError):
    """The ledger file is damaged somewhere other than an unacknowledged last line."""


@dataclass(frozen=True)
class Spent:
    """Privacy spent on one dataset so far: composed epsilon at the ledger's delta, number of releases."""

    epsilon: float
    delta: float
    releases: int


@dataclass(frozen=True)
class _Contents:
    """A parsed ledger file."""

    header: dict | None
    entries: list[dict]
    events: list[DPEvent]
    keep_bytes: int  # bytes of valid content; anything after it is an unacknowledged partial line
    needs_newline: bool  # the kept content ends with a complete entry that lacks its trailing newline
    size: int


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _encode_epsilon(eps: float) -> float | str:
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


def _dumps(obj: dict) -> bytes:
    return json.dumps(obj, allow_nan=False, default=_json_default, separators=(",", ":")).encode() + b"\n"


def _check_header(obj: Any) -> dict:
    if not (isinstance(obj, dict) and obj.get("type") == "header" and obj.get("format") == _FORMAT):
        raise ValueError("the first line is not a fedsynth privacy-ledger header")
    if obj.get("version") != _VERSION:
        raise ValueError(f"unsupported ledger version {obj.get('version')!r} (this code reads {_VERSION})")
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


def _parse(data: bytes, path: Path) -> _Contents:
    """Parse a ledger file. Only its very last line may be bad (ignored); any other bad line raises."""
    pieces = data.split(b"\n")
    # pieces[-1] is what follows the last newline: b"" for a well-terminated file.
    lines = pieces if pieces[-1] else pieces[:-1]
    terminated = not pieces[-1]
    header: dict | None = None
    entries: list[dict] = []
    events: list[DPEvent] = []
    offset = 0
    for index, raw in enumerate(lines):
        is_last = index == len(lines) - 1
        has_newline = not is_last or terminated
        try:
            obj = json.loads(raw.decode("utf-8"))
            if index == 0:
                header = _check_header(obj)
            else:
                entry, entry_events = _check_entry(obj)
                entries.append(entry)
                events.extend(entry_events)
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            if is_last:
                # A torn final write: never acknowledged, so the work it would cover never started.
                return _Contents(header, entries, events, offset, False, len(data))
            raise LedgerDamaged(
                f"privacy ledger {path} is damaged at line {index + 1} ({exc}). Only an interrupted last "
                "line is repaired automatically; damage before the end means recorded privacy spending "
                "may be lost. Inspect the file (restore it from a backup if you have one); do not delete "
                "it, since that would reset this dataset's privacy accounting."
            ) from exc
        offset += len(raw) + (1 if has_newline else 0)
    # A complete, valid final entry without its newline is kept (over-counting is the safe side);
    # the newline is added before the next append.
    return _Contents(header, entries, events, offset, not terminated and bool(lines), len(data))


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durably(directory: Path) -> None:
    """mkdir -p, fsync'ing the parent of every directory created so that the new entries survive a crash."""
    missing = []
    current = directory
    while not current.exists():
        missing.append(current)
        current = current.parent
    for new_dir in reversed(missing):
        try:
            new_dir.mkdir()
        except FileExistsError:  # created concurrently by another process on the site
            pass
        _fsync_dir(new_dir.parent)


class PrivacyLedger:
    """Append-only privacy ledger of ONE dataset, enforcing the site's own (epsilon, delta) budget."""

    def __init__(self, path: Path, *, epsilon_budget: float, delta: float) -> None:
        """Open (or create) the ledger at `path`.

        `path` is the ledger file of one dataset (the caller keys it by the dataset fingerprint, e.g.
        ``state_dir / "ledger" / f"{fingerprint[:16]}.jsonl"``). `epsilon_budget` is the site's own
        configuration (math.inf = no limit, which also allows non-private releases). `delta` is fixed
        for the life of the ledger: opening an existing ledger with a different delta raises ValueError.
        """
        if not (isinstance(epsilon_budget, (int, float)) and epsilon_budget >= 0 and not math.isnan(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be a number >= 0 (math.inf for no limit), got {epsilon_budget!r}")
        if not (isinstance(delta, (int, float)) and 0 < delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {delta!r}; common.accounting.default_delta(n) gives one")
        self.path = Path(path)
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self._open_or_create()

    # ------------------------------------------------------------------ file access

    def _open_or_create(self) -> None:
        _make_dirs_durably(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            created = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            contents = _parse(_read_all(fd), self.path)
            if contents.header is None:
                # New file, or one whose header write was interrupted (then it holds no entries).
                os.ftruncate(fd, 0)
                header = {"type": "header", "format": _FORMAT, "version": _VERSION, "delta": self.delta,
                          "created": _now()}
                _write_all(fd, _dumps(header))
                os.fsync(fd)
            else:
                self._check_delta(contents.header)
        finally:
            os.close(fd)  # closing releases the flock
        if created:
            _fsync_dir(self.path.parent)

    def _check_delta(self, header: dict) -> None:
        recorded = float(header["delta"])
        if not math.isclose(recorded, self.delta, rel_tol=1e-12, abs_tol=0.0):
            raise ValueError(
                f"privacy ledger {self.path} was created with delta={recorded:g} but the site is now configured "
                f"with delta={self.delta:g}; a dataset's delta cannot change once privacy was spent under it. "
                f"Set delta back to {recorded:g} in the site config."
            )

    @contextmanager
    def _locked(self, operation: int) -> Iterator[tuple[int, _Contents]]:
        """Open the ledger, take `operation` (LOCK_SH/LOCK_EX), and yield the fd and its parsed contents."""
        flags = os.O_RDWR | os.O_APPEND if operation == fcntl.LOCK_EX else os.O_RDONLY
        try:
            fd = os.open(self.path, flags)
        except FileNotFoundError as exc:
            raise LedgerDamaged(
                f"privacy ledger {self.path} has disappeared since it was opened. Restore it from a backup; "
                "a site must not continue with its privacy accounting reset."
            ) from exc
        try:
            fcntl.flock(fd, operation)
            contents = _parse(_read_all(fd), self.path)
            if contents.header is None:
                raise LedgerDamaged(
                    f"privacy ledger {self.path} has lost its header line (the file was emptied or replaced). "
                    "Restore it from a backup; a site must not continue with its privacy accounting reset."
                )
            self._check_delta(contents.header)
            yield fd, contents
        finally:
            os.close(fd)

    def _contents(self) -> _Contents:
        with self._locked(fcntl.LOCK_SH) as (_, contents):
            return contents

    # ------------------------------------------------------------------ queries

    def spent(self) -> Spent:
        """Epsilon composed over all recorded releases, at the ledger's delta."""
        contents = self._contents()
        return Spent(epsilon_for(contents.events, self.delta), self.delta, len(contents.entries))

    def remaining(self) -> float:
        """Budget minus spent epsilon (never below 0); math.inf if the budget is unlimited."""
        if math.isinf(self.epsilon_budget):
            return math.inf
        return max(0.0, self.epsilon_budget - self.spent().epsilon)

    def epsilon_if(self, events: Sequence[DPEvent]) -> float:
        """Epsilon the dataset would have after also releasing `events` (nothing is recorded)."""
        return epsilon_for([*self._contents().events, *events], self.delta)

    def entries(self) -> list[dict]:
        """All recorded charge entries, oldest first (``epsilon_after`` decoded to a float, inf allowed)."""
        return self._contents().entries

    def summary(self) -> dict:
        """Budget, spending and per-purpose breakdown, for `fedsynth ledger` and the run report."""
        contents = self._contents()
        spent = epsilon_for(contents.events, self.delta)
        events_by_purpose: dict[str, list[DPEvent]] = defaultdict(list)
        for entry in contents.entries:
            events_by_purpose[entry["purpose"]].extend(DPEvent.from_dict(e) for e in entry["events"])
        budget = self.epsilon_budget
        return {
            "path": str(self.path),
            "budget_epsilon": budget,
            "spent_epsilon": spent,
            "remaining_epsilon": math.inf if math.isinf(budget) else max(0.0, budget - spent),
            "delta": self.delta,
            "releases": len(contents.entries),
            "per_purpose_releases": dict(Counter(entry["purpose"] for entry in contents.entries)),
            # Epsilon of each purpose on its own; these do not add up to spent_epsilon (composition is sublinear).
            "per_purpose_epsilon": {p: epsilon_for(ev, self.delta) for p, ev in events_by_purpose.items()},
            "first_release": contents.entries[0]["time"] if contents.entries else None,
            "last_release": contents.entries[-1]["time"] if contents.entries else None,
        }

    # ------------------------------------------------------------------ spending

    def charge(
        self,
        events: Sequence[DPEvent],
        *,
        purpose: str,
        run: str = "",
        round: int = 0,  # noqa: A002 - the protocol's name for the federated round
        details: dict | None = None,
    ) -> Spent:
        """Record a release BEFORE doing its private work; refuse it if it would exceed the budget.

        Raises BudgetExceeded (writing nothing) if the epsilon after these events would exceed the
        budget. Otherwise appends one fsync'ed line and returns the new total. A crash after this
        returns only over-counts (the work may not have happened), never under-counts.
        """
        events = list(events)
        if not events or not all(isinstance(e, DPEvent) for e in events):
            raise ValueError(f"charge() needs a non-empty list of DPEvent, got {events!r}")
        if not isinstance(purpose, str) or not purpose:
            raise ValueError("charge() needs a non-empty purpose string (e.g. 'dpgan-round', 'bn-stats')")
        if not isinstance(run, str):
            raise ValueError(f"run must be a string (the run id), got {run!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        details = dict(details or {})
        try:  # fail on unserialisable details before touching the file
            _dumps(details)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"charge() details must be JSON-serialisable with finite numbers: {exc}") from exc

        with self._locked(fcntl.LOCK_EX) as (fd, contents):
            spent_before = epsilon_for(contents.events, self.delta)
            epsilon_after = epsilon_for([*contents.events, *events], self.delta)
            if epsilon_after > self.epsilon_budget + _BUDGET_SLACK:
                raise self._refusal(events, purpose, run, round, spent_before, epsilon_after)
            entry = {
                "type": "charge",
                "time": _now(),
                "purpose": purpose,
                "run": run,
                "round": round,
                "events": [e.to_dict() for e in events],
                "details": details,
                "epsilon_after": _encode_epsilon(epsilon_after),
                "delta": self.delta,
            }
            line = _dumps(entry)
            if contents.keep_bytes < contents.size:  # drop an unacknowledged partial last line
                os.ftruncate(fd, contents.keep_bytes)
            if contents.needs_newline:
                line = b"\n" + line
            _write_all(fd, line)
            os.fsync(fd)
        return Spent(epsilon_after, self.delta, len(contents.entries) + 1)

    def _refusal(
        self, events: list[DPEvent], purpose: str, run: str, round_: int, spent: float, after: float
    ) -> BudgetExceeded:
        requested = epsilon_for(events, self.delta)
        remaining = max(0.0, self.epsilon_budget - spent)
        message = (
            f"privacy budget exceeded: refused the '{purpose}' release (run {run!r}, round {round_}) before "
            f"doing any work. On its own it costs epsilon {requested:.4g}; it would bring this dataset's total "
            f"from {spent:.4g} to {after:.4g} (delta {self.delta:g}), above the site budget "
            f"{self.epsilon_budget:g}; remaining epsilon is {remaining:.4g}. Ask for a smaller release (fewer "
            "rounds or steps, a lower sampling rate or more noise), or, as the site operator, raise "
            "epsilon_budget in the site config (the coordinator cannot)."
        )
        if any(e.noise_multiplier == 0 and e.releases_anything for e in events):
            message += " Non-private releases (noise_multiplier 0) are only allowed with an unlimited budget."
        return BudgetExceeded(
            message,
            requested_epsilon=requested,
            spent_epsilon=spent,
            budget_epsilon=self.epsilon_budget,
            epsilon_after=after,
        )
