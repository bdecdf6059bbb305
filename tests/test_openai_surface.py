"""What agents use through the OpenAI SDK: structured outputs, tool calls, and the
sampling fields beyond OpenAI's (bad_words, allowed_token_ids), on the session mesh
(which prefills remotely: disaggregated) and on a decode engine alone (aggregated)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import grpc
import httpx
import jsonschema
import openai
import pytest

from services.clients import EngineClient, RouterClient, TokenizerClient
from services.pb import common_pb2, router_pb2, tokenizer_pb2
from tests.support.requests import STORY, metric, post
from tests.support.stages import Mesh

pytestmark = pytest.mark.asyncio(loop_scope="session")

PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 12}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SESSION_PINS = (
    'stagemesh_router_decisions_total{policy="kv_aware",reason="session_affinity",role="decode"}'
)
LOCAL_PROMPT_LOGPROBS = (
    'stagemesh_router_decisions_total{policy="kv_aware",reason="local_prompt_logprobs",'
    'role="disaggregation"}'
)
SUBJECTS = [
    "a baker",
    "a pilot",
    "a poet",
    "a nurse",
    "a farmer",
    "a judge",
    "a sailor",
    "a chef",
    "a monk",
    "a clown",
]


def people_request(subject: str) -> dict[str, Any]:
    return {
        "model": "",
        "messages": [
            {
                "role": "user",
                "content": f"Describe {subject} as JSON with a name, an age and a city.",
            }
        ],
        "temperature": 0,
        "max_tokens": 80,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    }


async def test_json_schema_output_always_matches(client) -> None:
    """20 prompts, 10 streamed: every output parses and matches the schema."""

    async def whole(subject: str) -> str:
        reply = await client.chat.completions.create(**people_request(subject))
        assert reply.choices[0].finish_reason == "stop"
        return str(reply.choices[0].message.content)

    async def streamed(subject: str) -> str:
        chunks = [
            c
            async for c in await client.chat.completions.create(
                **people_request(subject), stream=True
            )
        ]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    texts = await asyncio.gather(*[whole(s) for s in SUBJECTS], *[streamed(s) for s in SUBJECTS])
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)
    assert texts[:10] == texts[10:]  # greedy: streaming changes nothing


async def test_constraints_on_grpc_and_on_an_engine_alone(
    router: RouterClient, decode: EngineClient, tokenizer: TokenizerClient, mesh: Mesh
) -> None:
    """The contract field, through the router (disaggregated, and aggregated: a request
    with prompt_logprobs is never disaggregated) and straight to a decode engine: a
    choice, a regex and a GBNF grammar hold."""
    constraints = [
        (
            common_pb2.StructuredOutputs(choice=common_pb2.Choices(options=["yes", "no"])),
            re.compile(r"yes|no"),
        ),
        (common_pb2.StructuredOutputs(regex=r"\d{3}-[a-z]{4}"), re.compile(r"\d{3}-[a-z]{4}")),
        (
            common_pb2.StructuredOutputs(grammar='root ::= "red" | "green" | "blue"'),
            re.compile(r"red|green|blue"),
        ),
    ]
    eos = list((await tokenizer.model_info()).eos_token_ids)
    ids = list((await tokenizer.tokenize(STORY)).token_ids)
    for constraint, pattern in constraints:
        sampling = common_pb2.SamplingParams(
            temperature=0, max_tokens=20, structured_outputs=constraint
        )
        result = await router.generate_unary(
            router_pb2.RouterGenerateRequest(text=STORY, sampling=sampling), timeout=120
        )
        assert pattern.fullmatch(result.completions[0].text), result.completions[0].text
        local = await metric(mesh, LOCAL_PROMPT_LOGPROBS)
        aggregated = common_pb2.SamplingParams(
            temperature=0, max_tokens=20, structured_outputs=constraint, prompt_logprobs=0
        )
        result = await router.generate_unary(
            router_pb2.RouterGenerateRequest(text=STORY, sampling=aggregated), timeout=120
        )
        assert pattern.fullmatch(result.completions[0].text), result.completions[0].text
        assert len(result.completions[0].prompt_logprobs) == len(ids) - 1
        assert await metric(mesh, LOCAL_PROMPT_LOGPROBS) == local + 1
        sampling.stop_token_ids.extend(eos)
        alone = [t async for reply in decode.generate(ids, sampling) for t in reply.token_ids]
        text = (await tokenizer.decoder()).decode([t for t in alone if t not in eos])
        assert pattern.fullmatch(text)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "objekt"}},
                }
            },
            "invalid JSON schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "needs json_schema.schema",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "invalid regex"),
        ({"structured_outputs": {"grammar": 'root ::= "open'}}, "invalid grammar"),
        ({"structured_outputs": {"choice": []}}, "at least one option"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": [{"type": "function"}]}, "must be a function with a name"),
        ({"allowed_token_ids": [10**8]}, "outside the vocabulary"),
    ],
)
async def test_invalid_constraints_are_refused_before_engine_work(
    mesh: Mesh, extra: dict[str, Any], fragment: str
) -> None:
    prefills = await metric(mesh, "stagemesh_router_decisions_total")
    body = {"model": "", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    reply = await post(mesh, "/v1/chat/completions", body)
    assert reply.status_code == 400, reply.text
    assert fragment in reply.json()["error"]["message"]
    assert (
        await metric(mesh, "stagemesh_router_decisions_total") == prefills
    )  # no worker was even chosen


async def test_invalid_constraint_over_grpc_is_invalid_argument(router: RouterClient) -> None:
    sampling = common_pb2.SamplingParams(
        structured_outputs=common_pb2.StructuredOutputs(json_schema="{")
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await router.generate_unary(
            router_pb2.RouterGenerateRequest(text="hi", sampling=sampling), timeout=60
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not valid JSON" in (caught.value.details() or "")


def weather_question(**extra: Any) -> dict[str, Any]:
    return {
        "model": "",
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER, TIME],
        "temperature": 0,
        "max_tokens": 60,
        **extra,
    }


async def test_named_and_required_tool_calls_match_the_schema(client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = await client.chat.completions.create(**weather_question(tool_choice=named))
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "stop" and message.content is None
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    chunks = [
        c
        async for c in await client.chat.completions.create(
            **weather_question(tool_choice=named), stream=True
        )
    ]
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and all(d.index == 0 for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments

    required = await client.chat.completions.create(**weather_question(tool_choice="required"))
    assert required.choices[0].finish_reason == "tool_calls"
    calls = required.choices[0].message.tool_calls
    assert calls and len(calls) >= 1
    tools = {"get_weather": WEATHER, "get_time": TIME}
    for made in calls:
        jsonschema.validate(
            json.loads(made.function.arguments), tools[made.function.name]["function"]["parameters"]
        )
    single = await client.chat.completions.create(
        **weather_question(tool_choice="required", parallel_tool_calls=False)
    )
    assert len(single.choices[0].message.tool_calls) == 1


async def test_auto_tool_call_is_parsed_from_the_text(client) -> None:
    """The model's text is fixed with a regex; ``auto`` reads the call out of it, whole
    and streamed, and finishes with ``tool_calls``."""
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    )
    body = weather_question(
        extra_body={"structured_outputs": {"regex": re.escape(text)}}, max_tokens=80
    )
    reply = await client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}

    chunks = [c async for c in await client.chat.completions.create(**body, stream=True)]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert content == "Let me check.\n" and [d.function.name for d in calls] == ["get_weather"]
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "c"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    plain = await client.chat.completions.create(
        **weather_question(tool_choice="none", max_tokens=8)
    )
    assert plain.choices[0].message.tool_calls in (None, []) and plain.choices[0].finish_reason in (
        "stop",
        "length",
    )


async def test_a_history_with_tool_results_is_rendered_and_answered(
    client, tokenizer: TokenizerClient
) -> None:
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "c"}',
                    },
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = await client.chat.completions.create(
        model="", messages=history, tools=[WEATHER], temperature=0, max_tokens=16
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0

    chat = tokenizer_pb2.ChatInput(
        messages=[
            tokenizer_pb2.ChatMessage(role="user", content="What is the weather in Paris?"),
            tokenizer_pb2.ChatMessage(
                role="assistant",
                tool_calls=[
                    tokenizer_pb2.ToolCall(
                        id="call_1", name="get_weather", arguments='{"city": "Paris", "unit": "c"}'
                    )
                ],
            ),
            tokenizer_pb2.ChatMessage(
                role="tool", tool_call_id="call_1", content="18 degrees and sunny"
            ),
        ],
        tools_json=json.dumps([WEATHER]),
    )
    rendered = (await tokenizer.tokenize_conversation(chat)).prompt_text
    # The bundled model's template renders neither: the stage writes them in (Hermes form).
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in rendered
    assert (
        '<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>' in rendered
    )
    assert "<|im_start|>tool\n18 degrees and sunny<|im_end|>" in rendered
    assert reply.usage.prompt_tokens == len((await tokenizer.tokenize_conversation(chat)).token_ids)


async def test_allowed_token_ids_and_bad_words(client, router: RouterClient, hf_tokenizer) -> None:
    forced = await client.completions.create(
        model="",
        prompt=STORY,
        max_tokens=3,
        temperature=0,
        extra_body={"allowed_token_ids": [2000]},
    )
    assert forced.choices[0].text == hf_tokenizer.decode([2000] * 3)
    request = router_pb2.RouterGenerateRequest(
        text=STORY, sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0)
    )
    free = (await router.generate_unary(request, timeout=120)).completions[0].text
    word = free.split()[0]
    banned = await client.completions.create(
        model="", prompt=STORY, max_tokens=8, temperature=0, extra_body={"bad_words": [word]}
    )
    assert banned.choices[0].text.split()[0] != word


async def test_cached_tokens_count_what_the_prefill_worker_reused(
    client, prefill: EngineClient
) -> None:
    """Disaggregated, the prompt's cached tokens are the prefill worker's prefix hits (and
    KV-store loads): all whole blocks but the last token's, on a repeat."""
    block = (await prefill.load()).kv_block_size
    prompt = " ".join(
        f"Ledger line {i}: {i * 7919 % 1000} crates of figs shipped to port {i % 13}."
        for i in range(60)
    )
    first = await client.completions.create(model="", prompt=prompt, max_tokens=2, temperature=0)
    again = await client.completions.create(model="", prompt=prompt, max_tokens=2, temperature=0)
    tokens = again.usage.prompt_tokens
    assert tokens > 4 * block
    assert first.usage.prompt_tokens_details.cached_tokens < block
    assert again.usage.prompt_tokens_details.cached_tokens == (tokens - 1) // block * block


async def test_echo_tokenize_and_detokenize(
    client, mesh: Mesh, tokenizer: TokenizerClient, hf_tokenizer
) -> None:
    plain = await client.completions.create(model="", prompt=STORY, max_tokens=4, temperature=0)
    echoed = await client.completions.create(
        model="", prompt=STORY, max_tokens=4, temperature=0, echo=True
    )
    assert echoed.choices[0].text == STORY + plain.choices[0].text
    chunks = [
        c
        async for c in await client.completions.create(
            model="", prompt=STORY, max_tokens=4, temperature=0, echo=True, stream=True, n=2
        )
    ]
    for index in (0, 1):
        assert (
            "".join(c.choices[0].text for c in chunks if c.choices[0].index == index)
            == echoed.choices[0].text
        )

    ids = list((await tokenizer.tokenize(STORY)).token_ids)
    tokenized = (
        await post(mesh, "/tokenize", {"model": "", "prompt": STORY, "return_token_strs": True})
    ).json()
    assert (
        tokenized["tokens"] == ids
        and tokenized["count"] == len(ids)
        and tokenized["max_model_len"] > 0
    )
    assert len(tokenized["token_strs"]) == len(ids)
    chat = (
        await post(
            mesh, "/tokenize", {"model": "", "messages": [{"role": "user", "content": STORY}]}
        )
    ).json()
    assert chat["tokens"] == list(
        (await tokenizer.tokenize_chat([{"role": "user", "content": STORY}])).token_ids
    )
    detokenized = (await post(mesh, "/detokenize", {"model": "", "tokens": ids})).json()
    assert detokenized["prompt"] == hf_tokenizer.decode(ids, skip_special_tokens=True)

    cases: list[tuple[str, dict[str, object], str]] = [
        ("/detokenize", {"model": "", "tokens": [10**9]}, "outside the vocabulary"),
        ("/tokenize", {"model": ""}, "either prompt or messages"),
        (
            "/v1/completions",
            {"model": "", "prompt": "hi", "prompt_logprobs": 1, "stream": True},
            "not streamed",
        ),
        (
            "/v1/completions",
            {"model": "", "prompt": "hi", "echo": True, "logprobs": 1},
            "echo with logprobs",
        ),
    ]
    for path, body, fragment in cases:
        reply = await post(mesh, path, body)
        assert reply.status_code == 400 and fragment in reply.json()["error"]["message"], reply.text


async def test_responses_round_trip_with_previous_response_id(
    client, tokenizer: TokenizerClient
) -> None:
    opening = {
        "model": "",
        "input": "My name is Ada. Say hello to me.",
        "instructions": "Answer briefly.",
        "max_output_tokens": 12,
        "temperature": 0,
    }
    first = await client.responses.create(**opening)
    assert (
        first.status in ("completed", "incomplete")
        and first.output_text
        and first.id.startswith("resp_")
    )
    second = await client.responses.create(
        model="",
        input="What is my name?",
        previous_response_id=first.id,
        max_output_tokens=12,
        temperature=0,
    )
    # The conversation the router continued: the first turn and its answer, without the
    # first request's instructions (OpenAI does not carry them over).
    conversation = [
        {"role": "user", "content": opening["input"]},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.usage.input_tokens == len((await tokenizer.tokenize_chat(conversation)).token_ids)
    assert (await client.responses.retrieve(second.id)).output_text == second.output_text

    events = [e async for e in await client.responses.create(**opening, stream=True)]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if first.status == "completed" else "response.incomplete",
    ]
    assert (
        "".join(e.delta for e in events if e.type == "response.output_text.delta")
        == first.output_text
    )
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == first.output_text

    unstored = await client.responses.create(**opening, store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model="", input="Again?", previous_response_id=unstored.id)
    await client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)


async def test_every_endpoint_honours_the_session_header(client, mesh: Mesh) -> None:
    """A second request with the same ``X-Session-Id`` goes back to its session's decode
    worker (counted as a session-affinity decision), on chat, completions and the
    Responses API alike; without the header nothing is pinned."""
    ask: dict[str, Any] = {"model": "", "temperature": 0}
    endpoints = {
        "chat": lambda **extra: client.chat.completions.create(
            **ask, messages=[{"role": "user", "content": "Hi."}], max_tokens=2, **extra
        ),
        "completions": lambda **extra: client.completions.create(
            **ask, prompt=STORY, max_tokens=2, **extra
        ),
        "responses": lambda **extra: client.responses.create(
            **ask, input="Hi.", max_output_tokens=2, **extra
        ),
    }
    for name, create in endpoints.items():
        before = await metric(mesh, SESSION_PINS)
        for _ in range(2):
            await create()
        assert await metric(mesh, SESSION_PINS) == before, name
        for _ in range(2):
            await create(extra_headers={"X-Session-Id": f"session-of-{name}"})
        assert await metric(mesh, SESSION_PINS) == before + 1, name
    async with httpx.AsyncClient(base_url=mesh.http_url, timeout=120) as http:
        reply = await http.post(
            "/v1/responses",
            json={"model": "", "input": "Hi."},
            headers={b"X-Session-Id": b"caf\xe9"},  # not UTF-8: refused, as on every endpoint
        )
    assert reply.status_code == 400 and "x-session-id" in reply.json()["error"]["message"]


async def test_responses_with_function_tools_and_background_cancel(client) -> None:
    tool = {"type": "function", **WEATHER["function"]}
    ask = {
        "model": "",
        "input": "What is the weather in Paris?",
        "tools": [tool],
        "temperature": 0,
        "max_output_tokens": 60,
        "tool_choice": {"type": "function", "name": "get_weather"},
    }
    called = await client.responses.create(**ask)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    answered = await client.responses.create(
        model="",
        previous_response_id=called.id,
        tools=[tool],
        temperature=0,
        max_output_tokens=10,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": "18 degrees and sunny",
            }
        ],
    )
    assert answered.output_text and answered.usage.input_tokens > called.usage.input_tokens

    events = [e async for e in await client.responses.create(**ask, stream=True)]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == call.arguments
    assert (
        "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        == call.arguments
    )

    background = await client.responses.create(
        model="",
        input="Tell me a very long story about the sea.",
        background=True,
        max_output_tokens=2000,
    )
    assert background.status in ("queued", "in_progress")
    cancelled = await client.responses.cancel(background.id)
    assert cancelled.status == "cancelled"
    assert (await client.responses.retrieve(background.id)).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(called.id)


async def test_prompt_logprobs_match_transformers(client, model_dir, hf_tokenizer) -> None:
    """The prompt is computed by the decode engine (aggregated) and its log-probabilities
    equal transformers' in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    reply = await client.completions.create(
        model="", prompt=STORY, max_tokens=1, temperature=0, extra_body={"prompt_logprobs": 2}
    )
    got = (reply.choices[0].model_extra or {})["prompt_logprobs"]
    ids = hf_tokenizer(STORY)["input_ids"]
    assert len(got) == len(ids) == reply.usage.prompt_tokens and got[0] is None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    for position in range(1, len(ids)):
        entry = got[position][str(ids[position])]
        assert abs(entry["logprob"] - float(logits[position - 1, ids[position]])) < 0.05, position
        assert entry["decoded_token"] == hf_tokenizer.convert_ids_to_tokens(ids[position]).replace(
            "Ġ", " "
        )
        assert (
            2 <= len(got[position]) <= 3
        )  # the top two, and the prompt's own token when not among them


async def test_cache_salt_keeps_tenants_apart(client, mesh: Mesh, prefill: EngineClient) -> None:
    """Two salts never hit each other's blocks: not in the engines (cached_tokens), not in
    the router's index (the prefix hits it predicts); the same salt does."""
    block = (await prefill.load()).kv_block_size
    prompt = " ".join(
        f"Tenant memo {i}: move {i * 31 % 97} pallets from dock {i % 7} to bay {i % 11}."
        for i in range(50)
    )

    async def cached(salt: str | None) -> int:
        extra = {"cache_salt": salt} if salt is not None else {}
        reply = await client.completions.create(
            model="", prompt=prompt, max_tokens=1, temperature=0, extra_body=extra
        )
        assert reply.usage.prompt_tokens > 4 * block
        return reply.usage.prompt_tokens_details.cached_tokens

    assert await cached("tenant-a") < block
    await asyncio.sleep(1)  # the engine's KV events reach the router's index
    predicted = await metric(mesh, "stagemesh_router_prefix_hit_tokens_total")
    assert await cached("tenant-b") == 0
    assert await cached(None) == 0
    assert await metric(mesh, "stagemesh_router_prefix_hit_tokens_total") == predicted
    assert await cached("tenant-a") >= 4 * block
    assert await metric(mesh, "stagemesh_router_prefix_hit_tokens_total") >= predicted + 4 * block
