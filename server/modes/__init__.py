"""The synthesis modes of the coordinator; each module has ``collect_and_synthesize`` with one signature.

``collect_and_synthesize(grid, cfg, run, sites, schema, device) -> (synthetic set, per-round history, how the
set was made)``
"""
