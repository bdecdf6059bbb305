"""The KV store's disk tier alone: write-behind and read-back GB/s, and how fast a
restarted store serves its blocks again (issue 31's target: 95% within 10 s per 10 GB).

Starts etcd and one store with ``--disk-dir`` (no engine: the client is this process's
NIXL agent over host memory, blocks of the bundled model's size on CPU by default).
Writes ``--gib`` of blocks, waits until all are on disk, evicts the memory tier and reads
everything back (from disk); then restarts the store on the same directory and times
start to SERVING, and start to every block read back. Then a raw file write (fsynced)
and read of as many bytes in the same directory, for scale. The reads are from the page
cache unless the host's memory is smaller than the data: say so beside the numbers.

    python -m bench.kvstore_disk [--gib 2] [--disk-dir D] [--json F]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.kvstore import measure_disk
from bench.report import write_json
from services.clients import KvStoreClient
from services.config import DEFAULT_HOME
from services.kv.nixl import new_agent
from services.kv.shards import ShardMap, ring_points
from services.kv.store_link import HostBlocks, StoreLink
from services.net import free_port
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import StageProcess
from services.pb import kvstore_pb2

#: SmolLM2-135M's KV per 128-token block on CPU: 30 layers x K,V x 128 x 3 heads x 64 x 4 B.
MODEL_BLOCK_BYTES = 30 * 2 * 128 * 3 * 64 * 4


def _store(args: argparse.Namespace, etcd: EmbeddedEtcd, log_dir: Path) -> StageProcess:
    port = free_port()
    flags = ["--port", str(port), "--etcd", etcd.endpoint, "--home", str(args.home)]
    flags += ["--capacity-mib", str(args.pool_mib), "--disk-dir", args.disk_dir]
    flags += ["--disk-gib", str(args.gib * 2)]
    return StageProcess("kvstore", "kvstore_svc", flags, f"127.0.0.1:{port}", log_dir)


def _shards(address: str) -> ShardMap:
    """The one store owns everything."""
    entry = kvstore_pb2.ShardEntry(
        instance_id="s", grpc_address=address, ring_points=ring_points("s")
    )
    return ShardMap([entry])


def _read_all(host: HostBlocks, link: StoreLink, shards: ShardMap, hashes: list[int]) -> int:
    """Read every block back, as many at a time as ``host`` holds; the blocks served."""
    served = 0
    room = host.memory.nbytes // host.block_bytes
    for start in range(0, len(hashes), room):
        prefix = link.lookup(shards, "bench", hashes[start : start + room])
        link.read(prefix.hits, [host.regions(i) for i in range(len(prefix.hits))], prefix)
        link.release(prefix)
        served += len(prefix.hits)
    return served


async def _stats(address: str) -> kvstore_pb2.Stats:
    async with KvStoreClient(address) as store:
        return await store.stats()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Fill, read back, restart, read back again; the figures."""
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-bench-kvstore-disk-"))
    block = args.block_bytes
    per_lookup = max(1, (args.pool_mib << 20) // block // 2)
    blocks = int(args.gib * (1 << 30)) // block
    hashes = list(range(1, blocks + 1))
    etcd = EmbeddedEtcd(client_port=0)
    etcd.start()
    store = _store(args, etcd, log_dir)
    host = HostBlocks(new_agent("disk-bench"), per_lookup, block)
    link = StoreLink(host.agent, rpc_timeout=30, transfer_timeout=60)
    try:
        store.start()
        await store.wait_healthy(120)
        shards = _shards(store.grpc_address)
        host.memory[:] = 7
        started = time.perf_counter()
        for start in range(0, blocks, per_lookup):
            while (await _stats(store.grpc_address)).pinned_blocks:  # writes behind pending
                await asyncio.sleep(0.01)
            batch = hashes[start : start + per_lookup]
            link.store(shards, "bench", batch, block, host.regions)
        while (await _stats(store.grpc_address)).disk_blocks < blocks:
            await asyncio.sleep(0.05)
        fill_s = time.perf_counter() - started
        async with KvStoreClient(store.grpc_address) as control:
            await control.evict(memory_only=True)
        started = time.perf_counter()
        first = await asyncio.to_thread(_read_all, host, link, shards, hashes)
        read_s = time.perf_counter() - started
        stats = await _stats(store.grpc_address)
        store.stop()
        started = time.perf_counter()
        store.start()
        await store.wait_healthy(120)
        serving_s = time.perf_counter() - started
        again = await asyncio.to_thread(_read_all, host, link, shards, hashes)
        restart_s = time.perf_counter() - started
    finally:
        link.close()
        host.close()
        store.stop()
        etcd.stop()
    gb = blocks * block / 1e9
    return {
        "benchmark": "kvstore_disk",
        "block_bytes": block,
        "blocks": blocks,
        "gb": gb,
        "fill_gbps": gb / fill_s,
        "read_back_gbps": gb / read_s,
        "read_back_blocks": first,
        "restart_to_serving_s": serving_s,
        "restart_to_all_served_s": restart_s,
        "served_after_restart": again,
        **measure_disk(stats, args.disk_dir),
    }


def main() -> None:
    """``python -m bench.kvstore_disk``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="GiB of blocks to write")
    parser.add_argument("--block-bytes", type=int, default=MODEL_BLOCK_BYTES)
    parser.add_argument("--pool-mib", type=int, default=1024, help="the store's memory tier")
    parser.add_argument("--disk-dir", default="", help="default: a new temporary directory")
    parser.add_argument("--home", default=DEFAULT_HOME)
    parser.add_argument("--json", default="", help="write the figures here")
    args = parser.parse_args()
    args.disk_dir = args.disk_dir or tempfile.mkdtemp(prefix="stagemesh-kvdisk-")
    result = asyncio.run(run(args))
    for key, value in result.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
