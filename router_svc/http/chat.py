"""POST /v1/chat/completions: parse, start the pipeline once, render.

The pipeline plans the request's tools (:class:`~router_svc.tools.ToolPlan`) with the
parser of the model it resolves to; this module reads the calls out of the text with
that plan, whole or as they stream.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from router_svc.generation import Generation
from router_svc.http import incoming, sse
from router_svc.http.choices import FINISH, ChoiceRenderer, prompt_logprobs
from router_svc.http.protocol import ChatCompletionRequest
from router_svc.pipeline import Pipeline
from router_svc.tool_parsers import ToolStream
from services.pb import common_pb2, router_pb2


def _entry(entry: common_pb2.TokenLogprob) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.token.encode())}


def chat_logprobs(positions: list[common_pb2.PositionLogprobs]) -> dict[str, Any]:
    """Chat's ``logprobs`` object: per token, its log-probability and the top ones."""
    return {
        "content": [
            {**_entry(p.chosen), "top_logprobs": [_entry(t) for t in p.top]} for p in positions
        ]
    }


def merged(fields: list[dict[str, Any]]) -> dict[str, Any]:
    """One chat delta from a tool stream's pieces: content joined, calls in order."""
    delta: dict[str, Any] = {}
    for field in fields:
        if "content" in field:
            delta["content"] = delta.get("content", "") + field["content"]
        delta.setdefault("tool_calls", []).extend(field.get("tool_calls", []))
    if not delta.get("tool_calls"):
        delta.pop("tool_calls", None)
    return delta


class ChatRenderer(ChoiceRenderer):
    """Chat's answer: an assistant message per choice (its tool calls read out by the
    plan), or deltas of one, the first of each choice naming the role."""

    id_prefix = "chatcmpl-"
    whole_object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, generation: Generation, include_usage: bool = False) -> None:
        super().__init__(generation, include_usage)
        self._plan = generation.plan
        self._started: set[int] = set()
        self._tools: dict[int, ToolStream] = {}

    def whole(self, result: router_pb2.RouterGenerateResult) -> dict[str, Any]:
        """The answer; prompt log-probabilities, if asked for, once at the top (vLLM's
        place for them in chat)."""
        body = super().whole(result)
        if result.completions and result.completions[0].prompt_logprobs:
            body["prompt_logprobs"] = prompt_logprobs(result.completions[0].prompt_logprobs)
        return body

    def _fill(
        self, choice: dict[str, Any], completion: router_pb2.Completion, wants_logprobs: bool
    ) -> None:
        message: dict[str, Any] = {"role": "assistant", "content": completion.text}
        if self._plan is not None:
            found = self._plan.extract(completion.text)
            message["content"] = found.content
            message["tool_calls"] = [call.render() for call in found.calls]
            choice["finish_reason"] = self._plan.finish_reason(
                bool(found.calls), choice["finish_reason"]
            )
        choice["message"] = message
        choice["logprobs"] = chat_logprobs(list(completion.logprobs)) if wants_logprobs else None

    def _delta_choice(self, delta: router_pb2.RouterGenerateResponse) -> dict[str, Any] | None:
        choice: dict[str, Any] = {"index": delta.index}
        finish = FINISH.get(delta.finish_reason)
        if self._plan is not None:
            tools = self._tools.setdefault(delta.index, self._plan.stream())
            fields = tools.feed(delta.text) + (tools.finish() if delta.finish_reason else [])
            choice["delta"] = merged(fields)
            if finish is not None:
                finish = self._plan.finish_reason(tools.calls > 0, finish)
            elif not fields and not delta.logprobs and not delta.token_ids:
                return None  # held back: part of a call, or of its opening tag
        else:
            choice["delta"] = {"content": delta.text}
        if delta.index not in self._started:
            self._started.add(delta.index)
            choice["delta"]["role"] = "assistant"
        choice["logprobs"] = chat_logprobs(list(delta.logprobs)) if delta.logprobs else None
        choice["finish_reason"] = finish
        return choice


class ChatCompletions:
    """The endpoint's handler."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def create(self, request: web.Request) -> web.StreamResponse:
        """Generate a chat answer, streamed or whole."""
        body = await incoming.read_body(request, ChatCompletionRequest)
        call = incoming.built(body.to_grpc)
        async with incoming.generate(
            self._pipeline, request, [call], body.tool_request()
        ) as generation:
            renderer = ChatRenderer(generation, body.include_usage)
            if body.stream:
                return await sse.stream(request, generation, renderer)
            return web.json_response(renderer.whole(await generation.result()))
