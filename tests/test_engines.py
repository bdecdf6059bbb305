"""The prefill and decode stages with real vLLM engines on the CPU, the prompt's KV
handed from one to the other over NIXL.

Correctness oracle: with greedy sampling, prefill-on-one-engine + decode-on-another
equals one engine alone, token for token, and both equal Hugging Face transformers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from services.clients import EngineClient
from services.etcd import EtcdSession
from services.kv.handles import HandleSigner
from services.membership import MEMBERS_PREFIX, RecordReader
from services.operator.launcher import cpu_seconds, live_processes_in_group
from services.pb import common_pb2
from tests.support.engines import disaggregated, engines_idle
from tests.support.polling import eventually
from tests.support.stages import MESH_KEY, PREFILL_LEASE_SECONDS

pytestmark = pytest.mark.asyncio(loop_scope="session")

MAX_TOKENS = 16
GREEDY = common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
PASSAGE = (
    "The Rhine is a river that begins in the Swiss Alps and flows north through Germany "
    "and the Netherlands before reaching the North Sea. Cities such as Basel, Strasbourg, "
    "Cologne and Rotterdam grew along its banks because it carried trade for centuries. "
)


def reference_prompts(hf_tokenizer) -> dict[str, list[int]]:
    """Prompts from one token to several KV blocks (the CPU block size is 128)."""

    def chat(text: str) -> list[int]:
        rendered = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return hf_tokenizer.encode(rendered, add_special_tokens=False)

    return {
        "one-token": hf_tokenizer.encode("Hello", add_special_tokens=False),
        "short-chat": chat("What is the capital of France?"),
        "plain-text": hf_tokenizer.encode("The three primary colors are", add_special_tokens=False),
        "one-block": chat(PASSAGE * 2 + "Which sea does the Rhine reach?"),
        "two-blocks": chat(PASSAGE * 5 + "Name one city on the Rhine."),
        "five-blocks": chat(PASSAGE * 12 + "In which mountains does the Rhine begin?"),
    }


async def collect(call: grpc.aio.UnaryStreamCall) -> tuple[list[int], object]:
    ids: list[int] = []
    last = None
    async for reply in call:
        ids.extend(reply.token_ids)
        last = reply
    return ids, last


@pytest.fixture(scope="module")
def hf_greedy(model_dir: Path, hf_tokenizer):
    """Greedy continuation by transformers in float32: the independent reference."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def generate(ids: list[int]) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=hf_tokenizer.eos_token_id,
                pad_token_id=hf_tokenizer.eos_token_id,
            )
        return out[0, len(ids) :].tolist()

    return generate


async def test_disaggregated_equals_one_engine_and_transformers(
    prefill: EngineClient, decode: EngineClient, hf_tokenizer, hf_greedy
) -> None:
    prompts = reference_prompts(hf_tokenizer)
    lengths = sorted(len(ids) for ids in prompts.values())
    assert lengths[0] == 1 and lengths[-1] > 4 * 128, lengths
    for name, ids in prompts.items():
        split, prefilled = await disaggregated(prefill, decode, ids, GREEDY)
        assert prefilled.prompt_tokens == len(ids)
        assert prefilled.handle.num_tokens == len(ids)
        alone, alone_last = await collect(decode.generate(ids, GREEDY))
        reference = hf_greedy(ids)
        assert split == alone, f"{name}: disaggregated {split} != one engine {alone}"
        assert alone == reference, (
            f"{name}: engine {hf_tokenizer.decode(alone)!r} != transformers "
            f"{hf_tokenizer.decode(reference)!r}"
        )
        assert alone_last.usage.prompt_tokens == len(ids)  # type: ignore[attr-defined]
        assert alone_last.usage.completion_tokens == len(alone)  # type: ignore[attr-defined]


async def test_answer_is_right_text(decode: EngineClient, hf_tokenizer) -> None:
    ids = reference_prompts(hf_tokenizer)["short-chat"]
    out, last = await collect(decode.generate(ids, GREEDY))
    assert "Paris" in hf_tokenizer.decode(out)
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP  # type: ignore[attr-defined]
    assert last.stop_token_id == hf_tokenizer.eos_token_id  # type: ignore[attr-defined]


async def test_logprobs_and_seeded_sampling(decode: EngineClient) -> None:
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=3, logprobs=2)
    replies = [reply async for reply in decode.generate([1, 504, 3458], params)]
    positions = [p for reply in replies for p in reply.logprobs]
    assert len(positions) == 3
    for position in positions:
        assert position.chosen.rank == 1  # greedy picks the top token
        assert [t.rank for t in position.top] == [1, 2]
        assert position.top[0].logprob >= position.top[1].logprob
    seeded = common_pb2.SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first, _ = await collect(decode.generate([1, 504, 3458], seeded))
    second, _ = await collect(decode.generate([1, 504, 3458], seeded))
    assert first == second and len(first) == 12


async def test_abort_mid_generation(decode: EngineClient) -> None:
    long_run = common_pb2.SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    call = decode.generate([1, 504, 3458], long_run, request_id="abort-me")
    received = 0
    async for reply in call:
        received += len(reply.token_ids)
        if received >= 4:
            break
    assert (await decode.load()).running_requests == 1
    assert await decode.abort("abort-me") == ["abort-me"]
    finish = [reply.finish_reason async for reply in call if reply.finish_reason]
    assert finish == [common_pb2.FINISH_REASON_ABORT]
    await engines_idle(decode, timeout=10, interval=0.1)
    assert await decode.abort("abort-me") == []  # gone: aborting again is a no-op
    out, _ = await collect(decode.generate([1, 504], GREEDY))
    assert out


async def test_cancelled_stream_aborts_the_request(decode: EngineClient) -> None:
    long_run = common_pb2.SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    call = decode.generate([1, 504, 3458], long_run)
    await call.read()
    call.cancel()
    await engines_idle(decode, timeout=10, interval=0.1)


async def test_cancel_while_kv_is_in_flight_is_safe(
    prefill: EngineClient, decode: EngineClient, hf_tokenizer
) -> None:
    ids = reference_prompts(hf_tokenizer)["five-blocks"]
    handle = (await prefill.prefill(ids, GREEDY)).handle
    call = decode.generate(ids, GREEDY, kv_handle=handle)
    await asyncio.sleep(0)  # the request is on its way; the NIXL read may be running
    call.cancel()
    await engines_idle(decode, timeout=30, interval=0.1)
    out, _ = await collect(decode.generate(ids, GREEDY))
    assert out  # the engine survived the deferred abort


async def test_uncollected_handle_frees_prefill_blocks(prefill: EngineClient) -> None:
    baseline = (await prefill.load()).kv_cache_usage
    ids = [1000 + (i * 7) % 40000 for i in range(700)]  # fresh blocks, not in any cache
    reply = await prefill.prefill(ids)
    assert len(reply.handle.remote_block_ids) >= 5
    assert reply.handle.expires_at > time.time()
    held = await prefill.load()
    assert held.kv_cache_usage > baseline and held.pending_transfers >= 1
    # Nobody collects it: after the lease the engine frees the blocks by itself.

    async def freed() -> None:
        usage = (await prefill.load()).kv_cache_usage
        assert usage <= baseline, f"prefill blocks leaked past the lease: {usage} > {baseline}"

    await eventually(freed, timeout=PREFILL_LEASE_SECONDS + 20, interval=0.5)


async def test_abort_of_a_finished_prefill_frees_its_blocks_at_once(prefill: EngineClient) -> None:
    """What the router sends when no decode will collect a handle: the blocks come back
    well before the lease ends, and only once."""
    baseline = (await prefill.load()).kv_cache_usage
    ids = [2000 + (i * 11) % 40000 for i in range(700)]  # fresh blocks, not in any cache
    await prefill.prefill(ids, request_id="released-early")
    held = await prefill.load()
    assert held.kv_cache_usage > baseline
    released = time.monotonic()
    assert await prefill.abort("released-early") == ["released-early"]
    while (await prefill.load()).kv_cache_usage > baseline:
        assert time.monotonic() - released < PREFILL_LEASE_SECONDS / 2, (
            "blocks kept until the lease"
        )
        await asyncio.sleep(0.1)
    assert await prefill.abort("released-early") == []  # nothing left to release


async def test_kv_events_report_stored_blocks_and_resume(decode: EngineClient) -> None:
    snapshot = await decode.kv_snapshot()
    block = snapshot.block_size
    prompt = [2000 + (i * 13) % 30000 for i in range(2 * block + 5)]

    stream = decode.kv_events(snapshot.epoch, snapshot.sequence)
    await collect(decode.generate(prompt, GREEDY))
    stored: list[int] = []
    last_sequence = snapshot.sequence
    while len(stored) < 2 * block:
        reply = await asyncio.wait_for(stream.read(), timeout=30)
        assert not reply.resync_required
        for event in reply.events:
            assert event.sequence == last_sequence + 1  # no gaps
            last_sequence = event.sequence
            if event.HasField("block_stored"):
                stored.extend(event.block_stored.token_ids)
    stream.cancel()
    assert stored[: 2 * block] == prompt[: 2 * block]  # the two full blocks, in order

    # Disconnected, more happens; reconnecting from the last sequence misses nothing.
    await collect(decode.generate([3000 + i for i in range(block + 1)], GREEDY))
    resumed = decode.kv_events(snapshot.epoch, last_sequence)
    reply = await asyncio.wait_for(resumed.read(), timeout=30)
    resumed.cancel()
    assert not reply.resync_required
    assert reply.events[0].sequence == last_sequence + 1
    assert any(
        e.block_stored.token_ids[:block] == [3000 + i for i in range(block)] for e in reply.events
    )

    # A stale epoch is told to resync from a snapshot.
    stale = decode.kv_events(snapshot.epoch + 1, 5)
    assert (await asyncio.wait_for(stale.read(), timeout=10)).resync_required
    stale.cancel()


@pytest.mark.parametrize(
    ("prompt", "params", "code", "message"),
    [
        ([], GREEDY, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ([1, 10**6], GREEDY, grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
        (
            [1, 2],
            common_pb2.SamplingParams(max_tokens=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_tokens must be at least 1",
        ),
        ([5] * 4096, GREEDY, grpc.StatusCode.INVALID_ARGUMENT, "the model allows at most 4095"),
        (
            [1, 2],
            common_pb2.SamplingParams(temperature=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        ([1, 2], common_pb2.SamplingParams(top_p=0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ],
    ids=["empty", "out-of-vocab", "max-tokens-0", "too-long", "bad-temperature", "bad-top-p"],
)
async def test_bad_requests_are_rejected_clearly(
    decode: EngineClient, prompt: list[int], params, code, message: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(decode.generate(prompt, params, timeout=60))
    assert caught.value.code() == code
    assert message in caught.value.details()


async def test_bad_handles_are_not_found(decode: EngineClient, prefill: EngineClient) -> None:
    signer = HandleSigner(MESH_KEY.encode())  # issued by a key holder, but expired or unknown
    expired = common_pb2.KvTransferHandle(
        remote_engine_id="e",
        remote_block_ids=[1],
        remote_host="127.0.0.1",
        remote_port=9,
        remote_request_id="old",
        num_tokens=2,
        expires_at=time.time() - 3,
    )
    # A current prefill member's address, but an engine id it does not have.
    issuer = (await prefill.prefill([1, 2])).handle
    unknown = common_pb2.KvTransferHandle(
        remote_engine_id="no-such-engine",
        remote_block_ids=[1],
        remote_host=issuer.remote_host,
        remote_port=issuer.remote_port,
        remote_request_id="ghost",
        num_tokens=2,
        prefill_instance_id=issuer.prefill_instance_id,
    )
    for handle, message in ((expired, "expired"), (unknown, "could not collect")):
        signer.sign(handle)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(decode.generate([1, 2], GREEDY, kv_handle=handle, timeout=120))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert message in caught.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await decode.prefill([1, 2])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Both stages are still fine.
    out, _ = await collect(decode.generate([1, 2], GREEDY))
    assert out and (await prefill.prefill([1, 2])).handle.remote_engine_id


async def test_forged_handles_are_refused_and_never_transfer(
    decode: EngineClient, prefill: EngineClient, hf_tokenizer
) -> None:
    """A handle changed after the prefill engine signed it (other blocks, another host,
    another request), an unsigned one, or one under another key is PERMISSION_DENIED
    before any pull: the real handle is still whole afterwards."""
    ids = reference_prompts(hf_tokenizer)["two-blocks"]
    alone, _ = await collect(decode.generate(ids, GREEDY))
    real = (await prefill.prefill(ids, GREEDY)).handle
    assert real.signature

    def forged(
        change: Callable[[common_pb2.KvTransferHandle], None],
    ) -> common_pb2.KvTransferHandle:
        handle = common_pb2.KvTransferHandle()
        handle.CopyFrom(real)
        change(handle)
        return handle

    forgeries = [
        forged(lambda h: h.remote_block_ids.__setitem__(0, h.remote_block_ids[0] + 1)),
        forged(lambda h: setattr(h, "remote_port", h.remote_port + 1)),
        forged(lambda h: setattr(h, "remote_request_id", "someone-else")),
        forged(lambda h: h.ClearField("signature")),
        forged(lambda h: HandleSigner(b"another mesh").sign(h)),
    ]
    for handle in forgeries:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(decode.generate(ids, GREEDY, kv_handle=handle, timeout=60))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
    # Signed by a key holder, but naming no prefill member of the mesh, or a member at an
    # address it did not register: refused all the same (the key alone is not enough).
    signer = HandleSigner(MESH_KEY.encode())
    for handle in (
        forged(lambda h: setattr(h, "prefill_instance_id", "prefill-impostor")),
        forged(lambda h: setattr(h, "remote_port", h.remote_port + 1)),
        forged(lambda h: setattr(h, "remote_host", "10.9.9.9")),
    ):
        signer.sign(handle)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await collect(decode.generate(ids, GREEDY, kv_handle=handle, timeout=60))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
        assert "names no prefill engine of this mesh" in (caught.value.details() or "")
    smuggled = forged(lambda h: setattr(h, "extra_json", '{"kv_connector_override": 1}'))
    HandleSigner(MESH_KEY.encode()).sign(smuggled)  # even from a key holder: unknown keys stay out
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(decode.generate(ids, GREEDY, kv_handle=smuggled, timeout=60))
    assert (
        caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "kv_connector_override" in caught.value.details()
    )
    collected, _ = await collect(decode.generate(ids, GREEDY, kv_handle=real, timeout=120))
    assert collected == alone


async def test_engines_register_their_kv_facts(engine_stages, etcd_session: EtcdSession) -> None:
    addresses = {stage.grpc_address for stage in engine_stages}

    async def registered() -> dict[str, common_pb2.Member]:
        listing = await (await etcd_session.client()).get_prefix(MEMBERS_PREFIX.encode())
        parsed = RecordReader(common_pb2.Member.FromString).read_all(listing).values()
        members = {member.grpc_address: member for member in parsed}
        assert addresses <= set(members), f"registered: {sorted(members)}"
        return members

    # One lease TTL, should a keep-alive have been late.
    members = await eventually(registered, timeout=10, interval=0.5)
    for stage, role in zip(engine_stages, (common_pb2.ROLE_PREFILL, common_pb2.ROLE_DECODE)):
        member = members[stage.grpc_address]
        assert member.role == role
        assert member.kv_block_size == 128
        assert member.kv_capacity_blocks > 0
        assert member.nixl_address.startswith("127.0.0.1:")
        assert member.kv_event_epoch > 0
        assert list(member.models) == ["SmolLM2-135M-Instruct"]


async def test_idle_engines_leave_their_cores_free(engine_stages) -> None:
    # NIXL's progress thread used to poll with a zero timeout: a whole core per idle
    # engine, on the core its model runs on (services/engine/vllm_plugin.py). An engine
    # is legitimately busy for a while after a test: vLLM's queues spin for a second
    # after each message, and a prefill engine keeps stepping until a handle nobody
    # collects expires. So each engine must go quiet within a minute: some 4-second
    # window in which its whole process group uses under a quarter of a core.
    window = 4.0
    for stage in engine_stages:
        pids = live_processes_in_group(stage.pid)

        async def quiet(pids: list[int] = pids, name: str = stage.name) -> None:
            start = cpu_seconds(pids)
            await asyncio.sleep(window)
            used = cpu_seconds(pids) - start
            assert used < 0.25 * window, f"{name} never idle: {used:.2f} CPU s in {window} s"

        await eventually(quiet, timeout=60, interval=0)


def allowed_cores_of_every_thread(pgid: int) -> dict[str, set[int]]:
    """``pid/tid (name)`` -> the cores the kernel lets that thread run on, for every
    thread of every live process in the group (the stage, EngineCore, their children)."""
    from services.placement import parse_cores

    masks: dict[str, set[int]] = {}
    for pid in live_processes_in_group(pgid):
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                status = (task / "status").read_text()
            except OSError:
                continue  # the thread ended
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            name = f"{pid}/{task.name} ({fields['Name'].strip()})"
            masks[name] = set(parse_cores(fields["Cpus_allowed_list"].strip()))
    return masks


async def test_engine_processes_and_threads_stay_on_their_cores(engine_stages) -> None:
    # The session pins prefill to core 0 and decode to core 1 (--cpu-cores). Not only
    # vLLM's OpenMP threads: the stage process, gRPC's threads, EngineCore and NIXL's
    # progress thread must all stay there, or they preempt the other engine's compute.
    for stage, core in zip(engine_stages, (0, 1)):
        masks = allowed_cores_of_every_thread(stage.pid)
        assert len(masks) > 10, masks  # the stage and its engine core, with their threads
        strays = {name: cores for name, cores in masks.items() if cores != {core}}
        assert not strays, f"{stage.name}: threads allowed off core {core}: {strays}"


async def test_two_engines_on_one_host_make_progress_together(
    prefill, decode, hf_tokenizer
) -> None:
    # Four streams sent to each engine at the same moment. When the engines' helper
    # threads floated over both cores, one engine's first tokens came only after the
    # other engine had finished (6.4 s instead of 0.3 s).
    prompts = [
        hf_tokenizer.encode(
            f"Story {i}: once upon a time, in a town by the sea,", add_special_tokens=False
        )
        for i in range(4)
    ]
    params = common_pb2.SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    started = time.monotonic()

    async def first_token_after(engine: EngineClient, prompt: list[int]) -> float:
        first = None
        async for reply in engine.generate(prompt, params, timeout=120):
            if first is None and reply.token_ids:
                first = time.monotonic() - started
        assert first is not None
        return first

    firsts = await asyncio.gather(
        *(first_token_after(engine, prompt) for engine in (prefill, decode) for prompt in prompts)
    )
    on_prefill, on_decode = firsts[:4], firsts[4:]
    assert abs(min(on_prefill) - min(on_decode)) < 1.0, (on_prefill, on_decode)
    assert max(firsts) - min(firsts) < 1.5, firsts
