"""Settings of the KV store stage."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from services.config import NixlStageConfig, setting
from services.kv.shards import DEFAULT_VNODES


@dataclasses.dataclass
class KvStoreConfig(NixlStageConfig):
    """stagemesh KV store stage: shared KV blocks in host memory and on disk, over NIXL."""

    port: int = setting(50050, "gRPC port (0 picks a free one)")
    capacity_mib: int = setting(1024, "MiB of host memory for KV blocks (registered with NIXL)")
    pin_seconds: float = setting(
        10.0, "seconds a Lookup's hits stay pinned when the reader never releases them"
    )
    reservation_seconds: float = setting(
        30.0, "seconds a writer has between Reserve and Commit before its slots are taken back"
    )
    commit_wait_seconds: float = setting(
        2.0,
        "seconds a Commit waits for the writer's NIXL notification that its write landed; "
        "without one the reservation is refused and freed",
    )
    vnodes: int = setting(DEFAULT_VNODES, "points of this store on the shard ring")
    kv_event_window: int = setting(10_000, "KV events kept for subscribers that reconnect")
    disk_dir: str = setting(
        "",
        "directory of the disk tier: blocks are written behind the memory pool and read back "
        "on a miss, and survive a restart (it must exist; one store per directory). "
        "Empty: memory only",
    )
    disk_gib: float = setting(16.0, "GiB of --disk-dir the disk tier may fill")
    session_retention: float = setting(
        3600.0,
        "seconds after an agent session was last seen (session_id on Lookup/Reserve) during "
        "which its blocks are evicted from disk only when nothing else is left",
    )

    ROLE: ClassVar[str] = "kvstore"
