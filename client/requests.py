"""Shared mechanics of every site handler: refusals, request checks, state files, cached replies."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import Error, Message

from common import protocol as P
from common.files import save_torch_atomic

if TYPE_CHECKING:
    from client.site import SiteSettings
    from common.data import ImageDataset

log = logging.getLogger("fedsynth.site")


class Refusal(Exception):
    """The site declines a request; becomes an error reply with a protocol refusal code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def refuse(msg: Message, site_name: str, err: Refusal) -> Message:
    log.warning("[%s] refused %s: %s", site_name, msg.metadata.message_type, err.reason)
    return Message(error=Error(code=err.code, reason=f"{site_name}: {err.reason}"), reply_to=msg)


def request_config(msg: Message, required: tuple[str, ...]) -> dict[str, Any]:
    if P.REQ_CONFIG not in msg.content.config_records:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"request has no '{P.REQ_CONFIG}' record")
    cfg = dict(msg.content.config_records[P.REQ_CONFIG])
    unknown = sorted(set(cfg) - set(required))
    missing = sorted(set(required) - set(cfg))
    if unknown or missing:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"request settings do not follow the protocol "
                                             f"(unknown: {unknown}, missing: {missing})")
    return cfg


def atomic_write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def safe_name(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:80]
    if not cleaned or cleaned.startswith("."):
        raise Refusal(P.REFUSED_BAD_REQUEST, f"invalid experiment id {text!r}")
    return cleaned


def load_cached_reply(path: Path) -> dict | None:
    """A reply this site already released for the same request (re-sending it costs no privacy)."""
    if not path.exists():
        return None
    return torch.load(path, weights_only=True)


def save_cached_reply(path: Path, payload: dict) -> None:
    save_torch_atomic(path, payload)


def load_fixed_plan(path: Path, asked: dict[str, Any]) -> dict | None:
    """A run's plan fixed at its first request, or None; refuses a request that changes the plan."""
    if not path.exists():
        return None
    plan = json.loads(path.read_text())
    changed = {k: (plan["asked"].get(k), v) for k, v in asked.items() if plan["asked"].get(k) != v}
    if changed:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"request changes settings fixed at the run's first request: "
                                             f"{changed} (start a new experiment instead)")
    return plan


def require_mode(site: "SiteSettings", mode: str) -> None:
    """Refuse a request for a synthesis mode the site's operator did not allow (``modes`` in site.yaml)."""
    if mode not in site.modes:
        raise Refusal(P.REFUSED_NOT_ALLOWED,
                      f"this site allows only the modes {', '.join(site.modes) or 'none'}, not '{mode}'")


# Above this noise multiplier DP-SGD updates or statistics are pure noise: a plan that needs more is a
# budget too small for the requested work, refused instead of silently training on noise.
MAX_USEFUL_NOISE = 50.0


def check_useful_noise(sigma: float, what: str) -> None:
    if sigma > MAX_USEFUL_NOISE:
        raise Refusal(P.REFUSED_BUDGET, f"the budget is too small for the requested {what}: it would need noise "
                                        f"multiplier {sigma:.3g} (> {MAX_USEFUL_NOISE:g}, where nothing is learned); "
                                        "ask for fewer rounds/steps or a larger epsilon")


def open_request(msg: Message, site: "SiteSettings", mode: str, keys: tuple[str, ...], array_key: str,
                 what: str) -> tuple[dict[str, Any], "ImageDataset"]:
    """The checks every training request starts with: mode allowed, settings as the protocol says,
    the model present, the site's data loadable. Returns (settings, data) or raises a Refusal."""
    from client.site import load_site_data
    from common.data import DataError

    require_mode(site, mode)
    cfg = request_config(msg, keys)
    if array_key not in msg.content.array_records:
        raise Refusal(P.REFUSED_BAD_REQUEST, f"request carries no {what}")
    try:
        return cfg, load_site_data(site)
    except DataError as err:
        raise Refusal(P.SITE_FAILURE, f"cannot load the site's data: {err}") from None
