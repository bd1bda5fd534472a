"""The deployment commands on the `fedsynth` command line (each command's code is in its own module)."""

from __future__ import annotations


def add_subcommands(subparsers) -> None:
    """Register `site`, `ledger`, `coordinator`, `run` and `bundle-digest` on the `fedsynth` argparse subparsers."""
    from fedsynth.help import HelpFormatter
    from fedsynth.ops.coordinator_cmd import cmd_coordinator
    from fedsynth.ops.ledger_cmd import cmd_ledger
    from fedsynth.ops.run_cmd import cmd_run
    from fedsynth.ops.site_cmd import cmd_site

    p = subparsers.add_parser("site", formatter_class=HelpFormatter,
        help="validate a site's config and data, then run its Flower SuperNode",
                              description="Start a site next to its private data: validates the YAML, the "
                                          "credentials and the data, then runs flower-supernode (TLS + auth) so "
                                          "that it runs only the app bundles the site approved.")
    p.add_argument("--config", required=True, help="the site's YAML (see deploy/site.yaml)")
    p.add_argument("--check", action="store_true", help="only validate config, credentials, data and ledger; connect to nothing")
    p.add_argument("--insecure", action="store_true", help="NO TLS and NO authentication (test networks only)")
    p.add_argument("--retry-rejected", type=float, default=120.0, metavar="SECONDS",
                   help="keep retrying for this long when the coordinator refuses to activate the site (a site "
                        "restarted within a minute of a crash is refused until its old connection expires)")
    p.set_defaults(func=cmd_site)

    p = subparsers.add_parser("ledger", formatter_class=HelpFormatter,
        help="what a site has spent and has left of its privacy budget")
    p.add_argument("--config", default=None, help="a deployed site's YAML")
    p.add_argument("--state-dir", default=None, help="a folder of site state, e.g. a simulation's <out>/sites: shows "
                                                     "every ledger under it")
    p.add_argument("--json", action="store_true", help="machine-readable output (infinity as \"inf\")")
    p.set_defaults(func=cmd_ledger)

    p = subparsers.add_parser("coordinator", formatter_class=HelpFormatter,
        help="run the Flower SuperLink (TLS, SuperNode auth) and register the sites")
    p.add_argument("--config", required=True, help="the coordinator's YAML (see deploy/coordinator.yaml)")
    p.add_argument("--check", action="store_true", help="only validate certificates, keys and settings")
    p.add_argument("--insecure", action="store_true", help="NO TLS and NO authentication (test networks only)")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for the SuperLink to come up")
    p.set_defaults(func=cmd_coordinator)

    p = subparsers.add_parser("run", formatter_class=HelpFormatter,
        help="submit a synthesis run to the coordinator, follow it, collect the outputs")
    p.add_argument("--config", required=True, help="the coordinator's YAML")
    p.add_argument("--run-config", default=None,
                   help="run settings: a .toml file or \"key=value ...\" (TOML values, strings quoted); they "
                        "override the YAML's run: section")
    p.add_argument("--out", default=None, help="output folder on the coordinator host (default: out_dir of the YAML); "
                                               "rerun with the same --out to resume after a crash")
    p.add_argument("--min-sites", type=int, default=None, help="wait for this many online sites (default: all listed)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the sites before starting")
    p.add_argument("--timeout", type=float, default=0.0, help="stop the run after this many seconds (0 = no limit)")
    p.add_argument("--insecure", action="store_true", default=None,
                   help="talk to an --insecure coordinator (default: what fedsynth coordinator started)")
    p.set_defaults(func=cmd_run)

    p = subparsers.add_parser("bundle-digest", formatter_class=HelpFormatter,
        help="the digest of an app bundle, as a site checks it (default: the "
                                                    "bundle of this installation)")
    p.add_argument("fab", nargs="?", default=None, help="a .fab file (default: build this installation's bundle)")
    p.set_defaults(func=cmd_bundle_digest)


def cmd_bundle_digest(args) -> int:
    """Print a bundle's digest: what site operators list under approved_bundles after reviewing it."""
    from pathlib import Path

    from fedsynth.ops.approved_code import BundleError, bundle_digest, installed_bundle

    try:
        fab = Path(args.fab).read_bytes() if args.fab else installed_bundle()
        print(bundle_digest(fab))
    except (OSError, BundleError) as err:
        print(f"fedsynth bundle-digest: error: {err}")
        return 2
    return 0
