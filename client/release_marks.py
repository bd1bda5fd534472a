"""Which way a site's release left it: in the clear, or inside one SecAgg+ sum -- never both.

A release is the saved reply of one run, message type and round (a DP-GAN round's generator, a shared-net round's
net, the statistics release). The site answers a re-sent request from it at no charge, so the coordinator can ask
for it more than once. Inside a secure sum it is masked and the coordinator sees only the total; sent in the clear
as well, it can be subtracted from that total, and so can the clear releases of other sites in the sum: with the
statistics' noise split over the sites (distributed noise), the sum minus the other sites' clear releases is the
last site's release alone, with 1/sqrt(t) of its charged noise (review s67: a coordinator asked three of four sites
for the run's statistics in the clear, then summed all four, and read the fourth's release to within rounding).

So each release carries a mark beside its saved file for the way it left: ``.in-secure-sum`` (written by
``client.secure_site`` before the masked vector leaves; one sum at most) or ``.in-the-clear`` (written by
:func:`answer_in_clear` before a clear reply leaves). Each way writes its own mark first and then looks for the
other's, so two requests racing each other cannot both leave (both may be refused); a request whose release already
left the other way is refused before any work. A third mark, ``.for-secure-sum``, written before a secure request's
work, says a saved release was made for a sum: a secure sum reuses no saved release without it (one saved before
the marks existed may have left in the clear).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, TypeVar

from client.refusal import Refusal
from common import protocol as P
from common.files import create_once

SUMMED_SUFFIX = ".in-secure-sum"  # beside a saved release: it went into a masked vector
FOR_SUM_SUFFIX = ".for-secure-sum"  # beside a saved release: it was made for a secure sum (before its work)
CLEAR_SUFFIX = ".in-the-clear"  # beside a saved release: it was sent in the clear


def summed_mark(release: Path) -> Path:
    """The mark that the release saved at ``release`` went into a masked vector."""
    return release.with_name(release.stem + SUMMED_SUFFIX)


def for_sum_mark(release: Path) -> Path:
    """The mark, written before a secure request's work, that the release saved at ``release`` is made for a sum: a
    saved release without it may have left in the clear before its mark existed (a fedsynth before stop 67), so a
    secure sum reuses only one with it (review s67's eighth helper summed such a release)."""
    return release.with_name(release.stem + FOR_SUM_SUFFIX)


def clear_mark(release: Path) -> Path:
    """The mark that the release saved at ``release`` was sent in the clear."""
    return release.with_name(release.stem + CLEAR_SUFFIX)


def _what(request: P.Message) -> str:
    return {P.TRAIN_GAN: f"round {getattr(request, 'server_round', 0)}'s generator",
            P.TRAIN_BNNET: f"shared-net round {getattr(request, 'server_round', 0)}'s net",
            P.QUERY_BNSTATS: "the statistics release"}[request.MESSAGE_TYPE]


def _refusal(request: P.Message, why: str) -> Refusal:
    """A refusal of the release ``request`` asks for, saying ``why``; it quotes only the request (its message type,
    round and experiment id)."""
    return Refusal(P.REFUSED_BAD_REQUEST, f"{request.MESSAGE_TYPE}: {_what(request)} of experiment "
                                          f"{request.experiment!r} {why}: start a new experiment")


def summed_twice_refusal(request: P.Message) -> Refusal:
    """The refusal of a second secure sum over a release that went into one (``common.protocol``: ALREADY_SUMMED)."""
    return _refusal(request, f"{P.ALREADY_SUMMED}; a second secure sum with it would let the coordinator subtract the "
                             "two sums and see this site's release alone, so it goes into no other")


def sent_in_clear_refusal(request: P.Message) -> Refusal:
    """The refusal of a secure sum over a release that was sent in the clear."""
    return _refusal(request, "was sent in the clear; inside a secure sum the coordinator could subtract it (and other "
                             "sites' clear releases) from the total, so it goes into none")


def unmarked_refusal(request: P.Message) -> Refusal:
    """The refusal of a secure sum over a saved release not made for one (a clear request made it and failed before
    its mark, or a fedsynth before stop 67 saved it): it may have left in the clear, so it goes into no sum."""
    return _refusal(request, "was not made for a secure sum (a request in the clear made it, or an earlier fedsynth "
                             "that did not mark the way), so it may have left in the clear and goes into no secure "
                             "sum")


def summed_refusal(request: P.Message) -> Refusal:
    """The refusal of a clear reply for a release that went into a secure sum."""
    return _refusal(request, f"{P.ALREADY_SUMMED}; sent in the clear as well, it could be subtracted from that sum, "
                             "so it is not")


def check_not_summed(release: Path, request: P.Message) -> None:
    """Before a clear request's work: refuse it when its release went into a secure sum."""
    if summed_mark(release).exists():
        raise summed_refusal(request)


def _note(request: P.Message) -> bytes:
    """What a mark holds: the request's message type and round, and when it was written."""
    return json.dumps({"message-type": request.MESSAGE_TYPE, "round": int(getattr(request, "server_round", 0)),
                       "marked-at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode()


def mark_summed(release: Path, request: P.Message) -> None:
    """Before a masked vector leaves: mark its release as summed, durably, or refuse when it already is (a copy of
    the request pushed at once finds the first one's mark)."""
    if not create_once(summed_mark(release), _note(request)):
        raise summed_twice_refusal(request)


def mark_sent_in_clear(release: Path, request: P.Message) -> None:
    """Before a clear reply leaves: mark its release as sent in the clear (durably; once is enough, a re-send of the
    same release finds the mark), then refuse when a secure sum took it meanwhile (a request racing this one)."""
    create_once(clear_mark(release), _note(request))
    check_not_summed(release, request)


Reply = TypeVar("Reply")


def answer_in_clear(release: Path, request: P.Message, work: Callable[[], Reply]) -> Reply:
    """A clear request's reply: refused when its release went into a secure sum, else ``work()`` (which computes the
    release or reads it back), marked as sent in the clear before it leaves."""
    check_not_summed(release, request)  # a release leaves in the clear or in one secure sum, never both
    reply = work()
    mark_sent_in_clear(release, request)
    return reply
