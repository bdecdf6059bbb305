"""The KV store's Prometheus series: its blocks by state, the disk tier's figures, the
blocks named in calls by outcome, and what loading from it costs its readers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge

if TYPE_CHECKING:
    from kvstore_svc.blocks import BlockTable
    from kvstore_svc.disk import DiskTier

BLOCKS = Gauge("stagemesh_kvstore_blocks", "KV blocks held by the store", ["state"])
DISK = Gauge(
    "stagemesh_kvstore_disk",
    "The disk tier: blocks read back, dropped as corrupt; full",
    ["figure"],
)
CALLS = Counter(
    "stagemesh_kvstore_calls_blocks", "Blocks named in store calls, by outcome", ["outcome"]
)
LOAD_SECONDS = Counter(
    "stagemesh_kvstore_load_seconds",
    "Seconds readers' loads took (the store's Lookup, disk reads included, plus the "
    "reader's NIXL read), as reported on Release",
)
LOADED_BLOCKS = Counter(
    "stagemesh_kvstore_loaded_blocks", "Blocks readers loaded from the store (on Release)"
)


def watch(table: BlockTable, disk: DiskTier | None) -> None:
    """Read the pool's and the disk tier's gauges from them at scrape time, so a call
    never pays for a scan of the table."""
    BLOCKS.labels("committed").set_function(lambda: table.snapshot().used_blocks)
    BLOCKS.labels("pinned").set_function(lambda: table.snapshot().pinned_blocks)
    BLOCKS.labels("capacity").set_function(lambda: table.capacity)
    if disk is not None:
        BLOCKS.labels("disk").set_function(lambda: disk.blocks)
        DISK.labels("hit_blocks").set_function(lambda: disk.hit_blocks)
        DISK.labels("corrupt_blocks").set_function(lambda: disk.corrupt_blocks)
        DISK.labels("writes_stopped").set_function(lambda: disk.writes_stopped)
