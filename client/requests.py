"""Shared mechanics of every site handler: decoding requests, refusing safely, the run's state files.

A site answers a hostile coordinator. So every handler runs inside :func:`site_handler`, which turns
every failure into an error reply whose reason is safe to send: a :class:`Refusal` says its ``public``
text (never the site's budget, spending, record count, paths or data), and any other exception becomes a
generic "site failure" while the details go to the site's own log. Without this, Flower would send the
exception's text -- a traceback that can quote private values -- to the coordinator.

A site does one request's work at a time (:func:`one_request_at_a_time`): every handler checks for a saved reply,
charges, works and saves its reply, and two copies of one request pushed at once must not both find no saved reply,
share one charge and each release fresh noise.

The time a reply takes is observable too, and it depends on the records (data loading and each DP-SGD step
grow with the record count). A site whose operator sets ``min_reply_seconds`` holds every reply, refusals
included, until that long after its work began (after the request lock, and before the lock is released, so that
a request that waited for another's work carries none of that work's time), and stamps it when it leaves (Flower's
``created_at``): a reply that leaves at the hold says nothing about how long the work took. Work that outlasts the
hold leaves at the hold's next multiple, and the site's log says to raise it.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from flwr.app import Context, Error, Message

from client.refusal import Refusal
from client.site import SiteSettings, load_site_data, resolve_site
from common import protocol as P
from common.data import DataError, ImageDataset
from common.device import pick_device
from common.files import save_torch_atomic
from common.recipe_ranges import recipe_problems
from common.run_id import experiment_id_problem
from common.state_layout import runs_folder
from common.wire import quoted

log = logging.getLogger("fedsynth.site")


def refuse(msg: Message, site_name: str, code: int, public: str, detail: str = "") -> Message:
    log.warning("[%s] refused %s: %s", site_name, msg.metadata.message_type, detail or public)
    return Message(error=Error(code=code, reason=f"{site_name}: {public}"), reply_to=msg)


FAILURE_TEXT = "the site could not do this work; its operator can see why in the site's log"


def site_handler(fn: Callable[[Message, Context, SiteSettings], Message]) -> Callable[[Message, Context], Message]:
    """Wrap a ClientApp handler so that nothing but a declared reply or a safe refusal leaves the site."""

    def handler(msg: Message, context: Context) -> Message:
        site: SiteSettings | None = None
        try:
            site = resolve_site(context.node_config, context.run_config)
            with one_request_at_a_time(site):
                # The hold counts from here, after the lock, and ends inside it: a request that waited for another's
                # work must not carry that work's duration into its own departure (the coordinator could send a
                # second request of known work beside the first and read from its slot how long the first took).
                came = time.monotonic()
                reply: Message | None = None
                try:
                    reply = _answered(fn, msg, context, site)
                finally:  # whatever produced the reply (or failed to), it leaves on the hold's grid
                    if site.min_reply_seconds > 0:
                        hold_reply(site, msg.metadata.message_type, came)
                        if reply is not None:
                            reply = restamped(reply, msg)
                return reply
        except Exception as err:  # noqa: BLE001 - the site's settings or its lock failed: a safe reply, no traceback
            return _refusal(err, msg, site)

    # (not functools.wraps: Flower must see the (message, context) signature, not the wrapped one)
    handler.__name__, handler.__qualname__, handler.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return handler


def _answered(fn: Callable[[Message, Context, SiteSettings], Message], msg: Message, context: Context,
              site: SiteSettings) -> Message:
    """``fn``'s reply, or the safe refusal of whatever it raised."""
    try:
        return fn(msg, context, site)
    except Exception as err:  # noqa: BLE001 - any crash must become a safe reply, never a traceback
        try:
            return _refusal(err, msg, site)
        except Exception:  # noqa: BLE001 - even describing it failed (an exception whose text raises)
            log.error("[%s] %s failed, and so did describing its failure", _name(site), msg.metadata.message_type)
            return refuse(msg, _name(site), P.SITE_FAILURE, FAILURE_TEXT, "(no description)")


def _refusal(err: Exception, msg: Message, site: SiteSettings | None) -> Message:
    """The error reply for ``err``: a Refusal's public text, the coordinator's own ProtocolError, else the generic
    failure (the details go to the site's log only)."""
    if isinstance(err, Refusal):
        return refuse(msg, _name(site), err.code, err.public, err.detail)
    if isinstance(err, P.ProtocolError):  # it describes the coordinator's own message: safe to echo
        return refuse(msg, _name(site), P.REFUSED_BAD_REQUEST, str(err))
    if isinstance(err, DataError):
        return refuse(msg, _name(site), P.SITE_FAILURE, FAILURE_TEXT, f"cannot load the site's data: {err}")
    log.error("[%s] %s failed", _name(site), msg.metadata.message_type, exc_info=err)
    return refuse(msg, _name(site), P.SITE_FAILURE, FAILURE_TEXT, f"{type(err).__name__}: {err}")


def restamped(reply: Message, msg: Message) -> Message:
    """``reply`` built again now, so that its metadata's ``created_at`` (and the ``ttl`` Flower derives from it) is
    the time it leaves. Why: Flower stamps a reply when it is built, inside the handler, before the hold; sent as
    built, the stamp would tell the coordinator how long the work took, which the hold exists to hide."""
    if reply.has_error():
        return Message(error=reply.error, reply_to=msg)
    return Message(reply.content, reply_to=msg)


LOCK_FILE = "requests.lock"  # in the site's state_dir


@contextmanager
def one_request_at_a_time(site: SiteSettings) -> Iterator[None]:
    """Hold the site's request lock (an exclusive flock on ``state_dir/requests.lock``) while a request is worked on.

    Why: every handler is "saved reply? else charge, work, save" -- the charge of an interrupted attempt is reused
    (``PrivacyLedger.charge_once``), so two copies of one request worked on at once (a coordinator can push both,
    and Flower starts a ClientApp process per message) would both find no saved reply, the second would reuse the
    first's charge, and both would release fresh DP noise: two releases for one charge. Holding the lock from the
    check to the save makes the second copy find the first's saved reply. A flock is per open file, so it orders
    the threads of one process (the in-process simulation's sites) as well as separate processes; it goes with
    the process, so a killed request leaves no stale lock.
    """
    site.state_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(site.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _name(site: SiteSettings | None) -> str:
    return site.name if site is not None else "site"


def hold_reply(site: SiteSettings, what: str, came: float, *, sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait until the first whole multiple of ``site.min_reply_seconds`` after ``came`` (a time.monotonic() reading)
    that the work has not outlasted; returns the seconds waited.

    Why: the work's duration depends on the records. Held to a time fixed by the operator, a reply's timing
    is the same for any data whose work fits in the hold. Work that outlasts it (the coordinator chooses how much
    work a request asks for, up to the site's limits) leaves at the next multiple of the hold, so its timing tells
    only how many holds the work took, not how long to the millisecond."""
    hold = site.min_reply_seconds
    elapsed = time.monotonic() - came
    slots = max(1, math.ceil(elapsed / hold))
    if slots > 1:
        log.warning("[%s] %s took %.1f s, longer than min_reply_seconds (%.1f s): it leaves at %d x the hold, which "
                    "tells how many holds the work took, which depends on the records; raise min_reply_seconds above "
                    "the slowest round", site.name, what, elapsed, hold, slots)
    wait = slots * hold - elapsed
    if wait > 0:
        sleep(wait)
    return max(wait, 0.0)


def site_device(context: Context) -> torch.device:
    """The device this site computes on: its operator's (site.yaml ``device``, in the node config) where set, else the
    one the run asks for (run config ``device``). Checked before anything is charged: a device the site does not
    have is refused here, where a failure after the charge would cost every retry (``client.site.charged_work``) and
    release nothing. Why the operator's wins: the work limits are the operator's measure of its machine's memory,
    and the bitwise checks that a record's result does not hang on its batch-mates ran on CPU (review s58)."""
    own = str(context.node_config.get("device", "") or "")
    preference = own or str(context.run_config.get("device", "auto"))
    try:
        device = pick_device(preference)
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {quoted(preference)} names a GPU this site does not have; use device='auto'")
    except ValueError as err:  # (its text quotes the setting short)
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the run's device setting cannot be used here: {err}") from None
    except RuntimeError as err:  # a device string torch itself cannot read
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the run's device setting cannot be used here: {quoted(str(err))}") from None
    return device


def require_mode(site: SiteSettings, mode: str) -> None:
    """Refuse a request for a synthesis mode the site's operator did not allow (``modes`` in site.yaml)."""
    if mode not in site.modes:
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"this site allows only the modes {', '.join(site.modes) or 'none'}, "
                                             f"not '{mode}'")
    if site.sensitive_attribute and mode != "dpgan":
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"this site declares {site.sensitive_attribute} sensitive: only the DP-GAN "
                                             f"mode can draw it independently in the synthetic set, not '{mode}'")


def require_replacement(site: SiteSettings, promised: str) -> None:
    """Refuse a DP-GAN request whose coordinator does not say it replaces the attribute this site declared
    sensitive (site.yaml ``sensitive_attribute``): before anything is loaded or charged. The replacement is
    done at the coordinator (post-processing of the generators); this stops a coordinator that would not."""
    if site.sensitive_attribute and promised != site.sensitive_attribute:
        raise Refusal(P.REFUSED_NOT_ALLOWED, f"this site declares {site.sensitive_attribute} sensitive and the run "
                                             f"does not replace it (it names {quoted(promised)}); run with "
                                             f"sensitive-attribute = {site.sensitive_attribute}")


def require_plain_allowed(site: SiteSettings) -> None:
    """Refuse a release in the clear where the operator requires secure aggregation (site.yaml
    ``require_secure_aggregation``): before anything is loaded or charged."""
    if site.require_secure_aggregation:
        raise Refusal(P.REFUSED_NOT_ALLOWED, "this site takes part only in runs with secure aggregation "
                                             "(run setting secure-aggregation = true); it releases nothing in the "
                                             "clear, evaluation and audits included")


def site_data(site: SiteSettings) -> ImageDataset:
    try:
        return load_site_data(site)
    except DataError:
        raise
    except (OSError, ValueError) as err:  # an unexpected decoder / IO failure: the operator must look
        raise DataError(f"{type(err).__name__}: {err}") from None


def check_recipe(req: P.Message) -> None:
    """Refuse, before anything is charged, a recipe value outside the protocol's ranges (``common.recipe_ranges``:
    each problem names the setting, its range and the coordinator's own value)."""
    problems = recipe_problems(req)
    if problems:
        raise Refusal(P.REFUSED_BAD_REQUEST, "; ".join(problems))


def check_schema(data: ImageDataset, channels: int, height: int, width: int, num_classes: int) -> None:
    c, h, w = data.image_shape
    if (channels, height, width, num_classes) != (c, h, w, data.num_classes):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the run expects {channels}x{height}x{width} images in {num_classes} "
                                             f"classes but this site publishes {c}x{h}x{w} in {data.num_classes}")


def run_dir(site: SiteSettings, experiment: str) -> Path:
    """The site's private folder for one run (plan, census, saved replies, discriminator states)."""
    problem = experiment_id_problem(experiment)  # refused, never rewritten: two ids must not share a folder
    if problem:
        raise Refusal(P.REFUSED_BAD_REQUEST, problem)
    runs = runs_folder(site.state_dir)
    # A file system that ignores case (macOS's and Windows' defaults) would give 'Run-1' the folder of 'run-1',
    # and with it that run's saved replies: refuse an id that differs from a kept run's only in case, on every
    # file system, so that a site answers the same wherever it runs. The reason names only the id sent, never the
    # kept run's folder (common.protocol: a reason names none of the site's files).
    if has_case_twin(runs, experiment):
        raise Refusal(P.REFUSED_BAD_REQUEST,
                      f"the experiment id {experiment!r} differs from that of one of this site's runs only in case; "
                      "a file system that ignores case would give both one folder: give another id")
    return runs / experiment


def has_case_twin(runs: Path, experiment: str) -> bool:
    """Whether a run folder under ``runs`` equals ``experiment`` but for case."""
    if not runs.is_dir():
        return False
    key = experiment.casefold()
    return any(p.name != experiment and p.name.casefold() == key for p in runs.iterdir())


def load_saved(path: Path) -> dict | None:
    """A reply this site already released for the same request (sending it again costs no privacy)."""
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def save_reply(path: Path, payload: dict[str, Any]) -> None:
    """Save a reply (and what must persist with it) BEFORE sending it: a re-sent request gets it back."""
    save_torch_atomic(path, payload)

