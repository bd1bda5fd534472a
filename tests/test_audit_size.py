"""The coordinator refuses, before any site spends anything, an audit query no guarded site would pull."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from common import protocol as P
from common.config import RunConfig
from server import site_audits
from server.site_audits import check_audit_size
from server.sites import RunFailed, Schema, SiteRecord
from fedsynth.ops import supernode_guard

SITES = {1: SiteRecord(1, "a", audits=True), 2: SiteRecord(2, "b")}


def test_the_guard_and_the_coordinator_read_one_limit():
    assert supernode_guard.MAX_MESSAGE_BYTES == P.MAX_MESSAGE_BYTES == 2**30


def test_an_audit_too_large_to_pull_fails_the_run_at_its_start_with_the_fix():
    cfg = RunConfig(site_audits=True, audit_records=2000, synthetic_size=10_000)
    check_audit_size(cfg, Schema(3, 128, 128, ("a", "b")), SITES)  # 393 MB: fits
    with pytest.raises(RunFailed, match=r"set audit-records to at most 1,933 \(or site-audits = false\)"):
        check_audit_size(cfg, Schema(3, 215, 215, ("a", "b")), SITES)  # 2,000 x 554,700 bytes > 1 GiB
    check_audit_size(RunConfig(site_audits=True, audit_records=1933), Schema(3, 215, 215, ("a", "b")), SITES)
    with pytest.raises(RunFailed):  # a synthetic-size left to the rules (0) bounds nothing
        check_audit_size(RunConfig(site_audits=True, audit_records=1934), Schema(3, 215, 215, ("a", "b")), SITES)
    check_audit_size(RunConfig(site_audits=True, audit_records=2000), Schema(3, 211, 211, ("a", "b")), SITES)
    with pytest.raises(RunFailed):
        check_audit_size(RunConfig(site_audits=True, audit_records=2000), Schema(3, 212, 212, ("a", "b")), SITES)
    # no audit asked, or no site allows one: nothing to check
    check_audit_size(RunConfig(site_audits=False, audit_records=2000), Schema(3, 215, 215, ("a", "b")), SITES)
    check_audit_size(cfg, Schema(3, 215, 215, ("a", "b")), {2: SiteRecord(2, "b")})
    # a synthetic set smaller than audit-records is sent whole
    check_audit_size(RunConfig(site_audits=True, audit_records=2000, synthetic_size=1000),
                     Schema(3, 215, 215, ("a", "b")), SITES)


def test_the_largest_audit_allowed_fits_the_limit_as_sent(monkeypatch):
    """The check's slack covers what an audit request carries beyond its images (the limit scaled down to a few MB,
    so that the largest audit it allows can be built and measured as Flower stores it)."""
    monkeypatch.setattr(P, "MAX_MESSAGE_BYTES", 3 * 2**20)
    schema = Schema(1, 28, 28, ("a", "b"))
    fits = (P.MAX_MESSAGE_BYTES - site_audits.AUDIT_MESSAGE_SLACK) // (4 * 28 * 28)
    cfg = RunConfig(site_audits=True, audit_records=fits, synthetic_size=10_000)
    check_audit_size(cfg, schema, SITES)
    with pytest.raises(RunFailed):
        check_audit_size(RunConfig(site_audits=True, audit_records=fits + 1, synthetic_size=10_000), schema, SITES)
    images = np.random.rand(fits, 1, 28, 28).astype(np.float32)
    request = P.AuditRequest(experiment="e" * 64, synthetic={"images": images})
    stored = sum(len(obj.deflate()) for obj in get_all_nested_objects(request.to_record()).values())
    assert stored <= P.MAX_MESSAGE_BYTES - site_audits.AUDIT_MESSAGE_SLACK + 4096
