"""The KV store's disk tier: real store processes with ``--disk-dir``, real etcd, real
NIXL (the store's POSIX backend to its files, UCX between this process and the pool),
real files. No engine: what is tested is the store (an engine reads the pool the same
way whichever tier a block came from; test_kvstore_engines.py shows one doing it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from kvstore_svc.disk_files import HEADER_BYTES
from kvstore_svc.sessions import SessionRetention
from services.kv.hashing import from_wire, to_wire
from services.kv.store_link import StoreError
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from tests.support.kvstore import BLOCK, LAYOUT, Client, member, shard_entries, shard_map
from tests.support.polling import eventually_sync
from tests.support.stages import kvstore_process, private_etcd, running, skip_unless_required

MEMORY_BLOCKS = 16


@pytest.fixture(scope="module")
def store_etcd() -> Iterator[EmbeddedEtcd]:
    """An etcd of the module's own, so no other test's router sees these stores."""
    with private_etcd() as server:
        yield server


def disk_store(
    etcd: EmbeddedEtcd,
    home: Path,
    log_dir: Path,
    disk_dir: Path,
    capacity_mib: int = MEMORY_BLOCKS * BLOCK >> 20,
    wrapper: tuple[str, ...] = (),
    disk_blocks: int = 0,
) -> StageProcess:
    """A store (not started) with a disk tier in ``disk_dir`` (1 GiB, or room for
    ``disk_blocks`` test blocks), run under ``wrapper``."""
    stage = kvstore_process(etcd.endpoint, home, log_dir, capacity_mib)
    gib = disk_blocks * (BLOCK + HEADER_BYTES) / (1 << 30) if disk_blocks else 1
    stage.args += ["--disk-dir", str(disk_dir), "--disk-gib", repr(gib)]
    stage.wrapper = list(wrapper)
    return stage


@pytest_asyncio.fixture(loop_scope="session")
async def client() -> AsyncIterator[Client]:
    """A client with 64 blocks, block ``i`` filled with ``i + 1``."""
    client = Client("disk-client", 64)
    for i in range(64):
        client.fill(i, i + 1)
    yield client
    client.close()


def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""

    def holds() -> None:
        assert check(), "not reached in time"

    eventually_sync(holds, timeout, interval=0.05)


def settled(client: Client, address: str) -> None:
    """Wait until no block is pinned (the store pins a block until it is on disk)."""
    until(lambda: client.stats(address).pinned_blocks == 0)


def evict(address: str, memory_only: bool) -> None:
    """Evict every block from the store (from its memory alone with ``memory_only``)."""
    with grpc.insecure_channel(address) as chan:
        kvstore_pb2_grpc.KvStoreServiceStub(chan).Evict(
            kvstore_pb2.EvictRequest(all=True, memory_only=memory_only),
            timeout=5,
            metadata=member(),
        )


def read_back(client: Client, shards: object, hashes: list[int], first: int = 32) -> int:
    """Look ``hashes`` up and read the hits into ``client``'s blocks from ``first`` on;
    the number of blocks hit."""
    prefix = client.link.lookup(shards, LAYOUT, hashes)  # type: ignore[arg-type]
    if prefix.hits:
        client.link.read(prefix.hits, [client.regions(first + i) for i in range(len(prefix.hits))])
    client.link.release(prefix)
    return len(prefix.hits)


def reaches(client: Client, shards: object, chain_hash: int) -> None:
    """Look ``chain_hash`` up through ``client``'s link; an assertion when the store is not
    reachable (yet), so :func:`eventually_sync` polls it."""
    try:
        client.link.release(client.link.lookup(shards, LAYOUT, [chain_hash]))  # type: ignore[arg-type]
    except StoreError as exc:
        raise AssertionError(str(exc)) from exc


async def snapshot_names(address: str) -> set[int]:
    """The chain hashes the store's KV snapshot names (what a router would index)."""
    async with grpc.aio.insecure_channel(address) as chan:
        snapshot = await kvstore_pb2_grpc.KvStoreServiceStub(chan).GetKvSnapshot(
            common_pb2.KvSnapshotRequest(), metadata=member()
        )
    return {from_wire(block.block_hashes[0]) for block in snapshot.blocks}


@pytest.mark.asyncio(loop_scope="session")
async def test_blocks_evicted_from_memory_come_back_from_disk_and_survive_a_restart(
    store_etcd: EmbeddedEtcd, home: Path, tmp_path: Path, client: Client
) -> None:
    """24 blocks through a 16-block pool: all reach disk, the evicted ones come back
    checked, the store still names them all; a restarted store re-publishes and serves
    them, from the same ring position."""
    disk = tmp_path / "disk"
    disk.mkdir()
    stage = disk_store(store_etcd, home, tmp_path, disk)
    chain = list(range(100, 124))  # more blocks than the memory tier holds
    async with running(stage):
        shards = await shard_map(store_etcd.client_port, stage.grpc_address)
        for start in range(0, len(chain), 8):
            settled(client, stage.grpc_address)
            assert client.store(shards, chain[start : start + 8], first_index=start) == 8
        until(lambda: client.stats(stage.grpc_address).disk_blocks == len(chain))
        assert client.stats(stage.grpc_address).used_blocks <= MEMORY_BLOCKS
        # Evicted from memory, the chain's head is read back from disk, checked.
        assert read_back(client, shards, chain[:12]) == 12
        for i in range(12):
            assert np.all(client.block(32 + i) == i + 1)
        stats = client.stats(stage.grpc_address)
        assert stats.disk_hit_blocks == 8 and stats.disk_corrupt_blocks == 0  # 8-23 in memory
        assert stats.disk_write_bytes >= len(chain) * BLOCK and stats.disk_read_seconds > 0
        # The store still names every block in its events: memory eviction is not removal.
        assert set(chain) <= await snapshot_names(stage.grpc_address)
        ring_before = [
            list(e.ring_points)
            for e in await shard_entries(store_etcd.client_port, stage.grpc_address)
        ]
    assert not list(disk.rglob("*.tmp"))
    async with running(stage):  # the same directory, a new process
        assert set(chain) <= await snapshot_names(stage.grpc_address), "not re-published"
        shards = await shard_map(store_etcd.client_port, stage.grpc_address)
        ring_after = [
            list(e.ring_points)
            for e in await shard_entries(store_etcd.client_port, stage.grpc_address)
        ]
        assert ring_after == ring_before, "a restarted store owns what its disk holds"
        for half in (0, 12):  # a lookup returns at most a pool's worth of blocks
            client.memory[32 * BLOCK :] = 0
            assert read_back(client, shards, chain[half : half + 12]) == 12
            for i in range(12):
                assert np.all(client.block(32 + i) == half + i + 1)
        evict(stage.grpc_address, memory_only=False)
        assert client.stats(stage.grpc_address).disk_blocks == 0
        assert read_back(client, shards, chain) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_corrupted_block_file_is_dropped_never_served(
    store_etcd: EmbeddedEtcd, home: Path, tmp_path: Path, client: Client
) -> None:
    """A flipped byte on disk: the chain ends before that block, which is counted,
    deleted and un-published; written again, it is served again."""
    disk = tmp_path / "disk"
    disk.mkdir()
    stage = disk_store(store_etcd, home, tmp_path, disk)
    chain = [300, 301, 302, 303]
    async with running(stage):
        shards = await shard_map(store_etcd.client_port, stage.grpc_address)
        assert client.store(shards, chain) == 4
        until(lambda: client.stats(stage.grpc_address).disk_blocks == 4)
        evict(stage.grpc_address, memory_only=True)
        damaged = next(disk.rglob(f"{to_wire(chain[2]).hex()}.blk"))
        flip_a_byte(damaged)
        assert read_back(client, shards, chain) == 2, "the chain ends before the bad block"
        stats = client.stats(stage.grpc_address)
        assert stats.disk_corrupt_blocks == 1 and stats.disk_blocks == 3
        assert 'stagemesh_kvstore_disk{figure="corrupt_blocks"} 1.0' in metrics(stage)
        until(lambda: not damaged.exists())
        assert chain[2] not in await snapshot_names(stage.grpc_address)
        # Written again (recomputed, as an engine would), it is served again.
        assert client.store(shards, chain[2:3], first_index=2) == 1
        assert read_back(client, shards, chain) == 4
        assert np.all(client.block(34) == 3)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_store_killed_mid_write_serves_its_complete_blocks_only(
    store_etcd: EmbeddedEtcd, home: Path, tmp_path: Path
) -> None:
    """Large blocks, written behind in batches; SIGKILL while a batch's files are still
    temporary. After a restart every complete file is served with its bytes, and the
    block that was being written is not served at all."""
    block = 4 << 20
    disk = tmp_path / "disk"
    disk.mkdir()
    stage = disk_store(store_etcd, home, tmp_path, disk, capacity_mib=48 * block >> 20)
    writer = Client("mid-write", 48, block)
    for i in range(48):
        writer.fill(i, i + 1)
    expected: dict[int, int] = {}  # hash -> the value its bytes hold
    partial: set[str] = set()
    try:
        for attempt in range(5):  # a kill can land just after a batch's renames: again
            hashes = list(range(500 + 100 * attempt, 548 + 100 * attempt))
            expected |= {h: i + 1 for i, h in enumerate(hashes)}
            async with running(stage):
                shards = await shard_map(store_etcd.client_port, stage.grpc_address)
                complete, partial = await asyncio.to_thread(
                    kill_mid_write, stage, writer, shards, hashes, disk
                )
            if partial:
                break
        assert partial, "the kill never landed while a block was being written"
        names = {to_wire(h).hex(): h for h in expected}
        async with running(stage):
            assert not list(disk.rglob("*.tmp"))
            shards = await shard_map(store_etcd.client_port, stage.grpc_address)
            # The writer's link saw the store die; it dials the new one within its backoff.
            eventually_sync(lambda: reaches(writer, shards, next(iter(expected))), 10)
            served = set()
            for h, value in expected.items():
                writer.memory[:block] = 0
                prefix = writer.link.lookup(shards, LAYOUT, [h])
                if prefix.hits:
                    writer.link.read(prefix.hits, [writer.regions(0)])
                    assert np.all(writer.block(0) == value)
                    served.add(h)
                writer.link.release(prefix)
            assert {names[n] for n in complete} <= served
            assert not served & {names[n] for n in partial}
    finally:
        writer.close()


def kill_mid_write(
    stage: StageProcess, writer: Client, shards: object, hashes: list[int], disk: Path
) -> tuple[set[str], set[str]]:
    """Store ``hashes`` in batches of 4 and SIGKILL the store once both complete and
    temporary files are on disk; the complete and the temporary names left."""

    def write() -> None:
        with contextlib.suppress(StoreError):  # the kill may land between two batches
            for start in range(0, len(hashes), 4):
                writer.store(shards, hashes[start : start + 4], first_index=start)  # type: ignore[arg-type]

    writing = threading.Thread(target=write)
    writing.start()

    def mid_write() -> None:  # a block file written and another still being written
        files = [p.name for p in disk.rglob("*.*") if p.suffix in (".tmp", ".blk")]
        assert any(n.endswith(".tmp") for n in files), files
        assert any(n.endswith(".blk") for n in files), files

    eventually_sync(mid_write, timeout=30, interval=0.001)
    stage.kill()
    assert stage.process is not None
    stage.process.wait(10)
    writing.join(60)
    complete = {p.stem for p in disk.rglob("*.blk")}
    return complete, {p.stem for p in disk.rglob("*.tmp")}


@pytest.mark.asyncio(loop_scope="session")
async def test_a_full_disk_stops_writes_and_reads_go_on(
    store_etcd: EmbeddedEtcd, home: Path, tmp_path: Path, client: Client
) -> None:
    """The store's disk is a 20 MiB tmpfs of its own (a mount namespace): it fills, the
    store keeps committing to memory and serving what is on disk, and writes resume once
    room is made."""
    if os.geteuid() != 0:
        skip_unless_required("mounting a tmpfs in a mount namespace needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = 'mount -t tmpfs -o size=20m tmpfs "$0" && exec "$@"'
    wrapper = ("unshare", "-m", "--propagation", "private", "sh", "-c", mount, str(disk))
    stage = disk_store(store_etcd, home, tmp_path, disk, capacity_mib=4, wrapper=wrapper)
    async with running(stage):
        shards = await shard_map(store_etcd.client_port, stage.grpc_address)
        address = stage.grpc_address
        first = list(range(1000, 1032))
        for start in range(0, len(first), 16):
            settled(client, address)
            assert client.store(shards, first[start : start + 16], first_index=start) == 16
        until(lambda: client.stats(address).disk_blocks == len(first))
        for batch in range(2000, 2400, 16):  # 25 MiB more: past the disk
            settled(client, address)
            assert client.store(shards, list(range(batch, batch + 16))) == 16
        until(lambda: client.stats(address).disk_writes_stopped)
        stats = client.stats(address)
        assert 32 < stats.disk_blocks < 330, stats
        evict(address, memory_only=True)
        assert read_back(client, shards, first) == len(first)  # reads go on
        assert np.all(client.block(32) == 1)
        assert client.store(shards, [9000, 9001]) == 2  # and memory still takes writes
        evict(address, memory_only=False)  # room again: writes resume
        until(lambda: not client.stats(address).disk_writes_stopped, timeout=15)
        assert client.store(shards, [9100]) == 1
        until(lambda: client.stats(address).disk_blocks == 1)


@pytest.mark.unit
def test_eviction_keeps_sessions_within_their_retention_idle_longest_going_first() -> None:
    """Blocks of no session go first (LRU), then those of sessions idle longest."""
    sessions = SessionRetention(retention_seconds=10)
    sessions.seen("s1", [("m", 2), ("m", 4)], now=0)
    sessions.seen("s2", [("m", 1)], now=5)
    lru = [("m", 1), ("m", 2), ("m", 3), ("m", 4)]  # 3 belongs to no session
    assert sessions.victims(lru, 1, now=6) == [("m", 3)]
    assert sessions.victims(lru, 2, now=6) == [("m", 3), ("m", 2)]  # then s1: idle longest
    assert sessions.victims(lru, 4, now=6) == [("m", 3), ("m", 2), ("m", 4), ("m", 1)]
    assert sessions.victims(lru, 2, now=12) == [("m", 2), ("m", 3)]  # s1 is past retention
    sessions.prune(now=16)  # s2 too now
    assert sessions.victims(lru, 1, now=16) == [("m", 1)]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_returning_session_finds_its_blocks_on_disk_after_others_filled_it(
    store_etcd: EmbeddedEtcd, home: Path, tmp_path: Path, client: Client
) -> None:
    """A disk of 20 blocks: a session writes 6, then 16 anonymous blocks go through.
    Plain LRU would have dropped the session's oldest; retention drops anonymous ones."""
    disk = tmp_path / "disk"
    disk.mkdir()
    stage = disk_store(store_etcd, home, tmp_path, disk, disk_blocks=20)
    session = list(range(4000, 4006))
    async with running(stage):
        shards = await shard_map(store_etcd.client_port, stage.grpc_address)
        address = stage.grpc_address
        stored = client.link.store(
            shards, LAYOUT, session, BLOCK, client.regions, session_id="agent-1"
        )
        assert stored == 6
        for start in range(4100, 4116, 8):
            settled(client, address)
            assert client.store(shards, list(range(start, start + 8)), first_index=8) == 8
        until(lambda: client.stats(address).pinned_blocks == 0)
        assert client.stats(address).disk_blocks == 20
        evict(address, memory_only=True)
        assert read_back(client, shards, session) == 6
        assert np.all(client.block(32) == 1)
        anonymous = list(range(4100, 4108))
        assert read_back(client, shards, anonymous) == 6, "anonymous blocks went first"


def metrics(stage: StageProcess) -> str:
    """The store's Prometheus page."""
    port = re.search(r"metrics on :(\d+)", stage.log_path.read_text())
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port.group(1)}/metrics") as reply:
        return str(reply.read().decode())


def flip_a_byte(path: Path) -> None:
    """Damage a block file as a failing disk would: one byte in the middle of its payload."""
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0xFF]))


def start_error(etcd: EmbeddedEtcd, home: Path, disk: Path, *wrapper: str) -> str:
    """Run a store on ``disk`` that must refuse to start; its one-line reason."""
    done = subprocess.run(
        [*wrapper, sys.executable, "-m", "kvstore_svc", "--etcd", etcd.endpoint]
        + ["--home", str(home), "--port", "0", "--disk-dir", str(disk), "--capacity-mib", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_disk_directory_the_store_cannot_use_is_a_startup_error(
    store_etcd: EmbeddedEtcd, home: Path, tmp_path: Path
) -> None:
    """Missing, taken, read-only and full directories: the store ends with one line."""
    assert "does not exist" in start_error(store_etcd, home, tmp_path / "missing")
    taken = tmp_path / "taken"
    taken.mkdir()
    async with running(disk_store(store_etcd, home, tmp_path, taken)):
        assert "used by another KV store" in start_error(store_etcd, home, taken)
    if os.geteuid() == 0:
        for options, reason in (("ro,size=20m", "not writable"), ("size=1m", "full disk")):
            mount = f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"'
            wrapper = ("unshare", "-m", "--propagation", "private", "sh", "-c", mount, str(taken))
            assert reason in start_error(store_etcd, home, taken, *wrapper)
