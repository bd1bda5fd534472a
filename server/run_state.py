"""A run's identity at the coordinator: its experiment id, fixed before the first request and kept on disk.

The sites key everything by the experiment id: their plan, saved replies and ledger entries. So a
coordinator that is killed and started again on the same out-dir must ask under the same id -- then
every site answers finished rounds from its saved replies and reuses the charge of an interrupted one
(nothing is spent twice). Under secure aggregation a saved release goes into one masked vector only: a round
interrupted after sites sent theirs is refused by them when re-sent (``server.secure_agg``). ``run.json`` in the out-dir holds the id and a hash of the settings that
define the run; a rerun with other settings is refused instead of silently mixing two runs.

Settings left at 0 are chosen by the product's rules (``server.defaults``) once the sites' schema is known,
and a newer fedsynth may choose differently. So ``run.json`` also records the values the rules chose
(``"chosen"``) and a resumed run must arrive at the same ones: naming a value with ``--set`` where the run
left the choice to the product is the same run when the value is the one chosen then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from common.config import RunConfig
from common.files import atomic_write_json
from server.defaults import ADDED_SINCE, CHOSEN_SETTINGS
from server.sites import RunFailed

log = logging.getLogger("fedsynth.coordinator")

RUN_FILE = "run.json"
# Settings that change how a run is carried out, not what it is: they may differ when resuming.
OPERATIONAL = ("progress", "parallel-sites", "round-timeout", "quorum", "out-dir", "resume", "device", "experiment")


def settings_hash(cfg: RunConfig) -> tuple[str, dict]:
    """(sha256 of the settings that define the run, those settings)."""
    defining = {k: v for k, v in sorted(cfg.to_flwr().items()) if k not in OPERATIONAL}
    text = json.dumps(defining, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16], defining


@dataclass
class RunState:
    out_dir: Path
    experiment: str
    resumed: bool
    timings: dict[str, float] = field(default_factory=dict)
    # settings left to the product when the run began and named now, or the other way round: checked against the
    # recorded choices once the rules have run (``check_choices``)
    pending: tuple[str, ...] = ()

    def check_choices(self, settings: dict[str, int]) -> None:
        """Record the rule-chosen ``settings`` {dashed name: value} with the run, or, when resuming, refuse values
        that differ from those the run began with (the rules changed since, or a --set names another value)."""
        path = self.out_dir / RUN_FILE
        record = json.loads(path.read_text())
        before = record.get("chosen")
        if before is None:  # a new run, or one recorded before fedsynth kept its choices: nothing to compare with
            if self.pending:
                log.warning("run %s was recorded before fedsynth kept the values its rules chose, so %s cannot be "
                            "checked against them; resuming with the values named now", self.experiment,
                            ", ".join(self.pending))
            record["chosen"] = settings
            atomic_write_json(path, record)
            return
        before = {**self._as_recorded_before_rules_existed(record, settings), **before}
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            then = " ".join(f"--set {k}={before[k]}" for k in changed if k in before)
            raise RunFailed(
                f"{self.out_dir} holds run {self.experiment}, which began with "
                + ", ".join(f"{k} = {before.get(k)}" for k in changed) + "; this run resolves "
                + ", ".join(f"{k} = {settings.get(k)}" for k in changed)
                + " (the product's rules changed since, or a setting names another value). Resume it with "
                f"{then or 'the settings it began with'}, or give a new out-dir (--out) for a new run.")

    @staticmethod
    def _as_recorded_before_rules_existed(record: dict, settings: dict[str, int]) -> dict[str, int]:
        """For each rule added since the run was recorded (``server.defaults.ADDED_SINCE``): the value the run
        behaved as, read from its recorded settings; a rule that chooses nothing in this run's mode (0) matches."""
        recorded, defaults = record.get("settings", {}), RunConfig().to_flwr()
        return {k: (int(recorded.get(source, defaults[source])) if settings.get(k) else settings.get(k))
                for k, source in ADDED_SINCE.items()}

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def open_run(cfg: RunConfig) -> RunState:
    """The run in ``cfg.out_dir``: the one already there (same settings) or a new one; written before any request."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RUN_FILE
    digest, defining = settings_hash(cfg)
    previous = json.loads(path.read_text()) if path.exists() else None
    if previous is not None and cfg.resume:
        before = previous.get("settings", {})
        # a setting that a newer fedsynth added reads as its default in a run recorded before it existed
        defaults = RunConfig().to_flwr()
        changed = sorted(k for k in set(before) | set(defining)
                         if before.get(k, defaults.get(k)) != defining.get(k, defaults.get(k)))
        # a rule-chosen setting (0 then) named now, or the reverse: decided once the rules have run
        pending = tuple(k for k in changed
                        if k in CHOSEN_SETTINGS and 0 in (before.get(k, defaults.get(k)), defining.get(k)))
        changed = [k for k in changed if k not in pending]
        if changed:  # (a differing hash with nothing changed: only settings added since, at their defaults)
            raise RunFailed(
                f"{out_dir} holds run {previous['experiment']} with other settings (changed: {', '.join(changed)}). "
                "Rerun with the same settings to resume it, give a new out-dir (--out) for a new run, or set "
                "resume=false to start a new run in this folder.")
        if cfg.experiment and cfg.experiment != previous["experiment"]:
            raise RunFailed(f"{out_dir} holds run {previous['experiment']}, not experiment {cfg.experiment}; give "
                            "a new out-dir for a new run")
        return RunState(out_dir, previous["experiment"], resumed=True, pending=pending)
    experiment = cfg.experiment or uuid.uuid4().hex[:12]
    atomic_write_json(path, {"experiment": experiment, "settings_hash": digest, "settings": defining,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    if not cfg.resume:
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return RunState(out_dir, experiment, resumed=False)
