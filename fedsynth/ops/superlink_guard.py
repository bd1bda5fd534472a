"""A Flower SuperLink whose Control API answers only where its operator says:
``python -m fedsynth.ops.superlink_guard ALLOWED ARGS`` (ALLOWED: comma-separated client addresses).

In Flower 1.41 the Fleet API (SuperNodes), the Control API (`flwr run`, `flwr ls`, `flwr supernode
register`) and the Runtime API (the ServerApp process) are served by one HTTP server on one port, and
the Control API has no login: anyone who reaches the port could submit runs -- i.e. choose the code
the sites would be asked to run -- or register SuperNode keys. This wrapper adds one ASGI middleware to
the SuperLink's app (through Flower's middleware hook, ``flwr.superlink.extensions.get_middleware``):
every request whose path is not the Fleet API (``/v1/fleet/``) or the health check is refused with
403 unless it comes from an allowed address. Sites keep reaching the Fleet API from anywhere.
"""

from __future__ import annotations

import json
import os
import sys

OPEN_PREFIXES = ("/v1/fleet/", "/health")


class ControlGuard:
    """ASGI middleware: only the Fleet API and the health check are open to every address."""

    def __init__(self, app, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http" and not str(scope.get("path", "")).startswith(OPEN_PREFIXES):
            client = (scope.get("client") or ("", 0))[0]
            if client not in self.allowed:
                body = json.dumps({"detail": f"the Control and Runtime APIs of this SuperLink answer only its "
                                             f"operator's addresses; {client} is not one of them"}).encode()
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def install(allowed: frozenset[str]) -> None:
    from flwr.superlink import extensions
    from starlette.middleware import Middleware

    original = extensions.get_middleware

    def with_guard():
        return (Middleware(ControlGuard, allowed=allowed), *original())

    extensions.get_middleware = with_guard


# Flower 1.41 starts its older gRPC Control and Fleet APIs when these are "1"; they listen on their own ports and
# answer without this guard's address check (review s58).
LEGACY_GRPC_SWITCHES = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def legacy_grpc_apis(env) -> list[str]:
    """The switches in ``env`` that would start an API this guard does not cover."""
    return [name for name in LEGACY_GRPC_SWITCHES if env.get(name) == "1"]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.exit("usage: python -m fedsynth.ops.superlink_guard ALLOWED_ADDRESSES [flower-superlink arguments]")
    allowed = frozenset(a.strip() for a in argv[0].split(",") if a.strip())
    if legacy := legacy_grpc_apis(os.environ):
        sys.exit(f"fedsynth: refusing to start the SuperLink with {', '.join(legacy)} set: it starts Flower's older "
                 "gRPC API on its own port, without the address check this guard adds to the HTTP one (anyone who "
                 "reaches it could submit runs and register keys); unset it")
    install(allowed)
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *argv[1:]]
    print(f"fedsynth: the Control API answers only {', '.join(sorted(allowed))}", flush=True)
    flower_superlink()


if __name__ == "__main__":
    main()
