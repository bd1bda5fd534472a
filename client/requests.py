"""Shared mechanics of every site handler: decoding requests, refusing safely, the run's state files.

A site answers a hostile coordinator. So every handler runs inside :func:`site_handler`, which turns
every failure into an error reply whose reason is safe to send: a :class:`Refusal` says its ``public``
text (never the site's budget, spending, record count, paths or data), and any other exception becomes a
generic "site failure" while the details go to the site's own log. Without this, Flower would send the
exception's text -- a traceback that can quote private values -- to the coordinator.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import Context, Error, Message

from client.refusal import Refusal
from client.site import SiteSettings, load_site_data, resolve_site
from common import protocol as P
from common.data import DataError, ImageDataset
from common.files import save_torch_atomic

log = logging.getLogger("fedsynth.site")


def refuse(msg: Message, site_name: str, code: int, public: str, detail: str = "") -> Message:
    log.warning("[%s] refused %s: %s", site_name, msg.metadata.message_type, detail or public)
    return Message(error=Error(code=code, reason=f"{site_name}: {public}"), reply_to=msg)


FAILURE_TEXT = "the site could not do this work; its operator can see why in the site's log"


def site_handler(fn: Callable[[Message, Context, SiteSettings], Message]) -> Callable[[Message, Context], Message]:
    """Wrap a ClientApp handler so that nothing but a declared reply or a safe refusal leaves the site."""

    def handler(msg: Message, context: Context) -> Message:
        site_name = "site"
        try:
            site = resolve_site(context.node_config, context.run_config)
            site_name = site.name
            return fn(msg, context, site)
        except Refusal as err:
            return refuse(msg, site_name, err.code, err.public, err.detail)
        except P.ProtocolError as err:  # it describes the coordinator's own message: safe to echo
            return refuse(msg, site_name, P.REFUSED_BAD_REQUEST, str(err))
        except DataError as err:
            return refuse(msg, site_name, P.SITE_FAILURE, FAILURE_TEXT, f"cannot load the site's data: {err}")
        except Exception as err:  # noqa: BLE001 - any crash must become a safe reply, never a traceback
            log.exception("[%s] %s failed", site_name, msg.metadata.message_type)
            return refuse(msg, site_name, P.SITE_FAILURE, FAILURE_TEXT, f"{type(err).__name__}: {err}")

    # (not functools.wraps: Flower must see the (message, context) signature, not the wrapped one)
    handler.__name__, handler.__qualname__, handler.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return handler


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
                                             f"does not replace it (it names '{promised}'); run with "
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


def check_schema(data: ImageDataset, channels: int, height: int, width: int, num_classes: int) -> None:
    c, h, w = data.image_shape
    if (channels, height, width, num_classes) != (c, h, w, data.num_classes):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"the run expects {channels}x{height}x{width} images in {num_classes} "
                                             f"classes but this site publishes {c}x{h}x{w} in {data.num_classes}")


def run_dir(site: SiteSettings, experiment: str) -> Path:
    """The site's private folder for one run (plan, census, saved replies, discriminator states)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)[:80]
    if not cleaned or cleaned.startswith("."):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"invalid experiment id {experiment!r}")
    return site.state_dir / "runs" / cleaned


def load_saved(path: Path) -> dict | None:
    """A reply this site already released for the same request (sending it again costs no privacy)."""
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def save_reply(path: Path, payload: dict[str, Any]) -> None:
    """Save a reply (and what must persist with it) BEFORE sending it: a re-sent request gets it back."""
    save_torch_atomic(path, payload)


def finite_at_least(value: float, name: str, low: float = 0.0, *, strict: bool = False) -> None:
    """Refuse a recipe value that would only wreck the round (it cannot touch privacy)."""
    import math

    bad = not math.isfinite(value) or value < low or (strict and value == low)
    if bad:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"{name} must be a finite number {'>' if strict else '>='} {low:g}, "
                                             f"got {value!r}")
