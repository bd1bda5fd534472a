"""A run's id (every request's ``experiment``): what a site accepts as one.

A site keeps a run's plan, census, saved replies and D's states in a folder named after the id, and keys its
ledger entries by it. So the id must be usable as a file name just as it is sent. Rewriting other ids into
that form would let two ids the coordinator keeps apart (``a/b`` and ``a_b``, or two long ids that differ
after a cut) share one folder: the second run would silently get the first one's saved replies back. A site
refuses such ids instead (``client.requests.run_dir``), and the run config refuses them first. For the same
reason a site refuses an id that differs from one of its kept runs' only in case (``client.requests.has_case_twin``):
a file system that ignores case would give both one folder.
"""

from __future__ import annotations

MAX_EXPERIMENT_ID = 80  # characters
EXPERIMENT_ID_CHARS = "letters, digits, '-', '_' and '.'"


def experiment_id_problem(experiment: str) -> str | None:
    """Why ``experiment`` cannot name a run, or None when it can: 1..MAX_EXPERIMENT_ID ASCII letters, digits,
    '-', '_' or '.', not starting with '.' or '-', not ending with '.', no Windows device name before its first '.'."""
    if not experiment:
        return "the experiment id is empty"
    if len(experiment) > MAX_EXPERIMENT_ID:
        return f"the experiment id is {len(experiment)} characters long; at most {MAX_EXPERIMENT_ID} are allowed"
    if experiment[0] in ".-" or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in experiment):
        return (f"the experiment id {experiment!r} may hold only {EXPERIMENT_ID_CHARS}, and must not start "
                "with '.' or '-' (a site names a folder after it, which an operator's shell would read as an option)")
    if experiment.endswith(".") or experiment.split(".")[0].upper() in _WINDOWS_DEVICES:
        # Windows drops a folder name's trailing dots ('run-1.' is the folder of 'run-1') and opens a device for
        # CON, NUL, COM1, ... whatever follows the dot: two ids, one folder (review s63)
        return (f"the experiment id {experiment!r} must not end with '.' or be a Windows device name (CON, NUL, "
                "COM1, ...): a site on Windows would give it another id's folder")
    return None


_WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)),
                              *(f"LPT{i}" for i in range(10))})
