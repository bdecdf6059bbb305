"""``stagemesh health ADDRESS``: exit 0 when the stage there is SERVING."""

from __future__ import annotations

import argparse
import asyncio

from services.cli.common import add_credential_arguments, install_credentials


def cmd_health(args: argparse.Namespace) -> int:
    """One grpc.health.v1 check: a probe for container runtimes that ship no
    grpc_health_probe."""
    from services.clients import health_status

    install_credentials(args)
    status = asyncio.run(health_status(args.address, args.service, timeout=args.timeout))
    print(status)
    return 0 if status == "SERVING" else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``health`` and its flags."""
    probe = sub.add_parser("health", help="check one stage's gRPC health (exit 0 when SERVING)")
    probe.add_argument(
        "address", nargs="?", default="127.0.0.1:50051", help="host:port of the stage"
    )
    probe.add_argument("--service", default="", help="health service name ('' is the whole stage)")
    probe.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    add_credential_arguments(probe)
    probe.set_defaults(func=cmd_health)
