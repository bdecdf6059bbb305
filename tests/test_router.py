"""The whole mesh behind the router: the official OpenAI SDK and the gRPC API get the
engines' own greedy text, exact usage, exact stop strings; cancellation frees the
engines; bad input gets clear 4xx errors while good requests go on."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from services.clients import RouterClient
from services.pb import common_pb2, router_pb2, tokenizer_pb2
from tests.support.engines import engine_alone, engines_idle
from tests.support.polling import eventually
from tests.support.requests import QUESTION, QUESTION_TEXT, STORY, metric, post
from tests.support.stages import Mesh

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_chat_matches_the_engine_alone(client, decode, tokenizer, mesh: Mesh) -> None:
    ids = list((await tokenizer.tokenize_chat(QUESTION)).token_ids)
    expected_ids, expected = await engine_alone(decode, tokenizer, ids, 24)
    assert "Paris" in expected

    reply = await client.chat.completions.create(
        model="", messages=QUESTION, temperature=0, max_tokens=24
    )
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids)
    eos_stop = reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == len(expected_ids) + (1 if eos_stop else 0)
    assert reply.model == (await tokenizer.model_info()).model

    chunks = [
        c
        async for c in await client.chat.completions.create(
            model=reply.model,
            messages=QUESTION,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[
        0
    ].finish_reason
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    )


async def test_completions_match_the_engine_alone(client, decode, tokenizer) -> None:
    ids = list((await tokenizer.tokenize(STORY)).token_ids)
    _, expected = await engine_alone(decode, tokenizer, ids, 20)
    reply = await client.completions.create(model="", prompt=STORY, temperature=0, max_tokens=20)
    assert reply.choices[0].text == expected
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 20
    assert reply.choices[0].finish_reason == "length"
    streamed = [
        c
        async for c in await client.completions.create(
            model="", prompt=STORY, temperature=0, max_tokens=20, stream=True
        )
    ]
    assert "".join(c.choices[0].text for c in streamed) == expected
    # Token ids in, several prompts in one call: choices come prompt-major.
    batch = await client.completions.create(
        model="", prompt=[ids, ids[:5]], temperature=0, max_tokens=20
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == expected


async def test_stop_string_cuts_exactly(client, decode, tokenizer) -> None:
    ids = list((await tokenizer.tokenize(STORY)).token_ids)
    _, full = await engine_alone(decode, tokenizer, ids, 30)
    words = full.split()
    stop = " " + words[len(words) // 2]
    expected = full[: full.index(stop)]
    for stream in (False, True):
        reply = await client.completions.create(
            model="", prompt=STORY, temperature=0, max_tokens=30, stop=[stop], stream=stream
        )
        if stream:
            chunks = [c async for c in reply]
            text = "".join(c.choices[0].text for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert text == expected and finish == "stop"


async def test_n_with_seed_is_reproducible(client) -> None:
    async def sample() -> list[str]:
        reply = await client.chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "Invent a name for a new planet."}],
            n=2,
            seed=1234,
            temperature=1.5,
            max_tokens=24,
        )
        assert [c.index for c in reply.choices] == [0, 1]
        assert reply.usage.completion_tokens == 48 or all(c.finish_reason for c in reply.choices)
        return [c.message.content for c in reply.choices]

    first = await sample()
    assert first == await sample()
    assert first[0] != first[1]


async def test_logprobs_name_each_token(client) -> None:
    reply = await client.chat.completions.create(
        model="", messages=QUESTION, temperature=0, max_tokens=8, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob for entry in content)
    if reply.choices[0].finish_reason == "length":
        assert "".join(entry.token for entry in content) == reply.choices[0].message.content


async def test_models_health_and_metrics(client, mesh: Mesh) -> None:
    models = await client.models.list()
    assert len(models.data) == 1 and models.data[0].max_model_len == 4096
    async with httpx.AsyncClient(base_url=mesh.http_url) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}
        metrics = (await http.get("/metrics")).text
    assert "stagemesh_router_sequences_total" in metrics


async def test_grpc_generate_text_chat_and_token_ids(
    router: RouterClient, decode, tokenizer
) -> None:
    ids = list((await tokenizer.tokenize(STORY)).token_ids)
    expected_ids, expected = await engine_alone(decode, tokenizer, ids, 16)
    greedy = common_pb2.SamplingParams(temperature=0, max_tokens=16)
    for request in (
        router_pb2.RouterGenerateRequest(text=STORY, sampling=greedy, return_token_ids=True),
        router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=ids), sampling=greedy, return_token_ids=True
        ),
    ):
        deltas = [d async for d in router.generate(request)]
        assert "".join(d.text for d in deltas) == expected
        assert [t for d in deltas for t in d.token_ids] == expected_ids
        assert (
            deltas[-1].usage.prompt_tokens == len(ids) and deltas[-1].usage.completion_tokens == 16
        )
        assert deltas[-2].finish_reason == common_pb2.FINISH_REASON_LENGTH
    chat = router_pb2.RouterGenerateRequest(
        chat=tokenizer_pb2.ChatInput(
            messages=[tokenizer_pb2.ChatMessage(role="user", content=QUESTION_TEXT)]
        ),
        sampling=greedy,
    )
    result = await router.generate_unary(chat)
    assert "Paris" in result.completions[0].text and result.usage.prompt_tokens > 0


async def test_grpc_lists_models_and_members(router: RouterClient) -> None:
    (card,) = await router.list_models()
    assert card.max_model_len == 4096
    assert card.members_by_role["prefill"] >= 1 and card.members_by_role["decode"] >= 1
    members = await router.list_members(common_pb2.ROLE_DECODE)
    assert members and all(m.member.role == common_pb2.ROLE_DECODE for m in members)
    assert any(
        m.health == "SERVING" and m.HasField("load") and m.load.kv_block_size for m in members
    )


async def test_cancelling_a_stream_frees_every_engine(
    client, router: RouterClient, prefill, decode
) -> None:
    long = {"temperature": 0, "max_tokens": 2000, "extra_body": {"ignore_eos": True}}
    stream = await client.completions.create(model="", prompt=STORY, stream=True, **long)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.close()
    loads = await decode.load()
    assert loads.running_requests <= 1  # it was running; now it must stop
    await engines_idle(prefill, decode)

    call = router.generate(
        router_pb2.RouterGenerateRequest(
            text=STORY,
            sampling=common_pb2.SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True),
        )
    )
    async for delta in call:
        if delta.text:
            break
    call.cancel()
    await engines_idle(prefill, decode)


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b'{"model": "", "messages": [', 400, "not valid JSON"),
        (b'{"model": "", "prompt": "\xff\xfe"}', 400, "UTF-8"),
        ({"model": "", "messages": "hello"}, 400, "messages"),
        ({"model": "", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": "", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "", "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"model": "no-such-model", "prompt": "hi"}, 404, "no-such-model"),
        ({"model": "", "prompt": "word " * 250_000}, 400, "context length"),
        ({"model": "", "prompt": [10**9]}, 400, "vocabulary"),
        ({"model": "", "prompt": [-5]}, 400, "invalid value"),
        (
            {"model": "", "prompt": "hi", "logit_bias": {"the": 5}},
            400,
            "logit_bias keys must be token ids",
        ),
        ({"model": "", "prompt": "hi", "logit_bias": {"1": 500}}, 400, "between -100 and 100"),
        (
            {"model": "", "prompt": "hi", "logit_bias": {"99999999": 1}},
            400,
            "outside the vocabulary",
        ),
        (
            {"model": "", "prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}},
            400,
            "at most 300 tokens",
        ),
        ({"model": "", "prompt": "hi", "n": 1000}, 400, "n must be"),
    ],
)
async def test_bad_requests_get_clear_errors(mesh: Mesh, body, status: int, fragment: str) -> None:
    path = (
        "/v1/chat/completions"
        if isinstance(body, dict) and "messages" in body
        else "/v1/completions"
    )
    reply = await post(mesh, path, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert fragment in error["message"] and error["type"]


async def test_bad_requests_do_not_disturb_good_ones(client, mesh: Mesh) -> None:
    good = asyncio.create_task(
        client.completions.create(model="", prompt=STORY, temperature=0, max_tokens=20)
    )
    bad = [post(mesh, "/v1/completions", b"{") for _ in range(10)]
    bad += [
        post(mesh, "/v1/completions", {"model": "", "prompt": "x" * 1_000_000}) for _ in range(2)
    ]
    replies = await asyncio.gather(*bad)
    assert all(r.status_code == 400 for r in replies)
    assert (await good).usage.completion_tokens == 20
    too_big = await post(mesh, "/v1/completions", {"model": "", "prompt": "x" * (9 * 1024 * 1024)})
    assert too_big.status_code == 413 and "larger than" in too_big.json()["error"]["message"]
    assert mesh.router.alive()


async def test_logit_bias_bans_and_forces_tokens(
    client, router: RouterClient, hf_tokenizer
) -> None:
    """-100 bans the token greedy decoding would pick; +100 makes a token the pick."""
    request = router_pb2.RouterGenerateRequest(
        text=STORY,
        return_token_ids=True,
        sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0),
    )
    first = (await router.generate_unary(request, timeout=120)).completions[0].token_ids[0]
    banned = await client.completions.create(
        model="",
        prompt=STORY,
        max_tokens=6,
        temperature=0,
        logit_bias={str(first): -100},
        extra_body={"return_token_ids": True},
    )
    ids = (banned.choices[0].model_extra or {})["token_ids"]
    assert ids and first not in ids
    forced = await client.chat.completions.create(
        model="",
        messages=[{"role": "developer", "content": "Answer briefly."}, *QUESTION],
        max_tokens=3,
        temperature=0,
        logit_bias={"2000": 100},
    )
    assert forced.choices[0].message.content == hf_tokenizer.decode([2000] * 3)
    request.sampling.logit_bias[2000] = 100
    request.sampling.max_tokens = 3
    via_grpc = (await router.generate_unary(request, timeout=120)).completions[0].token_ids
    assert list(via_grpc) == [2000] * 3


async def test_grpc_errors_keep_their_codes(router: RouterClient) -> None:
    cases = [
        (router_pb2.RouterGenerateRequest(model="nope", text="hi"), grpc.StatusCode.NOT_FOUND),
        (router_pb2.RouterGenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (
            router_pb2.RouterGenerateRequest(
                text="hi", sampling=common_pb2.SamplingParams(top_p=5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ]
    for request, code in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await router.generate_unary(request, timeout=60)
        assert caught.value.code() == code, caught.value.details()


async def test_kv_index_follows_the_engines_and_routes_by_prefix(
    client, router: RouterClient, mesh: Mesh
) -> None:
    prompt = " ".join(
        f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(60)
    )
    await client.completions.create(model="", prompt=prompt, temperature=0, max_tokens=2)

    async def indexed() -> None:  # the prefill engine's BlockStored events reach the index
        members = await router.list_members(common_pb2.ROLE_PREFILL)
        assert any(m.kv_blocks_indexed >= 4 for m in members), members

    await eventually(indexed, timeout=15)
    hits = await metric(
        mesh,
        'stagemesh_router_decisions_total{policy="kv_aware",reason="prefix_hit",role="prefill"}',
    )
    hit_tokens = await metric(mesh, "stagemesh_router_prefix_hit_tokens_total")
    await client.completions.create(
        model="", prompt=prompt + " One more.", temperature=0, max_tokens=2
    )
    assert (
        await metric(
            mesh,
            'stagemesh_router_decisions_total{policy="kv_aware",reason="prefix_hit",role="prefill"}',
        )
        == hits + 1
    )
    assert await metric(mesh, "stagemesh_router_prefix_hit_tokens_total") >= hit_tokens + 4 * 128
    assert await metric(mesh, "stagemesh_router_kv_index_entries") >= 4


async def test_fetch_once_shares_one_fetch_and_forgets_failures() -> None:
    # Pure logic: how the router caches each model's decoder and info.
    from services.aio import fetch_once

    calls = 0
    release = asyncio.Event()

    async def fetch() -> str:
        nonlocal calls
        calls += 1
        await release.wait()
        if calls == 1:
            raise ConnectionError("tokenizer gone")
        return f"decoder #{calls}"

    cache: dict[str, asyncio.Future[str]] = {}
    first = [asyncio.create_task(fetch_once(cache, "m", fetch)) for _ in range(5)]
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(fetch_once(cache, "m", fetch))
    await asyncio.sleep(0)
    cancelled.cancel()  # a caller that gives up leaves the fetch to the others
    release.set()
    results = await asyncio.gather(*first, return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, ConnectionError) for r in results)
    assert "m" not in cache  # the failure is forgotten: the next caller fetches again
    assert (
        await asyncio.gather(*(fetch_once(cache, "m", fetch) for _ in range(3)))
        == ["decoder #2"] * 3
    )
    assert calls == 2
