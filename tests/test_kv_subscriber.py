"""Applying KV events and snapshots to the router's index (pure logic; the streams
themselves are exercised against real engines in test_router and test_faults)."""

from __future__ import annotations

from router_svc.kv_index import KvIndex
from router_svc.kv_subscriber import apply_snapshot, index_event
from services.kv.hashing import chain_hashes
from services.pb import common_pb2

BLOCK = 4
IDS = list(range(12))


def record(i: int) -> common_pb2.BlockStored:
    """Block i of IDS as a snapshot record (one block each, chained by engine hash)."""
    return common_pb2.BlockStored(
        block_hashes=[f"e{i}".encode()],
        parent_block_hash=f"e{i - 1}".encode() if i else b"",
        token_ids=IDS[i * BLOCK : (i + 1) * BLOCK],
        block_size=BLOCK,
    )


def test_snapshot_rebuilds_chains_in_any_order() -> None:
    index = KvIndex()
    index.stored(
        "w", common_pb2.BlockStored(block_hashes=[b"old"], token_ids=[9, 9, 9, 9], block_size=BLOCK)
    )
    apply_snapshot(index, "w", common_pb2.KvSnapshot(blocks=[record(2), record(0), record(1)]))
    assert index.match(chain_hashes(IDS, BLOCK), ["w"]) == {"w": 3}
    assert index.blocks_of("w") == 3  # the old block went with the resync


def test_snapshot_skips_orphans() -> None:
    index = KvIndex()
    apply_snapshot(index, "w", common_pb2.KvSnapshot(blocks=[record(0), record(2)]))
    assert index.blocks_of("w") == 1


def test_events_store_remove_and_clear() -> None:
    index = KvIndex()
    for i in range(3):
        index_event(index, "w", common_pb2.KvEvent(block_stored=record(i)))
    index_event(
        index, "w", common_pb2.KvEvent(block_removed=common_pb2.BlockRemoved(block_hashes=[b"e2"]))
    )
    assert index.match(chain_hashes(IDS, BLOCK), ["w"]) == {"w": 2}
    index_event(index, "w", common_pb2.KvEvent(all_blocks_cleared=common_pb2.AllBlocksCleared()))
    assert len(index) == 0
