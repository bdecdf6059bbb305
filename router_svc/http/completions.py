"""POST /v1/completions: parse, start the pipeline once (a batch of prompts is one
request), render.

Outputs run prompt-major, ``n`` per prompt, so output ``i`` answers prompt ``i // n``.
``echo`` puts the prompt's text before its first piece of output: the text sent, or
the ids sent decoded as generated text is (the pipeline decodes them).
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from router_svc.generation import Generation
from router_svc.http import incoming, sse
from router_svc.http.choices import FINISH, ChoiceRenderer, prompt_logprobs
from router_svc.http.protocol import CompletionRequest
from router_svc.pipeline import Pipeline
from services.pb import common_pb2, router_pb2


class CompletionLogprobs:
    """The legacy completions ``logprobs`` object; text offsets run across deltas."""

    def __init__(self) -> None:
        self.offset = 0

    def render(self, positions: list[common_pb2.PositionLogprobs]) -> dict[str, Any]:
        """The object for these positions, their offsets following the ones before."""
        tokens, offsets = [], []
        for p in positions:
            tokens.append(p.chosen.token)
            offsets.append(self.offset)
            self.offset += len(p.chosen.token)
        return {
            "tokens": tokens,
            "token_logprobs": [p.chosen.logprob for p in positions],
            "top_logprobs": [{t.token: t.logprob for t in p.top} for p in positions],
            "text_offset": offsets,
        }


class CompletionRenderer(ChoiceRenderer):
    """Completions' answer: text per choice (after its prompt's echo), or deltas of it."""

    id_prefix = "cmpl-"
    whole_object = "text_completion"
    chunk_object = "text_completion"

    def __init__(
        self, generation: Generation, include_usage: bool = False, echoes: list[str] | None = None
    ) -> None:
        super().__init__(generation, include_usage)
        #: The echoed prompt text of each output (None: no echo).
        self._echoes = (
            [text for text in echoes for _ in range(generation.n)] if echoes is not None else None
        )
        self._logprobs: dict[int, CompletionLogprobs] = {}

    def _fill(
        self, choice: dict[str, Any], completion: router_pb2.Completion, wants_logprobs: bool
    ) -> None:
        positions = list(completion.logprobs)
        choice["text"] = self._echo(completion.index) + completion.text
        choice["logprobs"] = CompletionLogprobs().render(positions) if wants_logprobs else None
        if completion.prompt_logprobs:
            choice["prompt_logprobs"] = prompt_logprobs(completion.prompt_logprobs)

    def _delta_choice(self, delta: router_pb2.RouterGenerateResponse) -> dict[str, Any] | None:
        logprobs = self._logprobs.get(delta.index)
        if logprobs is None:  # the choice's first delta
            logprobs = self._logprobs[delta.index] = CompletionLogprobs()
            text = self._echo(delta.index) + delta.text
        else:
            text = delta.text
        return {
            "index": delta.index,
            "text": text,
            "logprobs": logprobs.render(list(delta.logprobs)) if delta.logprobs else None,
            "finish_reason": FINISH.get(delta.finish_reason),
        }

    def _echo(self, index: int) -> str:
        return self._echoes[index] if self._echoes is not None else ""


class Completions:
    """The endpoint's handler."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def create(self, request: web.Request) -> web.StreamResponse:
        """Generate text for one prompt or a batch, streamed or whole."""
        body = await incoming.read_body(request, CompletionRequest)
        prompts = body.prompts()
        self._pipeline.limits.check_batch(len(prompts))  # before a message is built per prompt
        calls = [incoming.built(functools.partial(body.to_grpc, p)) for p in prompts]
        async with incoming.generate(self._pipeline, request, calls) as generation:
            echoes = await generation.prompt_texts() if body.echo else None
            renderer = CompletionRenderer(generation, body.include_usage, echoes)
            if body.stream:
                return await sse.stream(request, generation, renderer)
            return web.json_response(renderer.whole(await generation.result()))
