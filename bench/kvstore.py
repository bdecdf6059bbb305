"""KV store benchmark: a shared prefix loaded from the store vs recomputed, and the
store's NIXL throughput next to a raw NIXL copy.

Starts etcd, a KV store and two prefill engines (one core each). For each trial a fresh
shared prefix of PREFIX tokens (plus a short question) goes:

- to engine B cold, where nothing holds it: B computes all of it (*recomputed*);
- to engine A, which computes it and writes its blocks to the store; then, with a new
  question, to engine B, whose own cache has never seen it: B loads the prefix's
  blocks from the store over NIXL and computes only the rest (*loaded*).

With ``--disk-dir`` the store has a disk tier, and each trial adds a third case:

- a fresh prefix computed on A, written behind to the store's disk, then evicted from
  the store's memory; B loads it from the disk tier (*from disk*).

Time to first token is measured at B's gRPC Generate (one output token). Then, with
the engines stopped, the benchmark writes and reads blocks of the engines' size to and
from the store from its own NIXL agent, and times a raw NIXL copy of the same bytes
between two agents in one process; with a disk tier, also the store's own disk read and
write GB/s (its Stats) beside a raw file write (fsynced) and read of as many bytes.

    python -m bench.kvstore [--prefix 1500] [--trials 3] [--disk-dir D] [--json F] [--png F]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engines import fresh_prompt, timed_generate
from bench.nixl_copy import raw_copy_gbps
from bench.report import add_output_arguments, print_table, write_json, write_png
from services.clients import EngineClient, KvStoreClient
from services.config import DEFAULT_HOME
from services.kv.nixl import new_agent
from services.kv.shards import ShardMap, ring_points
from services.kv.store_link import HostBlocks, StoreLink
from services.model import prepare_bundled_model
from services.net import free_port
from services.operator.etcd_server import EmbeddedEtcd
from services.operator.launcher import ProcessGroup, StageProcess
from services.pb import common_pb2, kvstore_pb2

ONE_TOKEN = common_pb2.SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)


async def _ttft(address: str, prompt: list[int]) -> float:
    async with EngineClient(address, timeout=600) as engine:
        ttft, _, _ = await timed_generate(engine, prompt, ONE_TOKEN)
    return ttft


async def _store_stats(address: str) -> kvstore_pb2.Stats:
    async with KvStoreClient(address) as store:
        return await store.stats()


async def _external_hits(address: str) -> int:
    async with EngineClient(address) as engine:
        return int((await engine.load()).external_prefix_hit_tokens)


async def _disk_ttft(args: argparse.Namespace, store: str, a: str, b: str, rng: Any) -> float:
    """B's TTFT for a prefix A computed, once it is on the store's disk and gone from its
    memory (B has never seen it)."""
    shared = fresh_prompt(args.prefix, rng)
    on_disk = (await _store_stats(store)).disk_blocks
    await _ttft(a, shared + fresh_prompt(args.question, rng))
    for _ in range(200):  # written behind: on disk once nothing waits pinned for its write
        await asyncio.sleep(0.1)
        stats = await _store_stats(store)
        if stats.disk_blocks > on_disk and stats.pinned_blocks == 0:
            break
    async with KvStoreClient(store) as client:
        await client.evict(memory_only=True)
    return await _ttft(b, shared + fresh_prompt(args.question, rng))


async def measure_ttft(
    args: argparse.Namespace, store: str, a: str, b: str
) -> list[dict[str, Any]]:
    """Per trial, B's TTFT for a prefix recomputed, loaded from the store's memory (and
    read back from its disk, with ``--disk-dir``)."""
    rng = random.Random(0)
    await _ttft(b, fresh_prompt(64, rng))  # one-off costs (first NIXL use, warm-up)
    await _ttft(a, fresh_prompt(64, rng))
    rows = []
    for trial in range(args.trials):
        cold_prefix = fresh_prompt(args.prefix, rng)
        recomputed = await _ttft(b, cold_prefix + fresh_prompt(args.question, rng))

        shared = fresh_prompt(args.prefix, rng)
        await _ttft(a, shared + fresh_prompt(args.question, rng))
        stored_before = (await _store_stats(store)).used_blocks
        await asyncio.sleep(0.5)  # A's writes leave in the background after its step
        hits_before = await _external_hits(b)
        loaded = await _ttft(b, shared + fresh_prompt(args.question, rng))
        loaded_tokens = await _external_hits(b) - hits_before
        row = {
            "trial": trial,
            "prefix_tokens": args.prefix,
            "recomputed_ttft_s": recomputed,
            "loaded_ttft_s": loaded,
            "speedup": recomputed / loaded,
            "loaded_tokens": loaded_tokens,
            "store_blocks": stored_before,
        }
        if args.disk_dir:
            hits_before = await _external_hits(b)
            row["disk_ttft_s"] = await _disk_ttft(args, store, a, b, rng)
            row["disk_loaded_tokens"] = await _external_hits(b) - hits_before
        rows.append(row)
        print(
            f"  trial {trial}: recomputed {recomputed * 1000:.0f} ms, "
            f"loaded {loaded * 1000:.0f} ms ({loaded_tokens} tokens from the store), "
            f"{recomputed / loaded:.1f}x"
            + (
                f"; from disk {row['disk_ttft_s'] * 1000:.0f} ms "
                f"({row['disk_loaded_tokens']} tokens)"
                if args.disk_dir
                else ""
            ),
            flush=True,
        )
    return rows


def measure_disk(stats: kvstore_pb2.Stats, directory: str) -> dict[str, float]:
    """The store's disk-tier GB/s (from its Stats) beside a raw file write (fsynced) and
    read of as many bytes in the same directory."""
    nbytes = max(int(stats.disk_write_bytes), 64 << 20)
    path = Path(directory) / "bench-raw-copy"
    data = os.urandom(16 << 20)
    start = time.perf_counter()
    with open(path, "wb") as file:
        file.writelines(data for _ in range(nbytes // len(data)))
        file.flush()
        os.fsync(file.fileno())
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    with open(path, "rb") as file:
        while file.read(len(data)):
            pass
    read_s = time.perf_counter() - start
    path.unlink()
    return {
        "store_disk_write_gbps": stats.disk_write_bytes / max(stats.disk_write_seconds, 1e-9) / 1e9,
        "store_disk_read_gbps": stats.disk_read_bytes / max(stats.disk_read_seconds, 1e-9) / 1e9,
        "raw_file_write_gbps": nbytes / write_s / 1e9,
        "raw_file_read_gbps": nbytes / read_s / 1e9,
    }


def measure_nixl(
    store_address: str, instance_id: str, block_bytes: int, total_mib: int
) -> dict[str, float]:
    """Store write and read GB/s from this process's agent, for blocks of ``block_bytes``."""
    blocks = max(1, (total_mib << 20) // block_bytes)
    shards = ShardMap(
        [
            kvstore_pb2.ShardEntry(
                instance_id=instance_id,
                grpc_address=store_address,
                ring_points=ring_points(instance_id),
            )
        ]
    )
    host = HostBlocks(new_agent("bench-client"), blocks, block_bytes)
    link = StoreLink(host.agent, rpc_timeout=30, transfer_timeout=60)
    try:
        host.memory[:] = 7
        hashes = list(range(1, blocks + 1))
        start = time.perf_counter()
        written = link.store(shards, "bench", hashes, block_bytes, host.regions)
        write_s = time.perf_counter() - start
        prefix = link.lookup(shards, "bench", hashes)
        host.memory[:] = 0
        start = time.perf_counter()
        link.read(prefix.hits, [host.regions(i) for i in range(len(prefix.hits))], prefix)
        read_s = time.perf_counter() - start
        link.release(prefix)
        if written != blocks or len(prefix.hits) != blocks or not bool((host.memory == 7).all()):
            raise RuntimeError(
                f"store round trip lost data: wrote {written}/{blocks}, read {len(prefix.hits)}"
            )
        nbytes = blocks * block_bytes
        return {
            "bytes": nbytes,
            "store_write_gbps": nbytes / write_s / 1e9,
            "store_read_gbps": nbytes / read_s / 1e9,
            "raw_nixl_gbps": raw_copy_gbps(nbytes),
        }
    finally:
        link.close()
        host.close()


async def run(args: argparse.Namespace) -> None:
    """Start etcd, the store and two engines, measure, stop everything, report."""
    home = Path(args.home)
    prepare_bundled_model(home)
    log_dir = Path(tempfile.mkdtemp(prefix="stagemesh-bench-kvstore-"))
    etcd = EmbeddedEtcd(client_port=0)
    etcd.start()
    group = ProcessGroup()
    try:
        store_port = free_port()
        store = group.add(
            StageProcess(
                "kvstore",
                "kvstore_svc",
                [
                    "--port",
                    str(store_port),
                    "--etcd",
                    etcd.endpoint,
                    "--home",
                    str(home),
                    "--capacity-mib",
                    str(args.capacity_mib),
                    "--instance-id",
                    "kvstore-bench",
                    *(["--disk-dir", args.disk_dir, "--disk-gib", "8"] if args.disk_dir else []),
                ],
                f"127.0.0.1:{store_port}",
                log_dir,
            )
        )
        await store.wait_healthy(120)
        engines = []
        for name, core in (("prefill-a", "0"), ("prefill-b", "1")):
            port = free_port()
            engines.append(
                group.add(
                    StageProcess(
                        name,
                        "prefill_svc",
                        [
                            "--port",
                            str(port),
                            "--etcd",
                            etcd.endpoint,
                            "--home",
                            str(home),
                            "--cpu-cores",
                            core,
                            "--kv-cache-gib",
                            "2",
                            "--max-model-len",
                            str(args.max_model_len),
                            "--instance-id",
                            name,
                            *(["--block-size", str(args.block_size)] if args.block_size else []),
                        ],
                        f"127.0.0.1:{port}",
                        log_dir,
                    )
                )
            )
        print(f"starting the store and two engines (logs in {log_dir})...", flush=True)
        await asyncio.gather(*(engine.wait_healthy(600) for engine in engines))
        rows = await measure_ttft(
            args, store.grpc_address, engines[0].grpc_address, engines[1].grpc_address
        )
        block_bytes = int((await _store_stats(store.grpc_address)).block_bytes)
        disk = (
            measure_disk(await _store_stats(store.grpc_address), args.disk_dir)
            if args.disk_dir
            else {}
        )
        for engine in engines:  # the store's own NIXL paths, with no engine competing
            await asyncio.to_thread(engine.stop)
        nixl = await asyncio.to_thread(
            measure_nixl, store.grpc_address, "kvstore-bench", block_bytes, args.nixl_mib
        )
    finally:
        group.stop_all()
        etcd.stop()

    recomputed = statistics.median(r["recomputed_ttft_s"] for r in rows)
    loaded = statistics.median(r["loaded_ttft_s"] for r in rows)
    print(
        f"\nTTFT for a {args.prefix}-token shared prefix + {args.question}-token question "
        "on a cold engine"
    )
    print_table(
        rows,
        [
            ("trial", "trial", "d"),
            ("recomputed_ttft_s", "recomputed s", ".3f"),
            ("loaded_ttft_s", "loaded s", ".3f"),
            ("speedup", "speedup", ".1f"),
            ("loaded_tokens", "tokens loaded", "d"),
        ],
    )
    print(
        f"median: recomputed {recomputed * 1000:.0f} ms, loaded {loaded * 1000:.0f} ms, "
        f"{recomputed / loaded:.1f}x (target >= 10x)"
    )
    if disk:
        print(
            f"median from disk: {statistics.median(r['disk_ttft_s'] for r in rows) * 1000:.0f} ms; "
            + ", ".join(f"{k} {v:.2f}" for k, v in disk.items())
        )
    print(
        f"\nstore NIXL throughput, {nixl['bytes'] / 1e6:.0f} MB "
        f"in blocks of {block_bytes / 1e6:.2f} MB:"
    )
    print(
        f"  write {nixl['store_write_gbps']:.2f} GB/s, read {nixl['store_read_gbps']:.2f} GB/s, "
        f"raw NIXL copy {nixl['raw_nixl_gbps']:.2f} GB/s"
    )
    payload = {
        "benchmark": "kvstore",
        "prefix_tokens": args.prefix,
        "question_tokens": args.question,
        "block_size": args.block_size or "default",
        "rows": rows,
        "median_recomputed_ttft_s": recomputed,
        "median_loaded_ttft_s": loaded,
        "speedup": recomputed / loaded,
        "block_bytes": block_bytes,
        "nixl": nixl,
        "disk": disk,
    }
    if args.json:
        write_json(Path(args.json), payload)
    if args.png:
        xs = [float(r["trial"] + 1) for r in rows]
        write_png(
            Path(args.png),
            f"TTFT, {args.prefix}-token shared prefix",
            "trial",
            {
                "recomputed": (xs, [r["recomputed_ttft_s"] for r in rows]),
                "loaded from the KV store": (xs, [r["loaded_ttft_s"] for r in rows]),
            },
            "seconds",
        )


def main() -> None:
    """``python -m bench.kvstore``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, default=1500, help="shared prefix length in tokens")
    parser.add_argument("--question", type=int, default=16, help="tokens after the shared prefix")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--capacity-mib", type=int, default=2048, help="store capacity")
    parser.add_argument(
        "--nixl-mib", type=int, default=256, help="bytes moved in the NIXL measurement"
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--disk-dir", default="", help="give the store a disk tier here and measure loads from it"
    )
    parser.add_argument(
        "--block-size",
        type=int,
        default=0,
        help="engines' KV block size in tokens (0: the engines' default, 128 on CPU)",
    )
    add_output_arguments(parser, DEFAULT_HOME)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
