"""Addresses and ports: the little network knowledge every stage and harness shares.

Kept apart from the etcd client and the launcher so a light stage that needs only a
free port (the KV store's NIXL listener) imports nothing else.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence
from pathlib import Path

#: Lowest port :func:`free_port` picks.
_LOWEST_PICKED_PORT = 10_000


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports it assigns to sockets that bind or connect without one."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, for a process that binds it later.

    It is picked below the kernel's ephemeral range. The kernel hands out ports in that
    range to every socket that binds or connects without naming one (UCX, ZMQ, gRPC
    clients), so a port chosen there can be taken before its owner binds it: an
    engine's NIXL side channel is chosen at start and bound a minute later, and once
    lost that race to another engine's socket. Outside the range only another
    explicit pick can collide.
    """
    low, _ = ephemeral_ports()
    for _ in range(100 if low > _LOWEST_PICKED_PORT + 1 else 0):
        port = random.randrange(_LOWEST_PICKED_PORT, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))  # nothing free below the range: an ephemeral port after all
        return int(sock.getsockname()[1])


def route_source(endpoints: Sequence[tuple[str, int]]) -> str:
    """The local address the kernel would use to reach the first resolvable endpoint.

    Connecting a UDP socket sends nothing: it only selects the route and source address.
    """
    problems = []
    for host, port in endpoints:
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_DGRAM
            )[0]
            with socket.socket(family, kind, proto) as probe:
                probe.connect(address)
                return str(probe.getsockname()[0])
        except OSError as exc:
            problems.append(f"{host}:{port}: {exc}")
    raise SystemExit(
        "cannot find this host's address on the route to etcd ("
        + "; ".join(problems)
        + "); set --advertise-host (STAGEMESH_ADVERTISE_HOST) to an address peers can reach"
    )
