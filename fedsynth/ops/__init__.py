"""Operator commands and the processes they run: a site, the coordinator, a run, a site's ledger.

One concept per module: ``fields`` (YAML settings), ``tls`` (certificates and keys), ``processes``
(Flower child processes), ``approved_code`` (which app bundles a site runs), ``supernode_guard`` and
``superlink_guard`` (the wrappers that enforce it and keep the Control API local), ``node_folder`` (a SuperNode's own
files in a shared state folder, and their lock), ``site_config`` (site.yaml), ``site_cmd``,
``ledger_cmd``, ``coordinator_cmd``, ``run_cmd``; ``commands`` registers them on the CLI.
"""
