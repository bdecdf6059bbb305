"""The KV store with real engines: a prefill engine and a decode engine
(with --kvstore-decode) sharing one store over NIXL.

A prompt computed on engine A is served on engine B from the store (B reports the
tokens as external prefix-cache hits and generates exactly what A generated); both
engines computing the same prompt at once store its blocks once; a prefix gone from
the store's memory comes back from its disk tier, and a damaged block file is
recomputed, with the same tokens; a store killed mid-run leaves every request
succeeding. Everything is real: etcd, the store stage (with a disk tier), two vLLM CPU
engines with our connector inside vLLM's MultiConnector, NIXL.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from services.clients import EngineClient, KvStoreClient
from services.kv.hashing import chain_hashes, to_wire
from services.operator.launcher import StageProcess
from services.pb import common_pb2, engine_pb2, kvstore_pb2
from tests.support.stages import (
    ENGINE_START_TIMEOUT,
    engine_process,
    kvstore_process,
    private_etcd,
    running,
)

pytestmark = [pytest.mark.isolated, pytest.mark.asyncio(loop_scope="session")]

GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=12)


class StoreMesh:
    def __init__(self, store: StageProcess, a: StageProcess, b: StageProcess, disk: Path) -> None:
        self.store = store
        self.a = a
        self.b = b
        self.disk = disk


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def store_mesh(
    home: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[StoreMesh]:
    """Its own etcd, a store, a prefill engine and a decode engine with
    ``--kvstore-decode``, on one core each: both roles load from and write to the store."""
    log_dir = tmp_path_factory.mktemp("kvstore-engine-logs")
    with private_etcd() as etcd:
        store = kvstore_process(etcd.endpoint, home, log_dir, capacity_mib=512)
        disk = tmp_path_factory.mktemp("kvstore-disk")
        store.args += ["--disk-dir", str(disk), "--disk-gib", "2"]
        a = engine_process(
            "prefill",
            etcd.endpoint,
            home,
            log_dir,
            "--cpu-cores",
            "0",
            "--instance-id",
            "prefill-a",
        )
        b = engine_process(
            "decode",
            etcd.endpoint,
            home,
            log_dir,
            "--cpu-cores",
            "1",
            "--instance-id",
            "decode-b",
            "--kvstore-decode",
        )
        a.log_path = log_dir / "prefill-a.log"
        b.log_path = log_dir / "decode-b.log"
        async with running(store):
            try:
                a.start()
                b.start()
                await asyncio.gather(
                    a.wait_healthy(ENGINE_START_TIMEOUT), b.wait_healthy(ENGINE_START_TIMEOUT)
                )
                yield StoreMesh(store, a, b, disk)
            finally:
                a.stop()
                b.stop()


async def generate(address: str, prompt: list[int], session_id: str = "") -> list[int]:
    async with EngineClient(address, timeout=300) as engine:
        call = engine.generate(prompt, GREEDY, session_id=session_id)
        return [t async for reply in call for t in reply.token_ids]


async def load(address: str) -> engine_pb2.Load:
    async with EngineClient(address) as engine:
        return await engine.load()


async def store_stats(address: str) -> kvstore_pb2.Stats:
    async with KvStoreClient(address) as store:
        return await store.stats()


def long_prompt(seed: int, length: int = 1100) -> list[int]:
    """Token ids of ordinary text-like variety (deterministic per seed)."""
    return [(seed * 7919 + i * 104729) % 40000 + 100 for i in range(length)]


@pytest.mark.parametrize(
    "writer, reader", [("a", "b"), ("b", "a")], ids=["prefill-to-decode", "decode-to-prefill"]
)
async def test_prefix_computed_on_one_engine_is_loaded_on_another(
    store_mesh: StoreMesh, writer: str, reader: str
) -> None:
    """What one engine computed, the other loads from the store: a decode engine with
    --kvstore-decode both reads what a prefill engine wrote and writes what it computed."""
    writing, reading = getattr(store_mesh, writer), getattr(store_mesh, reader)
    store = store_mesh.store.grpc_address
    prompt = long_prompt(1 if writer == "a" else 5)
    stored_before = (await store_stats(store)).used_blocks
    before_w = await load(writing.grpc_address)
    expected = await generate(writing.grpc_address, prompt)
    after_w = await load(writing.grpc_address)
    # The writer computed it all...
    assert after_w.external_prefix_hit_tokens == before_w.external_prefix_hit_tokens
    # ...and measured what computing a prompt token costs it (the router weighs a load
    # from the store against that).
    assert after_w.prefill_seconds_per_token > 0
    block = after_w.kv_block_size
    full_blocks = (len(prompt) - 1) // block
    # Writes leave the writer in the background; wait for them to be committed.
    for _ in range(100):
        if (await store_stats(store)).used_blocks >= stored_before + full_blocks:
            break
        await asyncio.sleep(0.1)
    assert (await store_stats(store)).used_blocks >= stored_before + full_blocks

    before_r = await load(reading.grpc_address)
    loads_before = await store_stats(store)
    got = await generate(reading.grpc_address, prompt)
    after_r = await load(reading.grpc_address)
    loaded = after_r.external_prefix_hit_tokens - before_r.external_prefix_hit_tokens
    assert loaded == full_blocks * block, f"the reader loaded {loaded} tokens from the store"
    assert got == expected, "output with the prefix loaded from the store differs"
    # The reader's connector reported its read with the Release (sent after the read, from
    # its writer thread): the store counts the load, blocks and seconds.
    for _ in range(100):
        loads_after = await store_stats(store)
        if loads_after.loaded_blocks > loads_before.loaded_blocks:
            break
        await asyncio.sleep(0.1)
    assert loads_after.loaded_blocks - loads_before.loaded_blocks == full_blocks
    assert loads_after.load_seconds > loads_before.load_seconds


async def test_a_session_id_reaches_the_store_on_writes_and_on_reads(
    store_mesh: StoreMesh,
) -> None:
    """The engine names the request's session to the store: the writer's Reserve marks
    the blocks as its session's, another engine's Lookup for a second session re-marks
    them (the last session to use a block owns it)."""
    store = store_mesh.store.grpc_address
    prompt = long_prompt(9, 600)
    block = (await load(store_mesh.a.grpc_address)).kv_block_size
    full_blocks = (len(prompt) - 1) // block
    before = await store_stats(store)
    await generate(store_mesh.a.grpc_address, prompt, session_id="agent-writer")
    for _ in range(100):
        stats = await store_stats(store)
        if stats.disk_session_blocks - before.disk_session_blocks >= full_blocks:
            break
        await asyncio.sleep(0.1)
    assert stats.disk_sessions == before.disk_sessions + 1
    assert stats.disk_session_blocks - before.disk_session_blocks == full_blocks
    before_b = await load(store_mesh.b.grpc_address)
    await generate(store_mesh.b.grpc_address, prompt, session_id="agent-reader")
    after_b = await load(store_mesh.b.grpc_address)
    assert after_b.external_prefix_hit_tokens - before_b.external_prefix_hit_tokens == (
        full_blocks * block
    )
    after = await store_stats(store)
    assert after.disk_sessions == before.disk_sessions + 2
    assert after.disk_session_blocks == stats.disk_session_blocks  # re-marked, not added


async def test_two_engines_writing_the_same_prefix_store_it_once(store_mesh: StoreMesh) -> None:
    prompt = long_prompt(4, 700)
    before = (await store_stats(store_mesh.store.grpc_address)).used_blocks
    outputs = await asyncio.gather(
        generate(store_mesh.a.grpc_address, prompt), generate(store_mesh.b.grpc_address, prompt)
    )
    assert outputs[0] == outputs[1]
    block = (await load(store_mesh.a.grpc_address)).kv_block_size
    full_blocks = (len(prompt) - 1) // block
    for _ in range(100):
        used = (await store_stats(store_mesh.store.grpc_address)).used_blocks
        if used - before >= full_blocks:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(1.0)  # let a duplicate write, if any, land too
    used = (await store_stats(store_mesh.store.grpc_address)).used_blocks
    assert used - before == full_blocks, (
        f"{used - before} blocks stored for {full_blocks} distinct ones"
    )


async def computed_then_evicted_from_memory(
    store_mesh: StoreMesh, prompt: list[int]
) -> tuple[list[int], int]:
    """A's answer to ``prompt`` (computed: the reference) once its blocks are on the
    store's disk and gone from its memory; and the engines' block size."""
    expected = await generate(store_mesh.a.grpc_address, prompt)
    block = (await load(store_mesh.a.grpc_address)).kv_block_size
    hashes = chain_hashes(prompt[:-1], block)
    names = [f"{to_wire(h).hex()}.blk" for h in hashes]
    for _ in range(100):
        if all(any(store_mesh.disk.rglob(name)) for name in names):
            break
        await asyncio.sleep(0.1)
    assert all(any(store_mesh.disk.rglob(name)) for name in names), "not written behind"
    for _ in range(100):  # a block is pinned until its write is done
        if not (await store_stats(store_mesh.store.grpc_address)).pinned_blocks:
            break
        await asyncio.sleep(0.1)
    async with KvStoreClient(store_mesh.store.grpc_address) as store:
        await store.evict(hashes, memory_only=True)
    return expected, block


async def test_a_prefix_gone_from_engine_and_memory_loads_from_disk(
    store_mesh: StoreMesh,
) -> None:
    """B never saw the prompt and the store's memory no longer holds it: B loads it
    from the store's disk tier and answers exactly as A did computing it."""
    prompt = long_prompt(6)
    expected, block = await computed_then_evicted_from_memory(store_mesh, prompt)
    full_blocks = (len(prompt) - 1) // block
    disk_hits = (await store_stats(store_mesh.store.grpc_address)).disk_hit_blocks
    before = await load(store_mesh.b.grpc_address)
    got = await generate(store_mesh.b.grpc_address, prompt)
    after = await load(store_mesh.b.grpc_address)
    loaded = after.external_prefix_hit_tokens - before.external_prefix_hit_tokens
    assert loaded == full_blocks * block, f"B loaded {loaded} tokens"
    stats = await store_stats(store_mesh.store.grpc_address)
    assert stats.disk_hit_blocks - disk_hits == full_blocks
    assert got == expected, "output with the prefix read back from disk differs"


async def test_a_damaged_block_file_is_recomputed_with_the_same_tokens(
    store_mesh: StoreMesh,
) -> None:
    prompt = long_prompt(7)
    expected, block = await computed_then_evicted_from_memory(store_mesh, prompt)
    third = chain_hashes(prompt[:-1], block)[2]
    damaged = next(store_mesh.disk.rglob(f"{to_wire(third).hex()}.blk"))
    with open(damaged, "r+b") as file:  # noqa: ASYNC230  a few bytes, in the test
        file.seek(damaged.stat().st_size - 100)
        file.write(b"\xff" * 8)
    corrupt = (await store_stats(store_mesh.store.grpc_address)).disk_corrupt_blocks
    before = await load(store_mesh.b.grpc_address)
    got = await generate(store_mesh.b.grpc_address, prompt)
    after = await load(store_mesh.b.grpc_address)
    loaded = after.external_prefix_hit_tokens - before.external_prefix_hit_tokens
    assert loaded == 2 * block, f"B loaded {loaded} tokens: only the blocks before the bad one"
    stats = await store_stats(store_mesh.store.grpc_address)
    assert stats.disk_corrupt_blocks == corrupt + 1
    assert got == expected, "output after recomputing the damaged block differs"


async def store_fault_under_load(
    store_mesh: StoreMesh, seed: int, fault: Callable[[], None]
) -> list[int]:
    """A prefix computed on A (so in the store), then five requests on B that load it,
    with ``fault`` struck at the store while they run: each must answer in full, and the
    one for the prefix alone as A did. Returns A's answer."""
    shared = long_prompt(seed, 900)
    expected = await generate(store_mesh.a.grpc_address, shared)  # in the store now
    await asyncio.sleep(1.0)
    prompts = [shared + long_prompt(10 * seed + i, 40) for i in range(4)]
    tasks = [
        asyncio.create_task(generate(store_mesh.b.grpc_address, p)) for p in [*prompts, shared]
    ]
    await asyncio.sleep(0.5)
    fault()
    results = await asyncio.gather(*tasks)
    assert all(len(r) == GREEDY.max_tokens for r in results)
    assert results[-1] == expected
    return expected


async def test_draining_the_store_mid_run_fails_no_request(store_mesh: StoreMesh) -> None:
    """SIGTERM of the store while an engine loads a prefix from it: every request
    answers as without the store, the store exits 0, and a new one takes its place."""
    process = store_mesh.store.process
    assert process is not None
    await store_fault_under_load(store_mesh, 5, lambda: process.send_signal(signal.SIGTERM))
    assert process.wait(timeout=60) == 0
    store_mesh.store.start()
    await store_mesh.store.wait_healthy(60)


async def test_killing_the_store_mid_run_fails_no_request(store_mesh: StoreMesh) -> None:
    expected = await store_fault_under_load(store_mesh, 2, store_mesh.store.kill)
    # With the store gone the engines compute everything, and still answer right.
    assert await generate(store_mesh.a.grpc_address, long_prompt(2, 900)) == expected
    assert await generate(store_mesh.b.grpc_address, long_prompt(3, 700))
