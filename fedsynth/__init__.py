"""fedsynth: federated synthetic data with differential privacy (see README.md's map).

Flower sends usage telemetry (event type, platform, CPU count, a machine id) to telemetry.flower.ai unless
``FLWR_TELEMETRY_ENABLED=0``; a site's machine facts are not its operator's to give away by default, so every
fedsynth entry point turns it off before Flower is imported (an operator may still set it to 1 explicitly). Flower
reads the variable once, at import: the processes fedsynth starts get it through ``fedsynth.ops.processes``.
Flower's daily update check is a second call home (flwr, Python, OS and kernel versions, the process name and the
machine's address, to api.flower.ai, from every SuperNode, SuperExec and SuperLink): off the same way unless
``FLWR_DISABLE_UPDATE_CHECK`` is set otherwise (review s58).
"""

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
