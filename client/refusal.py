"""A site's refusal: a reason the coordinator may read, and the details only the site's log gets."""

from __future__ import annotations


class Refusal(Exception):
    """The site declines a request. ``public`` goes to the coordinator (it must never name the site's budget,
    spending, record count, paths or data); ``detail`` goes only to the site's own log."""

    def __init__(self, code: int, public: str, detail: str = "") -> None:
        super().__init__(detail or public)
        self.code = code
        self.public = public
        self.detail = detail or public
