"""The sites of a run as the coordinator sees them: discovery, and what each released.

The coordinator knows of a site only what the site published (``query.info``) and what it released
in this run. It never sees a site's record count, budget or spending: the report's per-site privacy
line is the guarantee of the run's requests (epsilon the run asked for, the delta bound the site
published), not a reading of the site's ledger.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from flwr.serverapp import Grid

from common import protocol as P
from common.config import RunConfig
from server.collect import broadcast


class RunFailed(RuntimeError):
    """The run cannot continue; the message says why and what to do."""


@dataclass
class SiteRecord:
    node_id: int
    name: str
    delta_bound: float = P.DEFAULT_DELTA_BOUND
    evaluation: bool = False  # the site allows DP evaluation queries
    audits: bool = False  # the site allows DP audit queries
    device: str = ""  # the kind of device the site computes on (cpu, cuda), as it published it
    sensitive_attribute: str = ""  # the attribute the site declared sensitive ("" = none), as it published it
    weight: float = 0.0  # the site's noisy record total (its census), as it sent it
    bytes_sent: int = 0
    released: list[str] = field(default_factory=list)  # what the site released in this run, in order
    rounds_ok: list[int] = field(default_factory=list)
    rounds_failed: dict = field(default_factory=dict)  # round (or phase) -> why (refusal, timeout, rejected)

    def note_release(self, what: str, nbytes: int) -> None:
        self.bytes_sent += nbytes
        if what not in self.released:
            self.released.append(what)

    def row(self) -> dict:
        out = asdict(self)
        out["rounds_failed"] = {str(k): v for k, v in self.rounds_failed.items()}
        out["dropped"] = bool(self.rounds_failed)
        return out


def trained_sites(sites: dict[int, SiteRecord], allows: str) -> tuple[dict[int, SiteRecord], dict[str, list[str]]]:
    """The sites to send this run's evaluation or audit queries (``allows``: "evaluation" or "audits"): those that
    allow them and released something in this run; and, for the report, the names of the others ("not_allowed",
    "not_trained"). A site's plan reserves its queries inside the run's epsilon, and only a site that trained has
    one: a site that refused the run (its plan could not pay for the queries it reserves) would hold them to its own
    budget alone, past the epsilon the report states (review s67)."""
    asked = {n: s for n, s in sites.items() if getattr(s, allows) and s.released}
    return asked, {"not_allowed": sorted(s.name for s in sites.values() if not getattr(s, allows)),
                   "not_trained": sorted(s.name for n, s in sites.items() if getattr(s, allows) and n not in asked)}


@dataclass(frozen=True)
class Schema:
    channels: int
    height: int
    width: int
    classes: tuple[str, ...]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width


def discover_sites(grid: Grid, cfg: RunConfig) -> tuple[dict[int, SiteRecord], Schema]:
    """Ask every connected site for its published schema; all must agree (shape, classes)."""
    nodes = sorted(grid.get_node_ids())
    if not nodes:
        raise RunFailed("no site is connected; start the sites (fedsynth site) before the run")
    got = broadcast(grid, P.InfoRequest(), P.InfoReply, "info", cfg.round_timeout, nodes)
    if not got.replies:
        reasons = "; ".join(list(got.failures.values())[:3])
        raise RunFailed("no site answered the schema query; check the sites' logs (data path, config)"
                        + (f". Sites said: {reasons}" if reasons else ""))
    sites: dict[int, SiteRecord] = {}
    schemas: dict[int, Schema] = {}
    for node, info in got.replies.items():
        schemas[node] = Schema(info.channels, info.height, info.width, tuple(info.classes))
        sites[node] = SiteRecord(node, info.site_name, delta_bound=info.delta_bound, evaluation=info.evaluation,
                                 audits=info.audits, device=info.device,
                                 sensitive_attribute=info.sensitive_attribute)
    for node, why in got.failures.items():
        sites[node] = SiteRecord(node, f"node-{node}", rounds_failed={"info": why})
    distinct = set(schemas.values())
    if len(distinct) > 1:
        detail = "; ".join(f"{sites[n].name}: {s.image_shape} {len(s.classes)} classes" for n, s in schemas.items())
        raise RunFailed(f"sites disagree on the data schema ({detail}); every site must hold images of the same "
                        "shape and class list (set image-size / channels in the site configs)")
    return sites, distinct.pop()


def record_failures(sites: dict[int, SiteRecord], failures: dict[int, str], key) -> None:
    for node, why in failures.items():
        sites.setdefault(node, SiteRecord(node, f"node-{node}")).rounds_failed[key] = why


def site_names(sites: dict[int, SiteRecord]) -> dict[int, str]:
    return {n: s.name for n, s in sites.items()}
