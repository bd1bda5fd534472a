"""The coordinator: a Flower ServerApp.

A run: discover the sites -> collect their DP releases and synthesize (the mode's module) -> train the
unchanged central learner on the synthetic set -> evaluate it (real test data where the coordinator
has it; the sites' DP answers where they allow it) -> audit (sites that allow it) -> report.
The coordinator never reads a site's data; everything it knows of a site is in ``common.protocol``.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common import protocol as P
from common.config import RunConfig
from common.device import pick_device
from common.learner import check_learner
from server.attribute_replacement import run_sensitive_attribute
from server.defaults import CHOSEN_SETTINGS
from server.defaults import resolve as resolve_defaults
from server.federated_eval import federated_evaluate
from server.learn import learn_and_test, load_test_data
from server.modes import bnstats, dpgan
from server.report import build_report, write_report
from server.run_state import open_run
from server.site_audits import check_audit_size, request_site_audits
from server.sites import RunFailed, discover_sites
from server.synthesis import save_synthetic

log = logging.getLogger("fedsynth.coordinator")
app = ServerApp()
MODE_MODULES = {"dpgan": dpgan, "bnstats": bnstats}  # one per common.config.MODES


def run_coordinator(grid: Grid, context: Context) -> dict:
    """Everything the coordinator does in one run; returns the report (also written to out-dir)."""
    cfg = RunConfig.from_mapping(context.run_config)
    run = open_run(cfg)
    device = pick_device(cfg.device)
    start = time.perf_counter()
    with run.timed("discover"):
        sites, schema = discover_sites(grid, cfg)
    cfg, chosen = resolve_defaults(cfg, schema, len(sites))  # settings left at 0: the product's rules
    run.check_choices({k: getattr(cfg, k.replace("-", "_")) for k in CHOSEN_SETTINGS})  # a resumed run: the same
    # an attribute the sites declared sensitive (or the run names) is drawn independently in the synthetic set
    cfg = dataclasses.replace(cfg, sensitive_attribute=run_sensitive_attribute(cfg, sites, schema.classes))
    if cfg.sensitive_attribute:
        log.info("run %s replaces %s in every synthetic image (declared by: %s)", run.experiment,
                 cfg.sensitive_attribute, ", ".join(s.name for s in sites.values() if s.sensitive_attribute) or
                 "the run's settings")
    if cfg.secure_aggregation and not 3 <= len(sites) <= P.SECURE_SUM_MAX_SITES:
        raise RunFailed(f"secure aggregation needs 3 to {P.SECURE_SUM_MAX_SITES} sites (SecAgg+ shares each site's masks "
                        f"among the others), {len(sites)} are connected; connect more sites or set "
                        "secure-aggregation = false")
    log.info("run %s%s: %d site(s) (%s); images %dx%dx%d, %d classes; mode %s, epsilon %s per site",
             run.experiment, " (resumed)" if run.resumed else "", len(sites), ", ".join(s.name for s in sites.values()),
             *schema.image_shape, len(schema.classes), cfg.mode, cfg.epsilon)
    test = load_test_data(cfg, schema)  # checked before any site spends anything
    try:  # so is the learner: a user's own must fit the sites' images
        check_learner(cfg.learner, schema.image_shape, len(schema.classes))
    except ValueError as err:
        raise RunFailed(str(err)) from None
    check_audit_size(cfg, schema, sites)  # an audit no site would pull fails now, not after the rounds
    synth, history, sampling = MODE_MODULES[cfg.mode].collect_and_synthesize(grid, cfg, run, sites, schema, device)
    synth_info = {**save_synthetic(synth, run.out_dir), "made": sampling}
    model, utility = learn_and_test(cfg, run, synth, test, device)
    with run.timed("site_evaluation"):
        fed_eval = federated_evaluate(grid, cfg, run, sites, model, schema) if cfg.site_evaluation else {}
    with run.timed("site_audits"):
        audits = request_site_audits(grid, cfg, run, sites, synth) if cfg.site_audits else {}
    run.timings["total"] = time.perf_counter() - start
    report = build_report(cfg, run, sites, history, utility, fed_eval, audits, synth_info, device)
    report["settings_chosen"] = [{"setting": c.setting, "value": c.value, "reason": c.reason} for c in chosen]
    write_report(report, run.out_dir)
    log.info("wrote %s", run.out_dir / "report.json")
    return report


@app.main()
def main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per Grid poll otherwise
    run_coordinator(grid, context)
