"""The simulated engine's parts against vLLM's behaviour: its paged cache (eviction
order, prefix reuse, KV events), its scheduler (batch limits, chunked prefill,
preemption) and its token ids (deterministic, unchanged by a migration). The last test
holds a real vLLM engine's KV events beside the sim's for the same prompt."""

from __future__ import annotations

import asyncio
import random

import pytest

from router_svc.kv_index import KvIndex
from router_svc.kv_subscriber import apply_snapshot
from services.clients import EngineClient
from services.engine.sim.cache import BlockPool
from services.engine.sim.requests import SimRequest
from services.engine.sim.scheduler import Scheduler
from services.engine.sim.timing import PROFILES, load_profile
from services.engine.sim.tokens import TokenSource
from services.kv.events import KvEventLog, chain_name
from services.kv.hashing import chain_hashes, chain_root
from services.pb import common_pb2

BLOCK = 4


def pool_of(blocks: int, block_size: int = BLOCK) -> BlockPool:
    return BlockPool(blocks, block_size, KvEventLog(block_size))


def scheduler_of(pool: BlockPool, max_num_seqs: int = 8, batched: int = 64) -> Scheduler:
    # A fast profile: every step 1 ms of real time at speedup 10.
    return Scheduler(
        pool,
        PROFILES["pace-10ms"],
        TokenSource(1000, special_ids=[0, 1, 2]),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=batched,
        speedup=10.0,
    )


async def run_request(
    scheduler: Scheduler, prompt: list[int], max_tokens: int, **extra: object
) -> tuple[list[int], int]:
    """A request's ids and cached prompt tokens, as the runner collects them."""
    outputs = scheduler.add(SimRequest(f"r{random.random()}", prompt, max_tokens, **extra))  # type: ignore[arg-type]
    ids: list[int] = []
    cached = 0
    while (item := await outputs.get()) is not None:
        assert not isinstance(item, BaseException), item
        ids += item.outputs[0].token_ids
        cached = item.num_cached_tokens
    return ids, cached


@pytest.fixture
async def running_scheduler():
    schedulers: list[asyncio.Task[None]] = []

    def start(scheduler: Scheduler) -> Scheduler:
        schedulers.append(asyncio.create_task(scheduler.run()))
        return scheduler

    yield start
    for task in schedulers:
        task.cancel()


@pytest.mark.unit
def test_free_blocks_are_evicted_tail_first_as_in_vllm() -> None:
    """vLLM frees a request's blocks last-first onto the free queue's tail and allocates
    from its head: a finished prompt's tail is evicted before its shared head."""
    pool = pool_of(4)
    prompt = list(range(16))
    hashes = chain_hashes(prompt, BLOCK)
    blocks = pool.allocate(4)
    assert blocks is not None
    pool.cache(blocks, hashes, None, prompt)
    pool.free(blocks)
    assert pool.cached_prefix(hashes) == 4
    pool.allocate(1)  # evicts the last block of the prompt
    assert pool.cached_prefix(hashes) == 3
    pool.allocate(2)
    assert pool.cached_prefix(hashes) == 1
    removed = [e.block_removed for e in pool.events._window if e.HasField("block_removed")]
    assert [list(r.block_hashes) for r in removed] == [
        [chain_name(hashes[3])],
        [chain_name(hashes[2]), chain_name(hashes[1])],
    ]


@pytest.mark.unit
def test_cached_blocks_are_published_with_the_routers_chain_hashes() -> None:
    """The router's index, fed the sim's events, names the blocks with the chain hashes the
    router computes for the prompt (salt included)."""
    pool = pool_of(8)
    prompt = list(range(100, 112))
    root = chain_root("tenant-a")
    hashes = chain_hashes(prompt, BLOCK, root)
    blocks = pool.allocate(3)
    assert blocks is not None
    pool.cache(blocks, hashes, None, prompt, salt="tenant-a")
    index = KvIndex()
    apply_snapshot(index, "sim", pool.events.snapshot())
    assert index.match(hashes, ["sim"]) == {"sim": 3}
    assert index.match(chain_hashes(prompt, BLOCK), ["sim"]) == {
        "sim": 0
    }  # another salt shares nothing


@pytest.mark.unit
def test_profiles_and_profile_files(tmp_path) -> None:
    default = PROFILES["dynamo-default"]
    # Dynamo's published polynomial: 1,000 uncached tokens take about 32 ms.
    assert default.step_seconds(1000, 0, 0.0, 1.0) == pytest.approx(
        (4.21e-7 * 1e6 + 15.18 + 16.5) / 1000
    )
    assert default.step_seconds(0, 8, 0.5, 2.0) == pytest.approx(
        (-25.74 * 0.25 + 54.01 * 0.5 + 5.74) / 2000
    )
    assert default.step_seconds(0, 8, 3.0, 1.0) == pytest.approx(
        (-25.74 + 54.01 + 5.74) / 1000
    )  # full, capped
    assert default.transfer_seconds(1000, 23_040, 1.0) == pytest.approx(1000 * 23_040 / 25e9)
    # The prefill cost per token a sim engine reports: its step's, over the step's tokens.
    assert default.prefill_seconds_per_token(1000, 2.0) == pytest.approx(
        default.step_seconds(1000, 0, 0.0, 2.0) / 1000
    )
    assert default.prefill_seconds_per_token(0, 1.0) == 0.0
    path = tmp_path / "profile.json"
    path.write_text(
        '{"name": "x", "source": "test", "prefill_ms": [0, 0.1, 1], "decode_ms": [0, 0, 7]}'
    )
    assert load_profile(str(path)).step_seconds(0, 1, 0.3, 1.0) == pytest.approx(0.007)
    path.write_text('{"prefill_ms": [1, 2]}')
    with pytest.raises(SystemExit, match="not a timing profile"):
        load_profile(str(path))
    with pytest.raises(SystemExit, match="neither a profile"):
        load_profile("no-such-profile")


@pytest.mark.unit
def test_a_vllm_engine_measures_its_prefill_cost_per_computed_token() -> None:
    """From vLLM's finished-request stats: prefill seconds over the tokens computed (not
    found cached), a moving mean over requests that computed at least a block."""
    from vllm.v1.engine import FinishReason
    from vllm.v1.metrics.stats import FinishedRequestStats

    from services.engine.vllm_stats import LoadStats  # imports vLLM: not at module level

    def finished(prompt: int, cached: int, seconds: float) -> FinishedRequestStats:
        return FinishedRequestStats(
            FinishReason.LENGTH,
            num_prompt_tokens=prompt,
            num_cached_tokens=cached,
            prefill_time=seconds,
        )

    stats = LoadStats(block_size=16)
    assert stats.load(False, 16, 100, 0).prefill_seconds_per_token == 0.0  # not measured
    stats.finished([finished(1000, 990, 0.5)])  # 10 tokens computed: under a block, left out
    assert stats.load(False, 16, 100, 0).prefill_seconds_per_token == 0.0
    stats.finished([finished(1000, 200, 4.0)])  # 800 computed in 4 s
    assert stats.load(False, 16, 100, 0).prefill_seconds_per_token == pytest.approx(0.005)
    stats.finished([finished(116, 16, 0.6)])  # 0.006 s a token: moves it a tenth of the way
    assert stats.load(False, 16, 100, 0).prefill_seconds_per_token == pytest.approx(0.0051)


@pytest.mark.unit
async def test_token_ids_are_a_function_of_the_context(running_scheduler) -> None:
    scheduler = running_scheduler(scheduler_of(pool_of(64)))
    prompt = list(range(3, 30))
    first, _ = await run_request(scheduler, prompt, 12)
    again, _ = await run_request(scheduler, prompt, 12)
    assert first == again and len(first) == 12
    # A migrated stream: the prompt plus the ids already sent goes on with the same ids.
    resumed, _ = await run_request(scheduler, prompt + first[:5], 7)
    assert resumed == first[5:]
    assert not {0, 1, 2} & set(first)  # special tokens are never drawn


@pytest.mark.unit
async def test_a_repeated_prefix_is_served_from_the_cache(running_scheduler) -> None:
    scheduler = running_scheduler(scheduler_of(pool_of(64)))
    prefix = list(range(40, 60))  # five blocks
    _, cached = await run_request(scheduler, prefix + [7, 8], 2)
    assert cached == 0
    _, cached = await run_request(scheduler, prefix + [9], 2)
    assert cached == 20
    _, cached = await run_request(scheduler, prefix, 2)
    assert cached == 16  # a fully cached prompt still computes its last token (its block)


@pytest.mark.unit
async def test_batches_respect_the_sequence_and_token_limits(running_scheduler) -> None:
    scheduler = running_scheduler(scheduler_of(pool_of(256), max_num_seqs=3, batched=16))
    seen_running: list[int] = []

    async def watch() -> None:
        while True:
            seen_running.append(len(scheduler.running))
            await asyncio.sleep(0.0005)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(
        *(run_request(scheduler, list(range(10 * i, 10 * i + 40)), 5) for i in range(6))
    )
    watcher.cancel()
    assert all(len(ids) == 5 for ids, _ in results)
    assert max(seen_running) == 3
    # A 40-token prompt under a 16-token budget is prefilled in chunks, over 3+ steps.
    assert scheduler.tokens_out == 30


@pytest.mark.unit
async def test_a_full_cache_preempts_and_the_sequence_still_completes(running_scheduler) -> None:
    """Two sequences that cannot both fit: the later one is preempted, recomputed, and
    its ids are those of an undisturbed run."""
    pool = pool_of(10)
    scheduler = running_scheduler(scheduler_of(pool, batched=64))
    one, two = list(range(100, 116)), list(range(200, 216))
    (ids_one, _), (ids_two, _) = await asyncio.gather(
        run_request(scheduler, one, 12), run_request(scheduler, two, 12)
    )
    assert scheduler.preemptions >= 1
    alone = running_scheduler(scheduler_of(pool_of(64)))
    assert (await run_request(alone, two, 12))[0] == ids_two
    assert (await run_request(alone, one, 12))[0] == ids_one
    assert pool.usage == 0.0


@pytest.mark.unit
async def test_stop_ids_min_tokens_and_logprob_shapes(running_scheduler) -> None:
    scheduler = running_scheduler(scheduler_of(pool_of(64)))
    prompt = list(range(3, 11))
    ids, _ = await run_request(scheduler, prompt, 10)
    stop = ids[3]
    stopped, _ = await run_request(scheduler, prompt, 10, stop_ids=frozenset({stop}))
    assert stopped == ids[:4]
    late, _ = await run_request(scheduler, prompt, 10, stop_ids=frozenset({stop}), min_tokens=6)
    assert late == ids
    outputs = scheduler.add(SimRequest("lp", prompt, 3, logprobs=4))
    first = await outputs.get()
    assert first is not None and not isinstance(first, BaseException)
    ranked = first.outputs[0].logprobs
    assert (
        ranked is not None
        and len(ranked[0]) == 4
        and ranked[0][first.outputs[0].token_ids[0]].rank == 1
    )


@pytest.mark.unit
async def test_prefill_only_holds_its_blocks_until_released(running_scheduler) -> None:
    pool = pool_of(16)
    scheduler = running_scheduler(scheduler_of(pool))
    outputs = scheduler.add(SimRequest("p1", list(range(30, 46)), 1, prefill_only=True))
    final = None
    while (item := await outputs.get()) is not None:
        final = item
    assert final is not None and not isinstance(final, BaseException)
    assert (
        final.kv_transfer_params is not None
        and final.kv_transfer_params["remote_request_id"] == "p1"
    )
    assert pool.free_blocks == 12
    assert scheduler.release(["p1", "unknown"]) == ["p1"]
    assert pool.free_blocks == 16


async def test_vllm_and_the_sim_publish_the_same_blocks_for_a_prompt(decode: EngineClient) -> None:
    """The router indexes a real vLLM engine's events and the sim's under the same chain
    hashes for the same prompt, so KV-aware routing treats both alike."""
    load = await decode.load()
    size = load.kv_block_size
    prompt = random.Random(27).sample(range(1000, 40000), 2 * size + 5)
    async for _ in decode.generate(prompt, common_pb2.SamplingParams(max_tokens=1, temperature=0)):
        pass
    index = KvIndex()
    apply_snapshot(index, "vllm", await decode.kv_snapshot())
    pool = BlockPool(8, size, KvEventLog(size))
    scheduler = scheduler_of(pool)
    task = asyncio.create_task(scheduler.run())
    try:
        await run_request(scheduler, prompt, 1)
    finally:
        task.cancel()
    apply_snapshot(index, "sim", pool.events.snapshot())
    assert index.match(chain_hashes(prompt, size), ["vllm", "sim"]) == {"vllm": 2, "sim": 2}
