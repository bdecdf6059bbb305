"""The router's tool-call parsers read the same calls vLLM's own parsers read, from the
same texts, and their streamed form adds up to the whole-text answer."""

from __future__ import annotations

import copy
import json
import random

import pytest

from router_svc.tool_parsers import PARSERS, Extracted, ToolCall, ToolParser

HERMES_TEXTS = [
    "No tools needed: Paris.",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    (
        'Checking.\n<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    ),
    '<tool_call>\n{"name": "unclosed", "arguments": {"q": "é"}}\n',
    '<tool_call>{"name": "broken", "arguments": {"x": </tool_call>',
    '<tool_call>{"name": "no_arguments"}</tool_call>',
    "text with a < sign and <tool_ but no call",
]
LLAMA_TEXTS = [
    "Plain answer.",
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "a", "arguments": {"x": [1, 2]}}; {"name": "b", "parameters": {}}',
    '  {"name": "nested", "parameters": {"inner": {"name": "x"}}}',
    '{"not_a_call": true}',
    'Here: {"name": "inline", "parameters": {}}',
    '{"name": "cut", "parameters": {"x": ',
]


@pytest.fixture(scope="module")
def vllm_tokenizer(hf_tokenizer):
    """The bundled model's tokenizer with the markers vLLM's parsers look up added."""
    tokenizer = copy.deepcopy(hf_tokenizer)  # the session's stays as the model ships it
    tokenizer.add_tokens(["<tool_call>", "</tool_call>", "<|python_tag|>"], special_tokens=True)
    return tokenizer


def vllm_parser(name: str, tokenizer):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser
    from vllm.tool_parsers.llama_tool_parser import Llama3JsonToolParser

    parser = {"hermes": Hermes2ProToolParser, "llama3_json": Llama3JsonToolParser}[name](tokenizer)
    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    return lambda text: parser.extract_tool_calls(text, request)


@pytest.mark.parametrize(
    ("name", "texts"), [("hermes", HERMES_TEXTS), ("llama3_json", LLAMA_TEXTS)]
)
def test_whole_text_matches_vllm(name: str, texts: list[str], vllm_tokenizer) -> None:
    ours, theirs = PARSERS[name](), vllm_parser(name, vllm_tokenizer)
    for text in texts:
        expected = theirs(text)
        got = ours.extract(text)
        assert got.content == expected.content, text
        assert [(c.name, json.loads(c.arguments)) for c in got.calls] == [
            (c.function.name, json.loads(c.function.arguments)) for c in expected.tool_calls
        ], text


def streamed(parser: ToolParser, text: str, seed: int) -> Extracted:
    """Feed ``text`` in random pieces and join the deltas."""
    rng = random.Random(seed)
    stream = parser.stream()
    fields, at = [], 0
    while at < len(text):
        step = rng.randint(1, 7)
        fields += stream.feed(text[at : at + step])
        at += step
    fields += stream.finish()
    content = "".join(f.get("content", "") for f in fields)
    calls = [c for f in fields for c in f.get("tool_calls", [])]
    assert [c["index"] for c in calls] == list(range(len(calls)))
    return Extracted(
        content or None,
        [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in calls],
    )


@pytest.mark.parametrize(
    ("name", "texts"), [("hermes", HERMES_TEXTS[:4]), ("llama3_json", LLAMA_TEXTS[:4])]
)
def test_streamed_calls_add_up_to_the_whole_text(name: str, texts: list[str]) -> None:
    parser = PARSERS[name]()
    for text in texts:
        whole = parser.extract(text)
        for seed in range(5):
            pieces = streamed(parser, text, seed)
            assert [(c.name, json.loads(c.arguments)) for c in pieces.calls] == [
                (c.name, json.loads(c.arguments)) for c in whole.calls
            ]
            assert (pieces.content or "").strip() == (whole.content or "").strip()
