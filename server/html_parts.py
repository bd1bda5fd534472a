"""Small HTML helpers shared by the report's sections (server.report_html, server.report_html_audits)."""

from __future__ import annotations

import base64
import html
import math
from decimal import ROUND_CEILING, Decimal
from typing import Any, Iterable, Sequence


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def bound_text(value: float, digits: int = 3) -> str:
    """A privacy bound (an epsilon or a delta) as text, rounded UP to ``digits`` significant digits: a bound shown
    rounded to nearest could read below the true one (review s67: a delta of 1.4e-05 printed as 1e-05)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        return f"{value:g}" if isinstance(value, (int, float)) else str(value)
    exact = Decimal(repr(float(value)))
    up = exact.quantize(Decimal(1).scaleb(exact.adjusted() - digits + 1), rounding=ROUND_CEILING)
    return f"{float(up):g}"


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers to short text; None/NaN to a dash."""
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "&ndash;"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return esc(value)


class Raw:
    """Pre-rendered HTML for a table cell."""

    def __init__(self, markup: str) -> None:
        self.html = markup


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, table_id: str | None = None) -> str:
    """HTML table; cells already containing markup must be passed as ``Raw``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{c.html if isinstance(c, Raw) else fmt(c)}</td>" for c in row) + "</tr>"
        for row in rows
    )
    ident = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
