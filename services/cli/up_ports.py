"""``stagemesh up``'s ports: one flag per port, each defaulting to the stage's own port,
``--port-offset`` to move them all, and the check that every one is free before a stage
starts."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from router_svc.config import RouterConfig
from services.cli.plan import STAGES, StagePlan
from services.config import StageConfig, default_of, parse_endpoints
from services.ports import PortClaim

#: Seconds `up` waits for ports a stopping mesh still holds.
PORT_WAIT = 15.0
#: ``up``'s etcd client port: where a stage looks for etcd unless told.
ETCD_PORT = parse_endpoints(default_of(StageConfig, "etcd"))[0][1]


def port_settings() -> dict[str, tuple[int, str]]:
    """``up``'s port settings (``http_port``, ``router_port``, ...): default and help."""
    ports = {
        "http_port": (default_of(RouterConfig, "http_port"), "OpenAI-compatible HTTP port"),
        "etcd_port": (ETCD_PORT, "the embedded etcd's client port"),
    }
    for role, config in STAGES.items():
        ports[f"{role}_port"] = (default_of(config, "port"), f"{role} gRPC port")
    return ports


def add_port_arguments(up: argparse.ArgumentParser) -> None:
    """A flag per port, then ``--port-offset``."""
    for name, (default, help) in port_settings().items():
        flag = f"--{name.replace('_', '-')}"
        up.add_argument(flag, type=int, default=default, help=f"{help} (default {default})")
    up.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="added to every port above: a second mesh beside the first (e.g. 100: HTTP on "
        "8100, etcd on 2479)",
    )


def apply_port_offset(args: argparse.Namespace) -> None:
    """Move every port of `up` by ``--port-offset``: a second mesh beside the first."""
    for name in port_settings():
        port = getattr(args, name)
        if port and args.port_offset:
            port += args.port_offset
            if not 0 < port < 65536:
                raise SystemExit(
                    f"stagemesh up: --port-offset {args.port_offset} puts "
                    f"--{name.replace('_', '-')} at {port}"
                )
            setattr(args, name, port)


def port_claims(
    args: argparse.Namespace, etcd_port: int, etcd_host: str, plans: list[StagePlan]
) -> list[PortClaim]:
    """Every port `up` binds (its etcd's client port, the router's HTTP port, each
    stage's gRPC port), with the setting that moves it."""
    return [
        PortClaim(etcd_port, "--etcd-port", "etcd", etcd_host),
        PortClaim(args.http_port, "--http-port", "router HTTP", args.host),
        *(
            PortClaim(plan.port, f"--{plan.role}-port", f"{plan.name} gRPC", args.host)
            for plan in plans
        ),
    ]


def check_ports(claims: list[PortClaim], report: Callable[[str], None]) -> None:
    """Every claimed port free, after a short wait for a mesh that is stopping; else
    :class:`StartFailed` with a line per taken port."""
    from services import ports
    from services.exits import StartFailed

    found = ports.wait_for(claims, PORT_WAIT, report)
    if found:
        raise StartFailed(
            "\nstagemesh up: ".join(
                f"{t.reason()}; stop it, or move it with {t.claim.setting} "
                "(or every port with --port-offset N)"
                for t in found
            )
        )
