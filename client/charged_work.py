"""Charge, then work: a training round's or a statistics release's charge in the site's ledger before its private
work, and what an interrupted, failed or killed attempt leaves for the next one (:func:`charged_work`).

The DP-GAN rounds, the shared net's rounds and the statistics release go through here (``client.gan_site``,
``client.bn_site``; the census, the noisy size and the queries charge their own single draws): the charge is durable
before any record is read for it, and each attempt marks the run's folder from its charge until its reply is saved,
so that a re-sent request is charged again unless its operator interrupted it (the mark's states, below).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from client.ledger import BudgetExceeded, PrivacyLedger, Spent
from client.refusal import Refusal
from client.site import data_fingerprint
from common import protocol as P
from common.accounting import DPEvent
from common.data import ImageDataset
from common.files import atomic_write_text, remove_durably

if TYPE_CHECKING:
    from client.site import SiteSettings

log = logging.getLogger("fedsynth.site")

# What an attempt's mark in the run's folder (attempt-<purpose>-<round>) says, written durably (file and folder
# fsync'ed) at each step: "running" from just after its charge until it ends, "failed" when its work raised, and
# "interrupted" when its operator stopped it (Ctrl-C); removed once its reply is saved. Only "interrupted" lets the
# next attempt reuse the charge at a deployed site: a mark that is "running", "failed", empty, unreadable or missing
# where a charge exists says nothing a crash could not have left, so that attempt is charged again.
ATTEMPT_RUNNING, ATTEMPT_FAILED, ATTEMPT_INTERRUPTED = "running", "failed", "interrupted"


def attempt_mark(folder: Path, purpose: str, rnd: int) -> Path:
    return folder / f"attempt-{purpose}-{rnd}"


def _attempt_state(mark: Path) -> str | None:
    """The mark's state: None when there is none, "empty" or "unreadable" when it says nothing."""
    try:
        text = mark.read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return "unreadable"
    try:
        state = text.decode("ascii").strip()
    except UnicodeDecodeError:
        return "unreadable"
    return state or "empty"


@contextmanager
def charged_work(ledger: PrivacyLedger, events: list[DPEvent], data: ImageDataset, site: SiteSettings, *,
                 purpose: str, run: str, rnd: int, folder: Path, run_epsilon: float,
                 details: dict | None = None) -> Iterator[Spent]:
    """Charge a round's (or a release's) ``events`` under (run, purpose, rnd), then do its work (the ``with`` body,
    which saves the reply), yielding what is spent now.

    Work that does not fit the site's budget, or that would bring the run's own charges past ``run_epsilon`` (the
    epsilon the run asked for: a retry charged again must not let a run spend more than it asked), is refused
    (nothing written). Each attempt marks the run's folder durably from its charge until it ends (``ATTEMPT_*``).
    An attempt that was *interrupted* (KeyboardInterrupt, SystemExit: its operator's Ctrl-C, or Flower's SIGINT when
    a run is stopped or the SuperNode goes away; nothing leaves such an attempt) leaves the positive mark
    "interrupted", and the next attempt reuses its charge (``PrivacyLedger.charge_once``), never charging twice, as
    the site's log says. After an attempt that *failed*, the next is charged anew: whether work fails can depend on
    the records, and a coordinator that could re-send such a round for free would get a fresh draw of its noise, or
    a data-dependent yes/no, for each retry. After an attempt that was *killed* (still "running": out of memory, a
    crash, a power cut), or whose mark a power cut left empty or lost, the next is charged anew at a deployed site
    too -- how much memory a round takes follows its Poisson batches, and a lost saved reply must not become a
    second release under one charge -- but a "running" (or missing) mark reuses the charge at a simulated site,
    whose operator is the simulation's owner and whose runs are stopped by killing them (a second Ctrl-C, a closed
    terminal); the kill is on the safe side at a deployed site, where it costs twice."""
    mark = attempt_mark(folder, purpose, rnd)
    state = _attempt_state(mark)
    simulated = site.partition_id is not None
    reuse = state == ATTEMPT_INTERRUPTED or (simulated and state in (None, ATTEMPT_RUNNING))
    if state is None and not reuse and ledger.has_charge(run=run, purpose=purpose, round=rnd):
        state = "none"  # charged before, but neither its reply nor its mark is there: a crash lost them
    try:
        if reuse:
            spent, reused = ledger.charge_once(events, purpose=purpose, run=run, round=rnd, details=details,
                                               data=data_fingerprint(data), run_epsilon=run_epsilon)
        else:
            extra = {} if state is None else {"after-an-unfinished-attempt": state}
            spent, reused = ledger.charge(events, purpose=purpose, run=run, round=rnd, data=data_fingerprint(data),
                                          details={**(details or {}), **extra}, run_epsilon=run_epsilon), False
            if state is not None:
                log.warning("[%s] %s %d of %s %s earlier; this attempt is charged again", site.name, purpose, rnd,
                            run, "failed" if state == ATTEMPT_FAILED else
                            f"was killed or cut off (its mark: {state})")
    except BudgetExceeded as err:
        raise Refusal(P.REFUSED_BUDGET, "the requested work does not fit this site's privacy budget",
                      str(err)) from None
    if reused:
        log.warning("[%s] %s %d of %s was interrupted earlier; its charge is reused, nothing is charged twice",
                    site.name, purpose, rnd, run)
    atomic_write_text(mark, ATTEMPT_RUNNING)  # durable before the work starts
    try:
        yield spent
    except Exception:  # failed: the next attempt is charged again
        atomic_write_text(mark, ATTEMPT_FAILED)
        raise
    except BaseException:  # the operator interrupted it (Ctrl-C): the next attempt reuses this charge
        atomic_write_text(mark, ATTEMPT_INTERRUPTED)
        raise
    remove_durably(mark)  # done (the reply is saved, durably)
