"""The tokenizer stage over real gRPC: it must agree with transformers' tokenizer, export
a decoder that gives transformers' text (the router detokenizes with it), and answer bad
input with INVALID_ARGUMENT while staying up."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from services.clients import TokenizerClient, channel, health_status
from services.detokenizer import TokenDecoder
from services.operator.launcher import StageProcess
from services.pb import tokenizer_pb2, tokenizer_pb2_grpc
from tests.corpus import CORPUS

pytestmark = pytest.mark.asyncio(loop_scope="session")


def streamed(decoder: TokenDecoder, ids: list[int], **options: Any) -> str:
    """The text the router streams for ``ids``, one engine message per id."""
    detokenizer = decoder.detokenizer(**options)
    return "".join(detokenizer.push([token_id]) for token_id in ids) + detokenizer.finish()


@pytest.mark.parametrize("text", CORPUS)
async def test_tokenize_and_the_exported_decoder_match_transformers(
    tokenizer, hf_tokenizer, text: str
) -> None:
    # The router detokenizes with the stage's export: its text must be transformers',
    # byte for byte, decoded at once or streamed id by id.
    decoder = await tokenizer.decoder()
    ids = list((await tokenizer.tokenize(text)).token_ids)
    assert ids == hf_tokenizer.encode(text)
    for skip in (True, False):
        expected = hf_tokenizer.decode(ids, skip_special_tokens=skip)
        assert decoder.decode(ids, skip_special_tokens=skip) == expected
        assert streamed(decoder, ids, skip_special_tokens=skip) == expected
    assert decoder.decode(ids, skip_special_tokens=False) == text


async def test_token_texts_and_special_tokens(tokenizer, hf_tokenizer) -> None:
    decoder = await tokenizer.decoder()
    special = [1, 2, 9906]
    assert decoder.token_texts(special) == [
        hf_tokenizer.decode([token_id], skip_special_tokens=False) for token_id in special
    ]
    ids = list((await tokenizer.tokenize("<|im_start|>assistant\nHi<|im_end|>")).token_ids)
    assert streamed(decoder, ids) == "assistant\nHi"  # skipped by default
    kept = streamed(decoder, ids, skip_special_tokens=False)
    assert kept == "<|im_start|>assistant\nHi<|im_end|>"


async def test_decoder_arrives_in_chunks_under_the_message_limit(
    tokenizer_stage: StageProcess,
) -> None:
    async with channel(tokenizer_stage.grpc_address) as chan:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(chan)
        chunks = [c.data async for c in stub.GetDecoder(tokenizer_pb2.ModelInfoRequest())]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [c async for c in stub.GetDecoder(tokenizer_pb2.ModelInfoRequest(model="gpt-9"))]
    # SmolLM2's tokenizer is ~3.5 MB as JSON: more than one chunk, each at most 1 MiB.
    assert len(chunks) > 1
    assert all(len(chunk) <= 1 << 20 for chunk in chunks)
    assert b"".join(chunks).startswith(b"{")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown model 'gpt-9'" in caught.value.details()


async def test_chat_template_matches_transformers(tokenizer, hf_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France? 🇫🇷"},
    ]
    reply = await tokenizer.tokenize_chat(messages)
    expected = hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert reply.prompt_text == expected
    assert list(reply.token_ids) == hf_tokenizer.encode(expected, add_special_tokens=False)
    assert reply.prompt_text.endswith("<|im_start|>assistant\n")


async def test_model_info(tokenizer) -> None:
    info = await tokenizer.model_info()
    assert info.model == "SmolLM2-135M-Instruct"
    assert info.vocab_size == 49152
    assert 2 in info.eos_token_ids
    assert info.max_model_len == 8192
    assert info.has_chat_template
    assert "<|im_end|>" in info.special_tokens


async def test_a_developer_message_is_a_system_message(tokenizer) -> None:
    """OpenAI's newer name for system messages; chat templates predate it."""
    question = {"role": "user", "content": "What is the capital of France?"}
    as_developer = await tokenizer.tokenize_chat(
        [{"role": "developer", "content": "Be brief."}, question]
    )
    as_system = await tokenizer.tokenize_chat(
        [{"role": "system", "content": "Be brief."}, question]
    )
    assert list(as_developer.token_ids) == list(as_system.token_ids)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.tokenize("hi", model="no-such-model"), "unknown model 'no-such-model'"),
        (lambda t: t.tokenize_chat([]), "at least one message"),
        (lambda t: t.tokenize_chat([{"role": "wizard", "content": "x"}]), "invalid role 'wizard'"),
        (lambda t: t.model_info("gpt-9"), "unknown model 'gpt-9'"),
    ],
    ids=["unknown-model", "empty-messages", "bad-role", "info-unknown-model"],
)
async def test_bad_input_is_invalid_argument(tokenizer, call, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(tokenizer)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


async def test_invalid_utf8_is_invalid_argument(tokenizer_stage: StageProcess) -> None:
    # A TokenizeRequest whose `text` (field 2) holds bytes that are not UTF-8: no
    # protobuf library would build it, but a buggy client can send it.
    async with channel(tokenizer_stage.grpc_address) as chan:
        raw = chan.unary_unary("/stagemesh.v1.TokenizerService/Tokenize")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(bytes([0x12, 0x03, 0x61, 0xFF, 0xFE]), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # The parser's own words follow (protobuf 7 says "bad UTF-8"; 6 does not say why).
    assert "malformed stagemesh.v1.TokenizeRequest" in caught.value.details()


async def test_stage_survives_bad_input(tokenizer, tokenizer_stage: StageProcess) -> None:
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError):
            await tokenizer.tokenize_chat([{"role": "wizard", "content": "x"}])
    assert tokenizer_stage.alive()
    assert await health_status(tokenizer_stage.grpc_address) == "SERVING"
    assert list((await tokenizer.tokenize("still fine")).token_ids)


async def test_large_prompt(tokenizer_stage: StageProcess, hf_tokenizer) -> None:
    text = "All work and no play makes Jack a dull boy. " * 20_000  # ~900 KB
    # 220k tokens: under a second here, but a starved CI core once took over the
    # default 10 s deadline, so this one request gets a minute.
    async with TokenizerClient(tokenizer_stage.grpc_address, timeout=60) as tokenizer:
        reply = await tokenizer.tokenize(text)
    assert len(reply.token_ids) == len(hf_tokenizer.encode(text))


async def test_reflection_lists_the_services(tokenizer_stage: StageProcess) -> None:
    # What grpcurl does: discover services and message types without .proto files.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(tokenizer_stage.grpc_address) as chan:
        database = ProtoReflectionDescriptorDatabase(chan)
        services = set(await asyncio.to_thread(database.get_services))
        assert {"stagemesh.v1.TokenizerService", "grpc.health.v1.Health"} <= services
        described = database.FindFileContainingSymbol("stagemesh.v1.TokenizeRequest")
        assert described.name == "stagemesh/v1/tokenizer.proto"
