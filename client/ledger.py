"""The site's privacy ledger: one append-only, crash-safe file per declared dataset id.

Every release a site makes is charged here BEFORE the private work starts (write-ahead): a request
that would push the dataset past the site's own epsilon budget is refused with nothing written and
nothing computed. Epsilon is composed over all recorded releases (all runs, rounds and modes) with
RDP accounting (:mod:`common.accounting`) at the ledger's delta, which is fixed when the ledger is
created and kept for its whole life, and at ONE Renyi order, fixed with it (:mod:`client.ledger_order`: the
proven guarantee of a budget enforced over adaptively chosen releases holds at a fixed order).

The ledger is keyed by the dataset id the site's operator declares (``dataset_id`` in site.yaml), not
by the data's content: adding, removing or re-encoding records keeps the same ledger, so the budget of
the records already there is never reset. Each charge also records a short fingerprint of the data it
was computed on, so that a change is visible (:meth:`PrivacyLedger.last_fingerprint`).

Interrupted work is charged once: :meth:`PrivacyLedger.charge_once` finds the entry of an earlier
attempt of the same (run, purpose, round) and reuses it instead of charging again. That is sound
because an attempt's output leaves the site only after the site has saved it (the re-sent request then
gets the saved reply), so an attempt that has no saved reply released nothing.

A ledger is never started twice: its first write leaves a durable mark beside it (``<id>.started``), and a ledger
that is missing or header-less while that mark (or the caller's ``history``) says it existed is LedgerDamaged. A
charge may be held to its run's epsilon (``run_epsilon``): the run's own charges never exceed what the run asked for.

The file format and its crash safety are in :mod:`client.ledger_file`. Processes on the same site
serialise their read-check-append with an exclusive flock on the ledger file.
"""

from __future__ import annotations

import fcntl
import math
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from client import ledger_file as lf
from client.ledger_file import LedgerDamaged
from client.ledger_order import allowance, ledger_order, order_in_force
from client.ledger_refusals import BudgetExceeded, budget_refusal, run_refusal
from common.accounting import DPEvent, epsilon_for, rdp_at_order
from common.protocol import DEFAULT_DELTA_BOUND

__all__ = ["BudgetExceeded", "LedgerDamaged", "PrivacyLedger", "Spent"]

# Slack for float noise when comparing composed epsilon with the budget.
_BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class Spent:
    """Privacy spent on one dataset so far: what its releases cost (composed epsilon at the ledger's delta, at their
    best order), the share of the site's budget they use (at the ledger's order: what the ledger enforces), and how
    many there are."""

    epsilon: float
    delta: float
    releases: int
    used: float = 0.0  # share of the budget's Renyi divergence at the ledger's order (1.0: spent; 0 if unlimited)


class PrivacyLedger:
    """Append-only privacy ledger of ONE dataset, enforcing the site's own (epsilon, delta) budget."""

    def __init__(self, path: Path, *, epsilon_budget: float, delta: float | None = None,
                 new_delta: float | None = None, dataset_id: str = "", create: bool = True,
                 first_charge: tuple[Sequence[DPEvent], str, str] | None = None, history: str = "") -> None:
        """Open (or create) the ledger at ``path``.

        ``epsilon_budget`` is the site's own configuration (math.inf = no limit, which also allows
        non-private releases). Delta: an explicit ``delta`` must equal the one the ledger was created
        with (ValueError otherwise: a dataset's delta cannot change once privacy was spent under it);
        with ``delta=None`` the ledger keeps its recorded delta, and ``new_delta`` is used only to create
        a new ledger. ``create=False`` opens an existing ledger only (FileNotFoundError otherwise) and
        never writes: reading a ledger must not create one. ``first_charge`` = (events, purpose, data fingerprint): a release
        that chose ``new_delta`` (:mod:`client.site_delta`), written as the first entry in the same write as
        the header when this call creates the ledger, and not at all when the ledger exists.
        ``history``: the caller's evidence that this dataset has released before (e.g. a site's saved replies), in
        words for the operator; with it, or with the ledger's ``.started`` mark, a missing or header-less ledger is
        :class:`LedgerDamaged`, never a new one (module docstring).
        """
        if not (isinstance(epsilon_budget, (int, float)) and epsilon_budget >= 0 and not math.isnan(epsilon_budget)):
            raise ValueError(f"epsilon_budget must be a number >= 0 (math.inf for no limit), got {epsilon_budget!r}")
        for name, value in (("delta", delta), ("new_delta", new_delta)):
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < 1):
                raise ValueError(f"{name} must be in (0, 1), got {value!r}; common.accounting.default_delta(n) "
                                 "gives one")
        self.path = Path(path)
        self.epsilon_budget = float(epsilon_budget)
        self.dataset_id = dataset_id
        self.history = history
        if not self.path.exists() and (evidence := lf.released_before(self.path, history)):
            raise LedgerDamaged(lf.reset_refused(self.path, "is missing", evidence))  # before any budget check
        if create and first_charge is not None and delta is None and new_delta is not None \
                and not self.path.exists():
            self._check_first_charge(first_charge, new_delta)  # before the file exists: nothing to undo
        if create:
            self.delta = self._open_or_create(delta if delta is not None else new_delta, explicit=delta is not None,
                                              first_charge=first_charge)
        elif not self.path.is_file():
            raise FileNotFoundError(f"no privacy ledger at {self.path}")
        else:
            self.delta = self._agree_delta(self._read_header(reading=True), delta)

    @property
    def started_mark(self) -> Path:
        """The mark written beside the ledger when it is first written (outside the ledger file)."""
        return lf.started_mark(self.path)

    # ------------------------------------------------------------------ file access

    def _read_header(self, reading: bool = False) -> dict:
        with open(self.path, "rb") as fh:
            contents = lf.parse(fh.read(), self.path)
        if contents.header is None:
            evidence = lf.released_before(self.path, self.history)
            if evidence:
                raise LedgerDamaged(lf.reset_refused(self.path, "is empty or has lost its header line", evidence))
            if reading:  # (a ledger being created, or left so by a crash there: the next writable open mends it)
                raise FileNotFoundError(f"no privacy ledger at {self.path} yet (it holds no header line)")
            raise LedgerDamaged(f"privacy ledger {self.path} has no header line")
        return contents.header

    def _agree_delta(self, header: dict, delta: float | None) -> float:
        recorded, keep = float(header["delta"]), ""  # (0 keeps the ledger's delta only up to the published bound)
        if delta is not None and not math.isclose(recorded, float(delta), rel_tol=1e-12, abs_tol=0.0):
            keep = " (or leave it at 0 to keep the ledger's)" if recorded <= DEFAULT_DELTA_BOUND else ""
            raise ValueError(f"privacy ledger {self.path} was created with delta={recorded:g} but the site is now "
                             f"configured with delta={float(delta):g}; a dataset's delta cannot change once privacy "
                             f"was spent under it. Set delta back to {recorded:g} in the site config{keep}.")
        return recorded

    def _check_first_charge(self, first_charge: tuple[Sequence[DPEvent], str, str], delta: float) -> None:
        cost = epsilon_for(list(first_charge[0]), delta, ledger_order(self.epsilon_budget, delta, sized=True))
        if cost > self.epsilon_budget + _BUDGET_SLACK:
            raise BudgetExceeded(
                f"privacy budget exceeded: creating the privacy ledger {self.path} charges its '{first_charge[1]}' "
                f"release (epsilon {cost:.4g}), above the site budget {self.epsilon_budget:g}. Raise "
                "epsilon_budget, or configure the site's delta (site.yaml 'delta'), which needs no release.",
                requested_epsilon=cost, spent_epsilon=0.0, budget_epsilon=self.epsilon_budget, epsilon_after=cost)

    def _open_or_create(self, delta: float | None, *, explicit: bool,
                        first_charge: tuple[Sequence[DPEvent], str, str] | None = None) -> float:
        lf.make_dirs_durably(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            created = True
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
            created = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            contents = lf.parse(lf.read_all(fd), self.path)
            if contents.header is None:
                # New file, or one whose header write was interrupted (then it holds no entries) -- unless the
                # ledger was started before (its mark, or the caller's evidence): then it was emptied or deleted.
                evidence = lf.released_before(self.path, self.history)
                if evidence:
                    if created:
                        os.unlink(self.path)
                    what = "is missing" if created else "is empty or has lost its header line"
                    raise LedgerDamaged(lf.reset_refused(self.path, what, evidence))
                if delta is None:
                    raise ValueError(f"creating the privacy ledger {self.path} needs a delta")
                if with_charge := first_charge is not None and not explicit:
                    try:  # (again: another process may have left the file without a header)
                        self._check_first_charge(first_charge, float(delta))
                    except BudgetExceeded:
                        if created:
                            os.unlink(self.path)
                        raise
                    events = list(first_charge[0])
                lines = lf.dumps(lf.make_header(float(delta), self.dataset_id, first_charge[1] if with_charge else ""))
                if (order := ledger_order(self.epsilon_budget, float(delta), sized=with_charge)) is not None:
                    lines += lf.dumps(lf.make_order(order, self.epsilon_budget))
                if with_charge:
                    lines += lf.dumps(lf.make_charge(events, purpose=first_charge[1], run="", round_=0, details={},
                                                     epsilon_after=epsilon_for(events, delta), delta=delta,
                                                     data=first_charge[2]))
                os.ftruncate(fd, 0)
                lf.write_all(fd, lines)
                os.fsync(fd)
                result = float(delta)
            else:
                result = self._agree_delta(contents.header, delta if explicit else None)
        finally:
            os.close(fd)  # closing releases the flock
        if created:
            lf.fsync_dir(self.path.parent)
        lf.mark_started(self.path, self.dataset_id)  # once the header is durable (an older ledger's: now)
        return result

    @contextmanager
    def _locked(self, operation: int) -> Iterator[tuple[int, lf.Contents]]:
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
            contents = lf.parse(lf.read_all(fd), self.path)
            if contents.header is None:
                raise LedgerDamaged(
                    f"privacy ledger {self.path} has lost its header line (the file was emptied or replaced). "
                    "Restore it from a backup; a site must not continue with its privacy accounting reset."
                )
            self._agree_delta(contents.header, self.delta)
            yield fd, contents
        finally:
            os.close(fd)

    def _contents(self) -> lf.Contents:
        with self._locked(fcntl.LOCK_SH) as (_, contents):
            return contents

    def _order_of(self, contents: lf.Contents) -> float | None:
        return order_in_force(contents.orders, self.epsilon_budget, self.delta, contents.delta_from_size)

    @property
    def order(self) -> float | None:
        """The Renyi order the dataset's total is composed at (:func:`client.ledger_order.order_in_force`): the one
        the ledger recorded last, or the one its next charge records (none recorded yet: a ledger made before
        2026-12-07 or under an unlimited budget; or a budget changed so that a lower order may take over); None
        under an unlimited budget with none recorded."""
        return self._order_of(self._contents())

    # ------------------------------------------------------------------ queries

    def spent(self) -> Spent:
        """What all recorded releases cost and the share of the budget they use (:class:`Spent`)."""
        contents = self._contents()
        return Spent(epsilon_for(contents.events, self.delta), self.delta, len(contents.entries),
                     self._used(contents.events, self._order_of(contents)))

    def _used(self, events: list[DPEvent], order: float | None) -> float:
        """The share of the budget ``events`` use at ``order``: their Renyi divergence there over the most the budget
        allows there (its epsilon less the conversion's own cost at that order); 0 under an unlimited budget, inf
        under one too small for the order to hold anything."""
        if order is None or math.isinf(self.epsilon_budget):
            return 0.0
        allowed = allowance(order, self.epsilon_budget, self.delta)
        return rdp_at_order(events, order) / allowed if allowed > 0 else math.inf

    def entries(self) -> list[dict]:
        """All recorded charge entries, oldest first (``epsilon_after`` decoded to a float, inf allowed)."""
        return self._contents().entries

    def events(self) -> list[DPEvent]:
        """Every DP event ever charged on this dataset, oldest first (what a budget planner composes with)."""
        return self._contents().events

    def events_except(self, *, run: str, purpose: str | None = None) -> list[DPEvent]:
        """Every event except those charged for ``purpose`` (any, with None) by the run ``run``, oldest first."""
        return [DPEvent.from_dict(e) for entry in self._contents().entries
                if not (entry["run"] == run and purpose in (None, entry["purpose"])) for e in entry["events"]]

    def has_charge(self, *, run: str, purpose: str, round: int) -> bool:  # noqa: A002
        """Whether the (run, purpose, round) release has been charged (the key ``charge_once`` reuses)."""
        return lf.has_charge(self._contents().entries, run=run, purpose=purpose, round_=round)

    def count(self, *, run: str, purpose: str) -> int:
        """How many charges of ``purpose`` the run ``run`` has made (e.g. evaluation queries against a cap)."""
        return sum(1 for e in self._contents().entries if e["run"] == run and e["purpose"] == purpose)

    def last_fingerprint(self) -> str | None:
        """The data fingerprint of the most recent charge that recorded one."""
        for entry in reversed(self._contents().entries):
            if entry.get("data"):
                return str(entry["data"])
        return None

    def summary(self) -> dict:
        """Budget, spending and per-purpose breakdown, for `fedsynth ledger` and the simulation report."""
        contents = self._contents()
        order = self._order_of(contents)
        spent = epsilon_for(contents.events, self.delta)
        events_by_purpose: dict[str, list[DPEvent]] = defaultdict(list)
        for entry in contents.entries:
            events_by_purpose[entry["purpose"]].extend(DPEvent.from_dict(e) for e in entry["events"])
        budget = self.epsilon_budget
        return {
            "path": str(self.path),
            "dataset_id": (contents.header or {}).get("dataset_id", ""),
            "budget_epsilon": budget,
            "spent_epsilon": spent,  # what the releases cost, at their best order
            # what the ledger enforces, 1.0 being all of it (None: no budget to share, unlimited or not given)
            "budget_used": None if math.isinf(budget) else self._used(contents.events, order),
            "delta": self.delta,
            "order": order,  # the Renyi order the total is read at (client.ledger_order)
            "order_recorded": contents.order == order,
            # the order a fresh ledger would take at this budget (another: the budget changed and the order did not
            # move, client.ledger_order.order_in_force; plans here then get more noise than at a fresh ledger)
            "order_for_budget": ledger_order(budget, self.delta, contents.delta_from_size),
            "releases": len(contents.entries),
            "per_purpose_releases": dict(Counter(entry["purpose"] for entry in contents.entries)),
            # Epsilon of each purpose on its own, at its best order; these do not add up to spent_epsilon.
            "per_purpose_epsilon": {p: epsilon_for(ev, self.delta) for p, ev in events_by_purpose.items()},
            "runs": sorted({entry["run"] for entry in contents.entries if entry["run"]}),
            "first_release": contents.entries[0]["time"] if contents.entries else None,
            "last_release": contents.entries[-1]["time"] if contents.entries else None,
        }

    # ------------------------------------------------------------------ spending

    def charge(self, events: Sequence[DPEvent], *, purpose: str, run: str = "", round: int = 0,  # noqa: A002
               details: dict | None = None, data: str = "", run_epsilon: float | None = None) -> Spent:
        """Record a release BEFORE doing its private work; refuse it if it would exceed the budget.

        Raises BudgetExceeded (writing nothing) if the epsilon after these events would exceed the
        budget, or, with ``run_epsilon``, if the run's own charges with these events would exceed it.
        Otherwise appends one fsync'ed line and returns the new total. A crash after this
        returns only over-counts (the work may not have happened), never under-counts.
        """
        spent, _ = self._charge(events, purpose=purpose, run=run, round=round, details=details, data=data, once=False,
                                run_epsilon=run_epsilon)
        return spent

    def charge_once(self, events: Sequence[DPEvent], *, purpose: str, run: str, round: int,  # noqa: A002
                    details: dict | None = None, data: str = "",
                    run_epsilon: float | None = None) -> tuple[Spent, bool]:
        """Like :meth:`charge`, but the latest charge of the same (run, purpose, round) is reused if it charged the
        same events and details (``ledger_file.same_release``). Returns (spent, reused). For work redone after an
        interruption (module docstring)."""
        if not run:
            raise ValueError("charge_once() needs the run id: the (run, purpose, round) key identifies a release")
        return self._charge(events, purpose=purpose, run=run, round=round, details=details, data=data, once=True,
                            run_epsilon=run_epsilon)

    def run_spent(self, run: str) -> float:
        """Epsilon of the run ``run``'s own charges, composed at the ledger's delta and their best order (a run's
        own epsilon, as its plan reads it; the dataset's total is read at the ledger's order)."""
        return epsilon_for(self._run_events(self._contents(), run), self.delta)

    @staticmethod
    def _run_events(contents: lf.Contents, run: str) -> list[DPEvent]:
        return [DPEvent.from_dict(e) for entry in contents.entries if entry["run"] == run for e in entry["events"]]

    def _charge(self, events: Sequence[DPEvent], *, purpose: str, run: str, round: int,  # noqa: A002
                details: dict | None, data: str, once: bool,
                run_epsilon: float | None = None) -> tuple[Spent, bool]:
        events = list(events)
        if not events or not all(isinstance(e, DPEvent) for e in events):
            raise ValueError(f"charge() needs a non-empty list of DPEvent, got {events!r}")
        if not isinstance(purpose, str) or not purpose:
            raise ValueError("charge() needs a non-empty purpose string (e.g. 'dpgan', 'bnstats-release')")
        if not isinstance(run, str):
            raise ValueError(f"run must be a string (the run id), got {run!r}")
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        if run_epsilon is not None and not (run and isinstance(run_epsilon, (int, float)) and run_epsilon > 0):
            raise ValueError(f"run_epsilon must be a number > 0 and needs the run id, got {run_epsilon!r}, {run!r}")
        details = dict(details or {})
        try:  # fail on unserialisable details before touching the file
            lf.dumps(details)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"charge() details must be JSON-serialisable with finite numbers: {exc}") from exc

        with self._locked(fcntl.LOCK_EX) as (fd, contents):
            order = self._order_of(contents)
            spent_before = epsilon_for(contents.events, self.delta)
            earlier = lf.last_charge(contents.entries, run=run, purpose=purpose, round_=round) if once else None
            if earlier is not None:  # reused for the same release only (review s59: lf.same_release)
                if lf.same_release(earlier, events, details):
                    return Spent(spent_before, self.delta, len(contents.entries),
                                 self._used(contents.events, order)), True
                details[lf.RETRY_DIFFERS] = True
            with_these = [*contents.events, *events]
            epsilon_after = epsilon_for(with_these, self.delta)
            # the allow rule: the total at the ledger's one order (a Renyi filter, client.ledger_order)
            if epsilon_for(with_these, self.delta, order) > self.epsilon_budget + _BUDGET_SLACK:
                raise budget_refusal(events, delta=self.delta, order=order, budget=self.epsilon_budget,
                                     purpose=purpose, run=run, round_=round, spent=spent_before, after=epsilon_after,
                                     used=(self._used(contents.events, order), self._used(with_these, order)))
            if run_epsilon is not None and math.isfinite(run_epsilon):
                run_events = self._run_events(contents, run)
                run_after = epsilon_for([*run_events, *events], self.delta)
                if run_after > run_epsilon + _BUDGET_SLACK:
                    raise run_refusal(events, delta=self.delta, budget=self.epsilon_budget, purpose=purpose, run=run,
                                      round_=round, run_spent=epsilon_for(run_events, self.delta),
                                      run_after=run_after, run_epsilon=run_epsilon, spent=spent_before,
                                      after=epsilon_after)
            line = lf.dumps(lf.make_charge(events, purpose=purpose, run=run, round_=round, details=details,
                                           epsilon_after=epsilon_after, delta=self.delta, data=data))
            if contents.keep_bytes < contents.size:  # drop an unacknowledged partial last line
                os.ftruncate(fd, contents.keep_bytes)
            if order is not None and math.isfinite(self.epsilon_budget) \
                    and (order, self.epsilon_budget) != (contents.orders[-1] if contents.orders else None):
                line = lf.dumps(lf.make_order(order, self.epsilon_budget)) + line  # in force from now on
            if contents.needs_newline:
                line = b"\n" + line
            lf.write_all(fd, line)
            os.fsync(fd)
        return Spent(epsilon_after, self.delta, len(contents.entries) + 1, self._used(with_these, order)), False
