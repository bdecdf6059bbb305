"""The KV store stage on its own: a real store process, real etcd, real NIXL transfers
from this test process's own agent (host memory, no torch), real gRPC over loopback.

The engine side (the vLLM connector) is tested with real engines in test_kvstore_engines.py.
"""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from kvstore_svc.blocks import BlockTable, LayoutMismatch, NotWritten
from kvstore_svc.loads import LoadMeter
from router_svc.workers import Workers
from services import credentials
from services.clients import channel
from services.credentials import MeshCredentials
from services.etcd import EtcdSession
from services.kv.hashing import from_wire, to_wire
from services.kv.nixl import transfer
from services.kv.shards import SHARDS_PREFIX, ShardMap, ring_points
from services.kv.store_link import StoreLink, Target, remote_regions
from services.membership import RecordReader
from services.operator.certs import make_certs
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from tests.support.kvstore import BLOCK, LAYOUT, Client, member
from tests.support.polling import eventually
from tests.support.stages import kvstore_process, private_etcd, running

CAPACITY_BLOCKS = 16


# -- the bookkeeping alone (no I/O) ----------------------------------------------------


def test_table_serves_only_committed_blocks_and_grants_each_block_once() -> None:
    stored: list[tuple[str, int]] = []
    table = BlockTable(4 * 100, on_stored=stored.extend)
    first, granted = table.reserve("m", [1, 2, 3], 100, ttl=30, now=0)
    assert [h for h, _ in granted] == [1, 2, 3]
    assert table.lookup("m", [1, 2, 3], 10, now=0) == ([], "")  # written, not committed
    _, again = table.reserve("m", [1, 2, 3, 4], 100, ttl=30, now=0)
    assert [h for h, _ in again] == [4]  # 1-3 are someone else's write
    table.written(first)
    assert table.commit(first, [1, 2]) == 2  # 3 was not written after all
    hits, pin = table.lookup("m", [1, 2, 3], 10, now=0)
    assert [h for h, _ in hits] == [1, 2] and pin
    assert table.lookup("other-model", [1, 2], 10, now=0) == ([], "")
    assert stored == [("m", 1), ("m", 2)]
    with pytest.raises(KeyError):
        table.commit(first)
    with pytest.raises(LayoutMismatch):
        table.reserve("m", [9], 200, ttl=30, now=0)


def test_table_evicts_least_recently_used_and_never_a_pinned_block() -> None:
    removed: list[int] = []
    table = BlockTable(3 * 10, on_removed=lambda keys: removed.extend(h for _, h in keys))
    for h in (1, 2, 3):  # three chains of one block each
        rid, _ = table.reserve("m", [h], 10, ttl=30, now=0)
        table.written(rid)
        table.commit(rid)
    _, pin = table.lookup("m", [1], 10, now=0)  # 1 is now the most recent, and pinned
    rid, granted = table.reserve("m", [4], 10, ttl=30, now=0)
    assert removed == [2] and len(granted) == 1
    table.written(rid)
    table.commit(rid)
    table.release(pin)
    rid, _ = table.reserve("m", [5], 10, ttl=30, now=0)
    assert removed == [2, 3]
    # Everything pinned or being written: nothing is granted, nothing is overwritten.
    _, pin = table.lookup("m", [1], 10, now=0)
    table.lookup("m", [4], 10, now=0)
    assert table.reserve("m", [6], 10, ttl=30, now=0) == ("", [])
    table.expire(now=11)  # pins ran out
    assert table.snapshot().pinned_blocks == 0


def test_table_takes_back_an_abandoned_reservation() -> None:
    table = BlockTable(2 * 10)
    rid, _ = table.reserve("m", [1, 2], 10, ttl=5, now=0)
    table.expire(now=6)
    with pytest.raises(KeyError):
        table.commit(rid)
    _, granted = table.reserve("m", [1, 2], 10, ttl=5, now=6)
    assert len(granted) == 2


def test_table_refuses_a_commit_whose_write_it_never_saw() -> None:
    table = BlockTable(2 * 10)
    rid, _ = table.reserve("m", [1, 2], 10, ttl=30, now=0)
    table.written("someone-else's-reservation")
    with pytest.raises(NotWritten):
        table.commit(rid)
    assert table.lookup("m", [1], 10, now=0) == ([], "")
    with pytest.raises(KeyError):  # refused means freed: the slots are granted again
        table.commit(rid)
    assert len(table.reserve("m", [1, 2], 10, ttl=30, now=0)[1]) == 2


def test_shard_map_is_consistent_hashing() -> None:
    entries = [
        kvstore_pb2.ShardEntry(
            instance_id=f"s{i}", grpc_address=f"h:{i}", ring_points=ring_points(f"s{i}")
        )
        for i in range(3)
    ]
    three = ShardMap(entries)
    two = ShardMap(entries[:2])
    hashes = list(np.random.default_rng(0).integers(0, 2**63, size=3000, dtype=np.int64))
    owners3 = [three.owner(int(h)) for h in hashes]
    owners2 = [two.owner(int(h)) for h in hashes]
    share = {s: owners3.count(s) / len(hashes) for s in ("s0", "s1", "s2")}
    assert all(0.2 < v < 0.47 for v in share.values()), share
    # Removing s2 moves only s2's blocks.
    assert all(o2 == o3 for o2, o3 in zip(owners2, owners3) if o3 != "s2")
    assert set(three.split([int(h) for h in hashes[:50]])) <= {"h:0", "h:1", "h:2"}
    assert pickle.loads(pickle.dumps(three)).owner(12345) == three.owner(12345)
    with pytest.raises(LookupError):
        ShardMap().owner(1)


# -- a real store process --------------------------------------------------------------


@pytest.fixture(scope="module")
def store_etcd() -> Iterator[EmbeddedEtcd]:
    """An etcd of the module's own, so the session's router never sees this store."""
    with private_etcd() as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store(
    store_etcd: EmbeddedEtcd, home: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StageProcess]:
    stage = kvstore_process(
        store_etcd.endpoint,
        home,
        tmp_path_factory.mktemp("kvstore-logs"),
        CAPACITY_BLOCKS * BLOCK >> 20,
    )
    async with running(stage):
        yield stage


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shards(store: StageProcess, store_etcd: EmbeddedEtcd) -> ShardMap:
    """The shard map as the store published it in etcd."""
    session = EtcdSession([("127.0.0.1", store_etcd.client_port)])
    try:
        client = await session.client()
        listing = await client.get_prefix(SHARDS_PREFIX.encode())
        entries = list(RecordReader(kvstore_pb2.ShardEntry.FromString).read_all(listing).values())
    finally:
        await session.close()
    assert len(entries) == 1 and entries[0].grpc_address == store.grpc_address
    assert len(entries[0].ring_points) == 64 and entries[0].nixl_address
    return ShardMap(entries)


@pytest.fixture
def evict_all(store: StageProcess) -> Iterator[None]:
    yield
    with grpc.insecure_channel(store.grpc_address) as chan:
        kvstore_pb2_grpc.KvStoreServiceStub(chan).Evict(
            kvstore_pb2.EvictRequest(all=True), timeout=5, metadata=member()
        )


def stats(link: StoreLink, address: str) -> kvstore_pb2.Stats:
    return link.stub(address).GetStats(kvstore_pb2.StatsRequest(), timeout=5, metadata=member())


@pytest.mark.asyncio(loop_scope="session")
async def test_blocks_round_trip_over_nixl(
    shards: ShardMap, store: StageProcess, evict_all: None
) -> None:
    writer, reader = Client("writer", 4), Client("reader", 4)
    try:
        for i in range(4):
            writer.fill(i, 10 + i)
        hashes = [101, 102, 103, 104]
        assert writer.store(shards, hashes) == 4
        prefix = reader.link.lookup(shards, LAYOUT, [101, 102, 999, 104])
        assert [h.chain_hash for h in prefix.hits] == [101, 102]  # a prefix: stops at the miss
        assert reader.link.read(prefix.hits, [reader.regions(0), reader.regions(1)]) == 2 * BLOCK
        reader.link.release(prefix)
        assert np.array_equal(reader.block(0), writer.block(0))
        assert np.array_equal(reader.block(1), writer.block(1))
        assert stats(reader.link, store.grpc_address).pinned_blocks == 0
    finally:
        writer.close()
        reader.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_full_store_evicts_least_recently_used(
    shards: ShardMap, store: StageProcess, evict_all: None
) -> None:
    client = Client("filler", CAPACITY_BLOCKS + 4)
    events: list[common_pb2.KvEvent] = []
    try:
        async with channel(store.grpc_address) as chan:
            stub = kvstore_pb2_grpc.KvStoreServiceStub(chan)
            start = await stub.GetKvSnapshot(common_pb2.KvSnapshotRequest())
            stream = stub.StreamKvEvents(
                common_pb2.KvEventsRequest(epoch=start.epoch, after_sequence=start.sequence)
            )
            hashes = list(range(1000, 1000 + CAPACITY_BLOCKS))
            for i in range(CAPACITY_BLOCKS + 4):
                client.fill(i, i)
            assert client.store(shards, hashes) == CAPACITY_BLOCKS
            # Touch the first four: they become the most recently used.
            touched = client.link.lookup(shards, LAYOUT, hashes[:4])
            client.link.release(touched)
            extra = list(range(5000, 5004))
            assert client.store(shards, extra, first_index=CAPACITY_BLOCKS) == 4
            removed: set[int] = set()
            stored: set[int] = set()
            async for reply in stream:
                assert not reply.resync_required
                for event in reply.events:
                    if event.HasField("block_removed"):
                        removed |= {
                            int.from_bytes(h, "little") for h in event.block_removed.block_hashes
                        }
                    if event.HasField("block_stored"):
                        stored |= {from_wire(name) for name in event.block_stored.chain_names}
                    events.append(event)
                if len(removed) >= 4:
                    break
            stream.cancel()
        # The chain's blocks were used least recently, deepest first; the touched head stays.
        assert removed == set(hashes[12:16]), "the least recently used blocks go first"
        assert stored >= set(hashes) | set(extra)
        survivors = client.link.lookup(shards, LAYOUT, hashes[:4])
        assert len(survivors.hits) == 4
        client.link.release(survivors)
        # An evicted block's slot now holds another block's bytes; reading what is
        # stored still gives each block its own bytes back.
        back = client.link.lookup(shards, LAYOUT, extra)
        client.link.read(back.hits, [client.regions(i) for i in range(4)])
        client.link.release(back)
        for i in range(4):
            assert np.all(client.block(i) == CAPACITY_BLOCKS + i)
        assert stats(client.link, store.grpc_address).evictions >= 4
    finally:
        client.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_concurrent_writers_of_the_same_blocks_leave_one_intact_copy(
    shards: ShardMap, store: StageProcess, evict_all: None
) -> None:
    writers = [Client(f"racer{i}", 8) for i in range(2)]
    hashes = list(range(7000, 7008))
    for index, writer in enumerate(writers):
        for i in range(8):
            writer.fill(i, 50 + index)  # each writer's copy is recognisable
    results: list[int] = [0, 0]
    barrier = threading.Barrier(2)

    def race(index: int) -> None:
        barrier.wait()
        results[index] = writers[index].store(shards, hashes)

    try:
        await asyncio.gather(*(asyncio.to_thread(race, i) for i in range(2)))
        assert sum(results) == 8, f"each block granted to exactly one writer: {results}"
        reader = writers[0]
        prefix = reader.link.lookup(shards, LAYOUT, hashes)
        assert len(prefix.hits) == 8
        reader.memory[:] = 0
        reader.link.read(prefix.hits, [reader.regions(i) for i in range(8)])
        reader.link.release(prefix)
        for i in range(8):
            block = reader.block(i)
            assert block[0] in (50, 51) and np.all(block == block[0]), (
                "a block mixes two writers' bytes"
            )
    finally:
        for writer in writers:
            writer.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_bad_calls_get_clear_errors(store: StageProcess) -> None:

    async with channel(store.grpc_address) as chan:
        stub = kvstore_pb2_grpc.KvStoreServiceStub(chan)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Commit(kvstore_pb2.CommitRequest(reservation_id="nope"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Reserve(
                kvstore_pb2.ReserveRequest(
                    layout=LAYOUT, chain_names=[to_wire(1)], block_bytes=1 << 40
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "bytes" in (caught.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Lookup(
                kvstore_pb2.LookupRequest(layout=LAYOUT, chain_names=map(to_wire, range(9000)))
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(
            grpc.aio.AioRpcError
        ) as caught:  # a 64-bit name, as before names were 128 bits
            await stub.Lookup(
                kvstore_pb2.LookupRequest(layout=LAYOUT, chain_names=[(1).to_bytes(8, "little")])
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "16 bytes" in (caught.value.details() or "")
        assert (await stub.GetStats(kvstore_pb2.StatsRequest())).capacity_blocks >= CAPACITY_BLOCKS


@pytest.mark.asyncio(loop_scope="session")
async def test_a_commit_without_a_completed_write_is_never_served(
    shards: ShardMap, store: StageProcess, evict_all: None
) -> None:
    """Reserve + Commit alone, or a write the store was never notified of, publishes nothing."""
    client = Client("forger", 2)
    address = store.grpc_address
    try:
        client.fill(0, 7)
        stub = client.link.stub(address)
        hashes = [8101, 8102]
        bare = stub.Reserve(
            kvstore_pb2.ReserveRequest(
                layout=LAYOUT, chain_names=[to_wire(hashes[0])], block_bytes=BLOCK
            ),
            metadata=member(),
        )
        assert bare.granted
        with pytest.raises(grpc.RpcError) as caught:
            stub.Commit(
                kvstore_pb2.CommitRequest(reservation_id=bare.reservation_id), metadata=member()
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no completed NIXL write" in (caught.value.details() or "")
        # Bytes that did land, but without the writer's notice, are not proof either.
        unproven = stub.Reserve(
            kvstore_pb2.ReserveRequest(
                layout=LAYOUT, chain_names=[to_wire(hashes[1])], block_bytes=BLOCK
            ),
            metadata=member(),
        )
        target = Target.of(unproven.target)
        remote = remote_regions(target, unproven.granted[0].slot, client.regions(0))
        client.link.agent.add_remote_agent(target.agent_metadata)
        transfer(
            client.link.agent,
            "WRITE",
            [(a, n, 0) for a, n in client.regions(0)],
            remote,
            target.agent_name,
            10.0,
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Commit(
                kvstore_pb2.CommitRequest(reservation_id=unproven.reservation_id), metadata=member()
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert client.link.lookup(shards, LAYOUT, hashes).hits == []
        # The protocol's own path (write with the notice, then Commit) stores both.
        assert client.store(shards, hashes) == 2
        stored = client.link.lookup(shards, LAYOUT, hashes)
        assert len(stored.hits) == 2
        client.link.release(stored)
    finally:
        client.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_read_reported_on_release_is_a_load_the_router_sees(
    shards: ShardMap, store: StageProcess, store_etcd: EmbeddedEtcd, evict_all: None
) -> None:
    """Lookup, NIXL read, Release with the read's figures: the store counts the blocks
    and seconds in its Stats, and the router's poll turns them into a per-block time.
    A Release without a read counts nothing; figures no read gives are refused."""
    client = Client("loader", 3)
    address = store.grpc_address
    workers = Workers(
        EtcdSession([("127.0.0.1", store_etcd.client_port)]), control_timeout=5, load_interval=0.1
    )
    try:
        hashes = [8501, 8502, 8503]
        assert client.store(shards, hashes) == 3
        before = client.stats(address)
        client.link.release(client.link.lookup(shards, LAYOUT, hashes))  # nothing read
        unread = client.stats(address)
        assert (unread.load_seconds, unread.loaded_blocks) == (
            before.load_seconds,
            before.loaded_blocks,
        )
        prefix = client.link.lookup(shards, LAYOUT, hashes)
        stub = client.link.stub(address)
        for bad in (
            kvstore_pb2.ReleaseRequest(pin_id=prefix.pins[0][1], read_seconds=-1, read_blocks=1),
            kvstore_pb2.ReleaseRequest(pin_id=prefix.pins[0][1], read_blocks=4),  # 3 pinned
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Release(bad, timeout=5, metadata=member())
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        client.link.read(prefix.hits[:2], [client.regions(0), client.regions(1)], prefix)
        assert prefix.reads[address][1] == 2
        client.link.release(prefix)
        after = client.stats(address)
        assert after.loaded_blocks - before.loaded_blocks == 2
        assert after.load_seconds > before.load_seconds
        assert after.pinned_blocks == 0  # the refused Releases kept the pin; the good one freed it

        await workers.start()

        async def measured() -> dict[str, float]:
            stores = workers.stores()
            assert list(stores.values()) == [
                pytest.approx(after.load_seconds / after.loaded_blocks)
            ], stores
            return stores

        await eventually(measured, timeout=10)
    finally:
        await workers.close()
        client.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_admin_and_event_calls_need_the_stage_credential(
    shards: ShardMap, store: StageProcess, evict_all: None
) -> None:
    client = Client("keeper", 1)
    try:
        assert client.store(shards, [8301]) == 1
        async with grpc.aio.insecure_channel(store.grpc_address) as chan:  # no stage token
            stub = kvstore_pb2_grpc.KvStoreServiceStub(chan)
            for call in (
                stub.Evict(kvstore_pb2.EvictRequest(all=True)),
                stub.GetKvSnapshot(common_pb2.KvSnapshotRequest()),
                stub.Reserve(
                    kvstore_pb2.ReserveRequest(
                        layout=LAYOUT, chain_names=[to_wire(8302)], block_bytes=BLOCK
                    )
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        kept = client.link.lookup(shards, LAYOUT, [8301])
        assert len(kept.hits) == 1, "a refused Evict evicted nothing"
        client.link.release(kept)
    finally:
        client.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_store_behind_mutual_tls(home: Path, tmp_path: Path) -> None:
    """The store and its etcd over TLS: a member with the mesh's certificate finds the
    store's shard entry, writes and reads blocks; a plaintext client is refused."""
    certs = make_certs(tmp_path / "tls")
    previous = credentials.current()
    etcd = EmbeddedEtcd(client_port=0, tls=certs["etcd"])
    etcd.start()
    stage = kvstore_process(etcd.endpoint, home, tmp_path, CAPACITY_BLOCKS * BLOCK >> 20)
    stage.args += certs["kvstore"].flags()
    own = certs["client"]
    credentials.install(
        MeshCredentials.load(
            previous.mesh_key.decode(),
            tls_cert=str(own.cert),
            tls_key=str(own.key),
            tls_ca=str(own.ca),
        )
    )
    client = Client("tls-client", 1)
    try:
        async with running(stage):
            session = EtcdSession([("127.0.0.1", etcd.client_port)])
            try:
                listing = await (await session.client()).get_prefix(SHARDS_PREFIX.encode())
            finally:
                await session.close()
            shards = ShardMap(
                RecordReader(kvstore_pb2.ShardEntry.FromString).read_all(listing).values()
            )
            client.fill(0, 42)
            assert client.store(shards, [8401]) == 1
            client.memory[:] = 0
            prefix = client.link.lookup(shards, LAYOUT, [8401])
            client.link.read(prefix.hits, [client.regions(0)])
            client.link.release(prefix)
            assert np.all(client.block(0) == 42)
            async with grpc.aio.insecure_channel(stage.grpc_address) as chan:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await kvstore_pb2_grpc.KvStoreServiceStub(chan).GetStats(
                        kvstore_pb2.StatsRequest(), timeout=5, metadata=member()
                    )
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        credentials.install(previous)
        etcd.stop()


@pytest.mark.unit
def test_load_meter_forgets_lookups_released_expired_or_past_its_bound() -> None:
    """A lookup's time waits for its Release, never longer than its pin, and at most
    ``capacity`` of them wait at once: the meter cannot grow without bound."""
    meter = LoadMeter(capacity=2)
    meter.looked_up("a", 0.5, 4, expires_at=10)
    meter.looked_up("", 0.1, 0, expires_at=10)  # no hits, no pin: nothing to remember
    meter.looked_up("b", 0.25, 4, expires_at=20)
    meter.released("a", 1.5, 4)
    assert (meter.load_seconds, meter.loaded_blocks, len(meter)) == (2.0, 4, 1)
    meter.looked_up("c", 1.0, 4, expires_at=30)
    meter.looked_up("d", 1.0, 4, expires_at=30)  # past capacity: b, the oldest, goes
    assert len(meter) == 2
    meter.released("b", 1.0, 2)  # its lookup is forgotten: the read alone counts
    assert (meter.load_seconds, meter.loaded_blocks) == (3.0, 6)
    meter.expire(now=30)
    assert len(meter) == 0
    with pytest.raises(ValueError):
        meter.released("c", float("nan"), 1)


def test_table_evicts_a_cold_chain_from_its_deepest_block() -> None:
    removed: list[int] = []
    table = BlockTable(4 * 10, on_removed=lambda keys: removed.extend(h for _, h in keys))
    rid, _ = table.reserve("m", [1, 2, 3, 4], 10, ttl=30, now=0)
    table.written(rid)
    table.commit(rid)
    rid, _ = table.reserve("m", [9], 10, ttl=30, now=0)
    assert removed == [4]
    assert [h for h, _ in table.lookup("m", [1, 2, 3, 4], 10, now=0)[0]] == [1, 2, 3]
