"""A KV store client as the tests drive one: the test process's own NIXL agent over
numpy host memory (no torch), writing and reading a real store's pool."""

from __future__ import annotations

from services import credentials
from services.etcd import EtcdSession
from services.kv.nixl import new_agent
from services.kv.shards import SHARDS_PREFIX, ShardMap
from services.kv.store_link import HostBlocks, StoreLink
from services.membership import RecordReader
from services.pb import kvstore_pb2

BLOCK = 64 * 1024  # bytes per block in the store tests
LAYOUT = "test-layout"


def member() -> tuple[tuple[str, str], ...]:
    """The stage token, for the calls these tests make on raw stubs."""
    return credentials.current().call_metadata


class Client:
    """This test process as a store client: its own NIXL agent over numpy host memory."""

    def __init__(self, name: str, blocks: int, block_bytes: int = BLOCK) -> None:
        self.block_bytes = block_bytes
        self.host = HostBlocks(new_agent(name), blocks, block_bytes, pieces=2)  # like K and V
        self.memory = self.host.memory
        self.regions = self.host.regions
        self.block = self.host.block
        self.link = StoreLink(self.host.agent)

    def fill(self, index: int, value: int) -> None:
        self.block(index)[:] = value

    def store(self, shards: ShardMap, hashes: list[int], first_index: int = 0) -> int:
        return self.link.store(
            shards, LAYOUT, hashes, self.block_bytes, lambda i: self.regions(first_index + i)
        )

    def stats(self, address: str) -> kvstore_pb2.Stats:
        return self.link.stub(address).GetStats(
            kvstore_pb2.StatsRequest(), timeout=5, metadata=member()
        )

    def close(self) -> None:
        self.link.close()
        self.host.close()


async def shard_entries(etcd_port: int, address: str = "") -> list[kvstore_pb2.ShardEntry]:
    """The shard entries the stores behind this etcd published (of the store at
    ``address`` only, when given: a killed store's entry outlives it by a lease)."""
    session = EtcdSession([("127.0.0.1", etcd_port)])
    try:
        listing = await (await session.client()).get_prefix(SHARDS_PREFIX.encode())
    finally:
        await session.close()
    entries = RecordReader(kvstore_pb2.ShardEntry.FromString).read_all(listing).values()
    return [e for e in entries if not address or e.grpc_address == address]


async def shard_map(etcd_port: int, address: str = "") -> ShardMap:
    """The shard map as the stores behind this etcd published it (see shard_entries)."""
    return ShardMap(await shard_entries(etcd_port, address))
