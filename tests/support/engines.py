"""Engine helpers: a second, tiny model, a disaggregated request by hand, what an engine
generates on its own, and waiting for engines to go idle."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from services.clients import EngineClient, TokenizerClient
from services.pb import common_pb2, engine_pb2
from tests.support.polling import eventually


def make_small_llama(path: Path, tokenizer_dir: Path) -> Path:
    """A two-layer Llama with 4 heads (2 KV heads), random weights, and the tokenizer
    from ``tokenizer_dir``: a second model that starts in seconds (and whose heads
    split over two tensor-parallel ranks, which the bundled model's 9 do not)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,  # spread logits: no near-ties in argmax
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


async def disaggregated(
    prefill: EngineClient,
    decode: EngineClient,
    prompt: list[int],
    params: common_pb2.SamplingParams,
) -> tuple[list[int], engine_pb2.PrefillResponse]:
    """Prefill on one engine, decode on the other with the handle; the generated ids.

    On a CI host whose two cores are saturated by both engines a handle can miss its
    collection: vLLM's NIXL handshake waits a fixed 5 s for the prefill side channel,
    and a starved decode process can reach the handle after its lease ran out. Either
    way the decode answers NOT_FOUND, and the caller is to prefill again (the router
    does the same, then falls back to aggregated decode); here we prefill again, twice
    at most.
    """
    for attempt in range(3):
        prefilled = await prefill.prefill(prompt, params)
        try:
            ids = [
                t
                async for reply in decode.generate(prompt, params, kv_handle=prefilled.handle)
                for t in reply.token_ids
            ]
            return ids, prefilled
        except grpc.aio.AioRpcError as error:
            if attempt == 2 or error.code() != grpc.StatusCode.NOT_FOUND:
                raise
    raise AssertionError("unreachable")


async def engine_alone(
    decode: EngineClient, tokenizer: TokenizerClient, ids: list[int], max_tokens: int
) -> tuple[list[int], str]:
    """What the decode engine generates on its own, greedy, stopping at the tokenizer's EOS."""
    eos = list((await tokenizer.model_info()).eos_token_ids)
    params = common_pb2.SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=eos)
    out = [t async for reply in decode.generate(ids, params) for t in reply.token_ids]
    if out and out[-1] in eos:
        out = out[:-1]
    return out, (await tokenizer.decoder()).decode(out)


async def engines_idle(
    *engines: EngineClient, timeout: float = 30.0, interval: float = 0.2
) -> None:
    """Wait until no engine runs or queues a request."""

    async def idle() -> None:
        loads = await asyncio.gather(*(e.load() for e in engines))
        busy = [load for load in loads if load.running_requests or load.waiting_requests]
        assert not busy, f"engines still busy: {busy}"

    await eventually(idle, timeout, interval)
