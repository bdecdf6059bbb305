"""``stagemesh status``: the members registered in etcd, with their health and load."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from services.cli.common import add_credential_arguments, install_credentials
from services.config import parse_endpoints

if TYPE_CHECKING:
    from services.pb import common_pb2

#: The table's columns.
HEADER = ("ROLE", "INSTANCE", "ADDRESS", "HEALTH", "MODELS", "LOAD")


async def load_of(member: common_pb2.Member) -> str:
    """A member's load in a few words: blocks and hits for a KV store, queue and cache
    for an engine, nothing for the rest; ``?`` when it does not answer."""
    from services.clients import EngineClient, KvStoreClient
    from services.membership import role_name
    from services.pb import common_pb2

    try:
        if member.role == common_pb2.ROLE_KVSTORE:
            async with KvStoreClient(member.grpc_address, timeout=2.0) as store:
                stats = await store.stats()
            looked_up = stats.hit_blocks + stats.miss_blocks
            return (
                f"blocks {stats.used_blocks}/{stats.capacity_blocks} "
                f"hit {stats.hit_blocks / looked_up if looked_up else 0:.0%} "
                f"evicted {stats.evictions}"
            )
        if member.role not in (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE):
            return ""
        async with EngineClient(member.grpc_address, role=role_name(member.role)) as client:
            load = await client.load(timeout=2.0)
    except Exception:  # noqa: BLE001 - shown as unknown, the health column says why
        return "?"
    return (
        f"run {load.running_requests} wait {load.waiting_requests} "
        f"kv {load.kv_cache_usage:.0%} hit {load.prefix_cache_hit_rate:.0%}"
    )


async def sealed_members(etcd: str) -> list[common_pb2.Member]:
    """The member records a holder of this mesh's key wrote (status calls each member with
    the stage token); the others are named on stderr and left out."""
    from services.etcd import EtcdSession
    from services.membership import MEMBERS_PREFIX, RecordReader
    from services.pb import common_pb2

    session = EtcdSession(parse_endpoints(etcd))
    try:
        listing = await (await session.client()).get_prefix(MEMBERS_PREFIX.encode())
    finally:
        await session.close()
    reader = RecordReader(common_pb2.Member.FromString)
    members = sorted(reader.read_all(listing).values(), key=lambda m: (m.role, m.grpc_address))
    if reader.refused:
        print(
            f"stagemesh status: ignored {len(reader.refused)} member record(s) not sealed with "
            f"this mesh's key ({', '.join(sorted(set(reader.refused.values())))}); a mesh with "
            "a key needs --mesh-key-file or STAGEMESH_MESH_KEY",
            file=sys.stderr,
        )
    return members


async def collect(etcd: str) -> list[tuple[str, ...]]:
    """One row per member: role, id, address, health, models (adapters as ``+name``), load."""
    from services.clients import health_status
    from services.membership import role_name

    members = await sealed_members(etcd)
    health = await asyncio.gather(*(health_status(m.grpc_address) for m in members))
    loads = await asyncio.gather(*(load_of(m) for m in members))
    return [
        (
            role_name(m.role),
            m.instance_id,
            m.grpc_address,
            status,
            ",".join([*m.models, *(f"+{a.name}" for a in m.adapters)]),
            load,
        )
        for m, status, load in zip(members, health, loads)
    ]


def cmd_status(args: argparse.Namespace) -> int:
    """Print the members as a table; an etcd that cannot be read is one line and exit 1."""
    import aetcd.exceptions

    install_credentials(args)
    try:
        rows = asyncio.run(collect(args.etcd))
    except (aetcd.exceptions.ClientError, TimeoutError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "no answer"
        print(
            f"stagemesh status: etcd at {args.etcd} is unreachable or refused "
            f"({type(exc).__name__}: {reason}); an etcd with TLS needs --tls-cert, --tls-key "
            "and --tls-ca, one with users (stagemesh up) --etcd-user and --etcd-password-file",
            file=sys.stderr,
        )
        return 1
    widths = [max(len(str(row[i])) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    for row in [HEADER, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` and its flags."""
    status = sub.add_parser("status", help="members registered in etcd, with health")
    status.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints")
    add_credential_arguments(status)
    status.set_defaults(func=cmd_status)
